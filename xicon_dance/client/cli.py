"""Command line: ``xicon-dance run …`` (also ``python -m xicon_dance run …``).

Contract:
- ``main(argv=None) -> int`` parses the arguments, runs one job with ``run_job`` and returns the
  exit code: 0 the video was saved, 1 the job ended without a video (FAILED, CANCELLED,
  TIMED_OUT, ``--timeout``), 2 a usage problem (nothing was sent: bad flag, missing file,
  request over RunPod's payload limit, no API key, an ``--out`` that cannot be written), 3 the
  API or the download failed, 130 interrupted with Ctrl-C (the job is cancelled first). A user
  error never prints a traceback; an unexpected one prints one line (the traceback with ``-v``).
- Installs without the worker: ``pip install '.[client]'`` needs only aiohttp, yarl and
  tenacity (no runpod, boto3, av or pillow).
- Progress goes to stderr (``view.ProgressView``). Connection retries are shown as they happen.
  The summary (file, video facts, seed, timings) goes to stdout; when the video could not be
  written to ``--out`` it names where it went instead. ``-v`` adds diagnostic logs.
- The API key is read from ``RUNPOD_API_KEY`` and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from yarl import URL

from .. import __version__
from .jobs import run_job
from .model import (
    OPTION_FIELDS,
    RUN_PAYLOAD_LIMIT,
    RUNSYNC_PAYLOAD_LIMIT,
    ClientError,
    JobFailed,
    JobResult,
    UsageError,
)
from .request import build_job_input, check_out, default_base_url
from .view import ProgressView

EXIT_OK = 0
EXIT_INTERRUPTED = 130
EXIT_UNEXPECTED = 3
TIMING_KEYS = ("download", "queue", "inference", "upload", "total")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xicon-dance",
        description="Client for the XiCON Dance SCAIL worker on RunPod serverless.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="submit one job, show its progress and save the video",
        description="Submit a reference image and a driving video; save the generated MP4. "
        "The API key is read from RUNPOD_API_KEY.",
    )
    _add_target_args(run)
    _add_job_args(run)
    _add_client_args(run)
    return parser


def _add_target_args(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("where")
    group.add_argument("--endpoint", help="RunPod endpoint id (needed unless --base-url)")
    group.add_argument(
        "--base-url",
        help="API base URL (default https://api.runpod.ai/v2/<endpoint>); "
        "e.g. http://localhost:8000 for a local --rp_serve_api worker",
    )
    group.add_argument(
        "--local",
        action="store_true",
        help="the server is the RunPod SDK's --rp_serve_api test server: use POST /runsync "
        "(no progress, no cancel; 20 MB request limit)",
    )


def _add_job_args(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("job")
    group.add_argument("--image", required=True, help="reference image: local file or http(s) URL")
    group.add_argument(
        "--video", help="driving video: local file or http(s) URL (default: the worker's own)"
    )
    group.add_argument("--prompt", help="text prompt")
    group.add_argument("--negative-prompt", dest="negative_prompt", help="negative prompt")
    group.add_argument("--width", type=int, help="output width, multiple of 32 (256..1280)")
    group.add_argument("--height", type=int, help="output height, multiple of 32 (256..1280)")
    group.add_argument("--steps", type=int, help="sampler steps (1..50)")
    group.add_argument("--cfg", type=float, help="classifier-free guidance (0..20)")
    group.add_argument("--seed", type=int, help="seed; -1 for a random one")
    group.add_argument("--fps", type=int, help="output frame rate (1..60)")
    group.add_argument(
        "--max-frames", dest="max_frames", type=int, help="frame cap (rounded down to 4n+1)"
    )
    group.add_argument(
        "--max-seconds",
        dest="max_seconds",
        type=float,
        help="render at most this many seconds of the driving clip (default: the whole clip, "
        "up to the worker's MAX_SECONDS)",
    )
    group.add_argument(
        "--context-overlap",
        dest="context_overlap",
        type=int,
        help="frames shared by neighbouring context windows on clips over 81 frames (4..64, a "
        "multiple of 4; default the graph's 48): lower is faster, higher blends windows more",
    )
    group.add_argument(
        "--no-audio",
        dest="keep_audio",
        action="store_const",
        const=False,
        default=None,
        help="do not copy the driving video's audio",
    )
    group.add_argument(
        "--output",
        choices=("url", "base64", "auto"),
        help="how the worker returns the video (default auto: URL when it has a bucket)",
    )


def _add_client_args(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("client")
    group.add_argument(
        "--out", type=Path, default=Path("result.mp4"), help="where to save (default result.mp4)"
    )
    group.add_argument("--timeout", type=float, help="give up (and cancel the job) after S seconds")
    group.add_argument(
        "--poll-interval",
        dest="poll_interval",
        type=float,
        default=1.0,
        help="seconds between status polls (default 1)",
    )
    group.add_argument("-v", "--verbose", action="store_true", help="diagnostic logs on stderr")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    view = ProgressView(sys.stderr)
    try:
        result = _run(args, view)
    except KeyboardInterrupt:
        view.note("Interrupted.")
        return EXIT_INTERRUPTED
    except ClientError as exc:
        view.note(_describe_error(exc))
        return exc.exit_code
    except Exception as exc:  # a bug, not a user error: one line, the traceback only with -v
        logging.getLogger("xicon_dance").debug("unexpected error", exc_info=True)
        hint = "" if args.verbose else " (run with -v for details)"
        view.note(f"Error: unexpected {type(exc).__name__}: {exc}{hint}")
        return EXIT_UNEXPECTED
    view.close()
    print_summary(result, sys.stdout)
    return EXIT_OK


def _run(args: argparse.Namespace, view: ProgressView) -> JobResult:
    base_url, api_key = _target(args)
    if args.poll_interval <= 0:
        raise UsageError("--poll-interval must be above 0.")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be above 0.")
    out = check_out(args.out)
    options = {name: getattr(args, name) for name in OPTION_FIELDS}
    limit = RUNSYNC_PAYLOAD_LIMIT if args.local else RUN_PAYLOAD_LIMIT
    job_input = build_job_input(args.image, args.video, limit=limit, **options)
    return asyncio.run(
        run_job(
            job_input,
            base_url=base_url,
            api_key=api_key,
            out=out,
            local=args.local,
            poll_interval=args.poll_interval,
            timeout=args.timeout,
            on_update=view,
        )
    )


def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    api_key = os.environ.get("RUNPOD_API_KEY", "").strip() or None
    if args.base_url:
        if not args.base_url.lower().startswith(("http://", "https://")):
            raise UsageError("--base-url must start with http:// or https://.")
        if not _host(args.base_url):
            raise UsageError(f"--base-url {args.base_url!r} is not a valid URL (no host).")
        return args.base_url, api_key
    if not args.endpoint:
        raise UsageError("give --endpoint ID (or --base-url URL for another server).")
    if api_key is None:
        raise UsageError("RUNPOD_API_KEY is not set; export your RunPod API key first.")
    return default_base_url(args.endpoint), api_key


def _host(url: str) -> str | None:
    try:
        return URL(url).host
    except ValueError:
        return None


def _describe_error(exc: ClientError) -> str:
    if not isinstance(exc, JobFailed):
        return f"Error: {exc.message}"
    lines = [f"Job {exc.job_id or '(unknown)'} {exc.status}: {exc.message}"]
    if exc.code:
        lines.append(f"  code: {exc.code}")
    if exc.field:
        lines.append(f"  field: {exc.field}")
    return "\n".join(lines)


def print_summary(result: JobResult, out: TextIO) -> None:
    video = result.video
    if result.note:
        out.write(f"Note: {result.note}\n")
    if result.video_path is not None:
        out.write(f"Saved {result.video_path} ({_size(video.get('bytes'))})\n")
    facts = _video_facts(video)
    if facts:
        out.write(f"Video: {facts}\n")
    out.write(f"Seed: {result.seed}\n")
    timings = result.timings
    shown = [f"{key} {_seconds(timings[key])}" for key in TIMING_KEYS if key in timings]
    if shown:
        out.write("Timings: " + ", ".join(shown) + "\n")
    out.write(f"Job: {result.job_id}\n")
    out.flush()


def _video_facts(video: dict[str, Any]) -> str:
    parts = []
    if video.get("width") and video.get("height"):
        parts.append(f"{video['width']}x{video['height']}")
    if video.get("frames") is not None:
        parts.append(f"{video['frames']} frames")
    if video.get("fps") is not None:
        parts.append(f"{video['fps']} fps")
    if video.get("duration_s") is not None:
        parts.append(f"{_seconds(video['duration_s'])}")
    if video.get("has_audio") is not None:
        parts.append("with audio" if video["has_audio"] else "no audio")
    return ", ".join(parts)


def _seconds(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.1f} s"


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return "size unknown"
    return f"{value / 1_000_000:.1f} MB" if value >= 100_000 else f"{value} bytes"
