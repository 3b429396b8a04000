"""The project's extension ``xicon_pose_batch`` against the pinned SCAIL-Pose and
WanAnimatePreprocess, in the stack's Python (onnxruntime's CPU provider, the stand-in detectors of
``scripts/make_synthetic_models.py``), imported as ComfyUI imports them.

Pose detection runs on a clip whose length is not a multiple of the batch, once as upstream runs
it and once batched: the poses are upstream's to the bit, and the calls are as many as the models
allow (ViTPose takes a batch; the YOLO stand-in, like YOLOv10m, takes one frame; a YOLO that takes
a batch, written here, gets batches too). The node batched and then wrapped by
``xicon_pose_sessions`` (as both are in the image) still finds upstream's poses with one session
start per model. The pinned source is the one the extension was written against; a changed one,
``off`` and an unknown setting leave upstream's ``process``; the import hook replaces it when
ComfyUI loads the pack.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.plugins.realstack import ROOT, Server, Stack, pack_script, stack_json

EXT = ROOT / "stack" / "comfy_extension" / "xicon_pose_batch" / "pose_batch.py"
SESSIONS = ROOT / "stack" / "comfy_extension" / "xicon_pose_sessions" / "pose_sessions.py"
GENERATOR = ROOT / "scripts" / "make_synthetic_models.py"

SCRIPT = pack_script(
    ["custom_nodes/ComfyUI-WanAnimatePreprocess", "custom_nodes/ComfyUI-SCAIL-Pose"],
    "xicon_pose_batch",
    r"""
import linecache, subprocess
from pathlib import Path
import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
generator, sessions_file, out_dir = script_args
pb = ext

subprocess.run([sys.executable, generator, "--size", "tiny", "--out", out_dir,
                "--only", "vitpose_l", "yolov10m"], check=True, capture_output=True)
detection = Path(out_dir) / "detection"

# a YOLO that takes a batch: per frame one person box that moves with the frame's brightness
mean = helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=1)
flat = helper.make_node("Reshape", ["m", "shape"], ["m3"])
moved = helper.make_node("Mul", ["m3", "step"], ["delta"])
box = helper.make_node("Add", ["delta", "base"], ["boxes"])
graph = helper.make_graph(
    [mean, flat, moved, box], "batch_yolo",
    [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 640, 640])],
    [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", 1, 6])],
    initializer=[
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.array([[[300, 0, 300, 0, 0, 0]]], np.float32), "step"),
        numpy_helper.from_array(np.array([[[100, 60, 400, 600, 0.9, 0]]], np.float32), "base"),
    ],
)
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
          str(detection / "yolo_batch.onnx"))

module = next(m for name, m in sys.modules.items() if name.endswith(pb.TARGET))
node_class = module.PoseDetectionVitPoseToDWPose
original = node_class.process
out = {"digest_ok": pb.upstream_digest(original) == pb.UPSTREAM_SHA256}

calls = {}
session_run = onnxruntime.InferenceSession.run
def counted(self, names, feed, *a, **k):
    (value,) = feed.values()
    calls.setdefault(self._model_path, []).append(int(value.shape[0]))
    return session_run(self, names, feed, *a, **k)
onnxruntime.InferenceSession.run = counted
starts = []
session_init = onnxruntime.InferenceSession.__init__
def started(self, *a, **k):
    starts.append(1)
    return session_init(self, *a, **k)
onnxruntime.InferenceSession.__init__ = started

g = torch.Generator().manual_seed(5)
# frames of different brightness: the batch-taking YOLO's box moves from frame to frame
clip = torch.rand(19, 96, 64, 3, generator=g) * torch.linspace(0.2, 1.0, 19)[:, None, None, None]

def poses(result):
    return [[np.asarray(p["bodies"]["candidate"]).tolist(), np.asarray(p["hands"]).tolist(),
             np.asarray(p["faces"]).tolist()] for p in result["poses"]]

def detect(label, yolo="yolov10m.onnx", env=None, runs=1):
    node_class.process = original
    patched = None if env is None else pb.patch(module, env)
    calls.clear(); starts.clear(); lines.clear(); yolo_threads.clear(); decode_threads.clear()
    model = {"yolo": module_onnx.Yolo(str(detection / yolo), "CPUExecutionProvider"),
             "vitpose": module_onnx.ViTPose(str(detection / "vitpose-l-wholebody.onnx"),
                                            "CPUExecutionProvider")}
    node = node_class()
    results = [poses(node.process(model, clip)[0]) for _ in range(runs)]
    out[label] = {"patched": patched, "poses": results[0], "same_runs": results[1:] == results[:-1],
                  "calls": {Path(k).name: list(v) for k, v in calls.items()}, "lines": list(lines),
                  "starts": len(starts), "yolo_threads": sorted(set(yolo_threads)),
                  "decode_threads": sorted(set(decode_threads)),
                  "replaced": getattr(node_class.process, pb.REPLACED, None)}

