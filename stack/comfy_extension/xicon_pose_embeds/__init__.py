"""xicon_pose_embeds: the pose embeds' frames (node 324) scaled and converted on ComfyUI's device,
a chunk at a time, instead of on the host as whole-clip copies.

The work is in ``pose_embeds.py``; it is installed when ComfyUI loads this package and takes
effect before the first prompt. This package registers no node.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_pose_embeds")


def _load():
    path = Path(__file__).resolve().with_name("pose_embeds.py")
    spec = importlib.util.spec_from_file_location("xicon_pose_embeds_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    import execution
    import nodes

    log.info(
        "xicon_pose_embeds: %s",
        _load().install(execution.PromptExecutor, nodes.NODE_CLASS_MAPPINGS, os.environ),
    )
except Exception:  # a broken hook must not stop ComfyUI: the node then runs as upstream's
    log.exception("xicon_pose_embeds: not installed")
