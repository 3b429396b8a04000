"""xicon_release_outputs: a job's large intermediate results leave ComfyUI's output cache as soon
as the node that made them has finished; the nodes still to run keep theirs.

The work is in ``release_outputs.py``; it is installed when ComfyUI loads this package. This
package registers no node.
"""

import importlib.util
import logging
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_release_outputs")


def _load():
    path = Path(__file__).resolve().with_name("release_outputs.py")
    spec = importlib.util.spec_from_file_location("xicon_release_outputs_impl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    log.info("xicon_release_outputs: %s", _load().install_from_env())
except Exception:  # a broken hook must not stop ComfyUI: it then caches as upstream does
    log.exception("xicon_release_outputs: not installed")