module_onnx = next(m for name, m in sys.modules.items()
                   if name.endswith("ComfyUI-WanAnimatePreprocess.models.onnx_models"))
import threading
yolo_threads = []
yolo_forward = module_onnx.Yolo.forward
def yolo_in_thread(self, *a, **k):
    yolo_threads.append(threading.current_thread().name.split("_")[0])
    return yolo_forward(self, *a, **k)
module_onnx.Yolo.forward = yolo_in_thread
# the thread that decodes ViTPose's heatmaps (ViTPose.forward reads this global at call time)
decode_threads = []
keypoints_from_heatmaps = module_onnx.keypoints_from_heatmaps
def decode_in_thread(*a, **k):
    decode_threads.append(threading.current_thread().name.split("_")[0])
    return keypoints_from_heatmaps(*a, **k)
module_onnx.keypoints_from_heatmaps = decode_in_thread
# here onnxruntime has the CPU provider only: sessions on it find their boxes in the node's
# thread; the GPU's way (YOLO's thread ahead of ViTPose) is taken by saying the sessions are on it
on_gpu = pb.on_gpu
detect("cpu_provider", env={"XICON_POSE_BATCH": "8"})
pb.on_gpu = lambda model: True
detect("upstream")
detect("upstream_batch_yolo", yolo="yolo_batch.onnx")
detect("batched", env={"XICON_POSE_BATCH": "8"})
detect("batched_yolo", yolo="yolo_batch.onnx", env={"XICON_POSE_BATCH": "8"})
detect("default", env={})
detect("off", env={"XICON_POSE_BATCH": "off"})
detect("unknown", env={"XICON_POSE_BATCH": "lots"})
detect("too_big", env={"XICON_POSE_BATCH": "100000"})
# one thread: the boxes found before the keypoints, chunk by chunk
node_class.process = pb.batched(original, 8, pipelined=False)
calls.clear()
model = {"yolo": module_onnx.Yolo(str(detection / "yolov10m.onnx"), "CPUExecutionProvider"),
         "vitpose": module_onnx.ViTPose(str(detection / "vitpose-l-wholebody.onnx"),
                                        "CPUExecutionProvider")}
out["serial"] = {"poses": poses(node_class().process(model, clip)[0]),
                 "calls": {Path(k).name: list(v) for k, v in calls.items()}}

# YOLO failing on the third frame: the node raises its error, and no thread is left behind
node_class.process = pb.batched(original, 4)
seen = []
def failing(self, *a, **k):
    seen.append(1)
    if len(seen) == 3:
        raise RuntimeError("yolo broke")
    return yolo_forward(self, *a, **k)
def raised(label):  # the node's error under label; the threads it left behind
    threads = threading.active_count()
    try:
        node_class().process(model, clip)
        out[label] = "no error"
    except RuntimeError as e:
        out[label] = str(e)
    return threading.active_count() - threads
module_onnx.Yolo.forward = failing
out["threads_left"] = raised("failure")
module_onnx.Yolo.forward = yolo_in_thread
out["yolo_calls_after_failure"] = len(seen)
# the decoding failing on its second chunk: the node raises its error, no thread is left behind
decoded = []
def failing_decode(*a, **k):
    decoded.append(1)
    if len(decoded) == 2:
        raise RuntimeError("decoding broke")
    return keypoints_from_heatmaps(*a, **k)
module_onnx.keypoints_from_heatmaps = failing_decode
out["decode_threads_left"] = raised("decode_failure")
module_onnx.keypoints_from_heatmaps = decode_in_thread
# ViTPose.forward's steps are taken apart only for its pinned source
out["steps_pinned"] = pb.vitpose_steps(model["vitpose"]) is not None
class OtherViTPose(module_onnx.ViTPose):
    def forward(self, img, center, scale, **kwargs):
        return super().forward(img, center, scale, **kwargs)
out["steps_other"] = pb.vitpose_steps(OtherViTPose.__new__(OtherViTPose))
out["steps_none"] = pb.vitpose_steps(object())

node_class.process = original
out["again"] = pb.patch(module, {"XICON_POSE_BATCH": "8"})
out["twice"] = pb.patch(module, {"XICON_POSE_BATCH": "8"})

