"""Progress: coalesced, monotonic, documented payload, one connection per job, never blocking the
job, and nothing in flight after close()."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from xicon_dance import logs
from xicon_dance.context_windows import ContextOptions, windows
from xicon_dance.progress import ProgressReporter, log_sender, stage_of

GRAPH = Path(__file__).resolve().parent.parent / "XiCON_Dance_SCAIL_vFinal.json"
KEYS = {"stage", "step", "total", "percent", "windows", "window", "eta_s", "message"}


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
    value: float | None = None


def recorder() -> tuple[list[dict[str, Any]], Any]:
    got: list[dict[str, Any]] = []

    def send(job: dict[str, Any], payload: dict[str, Any]) -> None:
        got.append({"job": job["id"], **payload})

    return got, send


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_coalescing_and_payload_shape() -> None:
    clock = FakeClock()
    got, send = recorder()
    rep = ProgressReporter({"id": "j1", "input": {"secret": 1}}, 1.0, sender=send, clock=clock)
    assert rep.update("downloading")
    clock.now += 0.5
    assert not rep.update("queued")  # inside the interval: waits, and is superseded below
    clock.now += 0.6
    rep.on_comfy(P("WanVideoSamplerv2", "348", 3, 6))
    await rep.close()
    assert got[0] == {
        "job": "j1",
        "stage": "downloading",
        "step": None,
        "total": None,
        "percent": 0,
        "windows": None,
        "window": None,
        "eta_s": None,
        "message": "downloading the inputs",
    }
    assert got[1]["stage"] == "sampling" and (got[1]["step"], got[1]["total"]) == (3, 6)
    assert got[1]["percent"] == 52
    assert got[1]["message"] == "sampling step 3/6 (WanVideoSamplerv2)"
    assert set(got[1]) == {"job", *KEYS}
    assert len(got) == 2


async def test_an_early_update_is_sent_when_due_and_the_latest_wins() -> None:
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.3, sender=send)
    assert rep.update("downloading")
    assert not rep.update("queued")
    assert not rep.update("loading")  # replaces "queued" while it waits
    await wait_until(lambda: len(got) == 2, "the waiting update")
    await rep.close()
    assert [g["stage"] for g in got] == ["downloading", "loading"]


async def test_percent_never_decreases_and_non_sampler_steps_are_hidden() -> None:
    clock = FakeClock()
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.0, sender=send, clock=clock)
    for p in (
        P("WanVideoSamplerv2", "348", 5, 6),
        P("WanVideoModelLoader", "22", 1, 10),
        P("WanVideoDecode", "28", 2, 4),
    ):
        rep.on_comfy(p)
        clock.now += 1
    await rep.close()
    percents = [g["percent"] for g in got]
    assert percents == sorted(percents) and percents[0] == 77
    assert got[1]["stage"] == "loading" and got[1]["step"] is None and got[1]["total"] is None


async def test_one_update_in_flight_and_the_latest_goes_next() -> None:
    release = asyncio.Event()
    got: list[int] = []

    async def slow(job: dict[str, Any], payload: dict[str, Any]) -> None:
        got.append(payload["step"])
        await release.wait()

    rep = ProgressReporter({"id": "j"}, 0.0, sender=slow)
    assert rep.update("sampling", 1, 4)
    for step in (2, 3, 4):
        assert not rep.update("sampling", step, 4)  # the first is still in flight
    await wait_until(lambda: len(got) == 1, "the first update")
    release.set()
    await wait_until(lambda: len(got) == 2, "the latest update")
    await rep.close()
    assert got == [1, 4]


async def test_close_waits_for_the_update_in_flight_and_stops_later_ones() -> None:
    landed = asyncio.Event()

    async def slow(job: dict[str, Any], payload: dict[str, Any]) -> None:
        await asyncio.sleep(0.2)  # a slow platform
        landed.set()

    rep = ProgressReporter({"id": "j"}, 0.0, sender=slow)
    assert rep.update("sampling", 1, 2)
    assert not rep.update("sampling", 2, 2)  # waits: dropped by close
    await rep.close()
    assert landed.is_set()
    assert not rep.update("decoding")
    assert rep.closed
    assert len(rep.sent) == 1


async def test_close_gives_up_on_a_hung_update(caplog: pytest.LogCaptureFixture) -> None:
    cancelled = asyncio.Event()

    async def hung(job: dict[str, Any], payload: dict[str, Any]) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    rep = ProgressReporter({"id": "j"}, 0.0, sender=hung)
    assert rep.update("sampling", 1, 2)
    await asyncio.wait_for(rep.close(timeout_s=0.2), 30)
    assert cancelled.is_set()
    assert any("still in flight" in r.getMessage() for r in caplog.records)


async def test_sender_errors_never_escape() -> None:
    def broken(job: dict[str, Any], payload: dict[str, Any]) -> None:
        raise RuntimeError("network down")

    async def broken_async(job: dict[str, Any], payload: dict[str, Any]) -> None:
        raise RuntimeError("network down")

    for sender in (broken, broken_async):
        rep = ProgressReporter({"id": "j"}, 0.0, sender=sender)
        assert rep.update("queued")
        rep.update("loading")
        await wait_until(lambda rep=rep: len(rep.sent) == 2, "the update after a failed one")
        await rep.close()


async def test_sender_task_logs_carry_the_job_id() -> None:
    """The update is sent in a task of its own; its log lines still name the job."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    handler.addFilter(logs.JobFilter())
    logger = logging.getLogger("xicon_dance.progress")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    async def broken(job: dict[str, Any], payload: dict[str, Any]) -> None:
        raise RuntimeError("network down")

    try:
        with logs.job_context("job-42"):
            rep = ProgressReporter({"id": "job-42"}, 0.0, sender=broken)
            assert rep.update("queued")
        await rep.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = stream.getvalue().splitlines()
    assert any("not delivered" in line for line in lines), lines
    assert all("[job=job-42]" in line for line in lines), lines


