"""Pose detection (node 363) on a clip's frames: upstream's keypoint decoding against the project's
extension ``xicon_pose_decode``, in the stack's Python, on the CPU.

Node 363 (ComfyUI-SCAIL-Pose ``PoseDetectionVitPoseToDWPose``) runs WanAnimatePreprocess's YOLO
and ViTPose on every frame, then decodes ViTPose's heatmaps. The models here are the stand-ins of
``scripts/make_synthetic_models.py`` (small ONNX graphs on ONNX's CPU provider), so their time is
not the real models'; what the node does around them (resize, crop, normalisation, decoding) is
the real code and costs the same CPU time whatever the GPU. This runs the node three times in one
process on the same frames: upstream, then with the extension's decoder in place, then again,
and prints per run the node's time, the ONNX time and the rest per frame, plus the decoding alone
on one frame's heatmaps (median of 50), and whether both decoders gave the same keypoints.

Usage, with the stack's Python (``XICON_STACK_HOME`` as for the real-stack tests)::

    $XICON_STACK_HOME/venv/bin/python bench/pose_detection.py [--frames 241] [--size 416x672]

Say on what machine it ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "stack" / "comfy_extension" / "xicon_pose_decode" / "pose_decode.py"


def load(name: str, path: Path, package: bool = False) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def comfy_modules(comfy_dir: Path) -> tuple[Any, Any]:
    """WanAnimatePreprocess's onnx_models and SCAIL-Pose's node, imported as ComfyUI would."""
    sys.path.insert(0, str(comfy_dir))
    os.chdir(comfy_dir)
    sys.argv = [str(comfy_dir / "main.py"), "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing(True)
    nodes = comfy_dir / "custom_nodes"
    load("wap", nodes / "ComfyUI-WanAnimatePreprocess" / "__init__.py", package=True)
    scail = load("scailpose", nodes / "ComfyUI-SCAIL-Pose" / "__init__.py", package=True)
    onnx_models = sys.modules["wap.models.onnx_models"]
    return onnx_models, scail.NODE_CLASS_MAPPINGS["PoseDetectionVitPoseToDWPose"]()


def stand_in_models(out: Path) -> Path:
    cmd = [sys.executable, str(ROOT / "scripts" / "make_synthetic_models.py"), "--size", "tiny"]
    cmd += ["--out", str(out), "--only", "vitpose_l", "yolov10m"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "detection"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=241)
    p.add_argument("--size", default="416x672")
    args = p.parse_args(argv)
    home = os.environ.get("XICON_STACK_HOME")
    if not home:
        print("XICON_STACK_HOME is not set: install the stack (stack/install.py) first")
        return 2
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        detection = stand_in_models(Path(tmp))
        onnx_models, node = comfy_modules(Path(home) / "ComfyUI")
        import numpy as np
        import torch

        upstream = onnx_models.keypoints_from_heatmaps
        pd = load("xicon_pose_decode_bench", EXT)
        model = {
            "yolo": onnx_models.Yolo(str(detection / "yolov10m.onnx"), "CPUExecutionProvider"),
            "vitpose": onnx_models.ViTPose(
                str(detection / "vitpose-l-wholebody.onnx"), "CPUExecutionProvider"
            ),
        }
        import onnxruntime

        onnx_s = [0.0]
        session_run = onnxruntime.InferenceSession.run

        def timed_run(self: Any, *a: Any, **k: Any) -> Any:  # every session, re-created or not
            t = time.perf_counter()
            try:
                return session_run(self, *a, **k)
            finally:
                onnx_s[0] += time.perf_counter() - t

        onnxruntime.InferenceSession.run = timed_run

        torch.manual_seed(0)
        frames = torch.rand(args.frames, height, width, 3)
        print(f"{args.frames} frames at {width}x{height}; {os.cpu_count()} cores")
        results = {}
        for label in ("upstream", "xicon_pose_decode", "xicon_pose_decode again"):
            if label == "xicon_pose_decode":
                print(pd.patch(onnx_models))
            onnx_s[0] = 0.0
            t0 = time.perf_counter()
            (out,) = node.process(model, frames)
            total = time.perf_counter() - t0
            results[label] = out
            rest = (total - onnx_s[0]) / args.frames * 1000
            print(
                f"{label:24s} node {total:6.2f} s  ONNX {onnx_s[0]:5.2f} s  "
                f"rest {rest:5.1f} ms/frame"
            )
        same = all(
            np.allclose(a["bodies"]["candidate"], b["bodies"]["candidate"], atol=1e-3)
            for a, b in zip(
                results["upstream"]["poses"], results["xicon_pose_decode"]["poses"], strict=True
            )
        )
        print(f"body keypoints equal within 1e-3: {same}")
        heatmaps = np.random.default_rng(0).random((1, 133, 64, 48), dtype=np.float32)
        center, scale = np.array([[208.0, 336.0]]), np.array([[1.2, 1.6]]) * 200
        decoders = (
            ("upstream", upstream),
            ("xicon_pose_decode", onnx_models.keypoints_from_heatmaps),
        )
        for label, fn in decoders:
            times = []
            for _ in range(50):
                t = time.perf_counter()
                fn(heatmaps, center, scale, unbiased=True, use_udp=False)
                times.append(time.perf_counter() - t)
            print(f"decoding one frame ({label}): median {statistics.median(times) * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
