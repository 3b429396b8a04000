"""Soak benchmark (prints figures; not a test). See the "Soak" section of bench/README.md.

One worker process takes many jobs in a row; what it holds before and after is compared:
resident memory (RSS), file descriptors other than sockets, sockets, TCP connections to
ComfyUI, threads, and the files left in ComfyUI's input and output folders.

1. **Double soak** (``--jobs``, default 200): ``handler.py`` in the RunPod SDK's production job
   loop (job-take / job-stop / job-done, answered by the fault matrix's ``FakePlatform``) in
   front of the ComfyUI double (a subprocess) and a real S3 gateway (SeaweedFS). The jobs are a
   fixed mix, in a fixed order: 60 % good (half base64, half uploaded to S3), 10 % hostile input,
   10 % execution error (a node raising, or out of memory), 10 % timeout (``JOB_TIMEOUT_S`` = 5,
   the sampler slowed down), 10 % cancelled by the platform mid-run. One job of each kind runs
   first as a warm-up (thread pools and connection pools reach their working size); "before" is
   measured after it.
2. **Real soak** (``--real-jobs``, default 20; 0 skips it): the project's ``entrypoint.sh`` with
   the real ComfyUI v0.33.0 on the CPU (``XICON_STACK_HOME``, see tests/realstack/conftest.py),
   tiny synthetic models and the seeded text-embedding cache (the job's prompt is the cached
   one, so the 10 GiB text encoder never runs), the same platform double; every job is a good
   one (256×256, 5 frames, 1 step). One warm-up job, then the measured jobs.

"Before" and "after" are taken once the handler holds no connection to ComfyUI (idle
keep-alive connections close after 15 s; a websocket left open would never close), so the
figures compare like with like. Every job's outcome is checked against its kind; a mismatch is
listed and makes the exit status 1. Goals: RSS growth < 10 MB over the double soak, no growth
of fds, sockets or threads, nothing left in input/ or output/. Threads are told apart by their
Python names (a hook loaded through PYTHONPATH dumps them on SIGUSR1): asyncio's default
executor (``asyncio_N``) starts a thread whenever all of its threads are busy and keeps it, up
to min(32, CPUs + 4), so its count may rise to that bound; every other thread must not grow.

Run from the repository root: ``python bench/soak.py [--jobs 200] [--real-jobs 20]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform as host
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.plugins.comfy import DoubleProcess, free_port, stop_process  # noqa: E402
from tests.plugins.media_factory import (  # noqa: E402
    job_input,
    make_image,
    make_png_bomb,
    make_text,
    make_truncated,
    make_video,
)
from tests.plugins.process_facts import (  # noqa: E402
    EXECUTOR_MAX,
    Usage,
    drained_usage,
    leftovers,
    own_sockets,
    platform_port,
    python_threads,
    thread_dump_env,
    thread_growth,
    usage,
    wait_until,
)
from tests.plugins.runpod_worker_api import FakePlatform, serve_platform  # noqa: E402
from tests.plugins.s3 import S3Server, start_server, stop_server  # noqa: E402
from tests.plugins.worker import handler_env  # noqa: E402
from xicon_dance.schema import INPUT_ERROR_CODES  # noqa: E402

JOB_TIMEOUT_S = 5
KINDS = ("good", "good", "hostile", "good", "error", "good", "timeout", "good", "cancel", "good")
MB = 1024.0
POLL_S = 0.05  # the double answers within milliseconds


@dataclass
class Outcome:
    kind: str
    seconds: float
    answer: str  # "ok", an error code, or "no answer" (cancelled)
    expected: bool
    detail: str = ""  # which hostile input


# ----------------------------------------------------------------------------- inputs
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Media:
    image: Path
    video: Path
    hostile: list[tuple[str, dict[str, Any]]]  # (name, job input), each refused as invalid


def make_media(folder: Path) -> Media:
    folder.mkdir(parents=True, exist_ok=True)
    image_path = make_image(folder / "ref.png", 96, 160)
    video_path = make_video(folder / "drive.mp4", 64, 64, 8, 12, audio=True)
    image = image_path.read_bytes()
    good = job_input(image_path, video_path)
    hostile = [
        ("truncated png", {**good, "image_base64": b64(image[: len(image) // 3])}),
        ("text as image", {**good, "image_base64": b64(make_text(folder / "t.png").read_bytes())}),
        (
            "png bomb",
            {**good, "image_base64": b64(make_png_bomb(folder / "bomb.png").read_bytes())},
        ),
        (
            "truncated mp4",
            {
                **good,
                "video_base64": b64(make_truncated(video_path, folder / "cut.mp4").read_bytes()),
            },
        ),
        ("not base64", {**good, "image_base64": "%%% not base64 %%%"}),
        ("width not /32", {**good, "width": 250}),
        ("private url", {**good, "image_base64": None, "image_url": "http://127.0.0.1:9/x.png"}),
        ("file url", {**good, "image_base64": None, "image_url": "file:///etc/passwd"}),
        ("no image", {"video_base64": good["video_base64"]}),
        ("steps 0", {**good, "steps": 0}),
    ]
    return Media(image_path, video_path, hostile)


def good_input(media: Media, **extra: Any) -> dict[str, Any]:
    return job_input(media.image, media.video, steps=3, **extra)


# ----------------------------------------------------------------------------- double soak
def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


class Soak:
    """One handler process, the double, the platform; runs jobs of each kind."""

    def __init__(
        self, double: DoubleProcess, platform: FakePlatform, proc: subprocess.Popen, media: Media
    ):
        self.double, self.platform, self.proc, self.media = double, platform, proc, media
        self.count = 0
        self.hostile_at = 0

    def _answer(self, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
        def answered() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the handler exited with {self.proc.returncode}")
            return self.platform.results.get(job_id)

        return wait_until(f"the answer of {job_id}", answered, timeout_s, POLL_S)

    def _running(self) -> bool:
        return bool(get_json(self.double.url + "/queue")["queue_running"])

    def _idle(self) -> bool:
        queue = get_json(self.double.url + "/queue")
        return not (queue["queue_running"] or queue["queue_pending"])

    def run(self, kind: str) -> Outcome:
        self.count += 1
        job_id = f"soak-{self.count:04d}-{kind}"
        faults: dict[str, Any] = {"error_at_node": None, "oom_at_node": None, "step_delay_s": 0}
        body = good_input(self.media, output="url" if self.count % 2 else "base64")
        want, detail = "ok", ""
        if kind == "hostile":
            detail, body = self.media.hostile[self.hostile_at % len(self.media.hostile)]
            self.hostile_at += 1
            want = "input error"
        elif kind == "error":
            oom = self.count % 4 == 0
            faults["oom_at_node" if oom else "error_at_node"] = "348"
            want = "out_of_memory" if oom else "comfyui_execution"
        elif kind == "timeout":
            faults["step_delay_s"] = 3.0  # 3 steps: past JOB_TIMEOUT_S, stops at the next step
            want = "timeout"
        elif kind == "cancel":
            faults["step_delay_s"] = 2.0
            want = "no answer"
        self.double.set_faults(**faults)
        started = time.monotonic()
        self.platform.add(job_id, body)
        if kind == "cancel":
            answer = self._cancel(job_id)
        else:
            result = self._answer(job_id)
            answer = result.get("output", {}).get("code") if "error" in result else "ok"
            answer = f"{answer} + stopPod" if result.get("stopPod") else answer
        expected = answer in INPUT_ERROR_CODES if want == "input error" else answer == want
        return Outcome(kind, time.monotonic() - started, str(answer), expected, detail)

    def _cancel(self, job_id: str) -> str:
        wait_until("the double runs the prompt", self._running, 30, POLL_S)
        self.platform.stop(job_id)
        wait_until("the double is idle after the cancel", self._idle, 30, POLL_S)
        wait_until("the job folder is removed", lambda: not leftovers(self.double.root), 30, POLL_S)
        return "no answer" if job_id not in self.platform.results else "answered"


@contextlib.contextmanager
def double_worker(
    folder: Path, s3: S3Server
) -> Iterator[tuple[DoubleProcess, FakePlatform, subprocess.Popen]]:
    root = folder / "comfy"
    (root / "input").mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "tests.comfy_double", "--port", str(port), "--root", str(root)]
    cmd += ["--pid-file", str(root / "comfyui.pid")]
    double_proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=(folder / "double.log").open("wb")
    )
    double = DoubleProcess(double_proc, port, root, root / "comfyui.pid")
    s3.client().create_bucket(Bucket="soak")
    try:
        double.wait_ready()
        with serve_platform() as platform:
            env = handler_env(double, folder, **platform.env())
            env.update(thread_dump_env(folder))
            env.update(
                JOB_TIMEOUT_S=str(JOB_TIMEOUT_S),
                PROGRESS_INTERVAL_S="0.5",
                RUNPOD_LOG_LEVEL="INFO",
                ALLOW_PRIVATE_URLS="false",
                BUCKET_ENDPOINT_URL=s3.endpoint,
                BUCKET_ACCESS_KEY_ID=s3.access_key,
                BUCKET_SECRET_ACCESS_KEY=s3.secret_key,
                BUCKET_NAME="soak",
            )
            with (folder / "handler.log").open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-u", "handler.py"],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                handler_log = folder / "handler.log"
                wait_until(
                    "the handler's job loop",
                    lambda: "job loop" in handler_log.read_text(),
                    60,
                    POLL_S,
                )
                yield double, platform, proc
            finally:
                stop_process(proc)
    finally:
        stop_process(double_proc)


def pool(threads: dict[str, int]) -> int:
    return threads.get("asyncio_N", 0)


def figures_table(
    before: Usage,
    after: Usage,
    threads: tuple[dict[str, int], dict[str, int]],
    left: tuple[int, int],
    platform_port: int,
) -> list[str]:
    own = [sum(t.values()) - pool(t) for t in threads]
    mine = [own_sockets(u, platform_port) for u in (before, after)]
    rows = [
        ("handler RSS (MB)", before.rss_kb / MB, after.rss_kb / MB, "< 10 MB growth"),
        ("fds, not sockets", before.fds, after.fds, "0 growth"),
        ("sockets", before.sockets, after.sockets, "(with the platform's)"),
        ("  not to the platform", mine[0], mine[1], "0 growth"),
        ("TCP connections to ComfyUI", before.comfy_connections, after.comfy_connections, "0"),
        ("threads (OS)", before.threads, after.threads, "0 growth beyond the pool"),
        ("  Python, outside the pool", own[0], own[1], "0 growth"),
        ("  asyncio executor pool", pool(threads[0]), pool(threads[1]), f"<= {EXECUTOR_MAX}"),
        ("files left in input/ + output/", left[0], left[1], "0"),
    ]
    lines = [f"{'figure':<32}{'before':>10}{'after':>10}{'growth':>10}   goal"]
    for name, a, b, goal in rows:
        fmt = "{:>10.1f}" if isinstance(a, float) else "{:>10d}"
        lines.append(f"{name:<32}" + (fmt * 3).format(a, b, b - a) + f"   {goal}")
    return lines


def outcome_lines(outcomes: list[Outcome]) -> list[str]:
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for item in outcomes:
        by_kind[item.kind].append(item)
    lines = []
    for kind, items in sorted(by_kind.items()):
        answers = Counter(item.answer for item in items)
        times = [item.seconds for item in items]
        lines.append(
            f"  {kind:<8} n={len(items):<4} answers {dict(answers)}; time median "
            f"{statistics.median(times):.2f} s, max {max(times):.2f} s"
        )
    return lines


def double_soak(jobs: int, folder: Path) -> bool:
    print(f"== double soak: {jobs} jobs in one handler process (SDK job loop)", flush=True)
    media = make_media(folder / "media")
    s3, s3_proc = start_server(folder / "s3")
    try:
        with double_worker(folder, s3) as (double, platform, proc):
            soak = Soak(double, platform, proc, media)
            warm = [soak.run(kind) for kind in ("good", "hostile", "error", "timeout", "cancel")]
            before = drained_usage(proc.pid, double.port)
            threads_before = python_threads(proc.pid, folder)
            left_before = len(leftovers(double.root))
            started = time.monotonic()
            outcomes: list[Outcome] = []
            for index in range(jobs):
                outcomes.append(soak.run(KINDS[index % len(KINDS)]))
                if (index + 1) % 50 == 0:
                    now = usage(proc.pid, double.port)
                    print(
                        f"  after {index + 1:>4} jobs: RSS {now.rss_kb / MB:.1f} MB, "
                        f"fds {now.fds}, sockets {now.sockets}, threads {now.threads}",
                        flush=True,
                    )
            wall = time.monotonic() - started
            after = drained_usage(proc.pid, double.port)
            threads_after = python_threads(proc.pid, folder)
            left_after = leftovers(double.root)
            socket_count = get_json(double.url + "/_double/sockets")
    finally:
        stop_server(s3_proc)
    print(f"warm-up: {[(o.kind, o.answer) for o in warm]}")
    print(f"{jobs} jobs in {wall:.0f} s")
    print("\n".join(outcome_lines(outcomes)))
    threads = (threads_before, threads_after)
    port = platform_port(platform)
    print("\n".join(figures_table(before, after, threads, (left_before, len(left_after)), port)))
    print(f"Python threads by name: before {threads_before}, after {threads_after}")
    print(f"double: websockets still open on the server side: {socket_count}")
    return report_failures(outcomes + warm, (before, after), threads, left_after, 10.0, port)


def report_failures(
    outcomes: list[Outcome],
    used: tuple[Usage, Usage],
    threads: tuple[dict[str, int], dict[str, int]],
    left: list[str],
    rss_limit_mb: float | None,
    platform_port: int,
) -> bool:
    before, after = used
    problems = [f"{o.kind} {o.detail}: answered {o.answer}" for o in outcomes if not o.expected]
    if rss_limit_mb is not None and (after.rss_kb - before.rss_kb) / MB >= rss_limit_mb:
        problems.append(f"RSS grew by {(after.rss_kb - before.rss_kb) / MB:.1f} MB")
    if after.fds > before.fds:
        problems.append(f"fds grew: {before.fds} -> {after.fds}")
    mine = [own_sockets(u, platform_port) for u in used]
    if mine[1] > mine[0]:
        problems.append(f"sockets grew: {mine[0]} -> {mine[1]} (platform's not counted)")
    problems += [f"threads grew: {grown}" for grown in thread_growth(*threads)]
    native = [u.threads - sum(t.values()) for u, t in zip(used, threads, strict=True)]
    if native[1] > native[0]:
        problems.append(f"native threads grew: {native[0]} -> {native[1]}")
    if after.comfy_connections:
        problems.append(f"{after.comfy_connections} connection(s) to ComfyUI stayed open")
    if left:
        problems.append(f"left behind: {left[:10]}")
    print("RESULT: " + ("all goals met" if not problems else "; ".join(problems)))
    return not problems


# ----------------------------------------------------------------------------- real soak
def real_soak(jobs: int, folder: Path) -> bool:
    from tests.plugins.realstack import (
        Stack,
        cpu_job,
        generate_models,
        make_base,
        start_worker,
        stop_worker,
    )

    home = os.environ.get("XICON_STACK_HOME")
    if not home:
        print("== real soak skipped: XICON_STACK_HOME is not set (see tests/realstack)")
        return True
    print(f"== real soak: {jobs} jobs on the real ComfyUI (CPU), one handler process", flush=True)
    stack = Stack(Path(home))
    base = make_base(stack, folder / "real" / "comfy")
    generate_models(stack, base)
    image = make_image(folder / "real" / "ref.png", 256, 256)
    video = make_video(folder / "real" / "drive.mp4", 256, 256, fps=24, frames=24, audio=True)
    body = cpu_job((image, video))
    with serve_platform() as platform:
        worker = start_worker(stack, base, **platform.env())
        worker.platform = platform
        try:
            handler, comfy_port = worker.handler_pid, worker.comfy_port
            outcomes = [_real_job(worker, "real-warm", body)]
            before, threads_before = drained_usage(handler, comfy_port), worker.threads()
            comfy_before = usage(worker.comfy_pid, comfy_port).rss_kb
            for index in range(jobs):
                outcomes.append(_real_job(worker, f"real-{index:03d}", body))
                if (index + 1) % 5 == 0:
                    now = usage(handler, comfy_port)
                    print(
                        f"  after {index + 1:>4} jobs: RSS {now.rss_kb / MB:.1f} MB, "
                        f"fds {now.fds}, sockets {now.sockets}, threads {now.threads}",
                        flush=True,
                    )
            after, threads_after = drained_usage(handler, comfy_port), worker.threads()
            comfy_after = usage(worker.comfy_pid, comfy_port).rss_kb
            left = leftovers(base)
        finally:
            stop_worker(worker)
    measured = outcomes[1:]
    print(f"warm-up job: {outcomes[0].seconds:.1f} s, {outcomes[0].answer}")
    print("\n".join(outcome_lines(measured)))
    threads = (threads_before, threads_after)
    port = platform_port(platform)
    print("\n".join(figures_table(before, after, threads, (0, len(left)), port)))
    print(f"Python threads by name: before {threads_before}, after {threads_after}")
    print(
        f"ComfyUI RSS (MB, for reference): {comfy_before / MB:.1f} -> {comfy_after / MB:.1f} "
        f"({(comfy_after - comfy_before) / MB:+.1f})"
    )
    return report_failures(outcomes, (before, after), threads, left, None, port)


def _real_job(worker: Any, job_id: str, body: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    worker.platform.add(job_id, body)
    result = worker.wait_result(job_id)
    answer = result.get("output", {}).get("code") if "error" in result else "ok"
    return Outcome("good", time.monotonic() - started, str(answer), answer == "ok")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="double soak jobs (0 skips)")
    parser.add_argument("--real-jobs", type=int, default=20, help="real-stack jobs (0 skips)")
    args = parser.parse_args(argv)
    print(
        f"soak {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {host.platform()}, "
        f"{os.cpu_count()} CPUs, Python {host.python_version()}; "
        f"load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    ok = True
    with tempfile.TemporaryDirectory(prefix="xicon-soak-", ignore_cleanup_errors=True) as tmp:
        if args.jobs > 0:
            ok = double_soak(args.jobs, Path(tmp) / "double") and ok
        if args.real_jobs > 0:
            ok = real_soak(args.real_jobs, Path(tmp)) and ok
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
