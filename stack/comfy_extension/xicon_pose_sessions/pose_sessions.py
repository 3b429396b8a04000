"""The pose detectors' ONNX sessions kept from run to run while the GPU has room for them.

Why: pose detection (ComfyUI-SCAIL-Pose ``PoseDetectionVitPoseToDWPose``: node 365 on the reference
image, node 363 on the driving clip) calls ``reinit()`` on WanAnimatePreprocess's YOLO and ViTPose
models before its frames and ``cleanup()`` after them (``models/onnx_models.py``
``SimpleOnnxInference``). ``cleanup`` deletes the ``onnxruntime.InferenceSession`` and ``reinit``
builds a new one from the model file, so every run of either node pays two session starts: the
file read and parsed (ViTPose-L is 1.2 GB), the graph optimised, on the CUDA provider its weights
copied to the GPU and cuDNN set up. With ViTPose-L's layers at their true shapes, one start on the
CPU provider took 1.0-1.6 s on a 2-core machine (``bench/results/cpu_pose_sessions``); a warm job
runs both nodes, so four starts. Upstream deletes the sessions to give their GPU memory back
before the sampler (ViTPose-L's weights alone are 1.2 GB in float32).

What: ``SimpleOnnxInference.cleanup`` keeps the session when ``keeps`` says the GPU has room for it
through the rest of the job; ``reinit`` then finds it and returns at once, as upstream's does.
``XICON_POSE_SESSIONS``:
- ``auto`` (default): keep a session that holds no GPU memory (CPU provider); on the CUDA provider,
  keep it when ComfyUI's usable GPU memory (the card less ``--reserve-vram``) is at least
  ``KEEP_MIN_GIB``, or when the run that just ended was no larger than ``KEEP_MAX_PIXEL_FRAMES``
  (frames x height x width: a 10-s clip at 416x672; a longer clip's decode needs the memory, so
  after it the sessions go as upstream's do). The reference image's one frame keeps them for the
  clip's run of the same job, which then decides.
- ``keep``: always keep; ``release``: upstream's behaviour.
The run's size comes from a wrapper of the node's ``process`` (its ``images``); a ``cleanup`` from
any other caller decides on the GPU alone.

Installed once, before ComfyUI runs its first prompt (custom nodes load in no fixed order), and
only when ``cleanup``, ``reinit`` and the node's ``process`` still have the source this was written
against (``UPSTREAM_SHA256``); otherwise nothing changes and the reason is logged.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("xicon_pose_sessions")

ENV = "XICON_POSE_SESSIONS"
SETTINGS = ("auto", "keep", "release")
NODE = "PoseDetectionVitPoseToDWPose"
MODULE_SUFFIX = "ComfyUI-WanAnimatePreprocess.models.onnx_models"
# sha256 of the sources of SimpleOnnxInference.cleanup, SimpleOnnxInference.reinit (at
# ComfyUI-WanAnimatePreprocess 1a35b81a418bbba093356ad19b19bf2a76a24f4e) and
# PoseDetectionVitPoseToDWPose.process (at ComfyUI-SCAIL-Pose
# 11402b150d728440a4a89964faa58907f84c35e6), joined.
UPSTREAM_SHA256 = "01b2d53f75272e485e036742af211f4fb62cc333f9bc50ac308aee172fcc64de"
WRAPPED = "_xicon_pose_sessions"
LOGGED = "_xicon_pose_sessions_kept"  # on a model: the reason last logged for keeping it
GIB = 1024**3
KEEP_MIN_GIB = 40.0
KEEP_MAX_PIXEL_FRAMES = 241 * 416 * 672
# (frames, height, width) of the node run now ending; None outside one
RUN: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar(
    "xicon_pose_run", default=None
)


def setting(env: Mapping[str, str]) -> str | None:
    """The setting, or None when ``ENV`` holds something else."""
    value = env.get(ENV, "").strip().lower() or "auto"
    return value if value in SETTINGS else None


def keeps(
    choice: str, on_gpu: bool, usable_gib: float | None, run: tuple[int, int, int] | None
) -> tuple[bool, str]:
    """Whether a session is kept after a run of ``run`` (frames, height, width), and why."""
    if choice != "auto":
        return choice == "keep", f"{ENV}={choice}"
    if not on_gpu or usable_gib is None:
        return True, "it holds no GPU memory"
    if usable_gib >= KEEP_MIN_GIB:
        return True, f"{usable_gib:.1f} GiB of GPU memory usable"
    gpu = f"on a {usable_gib:.1f}-GiB GPU"
    if run is None:
        return False, f"a run of unknown size {gpu}"
    frames, height, width = run
    size = f"{frames} frame(s) of {width}x{height}"
    if frames * height * width <= KEEP_MAX_PIXEL_FRAMES:
        return True, f"{size} {gpu}"
    return False, f"{size} {gpu}: the rest of the job needs the memory"


def kept_cleanup(
    cleanup: Callable[[Any], Any], choice: str, usable_gib: float | None
) -> Callable[[Any], Any]:
    """``SimpleOnnxInference.cleanup`` that keeps the session when ``keeps`` says so."""

    @functools.wraps(cleanup)
    def wrapped(self: Any) -> Any:
        try:
            on_gpu = "CUDAExecutionProvider" in (getattr(self, "provider", None) or ())
            keep, why = keeps(choice, on_gpu, usable_gib, RUN.get())
        except Exception:  # never break a job: upstream's cleanup then runs
            log.exception("xicon_pose_sessions: the session is released as upstream does")
            keep, why = False, "error"
        name = type(self).__name__
        if not keep:
            log.info("xicon_pose_sessions: %s's session released (%s)", name, why)
            return cleanup(self)
        if getattr(self, LOGGED, None) != why:  # once per model and reason
            setattr(self, LOGGED, why)
            log.info("xicon_pose_sessions: %s's session kept for the next run (%s)", name, why)
        return None

    setattr(wrapped, WRAPPED, True)
    return wrapped


def sized_process(process: Callable[..., Any]) -> Callable[..., Any]:
    """The node's ``process`` with ``RUN`` set to its images' frames, height and width."""

    @functools.wraps(process)
    def wrapped(self: Any, vitpose_model: Any, images: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            frames, height, width = (int(v) for v in tuple(images.shape)[:3])
            size: tuple[int, int, int] | None = (frames, height, width)
        except Exception:  # the node then fails or runs as upstream's
            size = None
        token = RUN.set(size)
        try:
            return process(self, vitpose_model, images, *args, **kwargs)
        finally:
            RUN.reset(token)

    setattr(wrapped, WRAPPED, True)
    return wrapped


def onnx_models_module() -> Any:
    """WanAnimatePreprocess's ``models.onnx_models``, as ComfyUI imported it (its module name
    starts with the pack's path), or None."""
    return next((m for name, m in list(sys.modules.items()) if name.endswith(MODULE_SUFFIX)), None)


