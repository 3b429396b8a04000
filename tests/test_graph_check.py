"""The offline /prompt validator: the committed graph passes, broken copies fail with ComfyUI's
error types and shapes (../shared/reference/comfyui-protocol.md §4)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from xicon_dance.graph_check import (
    check_prompt,
    load_object_info,
    model_filenames,
    validate_node_input,
)

ROOT = Path(__file__).resolve().parent.parent
GRAPH = ROOT / "XiCON_Dance_SCAIL_vFinal.json"
FIXTURE = ROOT / "tests" / "fixtures" / "object_info.json"
MANIFEST = ROOT / "model_manifest.json"


@pytest.fixture(scope="module")
def object_info() -> dict:
    return load_object_info(FIXTURE)


@pytest.fixture(scope="module")
def models() -> set[str]:
    return model_filenames(MANIFEST)


@pytest.fixture
def graph() -> dict:
    return json.loads(GRAPH.read_text(encoding="utf-8"))


def _node_error_types(node_errors: dict) -> dict[str, list[str]]:
    return {nid: [e["type"] for e in v["errors"]] for nid, v in node_errors.items()}


def _assert_shape(error: dict | None, node_errors: dict) -> None:
    assert error is not None
    assert set(error) == {"type", "message", "details", "extra_info"}
    for nid, entry in node_errors.items():
        assert set(entry) == {"errors", "dependent_outputs", "class_type"}, nid
        assert entry["dependent_outputs"] == ["139"]
        for e in entry["errors"]:
            assert set(e) == {"type", "message", "details", "extra_info"}


def test_committed_graph_is_valid(graph: dict, object_info: dict, models: set[str]) -> None:
    assert check_prompt(graph, object_info, model_files=models) == (None, {})
    assert check_prompt(graph, object_info) == (None, {})


def test_misspelt_input_name_is_flagged(graph, object_info, models) -> None:
    graph["350"]["inputs"]["strenght"] = graph["350"]["inputs"].pop("strength")
    error, node_errors = check_prompt(graph, object_info, model_files=models)
    _assert_shape(error, node_errors)
    assert error["type"] == "prompt_outputs_failed_validation"
    assert sorted(_node_error_types(node_errors)["350"]) == [
        "input_not_declared",
        "required_input_missing",
    ]
    undeclared = [e for e in node_errors["350"]["errors"] if e["type"] == "input_not_declared"]
    assert undeclared[0]["details"] == "strenght"


def test_wrong_link_type(graph, object_info, models) -> None:
    graph["139"]["inputs"]["images"] = ["348", 0]  # LATENT into IMAGE
    error, node_errors = check_prompt(graph, object_info, model_files=models)
    _assert_shape(error, node_errors)
    (err,) = node_errors["139"]["errors"]
    assert err["type"] == "return_type_mismatch"
    assert err["details"] == "images, received_type(LATENT) mismatch input_type(IMAGE)"
    assert err["extra_info"]["received_type"] == "LATENT"
    assert err["extra_info"]["linked_node"] == ["348", 0]


def test_unknown_model_file(graph, object_info, models) -> None:
    graph["38"]["inputs"]["model_name"] = "Wan2.1_VAE.pth"
    error, node_errors = check_prompt(graph, object_info, model_files=models)
    _assert_shape(error, node_errors)
    (err,) = node_errors["38"]["errors"]
    assert err["type"] == "value_not_in_list"
    assert err["details"].startswith("model_name: 'Wan2.1_VAE.pth' not in [")
    assert err["extra_info"]["received_value"] == "Wan2.1_VAE.pth"


def test_model_file_checked_against_manifest_not_fixture(graph, object_info) -> None:
    only = {"some_other.safetensors"}
    _, node_errors = check_prompt(graph, object_info, model_files=only)
    failing = {
        nid
        for nid, v in node_errors.items()
        if "value_not_in_list" in [e["type"] for e in v["errors"]]
    }
    assert failing == {"22", "56", "38", "368", "326", "335", "364"}


def test_missing_required_input(graph, object_info, models) -> None:
    del graph["349"]["inputs"]["steps"]
    error, node_errors = check_prompt(graph, object_info, model_files=models)
    _assert_shape(error, node_errors)
    (err,) = node_errors["349"]["errors"]
    assert err == {
        "type": "required_input_missing",
        "message": "Required input is missing",
        "details": "steps",
        "extra_info": {"input_name": "steps"},
    }


def test_unknown_class_rejects_whole_prompt(graph, object_info) -> None:
    graph["107"]["class_type"] = "ImageResizeKJv3"
    error, node_errors = check_prompt(graph, object_info)
    assert node_errors == {}
    assert error == {
        "type": "invalid_prompt",
        "message": "Cannot execute because node ImageResizeKJv3 does not exist.",
        "details": "Node ID '#107'",
        "extra_info": {},
    }


def test_missing_class_type(graph, object_info) -> None:
    del graph["107"]["class_type"]
    error, _ = check_prompt(graph, object_info)
    assert error["type"] == "invalid_prompt"
    assert "class_type" in error["message"]


@pytest.mark.parametrize(
    ("node", "name", "value", "etype", "message"),
    [
        ("349", "steps", 0, "value_smaller_than_min", "Value 0 smaller than min of 1"),
        ("350", "end_percent", 1.5, "value_bigger_than_max", "Value 1.5 bigger than max of 1.0"),
        ("139", "loop_count", 101, "value_bigger_than_max", "Value 101 bigger than max of 100"),
    ],
)
def test_out_of_range(graph, object_info, node, name, value, etype, message) -> None:
    graph[node]["inputs"][name] = value
    error, node_errors = check_prompt(graph, object_info)
    _assert_shape(error, node_errors)
    (err,) = node_errors[node]["errors"]
    assert (err["type"], err["message"], err["details"]) == (etype, message, name)


def test_invalid_literal_type(graph, object_info) -> None:
    graph["349"]["inputs"]["steps"] = "six"
    _, node_errors = check_prompt(graph, object_info)
    (err,) = node_errors["349"]["errors"]
    assert err["type"] == "invalid_input_type"
    assert err["details"].startswith("steps, six, invalid literal for int()")


def test_combo_value_not_in_list(graph, object_info) -> None:
    graph["349"]["inputs"]["scheduler"] = "dpmpp"
    _, node_errors = check_prompt(graph, object_info)
    (err,) = node_errors["349"]["errors"]
    assert err["type"] == "value_not_in_list"
    assert err["details"] == "scheduler: 'dpmpp' not in (list of length 21)"
    assert err["extra_info"]["input_config"] is None


def test_link_to_missing_node_from_output_node(graph, object_info) -> None:
    graph["139"]["inputs"]["images"] = ["999", 0]
    error, node_errors = check_prompt(graph, object_info)
    _assert_shape(error, node_errors)
    (err,) = node_errors["139"]["errors"]
    assert err["type"] == "exception_during_validation"
    assert err["details"] == "'999'"
    assert err["extra_info"]["exception_type"] == "KeyError"
    assert error["details"] == "Exception when validating node: '999'"


def test_link_to_missing_node_deeper(graph, object_info) -> None:
    # ComfyUI records an exception inside a linked node's validation on that linked node.
    graph["99"]["inputs"]["num_frames"] = ["999", 1]
    error, node_errors = check_prompt(graph, object_info)
    _assert_shape(error, node_errors)
    assert list(node_errors) == ["99"]
    (err,) = node_errors["99"]["errors"]
    assert err["type"] == "exception_during_inner_validation"
    assert err["details"] == "'999'"
    assert err["extra_info"]["linked_node"] == ["99", 0]
    assert node_errors["99"]["class_type"] == "WanVideoEmptyEmbeds"


def test_link_to_missing_output_index(graph, object_info) -> None:
    graph["139"]["inputs"]["images"] = ["28", 5]
    _, node_errors = check_prompt(graph, object_info)
    (err,) = node_errors["139"]["errors"]
    assert err["type"] == "exception_during_validation"
    assert err["extra_info"]["exception_type"] == "IndexError"


def test_no_output_node(graph, object_info) -> None:
    del graph["139"]
    error, node_errors = check_prompt(graph, object_info)
    assert node_errors == {}
    assert error == {
        "type": "prompt_no_outputs",
        "message": "Prompt has no outputs",
        "details": "",
        "extra_info": {},
    }


def test_validate_inputs_classes_skip_list_check(graph, object_info) -> None:
    # LoadImage / VHS_LoadVideo validate by file existence in ComfyUI, not by the saved list.
    graph["106"]["inputs"]["image"] = "job-1234/ref.webp"
    graph["130"]["inputs"]["video"] = "job-1234/drive.mov"
    assert check_prompt(graph, object_info) == (None, {})
    # Any other COMBO still gets the list check.
    graph["364"]["inputs"]["onnx_device"] = "ROCMExecutionProvider"
    _, node_errors = check_prompt(graph, object_info)
    assert _node_error_types(node_errors) == {"364": ["value_not_in_list"]}


def test_vhs_format_widgets_are_declared(graph, object_info) -> None:
    graph["139"]["inputs"]["crf"] = 23
    assert check_prompt(graph, object_info) == (None, {})
    graph["139"]["inputs"]["format"] = "image/gif"  # gif declares no crf widget
    _, node_errors = check_prompt(graph, object_info)
    assert [e["details"] for e in node_errors["139"]["errors"]] == [
        "pix_fmt",
        "crf",
        "save_metadata",
        "trim_to_audio",
    ]


def test_unreachable_nodes_are_not_input_checked(graph, object_info) -> None:
    # ComfyUI validates only what an output depends on.
    graph["900"] = {"class_type": "INTConstant", "inputs": {}}
    assert check_prompt(graph, object_info) == (None, {})


def test_upstream_failure_is_reported_on_the_failing_node(graph, object_info) -> None:
    graph["203"]["inputs"]["value"] = "wide"
    error, node_errors = check_prompt(graph, object_info)
    assert error["details"] == ""  # the output node itself has no error of its own
    assert list(node_errors) == ["203"]
    assert node_errors["203"]["class_type"] == "INTConstant"


def test_check_does_not_mutate_prompt(graph, object_info) -> None:
    before = copy.deepcopy(graph)
    check_prompt(graph, object_info)
    assert graph == before


@pytest.mark.parametrize(
    ("received", "wanted", "ok"),
    [
        ("IMAGE", "IMAGE", True),
        ("IMAGE", "*", True),
        ("*", "LATENT", True),
        ("IMAGE,MASK", "MASK", True),
        ("IMAGE", "LATENT, IMAGE", True),
        ("LATENT", "IMAGE", False),
        ("INT", ["a", "b"], False),
    ],
)
def test_type_matching(received, wanted, ok) -> None:
    assert validate_node_input(received, wanted) is ok
