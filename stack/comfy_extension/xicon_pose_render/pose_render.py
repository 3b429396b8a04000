"""The SCAIL pose render (node 362) without its per-job set-up and per-frame round trips; the
frames are upstream's, bit for bit in the tests' jobs (the batched kernel alone, on random
cylinders, rounded one level of 255 otherwise at 3-20 of 3,072 pixels a frame on one CPU backend:
taichi on an Intel Xeon with AVX-512; on the others tried and on CUDA, bit for bit too).

Why: ComfyUI-SCAIL-Pose's ``RenderNLFPoses.predict`` (``nodes.py``, pinned commit) calls
``ti.init`` on every run, which tears taichi's runtime down and builds it again, and its renderer
(``render_3d/taichi_cylinder.py`` ``render_whole``) defines its kernel and fields anew on every
call, then renders one frame per launch, copies each frame to the host as float32 and converts it
there. ``NLFPoseExtract/nlf_render.py`` ``render_nlf_as_images`` then lays the 2D skeleton over
each frame with a boolean-mask scatter, and the hands' colours are computed by ``hsv_to_rgb``
(``pose_draw/draw_utils.py``) 40 times a frame from the same 20 inputs. On the H200 the node took
1.0-2.6 s of an 81-frame job and 12.8 s of a 60-s one.

What, each the same arithmetic as upstream's:
- ``render_whole`` (``renderer.py``): upstream's kernel, function for function (the same
  compile-time constants: the camera, the radius and the far plane of the call), rendering a
  batch of frames per launch into one ndarray, copied to the host once per batch and converted
  there as upstream converts a frame (clip to [0, 1], times 255, to uint8). Kernels are kept per
  set of constants while the taichi runtime lives, so a job like an earlier one compiles nothing.
- ``taichi.init``: a call with the same arguments as the last one, while that runtime is still
  up, returns at once (upstream's renderer is replaced, so nothing it allocated per call is left
  to free). Any other call initialises as upstream does; kernels kept for the old runtime are
  not used in the new one (the renderer keeps them per taichi program).
- ``render_nlf_as_images``: upstream's own, without its 2D pass, then that pass laid over each
  frame by a ``Skeleton`` (``skeleton.py``, from a deep copy of the poses): for one person,
  upstream's drawing into one canvas kept for the clip, without the whole-frame arrays upstream
  makes per frame; otherwise upstream's ``draw_pose_to_canvas_np`` with its arguments; either
  way laid over with ``np.copyto(where=)`` on the box of rows and columns it reaches, in place
  of the boolean-mask scatter.
- ``hsv_to_rgb``: remembers its result per input (a copy is returned each time).
- ``RenderNLFPoses.predict`` (``XICON_POSE_RENDER_STREAM``, on unless ``off``): upstream's own,
  but for one person the renderer hands each batch to a ``NodeOutput`` (``node_output.py``),
  which lays the 2D skeleton over each frame (drawn frame by frame in upstream's order, so
  Python's random numbers are drawn as upstream's pass draws them) and runs upstream's tail on
  the batch (``/ 255.0``, the first three channels the image, the last ``> 0.5`` the mask) into
  the clip's output (the division written straight into it, the mask from the alpha levels it
  keeps); the rendered frames are not kept, and predict's own tail runs on a one-frame
  stand-in. Upstream gathered every frame, stacked them and divided the whole stack: at 60 s 1.6
  GB of frames, 1.6 GB of stack and 6.5 GB of float32 at once. The image is a contiguous float32
  ``[N, H, W, 3]`` (upstream's: the same values as a view of ``[N, H, W, 4]``). Two people,
  upstream's torch renderer (taichi failed; the random state is restored) and calls outside the
  node keep upstream's path; a failed 2D pass fails the node with its own error.

``install_warm(PromptExecutor, env)``: when ComfyUI has loaded its nodes and a CUDA device is
there, its prompt worker thread, as it builds its ``PromptExecutor`` and before it takes a
prompt, imports ``nlf_render`` (the hook below puts the replacements in place) and, if they are
in place, calls ``taichi.init`` as node 362 of the shipped graph does (``render_device``
``gpu``), so that the first job's render finds taichi's runtime up. On that thread because
taichi compiles only on the thread that started it (an early start in a thread of its own
failed the first job's render: "Assertion failure: std::this_thread::get_id() ==
main_thread_id_"). ``XICON_POSE_RENDER_WARM=off`` leaves taichi to start with the first render.

``install(meta_path)`` adds an import hook: when SCAIL-Pose's ``NLFPoseExtract/nlf_render.py`` has
run (``RenderNLFPoses`` imports it on its first run), the above are put in place, but only if
upstream's functions still have the source this was written against (``UPSTREAM_SHA256``);
otherwise nothing changes and the reason is logged. ``XICON_POSE_RENDER=off`` turns it off.
"""

