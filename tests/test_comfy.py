"""The async ComfyUI client against the ComfyUI double (tests/comfy_double), one test per fault.

Every test runs the real client over real HTTP and websocket connections to the double.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import av
import pytest

from tests.comfy_double import ComfyDouble, Faults
from tests.comfy_double.graphs import job_graph as make_graph
from tests.plugins.comfy import ComfyMedia
from xicon_dance.comfy import ComfyClient, OutputFile, Progress, RunResult, output_files
from xicon_dance.errors import ComfyError, ComfyUnavailable, JobTimeout


def ids() -> dict[str, str]:
    return {"prompt_id": str(uuid.uuid4()), "client_id": uuid.uuid4().hex}


async def run(client: ComfyClient, graph: dict, timeout_s: float = 20, **kw) -> RunResult:
    return await client.run(graph, timeout_s=timeout_s, **ids(), **kw)


@pytest.fixture
async def client(comfy_double: ComfyDouble):
    async with ComfyClient(comfy_double.url, poll_interval_s=0.2, unreachable_grace_s=1.0) as c:
        yield c


def graph_for(m: ComfyMedia, **kw) -> dict:
    return make_graph(m.image, m.video, **kw)


async def test_success_outputs_progress_and_timings(client, comfy_double, comfy_media, tmp_path):
    seen: list[Progress] = []
    graph = graph_for(comfy_media, steps=3, prefix="ok")
    result = await run(client, graph, on_progress=seen.append)
    files = output_files(result.outputs)
    assert [f.filename for f in files] == ["ok_00001-audio.mp4"]
    assert files[0].node == "139" and files[0].format == "video/h264-mp4"
    dest = await client.download(files[0], tmp_path)
    with av.open(str(dest)) as c:
        v = c.streams.video[0]
        assert (v.width, v.height) == (64, 64)
        assert len(c.streams.audio) == 1
        assert sum(1 for _ in c.decode(v)) == 9
    steps = [(p.step, p.total) for p in seen if p.stage == "WanVideoSamplerv2" and p.step]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    # other nodes report progress too (ComfyUI's hook sends it for any ProgressBar): each is
    # tagged with its own class, never taken for a sampler step
    decode = [(p.step, p.total) for p in seen if p.stage == "WanVideoDecode" and p.step]
    assert decode == [(1, 3), (2, 3), (3, 3)]
    assert {p.stage for p in seen if p.step} == {
        "WanVideoSamplerv2",
        "WanVideoDecode",
        "WanVideoModelLoader",
        "PoseDetectionVitPoseToDWPose",
    }
    assert {p.stage for p in seen if p.step is None} >= {"LoadImage", "VHS_VideoCombine"}
    assert seen[0].stage == graph[seen[0].node]["class_type"]
    assert set(result.node_times) == set(graph)
    assert result.queue_s is not None and result.queue_s >= 0
    assert result.execution_s is not None and result.execution_s > 0
    assert result.prompt_id in comfy_double.history


async def test_vhs_metadata_image_disabled_in_extra_data(client, comfy_double, comfy_media):
    result = await run(client, graph_for(comfy_media))
    extra = comfy_double.history[result.prompt_id]["prompt"][3]
    assert extra["extra_pnginfo"]["workflow"]["extra"]["VHS_MetadataImage"] is False
    assert extra["client_id"]


async def test_socket_dropped_mid_run_still_completes(client, comfy_double, comfy_media):
    comfy_double.faults.drop_socket_at_node = "348"
    comfy_double.faults.node_delay_s = 0.05
    result = await run(client, graph_for(comfy_media, prefix="drop"))
    assert output_files(result.outputs)[0].filename == "drop_00001-audio.mp4"


async def test_silent_socket_completion_from_history(client, comfy_double, comfy_media):
    comfy_double.faults.silent_socket = True
    t0 = time.monotonic()
    result = await run(client, graph_for(comfy_media, prefix="silent"))
    assert output_files(result.outputs)[0].filename == "silent_00001-audio.mp4"
    assert time.monotonic() - t0 < 5
    assert result.execution_s is not None


async def test_timeout_interrupts_our_prompt(client, comfy_double, comfy_media):
    comfy_double.faults.step_delay_s = 0.5
    pid = ids()
    with pytest.raises(JobTimeout) as err:
        await client.run(graph_for(comfy_media, steps=20), timeout_s=1.0, **pid)
    assert "interrupted" in err.value.message
    assert ("interrupt", {"prompt_id": pid["prompt_id"]}) in comfy_double.requests
    assert ("queue", {"delete": [pid["prompt_id"]]}) in comfy_double.requests
    for _ in range(50):  # the double really stops at the next step
        if pid["prompt_id"] in comfy_double.history:
            break
        await asyncio.sleep(0.1)
    status = comfy_double.history[pid["prompt_id"]]["status"]
    assert status["status_str"] == "error"
    assert status["messages"][-1][0] == "execution_interrupted"
    assert not err.value.refresh_worker  # it stopped: this worker stays


async def test_timeout_with_a_prompt_that_never_stops_asks_for_a_new_worker(
    comfy_double, comfy_media
):
    """The interrupt is cooperative: a node that never checks it keeps the prompt running and
    every later prompt queues behind it. After the grace period the timeout asks for a new
    worker."""
    comfy_double.faults.hang_at_node = "348"
    pid = ids()
    async with ComfyClient(comfy_double.url, poll_interval_s=0.1, interrupt_grace_s=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(JobTimeout) as err:
            await c.run(graph_for(comfy_media), timeout_s=1.0, **pid)
    assert 2.0 <= time.monotonic() - t0 < 6
    assert err.value.refresh_worker and err.value.to_response()["refresh_worker"] is True
    assert "did not stop it within 1 s" in err.value.message
    assert comfy_double.running is not None and comfy_double.running[1] == pid["prompt_id"]
    comfy_double.faults.hang_at_node = None  # released: the pending interrupt stops it
    for _ in range(100):
        if pid["prompt_id"] in comfy_double.history:
            break
        await asyncio.sleep(0.05)
    assert comfy_double.history[pid["prompt_id"]]["status"]["messages"][-1][0] == (
        "execution_interrupted"
    )


@pytest.mark.slow
async def test_timeout_while_comfy_is_frozen_asks_for_a_new_worker(comfy_process):
    """ComfyUI frozen mid-run (SIGSTOP: the kernel still accepts connections, nothing answers):
    the abort and the queue check get no answer; the job timeout asks for a new worker."""
    import signal

    double = comfy_process(args=["--step-delay-s", "0.3"])
    seen: list[Progress] = []
    sampling = asyncio.Event()

    def on_progress(p: Progress) -> None:
        seen.append(p)
        if p.stage == "WanVideoSamplerv2":
            sampling.set()

    async with ComfyClient(
        double.url, pid_file=double.pid_file, poll_interval_s=0.2, interrupt_grace_s=1.0
    ) as c:
        task = asyncio.create_task(
            c.run(
                make_graph("ref.png", "drive.mp4", steps=50),
                timeout_s=3.0,
                on_progress=on_progress,
                **ids(),
            )
        )
        await asyncio.wait_for(sampling.wait(), 20)
        os.kill(double.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(JobTimeout) as err:
                await asyncio.wait_for(task, 30)
        finally:
            os.kill(double.proc.pid, signal.SIGCONT)
    assert err.value.refresh_worker


async def wait_running(double, timeout_s: float = 20.0) -> None:
    """Until the double is executing a prompt (poll the condition, never a fixed wait)."""
    deadline = time.monotonic() + timeout_s
    while double.running is None:
        assert time.monotonic() < deadline, "the prompt never started"
        await asyncio.sleep(0.02)


async def wait_idle(double, timeout_s: float = 20.0) -> None:
    """Until the double has nothing running or pending."""
    deadline = time.monotonic() + timeout_s
    while double.running is not None or double.pending:
        assert time.monotonic() < deadline, "the double never became idle"
        await asyncio.sleep(0.02)


async def test_cancellation_interrupts_and_reraises(client, comfy_double, comfy_media):
    comfy_double.faults.step_delay_s = 0.5
    pid = ids()
    task = asyncio.create_task(client.run(graph_for(comfy_media, steps=20), timeout_s=30, **pid))
    await wait_running(comfy_double)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ("interrupt", {"prompt_id": pid["prompt_id"]}) in comfy_double.requests


async def test_pending_prompt_deleted_from_queue_on_timeout(client, comfy_double, comfy_media):
    comfy_double.faults.step_delay_s = 0.3
    first = asyncio.create_task(run(client, graph_for(comfy_media, steps=6, prefix="a")))
    await wait_running(comfy_double)
    pid = ids()
    with pytest.raises(JobTimeout):
        await client.run(graph_for(comfy_media, prefix="b"), timeout_s=0.5, **pid)
    assert pid["prompt_id"] not in [item[1] for item in comfy_double.pending]
    await first
    await wait_idle(comfy_double)
    assert pid["prompt_id"] not in comfy_double.history


async def test_execution_error_readable(client, comfy_double, comfy_media):
    comfy_double.faults.error_at_node = "348"
    with pytest.raises(ComfyError) as err:
        await run(client, graph_for(comfy_media))
    assert err.value.code == "comfyui_execution"
    assert "node 348 (WanVideoSamplerv2): Injected failure" in err.value.message
    assert not err.value.refresh_worker


async def test_execution_error_found_in_history_when_socket_silent(
    client, comfy_double, comfy_media
):
    comfy_double.faults.silent_socket = True
    comfy_double.faults.drop_socket_at_node = "106"
    comfy_double.faults.error_at_node = "139"
    with pytest.raises(ComfyError) as err:
        await run(client, graph_for(comfy_media))
    assert err.value.code == "comfyui_execution"
    assert "node 139 (VHS_VideoCombine)" in err.value.message


async def test_out_of_memory_hint(client, comfy_double, comfy_media):
    comfy_double.faults.oom_at_node = "348"
    with pytest.raises(ComfyError) as err:
        await run(client, graph_for(comfy_media))
    assert err.value.code == "out_of_memory"
    assert "node 348 (WanVideoSamplerv2)" in err.value.message
    assert "smaller width/height" in err.value.message and "block swap" in err.value.message


async def test_corrupt_image_is_execution_error(client, comfy_double, comfy_media):
    (comfy_double.input_dir / "broken.png").write_bytes(b"not an image")
    graph = make_graph("broken.png", comfy_media.video)
    with pytest.raises(ComfyError) as err:
        await run(client, graph)
    assert err.value.code == "comfyui_execution"
    assert "node 106 (LoadImage)" in err.value.message


async def test_validation_error_missing_file_readable(client, comfy_double, comfy_media):
    graph = make_graph("missing.png", comfy_media.video)
    with pytest.raises(ComfyError) as err:
        await run(client, graph)
    assert err.value.code == "comfyui_validation"
    assert (
        "node 106 (LoadImage): Custom validation failed for node: "
        "image - Invalid image file: missing.png" in err.value.message
    )
    assert comfy_double.history == {}


async def test_non_canonical_prompt_id_refused_readably(client, comfy_double, comfy_media):
    """ComfyUI v0.33.0 refuses a prompt_id that is not a canonical UUID (HTTP 400)."""
    with pytest.raises(ComfyError) as err:
        await client.run(
            graph_for(comfy_media), prompt_id=uuid.uuid4().hex, client_id="c", timeout_s=10
        )
    assert err.value.code == "comfyui_validation"
    assert "prompt_id must be a valid UUID" in err.value.message
    assert "canonical lowercase hyphenated" in err.value.message


async def wait_for(condition, what: str, timeout_s: float = 5.0) -> None:
    """Wait until ``condition()`` holds; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_failed_submissions_leave_no_websocket_open(client, comfy_double, comfy_media):
    """The socket opened before /prompt is closed when the submission fails: ComfyUI never
    closes it (server.py websocket_handler), so each failure would leak one on both ends."""
    baseline = comfy_double.open_websockets
    good = graph_for(comfy_media)
    failures = [
        (make_graph("missing.png", comfy_media.video), str(uuid.uuid4())),  # 400 node_errors
        (good, uuid.uuid4().hex),  # 400 invalid_prompt_id
        (good, str(uuid.uuid4())),  # 200 with node_errors (fault below)
    ]
    for n, (graph, prompt_id) in enumerate(failures * 2):
        comfy_double.faults.node_errors_in_200 = n % 3 == 2
        with pytest.raises(ComfyError):
            await client.run(graph, prompt_id=prompt_id, client_id="same", timeout_s=10)
        await wait_for(
            lambda: comfy_double.open_websockets == baseline,
            f"the server to see the socket of failed submission {n + 1} closed",
        )
    comfy_double.faults.node_errors_in_200 = False
    await run(client, good)  # the same client still works; its socket is closed too
    await wait_for(lambda: comfy_double.open_websockets == baseline, "the last socket")


