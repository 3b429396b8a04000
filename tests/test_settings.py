"""Settings: parsed once from the environment, with clear errors naming the variable."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from xicon_dance.errors import ConfigError
from xicon_dance.settings import ENV_DOC, PACKAGE_ROOT, Settings


def test_defaults_from_empty_environment() -> None:
    s = Settings.from_env({})
    assert s.comfy_url == "http://127.0.0.1:8188"
    assert s.attention_mode == "sageattn"
    assert not s.bucket_configured
    assert s.default_video == PACKAGE_ROOT / "assets" / "default_video.mp4"
    assert s.max_base64_output_bytes * 4 / 3 < 10 * 1000 * 1000  # fits RunPod's 10 MB /run cap


def test_values_are_parsed_and_relative_paths_resolved() -> None:
    s = Settings.from_env(
        {
            "COMFY_HOST": "127.0.0.1:9999",
            "COMFY_DIR": "/opt/comfy",
            "SAGEATTENTION_ENABLED": "0",
            "JOB_TIMEOUT_S": "12.5",
            "ALLOW_PRIVATE_URLS": "true",
            "DEFAULT_VIDEO": "assets/other.mp4",
            "BUCKET_ENDPOINT_URL": "http://s3.local",
            "BUCKET_ACCESS_KEY_ID": "AKIDEXAMPLE",
            "BUCKET_SECRET_ACCESS_KEY": "very-secret-value",
            "BUCKET_PREFIX": "/out/",
        }
    )
    assert s.comfy_url == "http://127.0.0.1:9999"
    assert str(s.comfy_input_dir) == "/opt/comfy/input"
    assert s.attention_mode == "sdpa"
    assert s.job_timeout_s == 12.5
    assert s.allow_private_urls is True
    assert s.default_video == PACKAGE_ROOT / "assets" / "other.mp4"
    assert s.bucket_configured
    assert s.bucket_prefix == "out"
    assert "very-secret-value" not in repr(s)
    assert "AKIDEXAMPLE" not in repr(s)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("JOB_TIMEOUT_S", "soon"),
        ("MAX_FRAMES", "2"),
        ("ALLOW_PRIVATE_URLS", "maybe"),
        ("DOWNLOAD_RETRIES", "0"),
        ("POSE_RENDER_DEVICE", "tpu"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    assert name in err.value.message


def test_startup_timeout_is_short_in_a_local_run_unless_set() -> None:
    default = Settings.from_env({})
    assert default.startup_timeout_s(local=False) == 900
    assert default.startup_timeout_s(local=True) == 30
    explicit = Settings.from_env({"COMFY_STARTUP_TIMEOUT_S": "120"})
    assert explicit.startup_timeout_s(local=True) == explicit.startup_timeout_s(local=False) == 120


def test_local_output_dir_default_relative_and_off() -> None:
    assert Settings.from_env({}).local_output_dir == PACKAGE_ROOT / "output"
    assert Settings.from_env({"LOCAL_OUTPUT_DIR": "runs"}).local_output_dir == PACKAGE_ROOT / "runs"
    assert Settings.from_env({"LOCAL_OUTPUT_DIR": "/output"}).local_output_dir == Path("/output")
    for off in ("off", "OFF", "none", "0"):
        assert Settings.from_env({"LOCAL_OUTPUT_DIR": off}).local_output_dir is None


def test_every_env_variable_is_documented_and_parsed() -> None:
    # Each documented variable must change the parsed settings when set to a non-default value.
    assert len(ENV_DOC) == len(fields(Settings))
    samples = {
        "COMFY_HOST": "h:1",
        "COMFY_DIR": "/x",
        "COMFY_INPUT_DIR": "/y",
        "COMFY_PID_FILE": "/p",
        "COMFY_STARTUP_TIMEOUT_S": "5",
        "JOB_TIMEOUT_S": "7",
        "MAX_FRAMES": "9",
        "MAX_SECONDS": "30",
        "MAX_CLIP_MEMORY_GB": "8",
        "MAX_IMAGE_BYTES": "11",
        "MAX_VIDEO_BYTES": "13",
        "VOLUME_ROOT": "off",
        "DOWNLOAD_CONNECT_TIMEOUT_S": "3",
        "DOWNLOAD_READ_TIMEOUT_S": "4",
        "DOWNLOAD_RETRIES": "5",
        "ALLOW_PRIVATE_URLS": "1",
        "BUCKET_ENDPOINT_URL": "http://e",
        "BUCKET_ACCESS_KEY_ID": "k",
        "BUCKET_SECRET_ACCESS_KEY": "s",
        "BUCKET_NAME": "b",
        "BUCKET_REGION": "r",
        "BUCKET_PREFIX": "p",
        "PRESIGN_EXPIRY_S": "60",
        "UPLOAD_TIMEOUT_S": "30",
        "COMFY_INTERRUPT_GRACE_S": "5",
        "MAX_BASE64_OUTPUT_BYTES": "100",
        "DEFAULT_VIDEO": "/v.mp4",
        "WORKFLOW_PATH": "/w.json",
        "SAGEATTENTION_ENABLED": "0",
        "POSE_RENDER_DEVICE": "cpu",
        "BASE_PRECISION": "fp16_fast",
        "TORCH_COMPILE": "1",
        "RESIDENT_TRANSFORMER": "0",
        "PROGRESS_INTERVAL_S": "2",
        "LOG_LEVEL": "debug",
        "LOCAL_OUTPUT_DIR": "/o",
    }
    assert set(samples) == set(ENV_DOC)
    base = Settings.from_env({})
    for name, value in samples.items():
        assert Settings.from_env({name: value}) != base, f"{name} is documented but not read"


def test_settings_reference_documents_every_setting_with_its_default() -> None:
    doc = (PACKAGE_ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    for name, (default, _meaning) in ENV_DOC.items():
        shown = f"`{default}`" if default else "(unset)"
        assert f"| `{name}` | {shown} |" in doc, f"docs/settings.md row for {name} is missing"
