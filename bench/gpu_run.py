"""The shipped SCAIL graph on a real GPU, through the worker: start-up, jobs, per-node times, VRAM.

Run from the repository root on a GPU machine where the stack is installed (ComfyUI + packs in
``--comfy-dir``, their Python packages importable) and the model files exist under
``<comfy-dir>/models`` (real ones, or true-shape stand-ins from ``scripts/make_synthetic_models.py
--size full``)::

    python bench/gpu_run.py --comfy-dir DIR --out RESULTS [--attention sdpa|sageattn]
                            [--jobs cold,warm,t5_off,t5_hit] [--sdk-job]

What it does, in order:

1. Starts ``nvidia-smi`` sampling every 200 ms (memory used, utilisation) into
   ``RESULTS/vram.csv``; peaks are reported per phase, so they are sampled, not estimated.
2. Starts ComfyUI through the project's ``entrypoint.sh`` (GPU preflight, the SageAttention
   self-test when ``--attention sageattn``, ComfyUI on 127.0.0.1:8188), and measures spawn ->
   ``/system_stats`` answering. The entrypoint's last step, the SDK job loop, needs RunPod's job
   queue; a process that only waits stands in for it (``HANDLER``), so ComfyUI stays up.
3. Runs jobs with ``xicon_dance.job.Worker`` built exactly as ``handler.py`` builds it, against
   that ComfyUI, at the job defaults (416x672, 81 frames, 6 steps, cfg 1) with the reference image
   of ``test_input.json`` and the bundled driving video. Each job records the worker's timings
   (download, queue, inference, upload, total), the ComfyUI client's per-node times, every
   sampler step's arrival time (-> seconds per step), and the VRAM peak while it ran:

   - ``cold``: first job after start (every model loaded), text encoder disk cache on, empty cache;
   - ``warm``: the same job again (models resident; ComfyUI reuses the unchanged text encoding);
   - ``t5_off``: ``use_disk_cache`` false: the umt5-xxl file is loaded and the prompt encoded;
   - ``t5_hit``: ``use_disk_cache`` true again: the prompt is found in the disk cache, the
     umt5-xxl file is not read.
4. ``--sdk-job``: one more warm job through the RunPod SDK (``python handler.py --test_input``
   against the same ComfyUI), the full product path; its worker log line holds the timings.
5. Writes the first job's MP4 to ``RESULTS/cold.mp4`` and probes it (frames, fps, size, codec).

``--width/--height/--steps/--max-frames`` shrink the job for a smoke test of this script on a CPU
(``GPU_PREFLIGHT=0``, ``--render-device cpu``, ``--comfy-args "--cpu ..."``).

Output: ``RESULTS/summary.json`` (every figure above), ``RESULTS/entrypoint.log`` (entrypoint and
ComfyUI output), ``RESULTS/vram.csv``. Exit status 0 when every job returned a video, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_run")

JOB_DEFAULTS = {"width": 416, "height": 672, "steps": 6, "cfg": 1.0, "seed": 42, "max_frames": 81}
PROMPT = "a person dancing in a bright studio, full body, smooth motion"
TEXT_NODE_CLASS = "WanVideoTextEncodeCached"


@dataclass
class VramSampler:
    """nvidia-smi in the background; ``peak(t0, t1)`` is the largest sample inside a window."""

    path: Path
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    _proc: subprocess.Popen | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        cmd = [
            "nvidia-smi",
            "--query-gpu=memory.used,utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "200",
        ]
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            log.warning("nvidia-smi not found: no VRAM figures")
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self.path.open("w") as out:
            out.write("t_s,memory_used_mib,util_pct\n")
            for line in self._proc.stdout:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) != 2 or not parts[0].isdigit():
                    continue
                now = time.monotonic()
                self.samples.append((now, int(parts[0]), int(parts[1] or 0)))
                out.write(f"{now:.3f},{parts[0]},{parts[1]}\n")

    def peak(self, t0: float, t1: float) -> int | None:
        inside = [mib for t, mib, _ in self.samples if t0 <= t <= t1]
        return max(inside) if inside else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


class StepClock:
    """Progress reporter that also records when each ComfyUI progress event arrived."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[tuple[float, str, int | None, int | None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def on_comfy(self, progress: Any) -> None:
        stage = str(getattr(progress, "stage", "") or "")
        self.events.append(
            (
                time.monotonic(),
                stage,
                getattr(progress, "step", None),
                getattr(progress, "total", None),
            )
        )
        self.inner.on_comfy(progress)

    def sampler_steps(self, total: int) -> list[tuple[float, int]]:
        """(arrival time, step) of the sampler's step events of a ``total``-step bar, in order."""
        return [
            (t, int(step))
            for t, stage, step, n in self.events
            if stage.startswith("WanVideoSampler") and step is not None and n == total
        ]