@pytest.mark.parametrize("status", [500, 503])
async def test_unexpected_prompt_status_keeps_the_cause(client, comfy_double, comfy_media, status):
    comfy_double.faults.prompt_http_status = status
    with pytest.raises(ComfyError) as err:
        await run(client, graph_for(comfy_media))
    assert err.value.message == f"ComfyUI refused the prompt with HTTP {status}."
    assert not err.value.refresh_worker
    details = err.value.details
    assert details["http_status"] == status
    assert "Injected cause: the prompt queue is not accepting prompts" in details["body"]
    assert len(details["body"]) < 2100 and details["body"].endswith("more characters]")
    assert "Injected cause" not in json.dumps(err.value.to_response())


async def test_node_errors_in_200_is_failure(client, comfy_double, comfy_media):
    comfy_double.faults.node_errors_in_200 = True
    pid = ids()
    with pytest.raises(ComfyError) as err:
        await client.run(graph_for(comfy_media), timeout_s=10, **pid)
    assert err.value.code == "comfyui_validation"
    assert "Value not in list" in err.value.message
    assert ("queue", {"delete": [pid["prompt_id"]]}) in comfy_double.requests


async def test_refused_prompt_queued_anyway_never_runs(client, comfy_double, comfy_media):
    """A 200 with node_errors still queues the prompt (protocol §2.2). The abort must stop it
    whether it is still pending or has just started: delete from the queue first, then interrupt
    (interrupt first misses a prompt that starts between the two calls)."""
    comfy_double.faults.node_errors_in_200 = True
    comfy_double.faults.node_delay_s = 0.02  # a real graph runs long enough to be interrupted
    pid = ids()
    with pytest.raises(ComfyError):
        await client.run(graph_for(comfy_media, prefix="refused"), timeout_s=10, **pid)
    routes = [route for route, body in comfy_double.requests if route in ("queue", "interrupt")]
    assert routes == ["queue", "interrupt"]
    for _ in range(200):
        if comfy_double.running is None and not comfy_double.pending:
            break
        await asyncio.sleep(0.05)
    entry = comfy_double.history.get(pid["prompt_id"])
    if entry is not None:
        assert [m[0] for m in entry["status"]["messages"]][-1] == "execution_interrupted"
    assert not list(comfy_double.output_dir.glob("refused*"))


