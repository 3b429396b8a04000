"""The long-dance table from ``bench/gpu_run.py`` summaries: one row per job, every figure read
from the summary or counted with the pinned context-window schedule.

Run: ``python bench/long_table.py bench/results/gpu_h200_windows/summary.json [more ...]``

Per job it prints, as a Markdown table:
- the clip: frames, fps (the job's), the context overlap of the variant's graph (node 355);
- windows per step: counted with ``xicon_dance.context_windows`` (the pinned ``uniform_standard``
  schedule of WanVideoWrapper; the sampler's progress events agree with it);
- end to end (the worker's wall time for the job), the worker's ``prepare`` stage (the driving
  clip transcoded to the job's size and fps), the sampler node and the part of it spent moving
  the transformer's weights to the GPU (its load bar, one event per tensor), the rest of
  ComfyUI's nodes;
- seconds per window-step: the sampling span (first to last sampler event, i.e. the end of the
  first window to the end of the last) over the window-steps in it, and its ratio to the mean
  step of the run's reference job (``--reference``, an 81-frame job: one window per step);
- whole-GPU VRAM peak (``nvidia-smi``, sampled), ComfyUI's RSS peak with its split into memory
  ComfyUI allocated (``RssAnon``) and mapped files (``RssFile``, the model files' pages);
- the MP4 (frames, seconds, audio) and the cost at a per-second price (``--price``, default
  RunPod's published H200 PRO flex $0.00155/s), in all and per output second.

``--first-steps`` adds one line per 81-frame job: the seconds from the end of the weights' load
bar to the first step event (the first window-step, with whatever the first forward of a process
pays: ``torch.compile``'s compile) and the step intervals after it (a recompile for the plain
steps shows in the fourth).

``--compare A B`` adds one line: 81-frame job B's seconds per pose and plain step (profiled
forwards left out) against job A's, per window-step, per 81-frame job and over
``--window-steps`` window-steps (default 239: 60 s of dance at overlap 48).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xicon_dance.context_windows import ContextOptions, windows  # noqa: E402

STEPS = 6  # the job's default; a run's job or a variant may set another (``steps_of``)
GIB_MIB = 1024


def _variant(summary: dict, name: str | None) -> dict | list:
    """The run's record of variant ``name`` (older runs: its list of levers); {} if none."""
    variants = summary.get("variants")
    return variants.get(name, {}) if isinstance(variants, dict) else {}


def steps_of(summary: dict, job: dict) -> int:
    """The sampler steps of ``job``: its variant's job field, else the run's job, else 6."""
    entry = _variant(summary, job.get("variant"))
    fields = entry.get("job", {}) if isinstance(entry, dict) else {}
    return int(fields.get("steps", summary.get("job", {}).get("steps", STEPS)))


def _overlap(summary: dict, variant: str, default: int = 48) -> int:
    entry = _variant(summary, variant)
    levers = entry.get("levers", []) if isinstance(entry, dict) else entry  # older runs: a list
    return 16 if "overlap16" in levers or variant == "overlap16" else default


def _span(job: dict, steps: int = STEPS) -> float:
    times = [e[0] for e in job["sampler_events"] if e[2] == steps]
    return max(times) - min(times)


def weights_move_s(job: dict, steps: int = STEPS) -> float | None:
    """Seconds the sampler spent moving the transformer's weights to the GPU: its load bar (the
    progress events whose total is the number of tensors, the largest total) from first to last."""
    bars = [e for e in job["sampler_events"] if e[2] not in (None, steps)]
    if not bars:
        return None
    total = max(e[2] for e in bars)
    times = [e[0] for e in bars if e[2] == total]
    return max(times) - min(times)


def first_step_s(job: dict, steps: int = STEPS) -> float | None:
    """Seconds from the end of the weights' load bar to the first step event (see module doc)."""
    bars = [e for e in job["sampler_events"] if e[2] not in (None, steps)]
    ends = [e[0] for e in job["sampler_events"] if e[2] == steps]
    if not bars or not ends:
        return None
    total = max(e[2] for e in bars)
    return min(ends) - max(e[0] for e in bars if e[2] == total)


def step_times(job: dict) -> tuple[float, float]:
    """Mean seconds of an 81-frame job's pose steps and plain steps, profiled steps left out.

    ``sampler_step_s`` holds the intervals between step events: steps 2-6 for one window (the
    first step has no start event), so intervals 0-2 are pose steps (the pose tokens end at
    50 %, after step 4) and 3-4 plain ones. A profiled forward runs 3x slower than its
    neighbours; a value over 1.5x the smallest of its group is left out."""
    intervals = job["sampler_step_s"]
    groups = (intervals[:3], intervals[3:])
    kept = [[v for v in g if v <= 1.5 * min(g)] for g in groups]
    return statistics.mean(kept[0]), statistics.mean(kept[1])


def compare(summary: dict, a: str, b: str, window_steps: int) -> str:
    """Job ``b`` against job ``a`` (81-frame jobs): seconds per pose / plain step, per
    window-step (4 pose + 2 plain) and over ``window_steps`` window-steps."""
    jobs = {j["job"]: j for j in summary["jobs"]}
    (pa, qa), (pb, qb) = step_times(jobs[a]), step_times(jobs[b])
    wa, wb = (4 * pa + 2 * qa) / 6, (4 * pb + 2 * qb) / 6
    return (
        f"{b} vs {a}: pose step {pb:.3f} vs {pa:.3f} s, plain step {qb:.3f} vs {qa:.3f} s; "
        f"window-step {wb:.3f} vs {wa:.3f} s ({(wb - wa) / wa:+.1%}): "
        f"{(wb - wa) * 6:+.2f} s per 81-frame job, {(wb - wa) * window_steps:+.1f} s over "
        f"{window_steps} window-steps"
    )


