"""One job of the GPU benchmark through the worker, and what it records.

Contract:
- ``PlannedJob.parse("VARIANT:LABEL[@FRAMES]")``: one entry of ``gpu_run.py --plan``; VARIANT is
  a graph of ``gpu_variants.py`` or ``t5off``.
- ``job_input(max_frames, variant)``: the job (``JOB_DEFAULTS``, the reference image of
  ``test_input.json``, ``PROMPT``, the variant's job fields).
- ``run_job(worker, job, probes, out)``: runs it through ``Worker.run`` and returns its record:
  the worker's timings, ComfyUI's per-node times, every sampler progress event and the seconds
  per step, VRAM and ComfyUI RSS peaks over the job (``Probes``; also the peak of ``RssAnon``,
  what ComfyUI allocated, and what ComfyUI held once idle after the job; the nodes' spans and
  the ``RssAnon`` samples, in seconds from the job's start, from which ``memory_table.py``
  reads the figures per node),
  the latents it saved, and the MP4 written to ``out`` and probed.
- ``compare(records)``: each variant's last default-size job against the first variant's:
  latents (finite, max difference, cosine) and decoded frames.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gpu_variants
from gpu_probes import RssSampler, VramSampler

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("gpu_run")

JOB_DEFAULTS = {"width": 416, "height": 672, "steps": 6, "cfg": 1.0, "seed": 42, "max_frames": 81}
IDLE_SAMPLE_S = 1.0  # after a job: long enough for several RSS samples of the idle ComfyUI
PROMPT = "a person dancing in a bright studio, full body, smooth motion"


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

    def sampler_events(self, t0: float) -> list[tuple[float, int | None, int | None]]:
        """(seconds since ``t0``, step, total) of every progress event of a sampler node."""
        return [
            (round(t - t0, 3), step, n)
            for t, stage, step, n in self.events
            if stage.startswith("WanVideoSampler")
        ]

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


@dataclass(frozen=True)
class PlannedJob:
    variant: str
    label: str
    max_frames: int | None

    @property
    def name(self) -> str:
        return f"{self.variant}:{self.label}"

    @classmethod
    def parse(cls, text: str) -> PlannedJob:
        head, _, frames = text.partition("@")
        variant, _, label = head.partition(":")
        if variant not in (*gpu_variants.VARIANTS, "t5off") or not label:
            raise argparse.ArgumentTypeError(f"bad plan entry {text!r} (VARIANT:LABEL[@FRAMES])")
        return cls(variant, label, int(frames) if frames else None)


def default_plan() -> list[PlannedJob]:
    """The plan of the first H200 run: cold, warm, text encoder off, text-encoder cache hit."""
    return [
        PlannedJob("baseline", "cold", None),
        PlannedJob("baseline", "warm", None),
        PlannedJob("t5off", "t5_off", None),
        PlannedJob("baseline", "t5_hit", None),
    ]


def job_input(max_frames: int | None = None, variant: str = "baseline") -> dict[str, Any]:
    image = json.loads((ROOT / "test_input.json").read_text())["input"]["image_base64"]
    job = {"image_base64": image, "prompt": PROMPT, "output": "base64", **JOB_DEFAULTS}
    job.update(gpu_variants.job(variant))
    if max_frames is not None:
        job["max_frames"] = max_frames
    return job


@dataclass
class Probes:
    vram: VramSampler
    rss: RssSampler
    latents_dir: Path


async def run_job(worker: Any, job: PlannedJob, probes: Probes, out: Path) -> dict[str, Any]:
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

    latents_before = set(probes.latents_dir.glob("*.latent"))
    worker.comfy.run = run_and_keep
    worker._reporter_factory = reporter
    spans: list[tuple[str, float, float]] = []
    t0 = time.monotonic()
    try:
        with node_spans(spans):
            result = await worker.run(
                {
                    "id": f"gpu-{job.variant}-{job.label}",
                    "input": job_input(job.max_frames, job.variant),
                }
            )
    finally:
        worker.comfy.run = real_run
    t1 = time.monotonic()
    await asyncio.sleep(IDLE_SAMPLE_S)  # ComfyUI idle after the job: what it still holds
    idle = probes.rss.at_peak(t1 + IDLE_SAMPLE_S / 2, time.monotonic())
    graph = json.loads(worker.settings.workflow_path.read_text(encoding="utf-8"))
    run = captured.get("run")
    nodes = {}
    if run is not None:
        for nid, secs in sorted(run.node_times.items(), key=lambda kv: -kv[1]):
            nodes[nid] = {"class": graph.get(nid, {}).get("class_type", "?"), "s": round(secs, 3)}
    steps = job_input(job.max_frames, job.variant)["steps"]
    events = clocks[0].sampler_steps(steps) if clocks else []
    new_latents = sorted(set(probes.latents_dir.glob("*.latent")) - latents_before)
    record = {
        "job": job.name,
        "variant": job.variant,
        "max_frames": job_input(job.max_frames, job.variant)["max_frames"],
        "wall_s": round(t1 - t0, 3),
        "ok": "video" in result,
        "error": None if "video" in result else result,
        "timings": result.get("timings"),
        "node_times": nodes,
        "sampler_step_s": step_seconds(events),
        "sampler_events": clocks[0].sampler_events(t0) if clocks else [],
        "vram_peak_mib": probes.vram.peak(t0, t1),
        "comfy_rss_peak_mib": probes.rss.peak(t0, t1),
        "comfy_rss_at_peak_mib": probes.rss.at_peak(t0, t1),
        "comfy_anon_peak_mib": probes.rss.peak(t0, t1, "RssAnon"),
        "comfy_rss_idle_after_mib": idle,
        "node_spans_s": [(nid, round(a - t0, 2), round(b - t0, 2)) for nid, a, b in spans],
        "rss_anon_timeline_mib": [
            (round(t - t0, 1), v.get("RssAnon")) for t, v in probes.rss.samples if t0 <= t
        ],
        "latents": [str(p) for p in new_latents],
    }
    video = result.get("video") if isinstance(result, dict) else None
    if isinstance(video, dict):
        record["video"] = {k: v for k, v in video.items() if k not in ("base64", "data")}
        b64 = video.get("base64") or video.get("data")
        if b64:
            path = out / f"{job.variant}_{job.label}.mp4"
            path.write_bytes(base64.b64decode(b64))
            record["mp4_probe"] = probe_mp4(path)
            record["mp4_path"] = str(path)
    log.info("job %s: %s", job.name, json.dumps({k: v for k, v in record.items()}))
    return record


@contextlib.contextmanager
def node_spans(spans: list[tuple[str, float, float]]) -> Iterator[None]:
    """Record (node id, start, end) of every node ComfyUI runs, as the client times them
    (``run_state._Run.close_node``, which ``node_times`` sums)."""
    from xicon_dance.comfy import run_state

    original = run_state._Run.close_node

    def close_node(self: Any, now: float) -> None:
        if self.current is not None:
            spans.append((self.current[0], self.current[1], now))
        original(self, now)

    run_state._Run.close_node = close_node  # type: ignore[method-assign]
    try:
        yield
    finally:
        run_state._Run.close_node = original  # type: ignore[method-assign]


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


def frames_of(path: Path) -> Any:
    """Every frame of an MP4 as one float32 array (for comparing two variants' videos)."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(
            np.float32
        )


