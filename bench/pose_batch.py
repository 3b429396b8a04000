"""Pose detection with ViTPose run one frame per call (upstream) against several frames per call
(the project's extension ``xicon_pose_batch``: YOLO in a thread of its own ahead of ViTPose and
the keypoints decoded in another; a trailing ``y``: YOLO's thread only; a trailing ``s``: no
thread; a trailing ``u``: YOLO's input made as upstream makes it, new arrays each frame), with
ViTPose-L at its true shapes. First a ``prep`` line: YOLO's input alone, upstream's expression
against the extension's kept arrays, per frame.

Pose detection (ComfyUI-SCAIL-Pose ``PoseDetectionVitPoseToDWPose``, node 363 on the clip) runs
WanAnimatePreprocess's YOLO and then ViTPose on every frame. This writes
``scripts/make_synthetic_models.py``'s ``full`` ViTPose-L (1.2 GB of random weights, a dynamic
batch axis as easy_ViTPose exports it) and its YOLO stand-in (YOLOv10m's size, a fixed batch of
one), and runs the node on ``--frames`` frames in the stack's Python, once per way in
``--batches`` (1 is upstream's ``process``), the sessions kept between runs in every way (as the
image does on a GPU with room) so that only the batching differs. Per way, medians of
``--repeat`` runs after one untimed run: the node's seconds, the seconds inside YOLO's and
ViTPose's ``session.run``, the node less both (its own CPU work when nothing overlaps; with YOLO's
thread the two models' calls overlap, and it can be below zero), and the whole device's memory in
use with the sessions alive (``torch.cuda.mem_get_info``: onnxruntime's arena included); then the
largest difference of ViTPose's heatmaps and of the poses against one frame per call.

Usage, with the stack's Python (``XICON_STACK_HOME`` as for the real-stack tests, or
``--comfy-dir``)::

    $XICON_STACK_HOME/venv/bin/python bench/pose_batch.py [--frames 81] [--batches 1,8,16,32]
        [--provider CUDAExecutionProvider] [--model PATH] [--comfy-dir DIR]

Say on what machine it ran. With random weights, heatmaps have near-tied maxima, so a pose can
move by many pixels for a difference in the last bits of a heatmap: the heatmaps' difference is
the figure that tells whether a batch computes the same thing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
EXTENSIONS = ROOT / "stack" / "comfy_extension"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--size", default="416x672")
    p.add_argument(
        "--batches",
        default="1,8,16,32,16y,16s,16u",
        help="frames per call; 1 is upstream's process, a trailing y decodes the keypoints in "
        "the node's thread (YOLO's thread only), a trailing s finds the boxes first (no thread), "
        "a trailing u makes YOLO's input with upstream's expression (new arrays each frame)",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--provider", default=None)
    p.add_argument("--model", type=Path, default=None, help="a ViTPose ONNX file to use instead")
    p.add_argument("--comfy-dir", type=Path, default=None, help="ComfyUI with the pinned packs")
    p.add_argument(
        "--decoder",
        choices=("image", "upstream"),
        default="image",
        help="ViTPose's keypoint decoding: the image's (xicon_pose_decode) or upstream's",
    )
    p.add_argument(
        "--steps",
        action="store_true",
        help="also print the seconds each thread spent in the node's steps (per run)",
    )
    args = p.parse_args(argv)
    import pose_detection  # the packs imported as ComfyUI imports them
    import pose_sessions  # the models written, the stack and provider found, as that bench does

    comfy_dir = pose_sessions.stack_comfy_dir(args.comfy_dir)
    if comfy_dir is None:
        print("give --comfy-dir or XICON_STACK_HOME (the stack: stack/install.py)")
        return 2

    width, height = (int(v) for v in args.size.split("x"))
    batches = args.batches.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        detection = pose_sessions.write_models(Path(tmp), args.model)
        onnx_models, node = pose_detection.comfy_modules(comfy_dir.resolve())
        if args.decoder == "image":  # as the image runs it: xicon_pose_decode in place
            decode = pose_detection.load("xicon_pose_decode_bench", pose_detection.EXT)
            print(f"keypoint decoding: {decode.patch(onnx_models)}")
        steps: dict[str, float] = {}
        if args.steps:
            timed_steps(onnx_models, node, steps)
        import numpy as np
        import onnxruntime
        import torch

        provider = pose_sessions.chosen_provider(args.provider)
        ps = pose_detection.load(
            "xicon_pose_sessions_bench", EXTENSIONS / "xicon_pose_sessions" / "pose_sessions.py"
        )
        pb = pose_detection.load(
            "xicon_pose_batch_bench", EXTENSIONS / "xicon_pose_batch" / "pose_batch.py"
        )
        inside: dict[str, float] = {}
        heatmaps: list[Any] = []
        keep_heatmaps = [False]
        session_run = onnxruntime.InferenceSession.run

        def timed_run(self: Any, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = session_run(self, *a, **k)
            name = "vitpose" if self.get_inputs()[0].shape[2:] == [256, 192] else "yolo"
            inside[name] = inside.get(name, 0.0) + time.perf_counter() - t
            if name == "vitpose" and keep_heatmaps[0]:
                heatmaps.append(out[0].copy())
            return out

        onnxruntime.InferenceSession.run = timed_run
        on_gpu = torch.cuda.is_available()

        def used_gib() -> float:
            if not on_gpu:
                return 0.0
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**30

        torch.manual_seed(0)
        clip = torch.rand(args.frames, height, width, 3)
        base, node_class = onnx_models.SimpleOnnxInference, type(node)
        original = (base.cleanup, node_class.process)
        base.cleanup = ps.kept_cleanup(base.cleanup, "keep", None)
        print(
            f"ViTPose-L {(detection / 'vitpose-l-wholebody.onnx').stat().st_size / 1e9:.2f} GB, "
            f"{provider}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} cores; "
            f"{args.frames} frames at {width}x{height}; sessions kept in every way; medians of "
            f"{args.repeat} runs after one"
        )
        prep(pb, clip.numpy(), args.repeat)
        first_maps: dict[str, Any] = {}
        first_poses: dict[str, list[Any]] = {}
        for batch in batches:
            size, serial = int(batch.rstrip("syu")), batch.endswith("s")
            node_class.process = (
                original[1]
                if size == 1
                else pb.batched(
                    original[1],
                    size,
                    pipelined=not serial,
                    decoding_thread=not batch.endswith(("y", "s")),
                    kept_arrays=not batch.endswith("u"),
                )
            )
            before = used_gib()
            model = {
                "yolo": onnx_models.Yolo(str(detection / "yolov10m.onnx"), provider),
                "vitpose": onnx_models.ViTPose(
                    str(detection / "vitpose-l-wholebody.onnx"), provider
                ),
            }
            rows = []
            for i in range(args.repeat + 1):
                steps.clear()
                inside.clear()
                heatmaps.clear()
                keep_heatmaps[0] = i == 0
                t = time.perf_counter()
                (out,) = node_class().process(model, clip)
                total = time.perf_counter() - t
                if i == 0:
                    first_maps[batch] = np.concatenate(heatmaps)
                    first_poses[batch] = [
                        np.asarray(q["bodies"]["candidate"]).tolist() for q in out["poses"]
                    ]
                    continue
                yolo, vit = inside.get("yolo", 0.0), inside.get("vitpose", 0.0)
                rows.append((total, yolo, vit, total - yolo - vit))
            total, yolo, vit, rest = (statistics.median(c) for c in zip(*rows, strict=True))
            print(
                f"batch {batch:>4}: node {total:.3f} s ({total / args.frames * 1000:.1f} ms a "
                f"frame) | YOLO {yolo:.3f} s | ViTPose {vit:.3f} s | node less both {rest:.3f} s | "
                f"device memory in use {used_gib() - before:+.2f} GiB with the sessions | ViTPose "
                f"ran on {model['vitpose'].session.get_providers()[0]}"
            )
            if args.steps:  # the last run's
                print(
                    "  steps by thread: "
                    + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(steps.items()))
                )
            del model
        base.cleanup, node_class.process = original
        one = first_maps[batches[0]].astype(np.float64)
        for batch in batches[1:]:
            other = first_maps[batch].astype(np.float64)
            gap = float(np.abs(other - one).max())
            cos = float((other * one).sum() / (np.linalg.norm(other) * np.linalg.norm(one)))
            poses = pose_sessions.compare([first_poses[batches[0]]], [first_poses[batch]])
            print(
                f"batch {batch} against batch {batches[0]}: heatmaps max |difference| {gap:.3g}, "
                f"cosine {cos:.7f}; {poses}"
            )
    return 0


def timed_steps(onnx_models: Any, node: Any, steps: dict[str, float]) -> None:
    """Wrap the node's steps (the pack's crop and box, its pose conversions, ViTPose's keypoint
    decoding as the module calls it, YOLO's ``forward`` and post-processing) so that each call
    adds its seconds to ``steps`` under ``step@thread``."""
    import functools
    import threading

    def timed(name: str, f: Any) -> Any:
        @functools.wraps(f)
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                key = f"{name}@{threading.current_thread().name[:16]}"
                steps[key] = steps.get(key, 0.0) + time.perf_counter() - t

        return wrapper

    g = type(node).process.__globals__
    for n in (
        "crop",
        "bbox_from_detector",
        "load_pose_metas_from_kp2ds_seq",
        "aaposemeta_to_dwpose_scail",
    ):
        g[n] = timed(n, g[n])
    fg = onnx_models.ViTPose.forward.__globals__
    fg["keypoints_from_heatmaps"] = timed("keypoints", fg["keypoints_from_heatmaps"])
    onnx_models.Yolo.postprocess_threading = timed(
        "yolo_post", onnx_models.Yolo.postprocess_threading
    )
    onnx_models.Yolo.forward = timed("yolo_forward", onnx_models.Yolo.forward)


def prep(pb: Any, frames: Any, repeat: int) -> None:
    """YOLO's input alone, frame by frame over the clip: upstream's expression against
    ``yolo_input``'s kept arrays (medians of ``repeat`` passes after one), and whether every
    frame's values are the same."""
    import cv2
    import numpy as np

    side = pb.YOLO_SIDE
    planes = pb.yolo_input(frames, 1, cv2, np)
    same = all(
        np.array_equal(
            planes(frames[i : i + 1]), cv2.resize(f, (side, side)).transpose(2, 0, 1)[None]
        )
        for i, f in enumerate(frames)
    )
    ways = {
        "upstream's expression": lambda f: np.stack(
            [cv2.resize(f, (side, side)).transpose(2, 0, 1)]
        ),
        "kept arrays": lambda f: planes(f[None]),
    }
    line = []
    for name, way in ways.items():
        passes = []
        for _ in range(repeat + 1):
            t = time.perf_counter()
            for f in frames:
                way(f)
            passes.append((time.perf_counter() - t) / len(frames) * 1000)
        line.append(f"{name} {statistics.median(passes[1:] or passes):.2f} ms")
    print(f"prep, YOLO's input a frame: {' | '.join(line)}; the same values: {same}")


if __name__ == "__main__":
    sys.exit(main())
