"""xicon_resident_weights: a transformer the sampler left on the GPU is not loaded again, and the
model file's pages leave ComfyUI's resident set once the weights are there.

The work is in ``resident_weights.py`` (and ``file_pages.py``); it is installed when ComfyUI loads
this package and takes effect before the first prompt. This package registers no node.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_resident_weights")


def _load():
    path = Path(__file__).resolve().with_name("resident_weights.py")
    spec = importlib.util.spec_from_file_location("xicon_resident_weights_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    import execution
    import nodes

    log.info(
        "xicon_resident_weights: %s",
        _load().install(execution.PromptExecutor, nodes.NODE_CLASS_MAPPINGS, os.environ),
    )
except Exception:  # a broken hook must not stop ComfyUI: the sampler then loads as upstream does
    log.exception("xicon_resident_weights: not installed")