def step_seconds(events: list[tuple[float, int]]) -> list[float]:
    """Time between consecutive step events whose step number goes up by one."""
    return [round(t1 - t0, 3) for (t0, s0), (t1, s1) in itertools.pairwise(events) if s1 == s0 + 1]


def start_entrypoint(
    args: argparse.Namespace, env: dict[str, str], log_path: Path
) -> subprocess.Popen:
    """entrypoint.sh in its own session (so that it and ComfyUI can be stopped together)."""
    out = log_path.open("w")
    return subprocess.Popen(
        ["bash", str(ROOT / "entrypoint.sh")],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until ``url`` answers; raises if ``proc`` exits first or the time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"entrypoint exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return time.monotonic() - t0
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s:g} s")


def graph_variant(src: Path, dest: Path, use_disk_cache: bool) -> Path:
    graph = json.loads(src.read_text(encoding="utf-8"))
    for node in graph.values():
        if isinstance(node, dict) and node.get("class_type") == TEXT_NODE_CLASS:
            node["inputs"]["use_disk_cache"] = use_disk_cache
    dest.write_text(json.dumps(graph, ensure_ascii=False, indent=1), encoding="utf-8")
    return dest


def job_input() -> dict[str, Any]:
    image = json.loads((ROOT / "test_input.json").read_text())["input"]["image_base64"]
    return {"image_base64": image, "prompt": PROMPT, "output": "base64", **JOB_DEFAULTS}


def override_job(args: argparse.Namespace) -> None:
    """Smaller jobs for a smoke test of this script on a CPU (the figures then mean nothing)."""
    for key in ("width", "height", "steps", "max_frames"):
        value = getattr(args, key)
        if value is not None:
            JOB_DEFAULTS[key] = value


async def run_job(worker: Any, name: str, vram: VramSampler) -> dict[str, Any]:
    """One job through ``Worker.run``; the client's RunResult is kept for its node times."""
    from xicon_dance.progress import ProgressReporter

    captured: dict[str, Any] = {}
    clocks: list[StepClock] = []
    real_run = worker.comfy.run

    async def run_and_keep(*a: Any, **kw: Any) -> Any:
        result = await real_run(*a, **kw)
        captured["run"] = result
        return result

    def reporter(job: dict[str, Any], interval_s: float) -> StepClock:
        clock = StepClock(ProgressReporter(job, interval_s))
        clocks.append(clock)
        return clock

    worker.comfy.run = run_and_keep
    worker._reporter_factory = reporter
    t0 = time.monotonic()
    try:
        result = await worker.run({"id": f"gpu-{name}", "input": job_input()})
    finally:
        worker.comfy.run = real_run
    t1 = time.monotonic()
    graph = json.loads(worker.settings.workflow_path.read_text(encoding="utf-8"))
    run = captured.get("run")
    nodes = {}
    if run is not None:
        for nid, secs in sorted(run.node_times.items(), key=lambda kv: -kv[1]):
            nodes[nid] = {"class": graph.get(nid, {}).get("class_type", "?"), "s": round(secs, 3)}
    events = clocks[0].sampler_steps(JOB_DEFAULTS["steps"]) if clocks else []
    record = {
        "job": name,
        "wall_s": round(t1 - t0, 3),
        "ok": "video" in result,
        "error": None if "video" in result else result,
        "timings": result.get("timings"),
        "node_times": nodes,
        "sampler_step_s": step_seconds(events),
        "sampler_events": [(round(t - t0, 3), step) for t, step in events],
        "vram_peak_mib": vram.peak(t0, t1),
    }
    video = result.get("video") if isinstance(result, dict) else None
    if isinstance(video, dict):
        record["video"] = {k: v for k, v in video.items() if k not in ("base64", "data")}
        record["_b64"] = video.get("base64") or video.get("data")
    log.info("job %s: %s", name, json.dumps({k: v for k, v in record.items() if k != "_b64"}))
    return record


def probe_mp4(path: Path) -> dict[str, Any]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {
            "bytes": path.stat().st_size,
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate) if stream.average_rate else None,
            "frames": frames,
            "pix_fmt": stream.codec_context.pix_fmt,
        }


def hold_script(out: Path) -> Path:
    path = out / "hold.py"
    path.write_text("import signal\nsignal.pause()\n")
    return path


