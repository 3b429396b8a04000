"""Fault matrix: how one job ends when ComfyUI, the connection, the disk, S3, the platform or the
worker's own process fails, how long that takes, whether the next job succeeds, and what is left.

Against the REAL ComfyUI v0.33.0 (the project's ``entrypoint.sh``, CPU flags, see conftest.py),
with the worker in the RunPod SDK's production job loop: ``FakePlatform`` (tests/plugins) answers
the worker API the way runpod 1.12.0 calls it (``job-take``, ``job-stop``, ``job-done``), so a job's
answer carries its ``code`` and ``stopPod``, and a platform cancel is the SDK's own stop channel.

Workers (ComfyUI start-up dominates the cost, so destructive faults come last on each):
- ``fault_worker`` (module): platform mode, its own SeaweedFS. In order: websocket reset
  mid-run, platform cancel mid-run, output folder full, S3 down before the upload, then SIGTERM
  to the worker mid-job (the worker ends).
- ``local_worker`` (module): the SDK's local API, ``JOB_TIMEOUT_S`` short. ComfyUI frozen with
  SIGSTOP mid-job (timeout, the worker asks to be replaced), SIGCONT, then ComfyUI SIGKILLed
  mid-job (the worker ends).

Elsewhere, not repeated here: a node raising (a corrupt model file) is
``test_real_stack.py::test_corrupt_model_fails_clearly_then_the_next_job_succeeds``; S3 dying in
the middle of a (multipart) upload needs an upload long enough to be hit, which a CPU job's tiny
video is not: ``tests/test_delivery.py`` kills the real SeaweedFS mid-upload. ``/history``
answering HTTP 500 runs on the ComfyUI double (the real server cannot be made to answer 500
there) at the end of this module.

Every wait polls a condition with a deadline; timings are printed (``-s``) for the README.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.comfy_double import ComfyDouble
from tests.plugins.comfy import stop_process
from tests.plugins.media_factory import make_image, make_video
from tests.plugins.runpod_worker_api import FakePlatform, serve_platform
from tests.plugins.s3 import S3Server, start_server, stop_server
from tests.realstack.conftest import (
    ROOT,
    STARTUP_TIMEOUT_S,
    Stack,
    entrypoint_env,
    free_port,
    job_input,
    make_base,
    wait_for,
)
from xicon_dance.comfy import ComfyClient
from xicon_dance.job import Worker
from xicon_dance.progress import ProgressReporter
from xicon_dance.settings import Settings
from xicon_dance.workflow import Workflow

JOB_S = 900.0  # one CPU job on a loaded 2-core machine: well under this
DRAIN_S = 60.0  # idle keep-alive connections to ComfyUI close after aiohttp's 15 s
POLL_S = 0.2
TCP_ESTABLISHED = "01"


# ----------------------------------------------------------------------------- process facts
@dataclass(frozen=True)
class Usage:
    """What the handler process holds: non-socket fds, sockets, TCP connections to ComfyUI,
    threads, resident memory, and the remote port of each established TCP connection."""

    fds: int
    sockets: int
    comfy_connections: int
    threads: int
    rss_kb: int
    peers: tuple[int, ...] = ()


def _socket_inodes(pid: int) -> tuple[int, set[str]]:
    other, inodes = 0, set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listing
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
        else:
            other += 1
    return other, inodes


def _peer_ports(inodes: set[str]) -> tuple[int, ...]:
    """Remote ports of the established TCP connections among these socket inodes."""
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == TCP_ESTABLISHED and cols[9] in inodes:
                    ports.append(int(cols[2].rsplit(":", 1)[1], 16))
    return tuple(sorted(ports))


def usage(pid: int, comfy_port: int) -> Usage:
    other, inodes = _socket_inodes(pid)
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    peers = _peer_ports(inodes)
    return Usage(other, len(inodes), peers.count(comfy_port), threads, rss, peers)


def drained_usage(pid: int, comfy_port: int) -> Usage:
    """Usage once the handler holds no connection to ComfyUI: a websocket left open (ComfyUI
    never closes one, the client pings it every 30 s) would hold it forever, pooled HTTP
    connections close after 15 s idle."""
    deadline = time.monotonic() + DRAIN_S
    while (now := usage(pid, comfy_port)).comfy_connections and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return now


# A sitecustomize for the handler under test (PYTHONPATH): on SIGUSR1 it writes the names of the
# process's Python threads to $XICON_THREAD_DUMP. Python 3.11 does not name OS threads, so /proc
# alone cannot tell a pool thread from a leaked one.
THREAD_DUMP_HOOK = """
import json, os, signal, threading
def _dump(signum, frame):
    path = os.environ["XICON_THREAD_DUMP"]
    with open(path + ".part", "w") as fh:
        json.dump(sorted(t.name for t in threading.enumerate()), fh)
    os.replace(path + ".part", path)
