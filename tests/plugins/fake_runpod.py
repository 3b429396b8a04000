"""pytest plugin: ``fake_runpod``, a real HTTP server on 127.0.0.1 that answers like RunPod.

It implements the serverless REST operations as documented at
https://docs.runpod.io/serverless/endpoints/operation-reference and the job states of
https://docs.runpod.io/serverless/endpoints/job-states (summarised in
``../shared/reference/runpod.md`` §8.1):

- ``POST /run`` with ``{"input": {...}}`` -> ``{"id", "status": "IN_QUEUE"}``;
- ``GET /status/{id}`` -> ``{"id", "status", "delayTime", "executionTime", "output"?, "error"?}``;
  while IN_PROGRESS ``output`` is the worker's latest progress update;
- ``POST /cancel/{id}`` -> ``{"id", "status": "CANCELLED"}``; later polls say CANCELLED;
- ``authorization: <api key>`` is required (``Bearer <key>`` is accepted too), else HTTP 401.

Each job follows a scripted lifecycle: ``queue_job(states)`` sets the ``/status`` answers of the
next submitted job, one per poll, the last repeating. ``fail_next(prefix, status, times)``
answers the next requests whose path starts with ``prefix`` with an HTTP error (429, 5xx).
``serve_file(name, data)`` serves bytes at ``/files/<name>`` (a stand-in for a presigned URL).

``local=True`` (``fake_runpod_local``) mimics the SDK's ``--rp_serve_api`` server instead
(``../shared/reference/runpod.md`` §3.2): ``POST /run`` only stores the job and returns
IN_PROGRESS, ``GET /status`` is 405, ``POST /status/{id}`` returns the final state, and
``POST /runsync`` returns the final state at once; there is no ``/cancel``.

The server runs on its own event loop in a thread, so tests may call synchronous code
(``main()``, subprocesses) against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

API_KEY = "rp-test-key-0123456789"


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class _Job:
    states: list[dict[str, Any]]
    polls: int = 0
    cancelled: bool = False


@dataclass
class FakeRunpod:
    """State of one fake endpoint; read ``requests`` to see what the client sent."""

    local: bool = False
    api_key: str | None = API_KEY
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    jobs: dict[str, _Job] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    _scripts: list[list[dict[str, Any]]] = field(default_factory=list)
    _failures: list[tuple[str, int, str | None]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ scripting API

    def queue_job(self, states: list[dict[str, Any]]) -> None:
        """``/status`` answers (without ``id``) of the next job, one per poll; last repeats."""
        with self._lock:
            self._scripts.append([dict(s) for s in states])

    def fail_next(
        self, prefix: str, status: int, times: int = 1, retry_after: str | None = None
    ) -> None:
        with self._lock:
            self._failures.extend([(prefix, status, retry_after)] * times)

    def serve_file(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.url}/files/{name}"

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout} s; requests: {self.paths()}")
            time.sleep(0.02)

    # ------------------------------------------------------------------ server

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/run", self._run)
        app.router.add_post("/runsync", self._runsync)
        app.router.add_get("/status/{id}", self._status_get)
        app.router.add_post("/status/{id}", self._status_post)
        if not self.local:
            app.router.add_post("/cancel/{id}", self._cancel)
        app.router.add_get("/files/{name}", self._file)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        auth = request.headers.get("authorization")
        self.requests.append(Request(request.method, request.path, auth, body))
        failure = self._take_failure(request.path)
        if failure is not None:
            status, retry_after = failure
            headers = {"Retry-After": retry_after} if retry_after else {}
            return web.json_response({"error": "try again"}, status=status, headers=headers)
        needs_key = not request.path.startswith("/files/") and not self.local
        if needs_key and self.api_key and auth not in (self.api_key, f"Bearer {self.api_key}"):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    def _take_failure(self, path: str) -> tuple[int, str | None] | None:
        with self._lock:
            for i, (prefix, status, retry_after) in enumerate(self._failures):
                if path.startswith(prefix):
                    del self._failures[i]
                    return status, retry_after
        return None

    def _new_job(self) -> str:
        with self._lock:
            states = self._scripts.pop(0) if self._scripts else [{"status": "IN_QUEUE"}]
            job_id = f"{'test-' if self.local else ''}job-{next(self._ids):04d}-e1"
            self.jobs[job_id] = _Job(states)
        return job_id

    async def _run(self, request: web.Request) -> web.Response:
        body = self.requests[-1].body
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return web.json_response({"error": "input is required"}, status=400)
        job_id = self._new_job()
        return web.json_response(
            {"id": job_id, "status": "IN_PROGRESS" if self.local else "IN_QUEUE"}
        )

    async def _runsync(self, request: web.Request) -> web.Response:
        job_id = self._new_job()
        return web.json_response(self._final(job_id))

    def _doc(self, job_id: str, state: dict[str, Any]) -> dict[str, Any]:
        doc = {"id": job_id, "delayTime": 120, "executionTime": 3400}
        doc.update(state)
        if self.local:
            doc.pop("delayTime")
            doc.pop("executionTime")
        return doc

    def _final(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.pop(job_id)
        return self._doc(job_id, job.states[-1])

    async def _status_get(self, request: web.Request) -> web.Response:
        if self.local:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return web.json_response({"error": "job not found"}, status=404)
        if job.cancelled:
            return web.json_response(self._doc(request.match_info["id"], {"status": "CANCELLED"}))
        state = job.states[min(job.polls, len(job.states) - 1)]
        job.polls += 1
        return web.json_response(self._doc(request.match_info["id"], state))

    async def _status_post(self, request: web.Request) -> web.Response:
        if not self.local:
            return web.json_response({"error": "Method Not Allowed"}, status=405)
        job_id = request.match_info["id"]
        if job_id not in self.jobs:
            return web.json_response(
                {"id": job_id, "status": "FAILED", "error": "Job ID not found"}
            )
        return web.json_response(self._final(job_id))

    async def _cancel(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return web.json_response({"error": "job not found"}, status=404)
        job.cancelled = True
        return web.json_response({"id": request.match_info["id"], "status": "CANCELLED"})

    async def _file(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="video/mp4")


@contextlib.contextmanager
def running(fake: FakeRunpod) -> Iterator[FakeRunpod]:
    """Serve ``fake`` on a free loopback port from a background thread."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(fake.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        fake.url = f"http://{host}:{port}"
        holder["runner"] = runner

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # reported to the test below
            holder["error"] = exc
        finally:
            started.set()
        if "runner" in holder:
            loop.run_forever()

    thread = threading.Thread(target=serve, name="fake-runpod", daemon=True)
    thread.start()
    started.wait(10)
    if "runner" not in holder:
        raise RuntimeError(f"fake RunPod server did not start: {holder.get('error')!r}")
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def fake_runpod() -> Iterator[FakeRunpod]:
    """A fake RunPod endpoint (REST API as documented); ``.url`` is its base URL."""
    with running(FakeRunpod()) as fake:
        yield fake


@pytest.fixture
def fake_runpod_local() -> Iterator[FakeRunpod]:
    """A fake of the RunPod SDK's local ``--rp_serve_api`` server."""
    with running(FakeRunpod(local=True, api_key=None)) as fake:
        yield fake
