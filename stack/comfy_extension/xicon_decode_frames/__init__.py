"""xicon_decode_frames: WanVideoDecode hands the decoded clip to the host as one contiguous
float32 tensor, without its bf16 host copy; and a decode followed by VHS_VideoCombine runs as one
node that encodes each frame as soon as it is on the host.

The work is in ``decode_frames.py`` and ``decode_video.py`` (its frame hand-over in
``frame_feed.py``); both are installed when ComfyUI loads this package and take effect with the
first prompt. The merged node is registered then (``decode_video.NODE``), once VideoHelperSuite
and WanVideoWrapper are loaded.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_decode_frames")


def _load(name="decode_frames", module_name="xicon_decode_frames_impl"):
    path = Path(__file__).resolve().with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    import execution
    import nodes

    log.info(
        "xicon_decode_frames: %s",
        _load().install(execution.PromptExecutor, nodes.NODE_CLASS_MAPPINGS, os.environ),
    )
except Exception:  # a broken hook must not stop ComfyUI: the node then runs as upstream ships it
    log.exception("xicon_decode_frames: not installed")

try:
    import nodes
    import server

    log.info(
        "xicon_decode_video: %s",
        _load("decode_video", "xicon_decode_video_impl").install(
            server.PromptServer.instance,
            nodes.NODE_CLASS_MAPPINGS,
            nodes.NODE_DISPLAY_NAME_MAPPINGS,
            os.environ,
        ),
    )
except Exception:  # the decode and the encode then run one after the other, as upstream's
    log.exception("xicon_decode_video: not installed")
