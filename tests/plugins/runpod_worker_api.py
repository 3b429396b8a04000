"""A stand-in for RunPod's worker-side API, as runpod 1.12.0 calls it from its production job loop.

RunPod's platform cannot run here, so this real HTTP server on 127.0.0.1 answers the three calls the
SDK makes when ``RUNPOD_WEBHOOK_GET_JOB`` is set (``runpod/serverless/modules/rp_job.py``,
``rp_http.py``, ``rp_scale.py``):

- ``GET /job-take/<worker>`` -> ``200`` with ``{"id", "input"}``, or ``204`` when the queue is
  empty (held open briefly, like the platform's long poll);
- ``GET /job-stop/<worker>`` -> ``200 {"jobsToStop": [ids]}`` (a cancel from the platform), or
  ``204``;
- ``POST /job-done/<worker>/<job id>`` -> every body is kept: ``IN_PROGRESS`` ones (progress
  updates) in ``progress``, the final one in ``results[job_id]``.

``serve_platform()`` runs it for a ``with`` block; ``platform`` is the same as a fixture.
``FakePlatform.env()`` gives the environment that points the SDK at it.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

HOLD_S = 0.3  # how long an empty job-take / job-stop poll is held open


@dataclass
class FakePlatform:
    """Jobs to hand out, stops to send, and everything the worker posted."""

    worker_id: str = "test-worker"
    queue: list[dict[str, Any]] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def add(self, job_id: str, job_input: dict[str, Any]) -> None:
        with self.lock:
            self.queue.append({"id": job_id, "input": job_input})

    def stop(self, job_id: str) -> None:
        """Cancel ``job_id`` from the platform (the SDK's job-stop channel)."""
        with self.lock:
            self.stops.append(job_id)

    def take(self) -> dict[str, Any] | None:
        with self.lock:
            if not self.queue:
                return None
            job = self.queue.pop(0)
            self.taken.append(job["id"])
            return job

    def take_stops(self) -> list[str]:
        with self.lock:
            ids, self.stops[:] = list(self.stops), []
            return ids

    def wait_result(self, job_id: str, proc: subprocess.Popen, timeout: float = 60) -> dict:
        """The final answer for ``job_id``; fails at once if the worker process exits first."""
        deadline = time.monotonic() + timeout
        while job_id not in self.results:
            assert proc.poll() is None, f"the worker exited (rc {proc.returncode}) before {job_id}"
            assert time.monotonic() < deadline, f"no result for {job_id} in {timeout} s"
            time.sleep(0.05)
        return self.results[job_id]

    def env(self) -> dict[str, str]:
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.url}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.url}/job-done/{self.worker_id}/$ID?gpu=test",
            "RUNPOD_POD_ID": self.worker_id,
            # The SDK's network fitness check dials 8.8.8.8:53 and exits the worker when it
            # cannot; entrypoint.sh exports this too.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "SERVE_API_LOCALLY": "0",
        }


def _handler_class(platform: FakePlatform) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self, status: int, body: Any = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _hold(self, ready: Callable[[], Any]) -> Any:  # a short long-poll
            deadline = time.monotonic() + HOLD_S
            while not (found := ready()) and time.monotonic() < deadline:
                time.sleep(0.02)
            return found

        def do_GET(self) -> None:
            if self.path.startswith("/job-take/"):
                job = self._hold(platform.take)
                self._answer(200, job) if job else self._answer(204)
            elif self.path.startswith("/job-stop/"):
                ids = self._hold(platform.take_stops)
                self._answer(200, {"jobsToStop": ids}) if ids else self._answer(204)
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            match = re.match(r"/job-done/[^/]+/([^?]+)", self.path)
            if not match:
                self._answer(404, {"error": "not found"})
                return
            body = json.loads(raw)
            with platform.lock:
                if body.get("status") == "IN_PROGRESS":
                    platform.progress.append(body)
                else:
                    platform.results[match.group(1)] = body
            self._answer(200, {})

    return Handler


@contextlib.contextmanager
def serve_platform(worker_id: str = "test-worker") -> Iterator[FakePlatform]:
    fake = FakePlatform(worker_id=worker_id)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def platform() -> Iterator[FakePlatform]:
    with serve_platform() as fake:
        yield fake
