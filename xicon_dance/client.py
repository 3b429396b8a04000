"""Client for a deployed worker: submit a job, follow its progress, save the video.

Contract:
- ``build_job_input(image, video=None, **options) -> dict`` turns a local path or an http(s) URL
  into ``image_base64``/``image_url`` (and ``video_base64``/``video_url``) and adds only the
  options that were given, so the worker's defaults apply to the rest. A missing or unreadable
  file raises ``UsageError``; a file whose base64 would push the request over ``limit`` raises
  ``PayloadTooLarge`` before the file is read.
- ``encode_request(job_input, limit) -> bytes`` is the exact JSON body ``{"input": {...}}``;
  over ``limit`` bytes (RunPod: 10 MB for ``/run``, 20 MB for ``/runsync``) it raises
  ``PayloadTooLarge`` naming the sizes.
- ``check_out(path) -> Path`` refuses, before anything is sent, an ``--out`` that is a folder, lies
  under a file, or is in a folder that cannot be created or written (``UsageError``).
- ``await run_job(job_input, base_url=..., ...) -> JobResult`` submits with ``POST /run``, polls
  ``GET /status/{id}`` and reports each change to ``on_update(JobUpdate)``; while the job is
  IN_PROGRESS the worker's latest progress payload (``stage``, ``step``, ``total``, ``percent``,
  ``message``) arrives as ``JobUpdate.progress``. ``on_update`` is called after every poll (so
  a display can refresh its clock); consecutive updates may be equal. With ``local=True`` it
  uses ``POST /runsync`` (the SDK's ``--rp_serve_api`` server, which has no progress and no
  ``/cancel``); a server that answers 405 to ``GET /status`` is treated the same way
  (``POST /status/{id}``).
- COMPLETED: the video (``output.video.url``, streamed, or ``output.video.base64``) is written
  to ``out`` (through a ``.part`` file, size checked against ``video.bytes``); the returned
  ``JobResult`` carries the output without the base64 text. A finished video is never lost: if
  ``out`` cannot be written (disk full, folder removed meanwhile...) it is saved as
  ``xicon-dance-<job id>.mp4`` in the current folder, else in the temp folder, and
  ``JobResult.note`` says where and why. FAILED, CANCELLED, TIMED_OUT raise
  ``JobFailed`` with the worker's message, ``code`` and ``field``. COMPLETED without output
  (a result over RunPod's size limit) raises ``JobFailed`` too.
- Cancellation: ``asyncio.CancelledError`` or ``KeyboardInterrupt`` while the job runs sends
  ``POST /cancel/{id}`` before re-raising; passing ``timeout`` does the same, then raises
  ``ClientTimeout``.
- HTTP 429, 5xx and connection errors are retried with back-off (``Retry-After`` honoured), each
  retry reported at once to ``on_update`` (status ``RETRYING``, ``detail`` says why and when);
  other HTTP errors raise ``ApiError`` with the status and a short text excerpt (an HTML error
  page is reduced to its title or first words). The API key goes only to the API, never to the
  video URL, and never into messages.
- Every error is a ``ClientError`` whose ``exit_code`` the command line uses: 1 the job did not
  produce a video, 2 a usage problem (nothing was sent), 3 the API or the download failed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import html
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .logs import redact

log = logging.getLogger(__name__)

MB = 1000 * 1000
RUN_PAYLOAD_LIMIT = 10 * MB  # POST /run (RunPod's documented request limit)
RUNSYNC_PAYLOAD_LIMIT = 20 * MB  # POST /runsync
DEFAULT_BASE_URL = "https://api.runpod.ai/v2/{endpoint}"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# Client-side events reported through on_update next to RunPod's job states.
SUBMITTED = "SUBMITTED"
DOWNLOADING = "DOWNLOADING"
CANCEL_SENT = "CANCEL_SENT"
CANCEL_FAILED = "CANCEL_FAILED"
RETRYING = "RETRYING"
API_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 30.0
CHUNK = 1 << 20
OPTION_FIELDS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "cfg",
    "seed",
    "fps",
    "max_frames",
    "keep_audio",
    "output",
)


class ClientError(Exception):
    """A problem explained to the user in one message; ``exit_code`` for the command line."""

    exit_code = 3

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(ClientError):
    """Bad arguments or files; nothing was sent."""

    exit_code = 2


class PayloadTooLarge(UsageError):
    """The request would exceed RunPod's payload limit."""


