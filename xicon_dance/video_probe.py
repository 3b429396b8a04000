"""Video probing with PyAV: what a video file holds, checked before anything uses it.

Contract:
- ``VideoInfo(path, width, height, fps, frames, duration_s, has_audio, bytes)`` (frozen).
- ``probe_video(path, field=..., stop=...) -> VideoInfo``: a video stream must exist and decode
  (its first frame); sides 16..8192, frame rate in (0, 240]; frames from the stream header or by
  counting packets. Raises ``InputError(code="invalid_video"|"too_many_pixels", field=field)``; a
  caller probing a result video converts that into its own error. Its long loops (decoding up
  to the first frame, counting packets) end early with ``ProbeStopped`` once ``stop`` is set
  (the job was cancelled or timed out).
- ``video_extension(path) -> str``: the extension for the container found in ``path``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av

from .errors import InputError

log = logging.getLogger(__name__)

MIN_VIDEO_SIDE = 16
MAX_VIDEO_SIDE = 8192
MAX_VIDEO_FPS = 240.0
VIDEO_EXTENSIONS = {
    "mov": "mp4",
    "mp4": "mp4",
    "matroska": "mkv",
    "webm": "webm",
    "avi": "avi",
    "gif": "gif",
}


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float
    frames: int
    duration_s: float
    has_audio: bool
    bytes: int


def probe_video(
    path: Path, *, field: str = "video_url", stop: threading.Event | None = None
) -> VideoInfo:
    """Open with PyAV: a video stream must exist and decode; fps, frames, duration, size, audio.
    The loops over the file end early (``ProbeStopped``) once ``stop`` is set."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        raise _bad_video(field, "the file is empty")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise _bad_video(field, "it has no video stream")
            if _is_still_image(container):
                raise _bad_video(field, "it is a still image, not a video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            _check_video_size(width, height, field)
            fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
            has_audio = bool(container.streams.audio)
            duration = _duration(container, stream)
            frames = stream.frames or 0
            _decode_first_frame(container, stream, field, stop)
            if frames <= 0:
                frames = _count_packets(path, stream.index, stop)
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        log.info("video probe failed: %s", type(exc).__name__)
        raise _bad_video(field, "it is not a readable video") from None
    if frames <= 0:
        raise _bad_video(field, "it has no frames")
    if not 0 < fps <= MAX_VIDEO_FPS:
        raise _bad_video(field, f"its frame rate ({fps:g}) is outside 0..{MAX_VIDEO_FPS:g}")
    if duration <= 0:
        duration = frames / fps
    return VideoInfo(
        path, width, height, round(fps, 3), frames, round(duration, 3), has_audio, size
    )


def _is_still_image(container: Any) -> bool:
    names = container.format.name.split(",")
    return any(n == "image2" or n.endswith("_pipe") for n in names)


def _duration(container: Any, stream: Any) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return 0.0


class ProbeStopped(Exception):
    """The probe gave up because its job ended (``stop`` was set); nobody reads its result."""


def _decode_first_frame(
    container: Any, stream: Any, field: str, stop: threading.Event | None
) -> None:
    """Packet by packet (not ``container.decode``, whose loop over packets that give no frame,
    e.g. a long run without a keyframe, never comes back to check ``stop``)."""
    for packet in container.demux(stream):  # ends with the empty packet that flushes
        _check_stop(stop)
        for frame in packet.decode():
            if frame.width and frame.height:
                return
    raise _bad_video(field, "no frame could be decoded")


def _count_packets(path: Path, index: int, stop: threading.Event | None) -> int:
    """Packets of stream ``index``, read from a fresh opening (not ``seek(0)``: in a Matroska file
    without cues that scans the whole file in one call that ``stop`` cannot interrupt)."""
    frames = 0
    with av.open(str(path), mode="r") as container:
        for packet in container.demux(container.streams[index]):
            _check_stop(stop)
            if packet.size:
                frames += 1
    return frames


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise ProbeStopped("the job ended; probe abandoned")


def _check_video_size(width: int, height: int, field: str) -> None:
    if not width or not height:
        raise _bad_video(field, "its frame size is unknown")
    if max(width, height) > MAX_VIDEO_SIDE:
        raise InputError(
            f"{field}: the video is {width}x{height}; at most {MAX_VIDEO_SIDE} pixels a side.",
            field=field,
            code="too_many_pixels",
        )
    if min(width, height) < MIN_VIDEO_SIDE:
        raise _bad_video(field, f"its frames are only {width}x{height} pixels")


def _bad_video(field: str, why: str) -> InputError:
    return InputError(f"{field}: unusable video ({why}).", field=field, code="invalid_video")


def video_extension(path: Path) -> str:
    """The file extension of the container PyAV finds in ``path`` (``mp4`` when unknown)."""
    try:
        with av.open(str(path)) as container:
            names = container.format.name.split(",")
    except (av.FFmpegError, OSError):
        return "mp4"
    for name in names:
        if name in VIDEO_EXTENSIONS:
            return VIDEO_EXTENSIONS[name]
    return "mp4"
