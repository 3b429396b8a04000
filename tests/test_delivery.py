"""Delivery: real S3 (SeaweedFS) upload + presigned GET, base64 cap, loud failures; a put-only
key, a missing bucket, S3 down before and during the upload, the deadline and a cancel."""

from __future__ import annotations

import asyncio
import base64
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
import requests
from botocore.exceptions import ClientError

from xicon_dance import delivery
from xicon_dance.errors import DeliveryError
from xicon_dance.settings import Settings


def _video(tmp_path: Path, size: int, name: str = "xicon_dance_00001.mp4") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.slow
async def test_upload_then_presigned_get_returns_bytes_and_type(
    tmp_path: Path, s3_env: dict[str, str]
) -> None:
    settings = Settings.from_env({**s3_env, "BUCKET_PREFIX": "results"})
    video = _video(tmp_path, 20 * 1024 * 1024 + 123)  # > part size: multipart
    out = await delivery.deliver(video, job_id="job/1 x", mode="auto", settings=settings)
    assert set(out) == {"url", "filename", "content_type", "bytes"}
    assert out["bytes"] == video.stat().st_size and out["content_type"] == "video/mp4"
    assert f"/{s3_env['BUCKET_NAME']}/results/job_1_x/xicon_dance_00001.mp4?" in out["url"]
    got = requests.get(out["url"], timeout=30)
    assert got.status_code == 200
    assert got.headers["Content-Type"] == "video/mp4"
    assert got.content == video.read_bytes()
    anonymous = requests.get(out["url"].split("?")[0], timeout=30)
    assert anonymous.status_code in (401, 403)
    assert anonymous.content != video.read_bytes()


@pytest.mark.slow
async def test_small_upload_single_part(tmp_path: Path, s3_env: dict[str, str]) -> None:
    settings = Settings.from_env(s3_env)
    video = _video(tmp_path, 1000)
    out = await delivery.deliver(video, job_id="j2", mode="url", settings=settings)
    got = requests.get(out["url"], timeout=30)
    assert got.content == video.read_bytes()


@pytest.mark.slow
async def test_bad_secret_fails_loudly_without_leaking(
    tmp_path: Path, s3_env: dict[str, str]
) -> None:
    env = {**s3_env, "BUCKET_SECRET_ACCESS_KEY": "wrong-secret-value-123"}
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(
            _video(tmp_path, 100), job_id="j3", mode="url", settings=Settings.from_env(env)
        )
    assert info.value.code == "upload_failed"
    assert "wrong-secret-value-123" not in info.value.message
    assert env["BUCKET_ACCESS_KEY_ID"] not in info.value.message


async def test_base64_under_cap_round_trips(tmp_path: Path) -> None:
    video = _video(tmp_path, 5000)
    out = await delivery.deliver(video, job_id="j", mode="auto", settings=Settings.from_env({}))
    assert base64.b64decode(out["base64"]) == video.read_bytes()
    assert out["bytes"] == 5000 and out["filename"] == video.name


async def test_base64_over_cap_says_configure_a_bucket(tmp_path: Path) -> None:
    settings = Settings.from_env({"MAX_BASE64_OUTPUT_BYTES": "1000"})
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(_video(tmp_path, 1001), job_id="j", mode="base64", settings=settings)
    assert info.value.code == "output_too_large"
    assert "BUCKET_ENDPOINT_URL" in info.value.message and "1001" in info.value.message


async def test_url_mode_without_bucket_and_missing_file(tmp_path: Path) -> None:
    settings = Settings.from_env({})
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(_video(tmp_path, 10), job_id="j", mode="url", settings=settings)
    assert info.value.code == "bucket_not_configured"
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(tmp_path / "nope.mp4", job_id="j", mode="auto", settings=settings)
    assert info.value.code == "output_missing"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DeliveryError, match="empty"):
        await delivery.deliver(empty, job_id="j", mode="auto", settings=settings)


def test_object_key_layout() -> None:
    settings = Settings.from_env({"BUCKET_PREFIX": "/out/"})
    assert delivery.object_key(settings, "abc-1", "v.mp4") == "out/abc-1/v.mp4"
    assert delivery.object_key(settings, "../x", "../../v.mp4") == "out/_x/v.mp4"
    assert delivery.object_key(Settings.from_env({"BUCKET_PREFIX": "/"}), "a", "v.mp4") == "a/v.mp4"