import copy
import functools
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import random
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("xicon_pose_render")

ENV = "XICON_POSE_RENDER"
WARM_ENV = "XICON_POSE_RENDER_WARM"
STREAM_ENV = "XICON_POSE_RENDER_STREAM"
PACK = "ComfyUI-SCAIL-Pose"
TARGET = f"{PACK}.NLFPoseExtract.nlf_render"
WARM_ARCH = "gpu"  # node 362's render_device in the shipped graph (upstream: ti.init(arch=ti.gpu))
# sha256 of the sources of taichi_cylinder.render_whole and flatten_specs, nlf_render's
# render_nlf_as_images and render_multi_nlf_as_images (both call the renderer),
# draw_pose_utils.draw_pose_to_canvas_np, draw_utils.hsv_to_rgb, nodes.RenderNLFPoses.predict,
# draw_pose_utils.draw_pose and draw_utils.draw_bodypose_augmentation, draw_handpose and
# draw_facepose (``skeleton.py``), joined, at ComfyUI-SCAIL-Pose
# 11402b150d728440a4a89964faa58907f84c35e6.
UPSTREAM_SHA256 = "9fb838307bba5be97b402b620e486413522709a8e6641201d1ef80cfd9ff8b28"
REPLACED = "_xicon_pose_render"


def enabled(env: Mapping[str, str], name: str = ENV) -> bool:
    """False when ``name`` is ``0``/``off``/``false``/``no``; True otherwise (the default)."""
    return env.get(name, "").strip().lower() not in {"0", "off", "false", "no"}


def upstream_modules(nlf_render: types.ModuleType) -> dict[str, types.ModuleType]:
    """SCAIL-Pose's modules this touches, found from ``nlf_render`` (ComfyUI names a pack's
    modules after its folder)."""
    package = nlf_render.__name__.rsplit(".", 2)[0]
    draw_pose_utils = inspect.getmodule(nlf_render.draw_pose_to_canvas_np)
    modules = {
        "nlf_render": nlf_render,
        "draw_pose_utils": draw_pose_utils,
        "draw_utils": sys.modules.get(f"{package}.pose_draw.draw_utils"),
        "nodes": sys.modules.get(f"{package}.nodes"),
        "taichi_cylinder": sys.modules.get(f"{package}.render_3d.taichi_cylinder"),
    }
    return {k: v for k, v in modules.items() if v is not None}


# the functions whose source is pinned (UPSTREAM_SHA256), in order: (module, name)
PINNED = [
    ("taichi_cylinder", "render_whole"),
    ("taichi_cylinder", "flatten_specs"),
    ("nlf_render", "render_nlf_as_images"),
    ("nlf_render", "render_multi_nlf_as_images"),
    ("draw_pose_utils", "draw_pose_to_canvas_np"),
    ("draw_utils", "hsv_to_rgb"),
    ("draw_pose_utils", "draw_pose"),
    ("draw_utils", "draw_bodypose_augmentation"),
    ("draw_utils", "draw_handpose"),
    ("draw_utils", "draw_facepose"),
    ("nodes", "RenderNLFPoses.predict"),
]


