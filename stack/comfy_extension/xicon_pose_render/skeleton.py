"""The 2D pass of SCAIL's pose render laid over a frame: upstream's pixels and upstream's random
numbers, without the whole-frame arrays upstream's drawing makes for every frame.

Upstream (ComfyUI-SCAIL-Pose, pinned commit): ``render_nlf_as_images`` draws every frame's pose
with ``draw_pose_to_canvas_np(..., show_body_flag=False, show_cheek_flag=True, dw_hand=True)``
(``pose_draw/draw_pose_utils.py``), whose ``draw_pose`` makes two zeroed frames a person, and
``draw_bodypose_augmentation`` (``pose_draw/draw_utils.py``) multiplies the whole frame by 0.6 in
float64 and converts it back: each a fresh allocation of 0.8-6.7 MB at 416x672, faulted in page
by page, for a skeleton covering a few thousand pixels. ``pose_render.py``'s ``lay_over`` then
lays each canvas over its frame where it is not zero.

``Skeleton(frame, pose)`` does the same for a frame of one person into one canvas kept for the
clip, and zeroes only the rows it drew on afterwards:

- the cheeks (``draw_bodypose_augmentation`` with ``drop_aug=True, all_cheek_aug=True``, as
  ``draw_pose`` calls it): upstream draws its random numbers (``random.choices`` for how many
  bones to drop, then ``random.sample``) and then drops bones 0-12 whatever they were, draws bones
  13-16 (the cheeks) as filled ellipses, scales the canvas by 0.6, then draws keypoints 0, 14-17
  as circles. Here the same random calls, the same index arithmetic (a bad index raises as
  upstream's does, for every bone), and the ellipses filled with their colour already scaled as
  upstream scales the canvas (``(colour * 0.6).astype(uint8)`` in numpy: the canvas is zero
  where nothing was drawn and a polygon's pixels are its colour, so the scaled canvas is the
  canvas drawn in scaled colours);
- the hands and the face: upstream's own ``draw_handpose`` and ``draw_facepose`` on the kept
  canvas (they draw and return it; ``draw_pose``'s sum with its zeroed ``final_canvas`` is the
  canvas itself for one person).

A pose of another number of people, or a frame of another size, takes upstream's path:
``draw_pose_to_canvas_np`` on that pose alone (the calls draw in the same order, so the random
numbers are the same either way), then ``lay_over``. ``pose_render.py`` checks that upstream's
functions are the source this was written against before using it.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import numpy as np

# draw_utils.draw_bodypose_augmentation's ``limbSeq`` and ``colors`` (pinned commit): the bones
# it draws with all_cheek_aug (13-16: nose-eye-ear on each side) and the keypoints it circles.
LIMB_SEQ = [
    [2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11],
    [2, 12], [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18],
    [3, 17], [6, 18],
]  # fmt: skip
COLORS = [
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
    [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
    [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
]  # fmt: skip
DROPPED = 13  # all_cheek_aug: ``drop_indices = list(range(13))``
CIRCLED = (0, 14, 15, 16, 17)
STICKWIDTH = 4
# upstream's ``(canvas * 0.6).astype(np.uint8)`` on each colour
SCALED = [[int(c) for c in row] for row in (np.array(COLORS, np.uint8) * 0.6).astype(np.uint8)]


def lay_over(frame: np.ndarray, canvas: np.ndarray) -> np.ndarray | None:
    """``frame[:, :, :3][canvas != 0] = canvas[canvas != 0]`` (upstream's overlay) in one pass
    over the box of rows and columns the skeleton reaches (elsewhere the canvas is zero and
    nothing is copied). Returns that box of the canvas (None when nothing was drawn, or the
    shapes differ)."""
    rgb = frame[:, :, :3]
    if rgb.shape == canvas.shape and rgb.dtype == canvas.dtype and canvas.ndim == 3:
        rows = np.flatnonzero(canvas.reshape(canvas.shape[0], -1).any(axis=1))
        if rows.size:
            top, bottom = int(rows[0]), int(rows[-1]) + 1
            band = canvas[top:bottom]
            cols = np.flatnonzero(band.reshape(bottom - top, -1).any(axis=0))
            channels = canvas.shape[2]
            left, right = int(cols[0]) // channels, int(cols[-1]) // channels + 1
            part = canvas[top:bottom, left:right]
            np.copyto(rgb[top:bottom, left:right], part, where=part != 0)
            return part
        return None
    mask = canvas != 0
    rgb[mask] = canvas[mask]
    return None


def draw_cheeks(
    canvas: np.ndarray,
    candidate: Any,
    subset: Any,
    rand: types.ModuleType,
    cv2: types.ModuleType,
) -> None:
    """``draw_bodypose_augmentation(canvas, candidate, subset, drop_aug=True, shift_aug=False,
    all_cheek_aug=True)`` on a zeroed ``canvas``, in place (see the module's docstring), with
    upstream's ``random`` and OpenCV."""
    H, W, _ = canvas.shape
    candidate = np.array(candidate)
    subset = np.array(subset)
    # the random numbers upstream draws, then overrides
    k_drop = rand.choices([0, 1, 2], weights=[0.5, 0.3, 0.2])[0]
    rand.sample(list(range(17)), k_drop)
    for i in range(17):
        for n in range(len(subset)):
            index = subset[n][np.array(LIMB_SEQ[i]) - 1]
            if -1 in index:
                continue
            Y = candidate[index.astype(int), 0] * float(W)
            X = candidate[index.astype(int), 1] * float(H)
            if i < DROPPED:
                continue
            mX = np.mean(X)
            mY = np.mean(Y)
            length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
            polygon = cv2.ellipse2Poly(
                (int(mY), int(mX)), (int(length / 2), STICKWIDTH), int(angle), 0, 360, 1
            )
            cv2.fillConvexPoly(canvas, polygon, SCALED[i])
    for i in CIRCLED:
        for n in range(len(subset)):
            index = int(subset[n][i])
            if index == -1:
                continue
            x, y = candidate[index][0:2]
            x = int(x * W)
            y = int(y * H)
            cv2.circle(canvas, (int(x), int(y)), 4, COLORS[i], thickness=-1)


def one_person(pose: Any) -> bool:
    """Whether ``pose`` is one person's (anything else takes upstream's pass, which raises its own
    error for a pose it cannot draw)."""
    try:
        return len(pose["bodies"]["candidate"]) == 1
    except (KeyError, TypeError, IndexError):
        return False


class Skeleton:
    """Lays a frame's 2D pose over it as upstream's 2D pass does (``draw_pose_to_canvas_np``
    with ``render_nlf_as_images``'s arguments, then ``lay_over``), for one clip."""

    def __init__(
        self,
        draw_utils: types.ModuleType,
        draw_pass: Callable[[list], list],
        height: int,
        width: int,
        draw_face: bool,
        draw_hands: bool,
    ) -> None:
        self.cv2: types.ModuleType | None = None  # imported for the first frame drawn here
        self.draw_utils = draw_utils  # upstream's, for its hands, face and ``random``
        self.draw_pass = draw_pass  # upstream's 2D pass for a list of poses
        self.canvas = np.zeros((height, width, 3), np.uint8)
        self.draw_face = draw_face
        self.draw_hands = draw_hands
        self.kept = 0  # frames drawn into the kept canvas
        self.upstream = 0  # frames drawn by upstream's pass

    def __call__(self, frame: np.ndarray, pose: Any) -> None:
        canvas = self.canvas
        if (
            not one_person(pose)
            or not isinstance(frame, np.ndarray)
            or frame.dtype != np.uint8
            or frame.ndim != 3
            or frame.shape[:2] != canvas.shape[:2]
            or frame.shape[2] < 3
        ):
            lay_over(frame, self.draw_pass([pose])[0])
            self.upstream += 1
            return
        if self.cv2 is None:
            import cv2

            self.cv2 = cv2
        utils, bodies = self.draw_utils, pose["bodies"]
        try:  # draw_pose's calls for person 0, in its order
            draw_cheeks(
                canvas, bodies["candidate"][0], bodies["subset"][0:1], utils.random, self.cv2
            )
            if self.draw_hands:
                utils.draw_handpose(canvas, pose["hands"][0:2])
            if self.draw_face:
                utils.draw_facepose(canvas, pose["faces"][0:1], optimized_face=True)
            drawn = lay_over(frame, canvas)
        except BaseException:
            canvas[...] = 0
            raise
        if drawn is not None:
            drawn[...] = 0
        self.kept += 1
