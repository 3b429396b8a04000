"""The real ComfyUI v0.33.0 inside a real memory-limited cgroup, with and without the project's
extension ``xicon_memory_limit``: what a container with that much RAM does.

ComfyUI sizes its RAM-pressure cache from psutil, which reports the host's RAM inside a container.
Each test starts ComfyUI in a 4 GiB cgroup and runs one prompt whose intermediate results add up
to well over 4 GiB (a chain of full-size image copies; each finished result stays cached until
RAM runs short). With the extension, ComfyUI and its ``/system_stats`` (which the worker reads at
start for its host-RAM warning) see 4 GiB, the cache drops finished results as the cgroup fills,
and the prompt completes. Without it, ComfyUI sees the host's RAM, keeps every result, and the
kernel kills it at the limit: the proof that the extension is what changes it. When the second
test fails, upstream reads cgroup limits itself and the extension can go.

Needs permission to create a memory cgroup (root on a writable cgroup v1 memory hierarchy, or a
delegated cgroup v2 subtree) and a host with RAM to spare beyond the cgroup's. Where either is
missing the tests are reported as skipped, with the reason; they never pass without running.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.plugins import cgroups
from tests.plugins.cgroups import CgroupUnavailable, MemoryCgroup
from tests.plugins.comfy import stop_process
from tests.plugins.pressure import (
    IMAGE_BYTES,
    INVERSIONS,
    LIMIT,
    outcome,
    start_in,
    submit,
)
from tests.plugins.realstack import Stack, get, make_base
from xicon_dance import clip
from xicon_dance.settings import Settings

GIB = 1024**3
EXTENSION = "xicon_memory_limit"


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[MemoryCgroup]:
    try:
        with cgroups.memory_cgroup(limit, prefix="xicon-test") as group:
            yield group
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))


def system_stats(url: str) -> dict[str, Any]:
    return json.loads(get(f"{url}/system_stats"))


def require_spare_host_ram() -> None:
    """Without the extension ComfyUI only evicts when the *host* runs short (10 % of its RAM,
    2-10 GB): the control needs that much free beyond the cgroup's limit, or it proves nothing."""
    vm = psutil.virtual_memory()
    headroom = min(10.0, max(2.0, vm.total / GIB * 0.10)) * GIB
    if vm.available < LIMIT + headroom + 2 * GIB:
        pytest.skip(f"host has {vm.available / GIB:.1f} GiB free; needs the 4 GiB limit + headroom")


def test_comfyui_sees_the_cgroup_limit_with_the_extension(stack: Stack, tmp_path: Path) -> None:
    require_spare_host_ram()
    base = make_base(stack, tmp_path / "comfy", packs={EXTENSION})
    log = tmp_path / "comfyui.log"
    with memory_cgroup(LIMIT) as cgroup:
        proc, url = start_in(cgroup, stack, base, log)
        try:
            stats = system_stats(url)
            members = cgroup.pids()
            result = outcome(url, proc, submit(url))
            alive = proc.poll() is None
            peak, kills = cgroup.peak(), cgroup.oom_kills()
        finally:
            stop_process(proc)
    text = log.read_text(errors="replace")
    assert proc.pid in members  # ComfyUI itself ran inside the limited cgroup
    assert "xicon_memory_limit: RAM held to the cgroup v" in text, text[-3000:]
    assert "limit: 4.0 GiB of the host's" in text
    # comfy/model_management.py reads the RAM once at import, after the prestartup script.
    assert f"total RAM {LIMIT // (1024 * 1024)} MB" in text
    ram = stats["system"]
    assert ram["ram_total"] == LIMIT
    assert 0 < ram["ram_free"] < LIMIT
    # The worker's start-up check now speaks of the container's RAM, not the host's.
    warning = clip.host_ram_warning(stats, Settings.from_env({"MAX_CLIP_MEMORY_GB": "48"}))
    assert warning is not None and f"ComfyUI has {LIMIT / 1e9:.0f} GB of RAM" in warning
    # Results worth 2 GiB more than the limit, and the prompt still completed: the cache dropped
    # finished ones as the cgroup filled. The kernel killed nothing.
    assert (INVERSIONS + 1) * IMAGE_BYTES > LIMIT + 2 * GIB
    assert (result, alive, kills) == ("success", True, 0), text[-3000:]
    assert peak is None or peak <= LIMIT


def test_without_the_extension_the_kernel_kills_comfyui(stack: Stack, tmp_path: Path) -> None:
    """ComfyUI v0.33.0 alone, same cgroup, same prompt: it reports the host's RAM (upstream
    Comfy-Org/ComfyUI #14938), keeps every result and is killed at the limit."""
    require_spare_host_ram()
    base = make_base(stack, tmp_path / "comfy", packs=set())
    (base / "custom_nodes").mkdir()  # ComfyUI lists it at start
    log = tmp_path / "comfyui.log"
    with memory_cgroup(LIMIT) as cgroup:
        proc, url = start_in(cgroup, stack, base, log)
        try:
            stats = system_stats(url)
            result = outcome(url, proc, submit(url))
            kills = cgroup.oom_kills()
        finally:
            stop_process(proc)
    assert "xicon_memory_limit" not in log.read_text(errors="replace")
    assert stats["system"]["ram_total"] == psutil.virtual_memory().total > LIMIT
    assert result == "exited" and proc.returncode == -9
    assert kills is None or kills >= 1