if os.environ.get("XICON_THREAD_DUMP"):
    signal.signal(signal.SIGUSR1, _dump)
"""
# asyncio's default executor (``asyncio.to_thread``, DNS lookups) starts threads named
# ``asyncio_<n>`` lazily, one more whenever all are busy, up to this many; idle ones stay.
EXECUTOR_MAX = min(32, (os.cpu_count() or 1) + 4)


def thread_dump_env(folder: Path) -> dict[str, str]:
    """Environment that loads ``THREAD_DUMP_HOOK`` into a Python process started with it."""
    hook = folder / "thread-dump-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(THREAD_DUMP_HOOK, "utf-8")
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "XICON_THREAD_DUMP": str(folder / "threads.json")}


def python_threads(pid: int, folder: Path) -> dict[str, int]:
    """The Python threads of ``pid`` (started with ``thread_dump_env(folder)``) by name, digits
    folded: ``{"MainThread": 1, "asyncio_N": 3, ...}``."""
    dump = folder / "threads.json"
    dump.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    wait_until("the handler's thread list", dump.is_file, 30)
    names = json.loads(dump.read_text("utf-8"))
    return dict(sorted(Counter(re.sub(r"\d+", "N", name) for name in names).items()))


def thread_growth(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Threads that are more than ``before`` had, except the default executor's bounded pool."""
    grown = [
        f"{name}: {before.get(name, 0)} -> {count}"
        for name, count in after.items()
        if name != "asyncio_N" and count > before.get(name, 0)
    ]
    if after.get("asyncio_N", 0) > EXECUTOR_MAX:
        grown.append(f"asyncio_N: {after['asyncio_N']} > the pool's {EXECUTOR_MAX}")
    return grown


def leftovers(base: Path) -> list[str]:
    """Job folders and files the worker or ComfyUI left in the input, output and temp folders."""
    found = []
    jobs = base / "input" / "jobs"
    if jobs.is_dir():
        found += [f"input/jobs/{p.name}" for p in jobs.iterdir()]
    for sub in ("output", "temp"):
        root = base / sub
        if root.is_dir():
            found += [str(p.relative_to(base)) for p in root.rglob("*") if p.is_file()]
    return sorted(found)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def platform_port(platform: FakePlatform) -> int:
    return int(platform.url.rsplit(":", 1)[1])


def own_sockets(used: Usage, platform_port: int) -> int:
    """Sockets other than the SDK's connections to the platform (its job-take and job-stop
    long polls and result posts come and go on their own schedule)."""
    return used.sockets - used.peers.count(platform_port)


