"""xicon_pose_decode, run by ComfyUI before it loads any custom node (``main.py``
``execute_prestartup_script``): adds the import hook of ``pose_decode.py``, so that whenever
ComfyUI-WanAnimatePreprocess's ``models/onnx_models.py`` is imported (custom nodes load in no
fixed order), its ViTPose keypoint decoding is replaced by the all-keypoints-at-once version.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

log = logging.getLogger("xicon_pose_decode")


def load_pose_decode() -> types.ModuleType:
    path = Path(__file__).resolve().with_name("pose_decode.py")
    spec = importlib.util.spec_from_file_location("xicon_pose_decode_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up
    spec.loader.exec_module(module)
    return module


try:
    load_pose_decode().install()
except Exception:  # a broken hook must not stop ComfyUI: the pack then runs as upstream ships it
    log.exception("xicon_pose_decode: import hook not installed")
