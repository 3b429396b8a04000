"""ViTPose's keypoint decoding for all keypoints at once, in place of its per-keypoint loop.

Why: pose detection (node 363, ComfyUI-SCAIL-Pose ``PoseDetectionVitPoseToDWPose``) runs
ComfyUI-WanAnimatePreprocess's ``ViTPose`` on every frame, which decodes its 133 heatmaps with
``pose_utils/pose2d_utils.py`` ``keypoints_from_heatmaps(unbiased=True)``: for each keypoint a
Gaussian blur (``_gaussian_blur``) and a Taylor refinement with a 2x2 inverse (``_taylor``), in
Python. That loop is CPU time whatever the GPU: about 7.6 ms of the node's 11.6 ms per frame
outside ONNX on a 2-core machine, 11 s of a 60-s clip's 1441 frames (``bench/pose_detection.py``).

What: ``decode_all(original, heatmaps, center, scale, ...)`` computes the same thing for every
keypoint at once: one OpenCV blur over the heatmaps stacked, each in its own zero frame of the
blur's radius (as ``_gaussian_blur`` pads each alone, so no pixel sees another map); the same
rescale to the map's maximum; the log and the Taylor step only at the 13 points each keypoint
needs, with the 2x2 inverse in closed form. ``_get_max_preds`` and ``transform_preds`` are
upstream's own. The framed maps and the blur's result are written into two arrays each thread
keeps between calls (``kept_arrays``): a 16-frame chunk's maps are 2 x 36 MiB, which new arrays
fault in page by page on every call (on a 2-core machine 35.7 -> 25.1-25.7 ms a chunk, the
same values, ``bench/pose_decode_chunk.py``). Coordinates differ from upstream's by float32 rounding
(under 1e-3 px in the tests); scores are identical. Any other decoding mode is passed to
upstream's function unchanged.

``install(meta_path)`` adds an import hook: when WanAnimatePreprocess's ``models/onnx_models.py``
has run, its ``keypoints_from_heatmaps`` (what ``ViTPose.forward`` calls) is replaced, but only
if upstream's three functions still have the source this was written against
(``UPSTREAM_SHA256``); otherwise nothing changes and the reason is logged.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("xicon_pose_decode")

TARGET = "ComfyUI-WanAnimatePreprocess.models.onnx_models"
# sha256 of the sources of keypoints_from_heatmaps, _gaussian_blur and _taylor, joined, at
# ComfyUI-WanAnimatePreprocess 1a35b81a418bbba093356ad19b19bf2a76a24f4e.
UPSTREAM_SHA256 = "32fd500fed33b5a37e0bf495f6bbfb03ac0b1ff3ed3cddb73314b2f552984fe9"
REPLACED = "_xicon_pose_decode"


def upstream_digest(pose2d: types.ModuleType) -> str:
    parts = [
        inspect.getsource(getattr(pose2d, n))
        for n in ("keypoints_from_heatmaps", "_gaussian_blur", "_taylor")
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


_KEPT = threading.local()  # each thread's two arrays for ``decode_all``


def kept_arrays(maps: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's two float32 arrays of ``maps`` (h, w) maps for ``decode_all``: the framed
    maps, all zero where ``decode_all`` does not write them, and the blur's result; kept between
    calls (made anew only for more maps or another size), so that a chunk's 2 x 36 MiB are not
    mapped and faulted in afresh each time."""
    have = getattr(_KEPT, "arrays", None)
    if have is None or have[0].shape[1:] != (h, w) or have[0].shape[0] < maps:
        have = (np.zeros((maps, h, w), np.float32), np.empty((maps, h, w), np.float32))
        _KEPT.arrays = have
    return have[0][:maps], have[1][:maps]


