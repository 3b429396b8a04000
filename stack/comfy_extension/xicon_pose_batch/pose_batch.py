"""Pose detection's two ONNX models run over several frames per call where the model takes a
batch, instead of one frame per call.

Why: pose detection (ComfyUI-SCAIL-Pose ``PoseDetectionVitPoseToDWPose.process``: node 365 on the
reference image, node 363 on the driving clip) runs WanAnimatePreprocess's YOLO and then its
ViTPose once per frame, each call a batch of one. On onnxruntime's CUDA provider a batch-1 call of
ViT-L (192 tokens) is mostly fixed cost: the kernels' launches, the copies to and from the GPU,
the session's own work per run. On an H100 held to 32 GB node 363 took 1.04 s for an 81-frame
clip and 18.8 s for a 60-s one (1441 frames), about 13 ms a frame, with its detectors' sessions
kept (``bench/results/gpu_h100_sessions_pages``).

What: the node's ``process`` replaced by the same steps, with a model whose input's first axis
is not a fixed number (ViTPose as easy_ViTPose exports it: ``input_0``'s batch axis is
symbolic) given ``BATCH`` frames per call: the frames resized for YOLO, or cropped and
normalised for ViTPose, exactly as upstream does each one, stacked; the results are upstream's
per frame (``Yolo.forward`` and ``ViTPose.forward`` take batches, and the keypoint decoding is
per frame). A model with a fixed batch of one (YOLOv10m as WanAnimatePreprocess ships it) runs
one frame per call, as upstream's does. The clip goes in chunks of ``BATCH`` frames, and YOLO
looks for the boxes of the chunks ahead in a thread of its own while ViTPose runs on the chunk
whose boxes are found (upstream finds every box first); and ViTPose's keypoints are decoded
from its heatmaps in another thread while ViTPose runs on the next chunk (``ViTPose.forward``'s
two steps, its session's run and its ``keypoints_from_heatmaps``, taken apart as its pinned
source, ``VITPOSE_FORWARD_SHA256``, does them; at most ``DECODES_AHEAD`` chunks wait): the
two sessions' GPU work and the node's CPU work overlap (the node's own CPU work, decoding
included, was about 5.7 ms a frame on an H100's host before the decoding had its thread,
``bench/results/gpu_h100_batch_ops``). On onnxruntime's CPU provider, where both models already
use every core, each model's steps run in the node's own thread, chunk by chunk. Both sessions
are released after the last chunk (upstream releases YOLO's before ViTPose runs). Everything else
is upstream's own functions: the sessions' ``reinit`` and ``cleanup``, ``bbox_from_detector``,
``crop``, ``load_pose_metas_from_kp2ds_seq``, ``aaposemeta_to_dwpose_scail``. A batch may
run other kernels than a single frame, so heatmaps may differ in their last bits: on the CPU
provider the tests' small model gives upstream's poses to the bit, ViTPose-L's heatmaps are
within 6.4e-7 of upstream's (``bench/results/cpu_batch_ops``); on the GPU two new CUDA sessions
already differ so.

``XICON_POSE_BATCH``: frames per call, 1 to ``MAX_BATCH`` (default ``DEFAULT_BATCH``); ``1`` or
``off`` leaves upstream's ``process``. Installed as an import hook on the pack's ``nodes.py``,
only when the node's ``process`` still has the source this was written against
(``UPSTREAM_SHA256``); otherwise nothing changes and the reason is logged. The replacement keeps
upstream's function as ``__wrapped__`` (``inspect.getsource`` reads upstream's source through
it), so ``xicon_pose_sessions`` checks and wraps it as it would upstream's.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger("xicon_pose_batch")

ENV = "XICON_POSE_BATCH"
DEFAULT_BATCH = 16
MAX_BATCH = 256
NODE = "PoseDetectionVitPoseToDWPose"
TARGET = "ComfyUI-SCAIL-Pose.nodes"
# sha256 of inspect.getsource(PoseDetectionVitPoseToDWPose.process) at ComfyUI-SCAIL-Pose
# 11402b150d728440a4a89964faa58907f84c35e6's nodes.py.
UPSTREAM_SHA256 = "ebb9eba0aca5a0ad64ea5e9775ba4804361e7d27a222908be015c307de932d78"
REPLACED = "_xicon_pose_batch"
# sha256 of inspect.getsource(ViTPose.forward) at ComfyUI-WanAnimatePreprocess
# 1a35b81a418bbba093356ad19b19bf2a76a24f4e's models/onnx_models.py.
VITPOSE_FORWARD_SHA256 = "2f8ed48daf5d97becdc260ebd7fb0264823434cdd934a1820c1d55d254f1a6c0"
DECODES_AHEAD = 2  # chunks whose heatmaps wait for the decoding thread, at most
YOLO_SIDE = 640  # upstream resizes every frame to 640x640 for YOLO
INPUT_RESOLUTION = (256, 192)  # ViTPose's crop, upstream's constants below
RESCALE = 1.25


def batch_setting(env: Mapping[str, str]) -> tuple[int | None, str]:
    """Frames per call from ``ENV`` (None: leave upstream's ``process``), and why."""
    raw = env.get(ENV, "").strip().lower()
    if not raw:
        return DEFAULT_BATCH, f"{DEFAULT_BATCH} frames per call"
    if raw in {"off", "1"}:
        return None, f"{ENV}={raw}: one frame per call as upstream"
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BATCH:
        return None, f"{ENV} must be off or a whole number 1-{MAX_BATCH}; one frame per call"
    return value, f"{value} frames per call"


def takes_batches(model: Any) -> bool:
    """Whether the model's session takes any number of frames (its input's first axis is not
    a fixed number)."""
    session = getattr(model, "session", None)
    if session is None:
        return False
    first = session.get_inputs()[0].shape[0]
    return not isinstance(first, int)


def on_gpu(model: Any) -> bool:
    """Whether the model's session runs on onnxruntime's CUDA provider (not a CPU fallback)."""
    session = getattr(model, "session", None)
    return session is not None and "CUDAExecutionProvider" in session.get_providers()


def upstream_digest(process: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(process).encode()).hexdigest()


def vitpose_steps(
    pose_model: Any,
) -> tuple[Callable[[Any], Any], Callable[[Any, Any, Any], Any]] | None:
    """``ViTPose.forward``'s two steps for ``pose_model``: the session's run on a batch of crops
    (heatmaps), and the keypoint decoding of those heatmaps with the crops' centres and scales,
    as its pinned source does them (``VITPOSE_FORWARD_SHA256``); None for another source. The
    decoding is the module's ``keypoints_from_heatmaps`` at call time (``xicon_pose_decode``'s,
    where it is installed)."""
    forward = getattr(type(pose_model), "forward", None)
    if forward is None:
        return None
    try:
        digest = upstream_digest(forward)
    except (OSError, TypeError):
        return None
    if digest != VITPOSE_FORWARD_SHA256:
        return None
    g = forward.__globals__
    np = g["np"]

    def heatmaps(img: Any) -> Any:
        session = pose_model.session
        return session.run([], {session.get_inputs()[0].name: img})[0]

    def decode(maps: Any, center: Any, scale: Any) -> Any:
        points, prob = g["keypoints_from_heatmaps"](
            heatmaps=maps, center=center, scale=scale * 200, unbiased=True, use_udp=False
        )
        return np.concatenate([points, prob], axis=2)

    return heatmaps, decode


def yolo_input(images: Any, most: int, cv2: Any, np: Any) -> Callable[[Any], Any]:
    """A function of up to ``most`` frames of ``images`` (N, H, W, C) giving upstream's YOLO
    input for them, ``np.stack([cv2.resize(img, (YOLO_SIDE, YOLO_SIDE)).transpose(2, 0, 1) for
    img in frames])``, the same values, made in two arrays kept between calls: each frame resized
    into one, its channels split into the other's planes (``cv2.split``) instead of a strided
    copy into new memory. Each call overwrites the last call's result (one caller at a time).

    Why: the frames are float32 at the job's size; each resized frame is 4.7 MiB, and upstream's
    expression writes it twice into newly mapped memory, the second time channel by channel: on
    an H100's host 2.17-2.91 ms a frame against 0.99-1.10 ms this way (``bench/pose_batch.py``'s
    ``prep`` line, ``bench/results/gpu_h100_vae_room``), CPU time taken from YOLO's thread. The
    node was no faster there: its decoding thread, not YOLO's, was the longest.
    """
    channels = images.shape[3] if images.ndim == 4 else 1
    resized = np.empty((YOLO_SIDE, YOLO_SIDE, channels), images.dtype)
    stacked = np.empty((most, channels, YOLO_SIDE, YOLO_SIDE), images.dtype)

    def planes(frames: Any) -> Any:
        for i, img in enumerate(frames):
            cv2.resize(img, (YOLO_SIDE, YOLO_SIDE), dst=resized)
            split = cv2.split(resized, list(stacked[i]))
            for plane, got in zip(stacked[i], split, strict=True):
                if not np.shares_memory(plane, got):  # an OpenCV that returns new planes
                    plane[...] = got
        return stacked[: len(frames)]

    return planes


def batched(
    process: Callable[..., Any],
    batch: int,
    pipelined: bool = True,
    decoding_thread: bool = True,
    kept_arrays: bool = True,
) -> Callable[..., Any]:
    """The node's ``process`` with its detectors run ``batch`` frames per call where they can,
    YOLO's input made in arrays kept between calls (``yolo_input``) unless ``kept_arrays`` is
    False;
    ``pipelined``: YOLO finds the boxes of the next frames in a thread of its own while ViTPose
    runs on the frames whose boxes are found, when YOLO runs on the GPU, and ViTPose's keypoints
    are decoded from its heatmaps in another thread while it runs on the next frames, when
    ViTPose runs on the GPU, unless ``decoding_thread`` is False (on the CPU provider the models
    already use every core); both threads are joined before the node returns."""
    g = process.__globals__  # the pack's module: its numpy, cv2, ProgressBar and helpers
    np, cv2 = g["np"], g["cv2"]
    bbox_from_detector, crop = g["bbox_from_detector"], g["crop"]
    load_pose_metas = g["load_pose_metas_from_kp2ds_seq"]
    to_dwpose = g["aaposemeta_to_dwpose_scail"]
    progress_bar = g["ProgressBar"]

    @functools.wraps(process)
    def run(self: Any, vitpose_model: Any, images: Any) -> Any:
        detector = vitpose_model["yolo"]
        pose_model = vitpose_model["vitpose"]
        frames, height, width, _ = images.shape
        shape = np.array([height, width])[None]
        images_np = images.numpy()
        mean = np.array([0.485, 0.456, 0.406])
        std = np.array([0.229, 0.224, 0.225])

        detector.reinit()
        pose_model.reinit()
        bar = progress_bar(frames * 2)
        yolo_step = batch if takes_batches(detector) else 1
        pose_step = batch if takes_batches(pose_model) else 1

        stop = threading.Event()  # a chunk failed: the chunks after it are not searched

        # YOLO's input, made in the same two arrays for every call (one thread at a time)
        planes = yolo_input(images_np, yolo_step, cv2, np) if kept_arrays else None

        def boxes(first: int) -> list[Any]:
            """YOLO's person box of each frame of the chunk starting at ``first``."""
            found: list[Any] = []
            if stop.is_set():
                return found
            try:
                for start in range(first, min(first + batch, frames), yolo_step):
                    chunk = images_np[start : min(start + yolo_step, first + batch)]
                    if planes is not None:
                        resized = planes(chunk)
                    else:  # upstream's expression
                        resized = np.stack(
                            [
                                cv2.resize(img, (YOLO_SIDE, YOLO_SIDE)).transpose(2, 0, 1)
                                for img in chunk
                            ]
                        )
                    people = detector(resized, np.repeat(shape, len(chunk), axis=0))
                    found.extend(person[0]["bbox"] for person in people)
            except BaseException:
                stop.set()
                raise
            return found

        def cropped(first: int, found: list[Any]) -> list[tuple[Any, Any, Any]]:
            """The chunk's frames cropped around their boxes and normalised, with the crops'
            centres and scales, in ViTPose's calls (``pose_step`` frames each)."""
            crops, centers, scales = [], [], []
            for img, bbox in zip(images_np[first : first + batch], found, strict=True):
                if (
                    bbox is None
                    or bbox[-1] <= 0
                    or (bbox[2] - bbox[0]) < 10
                    or (bbox[3] - bbox[1]) < 10
                ):
                    bbox = np.array([0, 0, img.shape[1], img.shape[0]])
                center, scale = bbox_from_detector(bbox, INPUT_RESOLUTION, rescale=RESCALE)
                cropped = crop(img, center, scale, (INPUT_RESOLUTION[0], INPUT_RESOLUTION[1]))[0]
                crops.append(((cropped - mean) / std).transpose(2, 0, 1).astype(np.float32))
                centers.append(np.array(center))
                scales.append(np.array(scale))
            return [
                (
                    np.stack(crops[i : i + pose_step]),
                    np.stack(centers[i : i + pose_step]),
                    np.stack(scales[i : i + pose_step]),
                )
                for i in range(0, len(crops), pose_step)
            ]

        threaded = pipelined and decoding_thread and on_gpu(pose_model)
        steps = vitpose_steps(pose_model) if threaded else None

        def decoded(maps: list[tuple[Any, Any, Any]]) -> list[Any]:
            assert steps is not None
            return [steps[1](*m) for m in maps]

        firsts = range(0, frames, batch)
        ahead_of_pose = pipelined and on_gpu(detector)
        kp2ds: list[Any] = []
        decoding: deque[Future[list[Any]]] = deque()  # in the chunks' order
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="xicon_pose_yolo") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="xicon_pose_decode") as decoder,
        ):
            ahead = [pool.submit(boxes, first) for first in firsts] if ahead_of_pose else []
            try:
                for i, first in enumerate(firsts):
                    found = ahead[i].result() if ahead_of_pose else boxes(first)
                    calls = cropped(first, found)
                    if steps is None:
                        kp2ds.extend(pose_model(*call) for call in calls)
                    else:  # the heatmaps here, their keypoints in the decoding thread
                        while len(decoding) >= DECODES_AHEAD:
                            kp2ds.extend(decoding.popleft().result())
                        maps = [(steps[0](img), c, s) for img, c, s in calls]
                        decoding.append(decoder.submit(decoded, maps))
                    bar.update_absolute(2 * min(first + batch, frames))
                while decoding:
                    kp2ds.extend(decoding.popleft().result())
            finally:  # on a failure, the boxes not found yet are not looked for
                stop.set()
                for future in [*ahead, *decoding]:
                    future.cancel()
        detector.cleanup()
        pose_model.cleanup()

        kp2ds = np.concatenate(kp2ds, 0)
        pose_metas = load_pose_metas(kp2ds, width=width, height=height)
        dwposes = [to_dwpose(meta) for meta in pose_metas]
        return ({"poses": dwposes, "swap_hands": True},)

    setattr(run, REPLACED, batch)
    return run


