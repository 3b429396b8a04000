"""Worker.run against the ComfyUI double (in process): success shape, failures, cleanup."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import av
import pytest

from tests.comfy_double import ComfyDouble
from tests.plugins.media_factory import make_image, make_video
from xicon_dance import jobdir, media, video_probe
from xicon_dance.comfy import ComfyClient
from xicon_dance.job import Worker
from xicon_dance.progress import ProgressReporter
from xicon_dance.settings import PACKAGE_ROOT, Settings
from xicon_dance.workflow import Workflow

GRAPH = PACKAGE_ROOT / "XiCON_Dance_SCAIL_vFinal.json"
PRE_COMFY = ("downloading", "queued")  # progress stages before ComfyUI runs a node of the job


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@dataclasses.dataclass
class Rig:
    worker: Worker
    double: ComfyDouble
    settings: Settings
    sent: list[dict[str, Any]]
    image: Path
    video: Path
    silent: Path

    def job(self, **inp: Any) -> dict[str, Any]:
        base = {
            "image_base64": b64(self.image),
            "video_base64": b64(self.video),
            "width": 256,
            "height": 256,
            "max_frames": 9,
            "steps": 3,
        }
        return {"id": f"job-{uuid.uuid4().hex[:6]}", "input": {**base, **inp}}


def make_settings(root: Path, **over: Any) -> Settings:
    env = {
        "COMFY_DIR": str(root),
        "COMFY_HOST": "127.0.0.1:1",
        "PROGRESS_INTERVAL_S": "0",
        "JOB_TIMEOUT_S": "30",
        "WORKFLOW_PATH": str(GRAPH),
        "ALLOW_PRIVATE_URLS": "true",
    }
    return dataclasses.replace(Settings.from_env(env), **over)


@pytest.fixture
async def rig_factory(
    comfy_double: ComfyDouble, tmp_path: Path
) -> AsyncIterator[Callable[..., Rig]]:
    clients: list[ComfyClient] = []
    media_dir = tmp_path / "media"
    media_dir.mkdir()
    image = make_image(media_dir / "ref.png", 96, 160)
    video = make_video(media_dir / "drive.mp4", 64, 64, 8, 12, audio=True)
    silent = make_video(media_dir / "silent.mp4", 64, 64, 8, 12, audio=False)

    def build(**over: Any) -> Rig:
        settings = make_settings(comfy_double.root, **over)
        comfy = ComfyClient(comfy_double.url, poll_interval_s=0.2, unreachable_grace_s=0.5)
        clients.append(comfy)
        sent: list[dict[str, Any]] = []

        def factory(job: dict[str, Any], interval: float) -> ProgressReporter:
            return ProgressReporter(job, interval, sender=lambda j, p: sent.append(p))

        worker = Worker(
            settings, Workflow.load(settings.workflow_path), comfy, reporter_factory=factory
        )
        return Rig(worker, comfy_double, settings, sent, image, video, silent)

    yield build
    for client in clients:
        await client.close()


@pytest.fixture
def rig(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory()


def leftovers(rig: Rig) -> list[Path]:
    jobs = rig.double.input_dir / "jobs"
    files = [p for p in rig.double.output_dir.rglob("*") if p.is_file()]
    return files + (list(jobs.iterdir()) if jobs.exists() else [])


async def test_success_result_shape_probe_and_cleanup(rig: Rig, tmp_path: Path) -> None:
    result = await rig.worker.run(rig.job(seed=1234))
    assert "error" not in result, result
    assert set(result) == {"video", "clip", "rendered", "seed", "prompt_id", "timings"}
    # the driving clip: 12 frames at 8 fps = 1.5 s = 36 frames at 24 fps; max_frames 9 cut it
    assert result["clip"] == {"duration_s": 1.5, "frames": 36}
    assert result["rendered"] == {"frames": 9, "duration_s": 0.375, "truncated": True}
    video = result["video"]
    assert set(video) == {
        "base64",
        "filename",
        "content_type",
        "bytes",
        "width",
        "height",
        "frames",
        "fps",
        "duration_s",
        "has_audio",
    }
    data = base64.b64decode(video["base64"])
    assert len(data) == video["bytes"] and video["content_type"] == "video/mp4"
    out = tmp_path / "out.mp4"
    out.write_bytes(data)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (256, 256)
    assert (video["width"], video["height"], video["frames"]) == (256, 256, 9)
    assert video["fps"] == 24 and video["has_audio"] is True
    assert result["seed"] == 1234
    assert str(uuid.UUID(result["prompt_id"])) == result["prompt_id"]  # canonical: ComfyUI 0.33
    assert set(result["timings"]) == {
        "download",
        "prepare",
        "queue",
        "inference",
        "upload",
        "total",
    }
    assert result["timings"]["total"] >= result["timings"]["inference"] > 0
    assert leftovers(rig) == []
    stages = [p["stage"] for p in rig.sent]
    assert stages[:2] == ["downloading", "queued"] and "sampling" in stages
    # loader, pose detection and VAE decode send progress frames too: never sampler steps
    assert {"loading", "pose", "decoding"} <= set(stages)
    steps = [(p["step"], p["total"]) for p in rig.sent if p["step"] is not None]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert all(p["stage"] == "sampling" for p in rig.sent if p["step"] is not None)
    percents = [p["percent"] for p in rig.sent]
    assert percents == sorted(percents)
    submitted = rig.double.prompts[result["prompt_id"]][2]
    assert submitted["348"]["inputs"]["seed"] == 1234
    assert submitted["205"]["inputs"]["value"] == 128


async def test_random_seed_is_returned_and_used(rig: Rig) -> None:
    result = await rig.worker.run(rig.job(seed=-1, keep_audio=False))
    assert "error" not in result, result
    seed = result["seed"]
    assert 0 <= seed < 2**32
    submitted = rig.double.prompts[result["prompt_id"]][2]
    assert submitted["348"]["inputs"]["seed"] == seed
    assert "audio" not in submitted["139"]["inputs"]
    assert result["video"]["has_audio"] is False


async def test_silent_driving_video_drops_the_audio_link(rig: Rig) -> None:
    result = await rig.worker.run(rig.job(video_base64=b64(rig.silent), keep_audio=True))
    assert result["video"]["has_audio"] is False
    submitted = rig.double.prompts[result["prompt_id"]][2]
    assert "audio" not in submitted["139"]["inputs"]


async def test_input_error_is_field_named_and_nothing_left(rig: Rig) -> None:
    result = await rig.worker.run(rig.job(steps="6"))
    assert result["code"] == "invalid_input" and result["field"] == "steps"
    assert isinstance(result["error"], str) and "steps" in result["error"]
    bad = await rig.worker.run(rig.job(image_base64=base64.b64encode(b"not an image").decode()))
    assert bad["field"] == "image_base64" and bad["code"] == "invalid_image"
    assert leftovers(rig) == []
    assert (await rig.worker.run({"id": "x"}))["field"] == "input"


async def test_execution_error_and_oom(rig: Rig) -> None:
    rig.double.faults.error_at_node = "348"
    result = await rig.worker.run(rig.job())
    assert result["code"] == "comfyui_execution" and "node 348" in result["error"]
    assert "refresh_worker" not in result
    rig.double.faults.error_at_node = None
    rig.double.faults.oom_at_node = "348"
    result = await rig.worker.run(rig.job())
    assert result["code"] == "out_of_memory" and "Hint" in result["error"]
    rig.double.faults.oom_at_node = None
    assert "error" not in await rig.worker.run(rig.job())
    assert leftovers(rig) == []


async def test_timeout_interrupts_and_answers_timeout(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(job_timeout_s=1.0)
    rig.double.faults.step_delay_s = 0.5
    result = await rig.worker.run(rig.job(steps=20))
    assert result["code"] == "timeout" and "interrupted" in result["error"]
    assert "refresh_worker" not in result  # the prompt stopped: this worker stays
    assert any(route == "interrupt" for route, _ in rig.double.requests)
    assert leftovers(rig) == []


async def test_timeout_with_a_stuck_prompt_replaces_the_worker(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(job_timeout_s=1.0)
    rig.worker.comfy.interrupt_grace_s = 0.5
    rig.double.faults.hang_at_node = "348"
    result = await rig.worker.run(rig.job())
    assert result["code"] == "timeout" and result["refresh_worker"] is True
    assert set(result) == {"error", "code", "field", "refresh_worker"}
    assert "replaced" in result["error"]
    rig.double.faults.hang_at_node = None


async def test_cancel_interrupts_and_reraises(rig: Rig) -> None:
    rig.double.faults.step_delay_s = 0.5
    task = asyncio.create_task(rig.worker.run(rig.job(steps=20)))
    async with asyncio.timeout(60):  # until the worker follows the running prompt: it has
        while not (rig.double.running and any(p["stage"] not in PRE_COMFY for p in rig.sent)):
            assert not task.done(), task.result()  # reported one of the prompt's nodes
            await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert any(route == "interrupt" for route, _ in rig.double.requests)
    assert not (rig.double.input_dir / "jobs").exists() or leftovers(rig) == []


async def test_comfy_death_asks_for_a_new_worker(rig: Rig) -> None:
    rig.double.faults.die_at_node = "348"
    result = await rig.worker.run(rig.job())
    assert result["code"] == "comfyui_unavailable"
    assert result["refresh_worker"] is True


async def test_base64_over_cap_is_a_clear_error(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_base64_output_bytes=1000)
    result = await rig.worker.run(rig.job())
    assert result["code"] == "output_too_large" and "bucket" in result["error"]
    assert leftovers(rig) == []


async def test_unexpected_error_is_internal_and_logged(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(params: Any) -> dict[str, Any]:
        raise RuntimeError("surprise")

    monkeypatch.setattr(rig.worker.workflow, "build", boom)
    result = await rig.worker.run(rig.job())
    assert result["code"] == "internal_error" and "surprise" not in result["error"]
    assert "Traceback" in caplog.text and "surprise" in caplog.text
    assert leftovers(rig) == []


async def test_slow_download_counts_against_the_job_timeout(
    rig_factory: Callable[..., Rig], http_server: Any
) -> None:
    """JOB_TIMEOUT_S bounds the whole job: a server trickling the driving video (each chunk
    within the read timeout) cannot keep the job past it."""
    rig = rig_factory(job_timeout_s=1.5)
    url = http_server.serve_slow("/drive.mp4", rig.video.read_bytes(), chunk_delay_s=0.2)
    started = asyncio.get_running_loop().time()
    job = rig.job(video_url=url)
    del job["input"]["video_base64"]
    result = await rig.worker.run(job)
    elapsed = asyncio.get_running_loop().time() - started
    assert set(result) == {"error", "code", "field"}, result
    assert result["code"] == "timeout" and "downloading" in result["error"]
    assert elapsed < 3.0
    assert rig.double.prompts == {} and leftovers(rig) == []


async def test_comfy_failures_answer_exactly_error_code_field(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """ComfyUI's node_errors / exception details go to the log, not into the failure payload
    (the response is exactly {"error", "code", "field"})."""
    rig.double.faults.node_errors_in_200 = True
    result = await rig.worker.run(rig.job())
    assert set(result) == {"error", "code", "field"}, result
    assert result["code"] == "comfyui_validation" and "node_errors" in caplog.text
    rig.double.faults.node_errors_in_200 = False
    rig.double.faults.error_at_node = "348"
    result = await rig.worker.run(rig.job())
    assert set(result) == {"error", "code", "field"}, result
    assert result["code"] == "comfyui_execution" and "exception_type" in caplog.text
    rig.double.faults.error_at_node = None
    rig.double.faults.prompt_http_status = 500
    result = await rig.worker.run(rig.job())
    assert set(result) == {"error", "code", "field"}, result
    assert "HTTP 500" in result["error"] and "Injected cause" not in result["error"]
    assert "Injected cause: the prompt queue is not accepting prompts" in caplog.text
    rig.double.faults.prompt_http_status = 0
    assert "error" not in await rig.worker.run(rig.job())


async def test_job_fields_and_settings_reach_the_graph(rig_factory: Callable[..., Rig]) -> None:
    """The graph's own defaults (16 fps, sageattn, gpu render) must not survive: fps, frame cap,
    prompts, auto_size from the reference aspect (96x160), attention and render device are
    patched from the job and the settings, and the result reports the probed output."""
    rig = rig_factory(sageattention_enabled=False, pose_render_device="cpu")
    job = rig.job(
        auto_size=True,
        width=256,
        fps=10,
        max_frames=200,
        prompt="a robot does the robot",
        negative_prompt="blurry",
        keep_audio=False,
    )
    del job["input"]["height"]
    result = await rig.worker.run(job)
    assert "error" not in result, result
    graph = rig.double.prompts[result["prompt_id"]][2]
    # the driving video is transcoded to 10 fps and 256x416 first: node 130 loads it as it is
    assert graph["130"]["inputs"]["force_rate"] == 0 and graph["139"]["inputs"]["frame_rate"] == 10
    # 12 frames at 8 fps (1.5 s) -> 15 frames at 10 fps -> 4n+1 = 13 (max_frames 200 cuts nothing)
    assert graph["130"]["inputs"]["frame_load_cap"] == 13
    assert result["rendered"] == {"frames": 13, "duration_s": 1.3, "truncated": False}
    assert [graph[n]["inputs"]["value"] for n in ("203", "204", "205", "206")] == [
        256,
        416,
        128,
        208,
    ]
    assert graph["368"]["inputs"]["positive_prompt"] == "a robot does the robot"
    assert graph["368"]["inputs"]["negative_prompt"] == "blurry"
    assert graph["22"]["inputs"]["attention_mode"] == "sdpa"
    assert graph["362"]["inputs"]["render_device"] == "cpu"
    video = result["video"]
    # the driving clip: 12 frames at 8 fps (1.5 s) -> 15 frames at 10 fps -> 4n+1 = 13
    assert (video["width"], video["height"], video["frames"], video["fps"]) == (256, 416, 13, 10)
    assert video["duration_s"] == pytest.approx(1.3, abs=0.05)


async def test_output_written_after_an_abort_is_removed_later(rig: Rig) -> None:
    """The interrupt is cooperative (protocol §2.6): a job cancelled while VHS_VideoCombine runs
    gets its file written after the job's own cleanup. The next job sweeps it away."""
    rig.double.faults.node_delay_s = 0.1  # per node, before it works: 139 writes 0.1 s later
    task = asyncio.create_task(rig.worker.run(rig.job(keep_audio=False)))
    for _ in range(1000):
        if any(p["stage"] == "writing" for p in rig.sent):
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the double finishes writing, then notices the interrupt
        if rig.double.running is None:
            break
        await asyncio.sleep(0.05)
    assert list(rig.double.output_dir.rglob("*.mp4")), "the late file was not written"
    rig.double.faults.node_delay_s = 0.0
    assert "error" not in await rig.worker.run(rig.job())
    assert leftovers(rig) == []


