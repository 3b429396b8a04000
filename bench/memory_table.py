"""ComfyUI's host memory per job from ``bench/gpu_run.py`` summaries (any device, the CPU too).

Run: ``python bench/memory_table.py A/summary.json [B/summary.json ...]``

Per job it prints, as a Markdown table, what ComfyUI allocated (``RssAnon``, MiB, sampled every
200 ms; mapped model files are left out): before the sampler (the first sample after the
sampler node started), the peak while the decoder (node 28) ran, while the video encode (node
139) ran, over the whole job, and once idle after the job; each also in float32 copies of the
job's frames (frames x width x height x 12 bytes, from the MP4 probe) above the first figure.
With two summaries whose jobs share labels, a second table gives B - A per figure and job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
SAMPLER, DECODE, ENCODE = "348", "28", "139"


def spans(job: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {nid: (a, b) for nid, a, b in job.get("node_spans_s", [])}


def peak_in(job: dict[str, Any], span: tuple[float, float] | None) -> int | None:
    if span is None:
        return None
    inside = [a for t, a in job["rss_anon_timeline_mib"] if span[0] <= t <= span[1] + 0.3 and a]
    return max(inside) if inside else None


def first_after(job: dict[str, Any], t0: float | None) -> int | None:
    if t0 is None:
        return None
    after = [a for t, a in job["rss_anon_timeline_mib"] if t >= t0 and a]
    return after[0] if after else None


def figures(job: dict[str, Any]) -> dict[str, Any]:
    s = spans(job)
    probe = job.get("mp4_probe") or {}
    frames, w, h = probe.get("frames"), probe.get("width"), probe.get("height")
    idle = job.get("comfy_rss_idle_after_mib") or {}
    return {
        "frames": frames,
        "size": f"{w}x{h}" if w else "?",
        "copy_mib": frames * w * h * 12 / MIB if frames and w and h else None,
        "before sampler": first_after(job, s.get(SAMPLER, (None,))[0]),
        "decode": peak_in(job, s.get(DECODE)),
        "encode": peak_in(job, s.get(ENCODE)),
        "job peak": job.get("comfy_anon_peak_mib"),
        "idle after": idle.get("RssAnon"),
    }


COLUMNS = ("before sampler", "decode", "encode", "job peak", "idle after")


def cell(value: int | None, base: int | None, copy_mib: float | None) -> str:
    """``value`` MiB, and in brackets its float32 copies above ``base`` (none without a base)."""
    if value is None:
        return "-"
    if base is None or copy_mib is None:
        return f"{value:,}"
    return f"{value:,} ({(value - base) / copy_mib:+.2f})"


def table(summaries: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [
        "| run | job | frames | size | one copy (MiB) | "
        + " | ".join(f"{c} (MiB; copies above before sampler)" for c in COLUMNS)
        + " |",
        "|---" * (5 + len(COLUMNS)) + "|",
    ]
    for name, summary in summaries:
        for job in summary["jobs"]:
            f = figures(job)
            base = f["before sampler"]
            copy = f["copy_mib"]
            cells = [cell(f[c], None if c == COLUMNS[0] else base, copy) for c in COLUMNS]
            copy_s = f"{copy:,.0f}" if copy else "-"
            lines.append(
                f"| {name} | {job['job']} | {f['frames']} | {f['size']} | {copy_s} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def differences(a: tuple[str, dict[str, Any]], b: tuple[str, dict[str, Any]]) -> list[str]:
    jobs_a = {j["job"]: figures(j) for j in a[1]["jobs"]}
    lines = [
        f"| job | {b[0]} - {a[0]}: " + " | ".join(COLUMNS) + " |",
        "|---" * (1 + len(COLUMNS)) + "|",
    ]
    for job in b[1]["jobs"]:
        fa, fb = jobs_a.get(job["job"]), figures(job)
        if fa is None:
            continue
        cells = []
        for c in COLUMNS:
            if fa[c] is None or fb[c] is None:
                cells.append("-")
                continue
            delta = fb[c] - fa[c]
            copies = f" ({delta / fb['copy_mib']:+.2f} copies)" if fb["copy_mib"] else ""
            cells.append(f"{delta:+,} MiB{copies}")
        lines.append(f"| {job['job']} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summaries", type=Path, nargs="+")
    args = p.parse_args()
    loaded = [
        (path.parent.name if path.stem == "summary" else path.stem, json.loads(path.read_text()))
        for path in args.summaries
    ]
    out = table(loaded)
    if len(loaded) == 2:
        out += ["", *differences(loaded[0], loaded[1])]
    print("\n".join(out))


if __name__ == "__main__":
    main()
