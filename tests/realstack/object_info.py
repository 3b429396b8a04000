"""The committed node-definition fixture (``tests/fixtures/object_info.json``) as a live dump.

``fixture_from_live(info, record)`` turns a real server's ``GET /object_info`` into the fixture: the
classes the shipped graph uses (plus ``EXTRA_CLASSES``, which the validation tests of other graphs
use), and a ``_meta`` entry with the stack's commits (from the install record that stack/install.py
writes) and the ``VALIDATE_INPUTS`` rule of ``xicon_dance.graph_check``. The input-file lists of
``LoadImage`` and ``VHS_LoadVideo`` depend on what lies in the server's input folder, so they are
replaced by the graph's own file names; everything else is the server's, unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xicon_dance.graph_check import VALIDATE_INPUTS_DEFAULT

ROOT = Path(__file__).resolve().parent.parent.parent
GRAPH = ROOT / "XiCON_Dance_SCAIL_vFinal.json"
FIXTURE = ROOT / "tests" / "fixtures" / "object_info.json"
# WanVideoTorchCompileSettings: the node the worker adds with TORCH_COMPILE (xicon_dance.workflow)
EXTRA_CLASSES = (
    "WanVideoBlockSwap",
    "WanVideoSetBlockSwap",
    "LoadWanVideoT5TextEncoder",
    "WanVideoTorchCompileSettings",
)
INPUT_FILE_LISTS = {"LoadImage": "image", "VHS_LoadVideo": "video"}


def fixture_from_live(info: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    wanted = sorted({n["class_type"] for n in graph.values()} | set(EXTRA_CLASSES))
    missing = [c for c in wanted if c not in info]
    if missing:
        raise AssertionError(f"classes missing from the live /object_info: {missing}")
    out: dict[str, Any] = {"_meta": meta(record)}
    for cls in wanted:
        out[cls] = json.loads(json.dumps(info[cls]))
    for node in graph.values():
        name = INPUT_FILE_LISTS.get(node["class_type"])
        if name is not None:
            spec = out[node["class_type"]]["input"]["required"][name]
            spec[0] = [node["inputs"][name]]
    return out


def meta(record: dict[str, Any]) -> dict[str, Any]:
    commits = dict(record["components"])
    comfy = commits.pop("ComfyUI")
    return {
        "source": "live",
        "note": "GET /object_info of the real stack (stack/components.json), dumped by the "
        "real-stack tests; regenerate with XICON_WRITE_FIXTURE=1 (README, Tests).",
        "comfyui": {"tag": "v0.33.0", "commit": comfy},
        "custom_nodes": commits,
        "validate_inputs": VALIDATE_INPUTS_DEFAULT,
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable list of everything that differs between two ``/object_info`` dumps (``old``: the
    fixture, ``new``: live), whole node definitions included: every input section (required,
    optional, hidden), the order of inputs, outputs, output names and every other field. Dicts
    are compared in order too (a node's input order is its widget order), lists of one length
    element by element; one line per difference, values cut at 120 characters."""
    out: list[str] = []
    _walk("", old, new, out)
    return out


def _walk(path: str, old: Any, new: Any, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                out.append(f"{_at(path, key)}: only in the fixture")
        for key in new:
            if key not in old:
                out.append(f"{_at(path, key)}: only live")
        for key in old:
            if key in new:
                _walk(_at(path, key), old[key], new[key], out)
        common_old = [k for k in old if k in new]
        common_new = [k for k in new if k in old]
        if common_old != common_new:
            out.append(f"{path or '(top)'}: order {common_old!r:.120} -> {common_new!r:.120}")
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _walk(f"{path}[{i}]", a, b, out)
    elif old != new or type(old) is not type(new):
        out.append(f"{path}: {old!r:.120} -> {new!r:.120}")


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)
