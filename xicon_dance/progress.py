"""Job progress for RunPod's ``/status``: throttled, small, and never racing the result.

Contract:
- ``ProgressReporter(job, interval_s, sender=None)``; ``update(stage, step=None, total=None,
  message=None) -> bool`` (True when an update was sent); ``on_comfy(progress)`` adapts the
  ComfyUI client's ``Progress(stage, node, step, total)`` callback; ``close(timeout_s)`` stops all
  further updates and waits for the one in flight.
- Payload (the ``output`` a caller sees in ``GET /status`` while the job is IN_PROGRESS), always
  the same five keys::

      {"stage": "sampling", "step": 3, "total": 6, "percent": 55, "message": "sampling step 3/6"}

  ``stage``: downloading | queued | loading | preparing | pose | conditioning | sampling |
  decoding | writing (ComfyUI node classes are mapped by ``stage_of``); ``step``/``total``: the
  sampler step (null outside sampling);
  ``percent``: 0..99, never decreasing; ``message``: one short human sentence.
- At most one update per ``interval_s`` (settings.progress_interval_s); an update due while the
  previous one is still being posted is dropped (updates are snapshots, the next one supersedes).

Where updates go (``default_sender``): on a RunPod worker the platform sets the job-done URL
(``RUNPOD_WEBHOOK_POST_OUTPUT``) and updates are POSTed there; in the local modes
(``--test_input``, ``--rp_serve_api``) the SDK has no such URL, so nothing is sent and each update
is logged at DEBUG instead (the SDK would log ``ERROR ... Failed to return job results`` for
every one).

Why the race cannot happen: the SDK's public ``runpod.serverless.progress_update`` starts a
daemon thread per call and nobody can wait for it, so an update posted just before the handler
returns can reach RunPod after the result and leave the job IN_PROGRESS (runpod-python issue
#250). Here each update is posted with the same public pieces that function uses
(``runpod.http_client.AsyncClientSession`` and ``rp_http.send_result`` with
``{"status": "IN_PROGRESS", "output": payload}``: same URL, same payload, same session setup) in
a thread *we* keep, so ``close()`` can join it. The worker calls ``close()`` when inference ends,
before the upload; after that no update is started, and the last one has finished (or the join
timed out, which is logged) before the result is returned. The upload in between adds a further
quiet period.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Sender = Callable[[dict[str, Any], dict[str, Any]], None]

# Percent bands per stage: (start, end). Sampling fills its band step by step.
_BANDS: dict[str, tuple[int, int]] = {
    "downloading": (0, 3),
    "queued": (3, 5),
    "loading": (5, 8),
    "preparing": (8, 9),
    "pose": (9, 12),
    "conditioning": (12, 15),
    "sampling": (15, 90),
    "decoding": (90, 95),
    "writing": (95, 98),
}
_OTHER_BAND = (5, 15)

# ComfyUI node class -> stage name shown to callers (first matching rule wins).
_STAGE_RULES: tuple[tuple[str, str], ...] = (
    ("Sampler", "sampling"),
    ("Decode", "decoding"),
    ("VideoCombine", "writing"),
    ("Embeds", "conditioning"),
    ("Pose", "pose"),
    ("NLF", "pose"),
    ("Detection", "pose"),
    ("Loader", "loading"),
    ("LoadImage", "loading"),
    ("LoadVideo", "loading"),
    ("LoraSelect", "loading"),
    ("Encode", "conditioning"),
)


def stage_of(node_class: str) -> str:
    """The caller-facing stage for a ComfyUI node class (``preparing`` when none matches)."""
    if node_class in _BANDS:
        return node_class
    for needle, stage in _STAGE_RULES:
        if needle.lower() in node_class.lower():
            return stage
    return "preparing"


def platform_sender(job: dict[str, Any], payload: dict[str, Any]) -> None:
    """POST one update to RunPod's job-done URL and wait until it has landed."""
    from runpod.http_client import AsyncClientSession
    from runpod.serverless.modules.rp_http import send_result

    async def post() -> None:
        async with AsyncClientSession() as session:
            await send_result(session, {"status": "IN_PROGRESS", "output": payload}, job)

    asyncio.run(post())


