"""The memory limit of this process's cgroup, and psutil's RAM figures held to it.

Why: inside a container, ``psutil.virtual_memory()`` reads ``/proc/meminfo``, which shows the
host's RAM, not the container's limit. ComfyUI v0.33.0 sizes its RAM-pressure cache, its
pinned-memory budget and its free-memory checks from psutil (``comfy/model_management.py``
``total_ram`` line 364 and ``get_free_memory`` line 1754; ``execution.py`` lines 800-811;
``comfy_execution/caching.py`` lines 551 and 591), so in a container with a limit it never frees
anything and the kernel kills it at the limit instead (Comfy-Org/ComfyUI #14938, fixed after
v0.33.0 by #15927, which adds ``comfy/system_memory.py``).

Contract:
- ``find_limit(proc)`` -> ``CgroupLimit | None``: the memory cgroups of the process (cgroup v2
  ``0::/path`` and the v1 ``memory`` controller of ``<proc>/cgroup``, located through
  ``<proc>/mountinfo``), from its own cgroup up to the mount root; ``None`` when no level has a
  limit.
- ``CgroupLimit.read()`` -> ``(limit, in_use)`` in bytes, read anew on every call (the limit can
  change while the process runs): the smallest limit on the path, and what the level that sets
  it holds beyond page cache: usage minus the file pages on the active and inactive LRU lists
  (``active_file``, ``inactive_file``), which the kernel drops before it kills anything. So
  ``limit - in_use`` is "available" in the sense psutil gives it on a host (``MemAvailable``
  counts page cache as available), and ComfyUI's thresholds, tuned on hosts, mean the same in a
  container of the same size.
- ``clamp(vm, limit, in_use)`` -> psutil's ``svmem`` with ``total`` at most the limit and
  ``available`` at most ``limit - in_use``; ``percent``, ``used`` and ``free`` follow.
- ``install(psutil, limit)`` replaces ``psutil.virtual_memory`` by the clamped version (once).

Pure standard library; paths are arguments so tests can build cgroup trees in a folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB pages).
V1_UNLIMITED = 1 << 60
PATCHED = "_xicon_memory_limit"


@dataclass(frozen=True)
class Level:
    """One cgroup directory: the files that hold its limit and its usage."""

    path: Path
    version: int  # 1 or 2

    @property
    def limit_file(self) -> Path:
        return self.path / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")

    @property
    def usage_file(self) -> Path:
        return self.path / ("memory.current" if self.version == 2 else "memory.usage_in_bytes")

    def limit(self) -> int | None:
        text = read_text(self.limit_file)
        if text is None or text == "max" or not text.isdigit():
            return None
        value = int(text)
        return None if self.version == 1 and value >= V1_UNLIMITED else value

    def in_use(self) -> int:
        """Usage minus the page cache on the file LRU lists (v1: the hierarchical totals)."""
        usage = read_text(self.usage_file)
        used = int(usage) if usage and usage.isdigit() else 0
        stat = read_stat(self.path / "memory.stat")
        prefix = "" if self.version == 2 else "total_"
        cache = sum(
            stat.get(prefix + key, stat.get(key, 0)) for key in ("active_file", "inactive_file")
        )
        return max(0, used - cache)


@dataclass(frozen=True)
class CgroupLimit:
    levels: tuple[Level, ...]

    def tightest(self) -> tuple[int, Level] | None:
        """The smallest limit on the path now, and the level that sets it."""
        best: tuple[int, Level] | None = None
        for level in self.levels:
            value = level.limit()
            if value is not None and (best is None or value < best[0]):
                best = (value, level)
        return best

    def read(self) -> tuple[int, int] | None:
        """``(limit, in_use)`` of the tightest level now, or None if none has a limit."""
        best = self.tightest()
        return None if best is None else (best[0], best[1].in_use())

    def describe(self) -> str:
        best = self.tightest()
        return "cgroup" if best is None else f"cgroup v{best[1].version}"


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_stat(path: Path) -> dict[str, int]:
    stat: dict[str, int] = {}
    for line in (read_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(proc: Path) -> Iterator[tuple[int, str, Path]]:
    """``(version, root, mountpoint)`` of every cgroup mount that holds the memory controller."""
    for line in (read_text(proc / "mountinfo") or "").splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        sep = fields.index("-")
        fstype = fields[sep + 1] if len(fields) > sep + 1 else ""
        options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup2":
            yield 2, unescape(fields[3]), Path(unescape(fields[4]))
        elif fstype == "cgroup" and "memory" in options:
            yield 1, unescape(fields[3]), Path(unescape(fields[4]))


def memberships(proc: Path) -> dict[int, str]:
    """The process's cgroup path per version: v2's ``0::`` line, v1's ``memory`` controller."""
    found: dict[int, str] = {}
    for line in (read_text(proc / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            found[2] = path
        elif "memory" in controllers.split(","):
            found[1] = path
    return found


def chain(mountpoint: Path, mount_root: str, cgroup_path: str) -> list[Path]:
    """The process's cgroup directory and its parents up to the mount point. A path outside
    what the mount shows (a container whose /proc/self/cgroup names the host's path) starts at
    the mount point, which is then the container's own cgroup."""
    top = mountpoint.resolve()
    start = top
    root = mount_root.rstrip("/") or "/"
    if os.path.commonpath([root, cgroup_path]) == root:
        candidate = (top / os.path.relpath(cgroup_path, root)).resolve()
        if candidate.is_dir() and (candidate == top or top in candidate.parents):
            start = candidate
    dirs = [start]
    while dirs[-1] != top:
        dirs.append(dirs[-1].parent)
    return dirs


def find_limit(proc: Path = Path("/proc/self")) -> CgroupLimit | None:
    """Every memory cgroup level of this process, when one of them has a limit now (see module
    doc); the levels without one stay in, so a limit set on them later counts too."""
    member = memberships(proc)
    levels: list[Level] = []
    for version, root, mountpoint in mounts(proc):
        if version in member:
            levels += [Level(d, version) for d in chain(mountpoint, root, member[version])]
    found = CgroupLimit(tuple(levels))
    return found if found.read() is not None else None


def clamp(vm: Any, limit: int, in_use: int) -> Any:
    """psutil's ``svmem`` as the cgroup sees it (see module doc)."""
    total = min(vm.total, limit)
    available = max(0, min(vm.available, limit - in_use))
    percent = round(100.0 * (total - available) / total, 1) if total else 0.0
    return vm._replace(
        total=total,
        available=available,
        percent=percent,
        used=total - available,
        free=min(vm.free, available),
    )


def install(psutil: Any, limit: CgroupLimit) -> bool:
    """Hold ``psutil.virtual_memory`` to ``limit``; False when it already is."""
    original: Callable[[], Any] = psutil.virtual_memory
    if getattr(original, PATCHED, False):
        return False

    def virtual_memory() -> Any:
        vm = original()
        now = limit.read()
        return vm if now is None else clamp(vm, *now)

    setattr(virtual_memory, PATCHED, True)
    virtual_memory.__wrapped__ = original  # type: ignore[attr-defined]
    psutil.virtual_memory = virtual_memory
    return True
