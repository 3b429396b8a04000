"""xicon_pose_render: the SCAIL pose render (node 362, ``RenderNLFPoses``) with its taichi
runtime and kernels kept from job to job, frames rendered in batches, and the 2D skeleton laid
over them in one pass per frame; the frames are upstream's, bit for bit.

The work is in ``pose_render.py``; ``prestartup_script.py`` installs it as an import hook before
ComfyUI loads the packs. This package registers no node.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
