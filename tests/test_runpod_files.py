"""RunPod Hub and local-run files, checked against RunPod's Hub schema (hub.json, tests.json as
documented for the RunPod Hub) and the job input schema: .runpod/hub.json,
.runpod/tests.json, test_input.json, docker-compose.yml and extra_model_paths.yaml."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from xicon_dance.model_download import VALID_FOLDERS
from xicon_dance.schema import parse_job_input
from xicon_dance.settings import ENV_DOC, Settings

ROOT = Path(__file__).resolve().parent.parent
POOLS = {
    "AMPERE_16", "AMPERE_24", "ADA_24", "ADA_32_PRO", "AMPERE_48", "ADA_48_PRO",
    "AMPERE_80", "ADA_80_PRO", "HOPPER_141", "BLACKWELL_96", "BLACKWELL_180",
}  # fmt: skip
CATEGORIES = {"audio", "embedding", "language", "video", "image"}
# Variables read by entrypoint.sh or the platform rather than by settings.py.
ENTRYPOINT_ENV = {"MODEL_DOWNLOAD_AT_START", "RUNPOD_INIT_TIMEOUT", "WARMUP", "GPU_PREFLIGHT"}
IMAGE_SIZE_GB = 45  # software ~10 GB + baked weights ~31 GB, rounded up (docs/image.md)


def _load(rel: str) -> dict:
    return json.loads((ROOT / rel).read_text())


def _cuda_ok(versions: list[str]) -> None:
    assert versions and all(isinstance(v, str) for v in versions)
    parsed = [tuple(int(x) for x in v.split(".")) for v in versions]
    assert min(parsed) == (12, 8), "12.8 hosts must be allowed (RTX 5090 / Blackwell)"
    assert all(p >= (12, 8) for p in parsed), "torch cu128 needs a CUDA 12.8+ driver"


def _check_env_entry(entry: dict) -> None:
    assert set(entry) in ({"key", "value"}, {"key", "input"}), entry
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", entry["key"])
    assert entry["key"] in ENV_DOC or entry["key"] in ENTRYPOINT_ENV, f"unknown {entry['key']}"
    if "value" in entry:
        assert isinstance(entry["value"], str)
        return
    spec = entry["input"]
    assert {"name", "type", "description"} <= set(spec), spec
    kind = spec["type"]
    assert kind in {"string", "number", "boolean", "huggingface"}, kind
    if kind == "boolean":
        assert isinstance(spec["default"], bool)
        assert {spec["trueValue"], spec["falseValue"]} == {"1", "0"}
    if kind == "number":
        assert spec["min"] <= spec["default"] <= spec["max"]
    if kind == "string":
        assert isinstance(spec["default"], str)
        for option in spec.get("options", []):
            assert set(option) == {"label", "value"}
    if "advanced" in spec:
        assert isinstance(spec["advanced"], bool)


def test_hub_json_schema() -> None:
    hub = _load(".runpod/hub.json")
    assert {"title", "description", "type", "category", "config"} <= set(hub)
    assert hub["type"] == "serverless"
    assert hub["category"] == "video" and hub["category"] in CATEGORIES
    cfg = hub["config"]
    assert cfg["runsOn"] == "GPU"
    assert isinstance(cfg["gpuCount"], int) and cfg["gpuCount"] == 1
    pools = [p.strip() for p in cfg["gpuIds"].split(",")]
    assert all(p in POOLS or p.startswith("-") for p in pools), pools
    assert "ADA_32_PRO" in pools  # RTX 5090; there is no BLACKWELL_24 pool
    _cuda_ok(cfg["allowedCudaVersions"])
    assert isinstance(cfg["containerDiskInGb"], int)
    assert cfg["containerDiskInGb"] >= IMAGE_SIZE_GB + 10, "image plus scratch for job files"
    keys = [e["key"] for e in cfg["env"]]
    assert len(keys) == len(set(keys))
    for entry in cfg["env"]:
        _check_env_entry(entry)
    for needed in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY"):
        assert needed in keys
    assert "JOB_TIMEOUT_S" in keys and "SAGEATTENTION_ENABLED" in keys
    # The Hub's default for the clip length is the worker's own.
    max_seconds = next(e["input"] for e in cfg["env"] if e["key"] == "MAX_SECONDS")
    assert max_seconds["default"] == Settings.from_env({}).max_seconds
    for preset in cfg.get("presets", []):
        assert set(preset) == {"name", "defaults"}
        assert set(preset["defaults"]) <= set(keys)


def test_tests_json_schema() -> None:
    data = _load(".runpod/tests.json")
    assert len(data["tests"]) >= 1
    for test in data["tests"]:
        assert {"name", "input"} <= set(test)
        assert isinstance(test["timeout"], int)
        assert test["timeout"] >= 15 * 60 * 1000, "must cover a cold start (image pull, model load)"
        job = parse_job_input(test["input"], Settings.from_env({}))
        assert job.video_url is None and job.video_base64 is None, "runs on the default video"
    cfg = data["config"]
    assert cfg["gpuTypeId"] == "NVIDIA GeForce RTX 5090"
    assert isinstance(cfg["gpuCount"], int) and cfg["gpuCount"] == 1
    _cuda_ok(cfg["allowedCudaVersions"])
    for entry in cfg.get("env", []):
        assert set(entry) == {"key", "value"} and isinstance(entry["value"], str)


def test_test_input_is_a_valid_job() -> None:
    data = _load("test_input.json")
    assert set(data) == {"input"}
    job = parse_job_input(data["input"], Settings.from_env({}))
    assert job.image_base64 and len(data["input"]["image_base64"]) < 100_000
    assert data["input"] == _load(".runpod/tests.json")["tests"][0]["input"]


def test_docker_compose_local_gpu_run() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = next(iter(compose["services"].values()))
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "8000:8000" in svc["ports"]
    assert svc["environment"]["SERVE_API_LOCALLY"] == "true"
    assert any(v.split(":")[1] == "/runpod-volume" for v in svc["volumes"])
    assert svc["platform"] == "linux/amd64"


def test_local_runs_save_to_a_mounted_folder() -> None:
    """The image's LOCAL_OUTPUT_DIR default (<worker folder>/output, the package lives in /worker)
    is what the README's first command and docker-compose.yml mount."""
    yaml = pytest.importorskip("yaml")
    assert "COPY xicon_dance /worker/xicon_dance" in (ROOT / "Dockerfile").read_text()
    target = "/worker/output"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = next(iter(compose["services"].values()))
    assert f"./output:{target}" in svc["volumes"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_command = next(line for line in readme.splitlines() if "docker run" in line)
    assert f'-v "$PWD/output:{target}"' in first_command


def test_extra_model_paths_cover_every_manifest_folder() -> None:
    yaml = pytest.importorskip("yaml")
    conf = yaml.safe_load((ROOT / "extra_model_paths.yaml").read_text())
    section = conf["runpod_volume"]
    assert section["base_path"] == "/runpod-volume/"
    folders = {m["folder"] for m in _load("model_manifest.json")["models"]}
    assert set(section) >= VALID_FOLDERS and folders <= set(section)
    for key in VALID_FOLDERS:
        for path in str(section[key]).split():
            assert path.startswith("models/"), path
