"""The project's extension ``xicon_pose_sessions`` against the pinned WanAnimatePreprocess and
SCAIL-Pose, in the stack's Python (onnxruntime, the stand-in detectors of
``scripts/make_synthetic_models.py``), imported as ComfyUI imports them.

Pose detection runs as a job runs it, twice (two jobs): the reference image's one frame, then the
clip's frames, on the same two models. Upstream builds a new ONNX session before every run after
the first; with the extension, a session that holds no GPU memory, or one on a GPU with room, is
built once; on a smaller GPU a run larger than the limit lets the sessions go after it, as
upstream's does. The detected poses are the same whichever way. The pinned source is the one the
extension was written against; a changed one, an unknown setting and ``release`` leave upstream's
behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.plugins.realstack import ROOT, Stack, pack_script, stack_json

EXT = ROOT / "stack" / "comfy_extension" / "xicon_pose_sessions" / "pose_sessions.py"
GENERATOR = ROOT / "scripts" / "make_synthetic_models.py"

SCRIPT = pack_script(
    ["custom_nodes/ComfyUI-WanAnimatePreprocess", "custom_nodes/ComfyUI-SCAIL-Pose"],
    "xicon_pose_sessions",
    r"""
import linecache, subprocess
from pathlib import Path
import numpy as np
import onnxruntime
import torch
generator, out_dir = script_args
ps = ext

subprocess.run([sys.executable, generator, "--size", "tiny", "--out", out_dir,
                "--only", "vitpose_l", "yolov10m"], check=True, capture_output=True)
detection = Path(out_dir) / "detection"
module = ps.onnx_models_module()
base = module.SimpleOnnxInference
node_class = nodes.NODE_CLASS_MAPPINGS["PoseDetectionVitPoseToDWPose"]
original = (base.cleanup, node_class.process)
out = {"module_found": module is not None,
       "digest_ok": ps.upstream_digest(base, node_class) == ps.UPSTREAM_SHA256}

starts = []
session_init = onnxruntime.InferenceSession.__init__
def counted(self, *a, **k):
    starts.append(1)
    return session_init(self, *a, **k)
onnxruntime.InferenceSession.__init__ = counted

default_limit = ps.KEEP_MAX_PIXEL_FRAMES
g = torch.Generator().manual_seed(3)
reference = torch.rand(1, 96, 64, 3, generator=g)
clip = torch.rand(8, 96, 64, 3, generator=g)

def poses(result):
    return [[np.asarray(p["bodies"]["candidate"]).tolist(), np.asarray(p["hands"]).tolist(),
             np.asarray(p["faces"]).tolist()] for p in result["poses"]]

def jobs(label, env=None, usable=None, limit=None, provider="CPUExecutionProvider"):
    base.cleanup, node_class.process = original
    ps.KEEP_MAX_PIXEL_FRAMES = default_limit if limit is None else limit
    patched = None if env is None else ps.patch(nodes.NODE_CLASS_MAPPINGS, env, lambda: usable)
    starts.clear(); lines.clear()
    model = {"yolo": module.Yolo(str(detection / "yolov10m.onnx"), provider),
             "vitpose": module.ViTPose(str(detection / "vitpose-l-wholebody.onnx"), provider)}
    node = node_class()
    results = []
    for _ in range(2):  # two jobs: the reference image, then the clip
        results.append(poses(node.process(model, reference)[0]))
        results.append(poses(node.process(model, clip)[0]))
    out[label] = {"patched": patched, "starts": len(starts), "lines": list(lines),
                  "poses": results, "alive": [m.session is not None for m in model.values()]}

jobs("upstream")
jobs("cpu", {})  # no CUDA device here: nothing to give back
jobs("big_gpu", {}, usable=79.2)
jobs("small_gpu_cpu_provider", {}, usable=31.5, limit=5 * 96 * 64)
# as on the GPU worker: the CUDA provider first on the sessions' list (onnxruntime here has only
# the CPU one and falls back to it); the clip's 8 frames are over the limit, the reference's 1 not
jobs("small_gpu", {}, usable=31.5, limit=5 * 96 * 64, provider="CUDAExecutionProvider")
jobs("release", {"XICON_POSE_SESSIONS": "release"}, usable=79.2)
jobs("keep", {"XICON_POSE_SESSIONS": "keep"}, usable=31.5, limit=5 * 96 * 64)
jobs("unknown", {"XICON_POSE_SESSIONS": "always"})
ps.KEEP_MAX_PIXEL_FRAMES = default_limit
out["decide"] = {
    "gpu_small_big_run": ps.keeps("auto", True, 31.5, (242, 672, 416)),
    "gpu_small_small_run": ps.keeps("auto", True, 31.5, (241, 672, 416)),
    "gpu_small_unsized": ps.keeps("auto", True, 31.5, None),
    "gpu_big": ps.keeps("auto", True, 40.0, (1441, 1920, 1080)),
    "cpu_provider": ps.keeps("auto", False, 31.5, (1441, 1920, 1080)),
}
base.cleanup, node_class.process = original
text = "def cleanup(self):\n    self.session = None\n"
linecache.cache["<edited>"] = (len(text), None, text.splitlines(keepends=True), "<edited>")
space = {}
exec(compile(text, "<edited>", "exec"), space)
base.cleanup = space["cleanup"]
out["changed"] = ps.patch(nodes.NODE_CLASS_MAPPINGS, {}, lambda: None)
base.cleanup, node_class.process = original

