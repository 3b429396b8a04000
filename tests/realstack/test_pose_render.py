"""The project's extension ``xicon_pose_render`` against the pinned ComfyUI-SCAIL-Pose, in the
stack's Python (taichi on the CPU here): ``RenderNLFPoses`` gives upstream's images and masks bit
for bit with and without it (one person, a solved camera, two people, another size, and the
renderer alone), the taichi runtime is built once and a job like an earlier one compiles no
kernel again. Run through ``bench/pose_render.py``, which prints the same figures on a GPU. The
node's output made batch by batch: its pieces against upstream's tail
(``pose_render_stream.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.plugins.realstack import ROOT, Stack, stack_json

BENCH = ROOT / "bench" / "pose_render.py"


def test_the_render_is_upstreams_bit_for_bit(stack: Stack) -> None:
    out = stack_json(
        stack,
        f"__file__ = {str(BENCH)!r}\n{BENCH.read_text()}",  # run as ``-c``, where it is unset
        "--comfy-dir",
        stack.comfy_dir,
        "--frames",
        "6",
        "--size",
        "48x64",
        "--device",
        "cpu",
        "--checks",
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    # The pinned functions are the ones the replacement reproduces; a new pin fails here first.
    assert out["digest_ok"] is True
    assert out["patch"].startswith("SCAIL pose render: taichi runtime and kernels kept"), out
    assert out["patch"].endswith("(XICON_POSE_RENDER_STREAM off)"), out  # the bench's middle runs
    assert out["taichi_arch"] == "Arch.x64"
    jobs = out["jobs"]
    assert set(jobs) == {"6 frames", "reference pose", "two people", "another size"}
    for name, job in jobs.items():
        # every run of upstream and of the extension (with upstream's tail, then with the node's
        # output made batch by batch), twice each, gave the same bytes ...
        assert job["equal"] is True, (name, job)
        assert job["random_equal"] is True, (name, job)  # the same random numbers drawn
        assert job["dtypes"] == ["['torch.float32', 'torch.float32']"], (name, job)
        # ... the last one streamed (a contiguous image), but not for two people (upstream's
        # other render function) ...
        assert job["contiguous"] == [False, False, name != "two people"], (name, job)
        # ... of frames with something in them: cylinders (the mask) and the 2D skeleton
        assert job["lit"] > 0.002 and job["drawn"] > 0.05, (name, job)
    assert jobs["another size"]["shape"] == [3, 56, 64, 3]
    # The renderer alone on random cylinders: upstream's bytes on the machines tried before; on
    # an Intel Xeon (AVX-512) CPU backend the batched kernel rounded otherwise at 3-20 of 3,072
    # pixels a frame, by one level of 255. Within that, never more.
    assert out["render_whole_lit"] > 1000
    assert out["render_whole_max_diff"] <= 1 and out["render_whole_share_apart"] < 0.005, out
    # one taichi runtime for every job after the extension was in place ...
    assert out["initialised"] == 1
    # ... and one kernel per set of constants: upstream's random cylinders, the field-of-view
    # camera (shared by one person and two), the solved camera, the other size; the second run
    # of each job compiled nothing
    assert out["compiled"] == 4


WARM_SCRIPT = r"""
import importlib.util, json, random, sys, threading
bench_file, comfy_dir, mode = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("pose_render_bench", bench_file)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import numpy as np
import taichi as ti

pr = bench.load("xicon_pose_render_impl", bench.EXT)
if mode != "upstream":
    pr.install()  # the import hook, as prestartup_script.py adds it
root = bench.Path(comfy_dir) / "custom_nodes" / bench.PACK
pack = bench.load(bench.PACK, root / "__init__.py", root)  # nlf_render not imported yet
node = pack.NODE_CLASS_MAPPINGS["RenderNLFPoses"]()
poses, dw = bench.clip(np.random.default_rng(3), 4)
out = {}

def render(key):
    random.seed(11)
    image, mask = node.predict(poses, 48, 64, dw_poses=dw, render_device="cpu")
    out[key] = bench.digest(image) + bench.digest(mask)

def on_one_thread(*steps):
    def work():
        for step in steps:
            step()
    thread = threading.Thread(target=work, name="prompt-worker")
    thread.start()
    thread.join()

def failed(step):  # a step's exception, recorded instead of printed by the thread
    def run():
        try:
            step()
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
    return run

# as install_warm runs it, on this machine's device (taichi's probe for "gpu" crashes here)
warm = lambda: out.update(warm=pr.warm(arch="cpu"))
if mode == "upstream":
    on_one_thread(failed(lambda: render("render")))
elif mode == "same":
    on_one_thread(warm, failed(lambda: render("render")))
else:  # started on one thread, rendered on another while the first still lives
    started, done = threading.Event(), threading.Event()
    def starter():
        warm()
        started.set()
        done.wait(60)
    first = threading.Thread(target=starter)
    first.start()
    started.wait(60)
    on_one_thread(failed(lambda: render("render")))
    done.set()
    first.join()