async def test_foreign_interrupt_is_reported(client, comfy_double, comfy_media):
    comfy_double.faults.step_delay_s = 0.3
    task = asyncio.create_task(run(client, graph_for(comfy_media, steps=10)))
    await wait_running(comfy_double)
    async with ComfyClient(comfy_double.url) as other:
        await other.interrupt()
    with pytest.raises(ComfyError) as err:
        await task
    assert err.value.code == "comfyui_interrupted"


async def test_death_mid_run_in_process_is_unavailable(client, comfy_double, comfy_media):
    comfy_double.faults.die_at_node = "348"
    with pytest.raises(ComfyUnavailable) as err:
        await run(client, graph_for(comfy_media))
    assert err.value.refresh_worker and err.value.to_response()["refresh_worker"] is True


async def test_unreachable_at_submit_is_unavailable(tmp_path):
    from tests.plugins.comfy import free_port

    async with ComfyClient(f"http://127.0.0.1:{free_port()}", unreachable_grace_s=0) as c:
        with pytest.raises(ComfyUnavailable):
            await run(c, {"1": {"class_type": "X", "inputs": {}}})


async def test_cached_rerun_returns_old_filenames(client, comfy_double, comfy_media):
    graph = graph_for(comfy_media, prefix="cache")
    first = await run(client, graph)
    second = await run(client, graph)
    assert output_files(first.outputs) == output_files(second.outputs)
    assert sorted(p.name for p in comfy_double.output_dir.iterdir()) == [
        "cache_00001-audio.mp4",
        "cache_00001.mp4",
    ]
    await client.free(free_memory=True)
    third = await run(client, graph)
    assert output_files(third.outputs)[0].filename == "cache_00002-audio.mp4"