def compare(records: list[dict]) -> list[dict[str, Any]]:
    """Each variant's last job against the first variant's last job: latents and video frames."""
    import numpy as np

    last: dict[str, dict] = {}
    for r in records:
        if r.get("ok") and r.get("max_frames") == JOB_DEFAULTS["max_frames"]:
            last[r["variant"]] = r
    if len(last) < 2:
        return []
    names = list(last)
    ref = last[names[0]]
    out = []
    for name in names[1:]:
        other = last[name]
        row: dict[str, Any] = {"a": ref["job"], "b": other["job"]}
        if ref.get("latents") and other.get("latents"):
            from safetensors.torch import load_file

            a = load_file(ref["latents"][-1])["latent_tensor"].float().flatten()
            b = load_file(other["latents"][-1])["latent_tensor"].float().flatten()
            row["latent_finite"] = bool(a.isfinite().all() and b.isfinite().all())
            row["latent_max_abs_diff"] = float((a - b).abs().max())
            row["latent_cosine"] = float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-12))
        if ref.get("mp4_path") and other.get("mp4_path"):
            fa, fb = frames_of(Path(ref["mp4_path"])), frames_of(Path(other["mp4_path"]))
            if fa.shape == fb.shape:
                va, vb = fa.ravel(), fb.ravel()
                row["frames_max_abs_diff"] = float(np.abs(va - vb).max())
                row["frames_mean_abs_diff"] = float(np.abs(va - vb).mean())
                row["frames_cosine"] = float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
        out.append(row)
    return out
