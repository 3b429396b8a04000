"""The command-line client against a real local HTTP server that answers like RunPod.

The server (``tests/plugins/fake_runpod.py``) implements ``/run``, ``/status`` and ``/cancel`` as
documented at https://docs.runpod.io/serverless/endpoints/operation-reference and the states of
https://docs.runpod.io/serverless/endpoints/job-states, and the SDK's local ``--rp_serve_api``
server. Jobs follow scripted lifecycles.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.comfy import stop_process
from tests.plugins.fake_runpod import API_KEY, FakeRunpod
from xicon_dance import client
from xicon_dance.client.cli import main
from xicon_dance.client.view import ProgressView

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40
IMAGE = b"\x89PNG\r\n\x1a\n" + b"pixels" * 100


def progress(stage: str, step: int | None, total: int | None, percent: int | None) -> dict:
    state = {"stage": stage, "step": step, "total": total, "percent": percent, "message": None}
    return {"status": "IN_PROGRESS", "output": state}


def completed(video: dict[str, Any], seed: int = 42) -> dict[str, Any]:
    facts = {
        "filename": "out.mp4",
        "content_type": "video/mp4",
        "bytes": len(VIDEO),
        "width": 416,
        "height": 672,
        "frames": 81,
        "fps": 24,
        "duration_s": 3.375,
        "has_audio": True,
    }
    timings = {"download": 0.4, "queue": 0.1, "inference": 51.2, "upload": 0.9, "total": 52.8}
    output = {"video": {**facts, **video}, "seed": seed, "prompt_id": "p-1", "timings": timings}
    return {"status": "COMPLETED", "output": output}


def client_b64() -> str:
    return base64.b64encode(VIDEO).decode()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "ref.png"
    path.write_bytes(IMAGE)
    return path


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)


def cli(fake: FakeRunpod, image: Path, out: Path, *extra: str) -> int:
    args = ["run", "--base-url", fake.url, "--image", str(image), "--out", str(out)]
    return main([*args, "--poll-interval", "0.02", *extra])


def test_success_with_progress_and_base64(fake_runpod, image, tmp_path, capsys):
    b64 = client_b64()
    fake_runpod.queue_job(
        [
            {"status": "IN_QUEUE"},
            progress("preprocess", None, None, 5),
            progress("sampling", 2, 6, 40),
            progress("sampling", 6, 6, 90),
            completed({"base64": b64}),
        ]
    )
    out = tmp_path / "result.mp4"
    code = cli(
        fake_runpod,
        image,
        out,
        "--steps",
        "6",
        "--seed",
        "42",
        "--no-audio",
        "--max-seconds",
        "12.5",
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.read_bytes() == VIDEO
    assert not (tmp_path / "result.mp4.part").exists()
    submitted = fake_runpod.requests[0]
    assert (submitted.method, submitted.path) == ("POST", "/run")
    assert submitted.authorization == API_KEY
    job_input = submitted.body["input"]
    assert base64.b64decode(job_input["image_base64"]) == IMAGE
    assert (job_input["steps"], job_input["seed"], job_input["keep_audio"]) == (6, 42, False)
    assert job_input["max_seconds"] == 12.5
    assert "prompt" not in job_input and "video_url" not in job_input
    # Non-TTY: one line per change, in order, with stage and sampler step.
    lines = captured.err.splitlines()
    assert any("IN_QUEUE" in line for line in lines)
    sampling = [line for line in lines if "sampling" in line]
    assert len(sampling) == 2 and "2/6" in sampling[0] and "40%" in sampling[0]
    assert "6/6" in sampling[1]
    assert "preprocess" in captured.err
    assert "Seed: 42" in captured.out
    assert "inference 51.2 s" in captured.out and "total 52.8 s" in captured.out
    assert "416x672" in captured.out
    assert API_KEY not in captured.out + captured.err


def test_url_output_is_streamed_without_the_api_key(fake_runpod, image, tmp_path, capsys):
    url = fake_runpod.serve_file("out.mp4", VIDEO)
    fake_runpod.queue_job([progress("sampling", 1, 4, 25), completed({"url": url})])
    out = tmp_path / "deep" / "video.mp4"
    video_url = "https://example.com/dance.mp4"
    assert cli(fake_runpod, image, out, "--video", video_url, "--output", "url") == 0
    assert out.read_bytes() == VIDEO
    assert fake_runpod.requests[0].body["input"]["video_url"] == video_url
    assert fake_runpod.requests[0].body["input"]["output"] == "url"
    download = [r for r in fake_runpod.requests if r.path == "/files/out.mp4"]
    assert len(download) == 1 and download[0].authorization is None


def test_failed_job_shows_worker_error_code_and_field(fake_runpod, image, tmp_path, capsys):
    fake_runpod.queue_job(
        [
            {"status": "IN_PROGRESS"},
            {
                "status": "FAILED",
                "error": "width: must be a multiple of 32 (got 500).",
                "output": {"code": "invalid_input", "field": "width"},
            },
        ]
    )
    out = tmp_path / "r.mp4"
    code = cli(fake_runpod, image, out)
    err = capsys.readouterr().err
    assert code == 1
    assert "FAILED" in err and "width: must be a multiple of 32 (got 500)." in err
    assert "code: invalid_input" in err and "field: width" in err
    assert not out.exists()


def test_failed_by_exception_shows_short_message(fake_runpod, image, tmp_path, capsys):
    report = {
        "error_type": "<class 'RuntimeError'>",
        "error_message": "CUDA error: no kernel image is available",
        "error_traceback": "Traceback (most recent call last): ...",
    }
    fake_runpod.queue_job([{"status": "FAILED", "error": json.dumps(report)}])
    assert cli(fake_runpod, image, tmp_path / "r.mp4") == 1
    err = capsys.readouterr().err
    assert "RuntimeError: CUDA error: no kernel image is available" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("state", "expected"),
    [("CANCELLED", "was CANCELLED"), ("TIMED_OUT", "execution timeout")],
)
def test_cancelled_and_timed_out(fake_runpod, image, tmp_path, capsys, state, expected):
    fake_runpod.queue_job([{"status": "IN_QUEUE"}, {"status": state}])
    out = tmp_path / "r.mp4"
    assert cli(fake_runpod, image, out) == 1
    err = capsys.readouterr().err
    assert state in err and expected in err
    assert not out.exists()


def test_429_and_5xx_are_retried(fake_runpod, image, tmp_path):
    fake_runpod.fail_next("/run", 429, retry_after="0")
    fake_runpod.fail_next("/status/", 503, times=2)
    fake_runpod.queue_job([{"status": "IN_QUEUE"}, completed({"base64": client_b64()})])
    assert cli(fake_runpod, image, tmp_path / "r.mp4") == 0
    assert fake_runpod.paths("POST").count("/run") == 2
    assert len(fake_runpod.jobs) == 1  # the refused /run did not create a job


def test_persistent_http_error_names_status_without_the_key(fake_runpod, image, tmp_path, capsys):
    fake_runpod.api_key = "another-key-9876"
    assert cli(fake_runpod, image, tmp_path / "r.mp4") == 3
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "RUNPOD_API_KEY" in err
    assert API_KEY not in err


def test_keyboard_interrupt_cancels_the_job(fake_runpod, image, tmp_path):
    fake_runpod.queue_job([progress("sampling", 1, 6, 10)])

    def interrupt(update: client.JobUpdate) -> None:
        if update.status == "IN_PROGRESS":
            raise KeyboardInterrupt

    job_input = client.build_job_input(str(image))
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(
            client.run_job(
                job_input,
                base_url=fake_runpod.url,
                api_key=API_KEY,
                out=tmp_path / "r.mp4",
                poll_interval=0.02,
                on_update=interrupt,
            )
        )
    cancels = [r for r in fake_runpod.requests if r.path.startswith("/cancel/")]
    assert len(cancels) == 1 and cancels[0].authorization == API_KEY
    assert cancels[0].path == f"/cancel/{next(iter(fake_runpod.jobs))}"


@pytest.mark.slow
def test_ctrl_c_in_the_command_cancels_and_exits_130(fake_runpod, image, tmp_path):
    fake_runpod.queue_job([progress("sampling", 1, 6, 10)])
    cmd = [sys.executable, "-m", "xicon_dance", "run", "--base-url", fake_runpod.url]
    cmd += ["--image", str(image), "--out", str(tmp_path / "r.mp4"), "--poll-interval", "0.05"]
    env = {**os.environ, "RUNPOD_API_KEY": API_KEY}
    # Ctrl-C in a terminal: SIGINT at its default. A test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and so would the client.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        fake_runpod.wait_for(lambda: fake_runpod.paths("GET").count(_status_path(fake_runpod)) >= 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert f"/cancel/{next(iter(fake_runpod.jobs))}" in fake_runpod.paths("POST")
    assert b"cancel sent" in err and b"Traceback" not in err


def _status_path(fake: FakeRunpod) -> str:
    return f"/status/{next(iter(fake.jobs), '')}"


def test_client_timeout_cancels_the_job(fake_runpod, image, tmp_path, capsys):
    fake_runpod.queue_job([{"status": "IN_QUEUE"}])
    assert cli(fake_runpod, image, tmp_path / "r.mp4", "--timeout", "0.3") == 1
    err = capsys.readouterr().err
    assert "Gave up waiting after 0.3 s" in err
    assert any(p.startswith("/cancel/") for p in fake_runpod.paths("POST"))


def test_payload_too_large_is_refused_before_any_request(fake_runpod, image, tmp_path, capsys):
    video = tmp_path / "big.mp4"
    with video.open("wb") as fh:
        fh.truncate(8 * 1000 * 1000)  # 10.7 MB as base64
    code = cli(fake_runpod, image, tmp_path / "r.mp4", "--video", str(video))
    err = capsys.readouterr().err
    assert code == 2
    assert "10 MB" in err and "URL" in err and "video" in err
    assert fake_runpod.requests == []


def test_encode_request_measures_the_exact_body():
    job = {"image_base64": "A" * 1000, "prompt": "ü" * 10}
    body = client.encode_request(job, limit=2000)
    assert json.loads(body) == {"input": job}
    with pytest.raises(client.PayloadTooLarge, match="image"):
        client.encode_request(job, limit=len(body) - 1)


def test_local_runsync_mode(fake_runpod_local, image, tmp_path, capsys):
    fake_runpod_local.queue_job([completed({"base64": client_b64()})])
    out = tmp_path / "r.mp4"
    assert cli(fake_runpod_local, image, out, "--local") == 0
    assert out.read_bytes() == VIDEO
    assert fake_runpod_local.paths() == ["/runsync"]
    assert "Job: test-job-0001-e1" in capsys.readouterr().out


def test_local_server_detected_by_405_on_status(fake_runpod_local, image, tmp_path):
    fake_runpod_local.queue_job([completed({"base64": client_b64()})])
    out = tmp_path / "r.mp4"
    assert cli(fake_runpod_local, image, out) == 0
    assert out.read_bytes() == VIDEO
    job = "test-job-0001-e1"
    assert [(r.method, r.path) for r in fake_runpod_local.requests] == [
        ("POST", "/run"),
        ("GET", f"/status/{job}"),
        ("POST", f"/status/{job}"),
    ]


def test_local_failure_shows_error(fake_runpod_local, image, tmp_path, capsys):
    fake_runpod_local.queue_job([{"status": "FAILED", "error": "image_url: download failed."}])
    assert cli(fake_runpod_local, image, tmp_path / "r.mp4", "--local") == 1
    assert "image_url: download failed." in capsys.readouterr().err


def test_completed_without_output_is_an_error(fake_runpod, image, tmp_path, capsys):
    fake_runpod.queue_job([{"status": "COMPLETED"}])
    assert cli(fake_runpod, image, tmp_path / "r.mp4") == 1
    assert "without a video" in capsys.readouterr().err


def test_video_without_url_or_base64_is_an_error(fake_runpod, image, tmp_path, capsys):
    fake_runpod.queue_job([completed({})])
    assert cli(fake_runpod, image, tmp_path / "r.mp4") == 3
    assert "neither 'url' nor 'base64'" in capsys.readouterr().err
    assert not (tmp_path / "r.mp4").exists()


def test_size_mismatch_is_not_saved(fake_runpod, image, tmp_path, capsys):
    fake_runpod.queue_job([completed({"base64": client_b64(), "bytes": len(VIDEO) + 1})])
    out = tmp_path / "r.mp4"
    assert cli(fake_runpod, image, out) == 3
    assert "not saved" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r.mp4.part").exists()


def test_urls_pass_through_without_reading_files():
    job = client.build_job_input("https://example.com/a.png", "http://example.com/b.mp4", seed=-1)
    assert job == {
        "image_url": "https://example.com/a.png",
        "video_url": "http://example.com/b.mp4",
        "seed": -1,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png", "--base-url", "http://127.0.0.1:9"], "--image"),
        (["--image", "https://x.test/a.png", "--endpoint", "abc"], "RUNPOD_API_KEY"),
        (["--image", "https://x.test/a.png"], "--endpoint"),
        (["--image", "https://x.test/a.png", "--base-url", "ftp://h"], "--base-url"),
        (["--image", "https://x.test/a.png", "--base-url", "http://"], "not a valid URL"),
        (["--image", "https://x.test/a.png", "--base-url", "http://[::1"], "not a valid URL"),
    ],
)
def test_usage_errors_exit_2(monkeypatch, capsys, args, message):
    monkeypatch.delenv("RUNPOD_API_KEY")
    assert main(["run", *args]) == 2
    assert message in capsys.readouterr().err


def test_default_base_url_uses_the_endpoint():
    assert client.default_base_url("abc123") == "https://api.runpod.ai/v2/abc123"


def test_tty_view_redraws_one_line():
    stream = io.StringIO()
    view = ProgressView(stream, tty=True)
    p = client.Progress("sampling", 3, 6, None)
    view(client.JobUpdate("j1", "IN_PROGRESS", p, 65.0))
    view(client.JobUpdate("j1", "IN_PROGRESS", p, 66.0))
    view.close()
    text = stream.getvalue()
    assert text.count("\r\x1b[K") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "[01:06]" in text and "sampling 3/6" in text and " 50%" in text


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("sampling step 3/6", "sampling 3/6\n"),
        ("waiting for the GPU", "sampling 3/6 - waiting for the GPU\n"),
        (None, "sampling 3/6\n"),
    ],
)
def test_line_view_shows_stage_step_and_new_information(message, shown):
    stream = io.StringIO()
    view = ProgressView(stream, tty=False)
    update = client.JobUpdate("j1", "IN_PROGRESS", client.Progress("sampling", 3, 6, 55, message))
    view(update)
    view(update)  # unchanged: no second line
    assert stream.getvalue().endswith("]  55% " + shown)
    assert stream.getvalue().count("\n") == 1 and "[#############" in stream.getvalue()


def test_progress_payload_parsing():
    assert client.Progress.from_payload({"stage": "decode", "percent": 95.0}).percent == 95
    assert client.Progress.from_payload({"step": 1}) is None
    assert client.Progress.from_payload("working") is None
    odd = client.Progress.from_payload({"stage": "x", "step": True, "total": "6", "message": 3})
    assert (odd.step, odd.total, odd.message, odd.fraction) == (None, None, None, None)


SDK_HANDLER = """
import base64
import runpod