def upstream_digest(base: type, node_class: type) -> str:
    parts = [inspect.getsource(f) for f in (base.cleanup, base.reinit, node_class.process)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def usable_gpu_gib() -> float | None:
    """ComfyUI's GPU memory: the card's total less ``--reserve-vram``; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    import comfy.model_management as mm

    device = mm.get_torch_device()
    if getattr(device, "type", None) != "cuda":  # ComfyUI itself on the CPU (--cpu)
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    return (total - getattr(mm, "EXTRA_RESERVED_VRAM", 0)) / GIB


def patch(
    registry: Mapping[str, Any], env: Mapping[str, str], usable: Callable[[], float | None]
) -> str:
    """Wrap ``cleanup`` and the node's ``process``; the line to log."""
    choice = setting(env)
    if choice is None:
        return f"{ENV} must be one of {', '.join(SETTINGS)}; sessions released as upstream does"
    if choice == "release":
        return f"sessions released after every run as upstream does ({ENV}=release)"
    node_class = registry.get(NODE)
    module = onnx_models_module()
    base = getattr(module, "SimpleOnnxInference", None)
    if node_class is None or base is None:
        return f"{NODE} or WanAnimatePreprocess's ONNX models not loaded; nothing to do"
    if getattr(base.cleanup, WRAPPED, False):
        return "already patched; nothing to do"
    try:
        digest = upstream_digest(base, node_class)
    except (OSError, TypeError):
        return "the ONNX models' source cannot be read; sessions released as upstream does"
    if digest != UPSTREAM_SHA256:
        return (
            f"the ONNX models or {NODE} changed upstream (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); sessions released as upstream does"
        )
    gib = usable()
    base.cleanup = kept_cleanup(base.cleanup, choice, gib)
    node_class.process = sized_process(node_class.process)
    where = "no GPU" if gib is None else f"{gib:.1f} GiB of GPU memory usable"
    return f"the pose detectors' ONNX sessions are kept between runs while there is room ({where})"


def install(
    executor_class: type,
    registry: Mapping[str, Any],
    env: Mapping[str, str],
    usable: Callable[[], float | None] = usable_gpu_gib,
) -> str:
    """Patch when ``executor_class`` (ComfyUI's ``PromptExecutor``) runs its first prompt; the
    line to log now."""
    original = executor_class.execute_async
    if getattr(original, WRAPPED, False):
        return "already installed"
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_pose_sessions: %s", patch(registry, env, usable))
            except Exception:  # never break a prompt: the sessions then go as upstream's do
                log.exception("xicon_pose_sessions: sessions released as upstream does")
        return await original(self, *args, **kwargs)

    setattr(execute_async, WRAPPED, True)
    executor_class.execute_async = execute_async
    return f"{NODE}'s ONNX sessions will be looked after from the first prompt"
