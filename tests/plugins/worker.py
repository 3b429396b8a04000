"""pytest plugin: the real worker as a subprocess (``handler.py``) in front of the ComfyUI double.

- ``handler_env(double, tmp_path, **extra)``: the environment a handler subprocess needs to use
  the double (host, folders, PID file), a tiny default video, private URLs allowed for the local
  input server, fast progress updates, and ``<tmp_path>/saved`` as the local run's video folder.
- ``serve_api`` fixture: ``python handler.py --rp_serve_api`` (the RunPod SDK's own local server)
  on a free port, with ``JOB_TIMEOUT_S=3``; yields ``(base_url, double)``; its log is
  ``<tmp_path>/serve_api.log``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.plugins.comfy import DoubleProcess, free_port, stop_process
from tests.plugins.media_factory import make_video

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def handler_env(double: DoubleProcess, tmp_path: Path, **extra: str) -> dict[str, str]:
    default_video = make_video(tmp_path / "default.mp4", 64, 64, 8, 9)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_", "COMFY_"))
    }
    env.update(
        {
            "COMFY_HOST": double.host,
            "COMFY_DIR": str(double.root),
            "COMFY_PID_FILE": str(double.pid_file),
            "COMFY_STARTUP_TIMEOUT_S": "20",
            "ALLOW_PRIVATE_URLS": "true",
            "DEFAULT_VIDEO": str(default_video),
            "PROGRESS_INTERVAL_S": "0.2",
            "RUNPOD_LOG_LEVEL": "INFO",
            "LOCAL_OUTPUT_DIR": str(tmp_path / "saved"),
            **extra,
        }
    )
    return env


def _wait_until_serving(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            requests.get(url + "/docs", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError("the handler's local API server did not start within 60 s")


@pytest.fixture
def serve_api(
    comfy_process: Callable[..., DoubleProcess], tmp_path: Path
) -> Iterator[tuple[str, DoubleProcess]]:
    double = comfy_process()
    port = free_port()
    env = handler_env(double, tmp_path, JOB_TIMEOUT_S="3")
    log_path = tmp_path / "serve_api.log"
    cmd = [sys.executable, "handler.py", "--rp_serve_api"]
    cmd += ["--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_serving(proc, url, log_path)
            yield url, double
        finally:
            stop_process(proc)
