"""VideoHelperSuite's video load on every core, with upstream's frames bit for bit.

Why: ``VHS_LoadVideo`` (node 130; ``videohelpersuite/load_video_nodes.py`` at the pinned commit:
``cv_frame_generator`` ~L77-168, ``load_video`` ~L315-419) decodes each frame with OpenCV, makes
it float32 with ``np.array`` on one core, divides it by 255, and gathers the clip with
``np.fromiter`` into a buffer that grows as frames come: every frame is copied once more, into
memory whose pages are faulted in one at a time.

What: once ComfyUI runs its first prompt (custom nodes load in no fixed order, so VHS's module
is found through ComfyUI's node registry then), and only where upstream's source is the one
this was written against (``LOAD_SHA256``), VHS's module function ``load_video`` is wrapped. A
plain load (OpenCV's loader, no batch manager, no VAE, no memory limit given, ``force_rate`` 0,
``select_every_nth`` 1, no resize: the size VHS would give is the clip's own) reads the same
frames in the same order (``skip_first_frames`` and ``frame_load_cap`` as upstream) on a thread
of its own, 16 at a time in 8 bits, while the node's thread converts each batch with torch on
every core straight into one float32 clip tensor allocated once (for as many frames as the
clip's header says, at most what the RAM available holds), with upstream's own operations:
8-bit values to float32 (exact), then ``div_(255)``. The frame count, audio and
``video_info`` are upstream's, computed the same way; the memory limit (RAM available at the
start) and its error too. Any other load is upstream's, unchanged. Measured
(``bench/io_nodes.py``, the 60-s dance at 416x672 through the real ComfyUI): 7.4-11.0 →
3.4-5.4 s on 2 cores, 7.17 → 2.69 s on an H100 host's 16 cores; through the worker on that H100
8.91 → 2.79 s (``bench/results/gpu_h100_video_frames``; those runs touched the whole clip's
pages before loading it, which a header's count too high would have made costly).

Not done: VHS_VideoCombine's frame conversion (``tensor_to_bytes``) with torch on every core
gave the same bytes but slowed the node on 2 cores, 7.1-7.5 → 10.6-10.8 s: its threads took
the cores x264 was encoding on.

``XICON_VIDEO_FRAMES=off`` turns it off. A failure while patching leaves the node as it is and
is logged; a failure while loading (the reading thread's included) fails the node as upstream's
would, after the thread has ended.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

log = logging.getLogger("xicon_video_frames")

ENV = "XICON_VIDEO_FRAMES"
LOAD_NODE = "VHS_LoadVideo"
# sha256 of inspect.getsource of load_video, resized_cv_frame_gen and cv_frame_generator, joined
# by newlines, at ComfyUI-VideoHelperSuite 4ee72c065db22c9d96c2427954dc69e7b908444b's
# videohelpersuite/load_video_nodes.py.
LOAD_SHA256 = "0a0dd1d9a918ef304bd783c613789334fbab01bbe3e13de7c0268209f4f75c4e"
WRAPPED = "_xicon_video_frames"
BATCH = 16  # frames decoded ahead per batch, in 8 bits
AHEAD = 3  # batches waiting for the node's thread, at most
PLAIN_KEYS = frozenset(
    {
        "video",
        "force_rate",
        "custom_width",
        "custom_height",
        "frame_load_cap",
        "skip_first_frames",
        "select_every_nth",
    }
)


def enabled(env: Mapping[str, str]) -> bool:
    """False when ``ENV`` is ``0``/``off``/``false``/``no``; True otherwise (the default)."""
    return env.get(ENV, "").strip().lower() not in {"0", "off", "false", "no"}


def load_digest(module: Any) -> str:
    parts = [
        inspect.getsource(getattr(module, name))
        for name in ("load_video", "resized_cv_frame_gen", "cv_frame_generator")
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Reader:
    """OpenCV's frames of ``cap`` (already opened and its first frame grabbed, as upstream's
    generator leaves it) in RGB, 8 bits, ``BATCH`` at a time, read by a thread of this object's
    own: frames 1 .. ``skip`` passed over, then up to ``limit`` taken (``None``: to the end).
    Iterate for (count, uint8 array of ``BATCH`` frames, the first ``count`` filled); ``close``
    (also on leaving a ``with`` block) stops the thread and waits for it."""

    def __init__(self, cv2: Any, cap: Any, skip: int, limit: int | None) -> None:
        self.cv2, self.cap, self.skip, self.limit = cv2, cap, skip, limit
        self.batches: queue.Queue[tuple[int, np.ndarray] | BaseException | None] = queue.Queue(
            AHEAD
        )
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="xicon-video-frames", daemon=True)
        self.thread.start()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, item: tuple[int, np.ndarray] | BaseException | None) -> bool:
        while not self.stopping.is_set():
            try:
                self.batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _frames(self) -> Iterator[np.ndarray]:
        cv2, cap = self.cv2, self.cap
        seen = 0
        taken = 0
        first = True
        while cap.isOpened():
            if not first and not cap.grab():  # upstream's first frame is grabbed already
                break
            first = False
            seen += 1
            if seen <= self.skip:
                continue
            _, frame = cap.retrieve()
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            taken += 1
            if self.limit is not None and taken >= self.limit:
                break

    def _run(self) -> None:
        try:
            batch: np.ndarray | None = None
            count = 0
            for frame in self._frames():
                if self.stopping.is_set():
                    return
                if batch is None:
                    batch = np.empty((BATCH, *frame.shape), dtype=np.uint8)
                batch[count] = frame
                count += 1
                if count == BATCH:
                    if not self._put((count, batch)):
                        return
                    batch, count = None, 0
            if count and not self._put((count, batch)):  # type: ignore[arg-type]
                return
            self._put(None)
        except BaseException as exc:  # handed to the node's thread, raised there
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        while True:
            item = self.batches.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()


def plain(kwargs: Mapping[str, Any], meta_batch: Any, memory_limit_mb: Any, vae: Any) -> bool:
    """Whether upstream's ``load_video`` would take the frames one by one, untouched: no batch
    manager, no VAE, no memory limit given, every frame at the clip's own rate."""
    return (
        meta_batch is None
        and vae is None
        and memory_limit_mb is None
        and set(kwargs) <= PLAIN_KEYS
        and "video" in kwargs
        and kwargs.get("force_rate", 0) == 0
        and kwargs.get("select_every_nth", 1) == 1
        and kwargs.get("custom_width", 0) == 0
        and kwargs.get("custom_height", 0) == 0
    )