def patch(module: types.ModuleType, env: Mapping[str, str]) -> str:
    """Replace the node's ``process`` in the pack's ``nodes`` module; the line to log."""
    node_class = getattr(module, NODE, None)
    if node_class is None:
        return f"{NODE} not found; nothing to do"
    if getattr(node_class.process, REPLACED, None):
        return "already in place"
    batch, why = batch_setting(env)
    if batch is None:
        return f"{why}; pose detection left as it is"
    try:
        digest = upstream_digest(node_class.process)
    except (OSError, TypeError):
        return "the node's source cannot be read; pose detection left as it is"
    if digest != UPSTREAM_SHA256:
        return (
            f"{NODE}.process changed upstream (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); pose detection left as it is"
        )
    node_class.process = batched(node_class.process, batch)
    return f"pose detection runs its detectors {why} where their models take a batch"


class _Loader(importlib.abc.Loader):
    """The pack's own loader, with the replacement after its module has run; anything else
    (``get_source``, ``get_filename``, ...) is the inner loader's."""

    def __init__(self, inner: importlib.abc.Loader, env: Mapping[str, str]) -> None:
        self.inner = inner
        self.env = env

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)
        try:
            log.info("xicon_pose_batch: %s", patch(module, self.env))
        except Exception:  # never break the pack: it then runs as upstream ships it
            log.exception("xicon_pose_batch: pose detection left as it is")


class Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of SCAIL-Pose's ``nodes`` module (by module-name suffix: ComfyUI names a
    pack's modules after its folder)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.endswith(TARGET):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.env)
        return spec


def install(env: Mapping[str, str], meta_path: list[Any] | None = None) -> bool:
    """Add the import hook once; False when it is already there."""
    meta_path = sys.meta_path if meta_path is None else meta_path
    if any(isinstance(f, Finder) for f in meta_path):
        return False
    meta_path.insert(0, Finder(env))
    return True
