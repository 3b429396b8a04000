"""Offline validation of an API-format ComfyUI prompt against a saved ``/object_info``.

Contract (pure functions, no I/O except the two loaders):

- ``check_prompt(prompt, object_info, *, model_files=None) -> (error, node_errors)`` reproduces
  ComfyUI's ``POST /prompt`` validation (``execution.py`` ``validate_prompt`` / ``validate_inputs``)
  with ComfyUI's exact result shapes (ComfyUI v0.33.0 ``execution.py`` and ``server.py``):
  ``error`` is ``{"type", "message", "details", "extra_info"}`` or ``None`` when the prompt would be
  accepted; ``node_errors`` maps node id -> ``{"errors": [...], "dependent_outputs": [...],
  "class_type": ...}``. As in ComfyUI, only nodes reachable from an output node are input-checked,
  an unknown ``class_type`` rejects the whole prompt (``invalid_prompt``), a prompt without an
  output node gets ``prompt_no_outputs``, and an exception while following a link (a link to a
  missing node or output index) is reported on the output node as ``exception_during_validation``.
- Two checks of ours on top of ComfyUI's, reported in the same shape:
  ``input_not_declared`` (an input name the class does not declare: ComfyUI silently ignores it)
  and, when ``model_files`` is given, model-file COMBO inputs (``MODEL_FILE_INPUTS``) are checked
  against ``model_files`` instead of the saved list (``value_not_in_list``, as ComfyUI says when
  the file is absent from the models folder).
- Inputs named in a class's ``VALIDATE_INPUTS`` skip the range and COMBO-list checks, as in
  ComfyUI; which inputs those are is read from ``object_info["_meta"]["validate_inputs"]``,
  falling back to ``VALIDATE_INPUTS_DEFAULT``. Their own custom checks (e.g. file existence) need
  the running server and are not reproduced.
- ``load_object_info(path)`` reads the fixture; ``model_filenames(manifest_path)`` returns the
  set of ``filename`` values of the model manifest.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

#: Inputs whose class has a VALIDATE_INPUTS naming them (ComfyUI skips min/max/list checks).
VALIDATE_INPUTS_DEFAULT: dict[str, list[str]] = {
    "LoadImage": ["image"],
    "VHS_LoadVideo": ["video"],
    "WanVideoDecode": ["tile_x", "tile_y", "tile_stride_x", "tile_stride_y"],
}

#: (class_type, input) -> ComfyUI models folder, for the model-file COMBO inputs.
MODEL_FILE_INPUTS: dict[tuple[str, str], str] = {
    ("WanVideoModelLoader", "model"): "diffusion_models",
    ("WanVideoLoraSelect", "lora"): "loras",
    ("WanVideoVAELoader", "model_name"): "vae",
    ("WanVideoTextEncodeCached", "model_name"): "text_encoders",
    ("LoadWanVideoT5TextEncoder", "model_name"): "text_encoders",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("LoadNLFModel", "nlf_model"): "nlf",
    ("OnnxDetectionModelLoader", "vitpose_model"): "detection",
    ("OnnxDetectionModelLoader", "yolo_model"): "detection",
}

#: Classes whose format COMBO declares extra per-format widgets in its ``formats`` option.
_FORMAT_WIDGET_CLASSES = {"VHS_VideoCombine"}

Error = dict[str, Any]
_Validated = dict[str, tuple[bool, list[Error], str]]


def load_object_info(path: str | Path) -> dict:
    """Read a saved ``/object_info`` JSON file (the ``_meta`` entry is kept)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: object_info must be a JSON object")
    return data