class ApiError(ClientError):
    """The API answered with an HTTP error, or could not be reached after retries."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JobFailed(ClientError):
    """The job ended without a video: FAILED, CANCELLED, TIMED_OUT or an empty result."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None,
        status: str,
        code: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.status = status
        self.code = code
        self.field = field


class ClientTimeout(JobFailed):
    """The client stopped waiting (``timeout``); the job was cancelled."""


@dataclass(frozen=True)
class Progress:
    """The worker's latest progress payload."""

    stage: str
    step: int | None = None
    total: int | None = None
    percent: int | None = None
    message: str | None = None

    @classmethod
    def from_payload(cls, payload: object) -> Progress | None:
        """Parse a ``/status`` output seen while IN_PROGRESS; anything else gives ``None``."""
        if not isinstance(payload, Mapping) or not isinstance(payload.get("stage"), str):
            return None

        def num(key: str) -> int | None:
            value = payload.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return None
            return int(value)

        message = payload.get("message")
        return cls(
            stage=payload["stage"],
            step=num("step"),
            total=num("total"),
            percent=num("percent"),
            message=message if isinstance(message, str) else None,
        )

    @property
    def fraction(self) -> float | None:
        """0..1 from ``percent``, else from ``step/total``; ``None`` when unknown."""
        if self.percent is not None:
            return max(0.0, min(1.0, self.percent / 100))
        if self.step is not None and self.total:
            return max(0.0, min(1.0, self.step / self.total))
        return None


@dataclass(frozen=True)
class JobUpdate:
    """One change seen by the client: a RunPod job state or a client event (SUBMITTED, ...)."""

    job_id: str | None
    status: str
    progress: Progress | None = None
    elapsed_s: float = 0.0
    detail: str | None = None


@dataclass
class JobResult:
    """A COMPLETED job: its output (base64 text removed) and where the video was written."""

    job_id: str | None
    output: dict[str, Any]
    video_path: Path | None = None
    status_doc: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # set when the video went somewhere else than ``out``

    @property
    def video(self) -> dict[str, Any]:
        video = self.output.get("video")
        return video if isinstance(video, dict) else {}

    @property
    def timings(self) -> dict[str, Any]:
        timings = self.output.get("timings")
        return timings if isinstance(timings, dict) else {}

    @property
    def seed(self) -> Any:
        return self.output.get("seed")


UpdateCallback = Callable[[JobUpdate], None]


# --------------------------------------------------------------------------- request building


def is_url(value: str) -> bool:
    return value.lower().startswith(("http://", "https://"))


def default_base_url(endpoint: str) -> str:
    return DEFAULT_BASE_URL.format(endpoint=endpoint)


def build_job_input(
    image: str,
    video: str | None = None,
    *,
    limit: int = RUN_PAYLOAD_LIMIT,
    **options: Any,
) -> dict[str, Any]:
    """The job ``input``: media as URL or base64, plus the options that are not ``None``."""
    unknown = set(options) - set(OPTION_FIELDS)
    if unknown:
        raise UsageError(f"unknown job option(s): {', '.join(sorted(unknown))}.")
    job: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    media = [("image", image)] + ([("video", video)] if video else [])
    local = [(name, Path(value)) for name, value in media if not is_url(value)]
    for name, path in local:
        _check_file(name, path)
    _check_estimated_size(job, media, local, limit)
    for name, value in media:
        if is_url(value):
            job[f"{name}_url"] = value
        else:
            job[f"{name}_base64"] = base64.b64encode(Path(value).read_bytes()).decode("ascii")
    return job


