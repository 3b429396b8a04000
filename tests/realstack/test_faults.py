"""Fault matrix: how one job ends when ComfyUI, the connection, the disk, S3, the platform or the
worker's own process fails, how long that takes, whether the next job succeeds, and what is left.

Against the REAL ComfyUI v0.33.0 (the project's ``entrypoint.sh``, CPU flags, see conftest.py),
with the worker in the RunPod SDK's production job loop: ``FakePlatform`` (tests/plugins) answers
the worker API the way runpod 1.12.0 calls it (``job-take``, ``job-stop``, ``job-done``), so a job's
answer carries its ``code`` and ``stopPod``, and a platform cancel is the SDK's own stop channel.

Workers (ComfyUI start-up dominates the cost, so destructive faults come last on each):
- ``fault_worker`` (module): platform mode, its own SeaweedFS. First the ``baseline`` fixture's
  good job (uploaded to S3): what the handler holds after it is what the leak checks compare
  with. Then, in order: websocket reset mid-run, platform cancel mid-run, output folder full, S3
  down before the upload, then SIGTERM to the worker mid-job (the worker ends).
- ``local_worker`` (module): the SDK's local API, ``JOB_TIMEOUT_S`` short. ComfyUI frozen with
  SIGSTOP mid-job (timeout, the worker asks to be replaced), SIGCONT, then ComfyUI SIGKILLed
  mid-job (the worker ends).

Elsewhere, not repeated here: a node raising (a corrupt model file) is
``test_real_stack.py::test_corrupt_model_fails_clearly_then_the_next_job_succeeds``; S3 dying in
the middle of a (multipart) upload needs an upload long enough to be hit, which a CPU job's tiny
video is not: ``tests/test_delivery.py`` kills the real SeaweedFS mid-upload. ``/history``
answering HTTP 500 runs on the ComfyUI double (the real server cannot be made to answer 500
there) at the end of this module.

A capability a fault needs (``ss -K``, mounting a tmpfs as root) skips its test where it is
missing, and fails it under ``XICON_REQUIRE_REALSTACK=1`` (CI). Every wait polls a condition with
a deadline; each fault's figures are printed (``-s``) and listed with its outcome in the terminal
summary (conftest.py), so CI's log says which fault cases ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.comfy_double import ComfyDouble
from tests.plugins.media_factory import job_input as small_job_input
from tests.plugins.media_factory import make_image, make_video
from tests.plugins.process_facts import (
    Usage,
    alive,
    drained_usage,
    leftovers,
    own_sockets,
    platform_port,
    thread_growth,
    usage,
    wait_until,
)
from tests.plugins.realstack import (
    JOB_S,
    ROOT,
    EntrypointWorker,
    Stack,
    cpu_job,
    fault_base,
    start_worker,
    stop_worker,
)
from tests.plugins.runpod_worker_api import serve_platform
from tests.plugins.s3 import S3Server, start_server, stop_server
from xicon_dance.comfy import ComfyClient
from xicon_dance.job import Worker
from xicon_dance.progress import ProgressReporter
from xicon_dance.settings import Settings
from xicon_dance.workflow import Workflow

REQUIRED = os.environ.get("XICON_REQUIRE_REALSTACK") == "1"


def need(available: bool, reason: str) -> None:
    """Skip without a capability of the machine (``ss -K``, a tmpfs mount); under
    ``XICON_REQUIRE_REALSTACK=1`` (CI) fail instead: a fault case must not vanish from CI."""
    if available:
        return
    if REQUIRED:
        pytest.fail(f"{reason} (XICON_REQUIRE_REALSTACK=1: CI must provide it)")
    pytest.skip(reason)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str, str, float, str, list[str]], None]:
    """Prints one fault's figures and keeps them on the test's report: the terminal summary
    lists every fault case with them (tests/realstack/conftest.py)."""

    def emit(fault: str, outcome: str, seconds: float, next_job: str, left: list[str]) -> None:
        line = f"{fault} | {outcome} | {seconds:.1f} s | next: {next_job} | left: {left}"
        print(f"\nFAULT | {line}")
        request.node.user_properties.append(("fault", line))

    return emit


def ss_kill_supported() -> bool:
    """Whether ``ss -K`` can reset a TCP connection here (INET_DIAG_DESTROY, CAP_NET_ADMIN)."""
    if shutil.which("ss") is None:
        return False
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            peer, _ = server.accept()
            with peer:
                subprocess.run(
                    ["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port)],
                    capture_output=True,
                    check=False,
                )
                try:
                    client.send(b"x")
                    client.recv(1)
                except OSError:
                    return True
    return False


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3_for_faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, Any]]:
    server, proc = start_server(tmp_path_factory.mktemp("faults-s3"))
    server.client().create_bucket(Bucket="faults")
    try:
        yield server, proc
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def fault_worker(
    stack: Stack,
    realstack_base: Path,
    tmp_path_factory: pytest.TempPathFactory,
    s3_for_faults: tuple[S3Server, Any],
) -> Iterator[EntrypointWorker]:
    s3, _proc = s3_for_faults
    base = fault_base(stack, realstack_base, tmp_path_factory.mktemp("faults") / "comfy")
    with serve_platform("fault-worker") as platform:
        worker = start_worker(
            stack,
            base,
            **platform.env(),
            BUCKET_ENDPOINT_URL=s3.endpoint,
            BUCKET_ACCESS_KEY_ID=s3.access_key,
            BUCKET_SECRET_ACCESS_KEY=s3.secret_key,
            BUCKET_NAME="faults",
            UPLOAD_TIMEOUT_S="30",
        )
        worker.platform = platform
        try:
            yield worker
        finally:
            stop_worker(worker)


@dataclass(frozen=True)
class Baseline:
    """The handler after one good job (uploaded to S3, so the pools it uses have started):
    what it holds once drained, its Python threads, and the presigned URL it answered."""

    usage: Usage
    threads: dict[str, int]
    url: str


@pytest.fixture(scope="module")
def baseline(fault_worker: EntrypointWorker, realstack_media: tuple[Path, Path]) -> Baseline:
    """One good job before any fault: it must complete, and it fixes what the handler may hold
    afterwards (every fault test that checks for leaks compares with it)."""
    worker = fault_worker
    assert worker.platform is not None
    worker.platform.add("baseline", cpu_job(realstack_media, output="url"))
    done = worker.wait_result("baseline")
    assert "error" not in done, done
    url = done["output"]["video"]["url"]
    assert "X-Amz-Signature=" in url, url
    assert leftovers(worker.base) == []
    found = Baseline(drained_usage(worker.handler_pid, worker.comfy_port), worker.threads(), url)
    assert found.usage.comfy_connections == 0, "a websocket stayed open"
    print(f"\nbaseline after one good job: {found.usage} {found.threads}")
    return found


def assert_nothing_grew(worker: EntrypointWorker, baseline: Baseline) -> None:
    """The handler holds no more fds, sockets (the platform's long polls aside) or threads than
    after the baseline job (asyncio's default executor may have started more of its bounded
    pool: ``thread_growth``), and no connection to ComfyUI."""
    assert worker.platform is not None
    after, threads = drained_usage(worker.handler_pid, worker.comfy_port), worker.threads()
    before = baseline.usage
    print(f"baseline {before} {baseline.threads}")
    print(f"now      {after} {threads}")
    assert after.comfy_connections == 0, "a websocket stayed open"
    port = platform_port(worker.platform)
    assert after.fds == before.fds, (before, after)
    assert own_sockets(after, port) <= own_sockets(before, port), (before, after)
    assert thread_growth(baseline.threads, threads) == []
    native = (
        before.threads - sum(baseline.threads.values()),
        after.threads - sum(threads.values()),
    )
    assert native[1] <= native[0], f"native threads grew: {native}"


# ----------------------------------------------------------------------------- platform worker
def test_websocket_reset_mid_run_still_completes(
    fault_worker: EntrypointWorker,
    realstack_media: tuple[Path, Path],
    baseline: Baseline,
    report: Callable[..., None],
) -> None:
    """Real: every TCP connection of the handler to ComfyUI (the websocket among them) is reset
    with ``ss -K`` while the prompt runs; the client reconnects, the job completes, and the
    handler holds nothing more than after the baseline job."""
    need(ss_kill_supported(), "ss -K cannot reset TCP connections here (needs INET_DIAG_DESTROY)")
    worker, handler = fault_worker, fault_worker.handler_pid
    assert worker.platform is not None
    worker.platform.add("ws-reset", cpu_job(realstack_media))
    worker.wait_running()
    wait_until(
        "the handler holds a connection to ComfyUI",
        lambda: usage(handler, worker.comfy_port).comfy_connections,
        30,
    )
    started = time.monotonic()
    killed = subprocess.run(
        ["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(worker.comfy_port)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(worker.comfy_port) in killed.stdout, killed.stdout
    done = worker.wait_result("ws-reset")
    elapsed = time.monotonic() - started
    assert "error" not in done, done
    assert done["output"]["video"]["frames"] == 5, done["output"]["video"]
    wait_until(
        "the reconnect is logged",
        lambda: "websocket dropped during prompt" in worker.log_text(),
        30,
    )
    left = leftovers(worker.base)
    assert left == [], left
    assert_nothing_grew(worker, baseline)
    report("websocket reset mid-run", "COMPLETED", elapsed, "(this job)", left)


def test_platform_cancel_interrupts_comfyui(
    fault_worker: EntrypointWorker,
    realstack_media: tuple[Path, Path],
    baseline: Baseline,
    report: Callable[..., None],
) -> None:
    """Real: the platform's stop channel (``job-stop``) names the running job; the SDK cancels
    the handler's task, the worker deletes and interrupts the prompt, ComfyUI goes idle, the job
    folder is removed and no answer is posted (the platform has marked the job cancelled)."""
    worker = fault_worker
    assert worker.platform is not None
    worker.platform.add("cancelled", cpu_job(realstack_media))
    worker.wait_running()
    started = time.monotonic()
    worker.platform.stop("cancelled")
    wait_until("ComfyUI idle after the cancel", lambda: not worker.comfy_busy(), 300)
    idle_s = time.monotonic() - started
    wait_until("the job folder is removed", lambda: not leftovers(worker.base), 30)
    assert "cancelled" not in worker.platform.results
    wait_until(
        "the worker logs the cancel and the interrupt",
        lambda: all(s in worker.log_text() for s in ("job cancelled after", "interrupted prompt")),
        30,
    )
    report("platform cancel mid-run", "no answer; ComfyUI idle", idle_s, "see next", [])


def test_output_folder_full_fails_at_the_writer_then_recovers(
    fault_worker: EntrypointWorker,
    realstack_media: tuple[Path, Path],
    baseline: Baseline,
    report: Callable[..., None],
) -> None:
    """Real: ComfyUI's output folder is a full tmpfs (a 256 KiB mount filled up; chmod cannot
    stop root). VideoHelperSuite's writer fails; the job answers ``comfyui_execution`` naming
    node 139 (the decode and the encode merged into it by ``xicon_decode_frames``), and the
    worker keeps serving."""
    output = fault_worker.base / "output"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    need(mounted.returncode == 0, f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        _fill(output / "filler.bin")
        worker = fault_worker
        assert worker.platform is not None
        started = time.monotonic()
        worker.platform.add("disk-full", cpu_job(realstack_media))
        failed = worker.wait_result("disk-full")
        elapsed = time.monotonic() - started
        left = [p.name for p in output.iterdir() if p.name != "filler.bin"]
    finally:
        subprocess.run(["umount", "-l", str(output)], check=False)
    assert failed["output"]["code"] == "comfyui_execution", failed
    assert "node 139 (XiconWanDecodeVideoCombine)" in failed["error"], failed
    assert "An error occurred in the ffmpeg subprocess" in failed["error"], failed
    assert "stopPod" not in failed
    assert left == [], left
    report("output folder full", "FAILED comfyui_execution", elapsed, "see next", left)


def _fill(path: Path) -> None:
    with path.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)


def test_s3_down_before_upload_fails_clearly_then_recovers(
    fault_worker: EntrypointWorker,
    realstack_media: tuple[Path, Path],
    s3_for_faults: tuple[S3Server, Any],
    baseline: Baseline,
    report: Callable[..., None],
) -> None:
    """Real: SeaweedFS is killed before the job; inference runs, the upload fails with
    ``upload_failed`` in bounded time, the result file is swept, and after the faults so far the
    handler holds nothing more than after the baseline job (``assert_nothing_grew``); the log
    shows no key and no unmasked signature."""
    _server, proc = s3_for_faults
    stop_server(proc)
    worker = fault_worker
    assert worker.platform is not None
    started = time.monotonic()
    worker.platform.add("s3-down", cpu_job(realstack_media, output="url"))
    failed = worker.wait_result("s3-down")
    elapsed = time.monotonic() - started
    assert failed["output"]["code"] == "upload_failed", failed
    assert "not reachable" in failed["error"], failed
    assert "stopPod" not in failed
    left = leftovers(worker.base)
    assert left == [], left
    assert_nothing_grew(worker, baseline)
    assert secrets_in_log(worker, s3_for_faults[0], baseline) == []
    report("S3 down before upload", "FAILED upload_failed", elapsed, "see next", left)


def test_sigterm_mid_job_finishes_the_job_then_stops_everything(
    fault_worker: EntrypointWorker,
    realstack_media: tuple[Path, Path],
    report: Callable[..., None],
) -> None:
    """Real: the platform's SIGTERM reaches PID 1 (entrypoint.sh) while ComfyUI runs a job. The
    SDK finishes the job it holds and posts it (so this is also the next job after the faults
    above), ends its loop, and the supervisor stops ComfyUI: no process is left."""
    worker = fault_worker
    assert worker.platform is not None
    handler, comfy = worker.handler_pid, worker.comfy_pid
    worker.platform.add("sigterm", cpu_job(realstack_media))
    worker.wait_running()
    started = time.monotonic()
    worker.shell.send_signal(signal.SIGTERM)
    done = worker.wait_result("sigterm")
    answered = time.monotonic() - started
    assert "error" not in done, done
    rc = worker.shell.wait(timeout=120)
    exited = time.monotonic() - started
    assert rc == 0, worker.log_tail()
    assert not alive(handler) and not alive(comfy), "a process outlived the worker"
    left = leftovers(worker.base)
    assert left == [], left
    report("SIGTERM to the worker mid-job", "COMPLETED, exit 0", answered, "worker ends", left)
    print(f"worker and ComfyUI gone {exited:.1f} s after SIGTERM")


def secrets_in_log(worker: EntrypointWorker, s3: S3Server, baseline: Baseline) -> list[str]:
    """Lines of the worker's log (the worker, the SDK and ComfyUI: the entrypoint shows
    ComfyUI's output) with a bucket key, the baseline job's presigned URL or an unmasked
    signature. The log must show the baseline's upload, or there was nothing to leak."""
    lines = worker.log_text().splitlines()
    assert any("uploaded" in line and "s3://faults/" in line for line in lines), "no upload"
    signature = re.search(r"X-Amz-Signature=([0-9a-f]+)", baseline.url)
    assert signature, baseline.url
    return [
        line
        for line in lines
        if s3.secret_key in line
        or s3.access_key in line
        or signature.group(1) in line
        or re.search(r"X-Amz-(Signature|Credential)=(?!\[REDACTED\])", line)
    ][:5]


