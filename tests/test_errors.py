"""The one failure shape: error is always a readable string, code and field always present."""

from __future__ import annotations

import json

from xicon_dance.errors import (
    ComfyError,
    ComfyUnavailable,
    DeliveryError,
    InputError,
    JobTimeout,
    WorkerError,
    internal_error_response,
)


def test_input_error_shape() -> None:
    r = InputError("width: must be a multiple of 32 (got 500).", field="width").to_response()
    assert r == {
        "error": "width: must be a multiple of 32 (got 500).",
        "code": "invalid_input",
        "field": "width",
    }
    json.dumps(r)


def test_codes_and_refresh_flag() -> None:
    assert ComfyError("x").to_response()["code"] == "comfyui_error"
    assert ComfyError("x", code="out_of_memory").to_response()["code"] == "out_of_memory"
    assert JobTimeout("x").to_response()["code"] == "timeout"
    assert DeliveryError("x").to_response()["code"] == "delivery_failed"
    dead = ComfyUnavailable("ComfyUI exited.").to_response()
    assert dead["refresh_worker"] is True and dead["code"] == "comfyui_unavailable"
    assert "refresh_worker" not in ComfyError("x").to_response()


def test_every_response_error_is_a_string() -> None:
    for err in (WorkerError("a"), InputError("b", field="f"), ComfyUnavailable("c")):
        assert isinstance(err.to_response()["error"], str)
    internal = internal_error_response()
    assert isinstance(internal["error"], str) and internal["code"] == "internal_error"
    assert "Traceback" not in internal["error"]