def handler(job):
    inp = job["input"]
    if inp.get("seed") == 13:
        return {"error": "seed: unlucky.", "code": "invalid_input", "field": "seed"}
    data = base64.b64decode(inp["image_base64"])
    video = {"base64": base64.b64encode(data).decode(), "bytes": len(data)}
    return {"video": video, "seed": inp.get("seed"), "timings": {"total": 0.1}}


runpod.serverless.start({"handler": handler})
"""


@pytest.fixture
def sdk_server(tmp_path: Path) -> Iterator[str]:
    """The RunPod SDK's own ``--rp_serve_api`` server with a tiny echo handler."""
    script = tmp_path / "handler.py"
    script.write_text(SDK_HANDLER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, str(script), "--rp_serve_api", "--rp_api_host", "127.0.0.1"]
    cmd += ["--rp_api_port", str(port), "--rp_log_level", "ERROR"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_WEBHOOK")}
    log = (tmp_path / "sdk.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "sdk.log").read_text()[-2000:])
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        log.close()


@pytest.mark.slow
def test_against_the_sdk_local_server(sdk_server, image, tmp_path, capsys):
    base = ["run", "--base-url", sdk_server, "--image", str(image), "--poll-interval", "0.05"]
    assert main([*base, "--out", str(tmp_path / "a.mp4"), "--local", "--seed", "7"]) == 0
    assert (tmp_path / "a.mp4").read_bytes() == IMAGE
    assert "Seed: 7" in capsys.readouterr().out
    # Without --local: /run stores the job, GET /status is 405, POST /status runs it.
    assert main([*base, "--out", str(tmp_path / "b.mp4")]) == 0
    assert (tmp_path / "b.mp4").read_bytes() == IMAGE
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "c.mp4"), "--local", "--seed", "13"]) == 1
    assert "FAILED: seed: unlucky." in capsys.readouterr().err


