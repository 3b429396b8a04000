"""The import hook of the project's extension ``xicon_pose_decode``, on a stand-in pack laid out
and named as ComfyUI loads WanAnimatePreprocess: only that pack's ``models.onnx_models`` is
touched, its decoder is replaced only while upstream's source is the pinned one, and every mode
but the unbiased Gaussian one still runs upstream's function. The decoding itself against the
pinned pack: ``tests/realstack/test_pose_decode.py``."""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.plugins.modules import forget, load_file, load_pack

ROOT = Path(__file__).resolve().parent.parent
pd = load_file(
    ROOT / "stack" / "comfy_extension" / "xicon_pose_decode" / "pose_decode.py",
    "xicon_pose_decode_under_test",
)

POSE2D = """
CALLS = []

def keypoints_from_heatmaps(heatmaps, center, scale, unbiased=False, post_process="default",
                            kernel=11, valid_radius_factor=0.0546875, use_udp=False,
                            target_type="GaussianHeatmap"):
    CALLS.append({"unbiased": unbiased, "post_process": post_process, "use_udp": use_udp})
    return "upstream"

def _gaussian_blur(heatmaps, kernel=11):
    return heatmaps

def _taylor(heatmap, coord):
    return coord
"""
ONNX_MODELS = "from ..pose_utils.pose2d_utils import keypoints_from_heatmaps\n"


def stand_in_pack(tmp: Path, folder: str = "ComfyUI-WanAnimatePreprocess") -> str:
    """The pack's files, imported under the name ComfyUI gives a custom node (its path, dots
    replaced); returns that name."""
    pack = tmp / "custom_nodes" / folder
    for sub in ("models", "pose_utils"):
        (pack / sub).mkdir(parents=True)
        (pack / sub / "__init__.py").write_text("")
    (pack / "__init__.py").write_text("")
    (pack / "models" / "onnx_models.py").write_text(ONNX_MODELS)
    (pack / "pose_utils" / "pose2d_utils.py").write_text(POSE2D)
    return load_pack(pack)


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch) -> list:
    meta_path = list(sys.meta_path)
    monkeypatch.setattr(sys, "meta_path", meta_path)
    assert pd.install(meta_path) is True
    assert pd.install(meta_path) is False  # once
    return meta_path


def test_the_pinned_source_gets_the_replacement(
    tmp_path: Path, hooked: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = stand_in_pack(tmp_path)
    try:
        pose2d = importlib.import_module(name + ".pose_utils.pose2d_utils")
        monkeypatch.setattr(pd, "UPSTREAM_SHA256", pd.upstream_digest(pose2d))
        onnx_models = importlib.import_module(name + ".models.onnx_models")
        replaced = onnx_models.keypoints_from_heatmaps
        assert getattr(replaced, pd.REPLACED) is True
        assert replaced.__wrapped__ is pose2d.keypoints_from_heatmaps
        # Modes other than the unbiased Gaussian decoding go to upstream's function as given.
        hm = np.zeros((1, 2, 8, 8), np.float32)
        for kwargs in ({"post_process": "default"}, {"unbiased": True, "use_udp": True}):
            assert replaced(hm, None, None, **kwargs) == "upstream"
        assert [c["use_udp"] for c in pose2d.CALLS] == [False, True]
        assert pd.patch(onnx_models) == "nothing to replace in onnx_models"  # not twice
        # The module stays introspectable through the wrapped loader.
        assert "keypoints_from_heatmaps" in inspect.getsource(onnx_models)
    finally:
        forget(name)


def test_a_changed_upstream_is_left_alone(tmp_path: Path, hooked: list) -> None:
    name = stand_in_pack(tmp_path)
    try:
        onnx_models = importlib.import_module(name + ".models.onnx_models")
        pose2d = sys.modules[name + ".pose_utils.pose2d_utils"]
        assert onnx_models.keypoints_from_heatmaps is pose2d.keypoints_from_heatmaps
        assert "upstream's keypoint decoding changed" in pd.patch(onnx_models)
    finally:
        forget(name)


def test_other_packs_are_not_touched(tmp_path: Path, hooked: list) -> None:
    name = stand_in_pack(tmp_path, folder="SomeOtherPack")
    try:
        onnx_models = importlib.import_module(name + ".models.onnx_models")
        assert not hasattr(onnx_models.keypoints_from_heatmaps, pd.REPLACED)
        finder = next(f for f in hooked if isinstance(f, pd.Finder))
        assert finder.find_spec(name + ".models.onnx_models", None) is None
    finally:
        forget(name)


def test_an_unreadable_module_leaves_decoding_as_it_is() -> None:
    module = types.ModuleType("onnx_models")
    assert pd.patch(module) == "nothing to replace in onnx_models"