# ------------------------------------------------------------------ windows and ETA
def long_graph(frames: int, overlap: int = 48, steps: int = 6) -> dict[str, Any]:
    graph = copy.deepcopy(json.loads(GRAPH.read_text()))
    graph["130"]["inputs"]["frame_load_cap"] = frames
    graph["355"]["inputs"]["context_overlap"] = overlap
    graph["349"]["inputs"]["steps"] = steps
    return graph


async def test_windows_step_and_eta_follow_the_samplers_reports() -> None:
    """The sampler with context windows reports ``step + k / windows`` after each window, then
    ``step + 1``; a window every (fake) second gives an exact ETA from the second report on."""
    clock = FakeClock()
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.0, sender=send, clock=clock)
    steps = 3
    graph = long_graph(961, steps=steps)
    rep.plan(graph, source_frames=2000, source_fps=16.0)  # the graph loads at 16 fps: 961
    options = ContextOptions.from_graph(graph)
    assert options == ContextOptions(81, 4, 48, "uniform_standard")
    per_step = [len(windows(i, 961, options)) for i in range(steps)]
    assert per_step == [26, 27, 26]
    total_windows = sum(per_step)
    done = 0
    for i, count in enumerate(per_step):
        for k in range(1, count + 1):
            clock.now += 1.0
            done += 1
            rep.on_comfy(P("WanVideoSamplerv2", "348", i, steps, i + k * (1.0 / count)))
            payload = got[-1]
            assert (payload["step"], payload["total"]) == (i + 1, steps), payload
            assert (payload["windows"], payload["window"]) == (count, k), payload
            if done == 1:
                assert payload["eta_s"] is None  # one report: nothing timed yet
            else:
                assert payload["eta_s"] == total_windows - done
        rep.on_comfy(P("WanVideoSamplerv2", "348", i + 1, steps, float(i + 1)))  # the callback
        assert (got[-1]["step"], got[-1]["window"]) == (i + 1, count)
    await rep.close()
    assert got[-1]["eta_s"] == 0
    assert got[1]["message"] == (
        "sampling step 1/3, window 2/26, about 1 min 17 s left (WanVideoSamplerv2)"
    )
    percents = [g["percent"] for g in got]
    assert percents == sorted(percents) and percents[-1] == 90


async def test_a_clip_within_one_window_has_one_window_per_step() -> None:
    clock = FakeClock()
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.0, sender=send, clock=clock)
    rep.plan(long_graph(81), source_frames=2000, source_fps=16.0)
    for step in (1, 2, 3):
        clock.now += 2.0
        rep.on_comfy(P("WanVideoSamplerv2", "348", step, 6))
    await rep.close()
    assert [(g["windows"], g["window"]) for g in got] == [(1, None)] * 3
    assert [g["eta_s"] for g in got] == [None, 8, 6]  # 2 s a step, from the second report