def test_no_secret_or_signed_url_in_the_worker_log(
    fault_worker: EntrypointWorker, s3_for_faults: tuple[S3Server, Any], baseline: Baseline
) -> None:
    """Everything the jobs and faults of this worker made it print, to its end (SIGTERM above)
    when the whole module runs, holds neither bucket key nor the presigned URL's signature."""
    assert secrets_in_log(fault_worker, s3_for_faults[0], baseline) == []


# ----------------------------------------------------------------------------- local worker
LOCAL_JOB_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def local_worker(
    stack: Stack, realstack_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EntrypointWorker]:
    base = fault_base(stack, realstack_base, tmp_path_factory.mktemp("faults-local") / "comfy")
    worker = start_worker(stack, base, JOB_TIMEOUT_S=str(LOCAL_JOB_TIMEOUT_S))
    try:
        yield worker
    finally:
        stop_worker(worker)


def runsync_async(worker: EntrypointWorker, body: dict[str, Any]) -> dict[str, Any]:
    """POST /runsync in a thread; the dict gets ``answer`` (or ``raised``) and ``at``."""
    box: dict[str, Any] = {}

    def post() -> None:
        req = urllib.request.Request(
            f"{worker.api_url}/runsync",
            json.dumps({"input": body}).encode(),
            {"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=JOB_S) as resp:
                box["answer"] = json.load(resp)
        except OSError as exc:
            box["raised"] = exc
        box["at"] = time.monotonic()

    threading.Thread(target=post, daemon=True).start()
    return box


def test_comfyui_frozen_times_out_and_asks_for_a_new_worker(
    local_worker: EntrypointWorker, realstack_media: tuple[Path, Path], report: Callable[..., None]
) -> None:
    """Real: ComfyUI is frozen with SIGSTOP mid-job (a hung CUDA call looks the same from
    outside). The job answers ``timeout`` after JOB_TIMEOUT_S plus the interrupt grace, saying
    the worker will be replaced (``refresh_worker``, which ends the job loop on the platform)."""
    worker = local_worker
    box = runsync_async(worker, cpu_job(realstack_media))
    worker.wait_running(box)
    os.kill(worker.comfy_pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        wait_until("the frozen job's answer", lambda: "at" in box, JOB_S)
    finally:
        os.kill(worker.comfy_pid, signal.SIGCONT)
    elapsed = box["at"] - started
    answer = box.get("answer")
    assert answer and answer["status"] == "FAILED", box
    assert "will be replaced" in answer["error"], answer
    wait_until(
        "the timeout is logged", lambda: re.search(r"job failed \(timeout\)", worker.log_text()), 30
    )
    left = [p for p in leftovers(worker.base) if p.startswith("input/")]
    assert left == [], left
    report("ComfyUI frozen (SIGSTOP)", "FAILED timeout + refresh_worker", elapsed, "replaced", left)


def test_comfyui_killed_mid_job_fails_fast_and_the_worker_ends(
    local_worker: EntrypointWorker, realstack_media: tuple[Path, Path], report: Callable[..., None]
) -> None:
    """Real: ComfyUI is SIGKILLed while it holds the job's prompt. The job fails at once with
    ``comfyui_unavailable`` (the PID file's process is dead), and entrypoint.sh stops the handler
    and exits 1 so that the platform replaces the worker."""
    worker = local_worker
    handler = worker.handler_pid
    wait_until("ComfyUI idle after the frozen job", lambda: not worker.comfy_busy(), 300)
    box = runsync_async(worker, cpu_job(realstack_media))
    wait_until("ComfyUI holds the prompt", worker.comfy_busy, LOCAL_JOB_TIMEOUT_S)
    started = time.monotonic()
    os.kill(worker.comfy_pid, signal.SIGKILL)
    wait_until("the killed job's answer", lambda: "at" in box, 120)
    answered = box["at"] - started
    rc = worker.shell.wait(timeout=120)
    exited = time.monotonic() - started
    answer = box.get("answer")
    assert answer and answer["status"] == "FAILED", box
    assert "exited" in answer["error"], answer
    wait_until(
        "the failure is logged", lambda: "job failed (comfyui_unavailable)" in worker.log_text(), 30
    )
    assert rc == 1, worker.log_tail()
    assert not alive(handler)
    left = [p for p in leftovers(worker.base) if p.startswith("input/")]
    assert left == [], left
    report("ComfyUI SIGKILLed mid-job", "FAILED comfyui_unavailable", answered, "worker ends", left)
    print(f"worker exited {exited:.1f} s after the SIGKILL")


# ----------------------------------------------------------------------------- the double
class HistoryFailing(ComfyDouble):
    """The ComfyUI double whose ``/history/{id}`` answers HTTP 500 ``fail_left`` times (-1:
    always). The real ComfyUI cannot be made to do this from outside."""

    fail_left = 0

    async def get_history_id(self, request: web.Request) -> web.StreamResponse:
        if self.fail_left:
            self.fail_left -= 1 if self.fail_left > 0 else 0
            return web.Response(status=500, text="500 Internal Server Error")
        return await super().get_history_id(request)


@pytest.fixture
async def history_rig(tmp_path: Path) -> Any:
    double = HistoryFailing(tmp_path / "comfy")
    await double.start()
    env = {
        "COMFY_DIR": str(double.root),
        "COMFY_HOST": f"127.0.0.1:{double.port}",
        "JOB_TIMEOUT_S": "4",
        "PROGRESS_INTERVAL_S": "0",
        "WORKFLOW_PATH": str(ROOT / "XiCON_Dance_SCAIL_vFinal.json"),
    }
    settings = Settings.from_env(env)
    comfy = ComfyClient(double.url, poll_interval_s=0.2, unreachable_grace_s=0.5)
    worker = Worker(
        settings,
        Workflow.load(settings.workflow_path),
        comfy,
        reporter_factory=lambda job, s: ProgressReporter(job, s, sender=lambda j, p: None),
    )
    image = make_image(tmp_path / "ref.png", 96, 160)
    video = make_video(tmp_path / "drive.mp4", 64, 64, 8, 12, audio=True)
    job = small_job_input(image, video)
    try:
        yield double, worker, job
    finally:
        await comfy.close()
        await double.stop()


def _double_leftovers(double: ComfyDouble) -> list[str]:
    return leftovers(double.root)


async def _run(worker: Worker, job: dict[str, Any]) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    result = await worker.run({"id": f"h-{uuid.uuid4().hex[:6]}", "input": job})
    return result, time.monotonic() - started


async def test_history_500_for_a_while_still_completes(
    history_rig: Any, report: Callable[..., None]
) -> None:
    """Double: ``/history/{id}`` answers 500 five times; the websocket and later polls finish
    the job."""
    double, worker, job = history_rig
    double.fail_left = 5
    result, elapsed = await _run(worker, job)
    assert "error" not in result, result
    assert double.fail_left == 0, "the fault was not hit"
    assert _double_leftovers(double) == []
    report("/history HTTP 500 x5", "COMPLETED", elapsed, "(this job)", [])


async def test_history_500_always_ends_within_the_job_timeout(
    history_rig: Any, report: Callable[..., None]
) -> None:
    """Double: every ``/history`` answer is 500, so the outputs can never be read. The job ends
    within JOB_TIMEOUT_S (a defined failure, not a hang), leaves nothing, and the next job, with
    ``/history`` healthy again, succeeds."""
    double, worker, job = history_rig
    double.fail_left = -1
    result, elapsed = await _run(worker, job)
    assert result.get("code") == "timeout", result
    assert elapsed < worker.settings.job_timeout_s + 10, elapsed
    assert _double_leftovers(double) == []
    double.fail_left = 0
    after, next_s = await _run(worker, job)
    assert "error" not in after, after
    report("/history HTTP 500 always", "FAILED timeout", elapsed, f"ok in {next_s:.1f} s", [])


async def test_history_500_always_is_named_in_the_answer(history_rig: Any) -> None:
    """Double: the timeout answer names the cause, the HTTP 500 of ``/history``, rather than
    saying only that a prompt which had finished ran past its limit."""
    double, worker, job = history_rig
    double.fail_left = -1
    result, _elapsed = await _run(worker, job)
    assert "500" in result.get("error", ""), result
