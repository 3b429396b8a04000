"""The setting and the batch check of the project's extension ``xicon_pose_batch``; the node
batched against the pinned packs, the import hook and the worker's ComfyUI:
``tests/realstack/test_pose_batch.py``."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from tests.plugins.modules import load_file

ROOT = Path(__file__).resolve().parent.parent
pb = load_file(
    ROOT / "stack" / "comfy_extension" / "xicon_pose_batch" / "pose_batch.py",
    "xicon_pose_batch_under_test",
)


@pytest.mark.parametrize(
    ("raw", "batch"),
    [("", 16), ("  ", 16), ("8", 8), (" 32 ", 32), ("256", 256), ("2", 2)],
)
def test_batch_setting_takes_frames_per_call(raw: str, batch: int) -> None:
    assert pb.batch_setting({"XICON_POSE_BATCH": raw})[0] == batch
    assert pb.batch_setting({})[0] == pb.DEFAULT_BATCH == 16


@pytest.mark.parametrize("raw", ["off", "OFF", "1"])
def test_off_and_one_leave_upstream(raw: str) -> None:
    batch, why = pb.batch_setting({"XICON_POSE_BATCH": raw})
    assert batch is None
    assert why == f"XICON_POSE_BATCH={raw.lower()}: one frame per call as upstream"


@pytest.mark.parametrize("raw", ["0", "-4", "257", "lots", "8.5", "1e3"])
def test_other_values_are_refused_with_the_reason(raw: str) -> None:
    batch, why = pb.batch_setting({"XICON_POSE_BATCH": raw})
    assert batch is None
    assert why == "XICON_POSE_BATCH must be off or a whole number 1-256; one frame per call"


def _model(first_axis: object) -> types.SimpleNamespace:
    inputs = [types.SimpleNamespace(shape=[first_axis, 3, 256, 192])]
    return types.SimpleNamespace(session=types.SimpleNamespace(get_inputs=lambda: inputs))


@pytest.mark.parametrize(
    ("first_axis", "takes"), [("batch_size", True), (None, True), (1, False), (4, False)]
)
def test_only_a_model_with_an_open_first_axis_gets_batches(first_axis: object, takes: bool) -> None:
    assert pb.takes_batches(_model(first_axis)) is takes


def test_a_model_without_a_session_gets_one_frame() -> None:
    assert pb.takes_batches(types.SimpleNamespace(session=None)) is False


def test_the_hook_is_added_once() -> None:
    meta_path: list = []
    assert pb.install({}, meta_path) is True
    assert pb.install({}, meta_path) is False
    assert len(meta_path) == 1 and isinstance(meta_path[0], pb.Finder)
