"""The RunPod SDK's job loop, started the way this worker needs it.

Contract: ``start(handler)`` hands ``handler`` (an async RunPod handler) to
``runpod.serverless.start`` and does not return until the SDK's loop ends. Two things are added
around the SDK (runpod 1.12.0; each is checked by a test that drives the SDK's own code):

- **A result with ``refresh_worker: True`` ends the job loop.** The SDK turns that key into
  ``stopPod: true`` in the job's answer but keeps taking jobs (``rp_job.run_job``); only a
  ``refresh_worker`` in the start config stops its loop (``rp_scale.JobScaler.handle_job`` calls
  ``kill_worker`` after the job when ``config["refresh_worker"]`` is true), and set there from the
  start it would end the worker after every job. So the handler is wrapped: when a result asks
  for a refresh (ComfyUI died or hangs), the wrapper sets ``config["refresh_worker"]`` on the
  same dict the SDK reads after the handler returns. The SDK then answers the job with
  ``stopPod: true``, takes no further job, and the process exits (the container is replaced).
- **Nothing printed in this process shows a secret or a signed URL**
  (``logs.redact_std_streams``): the SDK's own logger prints the handler's whole result at
  DEBUG (its default level) outside ``logging``.

Progress updates (``PlatformSender``, used by ``progress``): the same request as the SDK's
``runpod.serverless.progress_update`` (``rp_progress`` calls ``rp_http.send_result``): POST to
the job-done URL (``RUNPOD_WEBHOOK_POST_OUTPUT``, ``platform_url``) with ``$ID`` replaced by the
job id plus ``&isStream=false``; the SDK's session headers (``http_client.get_auth_header``: API
key, user agent) and ``X-Request-ID: <job id>``; the per-request headers ``charset: utf-8`` and
``Content-Type: application/x-www-form-urlencoded``; the body
``{"status": "IN_PROGRESS", "output": payload}`` as JSON. Unlike the SDK (a thread, an event loop
and a session per update), one sender holds one session for the job, on the job's event loop:
every update reuses its connection; ``aclose()`` closes it. One attempt per update (the SDK
retries three times; here the next update supersedes a lost one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .logs import redact_std_streams

log = logging.getLogger(__name__)

PLATFORM_TIMEOUT_S = 10.0  # one progress update; the next one supersedes it anyway

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def wrap_handler(handler: Handler, config: dict[str, Any]) -> Handler:
    """``handler``, plus: a result carrying ``refresh_worker`` marks ``config`` to end the loop."""

    async def run(job: dict[str, Any]) -> dict[str, Any]:
        result = await handler(job)
        if isinstance(result, dict) and result.get("refresh_worker"):
            config["refresh_worker"] = True
            log.warning("this worker takes no further job: the result asks for a fresh worker")
        return result

    run.__name__ = run.__qualname__ = getattr(handler, "__name__", "handler")
    return run


def platform_url() -> str | None:
    """The job-done URL the SDK posts to, or ``None`` when it has none (a local mode)."""
    from runpod.serverless.modules import rp_http

    url = str(rp_http.JOB_DONE_URL)
    return url if url.lower().startswith(("http://", "https://")) else None


class PlatformSender:
    """POSTs updates to RunPod's job-done URL over one session (one connection) per job."""

    def __init__(self, url_template: str, job_id: str) -> None:
        self._url = url_template.replace("$ID", job_id) + "&isStream=false"
        self._job_id = job_id
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, job: dict[str, Any], payload: dict[str, Any]) -> None:
        if self._session is None:
            from runpod.http_client import get_auth_header

            self._session = aiohttp.ClientSession(
                headers={**get_auth_header(), "X-Request-ID": self._job_id},
                timeout=aiohttp.ClientTimeout(total=PLATFORM_TIMEOUT_S),
                connector=aiohttp.TCPConnector(limit=1),
            )
        body = json.dumps({"status": "IN_PROGRESS", "output": payload}, ensure_ascii=False)
        headers = {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded"}
        async with self._session.post(
            self._url, data=body, headers=headers, raise_for_status=True
        ) as resp:
            await resp.read()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self._session


def start(handler: Handler) -> None:
    """Run the SDK's job loop (or its local modes) with ``handler``; returns when it ends."""
    import runpod

    redact_std_streams()
    config: dict[str, Any] = {}
    config["handler"] = wrap_handler(handler, config)
    runpod.serverless.start(config)
