"""Saving a finished job's video: inline base64 or streamed from its URL, through a ``.part``
file, its size checked against the worker's ``bytes``. Used by the client and by local runs of
the worker (``xicon_dance.local_run``).

- ``await write_video(video, out, session=None, retries=3)`` writes ``video["base64"]`` (a
  ``data:`` prefix allowed) or downloads ``video["url"]`` (no API key is sent there; 429/5xx and
  connection failures retried with back-off) to ``out``. Nothing is left under ``out`` or
  ``out.part`` when it fails: ``OSError`` for the file system, ``ClientError`` for the rest.
- ``await save_video(video, out, job_id, ...) -> (path, note)``: ``write_video`` to ``out``; when
  that fails on the file system, to ``xicon-dance-<job id>.mp4`` in the current folder, else in
  the temp folder (``note`` says where and why); ``ClientError`` when nowhere worked.
- ``free_name(folder, stem)``: ``folder/stem.mp4``, or ``stem-1.mp4``... that does not exist.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from ..logs import redact
from .api import backoff_delay
from .model import API_TIMEOUT_S, ApiError, ClientError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=API_TIMEOUT_S, sock_read=120)


class _Retry(Exception):
    """A download failure that a later attempt may not see."""

    def __init__(self, why: str, retry_after: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.retry_after = retry_after


async def write_video(
    video: Mapping[str, Any],
    out: Path,
    *,
    session: aiohttp.ClientSession | None = None,
    retries: int = 3,
) -> None:
    """Write the result video to ``out`` through ``out.part``; see the module notes."""
    part = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        b64 = video.get("base64")
        if isinstance(b64, str):
            _write_base64(b64, part)
        elif isinstance(video.get("url"), str):
            await _download(video["url"], part, session, retries)
        else:
            raise ClientError("The worker's output video has neither 'url' nor 'base64'.")
        _check_size(part, video.get("bytes"))
        part.replace(out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


async def save_video(
    video: Mapping[str, Any],
    out: Path,
    job_id: str | None,
    *,
    session: aiohttp.ClientSession | None = None,
    retries: int = 3,
) -> tuple[Path, str | None]:
    """Write to ``out``; when that fails on the file system, to a safe name elsewhere."""
    try:
        await write_video(video, out, session=session, retries=retries)
        return out, None
    except OSError as exc:
        first = exc
    stem = "xicon-dance-" + (re.sub(r"[^A-Za-z0-9_-]", "_", job_id or "") or "result")
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        target = free_name(folder, stem)
        try:
            await write_video(video, target, session=session, retries=retries)
        except OSError:
            continue
        note = f"could not save to {out} ({os_reason(first)}); saved to {target} instead"
        log.warning("%s", note)
        return target, note
    raise ClientError(
        f"The job {job_id} finished, but its video could not be saved to {out} "
        f"({os_reason(first)}) nor to the current or temp folder. Its result stays available "
        "from the endpoint's /status for a while (RunPod keeps finished results for 30 min)."
    )


def free_name(folder: Path, stem: str) -> Path:
    target, n = folder / f"{stem}.mp4", 1
    while target.exists():
        target, n = folder / f"{stem}-{n}.mp4", n + 1
    return target


def os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _write_base64(text: str, part: Path) -> None:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        part.write_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise ClientError("The output video's base64 text is not valid base64.") from None


async def _download(
    url: str, part: Path, session: aiohttp.ClientSession | None, retries: int
) -> None:
    """Stream ``url`` into ``part`` (retried as the module says); no API key is sent here."""
    shown = redact(url)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return backoff_delay(state.attempt_number, getattr(exc, "retry_after", None))

    def report(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.info("GET %s: %s; retrying in %.1f s", shown, getattr(exc, "why", exc), delay)

    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(max(1, retries)),
            wait=wait,
            retry=retry_if_exception_type(_Retry),
            before_sleep=report,
            reraise=True,
        ):
            with attempt:
                await _download_once(session, url, part)
    except _Retry as exc:
        raise ApiError(f"Downloading the video failed: {exc.why}.") from None
    finally:
        if own:
            await session.close()


async def _download_once(session: aiohttp.ClientSession, url: str, part: Path) -> None:
    try:
        async with session.get(url, timeout=DOWNLOAD_TIMEOUT) as resp:
            if resp.status == 429 or resp.status >= 500:
                raise _Retry(f"HTTP {resp.status}", resp.headers.get("Retry-After"))
            if resp.status >= 400:
                raise ApiError(
                    f"Downloading the video failed with HTTP {resp.status}.", status=resp.status
                )
            with part.open("wb") as fh:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    fh.write(chunk)
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
        raise _Retry(type(exc).__name__) from None


def _check_size(part: Path, expected: Any) -> None:
    got = part.stat().st_size
    if isinstance(expected, int) and not isinstance(expected, bool) and expected != got:
        raise ClientError(
            f"The video has {got} bytes but the worker reported {expected}; it was not saved."
        )
