"""Pose detection's ONNX session starts: upstream (a new session before every run) against the
project's extension ``xicon_pose_sessions`` (sessions kept), with ViTPose-L at its true shapes.

Pose detection (ComfyUI-SCAIL-Pose ``PoseDetectionVitPoseToDWPose``) runs on the reference image
(node 365) and on the clip (node 363) of every job, and upstream deletes WanAnimatePreprocess's
YOLO and ViTPose sessions after each run, so each later run starts them again from their files.
This writes ``scripts/make_synthetic_models.py``'s ``full`` ViTPose-L (ViT-L/16 at 256x192 and its
deconvolution head, 1.2 GB of random weights: the real model's graph size and compute, not its
pictures) and its YOLO stand-in (YOLOv10m's size and compute, one fixed box), then runs two jobs'
worth of pose detection (the reference image's frame, then ``--frames`` clip frames, twice) in the
stack's Python, once as upstream runs it and once with the extension in place (``keep``), on one
ONNX provider. It prints, per way: the session starts and the seconds spent in them (ViTPose's
alone too), the node's seconds per run, ViTPose's median seconds per frame, and whether both ways
found the same poses, with their largest difference. A third pass runs upstream again: on the CUDA
provider each new session may pick other cuDNN algorithms, so two upstream passes can differ too.

Usage, with the stack's Python (``XICON_STACK_HOME`` as for the real-stack tests, or
``--comfy-dir``)::

    $XICON_STACK_HOME/venv/bin/python bench/pose_sessions.py [--frames 4] [--size 416x672]
        [--provider CUDAExecutionProvider] [--model PATH] [--comfy-dir DIR]

The provider defaults to CUDA when onnxruntime has it. Say on what machine it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
EXT = ROOT / "stack" / "comfy_extension" / "xicon_pose_sessions" / "pose_sessions.py"


def write_models(out: Path, model: Path | None) -> Path:
    """The ``full`` ViTPose-L (unless ``model`` is given) and YOLO stand-in under ``out``."""
    generator = [sys.executable, str(ROOT / "scripts" / "make_synthetic_models.py")]
    subprocess.run(
        [*generator, "--size", "full", "--out", str(out), "--only", "yolov10m"], check=True
    )
    detection = out / "detection"
    target = detection / "vitpose-l-wholebody.onnx"
    if model is not None:
        target.symlink_to(model.resolve())
    else:
        subprocess.run(
            [*generator, "--size", "full", "--out", str(out), "--only", "vitpose_l"], check=True
        )
    return detection


def stack_comfy_dir(given: Path | None) -> Path | None:
    """``--comfy-dir``, else ``$XICON_STACK_HOME/ComfyUI``, else None."""
    home = os.environ.get("XICON_STACK_HOME")
    return given or (Path(home) / "ComfyUI" if home else None)


def chosen_provider(given: str | None) -> str:
    """``--provider``, else CUDA where this onnxruntime lists it, else the CPU. A listed CUDA
    provider may still fall back to the CPU when its libraries are missing: the benches print
    what the sessions run on."""
    import onnxruntime

    if given:
        return given
    listed = onnxruntime.get_available_providers()
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in listed else "CPUExecutionProvider"


def compare(one: list[Any], other: list[Any]) -> str:
    """Whether two ways found the same poses, and their body keypoints' largest difference."""
    import numpy as np

    a, b = (
        np.concatenate([np.asarray(c, np.float64).ravel() for r in w for c in r])
        for w in (one, other)
    )
    both = np.isfinite(a) & np.isfinite(b)
    gap = float(np.abs(a - b)[both].max()) if both.any() else 0.0
    same_nan = bool((np.isnan(a) == np.isnan(b)).all())
    equal = json.dumps(one) == json.dumps(other)
    return (
        f"same poses {equal}; largest difference {gap:.3g} (x, y in pixels; score); "
        f"NaN alike {same_nan}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", default="416x672")
    p.add_argument("--provider", default=None)
    p.add_argument("--model", type=Path, default=None, help="a ViTPose ONNX file to use instead")
    p.add_argument("--comfy-dir", type=Path, default=None, help="ComfyUI with the pinned packs")
    args = p.parse_args(argv)
    comfy_dir = stack_comfy_dir(args.comfy_dir)
    if comfy_dir is None:
        print("give --comfy-dir or XICON_STACK_HOME (the stack: stack/install.py)")
        return 2
    import pose_detection  # bench/pose_detection.py: the packs imported as ComfyUI imports them

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        detection = write_models(Path(tmp), args.model)
        onnx_models, node = pose_detection.comfy_modules(comfy_dir.resolve())
        import numpy as np
        import onnxruntime
        import torch

        provider = chosen_provider(args.provider)
        ps = pose_detection.load("xicon_pose_sessions_bench", EXT)
        starts: list[tuple[str, float]] = []
        session_init = onnxruntime.InferenceSession.__init__

        def timed_init(self: Any, path: Any, *a: Any, **k: Any) -> None:
            t = time.perf_counter()
            try:
                session_init(self, path, *a, **k)
            finally:
                starts.append((Path(str(path)).name, time.perf_counter() - t))

        onnxruntime.InferenceSession.__init__ = timed_init
        runs: list[float] = []
        session_run = onnxruntime.InferenceSession.run

        def timed_run(self: Any, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return session_run(self, *a, **k)
            finally:
                if self.get_inputs()[0].shape[2:] == [256, 192]:
                    runs.append(time.perf_counter() - t)

        onnxruntime.InferenceSession.run = timed_run

        torch.manual_seed(0)
        reference = torch.rand(1, height, width, 3)
        clip = torch.rand(args.frames, height, width, 3)
        base, node_class = onnx_models.SimpleOnnxInference, type(node)
        original = (base.cleanup, node_class.process)
        print(
            f"ViTPose-L {(detection / 'vitpose-l-wholebody.onnx').stat().st_size / 1e9:.2f} GB, "
            f"{provider}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} cores; "
            f"two jobs: 1 reference frame + {args.frames} clip frames at {width}x{height}"
        )
        found = {}
        for way in ("upstream", "xicon_pose_sessions", "upstream again"):
            base.cleanup, node_class.process = original
            if way == "xicon_pose_sessions":
                base.cleanup = ps.kept_cleanup(base.cleanup, "keep", None)
                node_class.process = ps.sized_process(node_class.process)
            starts.clear()
            runs.clear()
            model = {
                "yolo": onnx_models.Yolo(str(detection / "yolov10m.onnx"), provider),
                "vitpose": onnx_models.ViTPose(
                    str(detection / "vitpose-l-wholebody.onnx"), provider
                ),
            }
            at_load = len(starts)
            node_s, poses = [], []
            for _ in range(2):
                for images in (reference, clip):
                    t = time.perf_counter()
                    (out,) = node_class().process(model, images)
                    node_s.append(time.perf_counter() - t)
                    poses.append(
                        [np.asarray(q["bodies"]["candidate"]).tolist() for q in out["poses"]]
                    )
            found[way] = poses
            jobs = starts[at_load:]
            vit = [s for name, s in jobs if name.startswith("vitpose")]
            spent = sum(s for _, s in jobs)
            vit_s = ", ".join(f"{s:.2f}" for s in vit) or "-"
            per_run = ", ".join(f"{s:.2f}" for s in node_s)
            loads = ", ".join(f"{name} {s:.2f} s" for name, s in starts[:at_load])
            print(
                f"{way:20s} session starts in the jobs {len(jobs)} ({spent:.2f} s; ViTPose "
                f"{len(vit)}: {vit_s} s) | node per run {per_run} s | ViTPose per frame "
                f"{statistics.median(runs) * 1000:.0f} ms (median of {len(runs)}) | at load {loads}"
            )
        base.cleanup, node_class.process = original
        for other in ("xicon_pose_sessions", "upstream again"):
            print(f"upstream against {other}: {compare(found['upstream'], found[other])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
