"""The committed SCAIL API graph (XiCON_Dance_SCAIL_vFinal.json) patched for fast double runs.

``job_graph(image, video, width=64, height=64, frames=9, fps=8, force_rate=24, steps=3,
prefix="test", audio=True, seed=42)`` sets the inputs the worker's role table patches (node IDs of
../shared/reference/scail-workflow.md §6). It is validated by the double exactly like any prompt.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
REAL_GRAPH = REPO_ROOT / "XiCON_Dance_SCAIL_vFinal.json"


def real_graph(
    image: str,
    video: str,
    *,
    width: int = 64,
    height: int = 64,
    frames: int = 9,
    fps: float = 8,
    force_rate: float = 24,
    steps: int = 3,
    prefix: str = "test",
    audio: bool = True,
    seed: int = 42,
) -> dict[str, Any] | None:
    """The committed SCAIL graph with the same inputs set as ``small_graph``; None until the
    file exists."""
    if not REAL_GRAPH.is_file():
        return None
    graph = copy.deepcopy(json.loads(REAL_GRAPH.read_text()))
    values = {
        ("106", "image"): image,
        ("130", "video"): video,
        ("130", "force_rate"): force_rate,
        ("130", "frame_load_cap"): frames,
        ("203", "value"): width,
        ("204", "value"): height,
        ("205", "value"): width // 2,
        ("206", "value"): height // 2,
        ("349", "steps"): steps,
        ("348", "seed"): seed,
        ("139", "frame_rate"): fps,
        ("139", "filename_prefix"): prefix,
    }
    for (nid, name), value in values.items():
        graph[nid]["inputs"][name] = value
    if not audio:
        graph["139"]["inputs"].pop("audio", None)
    return graph


def job_graph(image: str, video: str, **kw: Any) -> dict[str, Any]:
    """``real_graph`` or a clear error when the graph file is missing."""
    graph = real_graph(image, video, **kw)
    if graph is None:
        raise FileNotFoundError(f"{REAL_GRAPH.name} is missing from the repository root")
    return graph