def check_out(path: Path | str) -> Path:
    """``path`` if a video can be written there, else ``UsageError`` (nothing was sent)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise UsageError(
            f"--out: {out} is a folder; give a file name such as {out / 'result.mp4'}."
        )
    parent = out.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"--out: {out} lies under {existing}, which is a file, not a folder.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == parent else f" (needed to create {parent})"
        raise UsageError(f"--out: the folder {existing} is not writable{where}.")
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"--out: {out} exists and is not writable.")
    return out


def _check_file(name: str, path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"--{name}: {path} is not a file (give a local file or an http(s) URL).")
    if not os.access(path, os.R_OK):
        raise UsageError(f"--{name}: {path} is not readable.")


def _check_estimated_size(
    job: dict[str, Any],
    media: list[tuple[str, str]],
    local: list[tuple[str, Path]],
    limit: int,
) -> None:
    """Refuse before reading: base64 makes 4 bytes of every 3."""
    urls = sum(len(value) for _, value in media if is_url(value))
    encoded = {name: 4 * ((path.stat().st_size + 2) // 3) for name, path in local}
    estimate = len(json.dumps({"input": job}, ensure_ascii=False).encode()) + urls
    estimate += sum(encoded.values()) + 64
    if estimate > limit:
        raise PayloadTooLarge(_too_large_message(estimate, limit, encoded))


def _too_large_message(size: int, limit: int, encoded: Mapping[str, int]) -> str:
    parts = ", ".join(f"{name} {n / MB:.1f} MB as base64" for name, n in encoded.items())
    shown = f" ({parts})" if parts else ""
    return (
        f"The request would be {size / MB:.1f} MB{shown}, over RunPod's {limit / MB:.0f} MB "
        "payload limit. Upload the files somewhere the worker can download them and pass "
        "their http(s) URLs instead (--image https://..., --video https://...)."
    )


def encode_request(job_input: Mapping[str, Any], limit: int = RUN_PAYLOAD_LIMIT) -> bytes:
    """The JSON body ``{"input": ...}``, refused when over ``limit`` bytes."""
    body = json.dumps({"input": dict(job_input)}, ensure_ascii=False).encode("utf-8")
    if len(body) > limit:
        encoded = {
            key.removesuffix("_base64"): len(value)
            for key, value in job_input.items()
            if key.endswith("_base64") and isinstance(value, str)
        }
        raise PayloadTooLarge(_too_large_message(len(body), limit, encoded))
    return body


# --------------------------------------------------------------------------- HTTP


class _Api:
    """The endpoint's REST API with polite retries. The key is sent only here."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None,
        retries: int,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.session = session
        self.on_retry = on_retry
        self.base_url = base_url.rstrip("/")
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = api_key
        self.retries = max(1, retries)
        self.status_method = "GET"

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        timeout_s: float | None = API_TIMEOUT_S,
        allow: frozenset[int] = frozenset(),
    ) -> tuple[int, Any]:
        """``(http_status, json)``; retries 429/5xx/connection errors, raises ``ApiError``."""
        url = f"{self.base_url}{path}"
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=API_TIMEOUT_S)
        for attempt in range(1, self.retries + 1):
            last = attempt == self.retries
            try:
                async with self.session.request(
                    method, url, data=body, headers=self.headers, timeout=timeout
                ) as resp:
                    text = await resp.text()
                    if resp.status in allow:
                        return resp.status, None
                    if _retryable(resp.status) and not last:
                        why = f"HTTP {resp.status}"
                        await self._backoff(attempt, resp.headers.get("Retry-After"), path, why)
                        continue
                    if resp.status >= 400:
                        raise ApiError(
                            _http_message(method, path, resp.status, text), status=resp.status
                        )
                    return resp.status, _json(text, method, path)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                why = f"cannot reach {self.base_url} ({_exc_text(exc)})"
                if last:
                    raise ApiError(f"{method} {path}: {why}.") from None
                await self._backoff(attempt, None, path, why)
            except aiohttp.ClientError as exc:  # e.g. an invalid URL: retrying cannot help
                raise ApiError(f"{method} {path}: {_exc_text(exc)}.") from None
        raise AssertionError("unreachable")

    async def _backoff(self, attempt: int, retry_after: str | None, path: str, why: str) -> None:
        delay = _delay(attempt, retry_after)
        text = f"{why}; retry {attempt} of {self.retries - 1} in {delay:.1f} s"
        log.info("%s: %s", path, text)
        if self.on_retry is not None:
            self.on_retry(text)
        await asyncio.sleep(delay)

    async def submit(self, body: bytes, *, local: bool, timeout_s: float | None) -> dict[str, Any]:
        path = "/runsync" if local else "/run"
        _, doc = await self.call(
            "POST", path, body, timeout_s=timeout_s if local else API_TIMEOUT_S
        )
        return _as_doc(doc, f"POST {path}")

    async def status(self, job_id: str, timeout_s: float | None) -> dict[str, Any]:
        path = f"/status/{job_id}"
        if self.status_method == "GET":
            code, doc = await self.call("GET", path, allow=frozenset({405}))
            if code != 405:
                return _as_doc(doc, f"GET {path}")
            log.info("GET /status is not allowed: a local test server; using POST /status")
            self.status_method = "POST"
        _, doc = await self.call("POST", path, timeout_s=timeout_s)
        return _as_doc(doc, f"POST {path}")

    async def cancel(self, job_id: str) -> bool:
        try:
            await self.call("POST", f"/cancel/{job_id}")
        except ApiError as exc:
            log.warning("cancel of job %s failed: %s", job_id, exc.message)
            return False
        return True


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _delay(attempt: int, retry_after: str | None) -> float:
    delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1)) * (0.75 + random.random() / 2)
    if retry_after:
        with contextlib.suppress(ValueError):
            delay = min(MAX_BACKOFF_S, max(0.0, float(retry_after)))
    return delay


