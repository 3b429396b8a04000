"""The project's extension ``xicon_pose_render`` against the pinned ComfyUI-SCAIL-Pose, in the
stack's Python (taichi on the CPU here): ``RenderNLFPoses`` gives upstream's images and masks bit
for bit with and without it (one person, a solved camera, two people, another size, and the
renderer alone), the taichi runtime is built once and a job like an earlier one compiles no
kernel again. Run through ``bench/pose_render.py``, which prints the same figures on a GPU.
"""

from __future__ import annotations

import os

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
    assert out["taichi_arch"] == "Arch.x64"
    jobs = out["jobs"]
    assert set(jobs) == {"6 frames", "reference pose", "two people", "another size"}
    for name, job in jobs.items():
        # every run of upstream and of the extension, twice each, gave the same bytes ...
        assert job["equal"] is True, (name, job)
        # ... of frames with something in them: cylinders (the mask) and the 2D skeleton
        assert job["lit"] > 0.002 and job["drawn"] > 0.05, (name, job)
    assert jobs["another size"]["shape"] == [3, 56, 64, 3]
    assert out["render_whole_equal"] is True and out["render_whole_lit"] > 1000
    # one taichi runtime for every job after the extension was in place ...
    assert out["initialised"] == 1
    # ... and one kernel per set of constants: upstream's random cylinders, the field-of-view
    # camera (shared by one person and two), the solved camera, the other size; the second run
    # of each job compiled nothing
    assert out["compiled"] == 4
