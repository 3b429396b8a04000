"""Local runs save the result video: base64 or URL, never overwriting, never failing the job."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.http_server import HttpServer, Reply
from xicon_dance.local_run import is_local_run, save_result

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8


def result(**video: object) -> dict:
    base = {"filename": "xicon_dance_local_test_1a2b_00001-audio.mp4", "bytes": len(DATA)}
    return {"video": {**base, "frames": 81, "duration_s": 5.06, **video}, "seed": 1}


def test_local_run_is_decided_by_the_job_queue_variable() -> None:
    assert is_local_run(False, {})
    assert is_local_run(True, {"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/x"})
    assert not is_local_run(False, {"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/x"})


async def test_base64_saved_twice_without_overwriting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    b64 = base64.b64encode(DATA).decode()
    first = await save_result(result(base64=b64), tmp_path / "out", "test-1")
    second = await save_result(result(base64=b64), tmp_path / "out", "test-2")
    assert first is not None and second is not None and first != second
    assert first.read_bytes() == second.read_bytes() == DATA
    assert second.name == "xicon_dance_local_test_1a2b_00001-audio-1.mp4"
    assert f"saved the result video: {first} (0.0 MB, 81 frames, 5.1 s)" in caplog.text
    assert not list((tmp_path / "out").glob("*.part"))


async def test_url_result_is_downloaded(tmp_path: Path, http_server: HttpServer) -> None:
    url = http_server.serve("/v.mp4", DATA)
    saved = await save_result(result(url=url), tmp_path / "out", "job-1")
    assert saved is not None and saved.read_bytes() == DATA


async def test_failures_warn_and_return_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    b64 = base64.b64encode(DATA).decode()
    assert await save_result(result(base64=b64), blocker / "out", "j") is None  # under a file
    assert await save_result(result(base64="not base64!"), tmp_path / "o", "j") is None
    assert await save_result(result(base64=b64, bytes=1), tmp_path / "o", "j") is None
    assert await save_result({"error": "x", "code": "input"}, tmp_path / "o", "j") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("was not saved" in w for w in warnings)
    assert "not valid base64" in warnings[1] and "the worker reported 1" in warnings[2]
    assert not list((tmp_path / "o").glob("*"))  # no partial file is left behind


async def test_a_url_result_is_retried_on_503(tmp_path: Path, http_server: HttpServer) -> None:
    """The client's download code: a passing 503 does not lose the local copy."""
    url = http_server.sequence("/v.mp4", [Reply(503), Reply(200, DATA)])
    saved = await save_result(result(url=url), tmp_path / "out", "job-2")
    assert saved is not None and saved.read_bytes() == DATA
    assert http_server.hits("/v.mp4") == 2


SDK_SCRIPT = """
import base64, os
from pathlib import Path

from xicon_dance import sdk
from xicon_dance.local_run import save_result
from xicon_dance.logs import setup_logging

DATA = bytes(range(256)) * 64


async def handler(job):
    video = {"base64": base64.b64encode(DATA).decode(), "bytes": len(DATA), "frames": 9,
             "duration_s": 0.4, "filename": "dance.mp4"}
    result = {"video": video, "seed": 3}
    await save_result(result, Path(os.environ["SAVE_DIR"]), job["id"])
    return result


setup_logging()
sdk.start(handler)
"""


def test_the_summary_is_the_last_line_after_the_sdks_result_echo(tmp_path: Path) -> None:
    """``--test_input``: the RunPod SDK prints the whole result (base64 and all) after the
    handler returns, then exits; the saved-video line must still be the last thing shown."""
    script = tmp_path / "handler.py"
    script.write_text(SDK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(SAVE_DIR=str(tmp_path / "saved"), RUNPOD_LOG_LEVEL="INFO")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script), "--test_input", json.dumps({"input": {}})],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    (saved,) = (tmp_path / "saved").glob("*.mp4")
    assert saved.name == "dance.mp4"
    assert any("Job result: {'output': {'video': {'base64': '" in line for line in lines)
    assert sum("saved the result video" in line for line in lines) == 1
    assert "saved the result video" in lines[-1] and str(saved) in lines[-1], lines[-3:]
    assert "[job=local_test]" in lines[-1] and "9 frames" in lines[-1]
