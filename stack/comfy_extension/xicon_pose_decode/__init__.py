"""xicon_pose_decode: ViTPose's keypoint decoding (pose detection, node 363) for all keypoints at
once instead of one keypoint at a time in Python.

The work is in ``pose_decode.py``; ``prestartup_script.py`` installs it as an import hook before
ComfyUI loads the packs. This package registers no node.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
