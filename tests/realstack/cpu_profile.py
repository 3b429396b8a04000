"""The CPU profile of the shipped graph: the only inputs a CPU run changes, each with its reason.

Everything else (model files, node classes, links, sampler settings) is the shipped graph, patched
per job by the worker as in production. Attention (``sdpa``) and the pose render device (``cpu``)
are not here: the worker's own settings (SAGEATTENTION_ENABLED=0, POSE_RENDER_DEVICE=cpu) set them.
"""

from __future__ import annotations

import copy
from typing import Any

# (node id, input) -> (value, why)
CHANGES: dict[tuple[str, str], tuple[Any, str]] = {
    ("38", "precision"): (
        "fp32",
        "WanVideoVAELoader: bf16 convolutions on a CPU without native bf16 run over 15 min per "
        "4-frame decode chunk; fp32 decodes in seconds",
    ),
}


def cpu_graph(graph: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``graph`` with ``CHANGES`` applied; a missing node or input raises KeyError."""
    out = copy.deepcopy(graph)
    for (node, name), (value, _why) in CHANGES.items():
        if name not in out[node]["inputs"]:
            raise KeyError(f"node {node} has no input {name!r}")
        out[node]["inputs"][name] = value
    return out