def log_sender(job: dict[str, Any], payload: dict[str, Any]) -> None:
    """Local modes: there is no platform to tell; the update goes to the DEBUG log."""
    log.debug("progress: %s", payload.get("message") or payload)


def platform_url() -> str | None:
    """The job-done URL the SDK posts to, or ``None`` when it has none (a local mode)."""
    from runpod.serverless.modules import rp_http

    url = str(rp_http.JOB_DONE_URL)
    return url if url.lower().startswith(("http://", "https://")) else None


def default_sender() -> Sender:
    """``platform_sender`` on a RunPod worker, ``log_sender`` when the SDK runs locally."""
    return platform_sender if platform_url() else log_sender


class ProgressReporter:
    """Throttled progress updates for one job; see the module docstring."""

    def __init__(
        self,
        job: dict[str, Any],
        interval_s: float,
        *,
        sender: Sender | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._job = {"id": job.get("id", "unknown")}
        self._interval = interval_s
        self._sender = sender or default_sender()
        self._clock = clock
        self._last_sent: float | None = None
        self._percent = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.sent: list[dict[str, Any]] = []

    def update(
        self,
        stage: str,
        step: int | None = None,
        total: int | None = None,
        message: str | None = None,
    ) -> bool:
        """Send ``stage`` (and the sampler step) unless throttled, closed or a send is in flight."""
        self._percent = max(self._percent, _percent(stage, step, total))
        if self._closed:
            return False
        now = self._clock()
        if self._last_sent is not None and now - self._last_sent < self._interval:
            return False
        if self._thread is not None and self._thread.is_alive():
            return False
        payload = {
            "stage": stage,
            "step": step,
            "total": total,
            "percent": self._percent,
            "message": message or _message(stage, step, total),
        }
        self._last_sent = now
        self.sent.append(payload)
        context = contextvars.copy_context()  # the thread's log lines keep the job id
        self._thread = threading.Thread(
            target=context.run, args=(self._send, payload), name="xicon-progress", daemon=True
        )
        self._thread.start()
        return True

    def on_comfy(self, progress: Any) -> None:
        """Callback for the ComfyUI client (``Progress(stage, node, step, total)``)."""
        node_class = str(getattr(progress, "stage", None) or "")
        stage = stage_of(node_class)
        step, total = getattr(progress, "step", None), getattr(progress, "total", None)
        if stage != "sampling":
            step = total = None
        message = _message(stage, step, total)
        if node_class and node_class != stage:
            message += f" ({node_class})"
        self.update(stage, step, total, message)

    def close(self, timeout_s: float = 10.0) -> None:
        """No update after this; wait (bounded) for the one in flight."""
        self._closed = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("progress update still in flight after %.1fs", timeout_s)

    @property
    def closed(self) -> bool:
        return self._closed

    def _send(self, payload: dict[str, Any]) -> None:
        try:
            self._sender(self._job, payload)
        except Exception as exc:  # progress is best effort; never fail the job for it
            log.debug("progress update not delivered: %s", exc)


def _percent(stage: str, step: int | None, total: int | None) -> int:
    start, end = _BANDS.get(stage, _OTHER_BAND)
    if step is not None and total:
        fraction = min(max(step / total, 0.0), 1.0)
        return min(99, int(start + (end - start) * fraction))
    return min(99, start)


def _message(stage: str, step: int | None, total: int | None) -> str:
    if step is not None and total:
        return f"{stage} step {step}/{total}"
    return {
        "downloading": "downloading the inputs",
        "queued": "waiting for ComfyUI",
        "decoding": "decoding the video",
    }.get(stage, stage)
