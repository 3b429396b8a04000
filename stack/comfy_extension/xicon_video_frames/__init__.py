"""xicon_video_frames: VideoHelperSuite's video load (node 130) on every core, with upstream's
frames bit for bit.

The work is in ``video_frames.py``; it is installed when ComfyUI loads this package and takes
effect before the first prompt. This package registers no node.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_video_frames")


def _load():
    path = Path(__file__).resolve().with_name("video_frames.py")
    spec = importlib.util.spec_from_file_location("xicon_video_frames_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    import execution
    import nodes

    log.info(
        "xicon_video_frames: %s",
        _load().install(execution.PromptExecutor, nodes.NODE_CLASS_MAPPINGS, os.environ),
    )
except Exception:  # a broken hook must not stop ComfyUI: the node then runs as upstream ships it
    log.exception("xicon_video_frames: not installed")
