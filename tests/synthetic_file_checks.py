"""The file checks of scripts/make_synthetic_models.py: they need torch, safetensors, onnx and
onnxruntime, which the project's venv does not have and the real stack's venv does.

``tests/test_synthetic_models.py`` runs this file in an interpreter that has them (the real
stack's, ``XICON_STACK_HOME``), so it needs nothing but the standard library and those packages:
``python tests/synthetic_file_checks.py OUT_DIR [CHECK ...]`` runs the named checks (all without
names), each in ``OUT_DIR/<check>``, and prints one JSON line per check:
``{"check": name, "ok": bool, "error": traceback or ""}``. The exit status is 0 when all passed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_synthetic_models.py"
MANIFEST = ROOT / "model_manifest.json"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_synthetic_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


msm = _load_script()


def tiny_files_load_with_the_shapes_and_dtypes_of_the_tables(out: Path) -> None:
    import torch
    from safetensors import safe_open

    only = ["scail_diffusion", "lightx2v_lora", "wan21_vae", "umt5_xxl"]
    written = msm.make_models(out, "tiny", MANIFEST, only=only, seed=3)
    for name in only:
        table = {s.name: s for s in msm.specs_for(name, "tiny")}
        with safe_open(str(written[name]), framework="pt") as f:
            assert set(f.keys()) == set(table), name
            for key, spec in table.items():
                t = f.get_tensor(key)
                assert tuple(t.shape) == spec.shape, (key, tuple(t.shape), spec.shape)
                assert t.dtype == getattr(torch, spec.dtype), (key, t.dtype, spec.dtype)
            assert f.metadata()["synthetic_size"] == "tiny", f.metadata()
    with safe_open(str(written["scail_diffusion"]), framework="pt") as f:
        w = f.get_tensor("blocks.3.self_attn.q.weight").float()
        assert 0.01 < w.std().item() < 0.03, w.std().item()  # small-magnitude random, not zeros
        assert torch.equal(f.get_tensor("blocks.3.norm3.weight").float(), torch.ones(96))


def same_seed_same_bytes_and_only_does_not_change_them(out: Path) -> None:
    a = msm.make_models(out / "a", "tiny", MANIFEST, only=["lightx2v_lora"], seed=5)
    b = msm.make_models(out / "b", "tiny", MANIFEST, only=["lightx2v_lora", "wan21_vae"], seed=5)
    c = msm.make_models(out / "c", "tiny", MANIFEST, only=["lightx2v_lora"], seed=6)
    assert a["lightx2v_lora"].read_bytes() == b["lightx2v_lora"].read_bytes()
    assert a["lightx2v_lora"].read_bytes() != c["lightx2v_lora"].read_bytes()


def fp8_tensors_round_trip_through_the_streaming_writer(out: Path) -> None:
    import torch
    from safetensors.torch import load_file

    specs = [
        msm.TensorSpec("w", (8, 4), "float8_e4m3fn", std=1.0),
        msm.TensorSpec("w.scale_weight", (1,), "float32", "const", value=0.02),
        msm.TensorSpec("scaled_fp8", (0,), "float8_e4m3fn", "zeros"),
    ]
    msm.write_safetensors(out / "m.safetensors", specs, seed=1)
    sd = load_file(str(out / "m.safetensors"))
    assert sd["w"].dtype == torch.float8_e4m3fn and sd["w"].shape == (8, 4), sd["w"]
    assert math.isclose(sd["w.scale_weight"].item(), 0.02, rel_tol=1e-6)
    assert sd["scaled_fp8"].numel() == 0


def nlf_answers_the_calls_the_nodes_make(out: Path) -> None:
    import torch

    path = out / "nlf.torchscript"
    msm.write_nlf(path)
    model = torch.jit.load(str(path)).eval().to("cpu")
    for _ in range(2):  # LoadNLFModel's warm-up
        model.detect_smpl_batched(torch.zeros(1, 3, 256, 256))
    pred = model.detect_smpl_batched(torch.rand(3, 3, 128, 96))
    assert len(pred["boxes"]) == 3 and pred["boxes"][0].shape == (1, 5), pred["boxes"]
    joints = pred["joints3d_nonparam"][1]
    assert joints.shape == (1, 24, 3), joints.shape
    depth_mm = joints[0, :, 2]
    assert depth_mm.min().item() > 3000 and depth_mm.max().item() < 5000  # ~4 m away


def onnx_detectors_have_the_io_the_loaders_read(out: Path) -> None:
    import numpy as np
    import onnxruntime

    msm.write_yolo(out / "yolo.onnx")
    msm.write_vitpose(out / "vitpose.onnx", seed=0)
    cpu = ["CPUExecutionProvider"]
    yolo = onnxruntime.InferenceSession(str(out / "yolo.onnx"), providers=cpu)
    assert yolo.get_inputs()[0].shape == [1, 3, 640, 640], yolo.get_inputs()[0].shape
    (boxes,) = yolo.run(None, {yolo.get_inputs()[0].name: np.zeros((1, 3, 640, 640), np.float32)})
    assert boxes.shape == (1, 1, 6) and boxes[0, 0, 4] > 0.05 and boxes[0, 0, 5] == 0, boxes
    pose = onnxruntime.InferenceSession(str(out / "vitpose.onnx"), providers=cpu)
    assert pose.get_inputs()[0].shape == ["batch_size", 3, 256, 192], pose.get_inputs()[0].shape
    frames = np.random.default_rng(1).random((3, 3, 256, 192), dtype=np.float32)
    (heat,) = pose.run(None, {pose.get_inputs()[0].name: frames})
    assert heat.shape == (3, 133, 64, 48), heat.shape
    (one,) = pose.run(None, {pose.get_inputs()[0].name: frames[2:]})  # frames stay apart
    assert np.allclose(one[0], heat[2], atol=1e-6), float(np.abs(one[0] - heat[2]).max())


def vitpose_large_runs_at_a_reduced_width(out: Path) -> None:
    """``full``'s ViTPose-L graph, built at a small width and depth: onnxruntime loads and runs it
    with the real model's input and output (a dynamic batch, frames computed apart), its weights
    are as many as the table says, and the full table is ViTPose-L's size."""
    import numpy as np
    import onnxruntime

    small = {"width": 64, "depth": 2, "heads": 4, "mlp": 128, "patch": 16, "deconv": 32}
    msm._save_onnx_large(msm._vitpose_large(0, small), out / "vitpose_small.onnx")
    cpu = ["CPUExecutionProvider"]
    pose = onnxruntime.InferenceSession(str(out / "vitpose_small.onnx"), providers=cpu)
    assert pose.get_inputs()[0].shape == ["batch_size", 3, 256, 192], pose.get_inputs()[0].shape
    frames = np.random.default_rng(0).random((2, 3, 256, 192), dtype=np.float32)
    (heat,) = pose.run(None, {pose.get_inputs()[0].name: frames})
    assert heat.shape == (2, 133, 64, 48) and np.isfinite(heat).all(), heat.shape
    assert heat.std() > 0, "the heatmaps must depend on the weights"
    (one,) = pose.run(None, {pose.get_inputs()[0].name: frames[1:]})  # frames stay apart
    assert np.allclose(one[0], heat[1], atol=1e-5), float(np.abs(one[0] - heat[1]).max())
    full = msm.vitpose_large_parameters()
    assert 306_000_000 < full < 310_000_000, full  # ViTPose-L: 308 M (its paper)


