"""xicon_pose_batch, run by ComfyUI before it loads any custom node (``main.py``
``execute_prestartup_script``): adds the import hook of ``pose_batch.py``, so that whenever
ComfyUI-SCAIL-Pose's ``nodes.py`` is imported (custom nodes load in no fixed order), its pose
detection node runs its detectors in batches.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

log = logging.getLogger("xicon_pose_batch")


def load_pose_batch() -> types.ModuleType:
    path = Path(__file__).resolve().with_name("pose_batch.py")
    spec = importlib.util.spec_from_file_location("xicon_pose_batch_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    load_pose_batch().install(os.environ)
except Exception:  # a broken hook must not stop ComfyUI: the pack then runs as upstream ships it
    log.exception("xicon_pose_batch: import hook not installed")