async def test_failed_submissions_leak_no_websocket(rig: Rig) -> None:
    """Jobs refused at /prompt close the websocket they opened (the server never does); the
    server's count of open sockets is back at its baseline after each one."""
    baseline = rig.double.open_websockets
    rig.double.faults.node_errors_in_200 = True
    for n in range(3):
        result = await rig.worker.run(rig.job())
        assert result["code"] == "comfyui_validation", result
        for _ in range(500):
            if rig.double.open_websockets == baseline:
                break
            await asyncio.sleep(0.01)
        assert rig.double.open_websockets == baseline, f"socket of job {n + 1} left open"
    rig.double.faults.node_errors_in_200 = False
    assert "error" not in await rig.worker.run(rig.job())


async def test_each_job_has_its_own_websocket_client_id(rig: Rig) -> None:
    """A socket closing unregisters whatever socket holds its client id at that moment
    (ComfyUI server.py websocket_handler): jobs never share one."""
    first = await rig.worker.run(rig.job())
    second = await rig.worker.run(rig.job())
    clients = [rig.double.prompts[r["prompt_id"]][3]["client_id"] for r in (first, second)]
    assert clients[0] != clients[1]


async def test_view_stall_fails_the_job_but_keeps_the_worker(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    """ComfyUI's output folder is not on this machine (so the result comes over /view) and the
    transfer stalls past the read timeout: the job fails, ComfyUI still answers, the worker
    stays, and the next job succeeds."""
    rig = rig_factory(comfy_dir=str(tmp_path / "elsewhere"))
    rig.worker.comfy.download_read_timeout_s = 0.3
    rig.double.faults.view_stall_s = 3.0
    result = await rig.worker.run(rig.job())
    assert result["code"] == "comfyui_output_unreadable", result
    assert "refresh_worker" not in result
    rig.double.faults.view_stall_s = 0.0
    ok = await rig.worker.run(rig.job())
    assert "error" not in ok, ok


async def test_history_entries_are_deleted_after_each_job(rig: Rig) -> None:
    """ComfyUI keeps up to 10,000 history entries, each with its graph: the worker deletes its
    own after a success at once, and after a failure or timeout once the prompt has stored it
    (at the latest after the next job)."""
    ok = await rig.worker.run(rig.job())
    assert "error" not in ok and rig.double.history == {}
    assert ("history", {"delete": [ok["prompt_id"]]}) in rig.double.requests
    rig.double.faults.error_at_node = "348"
    failed = await rig.worker.run(rig.job())
    assert failed["code"] == "comfyui_execution"
    rig.double.faults.error_at_node = None
    rig.worker.settings = dataclasses.replace(rig.settings, job_timeout_s=1.0)
    rig.double.faults.step_delay_s = 0.5
    timed_out = await rig.worker.run(rig.job(steps=20))
    assert timed_out["code"] == "timeout"
    rig.double.faults.step_delay_s = 0.0
    rig.worker.settings = rig.settings
    last = await rig.worker.run(rig.job())
    assert "error" not in last and rig.double.history == {}
    assert len(rig.double.prompts) == 4


async def test_output_sweep_runs_off_the_event_loop(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep walks the whole output tree (large on a long-lived worker): in a thread, so
    the event loop (websocket heartbeats, the SDK's job loop) is never blocked by it."""
    loop_thread = threading.get_ident()
    threads: list[int] = []
    sweep = rig.worker._remove_outputs

    def spy(*prefixes: str) -> None:
        threads.append(threading.get_ident())
        sweep(*prefixes)

    monkeypatch.setattr(rig.worker, "_remove_outputs", spy)
    assert "error" not in await rig.worker.run(rig.job())
    assert threads and loop_thread not in threads
    assert leftovers(rig) == []


# ------------------------------------------------------------ the job folder owns its threads


class _Folders:
    """Records each ``JobFolder`` the worker opens (to wait on its ``stop`` event)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[jobdir.JobFolder] = []
        opened = self.opened

        class Recording(jobdir.JobFolder):
            def __init__(self, path: Path) -> None:
                super().__init__(path)
                opened.append(self)

        monkeypatch.setattr(jobdir, "JobFolder", Recording)

    async def stopped(self) -> jobdir.JobFolder:
        """The job's folder, once a fetch was cancelled and told its thread to stop."""
        for _ in range(1000):
            if self.opened and self.opened[-1].stop.is_set():
                return self.opened[-1]
            await asyncio.sleep(0.01)
        raise AssertionError("no fetch of the job was cancelled")


def _job_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(jobdir.THREAD_PREFIX)]


def _block_video_decode(
    monkeypatch: pytest.MonkeyPatch, started: threading.Event, release: threading.Event
) -> None:
    """The driving video's base64 decode blocks in its thread until ``release``, then still
    writes its file: a thread cannot be cancelled, it can only be waited for."""
    real = media.decode_base64_to_file

    def decode(data: str, dest: Path, max_bytes: int, field: str) -> int:
        if field != "video_base64":
            return real(data, dest, max_bytes, field)
        started.set()
        assert release.wait(30), "the test never released the decode"
        dest.write_bytes(b"late bytes")
        return 10

    monkeypatch.setattr(media, "decode_base64_to_file", decode)


async def test_a_failing_input_waits_for_the_other_inputs_thread(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image fails while the video's decode is blocked in its thread: the job does not end
    (nor remove its folder) before that thread has ended; then the folder is removed once and
    no thread of the job is left."""
    folders = _Folders(monkeypatch)
    started, release = threading.Event(), threading.Event()
    _block_video_decode(monkeypatch, started, release)
    bad_image = base64.b64encode(b"not an image").decode()
    task = asyncio.create_task(rig.worker.run(rig.job(image_base64=bad_image)))
    assert await asyncio.to_thread(started.wait, 30)
    folder = await folders.stopped()  # the image failed, the video fetch was cancelled
    assert not task.done() and folder.path.is_dir(), "the job ended before its thread did"
    assert _job_threads(), "the blocked decode runs in a thread of the job's folder"
    release.set()
    result = await task
    assert (result["field"], result["code"]) == ("image_base64", "invalid_image"), result
    assert not folder.path.exists() and leftovers(rig) == []
    assert _job_threads() == []
    assert rig.double.prompts == {}


def _wait_for_stop(monkeypatch: pytest.MonkeyPatch, folders: _Folders) -> threading.Event:
    """The driving video's probe runs until the job's folder says stop (a hostile video that
    keeps a CPU busy); returns an event set once the probe has given up."""
    gave_up = threading.Event()

    def probe(path: Path, field: str, stop: threading.Event) -> Any:
        assert stop is folders.opened[-1].stop
        assert stop.wait(30), "the job never told the probe to stop"
        gave_up.set()
        raise media.ProbeStopped("stopped")

    monkeypatch.setattr(media, "_probe_staged", probe)
    return gave_up


async def test_timeout_stops_and_joins_a_busy_probe(
    rig_factory: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rig_factory(job_timeout_s=1.0)
    folders = _Folders(monkeypatch)
    gave_up = _wait_for_stop(monkeypatch, folders)
    result = await rig.worker.run(rig.job())
    assert result["code"] == "timeout" and "downloading" in result["error"], result
    assert gave_up.is_set() and _job_threads() == []
    assert not folders.opened[-1].path.exists() and leftovers(rig) == []


async def test_platform_cancel_stops_and_joins_a_busy_probe(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real probe of the driving video is held at its first check (standing in for a hostile
    video that keeps it busy) until the job is cancelled: it then gives up at that check, and
    the cancel ends the job only after the probe's thread has."""
    running = threading.Event()
    checks: list[bool] = []
    real_check = video_probe._check_stop

    def check(stop: threading.Event | None) -> None:
        assert stop is not None, "the job's probe runs with the folder's stop event"
        checks.append(stop.is_set())
        if len(checks) == 1:
            running.set()
            assert stop.wait(30), "the cancel never reached the probe"
        real_check(stop)

    monkeypatch.setattr(video_probe, "_check_stop", check)
    task = asyncio.create_task(rig.worker.run(rig.job()))
    assert await asyncio.to_thread(running.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert checks == [False], "the probe went on after the cancel"
    assert _job_threads() == [] and leftovers(rig) == []


async def test_inputs_from_the_network_volume_run_the_job(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    """image_path and video_path (the RunPod way to pass files too large to send) reach the
    graph as copies in the job folder; a path leading out of the volume is refused by name."""
    root = tmp_path / "runpod-volume"
    (root / "inputs").mkdir(parents=True)
    rig = rig_factory(volume_root=root)
    (root / "inputs" / "ref.png").write_bytes(rig.image.read_bytes())
    (root / "inputs" / "drive.mp4").write_bytes(rig.video.read_bytes())
    job = rig.job(image_path="inputs/ref.png", video_path=str(root / "inputs" / "drive.mp4"))
    del job["input"]["image_base64"], job["input"]["video_base64"]
    result = await rig.worker.run(job)
    assert "error" not in result, result
    assert result["video"]["frames"] == 9 and result["video"]["has_audio"] is True
    graph = rig.double.prompts[result["prompt_id"]][2]
    names = [str(n["inputs"].get(k)) for n in graph.values() for k in ("image", "video")]
    assert any(n.endswith("/reference.png") for n in names), names
    assert any(n.endswith("/driving_job.mp4") for n in names), names  # transcoded from it
    assert leftovers(rig) == [] and (root / "inputs" / "ref.png").is_file()
    (root / "escape.png").symlink_to(rig.image)
    bad = rig.job(image_path="escape.png")
    del bad["input"]["image_base64"]
    refused = await rig.worker.run(bad)
    assert (refused["field"], refused["code"]) == ("image_path", "path_forbidden"), refused


async def test_a_clip_over_the_memory_budget_is_refused_before_comfyui(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(max_clip_memory_gb=0.01)  # 10 MB: 9 frames at 256x256 need 28 MB
    before = len(rig.double.prompts)
    result = await rig.worker.run(rig.job())
    assert result["code"] == "clip_too_long" and result["field"] == "max_frames", result
    assert "MAX_CLIP_MEMORY_GB" in result["error"] and "at 256x256" in result["error"]
    assert len(rig.double.prompts) == before and leftovers(rig) == []


async def test_without_max_frames_the_whole_clip_is_rendered(rig: Rig) -> None:
    job = rig.job(fps=8)
    del job["input"]["max_frames"]
    result = await rig.worker.run(job)
    assert "error" not in result, result
    # 12 frames at 8 fps: the whole clip, 4n+1 -> 9 frames
    assert result["clip"] == {"duration_s": 1.5, "frames": 12}
    assert result["rendered"] == {"frames": 9, "duration_s": 1.125, "truncated": False}
    assert result["video"]["frames"] == 9 and result["video"]["has_audio"] is True


async def test_context_overlap_reaches_node_355(rig_factory: Callable[..., Rig]) -> None:
    """The job's context_overlap is written into the context options; without it the
    template's 48 stays."""
    rig = rig_factory()
    plain = await rig.worker.run(rig.job())
    tuned = await rig.worker.run(rig.job(context_overlap=16))
    assert "error" not in plain and "error" not in tuned, (plain, tuned)
    graphs = [rig.double.prompts[r["prompt_id"]][2] for r in (plain, tuned)]
    assert [g["355"]["inputs"]["context_overlap"] for g in graphs] == [48, 16]


async def test_gpu_profile_reaches_the_graph(
    rig_factory: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """Start-up reads the double's /system_stats (a CPU device: bf16, as the shipped graph);
    a GeForce profile puts fp16_fast into node 22, and BASE_PRECISION wins over the GPU."""
    import handler
    from xicon_dance.gpu_profile import GpuInfo, choose

    rig = rig_factory()
    caplog.set_level("INFO")
    await handler.wait_for_comfy(rig.worker, 10)
    assert rig.worker.gpu_profile.base_precision == "bf16"
    assert "GPU profile for cpu: base_precision bf16 (auto" in caplog.text
    geforce = GpuInfo("cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync", "cuda", 32 * 1024**3)
    rig.worker.gpu_profile = choose(geforce, rig.settings)
    result = await rig.worker.run(rig.job())
    assert "error" not in result, result
    assert rig.double.prompts[result["prompt_id"]][2]["22"]["inputs"]["base_precision"] == (
        "fp16_fast"
    )
    pinned = rig_factory(base_precision="bf16")
    pinned.worker.gpu_profile = choose(geforce, pinned.settings)
    result = await pinned.worker.run(pinned.job())
    assert rig.double.prompts[result["prompt_id"]][2]["22"]["inputs"]["base_precision"] == "bf16"
    assert "compile_args" not in rig.double.prompts[result["prompt_id"]][2]["22"]["inputs"]


async def test_torch_compile_reaches_the_graph(rig_factory: Callable[..., Rig]) -> None:
    """TORCH_COMPILE on a CUDA GPU: the job's graph holds the compile settings node, linked to
    the model loader; the double accepts it (WanVideoTorchCompileSettings is in its node
    table, taken from the real stack's /object_info)."""
    from xicon_dance.gpu_profile import GpuInfo, choose
    from xicon_dance.workflow import COMPILE_NODE

    rig = rig_factory(torch_compile=True)
    h200 = GpuInfo("cuda:0 NVIDIA H200 : cudaMallocAsync", "cuda", 140 * 1024**3)
    rig.worker.gpu_profile = choose(h200, rig.settings)
    result = await rig.worker.run(rig.job())
    assert "error" not in result, result
    graph = rig.double.prompts[result["prompt_id"]][2]
    assert graph[COMPILE_NODE]["class_type"] == "WanVideoTorchCompileSettings"
    assert graph["22"]["inputs"]["compile_args"] == [COMPILE_NODE, 0]


async def test_a_resident_transformer_reaches_the_graph(rig_factory: Callable[..., Rig]) -> None:
    """On a CUDA card of 30 GiB or more the job's sampler keeps the transformer (node 348's
    force_offload off) and CLIP vision (node 327's); on the CPU, or with RESIDENT_TRANSFORMER=0,
    both are offloaded."""
    from xicon_dance.gpu_profile import GpuInfo, choose

    rtx = GpuInfo("cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync", "cuda", 32 * 1024**3)
    cpu = GpuInfo("cpu", "cpu", 0)
    for setting, gpu, offload in (("auto", rtx, False), ("auto", cpu, True), ("off", rtx, True)):
        rig = rig_factory(resident_transformer=setting)
        rig.worker.gpu_profile = choose(gpu, rig.settings)
        result = await rig.worker.run(rig.job())
        assert "error" not in result, result
        graph = rig.double.prompts[result["prompt_id"]][2]
        assert graph["348"]["inputs"]["force_offload"] is offload, (setting, gpu)
        assert graph["327"]["inputs"]["force_offload"] is offload, (setting, gpu)
