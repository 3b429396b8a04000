"""Workflow role table: checked at load, patches a copy, never the template."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from xicon_dance.errors import ConfigError
from xicon_dance.settings import PACKAGE_ROOT
from xicon_dance.workflow import (
    BYPASSED,
    COMPILE_NODE,
    COMPILE_SETTINGS,
    POSE_BATCH,
    ROLES,
    PatchParams,
    Workflow,
    check_roles,
    unique_prefix,
)

REAL_GRAPH = PACKAGE_ROOT / "XiCON_Dance_SCAIL_vFinal.json"


def mini_graph() -> dict[str, Any]:
    """A small API-format graph with the seed's node ids, classes and inputs."""
    return {
        "106": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "130": {
            "class_type": "VHS_LoadVideo",
            "inputs": {
                "video": "drive.mp4",
                "force_rate": 16,
                "custom_width": 512,
                "custom_height": 0,
                "frame_load_cap": 0,
                "format": "Wan",
            },
        },
        "334": {"class_type": "NLFPredict", "inputs": {"images": ["130", 0], "per_batch": -1}},
        "203": {"class_type": "INTConstant", "inputs": {"value": 512}},
        "204": {"class_type": "INTConstant", "inputs": {"value": 896}},
        "205": {"class_type": "INTConstant", "inputs": {"value": 256}},
        "206": {"class_type": "INTConstant", "inputs": {"value": 448}},
        "238": {"class_type": "FloatConstant", "inputs": {"value": 1.0}},
        "22": {
            "class_type": "WanVideoModelLoader",
            "inputs": {"attention_mode": "sdpa", "base_precision": "bf16"},
        },
        "362": {"class_type": "RenderNLFPoses", "inputs": {"render_device": "gpu"}},
        "355": {
            "class_type": "WanVideoContextOptions",
            "inputs": {"context_frames": 81, "context_stride": 4, "context_overlap": 48},
        },
        "348": {
            "class_type": "WanVideoSamplerv2",
            "inputs": {"seed": 42, "cfg": ["238", 0], "force_offload": True},
        },
        "327": {"class_type": "WanVideoClipVisionEncode", "inputs": {"force_offload": True}},
        "349": {"class_type": "WanVideoSchedulerv2", "inputs": {"steps": 6}},
        "368": {
            "class_type": "WanVideoTextEncodeCached",
            "inputs": {"positive_prompt": "p", "negative_prompt": "n"},
        },
        "139": {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["348", 0],
                "frame_rate": 16,
                "filename_prefix": "SCAIL",
                "audio": ["130", 2],
            },
        },
    }


def params(**over: Any) -> PatchParams:
    base: dict[str, Any] = {
        "image_name": "jobs/j1/ref.png",
        "video_name": "jobs/j1/drive.mp4",
        "width": 416,
        "height": 672,
        "fps": 24,
        "frame_load_cap": 81,
        "steps": 6,
        "cfg": 1,
        "seed": 7,
        "prompt": "dance",
        "negative_prompt": "static",
        "filename_prefix": "xicon_dance_j1_abcd",
        "attention_mode": "sageattn",
        "pose_render_device": "cpu",
        "base_precision": "fp16_fast",
    }
    base.update(over)
    return PatchParams(**base)


def test_build_sets_every_role_and_derived_pose_size() -> None:
    graph = Workflow(mini_graph()).build(params())
    assert graph["106"]["inputs"]["image"] == "jobs/j1/ref.png"
    assert graph["130"]["inputs"] == {
        "video": "jobs/j1/drive.mp4",
        "force_rate": 0,  # the transcoded file is at the job's fps and size: loaded as it is
        "custom_width": 0,
        "custom_height": 0,
        "frame_load_cap": 81,
        "format": "Wan",
    }
    assert graph["334"]["inputs"]["per_batch"] == POSE_BATCH > 0
    assert [graph[n]["inputs"]["value"] for n in ("203", "204", "205", "206")] == [
        416,
        672,
        208,
        336,
    ]
    assert graph["238"]["inputs"]["value"] == 1.0
    assert isinstance(graph["238"]["inputs"]["value"], float)
    assert graph["348"]["inputs"]["seed"] == 7
    assert graph["348"]["inputs"]["force_offload"] is True  # the transformer leaves the GPU
    assert graph["349"]["inputs"]["steps"] == 6
    assert graph["368"]["inputs"] == {"positive_prompt": "dance", "negative_prompt": "static"}
    assert graph["139"]["inputs"]["frame_rate"] == 24
    assert graph["139"]["inputs"]["filename_prefix"] == "xicon_dance_j1_abcd"
    assert "audio" not in graph["139"]["inputs"]
    assert graph["22"]["inputs"]["attention_mode"] == "sageattn"
    assert graph["22"]["inputs"]["base_precision"] == "fp16_fast"
    assert graph["362"]["inputs"]["render_device"] == "cpu"


