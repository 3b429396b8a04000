"""What holds the GPU's memory inside ComfyUI, asked for between jobs by the benchmark.

``census(device_type)`` walks the live Python objects (``gc.get_objects``) and returns:

- ``allocated_mib`` / ``reserved_mib``: torch's own counters (0 without CUDA);
- ``modules``: for every top-level ``torch.nn.Module`` (one that is no other module's child),
  its class and the MiB of its parameters and buffers on ``device_type``, largest first;
- ``loose``: the largest tensors on ``device_type`` that no module owns (shape, dtype, MiB),
  and their total; tensors that own no memory (``torch.compile``'s fake tensors, which report
  the device they stand for) are left out: the first H200 census after a compiled job counted
  177 GB of them on a 140-GB card.

Why: with the transformer kept on the GPU (``force_offload`` false) the second job ran out of
memory at 31.5 GiB in WanVideoWrapper's ``load_weights``. Reading the pinned code, the old
parameters are replaced, not kept, so something else holds the memory; a census after each job
names it. ``bench/gpu_run.py --census`` fetches ``GET /xicon_bench/census`` after every job
(the route is added when this package is imported inside ComfyUI).
"""

from __future__ import annotations

import gc
from typing import Any

import torch

MIB = 2**20


def _has_memory(t: torch.Tensor) -> bool:
    """False for tensors that own no memory: the fake tensors ``torch.compile`` traces with (they
    say ``cuda`` and stay alive in dynamo's caches) and tensors without storage."""
    if getattr(t, "fake_mode", None) is not None:
        return False
    try:
        return t.untyped_storage().data_ptr() != 0
    except (RuntimeError, NotImplementedError):
        return False


def _bytes(tensors: Any, device_type: str) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device_type)


def census(device_type: str = "cuda", top: int = 15) -> dict[str, Any]:
    objects = gc.get_objects()
    modules = [o for o in objects if isinstance(o, torch.nn.Module)]
    children = {id(c) for m in modules for c in m.children()}
    owned: set[int] = set()
    rows = []
    for module in modules:
        tensors = [*module.parameters(), *module.buffers()]
        owned.update(id(t) for t in tensors)
        owned.update(id(t.data) for t in tensors)
        if id(module) in children:
            continue
        size = _bytes(tensors, device_type)
        if size:
            rows.append({"class": type(module).__name__, "mib": round(size / MIB, 1)})
    rows.sort(key=lambda r: -r["mib"])
    loose = [
        o
        for o in objects
        if isinstance(o, torch.Tensor)
        and not isinstance(o, torch.nn.Parameter)
        and id(o) not in owned
        and o.device.type == device_type
        and _has_memory(o)
    ]
    loose.sort(key=lambda t: -t.numel() * t.element_size())
    cuda = device_type == "cuda" and torch.cuda.is_available()
    return {
        "device": device_type,
        "allocated_mib": round(torch.cuda.memory_allocated() / MIB, 1) if cuda else 0.0,
        "reserved_mib": round(torch.cuda.memory_reserved() / MIB, 1) if cuda else 0.0,
        "modules": rows,
        "loose_total_mib": round(_bytes(loose, device_type) / MIB, 1),
        "loose": [
            {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "mib": round(t.numel() * t.element_size() / MIB, 1),
            }
            for t in loose[:top]
        ],
    }


def add_route() -> bool:
    """``GET /xicon_bench/census`` on ComfyUI's server; False outside ComfyUI."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False

    @PromptServer.instance.routes.get("/xicon_bench/census")
    async def _census(request: Any) -> Any:
        device = request.query.get("device", "cuda")
        return web.json_response(census(device))

    return True