def wait_until(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(POLL_S)
    return found


# ----------------------------------------------------------------------------- workers
@dataclass
class FaultWorker:
    shell: subprocess.Popen[bytes]  # entrypoint.sh: PID 1 of the container, the supervisor
    base: Path
    comfy_port: int
    api_url: str
    log: Path
    platform: FakePlatform | None = None

    @property
    def comfy_url(self) -> str:
        return f"http://127.0.0.1:{self.comfy_port}"

    @property
    def comfy_pid(self) -> int:
        return int((self.base / "comfyui.pid").read_text().strip())

    @property
    def handler_pid(self) -> int:
        for pid in children(self.shell.pid):
            with contextlib.suppress(OSError):
                if b"handler.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        pytest.fail("no handler process under entrypoint.sh")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def threads(self) -> dict[str, int]:
        return python_threads(self.handler_pid, self.base)

    def queue(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.comfy_url}/queue", timeout=10) as resp:
            return json.load(resp)

    def comfy_busy(self) -> bool:
        queue = self.queue()
        return bool(queue["queue_running"] or queue["queue_pending"])

    def wait_running(self, box: dict[str, Any] | None = None) -> None:
        """Until ComfyUI runs a prompt (the job's graph is in ComfyUI's hands); fails at once
        when the job already ended (``box`` of ``runsync_async``)."""

        def running() -> bool:
            assert not box or "at" not in box, f"the job ended before it ran: {box}"
            return bool(self.queue()["queue_running"])

        wait_until("ComfyUI runs the job's prompt", running, JOB_S)

    def wait_result(self, job_id: str, timeout_s: float = JOB_S) -> dict[str, Any]:
        assert self.platform is not None
        platform = self.platform

        def answered() -> dict[str, Any] | None:
            assert self.shell.poll() is None or job_id in platform.results, self.log_tail()
            return platform.results.get(job_id)

        return wait_until(f"the platform gets the answer of {job_id}", answered, timeout_s)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def fault_base(stack: Stack, realstack_base: Path, folder: Path) -> Path:
    """A base directory of its own (input, output, packs) on the session's models and text
    cache, so that leftovers here are this worker's alone."""
    base = make_base(stack, folder)
    (base / "models").symlink_to(realstack_base / "models")
    cache = "custom_nodes/ComfyUI-WanVideoWrapper/text_embed_cache"
    if not (base / cache).exists():
        (base / cache).symlink_to(realstack_base / cache)
    return base


def start_worker(stack: Stack, base: Path, **env: str) -> FaultWorker:
    comfy_port, api_port = free_port(), free_port()
    full = entrypoint_env(stack, base, comfy_port, api_port)
    full.update(PROGRESS_INTERVAL_S="2", **thread_dump_env(base), **env)
    log = base / "worker.log"
    with open(log, "wb") as out:
        shell = subprocess.Popen(
            ["bash", str(ROOT / "entrypoint.sh")], env=full, stdout=out, stderr=subprocess.STDOUT
        )
    worker = FaultWorker(shell, base, comfy_port, f"http://127.0.0.1:{api_port}", log)
    try:
        wait_for(f"{worker.comfy_url}/system_stats", shell, log, STARTUP_TIMEOUT_S)
        wait_until("the handler starts its job loop", lambda: "job loop" in worker.log_text(), 300)
        if full.get("SERVE_API_LOCALLY") == "1":
            wait_for(f"{worker.api_url}/docs", shell, log, 120)
    except BaseException:
        stop_worker(worker)
        raise
    return worker


def stop_worker(worker: FaultWorker) -> None:
    comfy = worker.comfy_pid if (worker.base / "comfyui.pid").is_file() else 0
    with contextlib.suppress(ProcessLookupError):
        if comfy:
            os.kill(comfy, signal.SIGCONT)  # a frozen ComfyUI cannot take a SIGTERM
    stop_process(worker.shell)
    for pid in (comfy, *(children(worker.shell.pid) if alive(worker.shell.pid) else [])):
        with contextlib.suppress(ProcessLookupError):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def report(fault: str, outcome: str, seconds: float, next_job: str, left: list[str]) -> None:
    print(f"\nFAULT | {fault} | {outcome} | {seconds:.1f} s | next: {next_job} | left: {left}")


def ss_kill_supported() -> bool:
    """Whether ``ss -K`` can reset a TCP connection here (INET_DIAG_DESTROY, CAP_NET_ADMIN)."""
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
) -> Iterator[FaultWorker]:
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


@pytest.fixture(scope="module")
def baseline(fault_worker: FaultWorker) -> dict[str, Any]:
    """Filled by the first completed job: the handler's usage and Python threads after it."""
    return {}


