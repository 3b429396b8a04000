"""Local runs: save each finished job's video to a folder and say where it went.

Contract:
- A *local run* is the RunPod SDK running without the platform's job queue: ``python handler.py``
  (reads ``test_input.json``), ``--test_input '{...}'``, ``docker run`` of the image on your own
  machine (no ``RUNPOD_WEBHOOK_GET_JOB`` in the environment), or ``--rp_serve_api``.
  ``is_local_run(rp_serve_api, env)`` decides it. A RunPod worker's warm-up job (``--test_input``
  with the platform's variables set) is not one.
- ``await save_result(result, folder, job_id) -> Path | None``: for a successful job result
  (``{"video": {"base64"|"url", "filename", "bytes", "frames", "duration_s", ...}}``) writes the
  MP4 into ``folder`` (created if missing) under the video's own file name (``-1``, ``-2``, ...
  added rather than overwriting) with the client's own saving code
  (``xicon_dance.client.output.write_video``: through a ``.part`` file, size checked, a URL
  downloaded with retries), and logs one line: path, size, frames and seconds. A failed job, a
  result without a video, or any error while saving returns ``None`` after a WARNING naming the
  reason; the job's result is never changed.
- The summary is the last thing a person sees: in the SDK's one-job mode (``--test_input`` or
  ``test_input.json``; the job id is ``local_test``) the SDK prints the whole result (the video's
  base64 included) after the handler returns, then exits; so for that job the line is logged when
  the process exits instead (``atexit``), after the SDK's output. Nothing changes in what the
  SDK or RunPod receives. Other jobs (``--rp_serve_api``) log it at once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from .client.model import ClientError
from .client.output import free_name, write_video
from .logs import job_context, redact

log = logging.getLogger(__name__)

# The id the RunPod SDK gives the job of its one-job local mode (runpod 1.12.0, rp_local.py).
SDK_LOCAL_TEST_ID = "local_test"
DOWNLOAD_RETRIES = 3
_at_exit: list[tuple[str, str]] = []


def is_local_run(rp_serve_api: bool, env: Mapping[str, str]) -> bool:
    """True for ``--rp_serve_api`` and whenever RunPod's job queue is not configured."""
    return bool(rp_serve_api) or not env.get("RUNPOD_WEBHOOK_GET_JOB")


async def save_result(result: Mapping[str, Any], folder: Path, job_id: str) -> Path | None:
    """Write the result video into ``folder``; ``None`` (logged) when there is nothing to save."""
    video = result.get("video") if isinstance(result, Mapping) else None
    if "error" in result or not isinstance(video, Mapping):
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = free_name(folder, _stem(video, job_id))
        await write_video(video, target, retries=DOWNLOAD_RETRIES)
    except (OSError, ClientError, aiohttp.ClientError, TimeoutError) as exc:
        log.warning("the result video was not saved to %s: %s", folder, _reason(exc))
        return None
    line = summary(target, video)
    if job_id == SDK_LOCAL_TEST_ID:
        _log_at_exit(job_id, line)
    else:
        log.info("saved the result video: %s", line)
    return target


def summary(path: Path, video: Mapping[str, Any]) -> str:
    """``<path> (2.1 MB, 81 frames, 5.1 s)``."""
    parts = [f"{path.stat().st_size / 1_000_000:.1f} MB"]
    if isinstance(video.get("frames"), int):
        parts.append(f"{video['frames']} frames")
    if isinstance(video.get("duration_s"), int | float):
        parts.append(f"{video['duration_s']:.1f} s")
    return f"{path} ({', '.join(parts)})"


def _log_at_exit(job_id: str, line: str) -> None:
    if not _at_exit:
        atexit.register(log_pending_summaries)
    _at_exit.append((job_id, line))


def log_pending_summaries() -> None:
    """Log the summaries kept for the end of the process (after what the SDK printed)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    while _at_exit:
        job_id, line = _at_exit.pop(0)
        with job_context(job_id):
            log.info("saved the result video: %s", line)


def _stem(video: Mapping[str, Any], job_id: str) -> str:
    name = Path(str(video.get("filename") or "")).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if name.lower().endswith(".mp4"):
        name = name[:-4]
    return name or re.sub(r"[^A-Za-z0-9_-]", "_", job_id)[:64] or "result"


def _reason(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, ClientError) else str(exc)
    return redact(message) or type(exc).__name__
