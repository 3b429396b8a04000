"""Checks of ``xicon_pose_render``'s output made batch by batch, run by the stack's Python (torch
and numpy; taichi, the pack and ComfyUI are not needed: the kernel and the 2D pass are stand-ins
here, the real ones are in ``test_the_render_is_upstreams_bit_for_bit``). Prints one JSON object,
each check's figures, which ``test_pose_render.py`` asserts:

    python tests/realstack/pose_render_stream.py EXTENSION_FILE
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pr = load(Path(sys.argv[1]), "xicon_pose_render_impl")
renderer_module = sys.modules[pr.Renderer.__module__]


def upstream_tail(frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """``RenderNLFPoses.predict``'s last lines (ComfyUI-SCAIL-Pose, pinned commit)."""
    frames_tensor = torch.from_numpy(np.stack(frames, axis=0)).contiguous() / 255.0
    frames_tensor, mask = frames_tensor[..., :3], frames_tensor[..., -1] > 0.5
    return frames_tensor.cpu().float(), mask.cpu().float()


def drawn(poses: list, size: tuple[int, int] = (4, 3)) -> list[np.ndarray]:
    """A 2D pass: pose ``p`` draws row ``p % 4`` in ``40 + p``; one random number per pose, as
    upstream's draws random numbers (``drop_aug``)."""
    canvases = []
    for pose in poses:
        canvas = np.zeros((*size, 3), np.uint8)
        canvas[pose % size[0]] = 40 + pose
        random.random()
        canvases.append(canvas)
    return canvases


def overlay_with(draw: Any) -> Any:
    """A ``NodeOutput``'s overlay: the pose drawn by ``draw``, laid over its frame."""
    return lambda frame, pose: pr.lay_over(frame, draw([pose])[0])


def rgba(count: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (count, 4, 3, 4), dtype=np.uint8))


