"""Result delivery: bucket upload with a presigned URL, or inline base64.

Contract:
- ``await deliver(path: Path, *, job_id: str, mode: "auto"|"url"|"base64", settings) -> dict``
  returning ``{"url"|"base64": ..., "filename", "content_type": "video/mp4", "bytes"}``.
  Bucket (when BUCKET_ENDPOINT_URL + keys are set): multipart upload, ContentType video/mp4, key
  ``<prefix>/<job_id>/<file>.mp4``, presigned GET with settings.presign_expiry_s, retries on
  transient errors; failure -> ``DeliveryError``. base64 only under
  settings.max_base64_output_bytes, else a ``DeliveryError`` telling the caller to configure a
  bucket. ``mode="url"`` without a bucket -> error. ``"auto"`` is url with a bucket, else base64.

Decisions:
- boto3 is blocking: every S3 call runs in a worker thread (``asyncio.to_thread``); the event loop
  stays free for ComfyUI's socket and RunPod's job-stop channel.
- ``upload_file`` with a ``TransferConfig`` (8 MiB parts, 4 threads, small IO queue) streams the
  file from disk: memory stays bounded (about parts x threads) whatever the video size.
- Retries: botocore's "standard" mode retries throttling/5xx/connection errors per request; on top,
  a failed transfer caused by a transient error (connection, timeout, 5xx, throttling) is retried
  as a whole ``UPLOAD_ATTEMPTS`` times with backoff. Permanent errors (bad keys, access denied)
  fail at once. Every failure becomes ``DeliveryError(code="upload_failed")``; nothing falls back
  to a local path silently (the SDK's ``rp_upload`` does, see ../shared/reference/runpod.md §2.6).
- The bucket is created when it does not exist (once per process; checked with ``head_bucket``):
  a fresh endpoint works out of the box, and a key without CreateBucket rights gets a clear error
  naming the bucket.
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
from pathlib import Path
from typing import Any, Literal

from .errors import DeliveryError
from .logs import redact, register_secret
from .settings import Settings

log = logging.getLogger(__name__)

CONTENT_TYPE = "video/mp4"
PART_SIZE = 8 * 1024 * 1024
UPLOAD_THREADS = 4
UPLOAD_ATTEMPTS = 3
RETRY_BASE_S = 0.5
REQUEST_ATTEMPTS = 5  # botocore "standard" mode: attempts per request, the first included
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}

Mode = Literal["auto", "url", "base64"]

_clients: dict[tuple[str, ...], Any] = {}
_ready_buckets: set[tuple[str, str, int]] = set()
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
        url = await asyncio.to_thread(upload_and_presign, path, job_id, settings)
        return {"url": url, **meta}
    return {"base64": await asyncio.to_thread(_encode, path, size, settings), **meta}


def object_key(settings: Settings, job_id: str, filename: str) -> str:
    """``<prefix>/<job_id>/<file>``; the job id is reduced to safe characters."""
    safe_job = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id).strip(".") or "job"
    parts = [settings.bucket_prefix.strip("/"), safe_job, Path(filename).name]
    return "/".join(p for p in parts if p)


def upload_and_presign(path: Path, job_id: str, settings: Settings) -> str:
    """Blocking: upload ``path`` (multipart, video/mp4) and return a presigned GET URL."""
    client = s3_client(settings)
    key = object_key(settings, job_id, path.name)
    started = time.monotonic()
    _ensure_bucket(client, settings)
    _upload_with_retries(client, path, settings.bucket_name, key)
    try:
        url = client.generate_presigned_url(
            "get_object",
            Params={"Bucket": settings.bucket_name, "Key": key},
            ExpiresIn=settings.presign_expiry_s,
        )
    except Exception as exc:
        raise _failure("could not sign the download URL", exc) from None
    log.info(
        "uploaded %s (%d bytes) to s3://%s/%s in %.2fs",
        path.name,
        path.stat().st_size,
        settings.bucket_name,
        key,
        time.monotonic() - started,
    )
    return url


def s3_client(settings: Settings) -> Any:
    """One cached boto3 S3 client per endpoint and key (client creation costs ~0.1 s)."""
    key_id = settings.bucket_access_key_id.get_secret_value()
    secret = settings.bucket_secret_access_key.get_secret_value()
    register_secret(key_id)
    register_secret(secret)
    digest = hashlib.sha256(f"{key_id}\0{secret}".encode()).hexdigest()
    cache_key = (settings.bucket_endpoint_url, digest, settings.bucket_region)
    with _lock:
        client = _clients.get(cache_key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": REQUEST_ATTEMPTS, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=UPLOAD_THREADS * 2,
            )
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.bucket_endpoint_url,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                region_name=settings.bucket_region,
                config=config,
            )
            _clients[cache_key] = client
    return client


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=PART_SIZE,
        multipart_chunksize=PART_SIZE,
        max_concurrency=UPLOAD_THREADS,
        max_io_queue=4,
        io_chunksize=256 * 1024,
        use_threads=True,
    )


def _ensure_bucket(client: Any, settings: Settings) -> None:
    from botocore.exceptions import ClientError

    marker = (settings.bucket_endpoint_url, settings.bucket_name, id(client))
    if marker in _ready_buckets:
        return
    try:
        client.head_bucket(Bucket=settings.bucket_name)
    except ClientError as exc:
        if _error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
            raise _failure(f"bucket {settings.bucket_name!r} is not accessible", exc) from None
        try:
            client.create_bucket(Bucket=settings.bucket_name)
            log.info("created bucket %s", settings.bucket_name)
        except ClientError as create_exc:
            if _error_code(create_exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise _failure(
                    f"bucket {settings.bucket_name!r} does not exist and could not be created",
                    create_exc,
                ) from None
    except Exception as exc:
        raise _failure(f"bucket {settings.bucket_name!r} is not reachable", exc) from None
    _ready_buckets.add(marker)


def _upload_with_retries(client: Any, path: Path, bucket: str, key: str) -> None:
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            client.upload_file(
                str(path),
                bucket,
                key,
                ExtraArgs={"ContentType": CONTENT_TYPE},
                Config=_transfer_config(),
            )
            return
        except Exception as exc:
            if attempt == UPLOAD_ATTEMPTS or not is_transient(exc):
                raise _failure(f"upload to bucket {bucket!r} failed", exc) from None
            delay = RETRY_BASE_S * 2 ** (attempt - 1)
            log.warning(
                "upload attempt %d/%d failed (%s); retrying in %.1fs",
                attempt,
                UPLOAD_ATTEMPTS,
                redact(str(exc)),
                delay,
            )
            time.sleep(delay)


def is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts, throttling and 5xx are worth another try."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, HTTPClientError, TimeoutError, OSError)):
            return True
        if isinstance(current, ClientError):
            return _error_code(current) in _TRANSIENT_CODES
        current = current.__cause__ or current.__context__
    text = str(exc)
    return any(code in text for code in ("(500)", "(502)", "(503)", "(504)", "SlowDown"))


def _error_code(exc: Any) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _failure(what: str, exc: BaseException) -> DeliveryError:
    detail = redact(str(exc)) or type(exc).__name__
    log.error("delivery failed: %s: %s", what, detail)
    return DeliveryError(
        f"The result video could not be delivered: {what} ({detail}).", code="upload_failed"
    )


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
