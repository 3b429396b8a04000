"""End to end through the RunPod SDK: ``python handler.py --test_input`` and ``--rp_serve_api``.

Everything is real and out of process: the ComfyUI double (subprocess), the handler (subprocess,
runpod SDK), input URLs from a real HTTP server on 127.0.0.1, results uploaded to a real S3
gateway (SeaweedFS) and downloaded through the presigned URL.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import av
import pytest
import requests

from tests.plugins.comfy import DoubleProcess
from tests.plugins.http_server import HttpServer
from tests.plugins.media_factory import SMALL_JOB, make_image, make_video
from tests.plugins.worker import handler_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_LINE = re.compile(r"Job result: (\{.*\})\s*$", re.MULTILINE)
# On failure the SDK's local mode logs only the error string, then exits 1 (runpod 1.12.0).
ERROR_LINE = re.compile(r"Job local_test failed with error: (.*)$", re.MULTILINE)
# An invalid input is refused at start-up, before the worker waits for ComfyUI (exit 1 too).
INPUT_LINE = re.compile(r"the job input is invalid, nothing was run: (.*) \((\w+)\)$", re.MULTILINE)


def run_test_input(job_input: Any, env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps({"input": job_input})],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    found = RESULT_LINE.search(proc.stdout)
    failed = ERROR_LINE.search(proc.stdout)
    refused = INPUT_LINE.search(proc.stdout + proc.stderr)
    result = ast.literal_eval(found.group(1)) if found else {}
    if failed:
        result = {"error": failed.group(1)}
    elif refused:
        result = {"error": refused.group(1), "code": refused.group(2)}
    return proc.returncode, result, proc.stdout + proc.stderr


@pytest.fixture
def media(tmp_path: Path, http_server: HttpServer) -> dict[str, str]:
    image = make_image(tmp_path / "ref.jpg", 96, 160, "JPEG")
    video = make_video(tmp_path / "drive.mp4", 64, 64, 8, 12, audio=True)
    return {
        "image_url": http_server.serve_file("/ref.jpg", image),
        "video_url": http_server.serve_file("/drive.mp4", video),
        "image_b64": base64.b64encode(image.read_bytes()).decode(),
        "video_b64": base64.b64encode(video.read_bytes()).decode(),
    }


def small(**extra: Any) -> dict[str, Any]:
    return {**SMALL_JOB, **extra}


def test_test_input_mode_url_inputs_and_s3_output(
    comfy_process: Callable[..., DoubleProcess],
    s3_server: Any,
    s3_env: dict[str, str],
    media: dict[str, str],
    tmp_path: Path,
) -> None:
    double = comfy_process()
    env = handler_env(double, tmp_path, **s3_env, RUNPOD_LOG_LEVEL="DEBUG")
    job = small(image_url=media["image_url"], video_url=media["video_url"], output="url")
    code, result, logs = run_test_input(job, env)
    assert code == 0, logs[-3000:]
    video = result["output"]["video"]
    assert (video["width"], video["height"], video["frames"]) == (256, 256, 9)
    assert video["has_audio"] is True and video["content_type"] == "video/mp4"
    # The logged result's URL is masked (X-Amz-Signature=[REDACTED]); read the object it names.
    bucket, key = video["url"].split("?")[0].split("/", 3)[3].split("/", 1)
    got = s3_server.client().get_object(Bucket=bucket, Key=key)
    assert got["ContentType"] == "video/mp4"
    content = got["Body"].read()
    assert len(content) == video["bytes"]
    out = tmp_path / "result.mp4"
    out.write_bytes(content)
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames in (0, 9)
    assert "[job=local_test]" in logs and "Handler output:" in logs  # SDK DEBUG lines ran
    for line in logs.splitlines():  # every line of every component: no key, no signature
        assert s3_env["BUCKET_SECRET_ACCESS_KEY"] not in line
        assert s3_env["BUCKET_ACCESS_KEY_ID"] not in line
        for name in ("X-Amz-Signature=", "X-Amz-Credential="):
            assert line.count(name) == line.count(name + "[REDACTED]"), line
    assert not list((double.root / "output").rglob("*.mp4"))  # outputs removed after delivery
    saved = list((tmp_path / "saved").glob("*.mp4"))  # a local run keeps the video (from the URL)
    assert len(saved) == 1 and saved[0].read_bytes() == content
    assert f"saved the result video: {saved[0]} (" in logs and "9 frames" in logs
    assert [line for line in logs.splitlines() if "ERROR" in line] == []  # a quiet local run


def test_test_input_mode_failures_exit_1(
    comfy_process: Callable[..., DoubleProcess], media: dict[str, str], tmp_path: Path
) -> None:
    double = comfy_process()
    env = handler_env(double, tmp_path)
    code, result, logs = run_test_input(small(image_base64=media["image_b64"], steps=0), env)
    assert code == 1, logs[-2000:]
    assert result["error"].startswith("steps: must be between 1 and 50")
    assert result["code"] == "invalid_input"  # refused before the wait for ComfyUI

    double.set_faults(die_at_node="348")
    code, result, logs = run_test_input(
        small(image_base64=media["image_b64"], video_base64=media["video_b64"]), env
    )
    assert code == 1, logs[-2000:]
    assert "ComfyUI" in result["error"], result
    assert "comfyui_unavailable" in logs  # the worker log names the code


def test_start_up_refuses_bad_workflow_and_missing_comfy(
    comfy_process: Callable[..., DoubleProcess], media: dict[str, str], tmp_path: Path
) -> None:
    double = comfy_process()
    graph = json.loads((REPO_ROOT / "XiCON_Dance_SCAIL_vFinal.json").read_text())
    graph["349"]["class_type"] = "WanVideoScheduler"
    bad = tmp_path / "bad_graph.json"
    bad.write_text(json.dumps(graph))
    env = handler_env(double, tmp_path, WORKFLOW_PATH=str(bad))
    code, _, logs = run_test_input(small(image_base64=media["image_b64"]), env)
    assert code == 2 and "node 349" in logs and "WanVideoSchedulerv2" in logs

    double.stop()
    env = handler_env(double, tmp_path, COMFY_STARTUP_TIMEOUT_S="2")
    started = time.monotonic()
    code, _, logs = run_test_input(small(image_base64=media["image_b64"]), env)
    assert code == 3 and "ComfyUI is not available" in logs
    assert f"Start ComfyUI first (COMFY_HOST={double.host})" in logs  # a local run says what to do
    assert "Traceback" not in logs
    assert time.monotonic() - started < 30


def runsync(url: str, job_input: Any) -> dict[str, Any]:
    resp = requests.post(url + "/runsync", json={"input": job_input}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_rp_serve_api_runsync(serve_api: tuple[str, DoubleProcess], media: dict[str, str]) -> None:
    url, double = serve_api
    good = small(image_url=media["image_url"], video_base64=media["video_b64"], output="base64")
    done = runsync(url, good)
    assert done["status"] == "COMPLETED", done
    data = base64.b64decode(done["output"]["video"]["base64"])
    assert len(data) == done["output"]["video"]["bytes"]
    assert done["output"]["timings"]["total"] > 0

    bad = runsync(url, small(image_base64=media["image_b64"], widht=512))
    assert bad["status"] == "FAILED"
    assert isinstance(bad["error"], str) and "widht" in bad["error"]

    double.set_faults(step_delay_s=0.5)
    slow = runsync(url, small(image_base64=media["image_b64"], steps=20))
    assert slow["status"] == "FAILED" and "interrupted" in slow["error"]
    double.set_faults(step_delay_s=0.0)

    again = runsync(url, good)
    assert again["status"] == "COMPLETED", again


class _ProgressSink(BaseHTTPRequestHandler):
    posts: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_progress_updates_reach_the_platform_in_order(
    comfy_process: Callable[..., DoubleProcess], media: dict[str, str], tmp_path: Path
) -> None:
    _ProgressSink.posts = []
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _ProgressSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        double = comfy_process()
        double.set_faults(step_delay_s=0.15)
        done_url = f"http://127.0.0.1:{sink.server_address[1]}/done?id=$ID"
        env = handler_env(
            double, tmp_path, PROGRESS_INTERVAL_S="0.1", RUNPOD_WEBHOOK_POST_OUTPUT=done_url
        )
        del env["RUNPOD_LOG_LEVEL"]  # the local run's own default applies
        job = small(image_base64=media["image_b64"], video_base64=media["video_b64"], steps=8)
        code, _, logs = run_test_input(job, env)
        assert code == 0, logs[-2000:]
    finally:
        sink.shutdown()
        sink.server_close()
    posts = _ProgressSink.posts
    assert posts and all(p["status"] == "IN_PROGRESS" for p in posts)
    outputs = [p["output"] for p in posts]
    assert outputs[0]["stage"] == "downloading"
    assert all(set(o) == {"stage", "step", "total", "percent", "message"} for o in outputs)
    steps = [o for o in outputs if o["stage"] == "sampling"]
    assert steps and all(o["total"] == 8 and 1 <= o["step"] <= 8 for o in steps)
    percents = [o["percent"] for o in outputs]
    assert percents == sorted(percents) and percents[-1] < 100
    assert "Job local_test completed successfully" in logs  # the base64 result line is truncated
    (saved,) = (tmp_path / "saved").glob("*.mp4")  # the local run saved the base64 video
    (summary,) = [line for line in logs.splitlines() if "saved the result video" in line]
    assert "[job=local_test]" in summary and str(saved) in summary  # one line, not two
    assert "Handler output" not in logs  # the SDK's DEBUG dump of the result is off by default
    with av.open(str(saved)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9


def test_rp_serve_api_success_logs_no_error(
    serve_api: tuple[str, DoubleProcess], media: dict[str, str], tmp_path: Path
) -> None:
    """Progress updates in a local run are not sent (the SDK logged ERROR for each one)."""
    url, double = serve_api
    double.set_faults(step_delay_s=0.05)
    job = small(image_base64=media["image_b64"], video_base64=media["video_b64"], steps=6)
    done = runsync(url, job)
    assert done["status"] == "COMPLETED", done
    (saved,) = (tmp_path / "saved").glob("*.mp4")
    assert saved.stat().st_size == done["output"]["video"]["bytes"]
    logs = (tmp_path / "serve_api.log").read_text()
    assert "saved the result video" in logs
    errors = [line for line in logs.splitlines() if "ERROR" in line or "Traceback" in line]
    assert errors == [], errors


def test_start_up_refuses_an_input_folder_comfyui_does_not_read(
    comfy_process: Callable[..., DoubleProcess], media: dict[str, str], tmp_path: Path
) -> None:
    double = comfy_process()
    elsewhere = tmp_path / "not-comfy" / "input"
    env = handler_env(double, tmp_path, COMFY_INPUT_DIR=str(elsewhere))
    code, _, logs = run_test_input(small(image_base64=media["image_b64"]), env)
    assert code == 2, logs[-3000:]
    assert f"the worker writes inputs to {elsewhere}" in logs
    assert "but ComfyUI reads" in logs and "COMFY_DIR" in logs
    assert "Traceback" not in logs
    assert list(elsewhere.iterdir()) == []  # the probe file is removed again


def test_start_up_refuses_a_comfy_dir_that_does_not_exist_and_creates_nothing(
    tmp_path: Path,
) -> None:
    """The README line without COMFY_DIR ended in /comfyui/input being created (as root)."""
    missing = tmp_path / "no-comfyui"
    env = _no_comfy_env()
    env["COMFY_DIR"] = str(missing)
    code, _, logs = run_test_input({"image_url": "https://example.com/a.png"}, env)
    assert code == 2, logs[-3000:]
    assert f"ComfyUI's folder {missing} (COMFY_DIR) does not exist on this machine" in logs
    assert "its --root" in logs and "waiting up to" not in logs and "Traceback" not in logs
    assert not missing.exists()


def test_help_answers_without_comfyui(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "COMFY_"))}
    env["COMFY_HOST"] = "127.0.0.1:9"  # nothing listens there; --help must not wait for it
    proc = subprocess.run(
        [sys.executable, "handler.py", "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--test_input" in proc.stdout and "--rp_serve_api" in proc.stdout
    assert "waiting" not in proc.stdout + proc.stderr
    # The worker's own part: modes, the settings a local run needs, the exit codes.
    assert "usage: python handler.py" in proc.stdout
    assert "python handler.py --test_input JSON" in proc.stdout
    for name in ("COMFY_HOST=127.0.0.1:8188", "COMFY_DIR=/comfyui", "LOCAL_OUTPUT_DIR=output"):
        assert name in proc.stdout
    exit_codes = proc.stdout.split("exit codes:")[1]
    assert [line.split()[0] for line in exit_codes.strip().splitlines()] == ["0", "1", "2", "3"]


def _no_comfy_env() -> dict[str, str]:
    """A local run's environment with nothing listening at COMFY_HOST and the default start-up
    wait (30 s in a local run): a run that reached the wait would log "waiting up to"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "COMFY_"))}
    env["COMFY_HOST"] = "127.0.0.1:9"
    return env


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ({"input": {}}, "image_url: a reference image is required"),
        ({"input": {"image_url": "https://example.com/a.png", "steps": 0}}, "steps: must be"),
        ({"inputs": {}}, 'the job has no "input"'),
    ],
)
def test_test_input_is_checked_before_waiting_for_comfyui(job: Any, expected: str) -> None:
    proc = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps(job)],
        cwd=REPO_ROOT,
        env=_no_comfy_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 1, logs[-2000:]  # as a failed job
    assert expected in logs and "nothing was run" in logs
    assert "waiting up to" not in logs and "Traceback" not in logs


def test_missing_test_input_json_is_named_before_waiting(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "handler.py")],
        cwd=tmp_path,  # a folder without test_input.json
        env=_no_comfy_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 1, logs[-2000:]
    assert f"{tmp_path / 'test_input.json'} is missing" in logs and "--test_input" in logs
    assert "waiting up to" not in logs and "Traceback" not in logs
