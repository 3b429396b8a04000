"""Result delivery: bucket upload with a presigned URL, or inline base64.

Contract:
- ``await deliver(path: Path, *, job_id: str, mode: "auto"|"url"|"base64", settings) -> dict``
  returning ``{"url"|"base64": ..., "filename", "content_type": "video/mp4", "bytes"}``.
  Bucket (when BUCKET_ENDPOINT_URL + keys are set): upload, ContentType video/mp4, key
  ``<prefix>/<job_id>/<file>.mp4``, presigned GET with settings.presign_expiry_s; failure ->
  ``DeliveryError(code="upload_failed")``. base64 only under settings.max_base64_output_bytes,
  else a ``DeliveryError`` telling the caller to configure a bucket. ``mode="url"`` without a
  bucket -> error. ``"auto"`` is url with a bucket, else base64.
- The whole upload ends within ``settings.upload_timeout_s`` (UPLOAD_TIMEOUT_S) or fails naming
  that setting; a cancelled job (platform cancel, SDK stop) stops it at once: nothing of it keeps
  running after ``deliver`` returns or raises.
- Rights needed: ``PutObject`` (which covers the multipart calls) on the bucket, nothing else.
  The bucket must exist; a missing one is an error naming BUCKET_NAME (no HeadBucket or
  CreateBucket on the job path: a put-only key works, and a typo does not create buckets).

Decisions:
- The bytes go over aiohttp, not boto3: every request is a coroutine, so a cancel or the
  deadline interrupts it mid-transfer (boto3 runs in threads that cannot be interrupted and
  outlive the job). botocore only signs: each request uses a presigned URL
  (``generate_presigned_url``, local computation, no network) for PutObject, or for
  CreateMultipartUpload / UploadPart / CompleteMultipartUpload / AbortMultipartUpload.
- Files up to ``PART_SIZE`` (8 MiB) are one PUT; larger ones are a multipart upload with
  ``UPLOAD_CONCURRENCY`` parts in flight. Bodies are streamed from disk in 1 MiB reads with their
  length declared, so memory stays a few MiB whatever the video size. A failed, timed-out or
  cancelled multipart upload is aborted (best effort, at most ``ABORT_TIMEOUT_S``), so no orphan
  parts stay billed.
- Retries (tenacity): each request is tried ``REQUEST_ATTEMPTS`` times on transient errors
  (connection, timeouts, 5xx, throttling), waiting ``RETRY_BASE_S * 2**n`` between, always inside
  the overall deadline. Permanent errors (bad keys, access denied, missing bucket) fail at once.
- Error texts pass through ``logs.redact``: keys and presigned query strings never leak.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from .errors import DeliveryError
from .logs import redact, register_secret
from .settings import Settings

log = logging.getLogger(__name__)

CONTENT_TYPE = "video/mp4"
PART_SIZE = 8 * 1024 * 1024
UPLOAD_CONCURRENCY = 4
REQUEST_ATTEMPTS = 4
RETRY_BASE_S = 0.5
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # between bytes of an answer; the overall deadline is UPLOAD_TIMEOUT_S
ABORT_TIMEOUT_S = 3.0
READ_CHUNK = 1024 * 1024
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
}
_KEY_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden"}

Mode = Literal["auto", "url", "base64"]

_signers: dict[tuple[str, ...], Any] = {}
_lock = threading.Lock()


async def deliver(
    path: Path, *, job_id: str, mode: Mode = "auto", settings: Settings
) -> dict[str, Any]:
    """Deliver the finished video per ``mode``; raise ``DeliveryError`` on any failure."""
    size = _size(path)
    use_bucket = mode == "url" or (mode == "auto" and settings.bucket_configured)
    if use_bucket and not settings.bucket_configured:
        raise DeliveryError(
            "output 'url' needs a bucket: set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and "
            "BUCKET_SECRET_ACCESS_KEY on the worker.",
            code="bucket_not_configured",
            field="output",
        )
    meta = {"filename": path.name, "content_type": CONTENT_TYPE, "bytes": size}
    if use_bucket:
        return {"url": await upload(path, job_id, settings), **meta}
    return {"base64": await asyncio.to_thread(_encode, path, size, settings), **meta}


def object_key(settings: Settings, job_id: str, filename: str) -> str:
    """``<prefix>/<job_id>/<file>``; the job id is reduced to safe characters."""
    safe_job = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id).strip(".") or "job"
    parts = [settings.bucket_prefix.strip("/"), safe_job, Path(filename).name]
    return "/".join(p for p in parts if p)


async def upload(path: Path, job_id: str, settings: Settings) -> str:
    """Upload ``path`` under its object key within UPLOAD_TIMEOUT_S; return a presigned GET."""
    signer = await asyncio.to_thread(s3_client, settings)
    target = _Target(signer, settings.bucket_name, object_key(settings, job_id, path.name))
    started = time.monotonic()
    deadline = asyncio.timeout(settings.upload_timeout_s)
    try:
        async with deadline:
            size = await _send(path, target)
    except Exception as exc:  # every failure is the job's DeliveryError, explained
        raise _explain(exc, deadline.expired(), settings) from None
    url = target.sign("get_object", expires=settings.presign_expiry_s)
    log.info(
        "uploaded %s (%d bytes) to s3://%s/%s in %.2fs",
        path.name,
        size,
        target.bucket,
        target.key,
        time.monotonic() - started,
    )
    return url


async def _send(path: Path, target: _Target) -> int:
    size = path.stat().st_size
    timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=UPLOAD_CONCURRENCY)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if size <= PART_SIZE:
            await _put_object(session, target, path)
        else:
            await _multipart(session, target, path, size)
    return size


def _explain(exc: Exception, expired: bool, settings: Settings) -> DeliveryError:
    if expired:
        limit = settings.upload_timeout_s
        return _failure(f"the upload did not finish within UPLOAD_TIMEOUT_S ({limit:g} s)", None)
    if isinstance(exc, _S3Error):
        return _failure(exc.explain(settings.bucket_name), exc)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        where = settings.bucket_endpoint_url
        return _failure(f"the bucket endpoint {where} is not reachable", exc)
    return _failure("the upload failed", exc)


def upload_and_presign(path: Path, job_id: str, settings: Settings) -> str:
    """Blocking form of ``upload`` for scripts (bench/); never call it from an event loop."""
    return asyncio.run(upload(path, job_id, settings))


def s3_client(settings: Settings) -> Any:
    """One cached botocore S3 client per endpoint and key, used only to sign URLs."""
    key_id = settings.bucket_access_key_id.get_secret_value()
    secret = settings.bucket_secret_access_key.get_secret_value()
    register_secret(key_id)
    register_secret(secret)
    digest = hashlib.sha256(f"{key_id}\0{secret}".encode()).hexdigest()
    cache_key = (settings.bucket_endpoint_url, digest, settings.bucket_region)
    with _lock:
        client = _signers.get(cache_key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.bucket_endpoint_url,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                region_name=settings.bucket_region,
                config=config,
            )
            _signers[cache_key] = client
    return client


@dataclass(frozen=True)
class _Target:
    signer: Any
    bucket: str
    key: str

    def sign(self, operation: str, expires: int = 3600, **params: Any) -> str:
        return self.signer.generate_presigned_url(
            operation, Params={"Bucket": self.bucket, "Key": self.key, **params}, ExpiresIn=expires
        )


class _S3Error(Exception):
    """An S3 answer other than success: HTTP status, S3 error code, message."""

    def __init__(self, status: int, code: str, message: str, operation: str) -> None:
        super().__init__(f"{operation}: HTTP {status} {code}: {message}".strip())
        self.status, self.code, self.operation = status, code, operation

    @property
    def transient(self) -> bool:
        return self.status >= 500 or self.status == 429 or self.code in _TRANSIENT_CODES

    def explain(self, bucket: str) -> str:
        if self.code == "NoSuchBucket" or (self.status == 404 and self.code in {"", "NotFound"}):
            return (
                f"bucket {bucket!r} does not exist (BUCKET_NAME); create it or set BUCKET_NAME "
                "to an existing bucket (the worker does not create buckets)"
            )
        if self.code in _KEY_CODES or self.status in (401, 403):
            return (
                f"the bucket refused the key ({self.code or self.status}): check "
                f"BUCKET_ACCESS_KEY_ID / BUCKET_SECRET_ACCESS_KEY and that the key may PutObject "
                f"in bucket {bucket!r}"
            )
        return f"upload to bucket {bucket!r} failed"


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    operation: str,
    *,
    data: bytes | _FileRange | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[bytes, Mapping[str, str]]:
    """One S3 call with retries on transient failures; returns (body, headers) or raises."""

    def before_sleep(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s attempt %d/%d failed (%s); retrying in %.1fs",
            operation,
            state.attempt_number,
            REQUEST_ATTEMPTS,
            redact(str(failure)) or type(failure).__name__,
            state.next_action.sleep if state.next_action else 0.0,
        )

    retrying = AsyncRetrying(
        stop=stop_after_attempt(REQUEST_ATTEMPTS),
        wait=wait_exponential(multiplier=RETRY_BASE_S),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await _request_once(session, method, url, operation, data, headers)
    raise AssertionError("unreachable: tenacity re-raises the last failure")


async def _request_once(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    operation: str,
    data: bytes | _FileRange | None,
    headers: dict[str, str] | None,
) -> tuple[bytes, Mapping[str, str]]:
    body_in: Any = data
    if isinstance(data, _FileRange):  # a fresh stream per attempt, its length declared
        body_in = data.stream()
        headers = {**(headers or {}), "Content-Length": str(data.length)}
    async with session.request(method, url, data=body_in, headers=headers) as resp:
        body = await resp.read()
        if resp.status < 300 and b"<Error>" not in body[:512]:
            return body, resp.headers.copy()  # case-insensitive (ETag, Etag)
        raise _s3_error(resp.status, body, operation)


async def _put_object(session: aiohttp.ClientSession, target: _Target, path: Path) -> None:
    data = _FileRange(path, 0, path.stat().st_size)
    url = target.sign("put_object", ContentType=CONTENT_TYPE)
    await _request(
        session, "PUT", url, "PutObject", data=data, headers={"Content-Type": CONTENT_TYPE}
    )


async def _multipart(
    session: aiohttp.ClientSession, target: _Target, path: Path, size: int
) -> None:
    url = target.sign("create_multipart_upload", ContentType=CONTENT_TYPE)
    body, _ = await _request(
        session, "POST", url, "CreateMultipartUpload", headers={"Content-Type": CONTENT_TYPE}
    )
    upload_id = _xml_text(body, "UploadId")
    if not upload_id:
        raise _S3Error(200, "", "no UploadId in the answer", "CreateMultipartUpload")
    try:
        etags = await _upload_parts(session, target, path, size, upload_id)
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
            for n, etag in enumerate(etags, start=1)
        )
        url = target.sign("complete_multipart_upload", UploadId=upload_id)
        xml = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        await _request(session, "POST", url, "CompleteMultipartUpload", data=xml)
    except BaseException:  # failure, deadline or cancel: drop the parts already stored
        await _abort(session, target, upload_id)
        raise


async def _upload_parts(
    session: aiohttp.ClientSession, target: _Target, path: Path, size: int, upload_id: str
) -> list[str]:
    count = -(-size // PART_SIZE)
    etags = [""] * count
    gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

    async def one(index: int) -> None:
        async with gate:
            offset = index * PART_SIZE
            data = _FileRange(path, offset, min(PART_SIZE, size - offset))
            url = target.sign("upload_part", UploadId=upload_id, PartNumber=index + 1)
            _, headers = await _request(session, "PUT", url, "UploadPart", data=data)
            etags[index] = headers.get("ETag", "")

    try:
        async with asyncio.TaskGroup() as group:  # the first failure cancels the other parts
            for index in range(count):
                group.create_task(one(index))
    except BaseExceptionGroup as failed:  # report the first part's failure as it is
        raise failed.exceptions[0] from None
    return etags


async def _abort(session: aiohttp.ClientSession, target: _Target, upload_id: str) -> None:
    """Best effort, bounded: a cancel must not wait for an unreachable endpoint."""
    url = target.sign("abort_multipart_upload", UploadId=upload_id)
    try:
        async with asyncio.timeout(ABORT_TIMEOUT_S):
            async with session.delete(url) as resp:
                await resp.read()
    except (Exception, asyncio.CancelledError) as exc:  # best effort: log, never raise
        log.warning(
            "could not abort the multipart upload: %s", redact(str(exc)) or type(exc).__name__
        )


@dataclass(frozen=True)
class _FileRange:
    """``length`` bytes of ``path`` from ``offset``, streamed in ``READ_CHUNK`` pieces: memory
    per request in flight stays about one chunk plus the socket buffer, whatever the part size."""

    path: Path
    offset: int
    length: int

    async def stream(self) -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(self.path.open, "rb")
        try:
            await asyncio.to_thread(fh.seek, self.offset)
            left = self.length
            while left > 0:
                chunk = await asyncio.to_thread(fh.read, min(READ_CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.path.name} shrank while it was uploaded")
                left -= len(chunk)
                yield chunk
        finally:
            fh.close()


def _xml_text(body: bytes, tag: str) -> str:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return ""
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == tag:
            return (element.text or "").strip()
    return ""


def _s3_error(status: int, body: bytes, operation: str) -> _S3Error:
    code = _xml_text(body, "Code")
    message = _xml_text(body, "Message") or body[:200].decode("utf-8", "replace").strip()
    return _S3Error(status, code, message, operation)


def is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts, throttling and 5xx are worth another try."""
    if isinstance(exc, _S3Error):
        return exc.transient
    return isinstance(exc, (aiohttp.ClientError, TimeoutError, OSError))


def _failure(what: str, exc: BaseException | None) -> DeliveryError:
    detail = (redact(str(exc)) or type(exc).__name__) if exc is not None else ""
    text = f"{what} ({detail})" if detail else what
    log.error("delivery failed: %s", text)
    return DeliveryError(f"The result video could not be delivered: {text}.", code="upload_failed")


def _size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except OSError:
        raise DeliveryError(
            f"The result video {path.name} is missing; ComfyUI reported it but it cannot be read.",
            code="output_missing",
        ) from None
    if size == 0:
        raise DeliveryError(
            f"The result video {path.name} is empty; ComfyUI wrote no data.", code="output_missing"
        )
    return size


def _encode(path: Path, size: int, settings: Settings) -> str:
    cap = settings.max_base64_output_bytes
    if size > cap:
        raise DeliveryError(
            f"The result video is {size} bytes, over the {cap}-byte limit for inline base64 "
            "output (RunPod refuses results over 10 MB); configure a bucket "
            "(BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY) to get a URL, "
            "or ask for fewer frames or a smaller size.",
            code="output_too_large",
            field="output",
        )
    return base64.b64encode(path.read_bytes()).decode("ascii")
