"""Load a Python file that is not on the import path (a script, a ComfyUI extension) as a module.

``load_file(path, name)`` registers the module under ``name`` in ``sys.modules`` before running it
(dataclasses and pickling look their module up while it runs) and returns it.
``load_pack(folder)`` imports a custom-node folder as ComfyUI does (its path, dots replaced, is
the module name) and returns that name; ``forget(name)`` drops it and its submodules again.
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


def load_pack(folder: Path) -> str:
    """``folder`` (a custom-node pack) imported as ComfyUI v0.33.0 imports it (``nodes.py``
    ``load_custom_node``: the path with dots replaced is the module name); returns that name."""
    name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec and spec.loader, folder
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name


def forget(name: str) -> None:
    """Drop module ``name`` and its submodules from ``sys.modules``."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