# as in the image: batched at load, then xicon_pose_sessions wraps it at the first prompt
spec = importlib.util.spec_from_file_location("sessions_under_test", sessions_file)
ps = importlib.util.module_from_spec(spec); sys.modules[spec.name] = ps
spec.loader.exec_module(ps)
out["sessions"] = ps.patch(nodes.NODE_CLASS_MAPPINGS, {}, lambda: None)
calls.clear(); starts.clear()
model = {"yolo": module_onnx.Yolo(str(detection / "yolov10m.onnx"), "CPUExecutionProvider"),
         "vitpose": module_onnx.ViTPose(str(detection / "vitpose-l-wholebody.onnx"),
                                        "CPUExecutionProvider")}
both = [poses(node_class().process(model, clip)[0]) for _ in range(2)]
out["both"] = {"same": both == [out["upstream"]["poses"]] * 2, "starts": len(starts),
               "vitpose_calls": calls[str(detection / "vitpose-l-wholebody.onnx")]}
onnx_models_base = module_onnx.SimpleOnnxInference
node_class.process = original

# a changed upstream process is left alone
text = "def process(self, vitpose_model, images):\n    return None\n"
linecache.cache["<edited>"] = (len(text), None, text.splitlines(keepends=True), "<edited>")
space = {}
exec(compile(text, "<edited>", "exec"), space)
node_class.process = space["process"]
out["changed"] = pb.patch(module, {})
node_class.process = original

# the import hook: the pack loaded again, as ComfyUI loads it, comes out batched
for name in [n for n in sys.modules if "ComfyUI-SCAIL-Pose" in n]:
    del sys.modules[name]
hooks = []
out["installed"] = pb.install({"XICON_POSE_BATCH": "4"}, hooks)
out["installed_again"] = pb.install({}, hooks)
sys.meta_path[:0] = hooks
lines.clear()
loaded = nodes.load_custom_node("custom_nodes/ComfyUI-SCAIL-Pose")
if asyncio.iscoroutine(loaded):
    asyncio.run(loaded)
reloaded = next(m for name, m in sys.modules.items() if name.endswith(pb.TARGET))
out["hooked"] = getattr(reloaded.PoseDetectionVitPoseToDWPose.process, pb.REPLACED, None)
out["hook_lines"] = list(lines)
print(json.dumps(out))
""",
)


def test_batched_detection_finds_upstreams_poses(stack: Stack, tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = stack_json(
        stack, SCRIPT, EXT, GENERATOR, SESSIONS, tmp_path / "models", cwd=stack.comfy_dir, env=env
    )
    assert out["digest_ok"], "PoseDetectionVitPoseToDWPose.process changed at the pinned commit"

    upstream = out["upstream"]
    assert upstream["calls"] == {"yolov10m.onnx": [1] * 19, "vitpose-l-wholebody.onnx": [1] * 19}
    assert len(upstream["poses"]) == 19
    # the clip's frames give different poses, so a frame out of place would show
    assert len({str(p) for p in upstream["poses"]}) > 1

    # the CPU provider: batched, no thread; the GPU's way: YOLO in its own thread
    cpu = out["cpu_provider"]
    assert cpu["poses"] == upstream["poses"] and cpu["yolo_threads"] == ["MainThread"], cpu
    assert cpu["calls"] == {"yolov10m.onnx": [1] * 19, "vitpose-l-wholebody.onnx": [8, 8, 3]}
    assert out["batched"]["yolo_threads"] == ["xicon"], out["batched"]["yolo_threads"]
    assert upstream["yolo_threads"] == ["MainThread"]
    # ViTPose's heatmaps decoded in a thread of their own on the GPU's way, in the node's thread
    # on the CPU provider and upstream
    assert out["batched"]["decode_threads"] == ["xicon"], out["batched"]["decode_threads"]
    assert cpu["decode_threads"] == upstream["decode_threads"] == ["MainThread"]
    assert out["decode_failure"] == "decoding broke" and out["decode_threads_left"] == 0
    assert out["steps_pinned"] is True
    assert out["steps_other"] is None and out["steps_none"] is None

    batched = out["batched"]
    assert batched["patched"] == (
        "pose detection runs its detectors 8 frames per call where their models take a batch"
    )
    assert batched["replaced"] == 8
    assert batched["poses"] == upstream["poses"]  # to the bit on the CPU provider
    # YOLO's input is [1,3,640,640]: one frame a call; ViTPose's batch axis is dynamic
    assert batched["calls"] == {"yolov10m.onnx": [1] * 19, "vitpose-l-wholebody.onnx": [8, 8, 3]}

    batch_yolo = out["batched_yolo"]
    assert batch_yolo["poses"] == out["upstream_batch_yolo"]["poses"]
    assert batch_yolo["calls"] == {
        "yolo_batch.onnx": [8, 8, 3],
        "vitpose-l-wholebody.onnx": [8, 8, 3],
    }
    assert out["upstream_batch_yolo"]["poses"] != upstream["poses"]  # its boxes move the crops

    assert out["serial"]["poses"] == upstream["poses"]
    assert out["serial"]["calls"] == batched["calls"]
    assert out["failure"] == "yolo broke"
    assert out["threads_left"] == 0
    # YOLO is not called again once it failed: the chunks after it are not searched
    assert out["yolo_calls_after_failure"] == 3

    default = out["default"]
    assert default["replaced"] == 16 and default["poses"] == upstream["poses"]
    assert default["calls"]["vitpose-l-wholebody.onnx"] == [16, 3]
    for label, reason in (
        ("off", "XICON_POSE_BATCH=off: one frame per call as upstream"),
        ("unknown", "XICON_POSE_BATCH must be off or a whole number 1-256; one frame per call"),
        ("too_big", "XICON_POSE_BATCH must be off or a whole number 1-256; one frame per call"),
    ):
        assert out[label]["patched"] == f"{reason}; pose detection left as it is", label
        assert out[label]["replaced"] is None and out[label]["calls"] == upstream["calls"], label
        assert out[label]["poses"] == upstream["poses"], label
    assert out["again"].startswith("pose detection runs its detectors 8 frames per call")
    assert out["twice"] == "already in place"

    assert out["sessions"] == (
        "the pose detectors' ONNX sessions are kept between runs while there is room (no GPU)"
    )
    both = out["both"]
    assert both["same"], "batched and sessions kept: upstream's poses"
    assert both["starts"] == 2  # one session per model for both runs
    assert both["vitpose_calls"] == [8, 8, 3, 8, 8, 3]  # the 8-frame patch above, wrapped

    assert "changed upstream" in out["changed"] and "left as it is" in out["changed"]
    assert out["installed"] is True and out["installed_again"] is False
    assert out["hooked"] == 4
    assert out["hook_lines"] == [
        "xicon_pose_batch: pose detection runs its detectors 4 frames per call where their "
        "models take a batch"
    ]


def test_the_workers_comfyui_batches_pose_detection(real_worker: Server) -> None:
    """The hook found SCAIL-Pose's module in the ComfyUI the worker started."""
    log = Path(real_worker.log).read_text(errors="replace")
    assert (
        "xicon_pose_batch: pose detection runs its detectors 16 frames per call where their "
        "models take a batch"
    ) in log


