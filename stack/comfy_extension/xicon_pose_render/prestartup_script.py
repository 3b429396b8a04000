"""xicon_pose_render, run by ComfyUI before it loads any custom node (``main.py``
``execute_prestartup_script``): adds the import hook of ``pose_render.py``, so that whenever
ComfyUI-SCAIL-Pose's ``NLFPoseExtract/nlf_render.py`` is imported (the node imports it on its
first run), its renderer is replaced by the one that keeps its kernels.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

log = logging.getLogger("xicon_pose_render")


def load_pose_render() -> types.ModuleType:
    path = Path(__file__).resolve().with_name("pose_render.py")
    spec = importlib.util.spec_from_file_location("xicon_pose_render_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    load_pose_render().install()
except Exception:  # a broken hook must not stop ComfyUI: the pack then runs as upstream ships it
    log.exception("xicon_pose_render: import hook not installed")
