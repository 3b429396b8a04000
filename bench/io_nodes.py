"""The graph's video nodes on a long clip, on the real ComfyUI stack: load and encode times.

The load (node 130) and the encode (node 139) run on the CPU wherever ComfyUI runs, so their
time on this machine says what they cost on a GPU worker with the same cores. This runs them as
the worker's graph does, on the real ComfyUI v0.33.0 with VideoHelperSuite at its pin (CPU, no
models): a clip as the worker hands it over (the generation size, the job's fps, H.264 at the
transcode's own settings) goes through

- ``VHS_LoadVideo`` (OpenCV, node 130 of the shipped graph), or ``VHS_LoadVideoFFmpeg`` (ffmpeg
  through a pipe, the same IMAGE output but no frame count at output 1), or ComfyUI's own
  ``LoadVideo`` + ``GetVideoComponents`` (PyAV, frames converted to float32 by swscale; no frame
  count either: the load time is both nodes'),
- then ``VHS_VideoCombine`` exactly as node 139 (``video/h264-mp4``, yuv420p, crf 19, no audio),

``--video-frames off`` runs them without the project's extension ``xicon_video_frames`` (VHS's
load and frame conversion as upstream ships them; ``on``, the default, is the image's way).
``--x264 KEY=VALUE,...`` writes the clip with those x264 options over the transcode's own
(another preset of the worker's transcode: how fast node 130 decodes it). ``--with-resize``
adds the template's node 131 (``ImageResizeKJv2``, bilinear, crop, on the CPU) between the
two: what the worker's graph no longer runs, in time and in memory.

ComfyUI's per-node times are read from its websocket (``xicon_dance.comfy.ComfyClient``).
Each run loads a fresh copy of the clip (ComfyUI would reuse a cached load otherwise). Two kinds
of picture: ``dance`` (the bundled dance, moving people) and ``noise`` (random pixels, what
synthetic weights decode to, the worst case for the encoder).

Usage (needs the stack: ``XICON_STACK_HOME``, as for the real-stack tests)::

    python bench/io_nodes.py [--frames 1441] [--size 416x672] [--fps 24] [--repeat 2]
        [--content dance,noise] [--loaders VHS_LoadVideo,VHS_LoadVideoFFmpeg] [--with-resize]
        [--video-frames on|off] [--x264 preset=ultrafast]

Prints one line per (content, graph) with the median load, resize and encode seconds and
ComfyUI's peak RSS over its size before the run (the previous run's outputs dropped first, the
peak counter reset through ``/proc/PID/clear_refs``); say on what machine it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from encode_bench import dance_frames, noise_frames  # noqa: E402

from tests.plugins.comfy import free_port  # noqa: E402
from tests.plugins.realstack import (  # noqa: E402
    Stack,
    forget_cached_outputs,
    h264_combine,
    make_base,
)
from xicon_dance.comfy import ComfyClient  # noqa: E402
from xicon_dance.transcode import VIDEO_OPTIONS  # noqa: E402


def write_clip(
    path: Path, frames: np.ndarray, fps: int, options: dict[str, str] | None = None
) -> None:
    """H.264 at the worker's transcode settings (``transcode.VIDEO_OPTIONS``, ``options`` over
    them)."""
    _, height, width, _ = frames.shape
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        stream.options = {**VIDEO_OPTIONS, **(options or {})}
        for k, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def graph(
    loader: str, video: str, frames: int, fps: int, resize: tuple[int, int] | None = None
) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "video": video,
        "force_rate": 0,
        "custom_width": 0,
        "custom_height": 0,
        "frame_load_cap": frames,
        "format": "Wan",
    }
    if loader == "VHS_LoadVideo":
        inputs |= {"skip_first_frames": 0, "select_every_nth": 1}
    else:
        inputs |= {"start_time": 0}
    nodes: dict[str, Any] = {"1": {"class_type": loader, "inputs": inputs}}
    if loader == "LoadVideo":  # ComfyUI's own: a VIDEO, then its frames (swscale to float32)
        nodes = {
            "0": {"class_type": "LoadVideo", "inputs": {"file": video}},
            "1": {"class_type": "GetVideoComponents", "inputs": {"video": ["0", 0]}},
        }
    if resize is not None:  # the template's node 131, on the CPU
        nodes["3"] = {
            "class_type": "ImageResizeKJv2",
            "inputs": {
                "image": ["1", 0],
                "width": resize[0],
                "height": resize[1],
                "upscale_method": "bilinear",
                "keep_proportion": "crop",
                "pad_color": "0, 0, 0",
                "crop_position": "center",
                "divisible_by": 32,
                "device": "cpu",
            },
        }
    images = ["3" if resize is not None else "1", 0]
    return nodes | {"2": h264_combine(images, f"io_{uuid.uuid4().hex[:8]}", frame_rate=fps)}


def x264_options(args: argparse.Namespace) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in args.x264.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--x264: KEY=VALUE,... expected, got {args.x264!r}")
    return dict(pairs)


def rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


async def run_all(args: argparse.Namespace, base: Path, url: str, pid: int) -> None:
    width, height = (int(v) for v in args.size.split("x"))
    async with ComfyClient(url, poll_interval_s=0.5) as client:
        await client.wait_ready(300)
        for content in args.content.split(","):
            maker = dance_frames if content == "dance" else noise_frames
            source = base / "input" / f"{content}.mp4"
            write_clip(source, maker(args.frames, width, height), args.fps, x264_options(args))
            print(f"{content}: {source.stat().st_size / 1e6:.1f} MB", flush=True)
            for loader, resize in runs(args, width, height):
                loads, encodes, resizes, growth = [], [], [], []
                for k in range(args.repeat):
                    name = f"{content}_{loader}_{k}{'_resize' if resize else ''}.mp4"
                    shutil.copyfile(source, base / "input" / name)
                    # the last run's outputs dropped, then the peak counter reset: each run's
                    # peak is its own
                    await asyncio.to_thread(forget_cached_outputs, url)
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                    before = rss_kib(pid, "VmRSS")
                    run = await client.run(
                        graph(loader, name, args.frames, args.fps, resize),
                        prompt_id=str(uuid.uuid4()),
                        client_id=uuid.uuid4().hex,
                        timeout_s=1800,
                    )
                    loads.append(run.node_times.get("1", float("nan")) + run.node_times.get("0", 0))
                    encodes.append(run.node_times.get("2", float("nan")))
                    resizes.append(run.node_times.get("3", 0.0))
                    growth.append((rss_kib(pid, "VmHWM") - before) / 2**20)
                label = loader + (" + node 131" if resize else "")
                print(
                    f"{content:6s} {label:31s} load {statistics.median(loads):6.2f} s  "
                    f"resize {statistics.median(resizes):6.2f} s  "
                    f"encode {statistics.median(encodes):6.2f} s  "
                    f"(runs: load {', '.join(f'{v:.2f}' for v in loads)}; "
                    f"encode {', '.join(f'{v:.2f}' for v in encodes)}); "
                    f"ComfyUI peak RSS over its size before the run +{max(growth):.2f} GiB",
                    flush=True,
                )


def runs(
    args: argparse.Namespace, width: int, height: int
) -> list[tuple[str, tuple[int, int] | None]]:
    """(loader, resize) per measured graph: every loader, then node 130 + the template's 131."""
    plain: list[tuple[str, tuple[int, int] | None]] = [(x, None) for x in args.loaders.split(",")]
    return plain + ([("VHS_LoadVideo", (width, height))] if args.with_resize else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1441)
    p.add_argument("--size", default="416x672")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--content", default="dance,noise")
    p.add_argument("--loaders", default="VHS_LoadVideo,VHS_LoadVideoFFmpeg")
    p.add_argument(
        "--with-resize",
        action="store_true",
        help="also run node 130 -> the template's node 131 (ImageResizeKJv2, CPU) -> node 139",
    )
    p.add_argument(
        "--video-frames",
        choices=("on", "off"),
        default="on",
        help="with the project's extension xicon_video_frames (the image's way) or without it",
    )
    p.add_argument("--comfy-args", default="", help="more arguments for ComfyUI's main.py")
    p.add_argument("--x264", default="", help="KEY=VALUE,... over the transcode's x264 options")
    args = p.parse_args(argv)
    home = os.environ.get("XICON_STACK_HOME")
    if not home:
        print("XICON_STACK_HOME is not set: install the stack (stack/install.py) first")
        return 2
    stack = Stack(Path(home))
    print(
        f"{args.frames} frames at {args.size}, {args.fps} fps; {os.cpu_count()} cores; "
        f"xicon_video_frames {args.video_frames}; x264 {VIDEO_OPTIONS} + {args.x264 or 'nothing'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        packs = {"ComfyUI-VideoHelperSuite"} | ({"ComfyUI-KJNodes"} if args.with_resize else set())
        packs |= {"xicon_video_frames"} if args.video_frames == "on" else set()
        base = make_base(stack, Path(tmp) / "comfy", packs=packs)
        port = free_port()
        log = open(Path(tmp) / "comfy.log", "wb")  # noqa: SIM115 - closed below
        cmd = [str(stack.python), "-u", str(stack.comfy_dir / "main.py"), "--cpu"]
        cmd += ["--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
        cmd += ["--database-url", f"sqlite:///{Path(tmp) / 'comfy.db'}", *args.comfy_args.split()]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=stack.comfy_dir)
        started = time.monotonic()
        try:
            asyncio.run(run_all(args, base, f"http://127.0.0.1:{port}", proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