async def test_progress_callback_errors_and_coroutines_do_not_break(client, comfy_media):
    seen: list[Progress] = []

    async def slow(p: Progress) -> None:
        await asyncio.sleep(5)  # must not delay the run
        seen.append(p)

    t0 = time.monotonic()
    await run(client, graph_for(comfy_media), on_progress=slow)
    assert time.monotonic() - t0 < 4

    def boom(p: Progress) -> None:
        raise RuntimeError("callback bug")

    await run(client, graph_for(comfy_media, prefix="boom"), on_progress=boom)


async def test_download_stall_is_a_job_error_not_a_dead_comfy(comfy_double, tmp_path):
    """A /view transfer that stops for longer than the read timeout fails this job only:
    ComfyUI still answers, so the worker is not replaced; the partial file is removed."""
    (comfy_double.output_dir / "big.mp4").write_bytes(os.urandom(64 * 1024))
    comfy_double.faults.view_stall_s = 3.0
    async with ComfyClient(comfy_double.url, download_read_timeout_s=0.3) as c:
        with pytest.raises(ComfyError) as err:
            await c.download(OutputFile("big.mp4"), tmp_path)
    assert err.value.code == "comfyui_output_unreadable" and not err.value.refresh_worker
    assert "timed out" in err.value.message and "big.mp4" in err.value.message
    assert not (tmp_path / "big.mp4").exists()