def overlaid(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Upstream's order: the 3D frames, the 2D pass over the clip, laid over each frame."""
    out = [f.copy() for f in frames]
    for frame, canvas in zip(out, drawn(list(range(len(out)))), strict=True):
        mask = canvas != 0
        frame[:, :, :3][mask] = canvas[mask]
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(a.equal(b))


def conversion() -> dict[str, Any]:
    edges = [k / 255 for k in range(256)] + [np.nextafter(k / 255, 2) for k in range(256)]
    edges += [-1.0, -0.0, 0.0, 1e-9, 0.5, 1.0, 1.0000001, 2.0, 1e30, -1e30]
    rng = np.random.default_rng(2)
    values = np.concatenate(
        [np.array(edges, np.float32), rng.uniform(-0.2, 1.2, 60_000).astype(np.float32)]
    )
    frames = values[: (values.size // 12) * 12].reshape(-1, 1, 3, 4)
    expected = (np.clip(frames, 0, 1) * 255).astype(np.uint8)  # upstream's, per frame
    got = renderer_module.to_uint8(frames.copy())
    return {"dtype": str(got.dtype), "equal": bool(np.array_equal(got, expected))}


def levels() -> dict[str, Any]:
    """Every level in every channel: the batch's image and mask against upstream's tail."""
    level = np.arange(256, dtype=np.uint8)
    frames = [np.stack([np.roll(level, 7 * c) for c in range(4)], axis=-1).reshape(16, 16, 4)]
    frames.append(255 - frames[0])
    image, mask = upstream_tail(frames)
    output = pr.NodeOutput([0, 1], lambda frame, pose: None, 2, 16, 16)
    output.take(0, np.stack(frames))
    return {
        "mask_from": pr.mask_from(),
        "image_equal": same(output.image, image),
        "mask_equal": same(output.mask, mask),
    }


def batches() -> dict[str, Any]:
    frames = rgba(7)
    image, mask = upstream_tail(overlaid(frames))
    output = pr.NodeOutput(list(range(7)), overlay_with(drawn), 7, 4, 3)
    complete_before = []
    for first in (0, 3, 6):
        complete_before.append(output.complete)
        output.take(first, np.stack(frames[first : first + 3]))
    refused = []
    other = pr.NodeOutput(list(range(4)), overlay_with(drawn), 4, 4, 3)
    for first, count in ((2, 2), (0, 3), (3, 2)):
        try:
            other.take(first, np.stack(rgba(count)))
        except RuntimeError as exc:
            refused.append(str(exc))
    return {
        "complete_before": complete_before,
        "complete": output.complete,
        "image_equal": same(output.image, image),
        "mask_equal": same(output.mask, mask),
        "contiguous": output.image.is_contiguous(),
        "mask_mean": float(mask.mean()),
        "refused": refused,
        "other_complete": other.complete,
    }


class FakeNdarray:
    def __init__(self, dtype: Any, shape: Any) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.data = np.zeros(shape + ((4,) if dtype == "vec4" else ()), np.float32)

    def from_numpy(self, array: np.ndarray) -> None:
        self.data = np.asarray(array)

    def to_numpy(self) -> np.ndarray:
        return self.data.copy()


CLIP = np.random.default_rng(5).uniform(-0.1, 1.1, (9, 4, 3, 4)).astype(np.float32)
LAUNCHES: list[tuple[int, int]] = []


def fake_taichi() -> None:
    """``taichi`` as the renderer uses it; its kernel copies frames of ``CLIP`` into the batch."""
    runtime = types.SimpleNamespace(prog=object())
    ti = types.ModuleType("taichi")
    ti.ndarray = FakeNdarray
    ti.math = types.SimpleNamespace(vec3="vec3", vec4="vec4")
    ti.i32 = "i32"
    ti.lang = types.SimpleNamespace(impl=types.SimpleNamespace(get_runtime=lambda: runtime))
    sys.modules["taichi"] = ti

    def build_kernel(*constants: Any) -> Any:
        def render(img: FakeNdarray, first: int, n: int, *rest: Any) -> None:
            LAUNCHES.append((first, n))
            img.data[:n] = CLIP[first : first + n]

        return render

    renderer_module.build_kernel = build_kernel
    renderer_module.BATCH_BYTES = 4 * 3 * 16 * 4  # 4 frames a launch


def flatten_specs(specs: list) -> tuple[np.ndarray, ...]:
    starts = np.ones((len(specs), 3), np.float32)
    return starts, starts, np.ones((len(specs), 4)), np.arange(len(specs)), np.ones(len(specs))


def renderer_sink() -> dict[str, Any]:
    expected = (np.clip(CLIP, 0, 1) * 255).astype(np.uint8)
    sinks: list[Any] = [None]
    renderer = pr.Renderer(flatten_specs, lambda: sinks[0])
    listed = renderer([0] * 9, H=4, W=3)
    output = sinks[0] = pr.NodeOutput(list(range(9)), overlay_with(drawn), 9, 4, 3)
    LAUNCHES.clear()
    streamed = renderer([0] * 9, H=4, W=3)
    launches = list(LAUNCHES)
    others = []
    for other in (
        pr.NodeOutput([], overlay_with(drawn), 8, 4, 3),
        pr.NodeOutput([], overlay_with(drawn), 9, 3, 4),
    ):
        sinks[0] = other
        others.append([len(renderer([0] * 9, H=4, W=3)), other.done])

    def failing(poses: list) -> list:
        if poses[0] == 5:
            raise ValueError("pose 5 cannot be drawn")
        return drawn(poses)

    failed = sinks[0] = pr.NodeOutput(list(range(9)), overlay_with(failing), 9, 4, 3)
    LAUNCHES.clear()
    after_failure = renderer([0] * 9, H=4, W=3)
    return {
        "listed": [len(listed), bool(np.array_equal(np.stack(listed), expected))],
        "streamed_list": len(streamed),
        "launches": launches,
        "complete": output.complete,
        "image_equal": same(output.image, upstream_tail(overlaid(list(expected)))[0]),
        "others": others,
        "failed_list": len(after_failure),
        "failed_launches": list(LAUNCHES),
        "failed": repr(failed.failed),
        "failed_complete": failed.complete,
    }


def node(original: Any, draw: Any = drawn) -> tuple[Any, Any]:
    """``render_nlf_as_images`` replaced, and a ``predict`` that renders then runs upstream's
    tail, wrapped as the extension wraps the node's."""
    render = pr.overlay_after(
        original, lambda poses, **kwargs: draw(poses), types.ModuleType("draw_utils")
    )

    def predict(self: Any, count: int) -> Any:
        return upstream_tail(render(None, list(range(count)), 4, 3, count))

    return render, pr.streamed(predict)


def left_clean() -> bool:
    return pr.current_sink() is None and getattr(pr._local, "request", None) is None


def predict_paths() -> dict[str, Any]:
    frames = rgba(5, seed=3)
    image, mask = upstream_tail(overlaid(frames))
    random.seed(4)
    for _ in range(5):
        random.random()
    after_clip = random.random()  # the next number once the 2D pass has drawn the clip's

    def streaming(smpl, dw, height, width, video_length, **kwargs: Any) -> list:
        sink = pr.current_sink()
        sink.take(0, np.stack([f.copy() for f in frames[:2]]))
        sink.take(2, np.stack([f.copy() for f in frames[2:]]))
        return []

    def fallback(smpl, dw, height, width, video_length, **kwargs: Any) -> list:
        # taichi failed after one batch; upstream's torch renderer listed the clip
        pr.current_sink().take(0, np.stack([frames[0].copy()]))
        return [f.copy() for f in frames]

    out: dict[str, Any] = {}
    for original in (streaming, fallback):
        random.seed(4)
        _, predict = node(original)
        got_image, got_mask = predict(None, 5)
        out[original.__name__] = {
            "image_equal": same(got_image, image),
            "mask_equal": same(got_mask, mask),
            "contiguous": got_image.is_contiguous(),
            "random_as_upstream": random.random() == after_clip,
            "left_clean": left_clean(),
        }
    render, _ = node(streaming)
    try:  # outside predict nothing streams: the stand-in 3D pass finds no sink
        render(None, list(range(5)), 4, 3, 5)
        out["outside_predict"] = "streamed"
    except AttributeError:
        out["outside_predict"] = "listed"

    def failing_draw(poses: list) -> list:
        raise IndexError("list index out of range")

    def kept_failure(smpl, dw, height, width, video_length, **kwargs: Any) -> list:
        sink = pr.current_sink()
        try:
            sink.take(0, np.stack(rgba(3)))
        except BaseException as exc:  # as the renderer keeps it
            sink.failed = exc
        return []

    _, predict = node(kept_failure, failing_draw)
    try:
        predict(None, 3)
        out["failed_2d"] = None
    except IndexError as exc:
        out["failed_2d"] = str(exc)
    out["failed_left_clean"] = left_clean()
    return out


fake_taichi()
print(
    json.dumps(
        {
            "conversion": conversion(),
            "levels": levels(),
            "batches": batches(),
            "renderer": renderer_sink(),
            "predict": predict_paths(),
        }
    )
)
