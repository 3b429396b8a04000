"""Delivery: real S3 (SeaweedFS) upload + presigned GET, base64 cap, loud failures."""

from __future__ import annotations

import base64
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
from botocore.exceptions import ClientError, EndpointConnectionError

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


async def test_unreachable_endpoint_is_a_clear_upload_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "REQUEST_ATTEMPTS", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "BUCKET_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "BUCKET_ACCESS_KEY_ID": "AKIDUNREACHABLE",
        "BUCKET_SECRET_ACCESS_KEY": "s3cr3t-unreachable",
    }
    with pytest.raises(DeliveryError) as info:
        await delivery.deliver(
            _video(tmp_path, 100), job_id="j4", mode="auto", settings=Settings.from_env(env)
        )
    assert info.value.code == "upload_failed"
    assert "not reachable" in info.value.message
    assert "s3cr3t-unreachable" not in info.value.message


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
    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "PutObject")

    assert delivery.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert delivery.is_transient(client_error("SlowDown"))
    assert delivery.is_transient(client_error("503"))
    assert not delivery.is_transient(client_error("AccessDenied"))
    assert not delivery.is_transient(client_error("InvalidAccessKeyId"))
    try:
        try:
            raise client_error("InternalError")
        except ClientError as inner:
            raise RuntimeError("Failed to upload") from inner
    except RuntimeError as wrapped:
        assert delivery.is_transient(wrapped)


class _FlakyProxy(BaseHTTPRequestHandler):
    """Forwards to the real S3 gateway, but answers 503 to the first ``failures`` PUTs."""

    target = ""
    failures = 0
    puts: ClassVar[list[int]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.command == "PUT":
            type(self).puts.append(len(type(self).puts))
            if len(type(self).puts) <= type(self).failures:
                self.send_response(503)
                payload = b"<Error><Code>ServiceUnavailable</Code><Message>busy</Message></Error>"
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
        headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
        resp = requests.request(
            self.command, self.target + self.path, headers=headers, data=body, timeout=30
        )
        self.send_response(resp.status_code)
        for key, value in resp.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.mark.slow
async def test_transient_503_is_retried_then_succeeds(
    tmp_path: Path, s3_env: dict[str, str], s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "REQUEST_ATTEMPTS", 1)  # only our own retry loop
    monkeypatch.setattr(delivery, "RETRY_BASE_S", 0.01)
    s3_server.client().create_bucket(Bucket=s3_env["BUCKET_NAME"])  # PUTs below: the object's
    _FlakyProxy.target = s3_env["BUCKET_ENDPOINT_URL"]
    _FlakyProxy.failures, _FlakyProxy.puts = 2, []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{proxy.server_address[1]}"
        settings = Settings.from_env({**s3_env, "BUCKET_ENDPOINT_URL": f"http://{host}"})
        video = _video(tmp_path, 3000)
        out = await delivery.deliver(video, job_id="flaky", mode="url", settings=settings)
        assert len(_FlakyProxy.puts) == 3  # two refused, the third went through
        got = requests.get(out["url"], timeout=30)
        assert got.status_code == 200 and got.content == video.read_bytes()

        _FlakyProxy.failures, _FlakyProxy.puts = 99, []
        with pytest.raises(DeliveryError) as info:
            await delivery.deliver(video, job_id="flaky2", mode="url", settings=settings)
        assert info.value.code == "upload_failed"
        assert len(_FlakyProxy.puts) == delivery.UPLOAD_ATTEMPTS
    finally:
        proxy.shutdown()
        proxy.server_close()
