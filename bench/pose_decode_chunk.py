"""ViTPose's keypoint decoding of one chunk of frames (``xicon_pose_decode``'s ``decode_all``), two
versions of the extension's file side by side, in the stack's Python.

Pose detection (node 363) decodes ViTPose's heatmaps a chunk of ``XICON_POSE_BATCH`` frames at a
time, in a thread of its own on the GPU's way. This times ``decode_all`` of ``--before`` and of
``--after`` (two ``pose_decode.py`` files; ``git show REV:stack/comfy_extension/xicon_pose_decode/
pose_decode.py > before.py`` gives an earlier one) on ``--chunks`` chunks of random heatmaps of
ViTPose-L's shape (133 maps of 64x48 a frame), one call of each in turn, ``--rounds`` times, and
prints the medians and whether every call gave the same keypoints and scores (NaN alike).

Usage, with the stack's Python (``XICON_STACK_HOME`` as for the real-stack tests)::

    $XICON_STACK_HOME/venv/bin/python bench/pose_decode_chunk.py --before before.py \\
        [--after stack/comfy_extension/xicon_pose_decode/pose_decode.py] [--frames 16]

Say on what machine it ran and what else ran there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AFTER = ROOT / "stack" / "comfy_extension" / "xicon_pose_decode" / "pose_decode.py"


def load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, default=AFTER)
    p.add_argument("--frames", type=int, default=16, help="frames a chunk")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    home = os.environ.get("XICON_STACK_HOME")
    if not home:
        print("XICON_STACK_HOME is not set: install the stack (stack/install.py) first")
        return 2
    import numpy as np

    pose2d = load(
        "pose2d_utils_pinned",
        Path(home)
        / "ComfyUI"
        / "custom_nodes"
        / "ComfyUI-WanAnimatePreprocess"
        / "pose_utils"
        / "pose2d_utils.py",
    )
    before, after = load("decode_before", args.before), load("decode_after", args.after)
    rng = np.random.default_rng(0)
    chunks = [
        rng.random((args.frames, 133, 64, 48), dtype=np.float32) ** 8 for _ in range(args.chunks)
    ]
    center = rng.random((args.frames, 2)) * 300
    scale = rng.random((args.frames, 2)) + 1
    times: dict[str, list[float]] = {"before": [], "after": []}
    same = True
    for _ in range(args.rounds):
        for maps in chunks:
            got = {}
            for name, module in (("before", before), ("after", after)):
                t = time.perf_counter()
                got[name] = module.decode_all(pose2d, maps, center, scale)
                times[name].append(time.perf_counter() - t)
            same &= all(
                np.array_equal(a, b, equal_nan=True)
                for a, b in zip(got["before"], got["after"], strict=True)
            )
    b, a = (statistics.median(times[k]) * 1000 for k in ("before", "after"))
    print(
        f"{os.cpu_count()} cores; a chunk of {args.frames} frames: before {b:.2f} ms, after "
        f"{a:.2f} ms (medians of {len(times['after'])}); the same keypoints and scores: {same}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
