"""How long the worker's transcode of the driving clip takes (``xicon_dance.transcode``).

Transcodes a clip to the job's size, fps and length as a job does (H.264 crf 12 ultrafast, AAC),
``--repeat`` times, and prints the median seconds and frames per second; ``--profile`` adds a
cProfile top 12 of one more run (own time, summed over its threads). The default clip is the
bundled dance made ``--seconds`` long by ``scripts/make_default_video.py`` (written to a
temporary folder); ``--video`` takes any clip instead. ``--clip-module`` times the ``transcode``
of another module file instead, e.g. the one-thread version that ``clip.py`` held before
2026-12-05 (``git show REV:xicon_dance/clip.py > /tmp/old_clip.py``), for before/after figures
on one machine. ``--x264`` sets options of the video encoder over the transcode's own
(``transcode.VIDEO_OPTIONS``), to time another preset. ``--source-size`` re-encodes the clip at
another size first (a phone's 1080x1920, say), then times the transcode of that.

Usage::

    python bench/transcode_bench.py [--video CLIP] [--seconds 61] [--frames 1441]
        [--size 416x672] [--fps 24] [--repeat 3] [--no-audio] [--profile]
        [--clip-module OLD_CLIP_PY] [--x264 preset=ultrafast,tune=fastdecode]
        [--source-size 1080x1920]

Figures depend on the machine's cores (the transcode runs decode, video encode and audio encode
side by side): say where they ran.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import av  # noqa: E402

from xicon_dance import clip, transcode  # noqa: E402


def load_clip_module(path: Path | None) -> ModuleType:
    """``xicon_dance.transcode``, or the given file loaded as a module of the package (its
    relative imports resolve against ``xicon_dance``); the bench calls its ``transcode``."""
    if path is None:
        return transcode
    spec = importlib.util.spec_from_file_location("xicon_dance._bench_clip", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_clip(folder: Path, seconds: int) -> Path:
    """The bundled dance, ``seconds`` long (scripts/make_default_video.py's writer)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_default_video
    except ImportError as exc:
        raise SystemExit(
            f"cannot import scripts/make_default_video.py ({exc}): give --video"
        ) from exc
    path = folder / f"dance_{seconds}s.mp4"
    print(f"writing a {seconds}-s clip to {path} ...", flush=True)
    make_default_video.write(path, seconds)
    return path


def enlarge(src: Path, dest: Path, size: str) -> Path:
    """``src`` re-encoded at ``size`` (WIDTHxHEIGHT; bicubic, x264 ultrafast crf 20, its audio
    re-encoded), as a phone's larger clip would come."""
    width, height = (int(v) for v in size.lower().split("x"))
    with av.open(str(src)) as inp, av.open(str(dest), "w", format="mp4") as out:
        rate = inp.streams.video[0].average_rate
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = 1 / rate
        video.options = {"crf": "20", "preset": "ultrafast"}
        hz = inp.streams.audio[0].rate if inp.streams.audio else 0
        audio = out.add_stream("aac", rate=hz, layout="stereo") if hz else None
        for i, frame in enumerate(inp.decode(video=0)):
            big = frame.reformat(width, height, "yuv420p", interpolation="BICUBIC")
            big.pts, big.time_base = i, 1 / rate
            out.mux(video.encode(big))
        out.mux(video.encode(None))
        if audio is not None:
            resampler, samples = av.AudioResampler(format="fltp", layout="stereo", rate=hz), 0
            inp.seek(0)
            for frame in inp.decode(audio=0):
                for part in resampler.resample(frame):
                    part.pts, part.time_base = samples, Fraction(1, hz)
                    samples += part.samples
                    out.mux(audio.encode(part))
            out.mux(audio.encode(None))
    return dest


def shown(path: str | None) -> str:
    """``path`` relative to the repository when it lies inside it (no machine paths in output)."""
    if path is None:
        return "?"
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def x264_options(text: str) -> dict[str, str]:
    """``KEY=VALUE,...`` as a dict of x264 options."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--x264: KEY=VALUE,... expected, got {text!r}")
    return dict(pairs)


def profile_run(run: Callable[[], float]) -> None:
    """One more run under cProfile, in the calling thread and in every thread the run starts
    (``threading.setprofile``); prints the merged top 12 by own time (tottime)."""
    profilers: list[cProfile.Profile] = []

    def start_in_thread(*_: object) -> None:
        sys.setprofile(None)
        profiler = cProfile.Profile()
        profilers.append(profiler)
        profiler.enable()

    main_profiler = cProfile.Profile()
    threading.setprofile(start_in_thread)
    main_profiler.enable()
    try:
        run()
    finally:
        main_profiler.disable()
        threading.setprofile(None)
    text = io.StringIO()
    stats = pstats.Stats(main_profiler, stream=text)
    for profiler in profilers:
        profiler.create_stats()
        stats.add(profiler)
    stats.sort_stats("tottime").print_stats(12)
    print(f"profiled {1 + len(profilers)} threads (times summed over threads)")
    print(text.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--video", type=Path, default=None, help="clip to transcode")
    parser.add_argument("--seconds", type=int, default=61, help="length of the generated clip")
    parser.add_argument("--frames", type=int, default=1441, help="frames to render (4n+1)")
    parser.add_argument("--size", default="416x672", help="WIDTHxHEIGHT of the output")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-audio", action="store_true", help="leave the audio out")
    parser.add_argument("--profile", action="store_true", help="cProfile top 12 of one more run")
    parser.add_argument(
        "--clip-module", type=Path, default=None, help="another module file whose transcode to time"
    )
    parser.add_argument(
        "--x264", default="", help="KEY=VALUE,... over the transcode's x264 options"
    )
    parser.add_argument(
        "--source-size", default="", help="WIDTHxHEIGHT: the clip re-encoded at it first"
    )
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    module = load_clip_module(args.clip_module)
    if args.x264:
        module.VIDEO_OPTIONS = {**module.VIDEO_OPTIONS, **x264_options(args.x264)}

    with tempfile.TemporaryDirectory(prefix="transcode_bench_") as tmp:
        folder = Path(tmp)
        src = args.video if args.video is not None else make_clip(folder, args.seconds)
        if args.source_size:
            src = enlarge(src, folder / f"source_{args.source_size}.mp4", args.source_size)
        plan = clip.ClipPlan(
            args.fps, args.frames / args.fps, args.frames, args.frames, False, None
        )
        dest = folder / "out.mp4"
        print(
            f"{src.name}: {args.frames} frames at {width}x{height}, {args.fps} fps, audio "
            f"{'off' if args.no_audio else 'on'}; {shown(module.__file__)}; {os.cpu_count()} CPUs; "
            f"x264 {module.VIDEO_OPTIONS}",
            flush=True,
        )

        def once() -> float:
            start = time.perf_counter()
            done = module.transcode(src, dest, plan, width, height, audio=not args.no_audio)
            took = time.perf_counter() - start
            print(
                f"  {took:6.2f} s  {done.frames / took:6.1f} frames/s  "
                f"({done.frames} frames, audio {done.has_audio}, "
                f"{dest.stat().st_size / 1e6:.1f} MB)",
                flush=True,
            )
            return took

        times = [once() for _ in range(args.repeat)]
        median = statistics.median(times)
        print(
            f"median of {len(times)}: {median:.2f} s, {args.frames / median:.1f} frames/s "
            f"(min {min(times):.2f} s, max {max(times):.2f} s)"
        )
        if args.profile:
            profile_run(once)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