async def test_download_from_a_comfy_that_went_away_is_unavailable(comfy_double, tmp_path):
    (comfy_double.output_dir / "big.mp4").write_bytes(os.urandom(64 * 1024))
    comfy_double.faults.view_stall_s = 3.0
    async with ComfyClient(comfy_double.url, download_read_timeout_s=1.0) as c:
        task = asyncio.create_task(c.download(OutputFile("big.mp4"), tmp_path))
        await wait_for((tmp_path / "big.mp4").exists, "the transfer to start")
        await comfy_double.stop()
        with pytest.raises(ComfyUnavailable) as err:
            await task
    assert err.value.refresh_worker and "no longer answers" in err.value.message


async def test_download_missing_file(client, tmp_path):
    with pytest.raises(ComfyError) as err:
        await client.download(OutputFile("nope.mp4"), tmp_path)
    assert err.value.code == "comfyui_output_missing"


def test_output_files_reads_gifs_videos_images():
    outputs = {
        "139": {
            "gifs": [
                {
                    "filename": "a.mp4",
                    "subfolder": "jobs",
                    "type": "output",
                    "format": "video/h264-mp4",
                }
            ]
        },
        "9": {
            "images": [{"filename": "b.png", "subfolder": "", "type": "temp"}],
            "animated": [True],
        },
        "10": {"videos": [{"filename": "c.mp4"}], "text": ["x"]},
        "11": {"audio": [{"filename": "d.flac"}]},
    }
    files = output_files(outputs)
    assert [(f.node, f.filename, f.subfolder, f.type) for f in files] == [
        ("139", "a.mp4", "jobs", "output"),
        ("9", "b.png", "", "temp"),
        ("10", "c.mp4", "", "output"),
    ]


