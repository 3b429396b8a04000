"""The S3 test server (tests/plugins/s3.py) stops at once: every run that uses S3 pays its stop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.plugins.s3 import start_server, stop_server

pytestmark = pytest.mark.slow


def test_s3_server_stops_in_well_under_a_second(tmp_path: Path) -> None:
    server, proc = start_server(tmp_path / "s3")
    server.client().list_buckets()
    started = time.monotonic()
    stop_server(proc)
    took = time.monotonic() - started
    assert proc.returncode is not None
    # SIGTERM used to wait out a 10 s grace period; the kill takes milliseconds even under load.
    assert took < 2.0, f"stopping the S3 server took {took:.1f} s"
