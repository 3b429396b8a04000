"""Load a Python file that is not on the import path (a script, a ComfyUI extension) as a module.

``load_file(path, name)`` registers the module under ``name`` in ``sys.modules`` before running it
(dataclasses and pickling look their module up while it runs) and returns it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