async def test_object_info_and_free(client, comfy_double):
    comfy_double.object_info = {"LoadImage": {"name": "LoadImage", "output_node": False}}
    assert "LoadImage" in await client.object_info()
    assert await client.object_info("NoSuchNode") == {}
    await client.free(unload_models=True, free_memory=False)
    assert ("free", {"unload_models": True, "free_memory": False}) in comfy_double.requests


# --------------------------------------------------------------- wait_ready
async def test_wait_ready_answers(comfy_double):
    async with ComfyClient(comfy_double.url) as c:
        await c.wait_ready(5)


async def test_wait_ready_deadline(tmp_path):
    from tests.plugins.comfy import free_port

    async with ComfyClient(f"http://127.0.0.1:{free_port()}") as c:
        t0 = time.monotonic()
        with pytest.raises(ComfyUnavailable) as err:
            await c.wait_ready(1.0)
    assert 0.9 <= time.monotonic() - t0 < 3
    assert "did not answer" in err.value.message and "within 1 s" in err.value.message


async def test_wait_ready_dead_pid(tmp_path):
    from tests.plugins.comfy import free_port

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    pid_file = tmp_path / "comfy.pid"
    pid_file.write_text(str(proc.pid))
    async with ComfyClient(f"http://127.0.0.1:{free_port()}", pid_file=pid_file) as c:
        t0 = time.monotonic()
        with pytest.raises(ComfyUnavailable) as err:
            await c.wait_ready(30)
    assert time.monotonic() - t0 < 2
    assert "exited during start" in err.value.message


@pytest.mark.slow
async def test_wait_ready_refused_then_up(comfy_process):
    double = comfy_process(args=["--refuse-start-s", "1.5"], wait=False)
    async with ComfyClient(double.url, pid_file=double.pid_file) as c:
        t0 = time.monotonic()
        await c.wait_ready(20)
    assert time.monotonic() - t0 >= 1.0


async def _pid_file_written(pid_file: Path, pid: int, timeout_s: float = 30.0) -> None:
    """Wait until the double has written its PID (the client's liveness check reads it)."""
    deadline = time.monotonic() + timeout_s
    while not (pid_file.is_file() and pid_file.read_text().strip() == str(pid)):
        assert time.monotonic() < deadline, f"{pid_file} not written within {timeout_s} s"
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_wait_ready_process_exits_during_start(comfy_process, tmp_path):
    double = comfy_process(args=["--refuse-start-s", "30"], wait=False)
    async with ComfyClient(double.url, pid_file=double.pid_file) as c:
        task = asyncio.create_task(c.wait_ready(60))
        await _pid_file_written(double.pid_file, double.proc.pid)
        double.proc.kill()
        with pytest.raises(ComfyUnavailable) as err:
            await asyncio.wait_for(task, 5)
    assert "exited during start" in err.value.message


@pytest.mark.slow
async def test_process_death_mid_run_is_unavailable(comfy_process, tmp_path):
    double = comfy_process(args=["--die-at-node", "348"])
    async with ComfyClient(
        double.url, pid_file=double.pid_file, poll_interval_s=0.2, unreachable_grace_s=60
    ) as c:
        t0 = time.monotonic()
        with pytest.raises(ComfyUnavailable) as err:
            await run(c, make_graph("ref.png", "drive.mp4"), timeout_s=30)
    assert time.monotonic() - t0 < 10
    assert "exited" in err.value.message
    assert err.value.to_response()["refresh_worker"] is True
    assert double.proc.wait(5) == 17


@pytest.mark.slow
async def test_process_faults_via_control_route(comfy_process, tmp_path):
    double = comfy_process()
    assert double.set_faults(silent_socket=True, drop_socket_at_node="130")["silent_socket"]
    async with ComfyClient(double.url, pid_file=double.pid_file, poll_interval_s=0.2) as c:
        result = await run(c, make_graph("ref.png", "drive.mp4", prefix="proc"))
        item = output_files(result.outputs)[0]
        dest = await c.download(item, tmp_path / "out.mp4")
    assert dest.stat().st_size > 1000
    assert Path(double.root / "output" / item.filename).is_file()
    # the run closed its socket; the server sees it a moment later
    await wait_for(lambda: double.sockets() == {"open": 0, "registered": []}, "socket closed")