async def _backoff(attempt: int, retry_after: str | None, method: str, path: str) -> None:
    delay = _delay(attempt, retry_after)
    log.info("%s %s: retrying in %.1f s (attempt %d)", method, path, delay, attempt + 1)
    await asyncio.sleep(delay)


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {redact(str(exc)) or 'no answer'}"


def excerpt(text: str, limit: int = 200) -> str:
    """A short, single-line excerpt of an HTTP body; an HTML page gives its title or words."""
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title and title.group(1).strip():
        text = title.group(1)
    elif "<" in text and ">" in text:
        text = re.sub(r"<(script|style)\b.*?</\1>", " ", text, flags=re.IGNORECASE | re.DOTALL)
        text = re.sub(r"<[^>]+>", " ", text)
    flat = " ".join(html.unescape(text).split())
    flat = redact(flat)
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def _http_message(method: str, path: str, status: int, text: str) -> str:
    hint = {
        401: " Check RUNPOD_API_KEY.",
        403: " Check RUNPOD_API_KEY and that the key may use this endpoint.",
        404: " Check the endpoint id / --base-url (a finished job's result is kept 30 min).",
        413: " The request is too large; pass URLs instead of local files.",
    }.get(status, "")
    short = excerpt(text)
    shown = f": {short}" if short else ""
    return f"{method} {path} failed with HTTP {status}{shown}.{hint}"


def _json(text: str, method: str, path: str) -> Any:
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        raise ApiError(f"{method} {path}: the answer is not JSON: {excerpt(text)!r}.") from None


def _as_doc(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("status", ""), str):
        raise ApiError(f"{what}: unexpected answer {json.dumps(doc)[:200]}.")
    return doc


# --------------------------------------------------------------------------- job lifecycle


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
) -> JobResult:
    """Run one job to the end and write its video to ``out`` (when given); see module doc."""
    body = encode_request(job_input, RUNSYNC_PAYLOAD_LIMIT if local else RUN_PAYLOAD_LIMIT)
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        tracker = _Tracker(on_update, time.monotonic(), timeout)
        api = _Api(
            session, base_url, api_key, retries, lambda why: tracker.emit(RETRYING, None, why)
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
    api: _Api, body: bytes, local: bool, poll_interval: float, tracker: _Tracker
) -> dict[str, Any]:
    doc = await _with_deadline(api.submit(body, local=local, timeout_s=None), tracker)
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
    api: _Api, doc: dict[str, Any], poll_interval: float, tracker: _Tracker
) -> dict[str, Any]:
    assert tracker.job_id is not None
    while True:
        status = str(doc.get("status") or "IN_QUEUE")
        if status in TERMINAL:
            return doc
        progress = Progress.from_payload(doc.get("output")) if status == "IN_PROGRESS" else None
        tracker.emit(status, progress)
        await _sleep_within(poll_interval, tracker)
        doc = await _with_deadline(api.status(tracker.job_id, tracker.remaining()), tracker)