def test_torch_compile_adds_its_settings_node_and_links_the_loader() -> None:
    wf = Workflow(mini_graph())
    off = wf.build(params())
    assert COMPILE_NODE not in off
    assert "compile_args" not in off["22"]["inputs"]
    on = wf.build(params(torch_compile=True))
    assert on[COMPILE_NODE]["class_type"] == "WanVideoTorchCompileSettings"
    assert on[COMPILE_NODE]["inputs"] == COMPILE_SETTINGS
    assert on[COMPILE_NODE]["inputs"]["allow_unmerged_lora_compile"] is True
    assert on["22"]["inputs"]["compile_args"] == [COMPILE_NODE, 0]
    assert set(on) - set(off) == {COMPILE_NODE}
    assert "compile_args" not in wf.template["22"]["inputs"]  # the template is never changed
    on[COMPILE_NODE]["inputs"]["mode"] = "max-autotune"  # a built graph owns its copy
    assert COMPILE_SETTINGS["mode"] == "default"


def test_a_resident_transformer_turns_the_samplers_and_clip_visions_offload_off() -> None:
    wf = Workflow(mini_graph())
    for node in ("348", "327"):  # the sampler, the CLIP vision encode
        assert wf.build(params(resident_transformer=True))[node]["inputs"]["force_offload"] is False
        assert wf.build(params(resident_transformer=False))[node]["inputs"]["force_offload"] is True
        assert wf.template[node]["inputs"]["force_offload"] is True


def test_context_overlap_is_the_templates_unless_the_job_sets_it() -> None:
    wf = Workflow(mini_graph())
    assert wf.build(params())["355"]["inputs"]["context_overlap"] == 48
    patched = wf.build(params(context_overlap=16))["355"]["inputs"]
    assert patched == {"context_frames": 81, "context_stride": 4, "context_overlap": 16}


def test_the_audio_link_is_always_removed() -> None:
    """The worker adds the clip's audio to node 139's silent video itself (remux)."""
    wf = Workflow(mini_graph())
    assert "audio" not in wf.build(params())["139"]["inputs"]
    assert wf.template["139"]["inputs"]["audio"] == ["130", 2]  # the template keeps it
    template = mini_graph()
    del template["139"]["inputs"]["audio"]
    assert "audio" not in Workflow(template).build(params())["139"]["inputs"]


def test_template_is_never_mutated() -> None:
    template = mini_graph()
    snapshot = copy.deepcopy(template)
    wf = Workflow(template)
    first = wf.build(params(seed=1))
    first["130"]["inputs"]["video"] = "tampered"
    wf.build(params(seed=2))
    assert template == snapshot
    assert wf.template == snapshot
    wf.template["106"]["inputs"]["image"] = "tampered"
    assert wf.template == snapshot


@pytest.mark.parametrize("role", sorted(r for r, s in ROLES.items() if not s.optional))
def test_missing_input_names_the_node(role: str) -> None:
    graph = mini_graph()
    spec = ROLES[role]
    del graph[spec.node]["inputs"][spec.input]
    with pytest.raises(ConfigError) as info:
        check_roles(graph)
    assert f"node {spec.node}" in info.value.message
    assert spec.input in info.value.message


def test_wrong_class_and_missing_node_name_the_node() -> None:
    graph = mini_graph()
    graph["349"]["class_type"] = "WanVideoScheduler"
    with pytest.raises(ConfigError, match=r"node 349 .*'WanVideoScheduler'.*'WanVideoSchedulerv2'"):
        check_roles(graph)
    graph = mini_graph()
    del graph["238"]
    with pytest.raises(ConfigError, match=r"node 238 \(FloatConstant"):
        check_roles(graph)


