"""xicon_pose_batch: pose detection (nodes 365 and 363) runs its detectors over several frames per
call where their models take a batch, instead of one frame per call.

The work is in ``pose_batch.py``; ``prestartup_script.py`` installs it as an import hook before
ComfyUI loads the packs. This package registers no node.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
