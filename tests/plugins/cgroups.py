"""A real memory cgroup with a limit, for tests and benchmarks that run ComfyUI as a container
with that much RAM would (``tests/realstack/test_memory_limit.py``, ``bench/gpu_run.py
--ram-limit-gib``).

``memory_cgroup(limit)`` creates a child of this process's own memory cgroup (cgroup v1's
``memory`` hierarchy, or v2 where the subtree is delegated), sets its limit and removes it on
exit; ``CgroupUnavailable`` says why when none can be created (not root, read-only cgroupfs, no
memory controller). ``MemoryCgroup.command(cmd)`` wraps a command so the process moves into the
cgroup before it ``exec``s (its pid stays the same); ``peak()`` and ``oom_kills()`` read the
kernel's own counters. The cgroup layout is read with the extension's ``cgroup_memory.py``, the
code ComfyUI runs.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.plugins.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
CGROUP_MEMORY = ROOT / "stack" / "comfy_extension" / "xicon_memory_limit" / "cgroup_memory.py"


class CgroupUnavailable(RuntimeError):
    """No memory cgroup with a limit can be created here; the message says why."""


@dataclass(frozen=True)
class MemoryCgroup:
    path: Path
    version: int
    limit: int

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` started inside this cgroup (``sh`` moves itself in, then execs ``cmd``)."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *cmd]

    def pids(self) -> list[int]:
        text = _read(self.path / "cgroup.procs") or ""
        return [int(p) for p in text.split()]

    def peak(self) -> int | None:
        """The highest memory charge the kernel recorded (v1 ``max_usage_in_bytes``, v2
        ``memory.peak`` where the kernel has it), bytes."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        text = _read(self.path / name)
        return int(text) if text and text.isdigit() else None

    def oom_kills(self) -> int | None:
        """Processes the kernel killed for this cgroup's limit (``oom_kill`` counter)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (_read(self.path / name) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@contextlib.contextmanager
def memory_cgroup(limit: int, *, prefix: str = "xicon") -> Iterator[MemoryCgroup]:
    """A new memory cgroup holding ``limit`` bytes (see module doc); removed once empty."""
    cgm = load_file(CGROUP_MEMORY, "xicon_memory_limit_cgroup_plugin")
    proc = Path("/proc/self")
    member = cgm.memberships(proc)
    reasons = []
    for version, root, mountpoint in cgm.mounts(proc):
        if version not in member:
            continue
        parent = cgm.chain(mountpoint, root, member[version])[0]
        child = parent / f"{prefix}-{uuid.uuid4().hex[:8]}"
        limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
        try:
            child.mkdir()
        except OSError as exc:
            reasons.append(f"cgroup v{version} under {parent}: {exc.strerror}")
            continue
        try:
            (child / limit_file).write_text(str(limit))
        except OSError as exc:
            child.rmdir()
            reasons.append(f"cgroup v{version}: {limit_file} not writable ({exc.strerror})")
            continue
        group = MemoryCgroup(child, version, limit)
        try:
            yield group
        finally:
            _remove(group)
        return
    raise CgroupUnavailable(
        "no memory cgroup can be created here: " + ("; ".join(reasons) or "no memory hierarchy")
    )


def _remove(group: MemoryCgroup, wait_s: float = 30.0) -> None:
    """rmdir once the processes have left (a killed process leaves the cgroup when reaped)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            group.path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline or not group.path.exists():
                return
            time.sleep(0.2)