def decode_all(
    pose2d: types.ModuleType,
    heatmaps: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    kernel: int = 11,
    use_udp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``keypoints_from_heatmaps(heatmaps, center, scale, unbiased=True, kernel=kernel,
    use_udp=use_udp)`` of ``pose2d`` for every keypoint at once (see module doc)."""
    import cv2

    heatmaps = np.asarray(heatmaps)
    n, k, h, w = heatmaps.shape
    preds, maxvals = pose2d._get_max_preds(heatmaps)
    b = (kernel - 1) // 2
    framed, tall = kept_arrays(n * k, h + 2 * b, w + 2 * b)
    framed[:, b:-b, b:-b] = heatmaps.reshape(n * k, h, w)  # the frames stay zero
    rows = (n * k * (h + 2 * b), w + 2 * b)
    got = cv2.GaussianBlur(framed.reshape(rows), (kernel, kernel), 0, dst=tall.reshape(rows))
    if not np.shares_memory(got, tall):  # an OpenCV that did not write into ``dst``
        tall = got
    blurred = tall.reshape(n, k, h + 2 * b, w + 2 * b)[:, :, b:-b, b:-b]
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero map: upstream's nan too
        ratio = heatmaps.reshape(n, k, -1).max(axis=2) / blurred.max(axis=(2, 3))
    px, py = preds[..., 0].astype(int), preds[..., 1].astype(int)
    inside = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
    pxc, pyc = np.clip(px, 2, w - 3), np.clip(py, 2, h - 3)
    ni, ki = np.arange(n)[:, None], np.arange(k)[None, :]

    def logged(dy: int, dx: int) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.log(np.maximum(blurred[ni, ki, pyc + dy, pxc + dx] * ratio, 1e-10))

    centre = logged(0, 0)
    dx = 0.5 * (logged(0, 1) - logged(0, -1))
    dy = 0.5 * (logged(1, 0) - logged(-1, 0))
    dxx = 0.25 * (logged(0, 2) - 2 * centre + logged(0, -2))
    dxy = 0.25 * (logged(1, 1) - logged(-1, 1) - logged(1, -1) + logged(-1, -1))
    dyy = 0.25 * (logged(2, 0) - 2 * centre + logged(-2, 0))
    det = dxx * dyy - dxy**2
    step = inside & (det != 0)
    safe = np.where(step, det, 1)
    with np.errstate(invalid="ignore"):
        preds[..., 0] += np.where(step, -(dyy * dx - dxy * dy) / safe, 0)
        preds[..., 1] += np.where(step, -(dxx * dy - dxy * dx) / safe, 0)
    for i in range(n):
        preds[i] = pose2d.transform_preds(preds[i], center[i], scale[i], [w, h], use_udp=use_udp)
    return preds, maxvals


def replacement(original: Callable[..., Any], pose2d: types.ModuleType) -> Callable[..., Any]:
    """``keypoints_from_heatmaps`` that decodes the unbiased Gaussian case at once and hands
    every other case to ``original``."""

    def keypoints_from_heatmaps(
        heatmaps: Any,
        center: Any,
        scale: Any,
        unbiased: bool = False,
        post_process: Any = "default",
        kernel: int = 11,
        valid_radius_factor: float = 0.0546875,
        use_udp: bool = False,
        target_type: str = "GaussianHeatmap",
    ) -> Any:
        unbiased_mode = (unbiased and post_process == "default") or post_process == "unbiased"
        if unbiased_mode and not use_udp and kernel > 0 and np.ndim(heatmaps) == 4:
            return decode_all(pose2d, heatmaps, center, scale, kernel=kernel)
        return original(
            heatmaps,
            center,
            scale,
            unbiased=unbiased,
            post_process=post_process,
            kernel=kernel,
            valid_radius_factor=valid_radius_factor,
            use_udp=use_udp,
            target_type=target_type,
        )

    setattr(keypoints_from_heatmaps, REPLACED, True)
    keypoints_from_heatmaps.__wrapped__ = original  # type: ignore[attr-defined]
    return keypoints_from_heatmaps


def patch(onnx_models: types.ModuleType) -> str:
    """Replace ``onnx_models.keypoints_from_heatmaps``; the line to log."""
    original = getattr(onnx_models, "keypoints_from_heatmaps", None)
    if original is None or getattr(original, REPLACED, False):
        return "nothing to replace in onnx_models"
    pose2d = inspect.getmodule(original)
    if pose2d is None:
        return "upstream's pose2d_utils not found; decoding left as it is"
    digest = upstream_digest(pose2d)
    if digest != UPSTREAM_SHA256:
        return (
            f"upstream's keypoint decoding changed (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); decoding left as it is"
        )
    onnx_models.keypoints_from_heatmaps = replacement(original, pose2d)
    return "ViTPose keypoints decoded for all keypoints at once (WanAnimatePreprocess)"


class _Loader(importlib.abc.Loader):
    """The pack's own loader, with the replacement after its module has run; anything else
    (``get_source``, ``get_filename``, ...) is the inner loader's."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)
        try:
            log.info("xicon_pose_decode: %s", patch(module))
        except Exception:  # never break the pack: it then runs as upstream ships it
            log.exception("xicon_pose_decode: decoding left as it is")


class Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of WanAnimatePreprocess's ``models.onnx_models`` (by module-name suffix:
    ComfyUI names a pack's modules after its folder)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.endswith(TARGET):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install(meta_path: list[Any] | None = None) -> bool:
    """Add the import hook once; False when it is already there."""
    meta_path = sys.meta_path if meta_path is None else meta_path
    if any(isinstance(f, Finder) for f in meta_path):
        return False
    meta_path.insert(0, Finder())
    return True
