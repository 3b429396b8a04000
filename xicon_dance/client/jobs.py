"""One job's lifecycle: submit, poll, report, cancel, finish (see the package notes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from ..logs import redact
from .api import Api
from .model import (
    API_TIMEOUT_S,
    CANCEL_FAILED,
    CANCEL_SENT,
    DOWNLOADING,
    RETRYING,
    RUN_PAYLOAD_LIMIT,
    RUNSYNC_PAYLOAD_LIMIT,
    SUBMITTED,
    TERMINAL,
    ApiError,
    ClientTimeout,
    JobFailed,
    JobResult,
    JobUpdate,
    Progress,
    UpdateCallback,
)
from .output import save_video
from .request import encode_request

T = TypeVar("T")


async def run_job(
    job_input: Mapping[str, Any],
    *,
    base_url: str,
    api_key: str | None = None,
    out: Path | str | None = None,
    local: bool = False,
    poll_interval: float = 1.0,
    timeout: float | None = None,
    on_update: UpdateCallback | None = None,
    retries: int = 6,
    session: aiohttp.ClientSession | None = None,
    api_timeout_s: float = API_TIMEOUT_S,
) -> JobResult:
    """Run one job to the end and write its video to ``out`` (when given); see package notes.

    ``api_timeout_s``: how long one API request may take (not ``/runsync`` nor the local
    server's ``POST /status``, which run the job inside the request)."""
    body = encode_request(job_input, RUNSYNC_PAYLOAD_LIMIT if local else RUN_PAYLOAD_LIMIT)
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        tracker = _Tracker(on_update, time.monotonic(), timeout)
        api = Api(
            session,
            base_url,
            api_key,
            retries,
            lambda why: tracker.emit(RETRYING, None, why),
            timeout_s=api_timeout_s,
        )
        doc = await _submit_and_wait(api, body, local, max(0.05, poll_interval), tracker)
        return await _finish(session, doc, tracker, Path(out) if out else None, retries)
    finally:
        if own:
            await session.close()


@dataclass
class _Tracker:
    """Reports updates (one per poll) and keeps the deadline."""

    callback: UpdateCallback | None
    started: float
    timeout: float | None
    job_id: str | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float | None:
        return None if self.timeout is None else self.timeout - self.elapsed()

    def emit(
        self, status: str, progress: Progress | None = None, detail: str | None = None
    ) -> None:
        if self.callback is not None:
            self.callback(JobUpdate(self.job_id, status, progress, self.elapsed(), detail))


async def _submit_and_wait(
    api: Api, body: bytes, local: bool, poll_interval: float, tracker: _Tracker
) -> dict[str, Any]:
    doc = await _with_deadline(api.submit(body, local=local), tracker)
    tracker.job_id = str(doc["id"]) if doc.get("id") is not None else None
    tracker.emit(SUBMITTED)
    if doc.get("status") in TERMINAL:
        return doc
    if tracker.job_id is None:
        raise ApiError(f"The server accepted the job but gave no id: {json.dumps(doc)[:200]}.")
    try:
        return await _poll(api, doc, poll_interval, tracker)
    except (asyncio.CancelledError, KeyboardInterrupt):
        await asyncio.shield(_cancel(api, tracker))
        raise
    except ClientTimeout:
        await _cancel(api, tracker)
        raise


async def _poll(
    api: Api, doc: dict[str, Any], poll_interval: float, tracker: _Tracker
) -> dict[str, Any]:
    assert tracker.job_id is not None
    while True:
        status = str(doc.get("status") or "IN_QUEUE")
        if status in TERMINAL:
            return doc
        progress = Progress.from_payload(doc.get("output")) if status == "IN_PROGRESS" else None
        tracker.emit(status, progress)
        await _sleep_within(poll_interval, tracker)
        doc = await _with_deadline(api.status(tracker.job_id), tracker)


async def _sleep_within(seconds: float, tracker: _Tracker) -> None:
    remaining = tracker.remaining()
    if remaining is not None and remaining <= 0:
        raise _timeout_error(tracker)
    await asyncio.sleep(seconds if remaining is None else min(seconds, remaining))


async def _with_deadline(coro: Awaitable[T], tracker: _Tracker) -> T:
    remaining = tracker.remaining()
    if remaining is None:
        return await coro
    try:
        return await asyncio.wait_for(coro, max(0.0, remaining))
    except TimeoutError:
        raise _timeout_error(tracker) from None


def _timeout_error(tracker: _Tracker) -> ClientTimeout:
    return ClientTimeout(
        f"Gave up waiting after {tracker.timeout:g} s (--timeout); the job was cancelled.",
        job_id=tracker.job_id,
        status="CLIENT_TIMEOUT",
    )


async def _cancel(api: Api, tracker: _Tracker) -> None:
    if tracker.job_id is None:
        return
    if api.status_method == "POST":  # local test server: no /cancel
        tracker.emit(CANCEL_FAILED, detail="this server has no /cancel")
        return
    ok = await api.cancel(tracker.job_id)
    tracker.emit(CANCEL_SENT if ok else CANCEL_FAILED)


async def _finish(
    session: aiohttp.ClientSession,
    doc: dict[str, Any],
    tracker: _Tracker,
    out: Path | None,
    retries: int,
) -> JobResult:
    status = str(doc.get("status"))
    tracker.emit(status)
    if status != "COMPLETED":
        raise _failure(doc, status, tracker.job_id)
    output = doc.get("output")
    if not isinstance(output, dict) or not isinstance(output.get("video"), dict):
        raise JobFailed(
            "The job COMPLETED without a video in its output. A result over RunPod's size "
            "limit is dropped this way: configure a bucket on the worker (BUCKET_* settings) "
            "or ask for --output url.",
            job_id=tracker.job_id,
            status=status,
        )
    video = {k: v for k, v in output["video"].items() if k != "base64"}
    status_doc = {k: v for k, v in doc.items() if k != "output"}
    result = JobResult(tracker.job_id, {**output, "video": video}, None, status_doc)
    if out is not None:
        tracker.emit(DOWNLOADING)
        result.video_path, result.note = await save_video(
            output["video"], out, tracker.job_id, session=session, retries=retries
        )
    return result


def _failure(doc: dict[str, Any], status: str, job_id: str | None) -> JobFailed:
    output = doc.get("output") if isinstance(doc.get("output"), dict) else {}
    code, field_name = output.get("code"), output.get("field")
    reason = _error_text(doc.get("error"))
    if status == "FAILED":
        message = reason or "The job FAILED without an error message."
    elif status == "CANCELLED":
        message = "The job was CANCELLED" + (f": {reason}" if reason else ".")
    elif status == "TIMED_OUT":
        message = (
            "The job TIMED_OUT on RunPod: it expired in the queue (TTL) or ran past the "
            "endpoint's execution timeout (600 s by default; this worker needs more than "
            "JOB_TIMEOUT_S + UPLOAD_TIMEOUT_S, 2400 s with its defaults: raise it in the "
            "endpoint settings)."
        )
    else:
        message = f"The job ended with status {status!r}" + (f": {reason}" if reason else ".")
    return JobFailed(
        message,
        job_id=job_id,
        status=status,
        code=code if isinstance(code, str) else None,
        field=field_name if isinstance(field_name, str) else None,
    )


def _error_text(error: Any) -> str:
    """The worker's message; an SDK exception report (a JSON string) is shortened."""
    if error is None:
        return ""
    if isinstance(error, str):
        with contextlib.suppress(ValueError):
            parsed = json.loads(error)
            if isinstance(parsed, dict) and "error_message" in parsed:
                kind = str(parsed.get("error_type", "")).removeprefix("<class '").rstrip("'>")
                return redact(f"{kind}: {parsed['error_message']}".strip(": "))
        return redact(error)
    return redact(json.dumps(error))