async def test_the_samplers_weight_loading_is_no_step() -> None:
    """The sampler node loads the model weights itself (a bar of one report per tensor, under
    the sampler's node id): with a plan, only a bar counting the scheduler's steps is steps."""
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.0, sender=send)
    rep.plan(long_graph(81), source_frames=81, source_fps=16.0)  # the graph: 6 steps
    rep.on_comfy(P("WanVideoSamplerv2", "348", 500, 985))
    rep.on_comfy(P("WanVideoSamplerv2", "348", 1, 6))
    await rep.close()
    assert [(g["stage"], g["step"], g["total"]) for g in got] == [
        ("loading", None, None),
        ("sampling", 1, 6),
    ]
    assert got[0]["message"] == "loading (WanVideoSamplerv2)"


async def test_a_graph_without_a_plan_fails_nothing() -> None:
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.0, sender=send)
    rep.plan({"130": {"class_type": "VHS_LoadVideo", "inputs": ["not", "a", "dict"]}}, 100, 24.0)
    rep.on_comfy(P("WanVideoSamplerv2", "348", 1, 6))
    await rep.close()
    assert (got[0]["step"], got[0]["windows"]) == (1, None)


async def test_without_a_plan_windows_are_unknown() -> None:
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.0, sender=send)
    rep.on_comfy(P("WanVideoSamplerv2", "348", 1, 6, 1.5))
    await rep.close()
    assert (got[0]["step"], got[0]["windows"], got[0]["window"]) == (2, None, None)


async def test_long_clip_through_the_comfy_double(comfy_double, tmp_path: Path) -> None:
    """The ComfyUI client and the reporter against the double's sampler with context windows:
    every window of every step arrives in order, with its step."""
    from tests.comfy_double import media
    from tests.comfy_double.graphs import job_graph
    from xicon_dance.comfy import ComfyClient

    media.make_image(comfy_double.input_dir / "ref.png")
    media.make_video(comfy_double.input_dir / "long.mp4", frames=120, fps=24, audio=False)
    graph = job_graph("ref.png", "long.mp4", frames=121, force_rate=24, steps=2, audio=False)
    got, send = recorder()
    rep = ProgressReporter({"id": "j"}, 0.0, sender=send)
    rep.plan(graph, source_frames=120, source_fps=24.0)
    async with ComfyClient(comfy_double.url, poll_interval_s=0.2) as client:
        await client.run(
            graph,
            prompt_id="00000000-0000-4000-8000-000000000001",
            client_id="c",
            timeout_s=60,
            on_progress=rep.on_comfy,
        )
    await rep.close()
    options = ContextOptions.from_graph(graph)
    expected = []
    for i in range(2):
        count = len(windows(i, 117, options))  # 120 frames -> 4n+1
        expected += [(i + 1, count, k) for k in range(1, count + 1)]
    sampled = [(g["step"], g["windows"], g["window"]) for g in got if g["stage"] == "sampling"]
    sampled = [s for s in sampled if s[0] is not None]
    assert len(expected) >= 4 and expected[0][1] >= 2
    assert [s for i, s in enumerate(sampled) if i == 0 or s != sampled[i - 1]] == expected
    assert any(g["eta_s"] is not None for g in got)


# ------------------------------------------------------------------ the platform (real HTTP)
@dataclass
class Sink:
    """RunPod's job-done endpoint as a real HTTP/1.1 server: records every POST and counts
    connections opened and closed; ``status`` is the answer, ``hold`` delays it."""

    url: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    opened: int = 0
    closed: int = 0
    status: int = 200
    hold: threading.Event | None = None