# ----------------------------------------------------------------------------- platform worker
def test_websocket_reset_mid_run_still_completes(
    fault_worker: FaultWorker,
    realstack_media: tuple[Path, Path],
    baseline: dict[str, Any],
) -> None:
    """Real: every TCP connection of the handler to ComfyUI (the websocket among them) is reset
    with ``ss -K`` while the prompt runs; the client reconnects and the job completes."""
    if not ss_kill_supported():
        pytest.skip("ss -K cannot reset TCP connections here (needs INET_DIAG_DESTROY)")
    worker, handler = fault_worker, fault_worker.handler_pid
    assert worker.platform is not None
    worker.platform.add("ws-reset", job_input(realstack_media))
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
    baseline["usage"] = drained_usage(handler, worker.comfy_port)
    baseline["threads"] = worker.threads()
    assert baseline["usage"].comfy_connections == 0, "a websocket stayed open"
    left = leftovers(worker.base)
    assert left == [], left
    report("websocket reset mid-run", "COMPLETED", elapsed, "(this job)", left)


def test_platform_cancel_interrupts_comfyui(
    fault_worker: FaultWorker, realstack_media: tuple[Path, Path], baseline: dict[str, Any]
) -> None:
    """Real: the platform's stop channel (``job-stop``) names the running job; the SDK cancels
    the handler's task, the worker deletes and interrupts the prompt, ComfyUI goes idle, the job
    folder is removed and no answer is posted (the platform has marked the job cancelled)."""
    worker = fault_worker
    assert worker.platform is not None
    worker.platform.add("cancelled", job_input(realstack_media))
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
    fault_worker: FaultWorker, realstack_media: tuple[Path, Path], tmp_path: Path
) -> None:
    """Real: ComfyUI's output folder is a full tmpfs (a 256 KiB mount filled up; chmod cannot
    stop root). VideoHelperSuite's writer fails; the job answers ``comfyui_execution`` naming
    node 139, and the worker keeps serving."""
    output = fault_worker.base / "output"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        _fill(output / "filler.bin")
        worker = fault_worker
        assert worker.platform is not None
        started = time.monotonic()
        worker.platform.add("disk-full", job_input(realstack_media))
        failed = worker.wait_result("disk-full")
        elapsed = time.monotonic() - started
        left = [p.name for p in output.iterdir() if p.name != "filler.bin"]
    finally:
        subprocess.run(["umount", "-l", str(output)], check=False)
    assert failed["output"]["code"] == "comfyui_execution", failed
    assert "node 139 (VHS_VideoCombine)" in failed["error"], failed
    assert "stopPod" not in failed
    assert left == [], left
    report("output folder full", "FAILED comfyui_execution", elapsed, "see next", left)


def _fill(path: Path) -> None:
    with path.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)


def test_s3_down_before_upload_fails_clearly_then_recovers(
    fault_worker: FaultWorker,
    realstack_media: tuple[Path, Path],
    s3_for_faults: tuple[S3Server, Any],
    baseline: dict[str, Any],
) -> None:
    """Real: SeaweedFS is killed before the job; inference runs, the upload fails with
    ``upload_failed`` in bounded time, the result file is swept, and the handler holds no
    more fds, sockets or threads than after the first job (asyncio's default executor may have
    started more of its bounded pool: ``thread_growth``)."""
    _server, proc = s3_for_faults
    stop_server(proc)
    worker = fault_worker
    assert worker.platform is not None
    started = time.monotonic()
    worker.platform.add("s3-down", job_input(realstack_media, output="url"))
    failed = worker.wait_result("s3-down")
    elapsed = time.monotonic() - started
    assert failed["output"]["code"] == "upload_failed", failed
    assert "not reachable" in failed["error"], failed
    assert "stopPod" not in failed
    left = leftovers(worker.base)
    assert left == [], left
    after, threads = drained_usage(worker.handler_pid, worker.comfy_port), worker.threads()
    report("S3 down before upload", "FAILED upload_failed", elapsed, "see next", left)
    print(f"after the first job {baseline.get('usage')} {baseline.get('threads')}")
    print(f"now                 {after} {threads}")
    assert after.comfy_connections == 0, "a websocket stayed open"
    if "usage" in baseline:  # the first job ran in this session
        before = baseline["usage"]
        port = platform_port(worker.platform)
        assert after.fds == before.fds, (before, after)
        assert own_sockets(after, port) <= own_sockets(before, port), (before, after)
        assert thread_growth(baseline["threads"], threads) == []
        native = (
            before.threads - sum(baseline["threads"].values()),
            after.threads - sum(threads.values()),
        )
        assert native[1] <= native[0], f"native threads grew: {native}"


