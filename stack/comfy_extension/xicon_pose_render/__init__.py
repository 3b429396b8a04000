"""xicon_pose_render: the SCAIL pose render (node 362, ``RenderNLFPoses``) with its taichi
runtime and kernels kept from job to job, frames rendered in batches, and the 2D skeleton laid
over them in one pass per frame; the frames are upstream's, bit for bit.

The work is in ``pose_render.py``; ``prestartup_script.py`` installs it as an import hook before
ComfyUI loads the packs, and this package arranges taichi's start once every node is loaded
(``install_warm``). This package registers no node.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_pose_render")

try:
    impl = sys.modules.get("xicon_pose_render_impl")  # loaded by prestartup_script.py
    if impl is None:
        path = Path(__file__).resolve().with_name("pose_render.py")
        spec = importlib.util.spec_from_file_location("xicon_pose_render_impl", path)
        assert spec and spec.loader
        impl = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = impl
        spec.loader.exec_module(impl)
    import execution
    import torch

    log.info(
        "xicon_pose_render: %s",
        impl.install_warm(execution.PromptExecutor, os.environ, torch.cuda.is_available),
    )
except Exception:  # taichi then starts with the first render, as upstream does
    log.exception("xicon_pose_render: taichi's early start not arranged")