@pytest.fixture
def sink() -> Iterator[Sink]:
    state = Sink()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as RunPod's endpoint

        def log_message(self, format: str, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            state.opened += 1

        def finish(self) -> None:
            super().finish()
            state.closed += 1

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if state.hold is not None:
                state.hold.wait(30)
            url = urlsplit(self.path)
            state.posts.append(
                {
                    "path": url.path,
                    "query": parse_qs(url.query),
                    "headers": dict(self.headers),
                    "body": json.loads(body),
                    "at": time.monotonic(),
                }
            )
            self.send_response(state.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/job-done/worker-1/$ID?gpu=h200"
    yield state
    if state.hold is not None:
        state.hold.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def platform(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> Sink:
    from runpod.serverless.modules import rp_http

    monkeypatch.setattr(rp_http, "JOB_DONE_URL", sink.url)
    return sink


SDK_HEADERS = ("Content-Type", "charset", "X-Request-ID", "Authorization", "User-Agent")


async def test_updates_are_the_sdks_request(platform: Sink) -> None:
    """The same request as the SDK's own ``progress_update``: URL, query, headers, body."""
    from runpod.serverless import progress_update

    payload = {"stage": "sampling", "step": 2, "total": 6}
    progress_update({"id": "job-42"}, payload)  # the SDK's thread
    await wait_until(lambda: len(platform.posts) == 1, "the SDK's update")
    rep = ProgressReporter({"id": "job-42"}, 1.0)
    assert rep.update("sampling", 2, 6)
    await rep.close()
    assert len(platform.posts) == 2
    sdk, ours = platform.posts
    assert ours["at"] <= time.monotonic()  # landed before close() returned
    assert ours["path"] == sdk["path"] == "/job-done/worker-1/job-42"
    assert ours["query"] == sdk["query"] == {"gpu": ["h200"], "isStream": ["false"]}
    for name in SDK_HEADERS:
        assert ours["headers"].get(name) == sdk["headers"].get(name), name
    assert ours["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert ours["headers"]["X-Request-ID"] == "job-42"
    assert sdk["body"] == {"status": "IN_PROGRESS", "output": payload}
    assert ours["body"]["status"] == "IN_PROGRESS"
    assert ours["body"]["output"]["stage"] == "sampling" and ours["body"]["output"]["step"] == 2


async def test_one_connection_per_job_closed_at_the_end(platform: Sink) -> None:
    rep = ProgressReporter({"id": "job-7"}, 0.0)
    updates = 6
    for n in range(1, updates + 1):
        rep.update("sampling", n, updates)  # sent now, or once the previous one has landed
        await wait_until(lambda n=n: len(platform.posts) == n, f"update {n}")
    assert platform.opened == 1 and platform.closed == 0
    await rep.close()
    await wait_until(lambda: platform.closed == 1, "the connection to be closed")
    assert platform.opened == 1
    assert [p["body"]["output"]["step"] for p in platform.posts] == list(range(1, updates + 1))


async def test_a_hung_platform_does_not_hold_the_job(platform: Sink) -> None:
    """The platform holds the first update: the job's updates return at once (one waits, the
    latest), the event loop keeps running, and close() gives up after its timeout."""
    platform.hold = threading.Event()
    rep = ProgressReporter({"id": "job-8"}, 0.0)
    assert rep.update("sampling", 1, 50)
    await wait_until(lambda: platform.opened == 1, "the first update to reach the platform")
    for step in range(2, 51):
        assert not rep.update("sampling", step, 50)
        await asyncio.sleep(0)
    assert len(rep.sent) == 1  # one in flight; the latest waits for it
    await asyncio.wait_for(rep.close(timeout_s=0.3), 30)
    assert len(rep.sent) == 1  # the waiting one was dropped at close
    platform.hold.set()
    await wait_until(lambda: platform.closed == 1, "the abandoned connection to close")
    assert len(platform.posts) == 1


async def test_a_failing_platform_does_not_fail_the_job(platform: Sink) -> None:
    platform.status = 500
    rep = ProgressReporter({"id": "job-9"}, 0.0)
    assert rep.update("sampling", 1, 2)
    await wait_until(lambda: len(platform.posts) == 1, "the first update")
    await wait_until(lambda: rep._in_flight is not None and rep._in_flight.done(), "its end")
    assert rep.update("sampling", 2, 2)  # the failure left nothing stuck
    await wait_until(lambda: len(platform.posts) == 2, "the second update")
    await rep.close()
    assert [p["body"]["output"]["step"] for p in platform.posts] == [1, 2]


async def test_an_unreachable_platform_does_not_fail_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runpod.serverless.modules import rp_http

    from tests.plugins.comfy import free_port

    monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"http://127.0.0.1:{free_port()}/done/$ID?x=1")
    rep = ProgressReporter({"id": "job-10"}, 0.0)
    assert rep.update("sampling", 1, 2)
    await rep.close()
    assert len(rep.sent) == 1


async def test_local_mode_sends_nothing_and_logs_at_debug(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without RunPod's job-done URL (--test_input, --rp_serve_api) nothing is posted: the SDK
    would log ERROR "Failed to return job results" for every update."""
    from runpod.serverless.modules import rp_http

    monkeypatch.setattr(rp_http, "JOB_DONE_URL", "JOB_DONE_URL")  # the SDK's local placeholder
    caplog.set_level(logging.DEBUG)
    rep = ProgressReporter({"id": "local_test"}, 0.0)
    assert rep._sender is log_sender
    assert rep.update("sampling", 2, 6)
    await rep.close()
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
