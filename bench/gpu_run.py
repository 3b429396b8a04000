"""The shipped SCAIL graph on a real GPU, through the worker: start-up, jobs, per-node times, VRAM.

Run from the repository root on a GPU machine where the stack is installed (ComfyUI + packs in
``--comfy-dir``, their Python packages importable) and the model files exist under
``<comfy-dir>/models`` (real ones, or true-shape stand-ins from ``scripts/make_synthetic_models.py
--size full``)::

    python bench/gpu_run.py --comfy-dir DIR --out RESULTS [--attention sdpa|sageattn]
                            [--plan baseline:cold,baseline:warm,fp16:cold,fp16:warm]
                            [--video CLIP] [--vram-cap-gib 31.5] [--save-latents] [--sdk-job]

What it does, in order:

1. Starts ``nvidia-smi`` sampling every 200 ms (memory used, utilisation) into
   ``RESULTS/vram.csv``; peaks are reported per phase, so they are sampled, not estimated.
2. Starts ComfyUI through the project's ``entrypoint.sh`` (GPU preflight, the SageAttention
   self-test when ``--attention sageattn``, ComfyUI on 127.0.0.1:8188), and measures spawn ->
   ``/system_stats`` answering. The entrypoint's last step, the SDK job loop, needs RunPod's job
   queue; a process that only waits stands in for it (``HANDLER``), so ComfyUI stays up.
3. Runs jobs with ``xicon_dance.job.Worker`` built and started exactly as ``handler.py`` does
   (``wait_for_comfy``: model aliases, the GPU profile chosen from ComfyUI's device and logged,
   so a variant's ``BASE_PRECISION`` or ``TORCH_COMPILE`` acts as in the product), against
   that ComfyUI, at the job defaults (416x672, 81 frames, 6 steps, cfg 1) with the reference image
   of ``test_input.json`` and the bundled driving video. Each job records the worker's timings
   (download, queue, inference, upload, total), the ComfyUI client's per-node times, every
   sampler step's arrival time (-> seconds per step), and the VRAM peak while it ran:

   - ``cold``: first job after start (every model loaded), text encoder disk cache on, empty cache;
   - ``warm``: the same job again (models resident; ComfyUI reuses the unchanged text encoding);
   - ``t5_off``: ``use_disk_cache`` false: the umt5-xxl file is loaded and the prompt encoded;
   - ``t5_hit``: ``use_disk_cache`` true again: the prompt is found in the disk cache, the
     umt5-xxl file is not read.

   ``--plan`` runs any sequence of ``VARIANT:LABEL[@FRAMES]`` instead: VARIANT is a graph of
   ``bench/gpu_variants.py`` (``baseline`` = the shipped graph, ``bf16``, ``fp16``, ``resident``)
   or ``t5off`` (the shipped graph with ``use_disk_cache`` false); FRAMES overrides
   ``max_frames`` (a long dance: ``baseline:long@1441`` with ``--video`` a 60-s clip). Jobs of
   one variant share a worker.
   ``--video`` replaces the bundled driving clip (``DEFAULT_VIDEO``) for every job.
   ``--vram-cap-gib X`` holds ComfyUI to X GiB of the GPU: ``--reserve-vram`` (card total - X, so
   ComfyUI's memory planning sees X) and a per-process memory fraction set inside ComfyUI by a
   bench-only custom node written at start and removed at the end
   (``torch.cuda.set_per_process_memory_fraction``).
   ``--save-latents`` adds a ``SaveLatent`` node on the sampler's output; after the run the last
   latents of each variant are compared with the first variant's (cosine, max |difference|,
   finite).
   ComfyUI's resident memory (``VmRSS`` of its PID, sampled every 200 ms) is reported per job,
   with the split of the peak sample into ``RssAnon`` (memory ComfyUI allocated) and ``RssFile``
   (mapped file pages the kernel can drop), and every sampler progress event (stage, step,
   total, arrival) is kept, so steps, windows and seconds per window-step can be read from the
   summary.
   ``--ram-limit-gib X`` starts the entrypoint (so ComfyUI) in a new memory cgroup holding X GiB
   (``tests/plugins/cgroups.py``; root on a writable cgroup hierarchy), as a container with that
   much RAM would run it; ``cgroup`` in the summary gives the kernel's peak charge and its
   ``oom_kill`` count, and ComfyUI's log says whether ``xicon_memory_limit`` held it to the limit.
   ``--profile-calls 3,9`` runs those transformer forwards (one per window-step, counted from 1
   over ComfyUI's life) under ``torch.profiler`` through the bench-only custom node
   ``bench/comfy_nodes/xicon_bench_profile`` (copied in for the run, removed at its end): per
   call a kernel table and a JSON (wall vs GPU-busy time, top kernels, time per class:
   attention, gemm, norm/elementwise, copy) under ``RESULTS/profile``. ``--census`` asks the
   same node after every job what holds the GPU's memory (MiB per top-level module and in loose
   tensors): ``gpu_census_after`` in the job's record.
4. ``--sdk-job``: one more warm job through the RunPod SDK (``python handler.py --test_input``
   against the same ComfyUI), the full product path; its worker log line holds the timings.
5. Writes the first job's MP4 to ``RESULTS/cold.mp4`` and probes it (frames, fps, size, codec).

``--width/--height/--steps/--max-frames`` shrink the job for a smoke test of this script on a CPU
(``GPU_PREFLIGHT=0``, ``--render-device cpu``, ``--comfy-args "--cpu ..."``, the ``cpu_smoke``
variants). As run on a 2-core machine with the stack's Python, a ComfyUI base directory holding
the tiny models (``tests/plugins/realstack.py`` ``make_base`` + ``generate_models``, plus this
script's prompt in the text cache) and ``COMFY_MAIN`` pointing at the stack's ``main.py``::

    GPU_PREFLIGHT=0 PYTHONPATH=. COMFY_MAIN=$STACK/ComfyUI/main.py $STACK/venv/bin/python \
      bench/gpu_run.py --comfy-dir $BASE --out OUT --attention sdpa --render-device cpu \
      --comfy-args "--cpu --base-directory $BASE --database-url sqlite:///$BASE/db.sqlite" \
      --width 256 --height 256 --steps 1 --max-frames 5 --census --profile-calls 1 \
      --plan cpu_smoke:a,cpu_smoke16:b

One job and its record are ``bench/gpu_jobs.py``; the graph variants ``bench/gpu_variants.py``;
the samplers and bench-only custom nodes ``bench/gpu_probes.py``.

Output: ``RESULTS/summary.json`` (every figure above), ``RESULTS/entrypoint.log`` (entrypoint and
ComfyUI output), ``RESULTS/vram.csv``. Exit status 0 when every job returned a video, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_variants  # noqa: E402
from gpu_jobs import (  # noqa: E402
    JOB_DEFAULTS,
    PlannedJob,
    Probes,
    compare,
    default_plan,
    job_input,
    run_job,
)
from gpu_probes import (  # noqa: E402
    RssSampler,
    VramSampler,
    gpu_census,
    install_profiler,
    install_vram_cap,
)

from tests.plugins.cgroups import MemoryCgroup, memory_cgroup  # noqa: E402

log = logging.getLogger("gpu_run")


def start_entrypoint(
    env: dict[str, str], log_path: Path, cgroup: MemoryCgroup | None
) -> subprocess.Popen:
    """entrypoint.sh in its own session (so that it and ComfyUI can be stopped together), inside
    ``cgroup`` when one is given."""
    out = log_path.open("w")
    cmd = ["bash", str(ROOT / "entrypoint.sh")]
    return subprocess.Popen(
        cgroup.command(cmd) if cgroup else cmd,
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


def write_graphs(args: argparse.Namespace, variants: set[str]) -> dict[str, Path]:
    template = json.loads((ROOT / "XiCON_Dance_SCAIL_vFinal.json").read_text(encoding="utf-8"))
    paths = {}
    for name in sorted(variants):
        if name == "t5off":
            graph = gpu_variants.build("baseline", template, save_latents=args.save_latents)
            graph["368"]["inputs"]["use_disk_cache"] = False
        else:
            graph = gpu_variants.build(name, template, save_latents=args.save_latents)
        path = args.out / f"graph_{name}.json"
        path.write_text(json.dumps(graph, ensure_ascii=False, indent=1), encoding="utf-8")
        paths[name] = path
    return paths


def override_job(args: argparse.Namespace) -> None:
    """Smaller jobs for a smoke test of this script on a CPU (the figures then mean nothing)."""
    for key in ("width", "height", "steps", "max_frames"):
        value = getattr(args, key)
        if value is not None:
            JOB_DEFAULTS[key] = value


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
            "JOB_TIMEOUT_S": str(args.job_timeout),
        }
    )
    # the plan's explicit frame counts and the default job's (--max-frames overrides it)
    longest = max([j.max_frames or 0 for j in args.plan] + [JOB_DEFAULTS["max_frames"]])
    env["MAX_FRAMES"] = str(longest)
    env["MAX_SECONDS"] = str(longest // 16 + 2)  # room for the 16-fps variant
    if args.video is not None:
        env["DEFAULT_VIDEO"] = str(args.video.resolve())
    return env


def build_worker(env: dict[str, str]) -> Any:
    import handler
    from xicon_dance.settings import Settings

    return handler.build_worker(Settings.from_env(env))


async def run_jobs(
    args: argparse.Namespace,
    graphs: dict[str, Path],
    probes: Probes,
    records: list[dict],
    save: Any,
) -> None:
    import handler

    workers = {
        name: build_worker({**worker_env(args, path), **gpu_variants.settings(name)})
        for name, path in graphs.items()
    }
    for worker in workers.values():  # as handler.py starts: aliases, the GPU profile (logged)
        await handler.wait_for_comfy(worker, 60.0)
    try:
        for job in args.plan:
            record = await run_job(workers[job.variant], job, probes, args.out)
            if args.census:
                record["gpu_census_after"] = await gpu_census()
            records.append(record)
            save()
    finally:
        for worker in workers.values():
            await worker.comfy.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--attention", choices=("sdpa", "sageattn"), default="sdpa")
    p.add_argument("--render-device", default="gpu")
    p.add_argument(
        "--plan",
        type=lambda s: [PlannedJob.parse(x) for x in s.split(",")],
        default=None,
        help="VARIANT:LABEL[@FRAMES],... (default: cold, warm, t5_off, t5_hit)",
    )
    p.add_argument("--video", type=Path, help="driving clip for every job (DEFAULT_VIDEO)")
    p.add_argument("--vram-cap-gib", type=float, help="hold ComfyUI to this much GPU memory")
    p.add_argument("--ram-limit-gib", type=float, help="run ComfyUI in a cgroup of this much RAM")
    p.add_argument("--save-latents", action="store_true")
    p.add_argument(
        "--census",
        action="store_true",
        help="after every job, record what holds the GPU's memory inside ComfyUI",
    )
    p.add_argument(
        "--profile-calls",
        help="profile these transformer forwards, counted from 1 (e.g. 3,9: step 3 of the first "
        "two 6-step jobs) into RESULTS/profile",
    )
    p.add_argument("--job-timeout", type=float, default=3600.0)
    p.add_argument("--sdk-job", action="store_true")
    p.add_argument("--comfy-args", default="", help="extra ComfyUI arguments (COMFY_EXTRA_ARGS)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    for key in ("width", "height", "steps", "max_frames"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, help="smoke tests only")
    args = p.parse_args(argv)
    args.plan = args.plan or default_plan()
    override_job(args)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    graphs = write_graphs(args, {j.variant for j in args.plan})
    first = graphs[args.plan[0].variant]
    vram = VramSampler(args.out / "vram.csv")
    vram.start()
    env = worker_env(args, first)
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
    cap_node = install_vram_cap(args, env)
    profile_node = install_profiler(args, env)
    rss = RssSampler(args.out / "comfyui.pid")
    rss.start()
    probes = Probes(vram, rss, args.comfy_dir / "output" / "latents")
    probes.latents_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "attention": args.attention,
        "job": JOB_DEFAULTS,
        "plan": [j.name + (f"@{j.max_frames}" if j.max_frames else "") for j in args.plan],
        "variants": {
            v: {
                "levers": gpu_variants.VARIANTS.get(v, ()),
                "settings": gpu_variants.settings(v),
                "job": gpu_variants.job(v),
            }
            for v in graphs
        },
        "vram_cap_gib": args.vram_cap_gib,
        "ram_limit_gib": args.ram_limit_gib,
        "video": str(args.video) if args.video else "bundled default",
    }
    records: list[dict] = []

    def save() -> None:
        summary["jobs"] = records
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))

    # A time limit's SIGTERM ends the run through the finally below, so the figures are kept.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cgroups = contextlib.ExitStack()
    cgroup = None
    if args.ram_limit_gib:
        cgroup = cgroups.enter_context(memory_cgroup(int(args.ram_limit_gib * 1024**3)))
        log.info("ComfyUI runs in %s (cgroup v%d)", cgroup.path, cgroup.version)
    t_spawn = time.monotonic()
    proc = start_entrypoint(env, args.out / "entrypoint.log", cgroup)
    rc = 1
    try:
        summary["comfy_ready_s"] = round(
            wait_http("http://127.0.0.1:8188/system_stats", proc, args.startup_timeout), 2
        )
        summary["vram_after_start_mib"] = vram.peak(t_spawn, time.monotonic())
        log.info("ComfyUI ready %.1f s after the entrypoint started", summary["comfy_ready_s"])
        asyncio.run(run_jobs(args, graphs, probes, records, save))
        if args.sdk_job:
            records.append(sdk_test_input(args, worker_env(args, first)))
        if args.save_latents or len(graphs) > 1:
            summary["comparisons"] = compare(records)
        rc = 0 if all(r.get("ok") for r in records) else 1
    except (Exception, SystemExit) as exc:  # keep whatever was measured; the log says what broke
        log.exception("run failed")
        summary["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        summary["vram_peak_mib"] = vram.peak(t_spawn, time.monotonic())
        summary["comfy_rss_peak_mib"] = rss.peak(t_spawn, time.monotonic())
        if cgroup is not None:
            peak = cgroup.peak()
            summary["cgroup"] = {
                "version": cgroup.version,
                "peak_mib": None if peak is None else round(peak / 2**20),
                "oom_kills": cgroup.oom_kills(),
            }
        save()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        vram.stop()
        rss.stop()
        cgroups.close()
        for node in (cap_node, profile_node):
            if node is not None:
                shutil.rmtree(node, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