def upstream_digest(modules: Mapping[str, types.ModuleType]) -> str:
    """sha256 of the ``PINNED`` functions' sources joined (a missing one is named instead)."""
    sources = []
    for module_name, name in PINNED:
        obj: Any = modules.get(module_name)
        for part in name.split("."):
            obj = getattr(obj, part, None)
        sources.append(f"<{module_name}.{name} missing>" if obj is None else inspect.getsource(obj))
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()


# --- the renderer (``renderer.py``) ----------------------------------------------------------


def _sibling(name: str) -> types.ModuleType:
    """This package's ``name``.py, loaded by path once (ComfyUI loads this package by path)."""
    module_name = f"xicon_pose_render_{name}"
    module = sys.modules.get(module_name)
    if module is None:
        path = Path(__file__).resolve().with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module


Renderer = _sibling("renderer").Renderer
Skeleton = _sibling("skeleton").Skeleton
lay_over = _sibling("skeleton").lay_over


# --- the node's output made batch by batch ------------------------------------------------------

_node_output = _sibling("node_output")
_local = _node_output._local  # the prompt thread's request (predict) and sink (the 3D pass)
Request = _node_output.Request
NodeOutput = _node_output.NodeOutput
mask_from = _node_output.mask_from
current_sink = _node_output.current_sink


def streamed(original: Callable[..., Any]) -> Callable[..., Any]:
    """``RenderNLFPoses.predict``: upstream's, returning the image and mask a ``NodeOutput``
    made when the render streamed its frames (upstream's tail then ran on a one-frame stand-in);
    upstream's own result otherwise."""

    @functools.wraps(original)
    def predict(self: Any, *args: Any, **kwargs: Any) -> Any:
        previous = getattr(_local, "request", None)
        request = _local.request = Request()
        try:
            result = original(self, *args, **kwargs)
        finally:
            _local.request = previous
        return result if request.result is None else request.result

    setattr(predict, REPLACED, True)
    return predict


# --- the other replacements ----------------------------------------------------------------------