def reference_step(summary: dict, label: str) -> tuple[str, float]:
    """Mean seconds per step of an 81-frame job: its sampling span over the steps in it. The job
    named ``label``, else the run's first 81-frame job that returned its video."""
    ok = [j for j in summary["jobs"] if j.get("ok") and j.get("sampler_events")]
    job = next((j for j in ok if j["job"] == label), None) or next(
        (j for j in ok if j["max_frames"] == 81), None
    )
    if job is None:
        raise SystemExit("no 81-frame job in the summary to refer to: give --reference-s")
    steps = steps_of(summary, job)
    return job["job"], _span(job, steps) / (steps - 1)


def rows(summary: dict, ref_s: float, price: float) -> list[str]:
    out = []
    for job in summary["jobs"]:
        if not job.get("ok"):
            out.append(f"| {job['job']} | failed: {job.get('error')} |")
            continue
        frames = job["max_frames"]
        overlap = _overlap(summary, job["variant"])
        fps = job.get("video", {}).get("fps")
        steps = steps_of(summary, job)
        per_step = [
            len(windows(i, frames, ContextOptions(81, 4, overlap, "uniform_standard")))
            for i in range(steps)
        ]
        total_ws = sum(per_step)
        nodes = job["node_times"]
        sampler = nodes.get("348", {}).get("s", 0.0)
        rest = sum(v["s"] for k, v in nodes.items() if k != "348")
        span = _span(job, steps)
        move = weights_move_s(job, steps)
        ws = span / (total_ws - 1) if total_ws > steps else None
        video = job.get("video", {})
        seconds = video.get("duration_s") or 0.0
        cost = job["wall_s"] * price
        rss = job.get("comfy_rss_at_peak_mib")
        prep = job["timings"].get("prepare")
        split = f" ({rss['RssAnon'] / GIB_MIB:.1f} + {rss['RssFile'] / GIB_MIB:.1f})" if rss else ""
        cells = [
            job["job"],
            f"{frames} @ {fps:g} fps",
            str(overlap),
            f"{min(per_step)}–{max(per_step)} ({total_ws})",
            f"{job['wall_s']:.1f} s",
            f"{prep:.1f} s" if prep is not None else "—",
            f"{sampler:.1f} s",
            f"{move:.1f} s" if move is not None else "—",
            f"{rest:.1f} s",
            f"{job['wall_s'] - sampler:.1f} s",
            f"{ws:.3f} s ({ws / ref_s:.2f}×)" if ws else "—",
            f"{job['vram_peak_mib'] / GIB_MIB:.1f} GiB",
            f"{job['comfy_rss_peak_mib'] / GIB_MIB:.1f} GiB{split}",
            f"{video.get('frames')} fr, {seconds:.2f} s, "
            + ("audio" if video.get("has_audio") else "no audio"),
            f"${cost:.3f} (${cost / seconds:.4f}/s)" if seconds else f"${cost:.3f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("summaries", type=Path, nargs="+")
    p.add_argument("--reference", default="baseline:cold", help="81-frame job of each run")
    p.add_argument(
        "--reference-s", type=float, help="seconds per step of the reference, for a run without one"
    )
    p.add_argument("--price", type=float, default=0.00155, help="$ per second of the machine")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="also print 81-frame job B's step times against job A's (first summary)",
    )
    p.add_argument("--window-steps", type=int, default=239, help="for --compare (60 s: 239)")
    p.add_argument(
        "--first-steps", action="store_true", help="the first window-step of each 81-frame job"
    )
    args = p.parse_args()
    print(
        "| job | clip | overlap | windows per step (window-steps) | end to end | worker prepare "
        "| sampler node | of it, weights to the GPU | other nodes "
        "| outside the sampler (end to end less the sampler node) "
        "| s per window-step (vs 81 frames) | VRAM peak "
        "| ComfyUI RSS peak (anon + files) | MP4 | H200 cost (per output s) |"
    )
    print("|" + "---|" * 15)
    for path in args.summaries:
        summary = json.loads(path.read_text())
        label, ref = (
            ("--reference-s", args.reference_s)
            if args.reference_s
            else reference_step(summary, args.reference)
        )
        for row in rows(summary, ref, args.price):
            print(row)
        steps = [s for j in summary["jobs"] for s in j.get("sampler_step_s", [])]
        print(
            f"\n{path}: reference {label} {ref:.3f} s per step; "
            f"median of all step intervals {statistics.median(steps):.3f} s",
            file=sys.stderr,
        )
    if args.first_steps:
        print()
        for path in args.summaries:
            for job in json.loads(path.read_text())["jobs"]:
                first = first_step_s(job) if job.get("ok") and job["max_frames"] == 81 else None
                if first is not None:
                    intervals = ", ".join(f"{v:.2f}" for v in job["sampler_step_s"])
                    print(
                        f"{path.parent.name}/{job['job']}: first window-step {first:.1f} s after "
                        f"the weights' load; then steps of {intervals} s"
                    )
    if args.compare:
        summary = json.loads(args.summaries[0].read_text())
        print("\n" + compare(summary, *args.compare, args.window_steps))


if __name__ == "__main__":
    main()
