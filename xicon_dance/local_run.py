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
  added rather than overwriting), through a ``.part`` file, and logs one line: path, size,
  frames and seconds. A failed job, a result without a video, or any error while saving
  returns ``None`` after a WARNING naming the reason; the job's result is never changed.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from .logs import redact

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=600, connect=30, sock_read=120)
CHUNK = 1 << 20


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
        target = _free_name(folder, _file_name(video, job_id))
        part = target.with_name(target.name + ".part")
        try:
            await _write(video, part)
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)
    except (OSError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
        log.warning("the result video was not saved to %s: %s", folder, _reason(exc))
        return None
    log.info("saved the result video: %s", summary(target, video))
    return target


def summary(path: Path, video: Mapping[str, Any]) -> str:
    """``<path> (2.1 MB, 81 frames, 5.1 s)``."""
    parts = [f"{path.stat().st_size / 1_000_000:.1f} MB"]
    if isinstance(video.get("frames"), int):
        parts.append(f"{video['frames']} frames")
    if isinstance(video.get("duration_s"), int | float):
        parts.append(f"{video['duration_s']:.1f} s")
    return f"{path} ({', '.join(parts)})"


async def _write(video: Mapping[str, Any], part: Path) -> None:
    if isinstance(video.get("base64"), str):
        text = video["base64"]
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            part.write_bytes(base64.b64decode(text, validate=True))
        except binascii.Error:
            raise ValueError("the result's base64 text is not valid base64") from None
    elif isinstance(video.get("url"), str):
        await _download(video["url"], part)
    else:
        raise ValueError("the result video has neither 'base64' nor 'url'")
    expected = video.get("bytes")
    got = part.stat().st_size
    if isinstance(expected, int) and not isinstance(expected, bool) and expected != got:
        raise ValueError(f"got {got} bytes, the result says {expected}")


async def _download(url: str, part: Path) -> None:
    async with (
        aiohttp.ClientSession(timeout=DOWNLOAD_TIMEOUT) as session,
        session.get(url) as resp,
    ):
        if resp.status >= 400:
            raise ValueError(f"downloading {redact(url)} answered HTTP {resp.status}")
        with part.open("wb") as fh:
            async for chunk in resp.content.iter_chunked(CHUNK):
                fh.write(chunk)


def _file_name(video: Mapping[str, Any], job_id: str) -> str:
    name = Path(str(video.get("filename") or "")).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if not name:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", job_id)[:64] or "result"
    return name if name.lower().endswith(".mp4") else name + ".mp4"


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    stem, n = target.stem, 1
    while target.exists():
        target = folder / f"{stem}-{n}.mp4"
        n += 1
    return target


def _reason(exc: BaseException) -> str:
    return redact(str(exc)) or type(exc).__name__
