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
EXTRA_CLASSES = ("WanVideoBlockSwap", "WanVideoSetBlockSwap", "LoadWanVideoT5TextEncoder")
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
    """Readable list of what differs: classes, then inputs and outputs of common classes."""
    out = [f"class {c}: only in the fixture" for c in sorted(set(old) - set(new))]
    out += [f"class {c}: only live" for c in sorted(set(new) - set(old))]
    for cls in sorted(set(old) & set(new)):
        if old[cls] == new[cls]:
            continue
        a, b = old[cls], new[cls]
        for section in ("required", "optional"):
            ia, ib = a.get("input", {}).get(section, {}), b.get("input", {}).get(section, {})
            for name in sorted(set(ia) | set(ib)):
                if ia.get(name) != ib.get(name):
                    out.append(
                        f"{cls}.{section}.{name}: {ia.get(name)!r:.120} -> {ib.get(name)!r:.120}"
                    )
        for key in sorted(set(a) | set(b)):
            if key != "input" and a.get(key) != b.get(key):
                out.append(f"{cls}.{key}: {a.get(key)!r:.120} -> {b.get(key)!r:.120}")
    return out
