"""xicon_memory_limit, run by ComfyUI before it imports torch or its memory management.

ComfyUI v0.33.0 runs every custom node's ``prestartup_script.py`` (``main.py``
``execute_prestartup_script``, line 225) before ``import comfy.model_management`` (line 243), which
reads the host's RAM once at import. This script holds ``psutil.virtual_memory`` to the process's
cgroup memory limit first (``cgroup_memory.py``), so every later reader (ComfyUI's RAM-pressure
cache, its pinned-memory budget, ``/system_stats``, VideoHelperSuite's frame-memory check) sees
the container's RAM. It does nothing when no cgroup level sets a limit, and nothing once ComfyUI
reads cgroup limits itself (``comfy/system_memory.py``, added upstream after v0.33.0).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
GIB = 1024**3
log = logging.getLogger("xicon_memory_limit")


def comfy_root() -> Path:
    main = sys.modules.get("__main__")
    return Path(getattr(main, "__file__", "") or ".").resolve().parent


def load_cgroup_memory() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        "xicon_memory_limit_cgroup", HERE / "cgroup_memory.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def main(comfy_dir: Path, proc: Path = Path("/proc/self"), ps: Any = psutil) -> str:
    """Hold ``ps.virtual_memory`` to the cgroup limit of ``proc``; the line to log."""
    if (comfy_dir / "comfy" / "system_memory.py").is_file():
        return "ComfyUI reads cgroup memory limits itself (comfy/system_memory.py); nothing done"
    cgroup_memory = load_cgroup_memory()
    limit = cgroup_memory.find_limit(proc)
    now = limit.read() if limit else None
    if limit is None or now is None:
        return "no cgroup memory limit; RAM figures left as psutil reports them"
    host = ps.virtual_memory().total
    if now[0] >= host:
        return (
            f"{limit.describe()} limit {now[0] / GIB:.1f} GiB is not below the host's "
            f"{host / GIB:.1f} GiB; RAM figures left as psutil reports them"
        )
    cgroup_memory.install(ps, limit)
    return (
        f"RAM held to the {limit.describe()} limit: {now[0] / GIB:.1f} GiB of the host's "
        f"{host / GIB:.1f} GiB (ComfyUI's RAM cache and memory checks use it)"
    )


if __name__ != "xicon_memory_limit_under_test":
    try:
        log.info("xicon_memory_limit: %s", main(comfy_root()))
    except Exception:  # a broken reader must not stop ComfyUI: it then runs as upstream does
        log.exception("xicon_memory_limit: cgroup memory limit not applied")