def sdk_test_input(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """One job through the RunPod SDK: ``python handler.py --test_input`` against this ComfyUI."""
    job = json.dumps({"input": job_input()})
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-u", str(ROOT / "handler.py"), "--test_input", job],
        cwd=ROOT,
        env={**env, "RUNPOD_LOG_LEVEL": "WARN"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.monotonic() - t0
    done = [
        line
        for line in proc.stderr.splitlines() + proc.stdout.splitlines()
        if "job done in" in line
    ]
    (args.out / "sdk_test_input.log").write_text(proc.stderr[-20000:])
    return {
        "job": "sdk_test_input",
        "wall_s": round(wall, 3),
        "ok": proc.returncode == 0 and bool(done),
        "returncode": proc.returncode,
        "worker_log": done[-1][-400:] if done else None,
    }


def worker_env(args: argparse.Namespace, workflow: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "COMFY_DIR": str(args.comfy_dir),
            "COMFY_HOST": "127.0.0.1:8188",
            "COMFY_PID_FILE": str(args.out / "comfyui.pid"),
            "COMFY_LOG_FILE": str(args.out / "comfyui.log"),
            "SAGEATTENTION_ENABLED": "1" if args.attention == "sageattn" else "0",
            "WORKFLOW_PATH": str(workflow),
            "MAX_BASE64_OUTPUT_BYTES": str(500 * 1024 * 1024),
            "LOCAL_OUTPUT_DIR": "off",
            "POSE_RENDER_DEVICE": args.render_device,
        }
    )
    return env


def build_worker(env: dict[str, str]) -> Any:
    import handler
    from xicon_dance.settings import Settings

    return handler.build_worker(Settings.from_env(env))


async def run_jobs(
    args: argparse.Namespace, graphs: dict[bool, Path], vram: VramSampler, records: list[dict]
) -> None:
    workers = {flag: build_worker(worker_env(args, path)) for flag, path in graphs.items()}
    plan = {"cold": True, "warm": True, "t5_off": False, "t5_hit": True}
    for name in args.jobs:
        worker = workers[plan[name]]
        try:
            records.append(await run_job(worker, name, vram))
        finally:
            await worker.comfy.close()


def summarise(records: list[dict], out: Path) -> None:
    first = next((r for r in records if r.get("_b64")), None)
    for r in records:
        b64 = r.pop("_b64", None)
        if r is first and b64:
            data = base64.b64decode(b64)
            path = out / "cold.mp4"
            path.write_bytes(data)
            r["mp4_probe"] = probe_mp4(path)
            r["mp4_path"] = str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--attention", choices=("sdpa", "sageattn"), default="sdpa")
    p.add_argument("--render-device", default="gpu")
    p.add_argument("--jobs", default="cold,warm,t5_off,t5_hit", type=lambda s: s.split(","))
    p.add_argument("--sdk-job", action="store_true")
    p.add_argument("--comfy-args", default="", help="extra ComfyUI arguments (COMFY_EXTRA_ARGS)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    for key in ("width", "height", "steps", "max_frames"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, help="smoke tests only")
    args = p.parse_args(argv)
    override_job(args)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    template = ROOT / "XiCON_Dance_SCAIL_vFinal.json"
    graphs = {
        flag: graph_variant(template, args.out / f"graph_disk_cache_{flag}.json", flag)
        for flag in (True, False)
    }
    vram = VramSampler(args.out / "vram.csv")
    vram.start()
    env = worker_env(args, graphs[True])
    env.update(
        {
            "PYTHON_BIN": sys.executable,
            "IMAGE_CUDA_ARCH_LIST": os.environ.get("IMAGE_CUDA_ARCH_LIST", "9.0"),
            "COMFY_EXTRA_ARGS": args.comfy_args,
            "COMFY_STARTUP_TIMEOUT_S": str(args.startup_timeout),
            "MODEL_DOWNLOAD_AT_START": "0",
            "VOLUME_MODELS_DIR": str(args.out / "no-volume"),
            "HF_CACHE_DIR": str(args.out / "no-hf-cache"),
            # entrypoint.sh ends by exec'ing the handler's SDK job loop, which needs RunPod's
            # queue; a process that only waits stands in for it so ComfyUI stays up.
            "HANDLER": str(hold_script(args.out)),
        }
    )
    summary: dict[str, Any] = {"attention": args.attention, "job": JOB_DEFAULTS}
    records: list[dict] = []
    # A time limit's SIGTERM ends the run through the finally below, so the figures are kept.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_spawn = time.monotonic()
    proc = start_entrypoint(args, env, args.out / "entrypoint.log")
    rc = 1
    try:
        summary["comfy_ready_s"] = round(
            wait_http("http://127.0.0.1:8188/system_stats", proc, args.startup_timeout), 2
        )
        summary["vram_after_start_mib"] = vram.peak(t_spawn, time.monotonic())
        log.info("ComfyUI ready %.1f s after the entrypoint started", summary["comfy_ready_s"])
        asyncio.run(run_jobs(args, graphs, vram, records))
        if args.sdk_job:
            records.append(sdk_test_input(args, worker_env(args, graphs[True])))
        rc = 0 if all(r.get("ok") for r in records) else 1
    except (Exception, SystemExit) as exc:  # keep whatever was measured; the log says what broke
        log.exception("run failed")
        summary["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        summarise(records, args.out)
        summary["jobs"] = records
        summary["vram_peak_mib"] = vram.peak(t_spawn, time.monotonic())
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        vram.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