# --------------------------------------------------------------------------- a newcomer's errors


@pytest.mark.parametrize("case", ["folder", "under_a_file", "unwritable"])
def test_bad_out_is_refused_before_anything_is_sent(fake_runpod, image, tmp_path, capsys, case):
    if case == "folder":
        out = tmp_path / "videos"
        out.mkdir()
        expected = "is a folder"
    elif case == "under_a_file":
        (tmp_path / "notes.txt").write_text("x")
        out = tmp_path / "notes.txt" / "sub" / "a.mp4"
        expected = "which is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write into any folder")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "a.mp4"
        expected = "is not writable"
    assert cli(fake_runpod, image, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: --out:") and expected in err and "Traceback" not in err
    assert fake_runpod.requests == []


def test_out_is_tried_for_real_before_anything_is_sent(fake_runpod, image, tmp_path, capsys):
    """``/proc/x.mp4`` passes permission checks as root but cannot be created: exit 2 up front."""
    assert cli(fake_runpod, image, Path("/proc/xicon-dance-test.mp4")) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: --out:") and "/proc/xicon-dance-test.mp4" in err
    assert fake_runpod.requests == []
    assert not Path("/proc/xicon-dance-test.mp4").exists()


def test_check_out_leaves_nothing_behind(tmp_path):
    """The trial creates the file and its missing folders, then removes them again; an existing
    file is opened for appending, never truncated."""
    out = tmp_path / "a" / "b" / "video.mp4"
    assert client.check_out(out) == out
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "old.mp4"
    existing.write_bytes(b"keep me")
    assert client.check_out(existing) == existing and existing.read_bytes() == b"keep me"


def test_connection_retries_are_shown_as_they_happen(fake_runpod, image, tmp_path, capsys):
    fake_runpod.fail_next("/run", 429, times=2)  # rate limited: nothing was accepted
    fake_runpod.fail_next("/status/", 503)
    fake_runpod.queue_job([{"status": "IN_QUEUE"}, completed({"base64": client_b64()})])
    assert cli(fake_runpod, image, tmp_path / "a.mp4") == 0
    err = capsys.readouterr().err
    assert "HTTP 429; retry 1 of 5 in" in err and "HTTP 429; retry 2 of 5 in" in err
    assert "HTTP 503; retry 1 of 5 in" in err
    assert fake_runpod.paths("POST").count("/run") == 3 and len(fake_runpod.jobs) == 1


async def test_an_unreachable_endpoint_reports_each_retry(tmp_path):
    """A name that does not resolve: the request was never sent, so even /run is retried."""
    base_url = "http://xicon-dance-test.invalid:8000"
    seen: list[tuple[float, str]] = []
    started = time.monotonic()

    def on_update(update: client.JobUpdate) -> None:
        if update.status == client.RETRYING:
            seen.append((time.monotonic() - started, update.detail or ""))

    with pytest.raises(client.ApiError) as err:
        await client.run_job(
            {"image_url": "https://x/a.png"}, base_url=base_url, on_update=on_update, retries=3
        )
    assert [d.split(";")[1].strip()[:10] for _, d in seen] == ["retry 1 of", "retry 2 of"]
    assert all(f"cannot reach {base_url}" in d for _, d in seen)
    assert seen[0][0] < seen[1][0]  # the first failure is shown at once, not after all retries
    assert "cannot reach" in err.value.message


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_local_server_that_is_not_running_gets_one_line(image, tmp_path, capsys, host):
    """No retries to watch for 15 s: one line naming host:port and how to start the local API."""
    port = _closed_port()
    base = ["run", "--base-url", f"http://{host}:{port}", "--image", str(image)]
    assert main([*base, "--out", str(tmp_path / "a.mp4"), "--local"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"Nothing answers at {host}:{port}" in err
    assert "python handler.py --rp_serve_api" in err
    assert "retry" not in err and "ClientConnectorError" not in err


class _AcceptsThenFails(BaseHTTPRequestHandler):
    """Reads the whole POST (the job is submitted), then: no answer, HTTP 500 or a hang-up."""

    mode = "hang"
    posts = 0
    release = threading.Event()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).posts += 1
        if self.mode == "hang":  # the answer never comes while the client waits
            self.release.wait(30)
            return
        if self.mode == "drop":
            self.close_connection = True
            return
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.mark.parametrize("mode", ["hang", "500", "drop"])
async def test_a_submit_that_may_have_been_accepted_is_not_retried(mode):
    """A read timeout, a 5xx or a dropped connection after POST /run was sent: RunPod may have
    accepted the job, so a retry could run a second paid job. One request, then a message that
    says how to find the job."""
    handler = type("Handler", (_AcceptsThenFails,), {"mode": mode, "release": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen: list[str] = []
    try:
        with pytest.raises(client.ApiError) as err:
            await client.run_job(
                {"image_url": "https://x/a.png"},
                base_url=f"http://127.0.0.1:{server.server_address[1]}",
                on_update=lambda u: seen.append(u.status),
                retries=4,
                api_timeout_s=0.5,
            )
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()
    assert handler.posts == 1
    assert client.RETRYING not in seen
    message = err.value.message
    assert message.startswith("POST /run")
    assert "may have accepted the job" in message and "second paid job" in message
    assert "/status/" in message and "RunPod console" in message
    if mode == "500":
        assert "HTTP 500" in message and err.value.status == 500


class _HtmlErrors(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        page = (
            "<!DOCTYPE html><html><head><title>404 Not Found</title><style>body{}</style>"
            "</head><body>" + "<p>nothing here</p>" * 500 + "</body></html>"
        ).encode()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)


def test_html_error_page_is_reduced_to_status_and_title(image, tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HtmlErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        args = ["run", "--base-url", url, "--image", str(image), "--out", str(tmp_path / "a.mp4")]
        assert main(args) == 3
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "POST /run failed with HTTP 404: 404 Not Found." in err
    assert "<" not in err and "nothing here" not in err and len(err) < 400


async def test_a_finished_video_is_never_lost(fake_runpod, tmp_path, monkeypatch):
    """The --out folder vanished (here: became a file) while the job ran: saved elsewhere."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "gone").write_text("now a file")
    fake_runpod.queue_job([completed({"base64": client_b64()})])
    result = await client.run_job(
        {"image_url": "https://x/a.png"},
        base_url=fake_runpod.url,
        api_key=API_KEY,
        out=tmp_path / "gone" / "a.mp4",
        poll_interval=0.02,
    )
    assert result.video_path is not None and result.video_path.parent == cwd
    assert result.video_path.name == f"xicon-dance-{result.job_id}.mp4"
    assert result.video_path.read_bytes() == VIDEO
    assert result.note and str(tmp_path / "gone" / "a.mp4") in result.note
    assert str(result.video_path) in result.note


def test_the_client_imports_without_the_worker_dependencies():
    """`pip install '.[client]'` brings aiohttp only; the command must work with just that."""
    blocked = ["runpod", "boto3", "botocore", "av", "PIL", "pydantic", "numpy"]
    code = (
        "import sys\n"
        f"class Block:\n"
        f"    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        f"            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from xicon_dance.client.cli import main\n"
        "sys.exit(main(['run', '--help']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--image" in proc.stdout
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    base = {req.split("==")[0].lower() for req in project["project"]["dependencies"]}
    assert base.isdisjoint({"runpod", "boto3", "botocore", "av", "pillow", "pydantic"})
    assert "client" in project["project"]["optional-dependencies"]


@pytest.mark.parametrize(
    ("payload", "shown"),
    [
        (
            {"stage": "sampling", "step": 3, "steps": 6, "windows": 27, "eta_s": 250.4},
            "sampling 3/6 · 27 windows · ETA 4m10s",
        ),
        (
            {"stage": "sampling", "step": 3, "steps": 6, "window": 5, "windows": 27, "eta_s": 42},
            "sampling 3/6 · window 5/27 · ETA 42s",
        ),
        ({"stage": "decoding", "percent": 93, "eta_s": 3725.0}, "decoding · ETA 1h02m"),
        ({"stage": "sampling", "step": 2, "total": 6, "percent": 40}, "sampling 2/6"),
    ],
)
def test_progress_shows_windows_and_eta_when_the_worker_sends_them(payload, shown):
    progress = client.Progress.from_payload(payload)
    line = ProgressView.render(client.JobUpdate("j1", "IN_PROGRESS", progress, 65.0))
    assert line.endswith(f"% {shown}"), line


def test_progress_message_restating_the_new_keys_is_not_repeated():
    payload = {
        "stage": "sampling",
        "step": 3,
        "steps": 6,
        "window": 5,
        "windows": 27,
        "eta_s": 250,
        "percent": 50,
        "message": "sampling step 3/6, window 5/27, ETA 250 s",
    }
    line = ProgressView.render(
        client.JobUpdate("j1", "IN_PROGRESS", client.Progress.from_payload(payload), 1.0)
    )
    assert line.endswith("sampling 3/6 · window 5/27 · ETA 4m10s"), line


def test_new_progress_keys_reach_the_command_line(fake_runpod, image, tmp_path, capsys):
    sampling = {"stage": "sampling", "step": 2, "steps": 6, "windows": 27, "eta_s": 130.0}
    fake_runpod.queue_job(
        [
            {"status": "IN_PROGRESS", "output": {**sampling, "percent": 40}},
            completed({"base64": client_b64()}),
        ]
    )
    assert cli(fake_runpod, image, tmp_path / "r.mp4") == 0
    assert "sampling 2/6 · 27 windows · ETA 2m10s" in capsys.readouterr().err