def test_transient_classification() -> None:
    def s3_error(status: int, code: str) -> Exception:
        return delivery._S3Error(status, code, "m", "PutObject")

    assert delivery.is_transient(aiohttp.ClientConnectionError("refused"))
    assert delivery.is_transient(TimeoutError())
    assert delivery.is_transient(s3_error(503, "SlowDown"))
    assert delivery.is_transient(s3_error(500, "InternalError"))
    assert delivery.is_transient(s3_error(400, "RequestTimeout"))
    assert not delivery.is_transient(s3_error(403, "AccessDenied"))
    assert not delivery.is_transient(s3_error(403, "InvalidAccessKeyId"))
    assert not delivery.is_transient(s3_error(404, "NoSuchBucket"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_s3_down_before_upload_is_a_clear_upload_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "RETRY_BASE_S", 0.01)
    env = {
        "BUCKET_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "BUCKET_ACCESS_KEY_ID": "AKIDUNREACHABLE",
        "BUCKET_SECRET_ACCESS_KEY": "s3cr3t-unreachable",
    }
    started = time.monotonic()
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(
            _video(tmp_path, 100), job_id="j4", mode="auto", settings=Settings.from_env(env)
        )
    assert time.monotonic() - started < 5
    assert info.value.code == "upload_failed"
    assert (
        "not reachable" in info.value.message and env["BUCKET_ENDPOINT_URL"] in info.value.message
    )
    assert "s3cr3t-unreachable" not in info.value.message


# ------------------------------------------------------------------ least privilege


@pytest.mark.slow
@pytest.mark.parametrize("size", [1000, 17 * 1024 * 1024], ids=["single-put", "multipart"])
async def test_put_only_key_delivers(
    tmp_path: Path, s3_env: dict[str, str], s3_server: Any, size: int
) -> None:
    """A key that may only write objects (no HeadBucket, CreateBucket, reads) is enough."""
    env = {
        **s3_env,
        "BUCKET_ACCESS_KEY_ID": s3_server.put_only_key,
        "BUCKET_SECRET_ACCESS_KEY": s3_server.put_only_secret,
    }
    put_only = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.put_only_key,
        aws_secret_access_key=s3_server.put_only_secret,
        region_name=s3_server.region,
    )
    with pytest.raises(ClientError):  # the calls the old delivery made first are refused
        put_only.head_bucket(Bucket=s3_env["BUCKET_NAME"])
    video = _video(tmp_path, size)
    out = await delivery.deliver(
        video, job_id="put-only", mode="url", settings=Settings.from_env(env)
    )
    key = out["url"].split("?")[0].split(f"/{s3_env['BUCKET_NAME']}/", 1)[1]
    stored = s3_server.client().get_object(Bucket=s3_env["BUCKET_NAME"], Key=key)
    assert stored["Body"].read() == video.read_bytes()
    assert stored["ContentType"] == "video/mp4"


# ------------------------------------------------------------------ S3 faults through a proxy


