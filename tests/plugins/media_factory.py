"""pytest plugin: media_factory fixtures (see tests/conftest.py).

Generates REAL media with Pillow and PyAV, for any test that needs input files:
- ``make_image(path, w, h, fmt="PNG") -> Path``: a gradient image (PNG, JPEG, WEBP, GIF, BMP).
- ``make_video(path, w, h, fps, frames, audio=False, container="mp4") -> Path``: H.264 MP4
  (yuv420p), optionally with an AAC audio track of the same duration.
- ``make_audio_only(path, seconds=1.0) -> Path``: an MP4 with an AAC track and no video stream.
- ``make_png_bomb(path, w, h) -> Path``: a valid, tiny 1-bit PNG whose pixel count is huge.
- ``make_truncated(src, dest, keep=0.5) -> Path``: the first part of a file (a damaged image).
- ``make_text(path, text) -> Path``: a plain text file (not media at all).
- ``job_input(image, video, **fields) -> dict``: a small job (``SMALL_JOB``: 256x256, 9 frames,
  2 steps) with both files as base64; ``fields`` override or add any key.
Fixtures: ``media_dir`` (a fresh folder), ``image_png``, ``image_jpeg``, ``video_mp4`` and
``video_mp4_audio`` (small defaults; 64x64 video, 9 frames at 8 fps).
"""

from __future__ import annotations

import base64
import struct
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image


def _pattern(w: int, h: int, phase: int = 0) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    r = (xs * 255 // max(1, w - 1) + phase * 7) % 256
    g = (ys * 255 // max(1, h - 1) + phase * 3) % 256
    b = ((xs + ys + phase * 11) * 3) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def make_image(path: Path | str, w: int, h: int, fmt: str = "PNG") -> Path:
    """Write a ``w``x``h`` gradient image in format ``fmt``; returns the path."""
    path = Path(path)
    img = Image.fromarray(_pattern(w, h), "RGB")
    kwargs = {"quality": 90} if fmt.upper() in ("JPEG", "WEBP") else {}
    img.save(path, format=fmt.upper(), **kwargs)
    return path


def make_video(
    path: Path | str,
    w: int,
    h: int,
    fps: int,
    frames: int,
    audio: bool = False,
    container: str = "mp4",
) -> Path:
    """Write an H.264 video of ``frames`` frames at ``fps``; ``audio`` adds an AAC sine track.

    ``container`` is an FFmpeg muxer name ("mp4", "matroska", "mov")."""
    path = Path(path)
    with av.open(str(path), mode="w", format=container) as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "tune": "zerolatency"}
        aus = out.add_stream("aac", rate=44100) if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_pattern(w, h, i), format="rgb24")
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if aus is not None:
            _write_audio(out, aus, frames / fps)
    return path


def _write_audio(out: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    rate, chunk = 44100, 1024
    total = int(rate * seconds)
    t = np.arange(total, dtype=np.float32) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, total, chunk):
        part = samples[start : start + chunk].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(part, format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def make_audio_only(path: Path | str, seconds: float = 1.0) -> Path:
    """An MP4 container holding only an AAC track (no video stream)."""
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=44100)
        _write_audio(out, stream, seconds)
    return path


def make_png_bomb(path: Path | str, w: int = 12000, h: int = 12000) -> Path:
    """A valid 1-bit grayscale PNG of ``w``x``h`` pixels that is only kilobytes on disk."""
    path = Path(path)
    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def make_truncated(src: Path | str, dest: Path | str, keep: float = 0.5) -> Path:
    """Copy the first ``keep`` fraction of ``src`` to ``dest``."""
    data = Path(src).read_bytes()
    dest = Path(dest)
    dest.write_bytes(data[: max(1, int(len(data) * keep))])
    return dest


def make_text(path: Path | str, text: str = "this is not media\n") -> Path:
    path = Path(path)
    path.write_text(text)
    return path


SMALL_JOB: dict[str, Any] = {"width": 256, "height": 256, "max_frames": 9, "steps": 2}


def job_input(image: Path, video: Path, **fields: Any) -> dict[str, Any]:
    """A small job with both files as base64; ``fields`` override or add any key."""
    return {
        "image_base64": base64.b64encode(Path(image).read_bytes()).decode(),
        "video_base64": base64.b64encode(Path(video).read_bytes()).decode(),
        **SMALL_JOB,
        **fields,
    }


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    return folder


@pytest.fixture
def image_png(media_dir: Path) -> Path:
    return make_image(media_dir / "ref.png", 96, 160, "PNG")


@pytest.fixture
def image_jpeg(media_dir: Path) -> Path:
    return make_image(media_dir / "ref.jpg", 96, 160, "JPEG")


@pytest.fixture
def video_mp4(media_dir: Path) -> Path:
    return make_video(media_dir / "drive.mp4", 64, 64, 8, 9, audio=False)


@pytest.fixture
def video_mp4_audio(media_dir: Path) -> Path:
    return make_video(media_dir / "drive_audio.mp4", 64, 64, 8, 9, audio=True)
