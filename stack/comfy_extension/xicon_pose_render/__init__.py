"""xicon_pose_render: the SCAIL pose render (node 362, ``RenderNLFPoses``) with its taichi
runtime and kernels kept from job to job, frames rendered in batches, and the 2D skeleton laid
over them in one pass per frame; the frames are upstream's (bit for bit in the tests' jobs;
``pose_render.py`` says where the kernel alone rounds otherwise).

The work is in ``pose_render.py``; ``prestartup_script.py`` installs it as an import hook before
ComfyUI loads the packs, and this package arranges taichi's start once every node is loaded
(``install_warm``). This package registers no node.
"""

import logging
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_pose_render")

try:
    impl = sys.modules.get("xicon_pose_render_impl")  # loaded by prestartup_script.py
    if impl is None:  # its import hook is not in place: nothing to start taichi for
        log.info("xicon_pose_render: no import hook; taichi starts with the first render")
    else:
        import execution
        import torch

        log.info(
            "xicon_pose_render: %s",
            impl.install_warm(execution.PromptExecutor, os.environ, torch.cuda.is_available),
        )
except Exception:  # taichi then starts with the first render, as upstream does
    log.exception("xicon_pose_render: taichi's early start not arranged")
