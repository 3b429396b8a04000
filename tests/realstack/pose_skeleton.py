"""Checks of ``xicon_pose_render``'s ``Skeleton`` against the pinned SCAIL-Pose's 2D pass, run by
the stack's Python (numpy and OpenCV; the pack's ``pose_draw`` package alone). Prints one JSON
object, which ``test_pose_render.py`` asserts:

    python tests/realstack/pose_skeleton.py EXTENSION_FILE SCAIL_POSE_DIR

Upstream here is ``render_nlf_as_images``'s 2D pass as the pinned pack runs it:
``draw_pose_to_canvas_np`` with its arguments on the clip's poses, then its boolean-mask scatter
over each frame. Each case compares the frames and the state of Python's ``random`` afterwards.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np


def load(path: Path, name: str, package: Path | None = None) -> types.ModuleType:
    locations = None if package is None else [str(package)]
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ext_file, pack_dir = Path(sys.argv[1]), Path(sys.argv[2])
pr = load(ext_file, "xicon_pose_render_impl")
pose_draw = pack_dir / "pose_draw"
package = types.ModuleType("pose_draw")
package.__path__ = [str(pose_draw)]  # type: ignore[attr-defined]
sys.modules["pose_draw"] = package
draw_utils = load(pose_draw / "draw_utils.py", "pose_draw.draw_utils")
draw_pose_utils = load(pose_draw / "draw_pose_utils.py", "pose_draw.draw_pose_utils")
draw_utils.hsv_to_rgb = pr.remembered(draw_utils.hsv_to_rgb)  # as the extension runs it


def upstream(frames: list[np.ndarray], poses: list, face: bool, hands: bool) -> None:
    h, w = frames[0].shape[:2]
    canvas_2d = pr.draw_2d_pass(draw_pose_utils.draw_pose_to_canvas_np, h, w, face, hands, poses)
    for frame, canvas in zip(frames, canvas_2d, strict=True):
        mask = canvas != 0
        frame[:, :, :3][mask] = canvas[mask]


def skeleton(h: int, w: int, face: bool, hands: bool) -> Any:
    draw_pass = functools.partial(
        pr.draw_2d_pass, draw_pose_utils.draw_pose_to_canvas_np, h, w, face, hands
    )
    return pr.Skeleton(draw_utils, draw_pass, h, w, face, hands)


def pose(rng: np.random.Generator, people: int = 1) -> dict:
    """Keypoints spread past the frame's edges; some bones and points missing (-1 in the
    subset, zeros in hands and faces), as the detector leaves them."""
    subset = np.tile(np.arange(18, dtype=np.float64), (people, 1))
    subset[rng.random((people, 18)) < 0.2] = -1
    hands = rng.uniform(-0.1, 1.1, (2 * people, 21, 2))
    hands[rng.random((2 * people, 21)) < 0.15] = 0
    faces = rng.uniform(0.2, 0.6, (people, 68, 2))
    faces[rng.random((people, 68)) < 0.1] = -1
    return {
        "bodies": {"candidate": rng.uniform(-0.15, 1.15, (people, 18, 2)), "subset": subset},
        "hands": hands,
        "faces": faces,
        "hands_score": np.ones((2 * people, 21)),
        "faces_score": np.ones((people, 68)),
    }


def compare(
    poses: list, size: tuple[int, int], face: bool = True, hands: bool = True, seed: int = 0
) -> dict[str, Any]:
    h, w = size
    rng = np.random.default_rng(seed)
    frames = list(rng.integers(0, 256, (len(poses), h, w, 4), dtype=np.uint8))
    before = [f.copy() for f in frames]
    theirs = [f.copy() for f in frames]
    random.seed(seed)
    upstream(theirs, copy.deepcopy(poses), face, hands)
    state = random.getstate()
    random.seed(seed)
    overlay = skeleton(h, w, face, hands)
    for frame, p in zip(frames, copy.deepcopy(poses), strict=True):
        overlay(frame, p)
    return {
        "equal": all(np.array_equal(a, b) for a, b in zip(frames, theirs, strict=True)),
        "random_as_upstream": random.getstate() == state,
        "kept": overlay.kept,
        "upstream": overlay.upstream,
        "canvas_clean": not overlay.canvas.any(),
        # frames the skeleton was laid over (something drawn inside the frame)
        "changed": sum(int((a != b).any()) for a, b in zip(frames, before, strict=True)),
    }


def bad_index() -> dict[str, Any]:
    """A subset naming a keypoint the pose does not have: upstream's error, then a clean canvas
    for the next frame."""
    rng = np.random.default_rng(9)
    bad, good = pose(rng), pose(rng)
    bad["bodies"]["subset"][0, 2] = 30
    errors = []
    try:
        upstream([np.zeros((40, 30, 4), np.uint8)], [copy.deepcopy(bad)], True, True)
    except Exception as exc:
        errors.append(type(exc).__name__)
    overlay = skeleton(40, 30, True, True)
    try:
        overlay(np.zeros((40, 30, 4), np.uint8), copy.deepcopy(bad))
    except Exception as exc:
        errors.append(type(exc).__name__)
    after = compare([good], (40, 30), seed=9)
    return {"errors": errors, "canvas_clean": not overlay.canvas.any(), "after": after["equal"]}


rng = np.random.default_rng(1)
out = {
    "one_person": compare([pose(rng) for _ in range(150)], (96, 64)),
    "job_size": compare([pose(rng) for _ in range(12)], (672, 416), seed=1),
    "no_face": compare([pose(rng) for _ in range(20)], (64, 48), face=False, seed=2),
    "no_hands": compare([pose(rng) for _ in range(20)], (64, 48), hands=False, seed=3),
    "people": compare([pose(rng, n) for n in (2, 0, 1, 3, 1)], (64, 48), seed=4),
    "bad_index": bad_index(),
    "scaled": pr._sibling("skeleton").SCALED[13:17],
}
print(json.dumps(out))