async def test_socket_reconnects_and_keeps_following(client, comfy_double, comfy_media):
    comfy_double.faults.drop_socket_at_node = "106"
    comfy_double.faults.node_delay_s = 0.05
    seen: list[Progress] = []
    result = await run(client, graph_for(comfy_media, steps=4), on_progress=seen.append)
    # the socket was closed at node 106; sampler steps arrive later, so only a new socket saw them
    assert [p.step for p in seen if p.stage == "WanVideoSamplerv2" and p.step] == [1, 2, 3, 4]
    assert output_files(result.outputs)


async def test_wait_ready_waits_through_refused_start(tmp_path):
    double = ComfyDouble(tmp_path / "late", faults=Faults(refuse_start_s=0.6))
    await double.start()
    try:
        async with ComfyClient(double.url, pid_file=None) as c:
            t0 = time.monotonic()
            await c.wait_ready(10)
        assert time.monotonic() - t0 >= 0.5
    finally:
        await double.stop()


async def test_wait_ready_live_pid_still_honours_deadline(tmp_path):
    from tests.plugins.comfy import free_port

    pid_file = tmp_path / "comfy.pid"
    pid_file.write_text(str(os.getpid()))
    async with ComfyClient(f"http://127.0.0.1:{free_port()}", pid_file=pid_file) as c:
        with pytest.raises(ComfyUnavailable) as err:
            await c.wait_ready(0.7)
    assert "did not answer" in err.value.message


async def test_progress_from_a_node_outside_the_graph_is_not_a_sampler_step():
    """A ``progress`` frame whose node is not in the graph (an expanded node id, or none)
    counts for the node now executing; before any node runs it is dropped."""
    from xicon_dance.comfy import _Run

    graph = {"28": {"class_type": "WanVideoDecode"}, "348": {"class_type": "WanVideoSamplerv2"}}
    seen: list[Progress] = []
    state = _Run("p", graph, seen.append)
    state.on_frame("progress", {"prompt_id": "p", "node": "28.0.1", "value": 1, "max": 9})
    assert seen == []
    state.on_frame("executing", {"prompt_id": "p", "node": "28"})
    state.on_frame("progress", {"prompt_id": "p", "node": "28.0.1", "value": 2, "max": 9})
    state.on_frame("progress", {"prompt_id": "p", "node": None, "value": 3, "max": 9})
    state.on_frame("progress", {"prompt_id": "other", "node": "348", "value": 1, "max": 4})
    # what ComfyUI sends a socket that reconnects mid-run: no prompt_id, so not ours to judge;
    # even a node-null frame without our prompt_id is no completion
    assert state.on_frame("executing", {"node": "348"}) is False
    assert state.on_frame("executing", {"node": None}) is False
    assert state.on_frame("executing", {"node": None, "prompt_id": "other"}) is False
    assert seen == [
        Progress("WanVideoDecode", "28"),
        Progress("WanVideoDecode", "28", 2, 9),
        Progress("WanVideoDecode", "28", 3, 9),
    ]
    state.done.cancel()


async def test_a_fraction_of_a_step_keeps_its_value():
    """A sampler with context windows reports ``step + windows done / windows``: ``step`` is the
    value cut to an integer (as before), ``value`` the value as sent."""
    from xicon_dance.comfy import _Run

    graph = {"348": {"class_type": "WanVideoSamplerv2"}}
    seen: list[Progress] = []
    state = _Run("p", graph, seen.append)
    state.on_frame("executing", {"prompt_id": "p", "node": "348"})
    state.on_frame("progress", {"prompt_id": "p", "node": "348", "value": 2 + 3 / 7, "max": 6})
    state.on_frame("progress", {"prompt_id": "p", "node": "348", "value": 3, "max": 6})
    assert [(p.step, p.total, p.value) for p in seen[1:]] == [(2, 6, 2 + 3 / 7), (3, 6, 3.0)]
    state.done.cancel()