YOLO_INPUT = r"""
import importlib.util, json, sys
import cv2
import numpy as np
spec = importlib.util.spec_from_file_location("pb", sys.argv[1])
pb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pb)
side = pb.YOLO_SIDE
rng = np.random.default_rng(5)
out = {}
shapes = {"rgb": (5, 37, 23, 3), "rgba": (3, 640, 641, 4), "square": (2, 640, 640, 3)}
for name, shape in shapes.items():
    frames = rng.random(shape, dtype=np.float32)
    planes = pb.yolo_input(frames, 2, cv2, np)
    rows = []
    for start in range(0, len(frames), 2):  # the last call shorter, as a clip's last chunk
        chunk = frames[start : start + 2]
        want = np.stack([cv2.resize(img, (side, side)).transpose(2, 0, 1) for img in chunk])
        got = planes(chunk)
        same = bool(np.array_equal(got, want))
        rows.append([got.shape == want.shape, got.dtype == want.dtype, same])
    again = planes(frames[:1])
    out[name] = {"rows": rows, "kept": bool(np.shares_memory(again, got))}


class Copying:  # an OpenCV whose split returns new planes: the values still land in place
    resize = staticmethod(cv2.resize)

    @staticmethod
    def split(m, mv=None):
        return [np.ascontiguousarray(m[:, :, k]).copy() for k in range(m.shape[2])]


frames = rng.random((2, 50, 30, 3), dtype=np.float32)
got = pb.yolo_input(frames, 2, Copying, np)(frames)
want = np.stack([cv2.resize(img, (side, side)).transpose(2, 0, 1) for img in frames])
out["copying_split"] = bool(np.array_equal(got, want))
print(json.dumps(out))
"""


def test_yolos_input_is_upstreams_expression_in_kept_arrays(stack: Stack) -> None:
    """``yolo_input`` gives the values of upstream's ``np.stack([cv2.resize(...).transpose(2, 0,
    1)])`` for 3 and 4 channels and a short last call, in the same arrays every call, also with
    an OpenCV whose ``split`` does not write into the planes given."""
    out = stack_json(stack, YOLO_INPUT, EXT)
    for name in ("rgb", "rgba", "square"):
        assert all(row == [True, True, True] for row in out[name]["rows"]), (name, out[name])
        assert out[name]["kept"] is True, name
    assert len(out["rgb"]["rows"]) == 3
    assert out["copying_split"] is True
