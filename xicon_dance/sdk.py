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
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .logs import redact_std_streams

log = logging.getLogger(__name__)

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


def start(handler: Handler) -> None:
    """Run the SDK's job loop (or its local modes) with ``handler``; returns when it ends."""
    import runpod

    redact_std_streams()
    config: dict[str, Any] = {}
    config["handler"] = wrap_handler(handler, config)
    runpod.serverless.start(config)