def model_filenames(manifest_path: str | Path) -> set[str]:
    """Return every ``models[].filename`` of the model manifest."""
    with open(manifest_path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    return {str(m["filename"]) for m in manifest["models"]}


def _type_name(ex: BaseException) -> str:
    """ComfyUI's ``full_type_name``: the qualified name, without ``builtins.``."""
    cls = type(ex)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _err(etype: str, message: str, details: str = "", extra: dict | None = None) -> Error:
    return {"type": etype, "message": message, "details": details, "extra_info": extra or {}}


def _is_output(info: dict) -> bool:
    return bool(info.get("output_node"))


def validate_node_input(received_type: Any, input_type: Any) -> bool:
    """ComfyUI's type match: equal, ``*`` on either side, or comma-separated sets intersecting."""
    if received_type == input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    wanted = {t.strip() for t in input_type.split(",")}
    if "*" in received or "*" in wanted:
        return True
    return bool(received & wanted)


def _class_inputs(info: dict) -> tuple[dict, dict]:
    inp = info.get("input", {})
    return inp.get("required", {}) or {}, inp.get("optional", {}) or {}


def _declared_names(info: dict, inputs: dict) -> set[str]:
    required, optional = _class_inputs(info)
    names = set(required) | set(optional)
    hidden = info.get("input", {}).get("hidden", {}) or {}
    names |= set(hidden)
    if info.get("name") in _FORMAT_WIDGET_CLASSES:
        fmt_spec = required.get("format") or optional.get("format")
        fmt = inputs.get("format")
        if fmt_spec and len(fmt_spec) > 1 and isinstance(fmt, str):
            widgets = fmt_spec[1].get("formats", {}).get(fmt, [])
            names |= {w[0] for w in widgets if isinstance(w, list) and w}
    return names


def _combo_options(input_type: Any, extra: dict) -> list | None:
    if isinstance(input_type, list):
        return input_type
    if input_type == "COMBO":
        return list(extra.get("options", []))
    return None


def _convert(input_type: Any, val: Any) -> Any:
    if input_type == "INT":
        return int(val)
    if input_type == "FLOAT":
        return float(val)
    if input_type == "STRING":
        return str(val)
    if input_type == "BOOLEAN":
        return bool(val)
    return val


def _check_literal(
    name: str, val: Any, spec: list, skip_checks: bool, model_opts: list | None
) -> Error | None:
    input_type = spec[0]
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    info = [input_type, extra]
    if isinstance(val, dict) and "__value__" in val:
        val = val["__value__"]
    try:
        val = _convert(input_type, val)
    except Exception as ex:  # ComfyUI reports any conversion failure the same way
        return _err(
            "invalid_input_type",
            f"Failed to convert an input value to a {input_type} value",
            f"{name}, {val}, {ex}",
            {
                "input_name": name,
                "input_config": info,
                "received_value": val,
                "exception_message": str(ex),
            },
        )
    if skip_checks:
        return None
    base = {"input_name": name, "input_config": info, "received_value": val}
    if "min" in extra and extra["min"] is not None and val < extra["min"]:
        return _err(
            "value_smaller_than_min", f"Value {val} smaller than min of {extra['min']}", name, base
        )
    if "max" in extra and extra["max"] is not None and val > extra["max"]:
        return _err(
            "value_bigger_than_max", f"Value {val} bigger than max of {extra['max']}", name, base
        )
    options = model_opts if model_opts is not None else _combo_options(input_type, extra)
    if options is not None and val not in options:
        if len(options) > 20:
            list_info, config = f"(list of length {len(options)})", None
        else:
            list_info, config = str(options), info
        return _err(
            "value_not_in_list",
            "Value not in list",
            f"{name}: '{val}' not in {list_info}",
            {"input_name": name, "input_config": config, "received_value": val},
        )
    return None


def _validate_inputs(
    prompt: dict,
    node_id: str,
    object_info: dict,
    validated: _Validated,
    skip: dict[str, list[str]],
    model_files: set[str] | None,
) -> tuple[bool, list[Error], str]:
    if node_id in validated:
        return validated[node_id]
    node = prompt[node_id]
    class_type = node["class_type"]
    info = object_info[class_type]
    inputs = node.get("inputs", {}) or {}
    required, optional = _class_inputs(info)
    errors: list[Error] = []
    valid = True
    skip_names = set(skip.get(class_type, []))
    for name, spec in [*required.items(), *optional.items()]:
        if name not in inputs:
            if name in required:
                errors.append(
                    _err(
                        "required_input_missing",
                        "Required input is missing",
                        name,
                        {"input_name": name},
                    )
                )
            continue
        val = inputs[name]
        if isinstance(val, list):
            if len(val) != 2:
                errors.append(
                    _err(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name,
                        {"input_name": name, "input_config": spec, "received_value": val},
                    )
                )
                continue
            o_id = str(val[0])
            # A KeyError / IndexError here propagates to the caller, as in ComfyUI: the nearest
            # inner validation records it on this node, or the output node gets it.
            received = object_info[prompt[o_id]["class_type"]]["output"][val[1]]
            if not validate_node_input(received, spec[0]):
                errors.append(
                    _err(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        f"{name}, received_type({received}) mismatch input_type({spec[0]})",
                        {
                            "input_name": name,
                            "input_config": spec,
                            "received_type": received,
                            "linked_node": val,
                        },
                    )
                )
                continue
            try:
                r = _validate_inputs(prompt, o_id, object_info, validated, skip, model_files)
            except Exception as ex:
                # ComfyUI records this on the linked node, not on the node being validated.
                valid = False
                reason = _err(
                    "exception_during_inner_validation",
                    "Exception when validating inner node",
                    str(ex),
                    {
                        "input_name": name,
                        "input_config": spec,
                        "exception_message": str(ex),
                        "exception_type": _type_name(ex),
                        "traceback": traceback.format_tb(ex.__traceback__),
                        "linked_node": val,
                    },
                )
                validated[o_id] = (False, [reason], o_id)
                continue
            if r[0] is False:
                valid = False
            continue
        model_opts = None
        if model_files is not None and (class_type, name) in MODEL_FILE_INPUTS:
            model_opts = sorted(model_files)
        err = _check_literal(name, val, spec, name in skip_names, model_opts)
        if err is not None:
            errors.append(err)
    declared = _declared_names(info, inputs)
    for name in inputs:
        if name not in declared:
            errors.append(
                _err(
                    "input_not_declared",
                    "Input is not declared by the node class (ComfyUI would silently ignore it)",
                    name,
                    {"input_name": name, "class_type": class_type},
                )
            )
    ret = (not errors and valid, errors, node_id)
    validated[node_id] = ret
    return ret


def _whole_prompt_error(prompt: Any, object_info: dict) -> Error | None:
    if not isinstance(prompt, dict):
        return _err("invalid_prompt", "Prompt must be a JSON object of nodes", "")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _err(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        class_type = node["class_type"]
        if class_type not in object_info or class_type == "_meta":
            return _err(
                "invalid_prompt",
                f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'",
            )
    return None


def check_prompt(
    prompt: dict, object_info: dict, *, model_files: set[str] | None = None
) -> tuple[dict | None, dict]:
    """Validate ``prompt`` like ComfyUI's ``/prompt``; return ``(error, node_errors)``."""
    whole = _whole_prompt_error(prompt, object_info)
    if whole is not None:
        return whole, {}
    outputs = [nid for nid, n in prompt.items() if _is_output(object_info[n["class_type"]])]
    if not outputs:
        return _err("prompt_no_outputs", "Prompt has no outputs"), {}
    skip = (object_info.get("_meta") or {}).get("validate_inputs") or VALIDATE_INPUTS_DEFAULT
    validated: _Validated = {}
    good, failed = [], []
    for out in outputs:
        try:
            ok, reasons, _ = _validate_inputs(
                prompt, out, object_info, validated, skip, model_files
            )
        except Exception as ex:
            ok = False
            reasons = [
                _err(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(ex),
                    {
                        "exception_type": _type_name(ex),
                        "traceback": traceback.format_tb(ex.__traceback__),
                    },
                )
            ]
            validated[out] = (False, reasons, out)
        (good if ok else failed).append((out, reasons))
    node_errors = _collect_node_errors(prompt, validated, [o for o, _ in failed])
    if good:
        return None, node_errors
    lines = [f"{e['message']}: {e['details']}" for _, reasons in failed for e in reasons]
    error = _err(
        "prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(lines)
    )
    return error, node_errors


def _collect_node_errors(prompt: dict, validated: _Validated, failed_outputs: list[str]) -> dict:
    node_errors: dict[str, dict] = {}
    for node_id, (ok, reasons, _) in validated.items():
        if ok is not True and reasons:
            node_errors[node_id] = {
                "errors": reasons,
                "dependent_outputs": [],
                "class_type": prompt[node_id]["class_type"],
            }
    for entry in node_errors.values():
        entry["dependent_outputs"] = list(failed_outputs)
    return node_errors