async def _sleep_within(seconds: float, tracker: _Tracker) -> None:
    remaining = tracker.remaining()
    if remaining is not None and remaining <= 0:
        raise _timeout_error(tracker)
    await asyncio.sleep(seconds if remaining is None else min(seconds, remaining))


async def _with_deadline(coro: Any, tracker: _Tracker) -> Any:
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


async def _cancel(api: _Api, tracker: _Tracker) -> None:
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
    video = dict(output["video"])
    b64 = video.pop("base64", None)
    result = JobResult(tracker.job_id, {**output, "video": video}, None, _without(doc, "output"))
    if out is not None:
        tracker.emit(DOWNLOADING)
        await _save(session, video, b64, out, retries, result)
    return result


async def _save(
    session: aiohttp.ClientSession,
    video: dict[str, Any],
    b64: Any,
    out: Path,
    retries: int,
    result: JobResult,
) -> None:
    """Write to ``out``; when that fails on the file system, to a safe name elsewhere."""
    try:
        await _write_video(session, video, b64, out, retries)
        result.video_path = out
        return
    except OSError as exc:
        first = exc
    name = "xicon-dance-" + (re.sub(r"[^A-Za-z0-9_-]", "_", result.job_id or "") or "result")
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        target = _free_name(folder, name)
        try:
            await _write_video(session, video, b64, target, retries)
        except OSError:
            continue
        result.video_path = target
        result.note = f"could not save to {out} ({_os_reason(first)}); saved to {target} instead"
        log.warning("%s", result.note)
        return
    raise ClientError(
        f"The job {result.job_id} finished, but its video could not be saved to {out} "
        f"({_os_reason(first)}) nor to the current or temp folder. Its result stays available "
        "from the endpoint's /status for a while (RunPod keeps finished results for 30 min)."
    )


def _free_name(folder: Path, stem: str) -> Path:
    target, n = folder / f"{stem}.mp4", 1
    while target.exists():
        target, n = folder / f"{stem}-{n}.mp4", n + 1
    return target


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _without(doc: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != key}


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


# --------------------------------------------------------------------------- video output


async def _write_video(
    session: aiohttp.ClientSession,
    video: dict[str, Any],
    b64: Any,
    out: Path,
    retries: int,
) -> None:
    part = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if isinstance(b64, str):
            _write_base64(b64, part)
        elif isinstance(video.get("url"), str):
            await _download(session, video["url"], part, retries)
        else:
            raise ClientError("The worker's output video has neither 'url' nor 'base64'.")
        _check_size(part, video.get("bytes"))
        part.replace(out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _write_base64(text: str, part: Path) -> None:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        part.write_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise ClientError("The output video's base64 text is not valid base64.") from None


async def _download(session: aiohttp.ClientSession, url: str, part: Path, retries: int) -> None:
    """Stream ``url`` into ``part``; no API key is sent here."""
    shown = redact(url)
    timeout = aiohttp.ClientTimeout(total=None, connect=API_TIMEOUT_S, sock_read=120)
    for attempt in range(1, max(1, retries) + 1):
        try:
            async with session.get(url, timeout=timeout) as resp:
                if _retryable(resp.status) and attempt < retries:
                    await _backoff(attempt, resp.headers.get("Retry-After"), "GET", shown)
                    continue
                if resp.status >= 400:
                    raise ApiError(
                        f"Downloading the video failed with HTTP {resp.status}.", status=resp.status
                    )
                with part.open("wb") as fh:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        fh.write(chunk)
                return
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            if attempt >= retries:
                raise ApiError(f"Downloading the video failed: {type(exc).__name__}.") from None
            await _backoff(attempt, None, "GET", shown)


def _check_size(part: Path, expected: Any) -> None:
    got = part.stat().st_size
    if isinstance(expected, int) and not isinstance(expected, bool) and expected != got:
        raise ClientError(
            f"The video has {got} bytes but the worker reported {expected}; it was not saved."
        )
