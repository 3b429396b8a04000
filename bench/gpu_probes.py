"""What the GPU benchmark measures beside the worker, and the bench-only ComfyUI nodes it installs.

- ``VramSampler``: ``nvidia-smi`` every 200 ms (memory used, utilisation) into a CSV; peaks per
  time window.
- ``RssSampler``: ComfyUI's ``VmRSS`` / ``RssAnon`` / ``RssFile`` every 200 ms.
- ``install_vram_cap``: ``--reserve-vram`` plus a per-process memory fraction set inside ComfyUI
  by a custom node written for the run (``VRAM_CAP_NODE``).
- ``install_profiler``: copies ``bench/comfy_nodes/xicon_bench_profile`` (step profiler,
  GPU-memory census route) into ComfyUI for the run; ``gpu_census()`` asks that route.

Every installer returns the folder it wrote, for the run to remove at its end.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("gpu_run")


@dataclass
class VramSampler:
    """nvidia-smi in the background; ``peak(t0, t1)`` is the largest sample inside a window."""

    path: Path
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    _proc: subprocess.Popen | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        cmd = [
            "nvidia-smi",
            "--query-gpu=memory.used,utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "200",
        ]
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            log.warning("nvidia-smi not found: no VRAM figures")
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self.path.open("w") as out:
            out.write("t_s,memory_used_mib,util_pct\n")
            for line in self._proc.stdout:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) != 2 or not parts[0].isdigit():
                    continue
                now = time.monotonic()
                self.samples.append((now, int(parts[0]), int(parts[1] or 0)))
                out.write(f"{now:.3f},{parts[0]},{parts[1]}\n")

    def peak(self, t0: float, t1: float) -> int | None:
        inside = [mib for t, mib, _ in self.samples if t0 <= t <= t1]
        return max(inside) if inside else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


@dataclass
class RssSampler:
    """ComfyUI's resident memory every 200 ms, in the background, from ``/proc/PID/status`` of the
    PID in ``pid_file``: ``VmRSS`` and its parts ``RssAnon`` (heap: tensors ComfyUI made) and
    ``RssFile`` (file pages mapped in, e.g. an mmapped checkpoint, which the kernel can drop and
    read again), all in MiB."""

    pid_file: Path
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                pid = int(self.pid_file.read_text().strip())
                status = Path(f"/proc/{pid}/status").read_text()
            except (OSError, ValueError):
                continue
            values = {}
            for line in status.splitlines():
                key, _, rest = line.partition(":")
                if key in self.FIELDS:
                    values[key] = int(rest.split()[0]) // 1024
            if "VmRSS" in values:
                self.samples.append((time.monotonic(), values))

    def peak(self, t0: float, t1: float, key: str = "VmRSS") -> int | None:
        inside = [v.get(key, 0) for t, v in self.samples if t0 <= t <= t1]
        return max(inside) if inside else None

    def at_peak(self, t0: float, t1: float) -> dict[str, int] | None:
        """All fields of the sample with the highest ``VmRSS`` between ``t0`` and ``t1``."""
        inside = [v for t, v in self.samples if t0 <= t <= t1]
        return max(inside, key=lambda v: v["VmRSS"]) if inside else None

    def stop(self) -> None:
        self._stop.set()


PROFILE_NODE = ROOT / "bench" / "comfy_nodes" / "xicon_bench_profile"

VRAM_CAP_NODE = """\
# Written by bench/gpu_run.py --vram-cap-gib for one benchmark run, removed at its end.
import logging
import os

import torch

NODE_CLASS_MAPPINGS = {}
_cap = float(os.environ.get("XICON_BENCH_VRAM_CAP_GIB", "0"))
if _cap > 0 and torch.cuda.is_available():
    _total = torch.cuda.get_device_properties(0).total_memory
    _fraction = min(1.0, _cap * 2**30 / _total)
    torch.cuda.set_per_process_memory_fraction(_fraction, 0)
    logging.info(
        "[xicon bench] GPU memory held to %.2f GiB of %.2f GiB (fraction %.4f, allocator %s)",
        _cap, _total / 2**30, _fraction, torch.cuda.get_allocator_backend(),
    )
"""


def gpu_total_gib() -> float:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.splitlines()[0].strip()) / 1024


def install_vram_cap(args: argparse.Namespace, env: dict[str, str]) -> Path | None:
    """The bench-only custom node and ``--reserve-vram`` that hold ComfyUI to the cap."""
    if args.vram_cap_gib is None:
        return None
    node = args.comfy_dir / "custom_nodes" / "xicon_bench_vram_cap"
    node.mkdir(exist_ok=True)
    (node / "__init__.py").write_text(VRAM_CAP_NODE)
    reserve = max(0.0, gpu_total_gib() - args.vram_cap_gib)
    env["XICON_BENCH_VRAM_CAP_GIB"] = str(args.vram_cap_gib)
    env["COMFY_EXTRA_ARGS"] = f"{env.get('COMFY_EXTRA_ARGS', '')} --reserve-vram {reserve:.2f}"
    log.info(
        "VRAM cap %.2f GiB: --reserve-vram %.2f plus the per-process fraction",
        args.vram_cap_gib,
        reserve,
    )
    return node


def install_profiler(args: argparse.Namespace, env: dict[str, str]) -> Path | None:
    """The bench-only custom node (``bench/comfy_nodes/xicon_bench_profile``) for one run: the
    step profiler (``--profile-calls``) and the GPU-memory census route (``--census``)."""
    if not args.profile_calls and not args.census:
        return None
    node = args.comfy_dir / "custom_nodes" / PROFILE_NODE.name
    shutil.copytree(PROFILE_NODE, node, dirs_exist_ok=True)
    if args.profile_calls:
        env["XICON_BENCH_PROFILE_DIR"] = str((args.out / "profile").resolve())
        env["XICON_BENCH_PROFILE_CALLS"] = args.profile_calls
        log.info("profiling forwards %s into %s", args.profile_calls, args.out / "profile")
    if args.census:
        env["XICON_BENCH_CENSUS"] = "1"
    return node


async def gpu_census() -> dict[str, Any] | None:
    """What holds the GPU's memory in ComfyUI now (the bench node's census route)."""
    try:
        async with aiohttp.ClientSession() as session:
            url = "http://127.0.0.1:8188/xicon_bench/census"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=120)) as resp:
                return await resp.json() if resp.status == 200 else {"status": resp.status}
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
