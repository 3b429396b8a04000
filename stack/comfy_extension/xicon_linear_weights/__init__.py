"""xicon_linear_weights: each of the transformer's linear layers makes the weight it multiplies
by (the stored fp8 weight, its scale and the LoRA's product) in one pass.

The work is in ``linear_weights.py``; it is installed when ComfyUI loads this package and takes
effect before the first prompt. This package registers no node.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_linear_weights")


def _load():
    path = Path(__file__).resolve().with_name("linear_weights.py")
    spec = importlib.util.spec_from_file_location("xicon_linear_weights_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    import execution
    import nodes

    log.info(
        "xicon_linear_weights: %s",
        _load().install(execution.PromptExecutor, nodes.NODE_CLASS_MAPPINGS, os.environ),
    )
except Exception:  # a broken hook must not stop ComfyUI: the layers then run as upstream's
    log.exception("xicon_linear_weights: not installed")
