"""``differences()`` of the object_info fixture check (tests/realstack/object_info.py): every kind
of change to a node definition is found, on copies of the committed fixture."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.realstack.object_info import FIXTURE, differences

COMMITTED: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
NODE = "VHS_VideoCombine"


def _reorder(mapping: dict[str, Any], first: str) -> dict[str, Any]:
    return {first: mapping[first], **{k: v for k, v in mapping.items() if k != first}}


def _drop_class(info: dict[str, Any]) -> None:
    del info["WanVideoDecode"]


def _add_class(info: dict[str, Any]) -> None:
    info["NewNode"] = copy.deepcopy(info["WanVideoDecode"])


def _drop_hidden(info: dict[str, Any]) -> None:
    del info[NODE]["input"]["hidden"]["unique_id"]


def _add_hidden(info: dict[str, Any]) -> None:
    info[NODE]["input"]["hidden"]["auth_token"] = "AUTH_TOKEN_COMFY_ORG"


def _drop_hidden_section(info: dict[str, Any]) -> None:
    del info[NODE]["input"]["hidden"]


def _swap_required(info: dict[str, Any]) -> None:
    inputs = info[NODE]["input"]
    inputs["required"] = _reorder(inputs["required"], "frame_rate")


def _change_input_order(info: dict[str, Any]) -> None:
    info[NODE]["input_order"]["required"].reverse()


def _change_output(info: dict[str, Any]) -> None:
    info["WanVideoDecode"]["output"] = ["LATENT"]


def _add_output(info: dict[str, Any]) -> None:
    info["WanVideoDecode"]["output"].append("MASK")


def _rename_output(info: dict[str, Any]) -> None:
    info["WanVideoDecode"]["output_name"] = ["frames"]


def _output_list_flag(info: dict[str, Any]) -> None:
    info["WanVideoDecode"]["output_is_list"] = [True]


def _output_node_flag(info: dict[str, Any]) -> None:
    info[NODE]["output_node"] = not info[NODE]["output_node"]


def _option_value(info: dict[str, Any]) -> None:
    info[NODE]["input"]["required"]["frame_rate"][1]["min"] += 1


def _int_becomes_float(info: dict[str, Any]) -> None:
    spec = info[NODE]["input"]["required"]["frame_rate"][1]
    spec["default"] = float(spec["default"])


def _option_order(info: dict[str, Any]) -> None:
    options = info[NODE]["input"]["required"]["frame_rate"][1]
    info[NODE]["input"]["required"]["frame_rate"][1] = _reorder(options, list(options)[-1])


def _input_type(info: dict[str, Any]) -> None:
    info["WanVideoDecode"]["input"]["required"]["vae"] = ["VAE"]


def _input_spec_grows(info: dict[str, Any]) -> None:
    info["WanVideoDecode"]["input"]["required"]["vae"].append({"tooltip": "the VAE"})


def _meta_commit(info: dict[str, Any]) -> None:
    info["_meta"]["comfyui"]["commit"] = "0" * 40


CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "class removed": (_drop_class, "WanVideoDecode: only in the fixture"),
    "class added": (_add_class, "NewNode: only live"),
    "hidden input removed": (_drop_hidden, f"{NODE}.input.hidden.unique_id: only in the fixture"),
    "hidden input added": (_add_hidden, f"{NODE}.input.hidden.auth_token: only live"),
    "hidden section removed": (_drop_hidden_section, f"{NODE}.input.hidden: only in the fixture"),
    "required inputs reordered": (_swap_required, f"{NODE}.input.required: order"),
    "input_order changed": (_change_input_order, f"{NODE}.input_order.required[0]:"),
    "output type changed": (_change_output, "WanVideoDecode.output[0]: 'IMAGE' -> 'LATENT'"),
    "output added": (_add_output, "WanVideoDecode.output: ['IMAGE'] -> ['IMAGE', 'MASK']"),
    "output renamed": (_rename_output, "WanVideoDecode.output_name[0]: 'images' -> 'frames'"),
    "output list flag": (_output_list_flag, "WanVideoDecode.output_is_list[0]: False -> True"),
    "output node flag": (_output_node_flag, f"{NODE}.output_node: True -> False"),
    "option value": (_option_value, f"{NODE}.input.required.frame_rate[1].min: 1 -> 2"),
    "int default becomes float": (_int_becomes_float, f"{NODE}.input.required.frame_rate[1]."),
    "option order": (_option_order, f"{NODE}.input.required.frame_rate[1]: order"),
    "input type": (_input_type, "WanVideoDecode.input.required.vae[0]: 'WANVAE' -> 'VAE'"),
    "input options added": (_input_spec_grows, "WanVideoDecode.input.required.vae: ['WANVAE'] -> "),
    "stack commit": (_meta_commit, "_meta.comfyui.commit:"),
}


def test_the_committed_fixture_equals_itself_and_its_json_round_trip() -> None:
    assert differences(COMMITTED, copy.deepcopy(COMMITTED)) == []
    assert differences(COMMITTED, json.loads(json.dumps(COMMITTED))) == []


def test_the_fixture_has_what_the_cases_change() -> None:
    node, decode = COMMITTED[NODE], COMMITTED["WanVideoDecode"]
    assert {"required", "optional", "hidden"} <= set(node["input"])
    assert "unique_id" in node["input"]["hidden"] and node["output_node"] is True
    assert node["input"]["required"]["frame_rate"] == ["FLOAT", {"default": 8, "min": 1, "step": 1}]
    assert (decode["output"], decode["output_name"], decode["output_is_list"]) == (
        ["IMAGE"],
        ["images"],
        [False],
    )
    assert decode["input"]["required"]["vae"] == ["WANVAE"]


@pytest.mark.parametrize("case", list(CASES))
def test_each_kind_of_difference_is_found(case: str) -> None:
    change, expected = CASES[case]
    live = copy.deepcopy(COMMITTED)
    change(live)
    found = differences(COMMITTED, live)
    assert any(line.startswith(expected) for line in found), found
    reverse = differences(live, COMMITTED)
    assert reverse, "the difference must be found both ways"


def test_a_long_value_is_cut() -> None:
    live = copy.deepcopy(COMMITTED)
    live[NODE]["description"] = "x" * 1000
    (line,) = differences(COMMITTED, live)
    assert len(line) < 300