def test_sigterm_mid_job_finishes_the_job_then_stops_everything(
    fault_worker: FaultWorker, realstack_media: tuple[Path, Path]
) -> None:
    """Real: the platform's SIGTERM reaches PID 1 (entrypoint.sh) while ComfyUI runs a job. The
    SDK finishes the job it holds and posts it (so this is also the next job after the faults
    above), ends its loop, and the supervisor stops ComfyUI: no process is left."""
    worker = fault_worker
    assert worker.platform is not None
    handler, comfy = worker.handler_pid, worker.comfy_pid
    worker.platform.add("sigterm", job_input(realstack_media))
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


def test_no_secret_or_signed_url_in_the_worker_log(
    fault_worker: FaultWorker, s3_for_faults: tuple[S3Server, Any]
) -> None:
    """Everything the faults above made the worker, the SDK and ComfyUI print (one log: the
    entrypoint shows ComfyUI's output) holds neither bucket key nor an unmasked signature."""
    s3, _proc = s3_for_faults
    lines = fault_worker.log_text().splitlines()
    if not any("upload_failed" in line for line in lines):
        pytest.skip("the S3 fault did not run in this session (run the whole module)")
    leaks = [
        line
        for line in lines
        if s3.secret_key in line
        or s3.access_key in line
        or re.search(r"X-Amz-(Signature|Credential)=(?!\[REDACTED\])", line)
    ]
    assert leaks == [], leaks[:5]


# ----------------------------------------------------------------------------- local worker
LOCAL_JOB_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def local_worker(
    stack: Stack, realstack_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultWorker]:
    base = fault_base(stack, realstack_base, tmp_path_factory.mktemp("faults-local") / "comfy")
    worker = start_worker(stack, base, JOB_TIMEOUT_S=str(LOCAL_JOB_TIMEOUT_S))
    try:
        yield worker
    finally:
        stop_worker(worker)


def runsync_async(worker: FaultWorker, body: dict[str, Any]) -> dict[str, Any]:
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
    local_worker: FaultWorker, realstack_media: tuple[Path, Path]
) -> None:
    """Real: ComfyUI is frozen with SIGSTOP mid-job (a hung CUDA call looks the same from
    outside). The job answers ``timeout`` after JOB_TIMEOUT_S plus the interrupt grace, saying
    the worker will be replaced (``refresh_worker``, which ends the job loop on the platform)."""
    worker = local_worker
    box = runsync_async(worker, job_input(realstack_media))
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
    local_worker: FaultWorker, realstack_media: tuple[Path, Path]
) -> None:
    """Real: ComfyUI is SIGKILLed while it holds the job's prompt. The job fails at once with
    ``comfyui_unavailable`` (the PID file's process is dead), and entrypoint.sh stops the handler
    and exits 1 so that the platform replaces the worker."""
    worker = local_worker
    handler = worker.handler_pid
    wait_until("ComfyUI idle after the frozen job", lambda: not worker.comfy_busy(), 300)
    box = runsync_async(worker, job_input(realstack_media))
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
    job = {
        "image_base64": base64.b64encode(image.read_bytes()).decode(),
        "video_base64": base64.b64encode(video.read_bytes()).decode(),
        "width": 256,
        "height": 256,
        "max_frames": 9,
        "steps": 2,
    }
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


async def test_history_500_for_a_while_still_completes(history_rig: Any) -> None:
    """Double: ``/history/{id}`` answers 500 five times; the websocket and later polls finish
    the job."""
    double, worker, job = history_rig
    double.fail_left = 5
    result, elapsed = await _run(worker, job)
    assert "error" not in result, result
    assert double.fail_left == 0, "the fault was not hit"
    assert _double_leftovers(double) == []
    report("/history HTTP 500 x5", "COMPLETED", elapsed, "(this job)", [])


async def test_history_500_always_ends_within_the_job_timeout(history_rig: Any) -> None:
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