def with_resize(graph: dict[str, Any]) -> dict[str, Any]:
    """``graph`` with node 131 between node 130's frames and their readers, as in the template."""
    graph["131"] = {
        "class_type": "ImageResizeKJv2",
        "inputs": {"image": ["130", 0], "width": ["203", 0], "height": ["204", 0]},
    }
    graph["334"]["inputs"]["images"] = ["131", 0]
    graph["363"] = {"class_type": "PoseDetectionVitPoseToDWPose", "inputs": {"images": ["131", 0]}}
    return graph


def test_driving_resize_is_left_out_and_its_readers_read_the_loaded_frames() -> None:
    wf = Workflow(with_resize(mini_graph()))
    graph = wf.build(params())
    assert "131" not in graph
    assert graph["334"]["inputs"]["images"] == ["130", 0]
    assert graph["363"]["inputs"]["images"] == ["130", 0]
    assert "131" in wf.template  # the template keeps it for a run without the worker
    assert wf.template["334"]["inputs"]["images"] == ["131", 0]
    # a template without the node builds as it is
    assert Workflow(mini_graph()).build(params())["334"]["inputs"]["images"] == ["130", 0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda g: g["131"].update(class_type="ImageScale"),
            r"node 131 must be of class ImageResizeKJv2",
        ),
        (lambda g: g["131"]["inputs"].update(image=["106", 0]), r"must resize \['130', 0\]"),
        (
            lambda g: g["334"]["inputs"].update(images=["131", 1]),
            r"read at output 1 by node 334 input 'images'",
        ),
    ],
)
def test_a_driving_resize_that_is_not_the_identity_is_refused(change: Any, message: str) -> None:
    graph = with_resize(mini_graph())
    change(graph)
    with pytest.raises(ConfigError, match=message) as info:
        check_roles(graph)
    assert info.value.field == "WORKFLOW_PATH"


def test_load_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        Workflow.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Workflow.load(bad)
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="API-format"):
        Workflow.load(ui)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(mini_graph()))
    assert Workflow.load(good).build(params())["348"]["inputs"]["seed"] == 7


def test_unique_prefix_is_unique_and_safe() -> None:
    a, b = unique_prefix("job/../x y"), unique_prefix("job/../x y")
    assert a != b
    assert "/" not in a and " " not in a and ".." not in a


@pytest.mark.skipif(not REAL_GRAPH.exists(), reason="the production graph is not in the tree yet")
def test_production_graph_passes_the_role_check() -> None:
    wf = Workflow.load(REAL_GRAPH)
    graph = wf.build(params())
    assert graph["205"]["inputs"]["value"] == 208
    for node_id, (class_type, source) in BYPASSED.items():
        assert wf.template[node_id]["class_type"] == class_type
        assert node_id not in graph
        readers = [n for n, node in wf.template.items() if [node_id, 0] in node["inputs"].values()]
        assert readers  # the shipped graph reads the resize; the build reads the source instead
        assert all(source in graph[n]["inputs"].values() for n in readers)


@pytest.mark.skipif(not REAL_GRAPH.exists(), reason="the production graph is not in the tree yet")
def test_model_alias_is_adopted_only_when_the_canonical_file_is_absent() -> None:
    wf = Workflow.load(REAL_GRAPH)
    vae = ("WanVideoVAELoader", "model_name")
    aliases = {"Wan2_1_VAE_bf16.safetensors": ("Wan2.1_VAE.pth",)}
    both = {vae: ["Wan2.1_VAE.pth", "Wan2_1_VAE_bf16.safetensors"]}
    assert wf.adopt_model_aliases(both, aliases) == {}
    assert wf.adopt_model_aliases({vae: ["other.safetensors"]}, aliases) == {}
    assert wf.build(params())["38"]["inputs"]["model_name"] == "Wan2_1_VAE_bf16.safetensors"
    assert wf.adopt_model_aliases({vae: ["Wan2.1_VAE.pth"]}, aliases) == {
        "38.model_name": "Wan2.1_VAE.pth"
    }
    assert wf.build(params())["38"]["inputs"]["model_name"] == "Wan2.1_VAE.pth"


def test_model_inputs_cover_every_loader_of_the_graph() -> None:
    wf = Workflow.load(REAL_GRAPH)
    found = {(node, name) for node, _cls, name in wf.model_inputs()}
    assert found == {
        ("22", "model"),
        ("56", "lora"),
        ("38", "model_name"),
        ("368", "model_name"),
        ("326", "clip_name"),
        ("335", "nlf_model"),
        ("364", "vitpose_model"),
        ("364", "yolo_model"),
    }
