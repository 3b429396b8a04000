"""The real ComfyUI v0.33.0 inside a real memory-limited cgroup, with and without the project's
extension ``xicon_memory_limit``.

ComfyUI sizes its RAM-pressure cache from psutil, which reports the host's RAM inside a container.
With the extension, ComfyUI and its ``/system_stats`` (which the worker reads at start for its
host-RAM warning) see the cgroup's limit; without it they see the host's RAM. The second test is
the proof that the extension is what changes it: once upstream reads cgroup limits itself, it
fails, and the extension can go.

Needs permission to create a memory cgroup (root on a writable cgroup v1 memory hierarchy, or a
delegated cgroup v2 subtree). Where that is missing the tests are reported as skipped, with the
reason; they never pass without running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.plugins.comfy import free_port, stop_process
from tests.plugins.realstack import ROOT, STARTUP_TIMEOUT_S, Stack, get, make_base, wait_for
from xicon_dance import clip
from xicon_dance.settings import Settings

GIB = 1024**3
EXTENSION = "xicon_memory_limit"


def _cgroup_memory() -> Any:
    path = ROOT / "stack" / "comfy_extension" / EXTENSION / "cgroup_memory.py"
    spec = importlib.util.spec_from_file_location("xicon_memory_limit_cgroup_realstack", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A new child of this process's memory cgroup holding ``limit`` bytes, removed after."""
    cgm = _cgroup_memory()
    proc = Path("/proc/self")
    member = cgm.memberships(proc)
    reasons = []
    for version, root, mountpoint in cgm.mounts(proc):
        if version not in member:
            continue
        parent = cgm.chain(mountpoint, root, member[version])[0]
        child = parent / f"xicon-test-{uuid.uuid4().hex[:8]}"
        limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
        try:
            child.mkdir()
        except OSError as exc:
            reasons.append(f"cgroup v{version} at {parent}: {exc.strerror}")
            continue
        try:
            (child / limit_file).write_text(str(limit))
        except OSError as exc:
            child.rmdir()
            reasons.append(f"cgroup v{version}: {limit_file} not writable ({exc.strerror})")
            continue
        try:
            yield child
        finally:
            with contextlib.suppress(OSError):
                child.rmdir()
        return
    pytest.skip("no memory cgroup can be created here: " + ("; ".join(reasons) or "none found"))


def start_in(cgroup: Path, stack: Stack, base: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """ComfyUI on the CPU, moved into ``cgroup`` before it starts (``exec`` keeps the pid)."""
    port = free_port()
    cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup)]
    cmd += [str(stack.python), "-u", str(stack.comfy_dir / "main.py"), "--cpu"]
    cmd += ["--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/system_stats", proc, log, STARTUP_TIMEOUT_S)
    return proc, url


def system_stats(url: str) -> dict[str, Any]:
    return json.loads(get(f"{url}/system_stats"))


def limit_for_host() -> int:
    """Well below the host's RAM, well above what an idle ComfyUI holds."""
    return min(6 * GIB, psutil.virtual_memory().total // 2 // GIB * GIB)


def test_comfyui_sees_the_cgroup_limit_with_the_extension(stack: Stack, tmp_path: Path) -> None:
    limit = limit_for_host()
    base = make_base(stack, tmp_path / "comfy", packs={EXTENSION})
    log = tmp_path / "comfyui.log"
    with memory_cgroup(limit) as cgroup:
        proc, url = start_in(cgroup, stack, base, log)
        try:
            stats = system_stats(url)
            members = (cgroup / "cgroup.procs").read_text().split()
        finally:
            stop_process(proc)
    text = log.read_text(errors="replace")
    assert str(proc.pid) in members  # ComfyUI itself ran inside the limited cgroup
    assert "xicon_memory_limit: RAM held to the cgroup v" in text, text[-3000:]
    assert f"limit: {limit / GIB:.1f} GiB of the host's" in text
    # comfy/model_management.py reads the RAM once at import, after the prestartup script.
    assert f"total RAM {limit // (1024 * 1024)} MB" in text
    ram = stats["system"]
    assert ram["ram_total"] == limit
    assert 0 < ram["ram_free"] < limit
    # The worker's start-up check now speaks of the container's RAM, not the host's.
    warning = clip.host_ram_warning(stats, Settings.from_env({"MAX_CLIP_MEMORY_GB": "48"}))
    assert warning is not None and f"has {limit / 1e9:.0f} GB of RAM" in warning


def test_without_the_extension_comfyui_sees_the_host(stack: Stack, tmp_path: Path) -> None:
    """ComfyUI v0.33.0 alone in the same kind of cgroup reports the host's RAM (upstream
    Comfy-Org/ComfyUI #14938). When this fails, upstream reads cgroups: drop the extension."""
    limit = limit_for_host()
    base = make_base(stack, tmp_path / "comfy", packs=set())
    (base / "custom_nodes").mkdir()  # ComfyUI lists it at start
    log = tmp_path / "comfyui.log"
    with memory_cgroup(limit) as cgroup:
        proc, url = start_in(cgroup, stack, base, log)
        try:
            stats = system_stats(url)
        finally:
            stop_process(proc)
    assert "xicon_memory_limit" not in log.read_text(errors="replace")
    assert stats["system"]["ram_total"] == psutil.virtual_memory().total > limit