class Executor:
    async def execute_async(self, *a, **k):
        return "ran"
out["installed"] = ps.install(Executor, nodes.NODE_CLASS_MAPPINGS, {}, lambda: None)
out["again"] = ps.install(Executor, nodes.NODE_CLASS_MAPPINGS, {}, lambda: None)
out["before_prompt"] = getattr(base.cleanup, ps.WRAPPED, False)
lines.clear()
out["first_prompt"] = asyncio.run(Executor().execute_async())
out["after_prompt"] = getattr(base.cleanup, ps.WRAPPED, False)
out["prompt_lines"] = list(lines)
print(json.dumps(out))
""",
)


def test_sessions_are_built_once_where_there_is_room(stack: Stack, tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = stack_json(
        stack, SCRIPT, EXT, GENERATOR, tmp_path / "models", cwd=stack.comfy_dir, env=env
    )
    assert out["module_found"], "WanAnimatePreprocess's onnx_models was not found by its name"
    assert out["digest_ok"], "cleanup, reinit or the node's process changed at the pinned commits"

    upstream = out["upstream"]
    # two at construction, then two before each run after the first: the cost the extension cuts
    assert upstream["starts"] == 2 + 3 * 2 and upstream["alive"] == [False, False]
    for label in (
        "cpu",
        "big_gpu",
        "small_gpu_cpu_provider",
        "small_gpu",
        "release",
        "keep",
        "unknown",
    ):
        assert out[label]["poses"] == upstream["poses"], label  # the same poses, whichever way

    cpu = out["cpu"]
    assert cpu["patched"].endswith("kept between runs while there is room (no GPU)")
    assert cpu["starts"] == 2 and cpu["alive"] == [True, True]
    assert cpu["lines"] == [
        f"xicon_pose_sessions: {name}'s session kept for the next run (it holds no GPU memory)"
        for name in ("Yolo", "ViTPose")
    ]
    assert out["big_gpu"]["starts"] == 2 and out["big_gpu"]["alive"] == [True, True]
    assert "(79.2 GiB of GPU memory usable)" in out["big_gpu"]["patched"]

    # sessions on the CPU provider hold no GPU memory: kept whatever the GPU
    assert out["small_gpu_cpu_provider"]["starts"] == 2
    small = out["small_gpu"]
    # each job: the reference's run keeps them, the clip's run uses them, then lets them go
    assert small["starts"] == 2 + 2 and small["alive"] == [False, False], small
    assert [line for line in small["lines"] if "released" in line] == 2 * [
        f"xicon_pose_sessions: {name}'s session released (8 frame(s) of 64x96 on a 31.5-GiB GPU: "
        "the rest of the job needs the memory)"
        for name in ("Yolo", "ViTPose")
    ]
    kept = [line for line in small["lines"] if "kept" in line]
    assert kept and all("(1 frame(s) of 64x96 on a 31.5-GiB GPU)" in line for line in kept), kept
    # keep: always; release and an unknown setting: upstream's
    assert out["keep"]["starts"] == 2
    assert out["release"]["starts"] == upstream["starts"]
    assert out["release"]["patched"] == (
        "sessions released after every run as upstream does (XICON_POSE_SESSIONS=release)"
    )
    assert out["unknown"]["starts"] == upstream["starts"]
    assert out["unknown"]["patched"].startswith("XICON_POSE_SESSIONS must be one of auto, keep")

    decide = out["decide"]
    assert decide["gpu_small_big_run"][0] is False
    assert "the rest of the job needs the memory" in decide["gpu_small_big_run"][1]
    assert decide["gpu_small_small_run"][0] is True
    assert decide["gpu_small_unsized"][0] is False
    assert decide["gpu_big"] == [True, "40.0 GiB of GPU memory usable"]
    assert decide["cpu_provider"] == [True, "it holds no GPU memory"]

    assert "changed upstream" in out["changed"] and "released as upstream does" in out["changed"]
    assert out["installed"] == (
        "PoseDetectionVitPoseToDWPose's ONNX sessions will be looked after from the first prompt"
    )
    assert out["again"] == "already installed"
    assert not out["before_prompt"] and out["after_prompt"]
    assert out["first_prompt"] == "ran"
    assert len(out["prompt_lines"]) == 1
    assert "kept between runs while there is room (no GPU)" in out["prompt_lines"][0]