def load_frames(
    cv2: Any,
    cap: Any,
    skip: int,
    limit: int | None,
    expected: int,
    height: int,
    width: int,
    progress: Callable[[int], None] = lambda n: None,
) -> torch.Tensor:
    """The clip as one float32 (T, H, W, 3) tensor of upstream's values (8-bit values to
    float32, then ``div_(255)``), at most ``limit`` frames after ``skip``. ``expected`` frames
    are allocated at once (address space only: each batch's pages are faulted in by torch's
    copy, on every core, as it is written, so a count that was too high costs no memory); more
    are gathered after (one more copy), fewer are copied out. Where the allocation fails, every
    frame is gathered so. ``progress`` gets the frames loaded so far after each batch."""
    try:
        frames = torch.empty((max(expected, 0), height, width, 3), dtype=torch.float32)
    except RuntimeError:  # no such room: gather as they come
        frames = torch.empty((0, height, width, 3), dtype=torch.float32)
    written = 0
    loaded = 0
    extra: list[torch.Tensor] = []
    with Reader(cv2, cap, skip, limit) as reader:
        for count, batch in reader:
            loaded += count
            source = torch.from_numpy(batch[:count])
            room = frames.shape[0] - written
            if room:
                part = frames[written : written + min(room, count)]
                part.copy_(source[: part.shape[0]])
                part.div_(255)
                written += part.shape[0]
            if count > room:
                more = source[room:].to(torch.float32)
                more.div_(255)
                extra.append(more)
            progress(loaded)
    if extra:
        return torch.cat([frames[:written], *extra])
    if written < frames.shape[0]:
        return frames[:written].clone()
    return frames


