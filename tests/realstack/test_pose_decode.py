"""The project's extension ``xicon_pose_decode`` against the pinned WanAnimatePreprocess, in the
stack's Python (NumPy, OpenCV): the all-keypoints decoding gives upstream's keypoints and scores
on realistic and degenerate heatmaps, the pinned source is the one it was written against, and the
real ComfyUI the worker runs has it in place.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.plugins.realstack import ROOT, Server, Stack, stack_json

EXT = ROOT / "stack" / "comfy_extension" / "xicon_pose_decode" / "pose_decode.py"

SCRIPT = r"""
import importlib.util, json, sys, time
import numpy as np

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

pd = load("pose_decode_under_test", sys.argv[1])
p2d = load("pose2d_utils_pinned", sys.argv[2])
fast = pd.replacement(p2d.keypoints_from_heatmaps, p2d)
rng = np.random.default_rng(7)
H, W, K = 64, 48, 133
yy, xx = np.mgrid[0:H, 0:W]

def gaussians(n):
    cy = rng.uniform(-4, H + 4, size=(n, K)); cx = rng.uniform(-4, W + 4, size=(n, K))
    d2 = (yy[None, None] - cy[..., None, None]) ** 2 + (xx[None, None] - cx[..., None, None]) ** 2
    peak = rng.uniform(0.05, 1.0, size=(n, K, 1, 1))
    noise = rng.normal(0, 0.02, size=(n, K, H, W))
    return (np.exp(-d2 / 8.0) * peak + noise).astype(np.float32)

cases = {"gaussians": gaussians(4)}
flat = gaussians(1); flat[0, :20] = 0.25  # argmax at the corner, zero Hessian
zero = gaussians(1); zero[0, :10] = 0.0  # all-zero maps: upstream divides 0 by 0
edge = gaussians(1); edge[0, :, 0, 0] = 5.0  # every peak on the border
cases.update(flat=flat, zero=zero, edge=edge)
out = {"digest_ok": pd.upstream_digest(p2d) == pd.UPSTREAM_SHA256}
for name, hm in cases.items():
    n = hm.shape[0]
    center = rng.uniform(100, 400, size=(n, 2)); scale = rng.uniform(0.5, 2, size=(n, 2)) * 200
    before = hm.copy()
    with np.errstate(all="ignore"):
        a_pts, a_prob = p2d.keypoints_from_heatmaps(hm, center, scale, unbiased=True, use_udp=False)
    b_pts, b_prob = fast(heatmaps=hm, center=center, scale=scale, unbiased=True, use_udp=False)
    same_nan = bool((np.isnan(a_pts) == np.isnan(b_pts)).all())
    diff = float(np.nanmax(np.abs(a_pts - b_pts))) if not np.isnan(a_pts).all() else 0.0
    out[name] = {"max_px": diff, "scores_equal": bool(np.array_equal(a_prob, b_prob)),
                 "same_nan": same_nan, "input_untouched": bool(np.array_equal(hm, before))}
# the arrays decode_all keeps between calls give what new arrays give (a new thread's): after
# the cases above, for as many maps, fewer, and another map size
import threading
reuse = {}
smaller = gaussians(2)[:, :, :40, :30].copy()
for name, hm in {"again": gaussians(4), "fewer": gaussians(2), "smaller": smaller}.items():
    n = hm.shape[0]
    center = rng.uniform(100, 400, size=(n, 2)); scale = rng.uniform(0.5, 2, size=(n, 2)) * 200
    here = fast(heatmaps=hm, center=center, scale=scale, unbiased=True, use_udp=False)
    there = []
    args = {"heatmaps": hm, "center": center, "scale": scale, "unbiased": True}
    thread = threading.Thread(target=lambda: there.append(fast(**args)))
    thread.start(); thread.join()
    reuse[name] = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(here, there[0]))
out["reuse"] = reuse
# the same memory for a chunk of as many maps or fewer, the framed maps' frames still zero
first = pd.kept_arrays(4 * K, 74, 58)
second = pd.kept_arrays(2 * K, 74, 58)
framed = first[0]
out["kept"] = {
    "reused": bool(np.shares_memory(first[0], second[0]) and np.shares_memory(first[1], second[1])),
    "frames_zero": bool((framed[:, :5] == 0).all() and (framed[:, -5:] == 0).all()
                        and (framed[:, :, :5] == 0).all() and (framed[:, :, -5:] == 0).all()),
    "bigger_new": not np.shares_memory(pd.kept_arrays(5 * K, 74, 58)[0], first[0]),
}
# another mode goes to upstream's own function
hm = gaussians(1); c = np.array([[200.0, 300.0]]); s = np.array([[1.0, 1.5]]) * 200
a = p2d.keypoints_from_heatmaps(hm, c, s, post_process="default")
b = fast(hm, c, s, post_process="default")
out["default_mode_equal"] = bool(np.array_equal(a[0], b[0]))
hm = gaussians(1)
t0 = time.perf_counter(); [p2d.keypoints_from_heatmaps(hm, c, s, unbiased=True) for _ in range(20)]
t1 = time.perf_counter(); [fast(hm, c, s, unbiased=True) for _ in range(20)]
t2 = time.perf_counter()
out["ms_per_frame"] = {"upstream": (t1 - t0) * 50, "all_at_once": (t2 - t1) * 50}
print(json.dumps(out))
"""


def test_decoding_matches_the_pinned_upstream(stack: Stack) -> None:
    pose2d = (
        stack.comfy_dir / "custom_nodes" / "ComfyUI-WanAnimatePreprocess" / "pose_utils"
    ) / "pose2d_utils.py"
    out = stack_json(stack, SCRIPT, EXT, pose2d, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    # The pinned functions are the ones the replacement reproduces; a new pin fails here first.
    assert out["digest_ok"] is True
    for case in ("gaussians", "flat", "zero", "edge"):
        figures = out[case]
        assert figures["scores_equal"] and figures["same_nan"], (case, figures)
        assert figures["input_untouched"], case
        assert figures["max_px"] < 1e-3, (case, figures)  # float32 rounding of the 2x2 inverse
    assert out["default_mode_equal"] is True
    assert out["kept"] == {"reused": True, "frames_zero": True, "bigger_new": True}, out["kept"]
    assert out["reuse"] == {"again": True, "fewer": True, "smaller": True}, out["reuse"]
    print("keypoint decoding per frame (ms):", out["ms_per_frame"])


def test_the_workers_comfyui_decodes_with_the_extension(real_worker: Server) -> None:
    """The hook found WanAnimatePreprocess's module in the ComfyUI the worker started."""
    log = Path(real_worker.log).read_text(errors="replace")
    assert "xicon_pose_decode: ViTPose keypoints decoded for all keypoints at once" in log