class KeptInit:
    """``taichi.init`` that returns at once when called as last time while that runtime is up."""

    def __init__(self, original: Callable[..., Any], ti: Any) -> None:
        self.original = original
        self.ti = ti  # the taichi module whose init this is
        self.key: str | None = None
        self.initialised = 0
        setattr(self, REPLACED, True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = repr((args, sorted(kwargs.items())))
        if key == self.key and self.ti.lang.impl.get_runtime().prog is not None:
            return None
        result = self.original(*args, **kwargs)
        self.key = key
        self.initialised += 1
        return result


def draw_2d_pass(
    draw_pose_to_canvas_np: Callable[..., list],
    height: int,
    width: int,
    draw_face: bool,
    draw_hands: bool,
    poses: list,
) -> list[np.ndarray]:
    """Upstream's 2D pass of ``render_nlf_as_images``: its call, with its arguments."""
    return draw_pose_to_canvas_np(
        poses,
        pool=None,
        H=height,
        W=width,
        reshape_scale=0,
        show_feet_flag=False,
        show_body_flag=False,
        show_cheek_flag=True,
        dw_hand=True,
        show_face_flag=draw_face,
        show_hand_flag=draw_hands,
    )


def overlay_after(
    original: Callable[..., Any],
    draw_pose_to_canvas_np: Callable[..., Any],
    draw_utils: types.ModuleType,
):
    """``render_nlf_as_images``: upstream's 3D pass, then its 2D pass laid over each frame by a
    ``Skeleton``."""

    def skeleton(height: int, width: int, draw_face: bool, draw_hands: bool) -> Any:
        draw_pass = functools.partial(
            draw_2d_pass, draw_pose_to_canvas_np, height, width, draw_face, draw_hands
        )
        return Skeleton(draw_utils, draw_pass, height, width, draw_face, draw_hands)

    @functools.wraps(original)
    def render_nlf_as_images(
        smpl_poses: Any,
        dw_poses: Any,
        height: int,
        width: int,
        video_length: int,
        intrinsic_matrix: Any = None,
        draw_2d: bool = True,
        draw_face: bool = True,
        draw_hands: bool = True,
        render_backend: str = "taichi",
    ) -> list[np.ndarray]:
        def three_d() -> list[np.ndarray]:  # upstream's own, without its 2D pass
            return original(
                smpl_poses,
                dw_poses,
                height,
                width,
                video_length,
                intrinsic_matrix=intrinsic_matrix,
                draw_2d=False,
                draw_face=draw_face,
                draw_hands=draw_hands,
                render_backend=render_backend,
            )

        request = getattr(_local, "request", None)
        if request is None or request.result is not None or dw_poses is None or not draw_2d:
            frames = three_d()
            if dw_poses is not None and draw_2d:
                return overlaid(frames, dw_poses, height, width, draw_face, draw_hands)
            return frames
        output = NodeOutput(
            copy.deepcopy(dw_poses),
            skeleton(height, width, draw_face, draw_hands),
            video_length,
            height,
            width,
        )
        state = random.getstate()  # the 2D pass draws random numbers (upstream's drop_aug)
        _local.sink = output
        try:
            frames = three_d()
        finally:
            _local.sink = None
        if output.failed is not None:
            raise output.failed
        if output.complete:
            request.result = (output.image, output.mask)
            return [np.zeros((height, width, 4), np.uint8)]  # for predict's own tail
        # not streamed (upstream's torch renderer): its frames, the 2D pass laid over them
        random.setstate(state)
        return overlaid(frames, dw_poses, height, width, draw_face, draw_hands)

    def overlaid(
        frames: list[np.ndarray],
        dw_poses: Any,
        height: int,
        width: int,
        draw_face: bool,
        draw_hands: bool,
    ) -> list[np.ndarray]:
        poses = copy.deepcopy(dw_poses)
        if len(poses) != len(frames):  # upstream's own: it draws every pose, then indexes
            canvas_2d = draw_2d_pass(
                draw_pose_to_canvas_np, height, width, draw_face, draw_hands, poses
            )
            for i in range(len(frames)):
                lay_over(frames[i], canvas_2d[i])
            return frames
        overlay = skeleton(height, width, draw_face, draw_hands)
        for frame, pose in zip(frames, poses, strict=True):
            overlay(frame, pose)
        return frames

    setattr(render_nlf_as_images, REPLACED, True)
    return render_nlf_as_images


def remembered(original: Callable[[Any], np.ndarray]) -> Callable[[Any], np.ndarray]:
    """``hsv_to_rgb`` computed once per input; each call gets its own copy."""
    cache: dict[tuple[Any, ...], np.ndarray] = {}

    @functools.wraps(original)
    def hsv_to_rgb(hsv: Any) -> np.ndarray:
        key_array = np.asarray(hsv, dtype=np.float32)
        key = (key_array.shape, key_array.tobytes())
        rgb = cache.get(key)
        if rgb is None:
            if len(cache) >= 1024:
                cache.clear()
            rgb = cache[key] = original(hsv)
        return rgb.copy()

    setattr(hsv_to_rgb, REPLACED, True)
    return hsv_to_rgb


def patch(
    nlf_render: types.ModuleType,
    env: Mapping[str, str] | None = None,
    taichi_module: types.ModuleType | None = None,
) -> str:
    """Put the replacements in place after SCAIL-Pose's ``nlf_render`` has run; the line to log.
    ``taichi_module`` is the ``taichi`` whose ``init`` is kept (the imported one by default)."""
    if not enabled(os.environ if env is None else env):
        return f"off ({ENV})"
    if getattr(nlf_render.render_nlf_as_images, REPLACED, False):
        return "already in place"
    modules = upstream_modules(nlf_render)
    missing = {"draw_pose_utils", "draw_utils", "nodes"} - modules.keys()
    if missing:
        return f"SCAIL-Pose's {', '.join(sorted(missing))} not found; the render left as it is"
    taichi_ok = getattr(nlf_render, "render_whole_taichi", None) is not None
    if not taichi_ok:
        return "taichi not importable in SCAIL-Pose; the render left as it is"
    digest = upstream_digest(modules)
    if digest != UPSTREAM_SHA256:
        return (
            f"upstream's pose render changed (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); the render left as it is"
        )
    if taichi_module is None:
        import taichi as taichi_module
    renderer = Renderer(modules["taichi_cylinder"].flatten_specs, current_sink)
    draw_utils = modules["draw_utils"]
    draw_utils.hsv_to_rgb = remembered(draw_utils.hsv_to_rgb)
    nlf_render.render_nlf_as_images = overlay_after(
        nlf_render.render_nlf_as_images, nlf_render.draw_pose_to_canvas_np, draw_utils
    )
    nlf_render.render_whole_taichi = renderer
    node_class = modules["nodes"].RenderNLFPoses
    stream = enabled(os.environ if env is None else env, STREAM_ENV)
    if stream and not getattr(node_class.predict, REPLACED, False):
        node_class.predict = streamed(node_class.predict)
    if not getattr(taichi_module.init, REPLACED, False):
        taichi_module.init = KeptInit(taichi_module.init, taichi_module)
    line = "SCAIL pose render: taichi runtime and kernels kept, frames in batches, one-pass overlay"
    return line + (", the node's output made batch by batch" if stream else f" ({STREAM_ENV} off)")


# --- taichi started before the first render ---------------------------------------------------


def nlf_render_name(modules: Mapping[str, types.ModuleType]) -> str | None:
    """The name ``nlf_render`` gets when imported from the loaded SCAIL-Pose package (ComfyUI
    names a pack's package after its path)."""
    for name, module in list(modules.items()):
        if name.endswith(PACK) and hasattr(module, "__path__"):
            return f"{name}.NLFPoseExtract.nlf_render"
    return None


def warm(modules: Mapping[str, types.ModuleType] | None = None, arch: str = WARM_ARCH) -> str:
    """Import SCAIL-Pose's ``nlf_render`` (the hook puts the replacements in place) and, when they
    are in place, start taichi as node 362 will (``ti.init(arch=ti.<arch>)``); the line to log."""
    name = nlf_render_name(sys.modules if modules is None else modules)
    if name is None:
        return f"{PACK} not loaded; taichi starts with the first render"
    nlf_render = importlib.import_module(name)
    if not getattr(nlf_render.render_nlf_as_images, REPLACED, False):
        return "the render is upstream's; taichi starts with the first render"
    import taichi as ti  # its init is the kept one: patch() put it in place with the render

    t0 = time.perf_counter()
    ti.init(arch=getattr(ti, arch))
    return f"taichi started for the first render in {time.perf_counter() - t0:.1f} s"


def warm_logged() -> None:
    try:
        log.info("xicon_pose_render: %s", warm())
    except Exception:  # the render then starts taichi itself, as upstream does
        log.exception("xicon_pose_render: taichi not started ahead; the first render starts it")


def install_warm(
    executor_class: type,
    env: Mapping[str, str],
    cuda_available: Callable[[], bool],
    target: Callable[[], None] = warm_logged,
) -> str:
    """Run ``target`` once, on ComfyUI's prompt worker thread as it builds its ``executor_class``
    (``PromptExecutor``: every node is loaded by then, no prompt taken yet); the line to log."""
    if not enabled(env):
        return f"off ({ENV})"
    if not enabled(env, WARM_ENV):
        return f"taichi starts with the first render ({WARM_ENV})"
    if not cuda_available():
        return "no CUDA device; taichi starts with the first render"
    original = executor_class.__init__
    if getattr(original, REPLACED, False):
        return "taichi's start already arranged"
    started: list[bool] = []

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if not started:
            started.append(True)
            target()

    setattr(__init__, REPLACED, True)
    executor_class.__init__ = __init__
    return "taichi starts on the prompt worker once ComfyUI has loaded its nodes"


class _Loader(importlib.abc.Loader):
    """The pack's own loader, with the replacements after its module has run; anything else
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
            log.info("xicon_pose_render: %s", patch(module))
        except Exception:  # never break the pack: it then runs as upstream ships it
            log.exception("xicon_pose_render: the render left as it is")


class Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of SCAIL-Pose's ``NLFPoseExtract.nlf_render`` (by module-name suffix)."""

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