def fast_load_video(original: Callable[..., Any], vhs: Any) -> Callable[..., Any]:
    """``load_video`` of VHS's module ``vhs`` (pinned source, ``LOAD_SHA256``): a plain load
    (``plain``) read by ``load_frames`` with upstream's frame count, audio and video info;
    anything else by ``original``."""

    @functools.wraps(original)
    def load_video(
        meta_batch: Any = None,
        unique_id: Any = None,
        memory_limit_mb: Any = None,
        vae: Any = None,
        format: str = "None",  # upstream's keyword
        **kwargs: Any,
    ) -> Any:
        def upstream() -> Any:
            return original(
                meta_batch=meta_batch,
                unique_id=unique_id,
                memory_limit_mb=memory_limit_mb,
                vae=vae,
                format=format,
                **kwargs,
            )

        if not plain(kwargs, meta_batch, memory_limit_mb, vae):
            return upstream()
        fmt = vhs.get_format(format)
        video = vhs.strip_path(kwargs["video"])
        downscale_ratio = fmt.get("dim", (1,))[0]
        cv2 = vhs.cv2
        cap = cv2.VideoCapture(video)
        try:
            if not cap.isOpened() or not cap.grab():
                raise ValueError(f"{video} could not be loaded with cv.")
            fps = cap.get(cv2.CAP_PROP_FPS)
            total_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            duration = total_frames / fps
            _, first = cap.retrieve()
            height, width, _ = first.shape
            new_width, new_height = vhs.target_size(width, height, 0, 0, downscale_ratio)
            if (new_width, new_height) != (width, height):  # VHS would resize it
                cap.release()
                return upstream()
            target_frame_time = 1 / fps
            cap_frames = kwargs.get("frame_load_cap", 0)
            skip = kwargs.get("skip_first_frames", 0)
            yieldable = total_frames if total_frames > 0 else 0
            if cap_frames != 0:
                yieldable = min(cap_frames, yieldable)
            try:
                memory = vhs.psutil.virtual_memory().available + vhs.psutil.swap_memory().free
                max_loadable = int((memory - 2**27) // (width * height * 3 * 0.1))
            except Exception:  # as upstream: no figure, no limit
                memory, max_loadable = None, vhs.BIGMAX
            limit = max_loadable if cap_frames == 0 else min(cap_frames, max_loadable)
            bar = vhs.ProgressBar(yieldable)
            # the clip's count from its header, never more than the RAM available holds
            fits = 0 if memory is None else int(memory // (width * height * 3 * 4))
            expected = min(max(total_frames - skip, 0), limit, fits) if total_frames > 0 else 0
            images = load_frames(
                cv2,
                cap,
                skip,
                limit,
                expected,
                height,
                width,
                lambda n: bar.update_absolute(n, yieldable),
            )
            # upstream reads at most max_loadable frames and fails if the clip had more
            memory_bound = cap_frames == 0 or cap_frames > max_loadable
            if memory_bound and len(images) == max_loadable and cap.grab():
                raise RuntimeError(
                    f"Memory limit hit after loading {len(images)} frames. Stopping execution."
                )
        finally:
            cap.release()
        if len(images) == 0:
            raise RuntimeError("No frames generated")
        if "frames" in fmt and len(images) % fmt["frames"][0] != fmt["frames"][1]:
            err_msg = (
                f"The number of frames loaded {len(images)}, does not match the requirements of "
                "the currently selected format."
            )
            if len(fmt["frames"]) > 2 and fmt["frames"][2]:
                raise RuntimeError(err_msg)
            div, mod = fmt["frames"][:2]
            frames = (len(images) - mod) // div * div + mod
            images = images[:frames]
        start_time = skip * target_frame_time
        audio = vhs.lazy_get_audio(video, start_time, cap_frames * target_frame_time)
        video_info = {
            "source_fps": fps,
            "source_frame_count": total_frames,
            "source_duration": duration,
            "source_width": width,
            "source_height": height,
            "loaded_fps": 1 / target_frame_time,
            "loaded_frame_count": len(images),
            "loaded_duration": len(images) * target_frame_time,
            "loaded_width": new_width,
            "loaded_height": new_height,
        }
        log.info(
            "xicon_video_frames: %d frames of %dx%d loaded as one float32 tensor (%.1f MiB)",
            len(images),
            width,
            height,
            images.numel() * 4 / 2**20,
        )
        return (images, len(images), audio, video_info)

    setattr(load_video, WRAPPED, True)
    return load_video


# --- installation ----------------------------------------------------------------------------


def _module_of(registry: Mapping[str, Any], node: str) -> Any:
    node_class = registry.get(node)
    return None if node_class is None else sys.modules.get(node_class.__module__)


def patch_load(registry: Mapping[str, Any]) -> str:
    """Wrap the module function ``load_video`` behind ``registry[LOAD_NODE]``; the line to log."""
    vhs = _module_of(registry, LOAD_NODE)
    current = getattr(vhs, "load_video", None)
    if vhs is None or current is None:
        return f"{LOAD_NODE} not loaded; loading left as it is"
    if getattr(current, WRAPPED, False):
        return f"{LOAD_NODE}'s load already wrapped"
    try:
        digest = load_digest(vhs)
    except (AttributeError, OSError, TypeError):
        return f"{LOAD_NODE}'s source cannot be read; loading left as it is"
    if digest != LOAD_SHA256:
        return (
            f"{LOAD_NODE}'s load changed upstream (sha256 {digest[:12]}, expected "
            f"{LOAD_SHA256[:12]}); loading left as it is"
        )
    vhs.load_video = fast_load_video(current, vhs)
    return f"{LOAD_NODE} loads a plain clip on every core"


def install(executor_class: type, registry: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Wrap VHS's ``load_video`` when ``executor_class`` (ComfyUI's
    ``PromptExecutor``) runs its first prompt; the line to log now."""
    if not enabled(env):
        return f"off ({ENV})"
    original = executor_class.execute_async
    if getattr(original, WRAPPED, False):
        return "already installed"
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_video_frames: %s", patch_load(registry))
            except Exception:  # never break a prompt: the node then runs as upstream ships it
                log.exception("xicon_video_frames: loading left as it is")
        return await original(self, *args, **kwargs)

    setattr(execute_async, WRAPPED, True)
    executor_class.execute_async = execute_async
    return f"{LOAD_NODE} will be wrapped before the first prompt"