class _Proxy:
    """A proxy in front of the real S3 gateway that can misbehave per request:
    ``fail_puts`` answers 503 to that many PUTs; ``stall`` (a predicate on method and path)
    holds a request without answering until the client hangs up or ``release`` is set;
    ``down_after`` closes every connection without answering once that many requests passed;
    ``answer`` (method, path) -> (status, body) replies in the gateway's place."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.fail_puts = 0
        self.down_after: int | None = None
        self.stall: Callable[[str, str], bool] = lambda method, path: False
        self.answer: Callable[[str, str], tuple[int, bytes] | None] = lambda method, path: None
        self.requests: list[tuple[str, str]] = []
        self.stalled = threading.Event()
        self.hung_up: list[float] = []
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.requests.append((self.command, self.path))
                if proxy.down_after is not None and len(proxy.requests) > proxy.down_after:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                canned = proxy.answer(self.command, self.path)
                if canned is not None:
                    self._reply(canned[0], canned[1], {"Content-Type": "application/xml"})
                    return
                if proxy.stall(self.command, self.path):
                    proxy.stalled.set()
                    self._hold()
                    return
                if self.command == "PUT" and proxy.fail_puts > 0:
                    proxy.fail_puts -= 1
                    self._reply(503, b"<Error><Code>ServiceUnavailable</Code></Error>", {})
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
                resp = requests.request(
                    self.command, proxy.target + self.path, headers=headers, data=body, timeout=30
                )
                skip = ("content-length", "transfer-encoding", "connection")
                kept = {k: v for k, v in resp.headers.items() if k.lower() not in skip}
                self._reply(resp.status_code, resp.content, kept)

            def _reply(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _hold(self) -> None:
                """Wait without answering; note when the client closes its end."""
                deadline = time.monotonic() + 30
                while not proxy.release.is_set() and time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0.02)
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):
                        proxy.hung_up.append(time.monotonic())
                        break
                self.close_connection = True

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_proxy(s3_env: dict[str, str]) -> Iterator[_Proxy]:
    proxy = _Proxy(s3_env["BUCKET_ENDPOINT_URL"])
    try:
        yield proxy
    finally:
        proxy.close()


def _part_put(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path


@pytest.mark.slow
async def test_transient_503_is_retried_then_succeeds(
    tmp_path: Path, s3_env: dict[str, str], s3_proxy: _Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "RETRY_BASE_S", 0.01)
    settings = Settings.from_env({**s3_env, "BUCKET_ENDPOINT_URL": s3_proxy.url})
    video = _video(tmp_path, 3000)
    s3_proxy.fail_puts = 2
    out = await delivery.deliver(video, job_id="flaky", mode="url", settings=settings)
    assert [m for m, _ in s3_proxy.requests] == ["PUT"] * 3  # two refused, the third stored
    got = requests.get(out["url"], timeout=30)  # through the proxy: the host is signed
    assert got.status_code == 200 and got.content == video.read_bytes()

    s3_proxy.fail_puts, s3_proxy.requests = 99, []
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(video, job_id="flaky2", mode="url", settings=settings)
    assert info.value.code == "upload_failed" and "ServiceUnavailable" in info.value.message
    assert len(s3_proxy.requests) == delivery.REQUEST_ATTEMPTS


@pytest.mark.slow
async def test_s3_down_during_multipart_upload_fails_in_bounded_time(
    tmp_path: Path, s3_env: dict[str, str], s3_proxy: _Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "RETRY_BASE_S", 0.01)
    settings = Settings.from_env({**s3_env, "BUCKET_ENDPOINT_URL": s3_proxy.url})
    s3_proxy.down_after = 2  # CreateMultipartUpload and one part pass, then the gateway is gone
    started = time.monotonic()
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(
            _video(tmp_path, 20 * 1024 * 1024), job_id="down", mode="url", settings=settings
        )
    took = time.monotonic() - started
    print(f"S3 down mid-upload: upload_failed after {took:.2f} s")
    assert info.value.code == "upload_failed" and "not reachable" in info.value.message
    assert took < delivery.ABORT_TIMEOUT_S + 5, took
    assert s3_env["BUCKET_SECRET_ACCESS_KEY"] not in info.value.message


@pytest.mark.slow
async def test_deadline_bounds_a_stalled_upload(
    tmp_path: Path, s3_env: dict[str, str], s3_proxy: _Proxy, s3_server: Any
) -> None:
    env = {**s3_env, "BUCKET_ENDPOINT_URL": s3_proxy.url, "UPLOAD_TIMEOUT_S": "1.5"}
    s3_proxy.stall = _part_put  # the gateway accepts the parts and never answers
    started = time.monotonic()
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(
            _video(tmp_path, 9 * 1024 * 1024),
            job_id="slow",
            mode="url",
            settings=Settings.from_env(env),
        )
    took = time.monotonic() - started
    assert "did not finish within UPLOAD_TIMEOUT_S (1.5 s)" in info.value.message
    print(f"stalled upload failed after {took:.2f} s (UPLOAD_TIMEOUT_S 1.5)")
    assert 1.5 <= took < 1.5 + delivery.ABORT_TIMEOUT_S + 1, took
    assert s3_proxy.hung_up, "the stalled request must be dropped, not left running"
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_env["BUCKET_NAME"])
    assert not uploads.get("Uploads"), "the multipart upload must be aborted"


@pytest.mark.slow
async def test_cancel_stops_the_upload_at_once(
    tmp_path: Path, s3_env: dict[str, str], s3_proxy: _Proxy, s3_server: Any
) -> None:
    """A cancelled job (platform cancel, SDK stop) ends its upload now: the in-flight request is
    dropped, the multipart upload aborted, and nothing keeps running afterwards."""
    settings = Settings.from_env({**s3_env, "BUCKET_ENDPOINT_URL": s3_proxy.url})
    s3_proxy.stall = _part_put
    threads_before = {t.ident for t in threading.enumerate()}
    task = asyncio.create_task(
        delivery.deliver(
            _video(tmp_path, 9 * 1024 * 1024), job_id="cancel", mode="url", settings=settings
        )
    )
    assert await asyncio.to_thread(s3_proxy.stalled.wait, 20)
    cancelled = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    took = time.monotonic() - cancelled
    print(f"cancel answered in {took:.3f} s")
    # Not the stalled request's 30 s: at most the bounded abort of the multipart upload.
    assert took < delivery.ABORT_TIMEOUT_S + 1, f"cancel took {took:.2f} s"
    deadline = time.monotonic() + 2
    while not s3_proxy.hung_up and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert s3_proxy.hung_up and s3_proxy.hung_up[0] - cancelled < 2.0
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_env["BUCKET_NAME"])
    assert not uploads.get("Uploads"), "the multipart upload must be aborted"
    assert "DELETE" in {m for m, _ in s3_proxy.requests}, s3_proxy.requests
    others = [t for t in threading.enumerate() if t.ident not in threads_before]
    assert all(t.name.startswith("asyncio_") for t in others), others  # only the idle executor


_NO_SUCH_BUCKET = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchBucket</Code>'
    b"<Message>The specified bucket does not exist</Message><BucketName>gone</BucketName>"
    b"<RequestId>R1</RequestId><HostId>H1</HostId></Error>"
)


@pytest.mark.slow
async def test_missing_bucket_is_named(
    tmp_path: Path, s3_env: dict[str, str], s3_proxy: _Proxy
) -> None:
    """A missing bucket is an error naming BUCKET_NAME, for a single PUT and a multipart upload.
    SeaweedFS creates a missing bucket on an admin key's PutObject (and refuses a put-only key
    with AccessDenied), so the proxy answers as AWS S3 and R2 do: 404 NoSuchBucket."""
    settings = Settings.from_env({**s3_env, "BUCKET_ENDPOINT_URL": s3_proxy.url})
    s3_proxy.answer = lambda method, path: (404, _NO_SUCH_BUCKET)
    for size in (100, 9 * 1024 * 1024):
        with pytest.raises(DeliveryError) as info:
            await delivery.deliver(
                _video(tmp_path, size), job_id="nb", mode="url", settings=settings
            )
        bucket = s3_env["BUCKET_NAME"]
        assert f"bucket {bucket!r} does not exist (BUCKET_NAME)" in info.value.message
    assert {m for m, _ in s3_proxy.requests} == {"PUT", "POST"}  # no HEAD, no bucket creation


@pytest.mark.slow
async def test_put_only_key_on_a_missing_bucket_says_what_to_check(
    tmp_path: Path, s3_env: dict[str, str], s3_server: Any
) -> None:
    env = {
        **s3_env,
        "BUCKET_NAME": "missing-" + s3_env["BUCKET_NAME"],
        "BUCKET_ACCESS_KEY_ID": s3_server.put_only_key,
        "BUCKET_SECRET_ACCESS_KEY": s3_server.put_only_secret,
    }
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(
            _video(tmp_path, 100), job_id="pm", mode="url", settings=Settings.from_env(env)
        )
    message = info.value.message
    assert "refused the key (AccessDenied)" in message and env["BUCKET_NAME"] in message
    assert "PutObject" in message and s3_server.put_only_secret not in message
