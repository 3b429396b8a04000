"""The committed SCAIL graph: roles, model files, fixture provenance and the generated diagram."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from xicon_dance.graph_check import MODEL_FILE_INPUTS, load_object_info

ROOT = Path(__file__).resolve().parent.parent
GRAPH = json.loads((ROOT / "XiCON_Dance_SCAIL_vFinal.json").read_text(encoding="utf-8"))
MANIFEST = json.loads((ROOT / "model_manifest.json").read_text(encoding="utf-8"))
FIXTURE = ROOT / "tests" / "fixtures" / "object_info.json"
HEX40 = re.compile(r"^[0-9a-f]{40}$")


def _load_diagram_module():
    spec = importlib.util.spec_from_file_location(
        "graph_diagram", ROOT / "scripts/graph_diagram.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("node_id", "class_type"),
    [
        ("106", "LoadImage"),
        ("130", "VHS_LoadVideo"),
        ("203", "INTConstant"),
        ("204", "INTConstant"),
        ("205", "INTConstant"),
        ("206", "INTConstant"),
        ("238", "FloatConstant"),
        ("348", "WanVideoSamplerv2"),
        ("349", "WanVideoSchedulerv2"),
        ("368", "WanVideoTextEncodeCached"),
        ("139", "VHS_VideoCombine"),
        ("22", "WanVideoModelLoader"),
        ("362", "RenderNLFPoses"),
        ("335", "LoadNLFModel"),
    ],
)
def test_role_node_ids(node_id: str, class_type: str) -> None:
    assert GRAPH[node_id]["class_type"] == class_type


def test_links_and_roles() -> None:
    assert GRAPH["348"]["inputs"]["cfg"] == ["238", 0]
    assert GRAPH["139"]["inputs"]["audio"] == ["130", 2]
    assert GRAPH["362"]["inputs"]["width"] == ["205", 0]
    assert GRAPH["362"]["inputs"]["height"] == ["206", 0]
    assert GRAPH["354"]["inputs"]["context_options"] == ["355", 0]


def test_sizes_and_frames() -> None:
    w, h = GRAPH["203"]["inputs"]["value"], GRAPH["204"]["inputs"]["value"]
    assert (w % 32, h % 32) == (0, 0)
    assert GRAPH["205"]["inputs"]["value"] * 2 == w
    assert GRAPH["206"]["inputs"]["value"] * 2 == h
    cap = GRAPH["130"]["inputs"]["frame_load_cap"]
    assert cap % 4 == 1
    assert GRAPH["130"]["inputs"]["format"] == "Wan"


def test_required_settings() -> None:
    assert GRAPH["56"]["inputs"]["merge_loras"] is False
    assert GRAPH["368"]["inputs"]["use_disk_cache"] is True
    assert GRAPH["38"]["inputs"]["model_name"] == "Wan2_1_VAE_bf16.safetensors"
    assert GRAPH["22"]["inputs"]["attention_mode"] in ("sageattn", "sdpa")
    assert not any(n["class_type"] == "DownloadAndLoadNLFModel" for n in GRAPH.values())
    assert not any(n["class_type"] == "SimpleCalculatorKJ" for n in GRAPH.values())


def test_model_files_match_manifest_both_ways() -> None:
    used: dict[str, str] = {}
    for node in GRAPH.values():
        for name, value in node["inputs"].items():
            folder = MODEL_FILE_INPUTS.get((node["class_type"], name))
            if folder is not None:
                used[value] = folder
    manifest = {m["filename"]: m["folder"] for m in MANIFEST["models"]}
    assert used == manifest
    for filename in used:
        assert "\\" not in filename and not filename.startswith("/")


def test_fixture_meta_records_commits() -> None:
    meta = load_object_info(FIXTURE)["_meta"]
    assert set(meta["custom_nodes"]) == {
        "ComfyUI-WanVideoWrapper",
        "ComfyUI-VideoHelperSuite",
        "ComfyUI-KJNodes",
        "ComfyUI-SCAIL-Pose",
        "ComfyUI-WanAnimatePreprocess",
    }
    for name, commit in meta["custom_nodes"].items():
        assert HEX40.match(commit or ""), name
    assert meta["source"] == "live"  # dumped from the real server by tests/realstack
    assert HEX40.match(meta["comfyui"]["commit"] or "")


def test_fixture_covers_every_class_of_the_graph() -> None:
    info = load_object_info(FIXTURE)
    assert {n["class_type"] for n in GRAPH.values()} <= set(info)


def test_docs_diagram_matches_graph() -> None:
    module = _load_diagram_module()
    doc = (ROOT / "docs" / "graph.md").read_text(encoding="utf-8")
    assert module.extract(doc) == module.render(GRAPH)


def test_diagram_has_every_node_and_link() -> None:
    text = _load_diagram_module().render(GRAPH)
    links = sum(
        1
        for n in GRAPH.values()
        for v in n["inputs"].values()
        if isinstance(v, list) and len(v) == 2
    )
    assert text.count(" -->|") == links
    for node_id in GRAPH:
        assert f'    n{node_id}["{node_id} ' in text
