"""Progress: throttled, monotonic, documented payload, and nothing in flight after close()."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from xicon_dance import logs
from xicon_dance.progress import ProgressReporter, stage_of


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class P:
    stage: str
    node: str | None = None
    step: int | None = None
    total: int | None = None


def recorder() -> tuple[list[dict[str, Any]], Any]:
    got: list[dict[str, Any]] = []

    def send(job: dict[str, Any], payload: dict[str, Any]) -> None:
        got.append({"job": job["id"], **payload})

    return got, send


def test_throttle_and_payload_shape() -> None:
    clock = FakeClock()
    got, send = recorder()
    rep = ProgressReporter({"id": "j1", "input": {"secret": 1}}, 1.0, sender=send, clock=clock)
    assert rep.update("downloading")
    rep._thread.join()  # type: ignore[union-attr]
    clock.now += 0.5
    assert not rep.update("queued")  # inside the interval
    clock.now += 0.6
    rep.on_comfy(P("WanVideoSamplerv2", "348", 3, 6))
    rep.close()
    assert got[0] == {
        "job": "j1",
        "stage": "downloading",
        "step": None,
        "total": None,
        "percent": 0,
        "message": "downloading the inputs",
    }
    assert got[1]["stage"] == "sampling" and (got[1]["step"], got[1]["total"]) == (3, 6)
    assert got[1]["percent"] == 52
    assert got[1]["message"] == "sampling step 3/6 (WanVideoSamplerv2)"
    assert set(got[1]) == {"job", "stage", "step", "total", "percent", "message"}
    assert len(got) == 2


def test_percent_never_decreases_and_non_sampler_steps_are_hidden() -> None:
    clock = FakeClock()
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.0, sender=send, clock=clock)
    for p in (
        P("WanVideoSamplerv2", "348", 5, 6),
        P("WanVideoModelLoader", "22", 1, 10),
        P("WanVideoDecode", "28", 2, 4),
    ):
        rep.on_comfy(p)
        rep._thread.join()  # type: ignore[union-attr]
        clock.now += 1
    rep.close()
    percents = [g["percent"] for g in got]
    assert percents == sorted(percents) and percents[0] == 77
    assert got[1]["stage"] == "loading" and got[1]["step"] is None and got[1]["total"] is None


def test_close_waits_for_the_update_in_flight_and_stops_later_ones() -> None:
    done = threading.Event()

    def slow(job: dict[str, Any], payload: dict[str, Any]) -> None:
        time.sleep(0.3)
        done.set()

    rep = ProgressReporter({"id": "j"}, 0.0, sender=slow)
    assert rep.update("sampling", 1, 2)
    assert not rep.update("sampling", 2, 2)  # previous still in flight: dropped
    rep.close()
    assert done.is_set()
    assert not rep.update("decoding")
    assert rep.closed


def test_sender_errors_never_escape() -> None:
    def broken(job: dict[str, Any], payload: dict[str, Any]) -> None:
        raise RuntimeError("network down")

    rep = ProgressReporter({"id": "j"}, 0.0, sender=broken)
    assert rep.update("queued")
    rep.close()


def test_sender_thread_logs_carry_the_job_id() -> None:
    """The update runs in a thread of its own; its log lines still name the job."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    handler.addFilter(logs.JobFilter())
    logger = logging.getLogger("xicon_dance.progress")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    def broken(job: dict[str, Any], payload: dict[str, Any]) -> None:
        raise RuntimeError("network down")

    try:
        with logs.job_context("job-42"):
            rep = ProgressReporter({"id": "job-42"}, 0.0, sender=broken)
            assert rep.update("queued")
        rep.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = stream.getvalue().splitlines()
    assert lines and all("[job=job-42]" in line for line in lines), lines


class _Sink(BaseHTTPRequestHandler):
    posts: ClassVar[list[tuple[float, dict[str, Any], dict[str, Any]]]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.2)  # a slow platform: the update takes a while to land
        query = parse_qs(urlsplit(self.path).query)
        type(self).posts.append((time.monotonic(), query, json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


@pytest.fixture
def sink() -> Iterator[str]:
    _Sink.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/job-done?id=$ID"
    server.shutdown()
    server.server_close()


def test_sdk_sender_posts_in_progress_and_close_waits_for_it(
    sink: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runpod.serverless.modules import rp_http

    monkeypatch.setattr(rp_http, "JOB_DONE_URL", sink)
    rep = ProgressReporter({"id": "job-42"}, 1.0)
    assert rep.update("sampling", 2, 6)
    rep.close()
    closed_at = time.monotonic()
    assert len(_Sink.posts) == 1
    landed, query, body = _Sink.posts[0]
    assert landed <= closed_at
    assert query["id"] == ["job-42"] and query["isStream"] == ["false"]
    assert body["status"] == "IN_PROGRESS"
    assert body["output"]["stage"] == "sampling" and body["output"]["step"] == 2


def test_local_mode_sends_nothing_and_logs_at_debug(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without RunPod's job-done URL (--test_input, --rp_serve_api) nothing is posted: the SDK
    would log ERROR "Failed to return job results" for every update."""
    from runpod.serverless.modules import rp_http

    monkeypatch.setattr(rp_http, "JOB_DONE_URL", "JOB_DONE_URL")  # the SDK's local placeholder

    def must_not_post(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a local run posted a progress update")

    monkeypatch.setattr(rp_http, "send_result", must_not_post)
    caplog.set_level(logging.DEBUG)
    rep = ProgressReporter({"id": "local_test"}, 0.0)
    assert rep.update("sampling", 2, 6)
    rep.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("sampling step 2/6" in r.getMessage() for r in caplog.records)
    sdk_log = capsys.readouterr().out  # the SDK's own logger prints to stdout
    assert "Failed to return job results" not in sdk_log and "ERROR" not in sdk_log


@pytest.mark.parametrize(
    ("node_class", "stage"),
    [
        ("WanVideoSamplerv2", "sampling"),
        ("WanVideoDecode", "decoding"),
        ("VHS_VideoCombine", "writing"),
        ("RenderNLFPoses", "pose"),
        ("PoseDetectionVitPoseToDWPose", "pose"),
        ("WanVideoModelLoader", "loading"),
        ("VHS_LoadVideo", "loading"),
        ("WanVideoTextEncodeCached", "conditioning"),
        ("WanVideoAddSCAILPoseEmbeds", "conditioning"),
        ("ImageResizeKJv2", "preparing"),
    ],
)
def test_stage_names(node_class: str, stage: str) -> None:
    assert stage_of(node_class) == stage
