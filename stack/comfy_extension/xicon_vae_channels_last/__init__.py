"""xicon_vae_channels_last: the Wan VAE's decoder weights in channels-last memory, so that
cuDNN runs its 3-D convolutions on the layout it is fastest with.

The work is in ``vae_channels_last.py``; it is installed when ComfyUI loads this package and takes
effect before the first prompt. This package registers no node.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_vae_channels_last")


def _load():
    path = Path(__file__).resolve().with_name("vae_channels_last.py")
    spec = importlib.util.spec_from_file_location("xicon_vae_channels_last_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    import execution
    import nodes

    log.info(
        "xicon_vae_channels_last: %s",
        _load().install(execution.PromptExecutor, nodes.NODE_CLASS_MAPPINGS, os.environ),
    )
except Exception:  # a broken hook must not stop ComfyUI: the VAE then loads as upstream ships it
    log.exception("xicon_vae_channels_last: not installed")
