"""The GPU-dependent graph settings chosen at start (xicon_dance.gpu_profile)."""

from __future__ import annotations

import pytest

from xicon_dance.errors import ConfigError
from xicon_dance.gpu_profile import GpuInfo, choose
from xicon_dance.settings import Settings


def stats(name: str, kind: str = "cuda", total: int = 32 * 1024**3) -> dict:
    """A ComfyUI v0.33.0 /system_stats body (server.py: devices[].name/type/vram_total)."""
    return {
        "system": {"os": "posix", "comfyui_version": "0.33.0"},
        "devices": [{"name": name, "type": kind, "index": 0, "vram_total": total}],
    }


def test_reads_the_first_device_of_system_stats() -> None:
    gpu = GpuInfo.from_system_stats(stats("cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync"))
    assert gpu == GpuInfo("cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync", "cuda", 32 * 1024**3)
    assert gpu.describe() == "cuda:0 NVIDIA GeForce RTX 5090 (32.0 GiB)"


@pytest.mark.parametrize("body", [{}, {"devices": []}, {"devices": ["x"]}, [], None])
def test_no_device_is_none(body: object) -> None:
    assert GpuInfo.from_system_stats(body) is None


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync", "cuda", "fp16_fast"),
        ("cuda:0 NVIDIA GeForce RTX 4090 : native", "cuda", "fp16_fast"),
        ("cuda:0 NVIDIA H200 : cudaMallocAsync", "cuda", "bf16"),
        ("cuda:0 NVIDIA RTX 6000 Ada Generation : cudaMallocAsync", "cuda", "bf16"),
        ("cpu", "cpu", "bf16"),
    ],
)
def test_auto_precision_follows_the_gpu(name: str, kind: str, expected: str) -> None:
    profile = choose(GpuInfo.from_system_stats(stats(name, kind)), Settings())
    assert profile.base_precision == expected
    assert f"base_precision {expected} (auto" in profile.summary()


def test_unknown_gpu_keeps_bf16() -> None:
    assert choose(None, Settings()).base_precision == "bf16"
    assert "unknown device" in choose(None, Settings()).summary()


def test_a_setting_wins_over_the_gpu() -> None:
    settings = Settings.from_env({"BASE_PRECISION": "BF16"})
    gpu = GpuInfo.from_system_stats(stats("cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync"))
    profile = choose(gpu, settings)
    assert profile.base_precision == "bf16"
    assert "(BASE_PRECISION)" in profile.summary()


def test_a_bad_setting_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="BASE_PRECISION must be auto") as info:
        Settings.from_env({"BASE_PRECISION": "int8"})
    assert info.value.field == "BASE_PRECISION"


@pytest.mark.parametrize(
    ("env", "name", "kind", "on", "reason"),
    [
        (
            {},
            "cuda:0 NVIDIA H200 : cudaMallocAsync",
            "cuda",
            False,
            "torch.compile off (TORCH_COMPILE)",
        ),
        (
            {"TORCH_COMPILE": "1"},
            "cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync",
            "cuda",
            True,
            "torch.compile on (TORCH_COMPILE)",
        ),
        ({"TORCH_COMPILE": "1"}, "cpu", "cpu", False, "ComfyUI runs on no CUDA GPU"),
    ],
)
def test_torch_compile_only_when_set_and_on_cuda(
    env: dict[str, str], name: str, kind: str, on: bool, reason: str
) -> None:
    profile = choose(GpuInfo.from_system_stats(stats(name, kind)), Settings.from_env(env))
    assert profile.torch_compile is on
    assert reason in profile.summary()


def test_torch_compile_stays_off_on_an_unknown_device() -> None:
    profile = choose(None, Settings.from_env({"TORCH_COMPILE": "1"}))
    assert profile.torch_compile is False
    assert "no CUDA GPU" in profile.summary()


GIB = 1024**3
RTX_5090 = 32_607 * 1024**2  # what torch reports for an RTX 5090: 31.8 GiB


@pytest.mark.parametrize(
    ("env", "name", "kind", "total", "on", "reason"),
    [
        ({}, "cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync", "cuda", RTX_5090, True,
         "kept on the GPU between jobs (auto: 31.8 GiB of VRAM, at least 30 GiB)"),
        ({}, "cuda:0 NVIDIA H200 : cudaMallocAsync", "cuda", 140 * GIB, True, "(auto: 140.0 GiB"),
        ({}, "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", "cuda", 24 * GIB, False,
         "offloaded after each job (auto: 24.0 GiB of VRAM, under 30 GiB)"),
        ({}, "cpu", "cpu", 0, False, "(auto: ComfyUI runs on no CUDA GPU)"),
        ({"RESIDENT_TRANSFORMER": "0"}, "cuda:0 NVIDIA H200 : cudaMallocAsync", "cuda",
         140 * GIB, False, "offloaded from the GPU between jobs (RESIDENT_TRANSFORMER)"),
        ({"RESIDENT_TRANSFORMER": "on"}, "cuda:0 NVIDIA GeForce RTX 4090 : native", "cuda",
         24 * GIB, True, "kept on the GPU between jobs (RESIDENT_TRANSFORMER)"),
    ],
)  # fmt: skip
def test_the_transformer_stays_on_cards_with_room(
    env: dict[str, str], name: str, kind: str, total: int, on: bool, reason: str
) -> None:
    profile = choose(GpuInfo.from_system_stats(stats(name, kind, total)), Settings.from_env(env))
    assert profile.resident_transformer is on
    assert reason in profile.summary()


def test_an_unknown_device_offloads_the_transformer() -> None:
    assert choose(None, Settings()).resident_transformer is False


@pytest.mark.parametrize(("raw", "value"), [("AUTO", "auto"), ("yes", "on"), ("false", "off")])
def test_resident_setting_words(raw: str, value: str) -> None:
    assert Settings.from_env({"RESIDENT_TRANSFORMER": raw}).resident_transformer == value


def test_a_bad_resident_setting_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="RESIDENT_TRANSFORMER must be auto, 1 or 0") as info:
        Settings.from_env({"RESIDENT_TRANSFORMER": "sometimes"})
    assert info.value.field == "RESIDENT_TRANSFORMER"


def test_a_job_larger_than_measured_lets_the_transformer_go() -> None:
    gpu = GpuInfo.from_system_stats(stats("cuda:0 NVIDIA GeForce RTX 5090 : x", total=RTX_5090))
    profile = choose(gpu, Settings())
    assert profile.keeps_transformer(81, 416, 672)
    assert profile.keeps_transformer(1441, 416, 672)  # 60 s at the default size: measured
    assert profile.keeps_transformer(1441, 672, 416)
    assert not profile.keeps_transformer(1445, 416, 672)
    assert not profile.keeps_transformer(1441, 576, 1024)
    off = choose(gpu, Settings.from_env({"RESIDENT_TRANSFORMER": "0"}))
    assert not off.keeps_transformer(81, 416, 672)