def yolo_large_has_yolov10m_size_and_the_box(out: Path) -> None:
    """``full``'s YOLO stand-in: YOLOv10m's size and compute (15.4 M parameters, 59 GFLOPs), the
    same person box as the tiny one from whatever frame, through onnxruntime."""
    import numpy as np
    import onnx
    import onnxruntime

    params, gflops = msm.yolo_compute()
    assert 15.0e6 < params < 16.0e6 and 55 < gflops < 65, (params, gflops)
    msm.write_yolo(out / "yolo_m.onnx", size="full")
    model = onnx.load(str(out / "yolo_m.onnx"))
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer) - 1 - 6  # zero, box
    assert weights == params, (weights, params)
    yolo = onnxruntime.InferenceSession(
        str(out / "yolo_m.onnx"), providers=["CPUExecutionProvider"]
    )
    frame = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    (boxes,) = yolo.run(None, {yolo.get_inputs()[0].name: frame})
    assert boxes.shape == (1, 1, 6) and np.allclose(boxes[0, 0], msm.YOLO_BOX), boxes


def seeded_text_cache_is_what_the_node_loads(out: Path) -> None:
    import torch

    prompts = ["A person dances.", "  静态，模糊  "]
    paths = msm.seed_text_cache(out, prompts)
    for prompt, path in zip(prompts, paths, strict=True):
        assert path.name == hashlib.sha256(prompt.strip().encode()).hexdigest() + ".pt", path
        loaded = torch.load(path)  # the node's call: default weights_only loading
        assert isinstance(loaded, list) and len(loaded) == 1, type(loaded)
        assert loaded[0].ndim == 2 and loaded[0].shape[1] == 4096 and loaded[0].shape[0] >= 1


CHECKS: dict[str, Callable[[Path], None]] = {
    f.__name__: f
    for f in (
        tiny_files_load_with_the_shapes_and_dtypes_of_the_tables,
        same_seed_same_bytes_and_only_does_not_change_them,
        fp8_tensors_round_trip_through_the_streaming_writer,
        nlf_answers_the_calls_the_nodes_make,
        onnx_detectors_have_the_io_the_loaders_read,
        vitpose_large_runs_at_a_reduced_width,
        yolo_large_has_yolov10m_size_and_the_box,
        seeded_text_cache_is_what_the_node_loads,
    )
}


def main(argv: list[str]) -> int:
    out, names = Path(argv[0]), argv[1:] or list(CHECKS)
    failed = 0
    for name in names:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            CHECKS[name](folder)
            result = {"check": name, "ok": True, "error": ""}
        except Exception:
            failed += 1
            result = {"check": name, "ok": False, "error": traceback.format_exc()}
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
