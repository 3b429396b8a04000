"""What node 139 (VHS_VideoCombine) spends on a long clip, and what an x264 preset would change.

Runs VHS_VideoCombine's own ffmpeg command for ``video/h264-mp4`` (ComfyUI-VideoHelperSuite
``videohelpersuite/nodes.py``: the rawvideo input arguments ~L489-500, the format's ``main_pass``
from ``video_formats/h264-mp4.json``: libx264, yuv420p, crf 19, bt709) on frames fed through a
pipe as the node feeds them, once per x264 preset (the format sets none: libx264's default is
``medium``), and times VHS's float32 -> uint8 conversion (``tensor_to_bytes``, ~L124-130) on its
own. Two kinds of picture:

- ``dance``: the bundled driving dance, scaled and centre-cropped to the size (moving people,
  the kind of picture the model makes);
- ``noise``: independent random pixels every frame, the worst case for an encoder and close to
  what true-shape synthetic weights decode to (so GPU runs with synthetic weights overstate the
  encode time of a real job).

Usage (any machine; ffmpeg from ``--ffmpeg``, PATH or imageio-ffmpeg)::

    python bench/encode_bench.py [--frames 1441] [--size 416x672] [--fps 24] [--crf 19]
        [--presets medium,faster,veryfast] [--content dance,noise] [--repeat 3] [--threads 0]

Prints one line per (content, preset): median seconds, frames per second, MB and Mbit/s of the
MP4; then the conversion's median seconds, for contiguous frames and for the channel-first view
that WanVideoDecode hands over upstream (``--presets ''`` skips the encodes). Figures depend on
the machine's cores: compare rows of one run, and say where it ran.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xicon_dance.transcode import cover_crop  # noqa: E402

# video/h264-mp4's main_pass with its defaults (pix_fmt yuv420p, crf 19).
MAIN_PASS = [
    "-n",
    "-c:v",
    "libx264",
    "-pix_fmt",
    "yuv420p",
    "-vf",
    "scale=out_color_matrix=bt709",
    "-color_range",
    "tv",
    "-colorspace",
    "bt709",
    "-color_primaries",
    "bt709",
    "-color_trc",
    "bt709",
]


def ffmpeg_exe() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def dance_frames(count: int, width: int, height: int) -> np.ndarray:
    """The bundled dance at ``width`` x ``height``, looped to ``count`` frames (uint8 RGB)."""
    frames = []
    with av.open(str(ROOT / "assets" / "default_video.mp4")) as src:
        for frame in src.decode(video=0):
            frames.append(cover_crop(frame, width, height))
    return np.stack([frames[k % len(frames)] for k in range(count)])


def noise_frames(count: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def encode(
    exe: str, frames: np.ndarray, fps: int, crf: int, preset: str | None, threads: int, out: Path
) -> float:
    """Seconds from the first frame written to ffmpeg's exit (VHS's node writes frame by frame)."""
    count, height, width, _ = frames.shape
    args = [exe, "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    args += ["-color_range", "pc", "-colorspace", "rgb", "-color_primaries", "bt709"]
    args += ["-color_trc", "bt709", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
    args += [*MAIN_PASS, "-crf", str(crf)]
    if preset:
        args += ["-preset", preset]
    if threads:
        args += ["-threads", str(threads)]
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with subprocess.Popen([*args, str(out)], stdin=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        for k in range(count):
            proc.stdin.write(frames[k].tobytes())
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed: {' '.join(args)}")
    return time.perf_counter() - t0


def conversion_seconds(frames: np.ndarray, channel_first: bool = False) -> float:
    """VHS's per-frame float32 [0, 1] -> uint8 conversion over the clip. ``channel_first``: the
    frames as WanVideoDecode hands them over upstream, a (T, H, W, C) view of a (C, T, H, W)
    tensor (its ``permute(1, 2, 3, 0)``), so each frame's channels lie a plane apart; otherwise
    one contiguous (T, H, W, C) array (what ``xicon_decode_frames`` hands over)."""
    floats = frames[: min(len(frames), 241)].astype(np.float32) / 255
    if channel_first:
        floats = np.ascontiguousarray(floats.transpose(3, 0, 1, 2)).transpose(1, 2, 3, 0)
    t0 = time.perf_counter()
    for frame in floats:
        np.clip(frame * 255 + 0.5, 0, 255).astype(np.uint8).tobytes()
    return (time.perf_counter() - t0) * len(frames) / len(floats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1441)
    p.add_argument("--size", default="416x672")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--crf", type=int, default=19)
    p.add_argument("--presets", default="medium,faster,veryfast")
    p.add_argument("--content", default="dance,noise")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="x264 threads (0: its default)")
    p.add_argument("--ffmpeg", help="the ffmpeg binary (default: PATH, then imageio-ffmpeg)")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    exe = args.ffmpeg or ffmpeg_exe()
    makers = {"dance": dance_frames, "noise": noise_frames}
    print(
        f"ffmpeg: {exe}; {args.frames} frames at {width}x{height}, {args.fps} fps, crf {args.crf}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.mp4"
        for content in args.content.split(","):
            frames = makers[content](args.frames, width, height)
            for preset in [p for p in args.presets.split(",") if p]:
                times = [
                    encode(exe, frames, args.fps, args.crf, preset, args.threads, out)
                    for _ in range(args.repeat)
                ]
                size = out.stat().st_size
                median = statistics.median(times)
                mbps = size * 8 / (args.frames / args.fps) / 1e6
                print(
                    f"{content:6s} {preset:10s} {median:7.2f} s  {args.frames / median:7.1f} fps  "
                    f"{size / 1e6:7.1f} MB  {mbps:6.2f} Mbit/s"
                )
            for channel_first, layout in ((False, "contiguous"), (True, "channel-first view")):
                conv = statistics.median(
                    conversion_seconds(frames, channel_first) for _ in range(args.repeat)
                )
                print(
                    f"{content:6s} float32->uint8 conversion (VHS tensor_to_bytes), frames "
                    f"{layout}: {conv:.2f} s"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
