"""Bench-only ComfyUI custom node: ``torch.profiler`` around chosen transformer forwards.

``bench/gpu_run.py --profile-calls 3,9`` copies this package into ComfyUI's ``custom_nodes`` for
one run (removed at its end) and sets:

- ``XICON_BENCH_PROFILE_DIR``: where the results go;
- ``XICON_BENCH_PROFILE_CALLS``: which forwards of the Wan transformer (``WanModel`` in
  ComfyUI-WanVideoWrapper ``wanvideo/modules/model.py``), counted from 1 over ComfyUI's life, run
  under the profiler. One forward is one sampler step of one context window (cfg 1), so with 6
  steps per 81-frame job, 3 is the cold job's third step and 9 the warm job's.

With ``XICON_BENCH_CENSUS=1`` it also adds ``GET /xicon_bench/census`` (``census.py``): what
holds the GPU's memory, asked for by the benchmark after every job.

It registers no node. At import it adds one global forward pre-hook and one post-hook
(``torch.nn.modules.module``); they compare the module's class name, count ``WanModel`` calls and
start / stop the profiler (CPU and, when present, CUDA activities) around the chosen ones. Without
the two variables it does nothing.

For each profiled call N it writes:

- ``callN.txt``: ``key_averages()`` sorted by self device time (CPU time without a GPU), 40 rows;
- ``callN.json``: wall time of the forward (synchronised), device busy time (the sum of the
  kernels' self times), their ratio, and the top 30 kernels / ops with calls, total ms and share,
  each also put in a class (``attention``, ``gemm``, ``norm/elementwise``, ``copy``, ``other``) by
  its name; ``by_class`` sums them. The gap between wall and busy time is time the GPU waited on
  the host (launches, Python, syncs).

The profiled forward is slower than the others (the profiler's own cost); read step times from the
other calls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.nn.modules import module as nn_module

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

log = logging.getLogger("xicon_bench_profile")

TARGET = "WanModel"
CLASSES = (
    ("attention", re.compile(r"attn|attention|sage|flash|fmha|sdpa|softmax", re.I)),
    (
        "gemm",
        re.compile(r"gemm|matmul|linear|addmm|\bmm\b|cutlass|sm90_xmma|nvjet|scaled_mm", re.I),
    ),
    ("copy", re.compile(r"copy|memcpy|memset|to_copy|contiguous|cat\b|fill", re.I)),
    (
        "norm/elementwise",
        re.compile(r"norm|elementwise|vectorized|reduce|mul|add|rope|silu|gelu", re.I),
    ),
)


def classify(name: str) -> str:
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other"


def _self_time_us(event: Any, device: bool) -> float:
    if device:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(event, attr, None)
            if value is not None:
                return float(value)
        return 0.0
    return float(event.self_cpu_time_total)


def summarise(prof: Any, wall_s: float, device: bool, top: int = 30) -> dict[str, Any]:
    """The figures of one profiled forward (see the module doc). With a GPU the rows are the
    kernels (device events: an op's row would count its kernels a second time); without one,
    the ops' self CPU times."""
    rows = []
    for event in prof.key_averages():
        if device and getattr(event, "device_type", None) == DeviceType.CPU:
            continue
        us = _self_time_us(event, device)
        if us > 0:
            rows.append((event.key, int(event.count), us))
    rows.sort(key=lambda r: -r[2])
    busy_us = sum(r[2] for r in rows)
    by_class: dict[str, float] = {}
    for name, _count, us in rows:
        by_class[classify(name)] = by_class.get(classify(name), 0.0) + us / 1000
    return {
        "device": "cuda" if device else "cpu",
        "wall_ms": round(wall_s * 1000, 2),
        "busy_ms": round(busy_us / 1000, 2),
        "busy_share": round(busy_us / 1e6 / wall_s, 4) if wall_s > 0 else None,
        "by_class_ms": {k: round(v, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top": [
            {
                "name": name[:160],
                "class": classify(name),
                "calls": count,
                "ms": round(us / 1000, 3),
                "share": round(us / busy_us, 4) if busy_us else None,
            }
            for name, count, us in rows[:top]
        ],
    }


class StepProfiler:
    """Counts ``TARGET`` forwards and profiles the chosen ones (see the module doc)."""

    def __init__(self, out: Path, calls: set[int]) -> None:
        self.out = out
        self.calls = calls
        self.count = 0
        self.depth = 0  # a forward inside a forward (never expected) is not counted twice
        self._prof: Any = None
        self._t0 = 0.0
        self.device = torch.cuda.is_available()

    def pre(self, module: torch.nn.Module, _args: Any) -> None:
        if type(module).__name__ != TARGET:
            return
        self.depth += 1
        if self.depth > 1:
            return
        self.count += 1
        if self.count not in self.calls:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def post(self, module: torch.nn.Module, _args: Any, _output: Any) -> None:
        if type(module).__name__ != TARGET:
            return
        self.depth -= 1
        if self.depth > 0 or self._prof is None:
            return
        if self.device:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.write(prof, wall)

    def write(self, prof: Any, wall: float) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        sort = "self_device_time_total" if self.device else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=40)
        except (AttributeError, KeyError, ValueError):
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
        (self.out / f"call{self.count}.txt").write_text(table, encoding="utf-8")
        figures = summarise(prof, wall, self.device)
        figures["call"] = self.count
        (self.out / f"call{self.count}.json").write_text(json.dumps(figures, indent=1))
        log.info(
            "[xicon bench] profiled %s call %d: wall %.1f ms, busy %.1f ms",
            TARGET,
            self.count,
            figures["wall_ms"],
            figures["busy_ms"],
        )


def install_from_env() -> StepProfiler | None:
    out, calls = (
        os.environ.get("XICON_BENCH_PROFILE_DIR"),
        os.environ.get("XICON_BENCH_PROFILE_CALLS"),
    )
    if not out or not calls:
        return None
    profiler = StepProfiler(Path(out), {int(c) for c in calls.split(",") if c.strip()})
    nn_module.register_module_forward_pre_hook(profiler.pre)
    nn_module.register_module_forward_hook(profiler.post)
    log.info("[xicon bench] profiling %s calls %s into %s", TARGET, sorted(profiler.calls), out)
    return profiler


PROFILER = install_from_env()
if os.environ.get("XICON_BENCH_CENSUS") == "1":
    from .census import add_route

    CENSUS_ROUTE = add_route()
