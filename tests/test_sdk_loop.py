"""The worker in the RunPod SDK's production job loop (job-take / job-done), not its local modes.

``handler.py`` runs as a subprocess with the platform's webhook variables pointing at
``FakePlatform``, a real HTTP server on 127.0.0.1 that answers like RunPod's worker API as the
runpod 1.12.0 wheel calls it: ``GET /job-take/<worker>?…`` hands out one queued job (or 204 after a
short hold, as a long-poll does), ``GET /job-stop/<worker>?…`` answers 204, ``POST
/job-done/<worker>/<job>?…`` receives results and progress. Everything else is real: the SDK's
``JobScaler``, the ComfyUI double as a subprocess, SeaweedFS for URL results.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.plugins.comfy import DoubleProcess, stop_process
from tests.plugins.media_factory import SMALL_JOB, make_image, make_video
from tests.plugins.runpod_worker_api import FakePlatform
from tests.plugins.worker import handler_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def job_media(tmp_path: Path) -> dict[str, str]:
    image = make_image(tmp_path / "ref.jpg", 96, 160, "JPEG")
    video = make_video(tmp_path / "drive.mp4", 64, 64, 8, 12, audio=False)
    return {
        "image_base64": base64.b64encode(image.read_bytes()).decode(),
        "video_base64": base64.b64encode(video.read_bytes()).decode(),
    }


def _job(media: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {**SMALL_JOB, **media, **extra}


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-u", "handler.py"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_refresh_worker_result_ends_the_job_loop(
    comfy_process: Callable[..., DoubleProcess],
    platform: FakePlatform,
    job_media: dict[str, str],
    tmp_path: Path,
) -> None:
    """A good job leaves the loop running; a job whose ComfyUI died answers ``stopPod: true``
    and the worker takes no further job and exits (runpod 1.12.0 alone keeps taking jobs)."""
    double = comfy_process()
    env = handler_env(double, tmp_path, **platform.env(), RUNPOD_LOG_LEVEL="DEBUG")
    log_path = tmp_path / "worker.log"
    proc = _start_worker(env, log_path)
    try:
        platform.add("job-good", _job(job_media, output="base64"))
        good = platform.wait_result("job-good", proc)
        assert "error" not in good and "stopPod" not in good, good
        assert base64.b64decode(good["output"]["video"]["base64"])

        double.set_faults(die_at_node="348")
        platform.add("job-dies", _job(job_media))
        platform.add("job-after", _job(job_media))
        dead = platform.wait_result("job-dies", proc)
        answered = time.monotonic()
        assert dead.get("stopPod") is True, dead
        assert "ComfyUI" in dead["error"] and "refresh_worker" not in dead.get("output", {})
        rc = proc.wait(timeout=30)
        exit_s = time.monotonic() - answered
    finally:
        stop_process(proc)
    log = log_path.read_text()
    assert rc == 0, log[-3000:]
    assert platform.taken == ["job-good", "job-dies"], "no job may be taken after the refresh"
    assert [j["id"] for j in platform.queue] == ["job-after"]
    assert "takes no further job" in log
    print(f"worker exited {exit_s:.2f} s after answering the refresh job")


def _secret_fragments(s3_env: dict[str, str]) -> list[str]:
    return [s3_env["BUCKET_SECRET_ACCESS_KEY"], s3_env["BUCKET_ACCESS_KEY_ID"]]


_SIGNED = re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)(?!\[REDACTED\])")


def test_no_secret_or_signed_url_in_any_line_at_debug(
    comfy_process: Callable[..., DoubleProcess],
    platform: FakePlatform,
    job_media: dict[str, str],
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """The SDK at DEBUG prints the handler's whole result ("Handler output", "run_job return");
    no line of the worker's stdout or stderr may show a key or a signature, while the platform
    receives the real, working presigned URL."""
    double = comfy_process()
    env = handler_env(double, tmp_path, **platform.env(), **s3_env, RUNPOD_LOG_LEVEL="DEBUG")
    log_path = tmp_path / "worker.log"
    proc = _start_worker(env, log_path)
    try:
        platform.add("job-url", _job(job_media, output="url"))
        done = platform.wait_result("job-url", proc)
    finally:
        stop_process(proc)
    url = done["output"]["video"]["url"]
    got = requests.get(url, timeout=30)
    assert got.status_code == 200 and len(got.content) == done["output"]["video"]["bytes"]
    log = log_path.read_text()
    assert "Handler output:" in log and "run_job return:" in log, "the SDK's DEBUG lines ran"
    signature = re.search(r"X-Amz-Signature=([0-9a-f]+)", url)
    assert signature is not None
    leaks = [
        line
        for line in log.splitlines()
        if _SIGNED.search(line)
        or signature.group(1) in line
        or any(secret in line for secret in _secret_fragments(s3_env))
    ]
    assert not leaks, "\n".join(leaks[:5])
    assert "X-Amz-Signature=[REDACTED]" in log  # the result line is there, masked
