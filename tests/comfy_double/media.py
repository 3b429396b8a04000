"""Media helpers of the ComfyUI double: probe the driving video, render and write real MP4s.

The double's VHS_VideoCombine writes a REAL h264/yuv420p MP4 with PyAV, frames derived from the
reference image (resized to the generation size, with a moving inverted bar so frames differ).
With an ``audio`` link it also writes ``<name>-audio.mp4`` (video copied, the driving video's audio
re-encoded to AAC), as VHS does (../shared/reference/scail-workflow.md §10 pitfall 19).
Test inputs (an image, a driving video with or without audio) are made here too.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps


def make_image(path: Path, width: int = 96, height: int = 128) -> Path:
    """A small gradient RGB image (PNG or JPEG by suffix)."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    Image.fromarray(arr.astype(np.uint8), "RGB").save(path)
    return path


def make_video(
    path: Path,
    *,
    width: int = 64,
    height: int = 64,
    frames: int = 24,
    fps: int = 24,
    audio: bool = True,
) -> Path:
    """A small h264 MP4 (moving gradient), with a 440 Hz AAC tone when ``audio``."""
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.options = {"preset": "ultrafast"}
        ast = out.add_stream("aac", rate=44100) if audio else None
        for i in range(frames):
            arr = np.full((height, width, 3), (i * 10) % 256, np.uint8)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(vs.encode())
        if ast is not None:
            total = int(44100 * frames / fps)
            t = np.arange(total) / 44100
            tone = (0.2 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
            for start in range(0, total, 1024):
                chunk = tone[start : start + 1024].reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate = 44100
                frame.pts = start
                out.mux(ast.encode(frame))
            out.mux(ast.encode())
    return path


def loaded_frame_count(
    video: Path, force_rate: float, frame_load_cap: int, rule: tuple[int, int] | None = (4, 1)
) -> int:
    """Frames VHS_LoadVideo yields: source frames resampled to ``force_rate`` (0 = source rate),
    capped by ``frame_load_cap`` (0 = all), truncated to ``step*n + offset`` when the load
    ``format`` has a frame ``rule`` (Wan: 4n+1; AnimateDiff: none; scail-workflow.md §10
    pitfall 10)."""
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or 24)
        src_frames = stream.frames or sum(1 for _ in container.decode(stream))
    count = src_frames if not force_rate else int(src_frames / src_fps * force_rate)
    if frame_load_cap:
        count = min(count, frame_load_cap)
    if rule is None:
        return count
    step, offset = rule
    return (count - offset) // step * step + offset if count >= offset else 0


def has_audio(video: Path) -> bool:
    with av.open(str(video)) as container:
        return bool(container.streams.audio)


def render_frames(image: Path, width: int, height: int, count: int) -> list[np.ndarray]:
    """The reference resized (cover-crop) to width x height, with a moving inverted bar."""
    base = np.asarray(ImageOps.fit(Image.open(image).convert("RGB"), (width, height)))
    bar = max(2, width // 8)
    frames = []
    for i in range(count):
        arr = base.copy()
        x0 = int(i * (width - bar) / max(1, count - 1))
        arr[:, x0 : x0 + bar] = 255 - arr[:, x0 : x0 + bar]
        frames.append(arr)
    return frames


def write_png(path: Path, frame: np.ndarray) -> None:
    """The first-frame PNG VHS_VideoCombine writes next to its video."""
    Image.fromarray(frame).save(path)


def write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """Encode RGB frames as h264 yuv420p at ``fps``."""
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        vs.height, vs.width = frames[0].shape[:2]
        vs.pix_fmt = "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "23"}
        for arr in frames:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(vs.encode())


def mux_audio(video_only: Path, driving: Path, dest: Path) -> None:
    """Copy the video of ``video_only`` and the driving video's audio (AAC, cut to the video's
    duration) into ``dest``."""
    with av.open(str(video_only)) as vin, av.open(str(driving)) as ain:
        vsrc = vin.streams.video[0]
        duration = float(vsrc.duration * vsrc.time_base) if vsrc.duration else math.inf
        with av.open(str(dest), "w", format="mp4") as out:
            vs = out.add_stream_from_template(vsrc)
            asrc = ain.streams.audio[0]
            ast = out.add_stream("aac", rate=asrc.rate or 44100)
            resampler = av.AudioResampler(format="fltp", layout="stereo", rate=ast.rate)
            for packet in vin.demux(vsrc):
                if packet.dts is None:
                    continue
                packet.stream = vs
                out.mux(packet)
            for frame in ain.decode(asrc):
                if frame.time is not None and frame.time >= duration:
                    break
                for rf in resampler.resample(frame):
                    rf.pts = None
                    out.mux(ast.encode(rf))
            out.mux(ast.encode())
