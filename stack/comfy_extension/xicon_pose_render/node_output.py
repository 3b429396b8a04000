"""Node 362's image and mask made batch by batch as the renderer hands its frames over
(``pose_render.py``'s ``RenderNLFPoses.predict`` and ``render_nlf_as_images`` set the request
and the sink on the prompt thread, ``renderer.py`` hands the batches to the sink).
"""

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_local = threading.local()  # the prompt thread's request (predict) and sink (the 3D pass)


class Request:
    """One run of ``RenderNLFPoses.predict``: the image and mask made by a ``NodeOutput``."""

    def __init__(self) -> None:
        self.result: tuple[Any, Any] | None = None


class NodeOutput:
    """Node 362's image and mask for one clip, made from the renderer's batches as they come:
    each frame's 2D skeleton laid over it (``overlay``, frame by frame in upstream's order),
    then upstream's tail on the batch, ``torch.from_numpy(frames) / 255.0``, its first three
    channels the image and its last ``> 0.5`` the mask, both ``.float()``: here the division
    written straight into the clip's image (the same float32 division) and the mask as the
    alpha at or above ``mask_from()`` (the levels whose quotient is above 0.5). The image is a
    contiguous float32 ``[N, H, W, 3]`` (upstream's is the same values as a view of an
    ``[N, H, W, 4]`` one)."""

    def __init__(
        self,
        poses: Sequence[Any],
        overlay: Callable[[np.ndarray, Any], None],
        count: int,
        height: int,
        width: int,
    ) -> None:
        import torch

        self.poses = poses
        self.overlay = overlay  # lays a pose's 2D skeleton over its frame (a ``Skeleton``)
        self.count = count
        self.size = (height, width)
        self.failed: BaseException | None = None
        self.done = 0
        self.image = torch.empty((count, height, width, 3), dtype=torch.float32)
        self.mask = torch.empty((count, height, width), dtype=torch.float32)

    def take(self, first: int, frames: np.ndarray) -> None:
        import torch

        n = len(frames)
        if first != self.done or first + n > self.count:
            raise RuntimeError(f"frames {first}-{first + n} after {self.done} of {self.count}")
        for k in range(n):
            self.overlay(frames[k], self.poses[first + k])
        batch = torch.from_numpy(frames)
        torch.div(batch[..., :3], 255.0, out=self.image[first : first + n])
        self.mask[first : first + n].copy_(batch[..., -1] >= mask_from())
        self.done += n

    @property
    def complete(self) -> bool:
        return self.failed is None and self.done == self.count


@functools.cache
def mask_from() -> int:
    """The least alpha level ``a`` with ``a / 255.0 > 0.5`` in torch's float32 (upstream's mask);
    every level above it is masked too."""
    import torch

    masked = (torch.arange(256, dtype=torch.uint8) / 255.0 > 0.5).tolist()
    first = masked.index(True)
    if not all(masked[first:]) or any(masked[:first]):
        raise RuntimeError("the mask's levels are not one run")
    return first


def current_sink() -> NodeOutput | None:
    return getattr(_local, "sink", None)