out["initialised"] = getattr(ti.init, "initialised", None)
out["arch"] = str(ti.lang.impl.current_cfg().arch)
print(json.dumps(out))
"""


def test_taichi_started_early_on_the_prompt_thread_renders_upstreams_frames(
    stack: Stack,
) -> None:
    """The early start (``warm``) and the render on one thread, as ComfyUI's prompt worker runs
    them: upstream's frames, one taichi start. Started on another thread than the render's,
    taichi refuses to compile (it compiles only on the thread that started it: what failed the
    first job's render on an H100, and why the start runs on the prompt worker)."""

    def run(mode: str) -> dict:
        return stack_json(
            stack,
            WARM_SCRIPT,
            BENCH,
            stack.comfy_dir,
            mode,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )

    upstream, same = run("upstream"), run("same")
    assert "render" in upstream and upstream["initialised"] is None
    # the early start found the pack, put the replacements in place and started taichi ...
    assert same["warm"].startswith("taichi started for the first render in "), same
    assert same["arch"] == "Arch.x64"
    # ... and the node's own taichi.init, on the same thread, started nothing: same frames
    assert same["initialised"] == 1
    assert "error" not in same and same["render"] == upstream["render"], same
    # started on a thread that still lives, rendered on another: taichi refuses, upstream's
    # fallback to its torch renderer fails on these poses, and the node raises
    other = run("another")
    assert other["warm"].startswith("taichi started for the first render in "), other
    assert "render" not in other and "error" in other, other


def test_the_output_made_batch_by_batch_is_upstreams_tail(stack: Stack) -> None:
    """``NodeOutput``, the renderer's sink and the wrapped ``predict`` in the stack's torch
    (``pose_render_stream.py``: a stand-in kernel and 2D pass; the real ones above)."""
    script = Path(__file__).with_name("pose_render_stream.py")
    ext = ROOT / "stack" / "comfy_extension" / "xicon_pose_render" / "pose_render.py"
    out = stack_json(stack, script.read_text(), ext)
    # the conversion in torch is upstream's numpy one, edges of every level included
    assert out["conversion"] == {"dtype": "uint8", "equal": True}
    # the tail's division written into the clip's image and the mask from the alpha levels at
    # or above 128 are upstream's ``/ 255.0`` and ``> 0.5`` on every level
    assert out["levels"] == {"mask_from": 128, "image_equal": True, "mask_equal": True}
    # batches in order make upstream's tail on the whole overlaid clip; others are refused
    batches = out["batches"]
    assert batches["complete_before"] == [False, False, False] and batches["complete"]
    assert batches["image_equal"] and batches["mask_equal"] and batches["contiguous"]
    assert 0 < batches["mask_mean"] < 1
    assert batches["refused"] == ["frames 2-4 after 0 of 4", "frames 3-5 after 3 of 4"]
    assert batches["other_complete"] is False
    # the renderer lists the clip without a sink, streams it to the clip's sink (nothing
    # listed), lists it for another clip's sink, and stops at a failed sink, keeping the error
    renderer = out["renderer"]
    assert renderer["listed"] == [9, True] and renderer["streamed_list"] == 0
    assert renderer["launches"] == [[0, 4], [4, 4], [8, 1]] and renderer["complete"]
    assert renderer["image_equal"] and renderer["others"] == [[9, 0], [9, 0]]
    assert renderer["failed_list"] == 0 and renderer["failed_launches"] == [[0, 4], [4, 4]]
    assert renderer["failed"] == "ValueError('pose 5 cannot be drawn')"
    assert renderer["failed_complete"] is False
    # predict: the streamed output, or upstream's own after a fallback, the same values and
    # the same random numbers drawn; nothing left on the thread; a failed 2D pass raised
    predict = out["predict"]
    for path, contiguous in (("streaming", True), ("fallback", False)):
        assert predict[path] == {
            "image_equal": True,
            "mask_equal": True,
            "contiguous": contiguous,
            "random_as_upstream": True,
            "left_clean": True,
        }, path
    assert predict["outside_predict"] == "listed"
    assert predict["failed_2d"] == "list index out of range" and predict["failed_left_clean"]


def test_the_kept_canvas_draws_upstreams_skeleton(stack: Stack) -> None:
    """``Skeleton`` (one canvas kept for the clip) against the pinned pack's 2D pass and its
    scatter (``pose_skeleton.py``): the same frames and the same random numbers drawn."""
    script = Path(__file__).with_name("pose_skeleton.py")
    ext = ROOT / "stack" / "comfy_extension" / "xicon_pose_render" / "pose_render.py"
    pack = stack.comfy_dir / "custom_nodes" / "ComfyUI-SCAIL-Pose"
    out = stack_json(stack, script.read_text(), ext, pack)
    cases = {
        "one_person": (150, 0),
        "job_size": (12, 0),
        "no_face": (20, 0),
        "no_hands": (20, 0),
        "people": (2, 3),  # two, none and three people: upstream's own pass for those
    }
    for name, (kept, by_upstream) in cases.items():
        case = out[name]
        assert case["equal"] and case["random_as_upstream"], (name, case)
        assert (case["kept"], case["upstream"]) == (kept, by_upstream), (name, case)
        assert case["canvas_clean"], (name, case)  # nothing left for the next frame
        # most frames had something drawn inside them (keypoints spread past the edges)
        assert case["changed"] >= 0.8 * (kept + by_upstream) - 1, (name, case)
    # a bad keypoint index fails as upstream's does and leaves the canvas clean
    assert out["bad_index"] == {
        "errors": ["IndexError", "IndexError"],
        "canvas_clean": True,
        "after": True,
    }
    # the cheeks' colours as upstream's canvas * 0.6 leaves them
    assert out["scaled"] == [[51, 0, 153], [102, 0, 153], [153, 0, 153], [153, 0, 102]]
