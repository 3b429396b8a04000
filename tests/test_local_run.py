"""Local runs save the result video: base64 or URL, never overwriting, never failing the job."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from tests.plugins.http_server import HttpServer
from xicon_dance.local_run import is_local_run, save_result

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
    first = await save_result(result(base64=b64), tmp_path / "out", "local_test")
    second = await save_result(result(base64=b64), tmp_path / "out", "local_test")
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
    assert "not valid base64" in warnings[1] and "the result says 1" in warnings[2]
    assert not list((tmp_path / "o").glob("*"))  # no partial file is left behind
