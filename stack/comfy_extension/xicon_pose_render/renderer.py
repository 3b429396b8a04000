"""Upstream's SCAIL pose renderer (ComfyUI-SCAIL-Pose ``render_3d/taichi_cylinder.py``
``render_whole``, pinned commit) with its kernels kept: the same taichi functions and
compile-time constants (the camera, the radius and the far plane of the call), run over a batch
of frames per launch into one ndarray, copied to the host once per batch and converted there as
upstream converts a frame (clip to [0, 1], times 255, to uint8; in torch, on every core). Kernels
are kept per set of constants while the taichi runtime lives, and dropped with it. The frames
are returned as a list, as upstream's, or handed batch by batch to a ``Sink`` that
``pose_render.py`` sets for the clip. ``pose_render.py`` puts it in place of upstream's; taichi
is imported when it first renders.
"""

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

# The float32 frames of one launch on the render device (7 at 416x672). Taichi's memory pool
# keeps the largest batch for the process: 128 MiB batches (the H100 sitting) left 100-300 MiB
# more on the GPU between jobs.
BATCH_BYTES = 32 << 20
KEPT_KERNELS = 8


class Sink(Protocol):
    """Takes a clip's frames batch by batch, in order, instead of the renderer's list."""

    count: int
    size: tuple[int, int]  # (H, W)
    failed: BaseException | None

    def take(self, first: int, frames: np.ndarray) -> None: ...


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Upstream's conversion of a rendered frame, ``(np.clip(f, 0, 1) * 255).astype(np.uint8)``,
    on a batch in place and on every core (the same float32 operations: clip, times 255, then
    truncated to an integer)."""
    import torch

    batch = torch.from_numpy(frames)
    batch.clamp_(0, 1).mul_(255)
    return batch.to(torch.uint8).numpy()


class Renderer:
    """Upstream's ray-marched cylinders (``taichi_cylinder.render_whole``), kernels kept. While
    ``sink_of()`` gives a sink for this clip, each batch goes to it and the list stays empty."""

    def __init__(
        self,
        flatten_specs: Callable[..., tuple[np.ndarray, ...]],
        sink_of: Callable[[], Sink | None] = lambda: None,
    ) -> None:
        self.flatten_specs = flatten_specs
        self.sink_of = sink_of
        self.kernels: dict[tuple[Any, ...], Any] = {}
        self.program: Any = None  # the taichi program the kernels were built in
        self.compiled = 0

    def kernel(self, H: int, W: int, fx: Any, fy: Any, cx: Any, cy: Any, radius: Any, zfar: Any):
        import taichi as ti

        program = ti.lang.impl.get_runtime().prog
        if program is not self.program:  # a new runtime: kernels of the old one are gone
            self.kernels.clear()
            self.program = program
        key = tuple((type(v).__name__, v) for v in (H, W, fx, fy, cx, cy, radius, zfar))
        kernel = self.kernels.get(key)
        if kernel is None:
            if len(self.kernels) >= KEPT_KERNELS:
                self.kernels.pop(next(iter(self.kernels)))
            kernel = self.kernels[key] = build_kernel(H, W, fx, fy, cx, cy, radius, zfar)
            self.compiled += 1
        return kernel

    def __call__(
        self,
        specs_list: Sequence[Any],
        H: int = 480,
        W: int = 640,
        fx: Any = 500,
        fy: Any = 500,
        cx: Any = 240,
        cy: Any = 320,
        radius: Any = 21.5,
    ) -> list[np.ndarray]:
        import taichi as ti

        # As upstream, in upstream's order (an empty clip fails here as it does there).
        starts, ends, colors, frame_offset, frame_count = self.flatten_specs(specs_list)
        total_cyl = len(starts)
        n_frames = len(specs_list)
        z_min = min(starts[:, 2].min(), ends[:, 2].min())
        z_max = max(starts[:, 2].max(), ends[:, 2].max())
        zfar = max(min(z_max, 25000), 10000)
        render = self.kernel(H, W, fx, fy, cx, cy, radius, zfar)

        c_start = ti.ndarray(ti.math.vec3, total_cyl)
        c_end = ti.ndarray(ti.math.vec3, total_cyl)
        c_rgba = ti.ndarray(ti.math.vec4, total_cyl)
        f_offset = ti.ndarray(ti.i32, n_frames)
        f_count = ti.ndarray(ti.i32, n_frames)
        c_start.from_numpy(starts)
        c_end.from_numpy(ends)
        c_rgba.from_numpy(colors)
        f_offset.from_numpy(frame_offset)
        f_count.from_numpy(frame_count)
        batch = max(1, min(n_frames, BATCH_BYTES // (H * W * 16)))
        img = ti.ndarray(ti.math.vec4, (batch, H, W))

        sink = self.sink_of()
        if sink is not None and (sink.count != n_frames or sink.size != (H, W)):
            sink = None
        frames: list[np.ndarray] = []
        for first in range(0, n_frames, batch):
            n = min(batch, n_frames - first)
            render(img, first, n, c_start, c_end, c_rgba, f_offset, f_count, z_min, z_max)
            converted = to_uint8(img.to_numpy()[:n])
            if sink is None:
                frames.extend(converted)
                continue
            try:
                sink.take(first, converted)
            except BaseException as exc:  # the sink's own failure: raised by its owner
                sink.failed = exc
                return []
        return frames


def build_kernel(H: int, W: int, fx: Any, fy: Any, cx: Any, cy: Any, radius: Any, zfar: Any):
    """Upstream's kernel for one set of compile-time constants, over a batch of frames: the
    functions below are ``render_whole``'s, with the frame's cylinders passed in."""
    import taichi as ti

    znear = 0.1
    C = ti.Vector([0.0, 0.0, 0.0])
    light_dir = ti.Vector([0.0, 0.0, 1.0])

    @ti.func
    def sd_cylinder(p, a, b, r):
        pa = p - a
        ba = b - a
        h = ba.norm()
        eps = 1e-8
        res = 0.0
        if h < eps:
            res = pa.norm() - r
        else:
            ba_n = ba / h
            proj = pa.dot(ba_n)
            proj_clamped = min(max(proj, 0.0), h)
            res = (pa - proj_clamped * ba_n).norm() - r
        return res

    @ti.func
    def scene_sdf(
        p,
        fid,
        c_start: ti.template(),
        c_end: ti.template(),
        c_rgba: ti.template(),
        f_offset: ti.template(),
        f_count: ti.template(),
    ):
        best_d = 1e6
        best_col = ti.Vector([0.0, 0.0, 0.0, 0.0])
        off = f_offset[fid]
        cnt = f_count[fid]
        for i in range(cnt):
            a = c_start[off + i]
            b = c_end[off + i]
            r = radius
            col = c_rgba[off + i]
            d = sd_cylinder(p, a, b, r)
            if d < best_d:
                best_d = d
                best_col = col
        return best_d, best_col

    @ti.func
    def get_normal(
        p,
        fid,
        cs: ti.template(),
        ce: ti.template(),
        cc: ti.template(),
        fo: ti.template(),
        fc: ti.template(),
    ):
        e = 1e-3
        dx = (
            scene_sdf(p + ti.Vector([e, 0.0, 0.0]), fid, cs, ce, cc, fo, fc)[0]
            - scene_sdf(p - ti.Vector([e, 0.0, 0.0]), fid, cs, ce, cc, fo, fc)[0]
        )
        dy = (
            scene_sdf(p + ti.Vector([0.0, e, 0.0]), fid, cs, ce, cc, fo, fc)[0]
            - scene_sdf(p - ti.Vector([0.0, e, 0.0]), fid, cs, ce, cc, fo, fc)[0]
        )
        dz = (
            scene_sdf(p + ti.Vector([0.0, 0.0, e]), fid, cs, ce, cc, fo, fc)[0]
            - scene_sdf(p - ti.Vector([0.0, 0.0, e]), fid, cs, ce, cc, fo, fc)[0]
        )
        n = ti.Vector([dx, dy, dz])
        return n.normalized()

    @ti.func
    def pixel_to_ray(xi, yi):
        u = (xi - cx) / fx
        v = (yi - cy) / fy
        dir_cam = ti.Vector([u, v, 1.0]).normalized()
        Rcw = ti.Matrix.identity(ti.f32, 3)
        rd_world = Rcw @ dir_cam
        ro_world = C
        return ro_world, rd_world

    @ti.kernel
    def render(
        img: ti.types.ndarray(dtype=ti.math.vec4, ndim=3),
        first: ti.i32,
        n: ti.i32,
        c_start: ti.types.ndarray(dtype=ti.math.vec3, ndim=1),
        c_end: ti.types.ndarray(dtype=ti.math.vec3, ndim=1),
        c_rgba: ti.types.ndarray(dtype=ti.math.vec4, ndim=1),
        f_offset: ti.types.ndarray(dtype=ti.i32, ndim=1),
        f_count: ti.types.ndarray(dtype=ti.i32, ndim=1),
        z_min: ti.f32,
        z_max: ti.f32,
    ):
        depth_near, depth_far = ti.max(z_min, 0.1), ti.min(z_max + 6000, 20000)
        for k, y, x in ti.ndrange(n, H, W):
            fid = first + k
            ro, rd = pixel_to_ray(x, y)
            t = znear
            col_out = ti.Vector([0.0, 0.0, 0.0, 0.0])
            for _ in range(300):
                p = ro + rd * t
                d, col = scene_sdf(p, fid, c_start, c_end, c_rgba, f_offset, f_count)
                if d < 1e-3:
                    n_ = get_normal(p, fid, c_start, c_end, c_rgba, f_offset, f_count)
                    diff = max(n_.dot(-light_dir), 0.0)

                    view_dir = -rd.normalized()
                    half_dir = (view_dir + -light_dir).normalized()
                    spec = max(n_.dot(half_dir), 0.0) ** 32

                    depth_factor = 1.0 - (p.z - depth_near) / (depth_far - znear)
                    depth_factor = ti.max(0.0, ti.min(1.0, depth_factor))

                    diffuse_term = 0.3 + 0.7 * diff
                    base = col.xyz * diffuse_term * depth_factor

                    highlight = ti.Vector([1.0, 1.0, 1.0]) * (0.5 * spec) * depth_factor

                    col_out = ti.Vector(
                        [base.x + highlight.x, base.y + highlight.y, base.z + highlight.z, col.w]
                    )
                    break

                if t > zfar:
                    break
                t += max(d, 1e-4)
            img[k, y, x] = col_out

    return render
