"""Job progress for RunPod's ``/status``: coalesced, small, never blocking the job, and never
racing the result.

Contract:
- ``ProgressReporter(job, interval_s, sender=None, clock=time.monotonic)``, built on the job's
  event loop; ``update(stage, step=None, total=None, message=None) -> bool`` (True when this
  update went out at once, False when it waits for its turn or the reporter is closed);
  ``on_comfy(progress)`` adapts the ComfyUI client's ``Progress(stage, node, step, total, value)``
  callback; ``plan(graph, source_frames, source_fps)`` tells it the clip's length, the graph's
  context windows (see ``context_windows``) and the scheduler's step count (the sampler node
  also reports its model weights loading, one per tensor: with a plan, a bar of the sampler
  that does not count steps is shown as ``loading``); ``await close(timeout_s)`` stops all
  further updates, waits (bounded) for the one in flight and closes the connection.
- Payload (the ``output`` a caller sees in ``GET /status`` while the job is IN_PROGRESS), always
  the same keys::

      {"stage": "sampling", "step": 3, "total": 6, "percent": 55,
       "windows": 27, "window": 12, "eta_s": 340,
       "message": "sampling step 3/6, window 12/27, about 5 min 40 s left"}

  ``stage``: downloading | queued | loading | preparing | pose | conditioning | sampling |
  decoding | writing (ComfyUI node classes are mapped by ``stage_of``); ``step``/``total``: the
  sampler step now running (1-based; the last finished one between steps) and the number of
  steps; ``windows``: context windows in this step (1 when the clip fits one window, null when
  unknown); ``window``: windows of this step done (null without context windows);
  ``eta_s``: whole seconds until sampling ends, from the rate measured since the sampler's
  first progress report (null before a second report has been timed); all four null outside
  sampling. ``percent``: 0..99, never decreasing; ``message``: one short human sentence.
- Coalescing: at most one update is in flight and at most one per ``interval_s``
  (settings.progress_interval_s); an update due sooner waits, and a newer one replaces it (the
  latest wins). ``update`` never waits for the network.

Where updates go (``default_sender``): on a RunPod worker the platform sets the job-done URL
(``RUNPOD_WEBHOOK_POST_OUTPUT``) and each update is POSTed there, the same request the SDK's own
``progress_update`` makes, but all of a job's updates through one session on the job's event
loop, so over one connection (``sdk.PlatformSender``; the SDK starts a thread, an event loop and
a session, so a new TLS connection, per update). An update is sent once: the next one supersedes
it. In the local modes (``--test_input``, ``--rp_serve_api``) the SDK has no such URL, so nothing
is sent and each update is logged at DEBUG instead (the SDK would log ``ERROR ... Failed to
return job results`` for every one).

Why the race cannot happen: an update that reaches RunPod after the result can leave the job
IN_PROGRESS (runpod-python issue #250). The worker awaits ``close()`` when inference ends,
before the upload: no update starts after it, and the one in flight has landed (or was given up
after ``timeout_s``, which is logged) before the result is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from . import sdk
from .context_windows import LOADER_NODE, ContextOptions, SamplingPlan, loaded_frames

log = logging.getLogger(__name__)

# A sender takes (job, payload); a coroutine result is awaited in a task of the reporter's.
Sender = Callable[[dict[str, Any], dict[str, Any]], Any]
CLOSE_TIMEOUT_S = 10.0
SCHEDULER_NODE = "WanVideoSchedulerv2"

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
_EPS = 1e-6


def stage_of(node_class: str) -> str:
    """The caller-facing stage for a ComfyUI node class (``preparing`` when none matches)."""
    if node_class in _BANDS:
        return node_class
    for needle, stage in _STAGE_RULES:
        if needle.lower() in node_class.lower():
            return stage
    return "preparing"


def log_sender(job: dict[str, Any], payload: dict[str, Any]) -> None:
    """Local modes: there is no platform to tell; the update goes to the DEBUG log."""
    log.debug("progress: %s", payload.get("message") or payload)


def default_sender(job_id: str) -> Sender:
    """``sdk.PlatformSender`` on a RunPod worker, ``log_sender`` when the SDK runs locally."""
    url = sdk.platform_url()
    return sdk.PlatformSender(url, job_id) if url else log_sender


class ProgressReporter:
    """Coalesced progress updates for one job; see the module docstring."""

    def __init__(
        self,
        job: dict[str, Any],
        interval_s: float,
        *,
        sender: Sender | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._job = {"id": str(job.get("id", "unknown"))}
        self._interval = interval_s
        self._sender = sender if sender is not None else default_sender(self._job["id"])
        self._clock = clock
        self._last_sent: float | None = None
        self._percent = 0
        self._pending: dict[str, Any] | None = None
        self._in_flight: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._plan: SamplingPlan | None = None
        self._step_totals: set[int] = set()  # what the sampler's step bar counts up to
        self._rate_from: tuple[float, float] | None = None  # (time, windows done) at 1st report
        self.sent: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ input
    def plan(self, graph: dict[str, Any], source_frames: int, source_fps: float) -> None:
        """The clip the graph will sample: frames as its video loader yields them from a source
        of ``source_frames`` at ``source_fps``, its context windows and its step count. Never
        raises: without a plan, windows are unknown (progress must not fail a job)."""
        try:
            self._make_plan(graph, source_frames, source_fps)
        except Exception:
            log.warning("no sampling plan for this graph; windows stay unknown", exc_info=True)
            self._plan, self._step_totals = None, set()

    def _make_plan(self, graph: dict[str, Any], source_frames: int, source_fps: float) -> None:
        loader = next(
            (
                n
                for n in graph.values()
                if isinstance(n, dict) and n.get("class_type") == LOADER_NODE
            ),
            {},
        )
        inputs = loader.get("inputs") or {}
        try:
            rate, cap = float(inputs.get("force_rate") or 0), int(inputs.get("frame_load_cap") or 0)
        except (TypeError, ValueError):
            rate, cap = 0.0, 0
        frames = loaded_frames(source_frames, source_fps, rate, cap)
        self._plan = SamplingPlan(frames, ContextOptions.from_graph(graph))
        self._step_totals = _step_totals(graph)
        log.debug("sampling plan: %d frames, %d windows per step", frames, self._plan.windows_at(0))

    def update(
        self,
        stage: str,
        step: int | None = None,
        total: int | None = None,
        message: str | None = None,
    ) -> bool:
        """Send ``stage`` (and the sampler step) now, or as soon as it is due (see module)."""
        return self._offer(stage, step, total, float(step) if step is not None else None, message)

    def on_comfy(self, progress: Any) -> None:
        """Callback for the ComfyUI client (``Progress(stage, node, step, total, value)``)."""
        node_class = str(getattr(progress, "stage", None) or "")
        stage = stage_of(node_class)
        step, total = getattr(progress, "step", None), getattr(progress, "total", None)
        value = getattr(progress, "value", None)
        if value is None and step is not None:
            value = float(step)
        if stage == "sampling" and total and self._step_totals and total not in self._step_totals:
            stage = "loading"  # another bar of the sampler node: its model weights, its LoRAs
        if stage != "sampling" or value is None or not total:
            step = total = value = None
        self._offer(stage, step, total, value, None, suffix=node_class)

    # ------------------------------------------------------------------ payload
    def _offer(
        self,
        stage: str,
        step: int | None,
        total: int | None,
        value: float | None,
        message: str | None,
        *,
        suffix: str = "",
    ) -> bool:
        fields: dict[str, Any] = {"windows": None, "window": None, "eta_s": None}
        if stage == "sampling" and value is not None and total:
            step, fields = self._sampling(value, int(total))
        self._percent = max(self._percent, _percent(stage, value, total))
        if self._closed:
            return False
        text = message or _message(stage, step, total, **fields)
        if suffix and suffix != stage:
            text += f" ({suffix})"
        payload = {
            "stage": stage,
            "step": step,
            "total": total,
            "percent": self._percent,
            **fields,
            "message": text,
        }
        return self._submit(payload)

    def _sampling(self, value: float, total: int) -> tuple[int, dict[str, Any]]:
        """The step now running, its windows and the ETA, from a sampler progress value
        (``steps done + windows done / windows`` of the step running)."""
        done = math.floor(value + _EPS)
        between = value - done <= _EPS  # a whole number: a step has just ended
        step = max(done, 1) if between else done + 1
        plan = self._plan
        windows = (plan.windows_at(step - 1) or None) if plan is not None else None
        window = None
        units, all_units = value, float(total)
        if plan is not None and windows is not None and windows > 1:
            if between:
                window = windows if done else 0
            else:
                window = min(max(round((value - done) * windows), 1), windows)
            units = plan.windows_before(step - 1) + window
            all_units = plan.windows_before(total)
        return step, {"windows": windows, "window": window, "eta_s": self._eta(units, all_units)}

    def _eta(self, units: float, all_units: float) -> int | None:
        now = self._clock()
        if self._rate_from is None or units < self._rate_from[1]:
            self._rate_from = (now, units)
            return None
        since, first = self._rate_from
        if units <= first or now <= since:
            return None
        rate = (units - first) / (now - since)
        return max(0, round((all_units - units) / rate))

    # ------------------------------------------------------------------ sending
    def _submit(self, payload: dict[str, Any]) -> bool:
        now = self._clock()
        busy = self._in_flight is not None and not self._in_flight.done()
        early = self._last_sent is not None and now - self._last_sent < self._interval
        if busy or early:
            self._pending = payload
            self._flush_later()
            return False
        self._pending = None
        self._start(payload, now)
        return True

    def _start(self, payload: dict[str, Any], now: float) -> None:
        self._last_sent = now
        self.sent.append(payload)
        try:
            result = self._sender(self._job, payload)
        except Exception as exc:  # progress is best effort; never fail the job for it
            log.debug("progress update not delivered: %s", exc)
            return
        if inspect.isawaitable(result):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                log.debug("progress update dropped: no event loop to send it on")
                if inspect.iscoroutine(result):
                    result.close()
                return
            self._in_flight = loop.create_task(_delivered(result), name="xicon-progress")

    def _flush_later(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next update on a loop sends it
        self._flusher = loop.create_task(self._flush(), name="xicon-progress-flush")

    async def _flush(self) -> None:
        """Send the latest waiting update once nothing is in flight and the interval passed."""
        while self._pending is not None and not self._closed:
            if self._in_flight is not None and not self._in_flight.done():
                await asyncio.wait([self._in_flight])
                continue
            wait = 0.0 if self._last_sent is None else self._last_sent + self._interval
            wait -= self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            payload, self._pending = self._pending, None
            self._start(payload, self._clock())

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """No update after this; wait (bounded) for the one in flight; close the connection.
        Idempotent: a later call (after a cancelled one, too) awaits the same closing."""
        self._closed = True
        self._pending = None
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(timeout_s))
        await asyncio.shield(self._closing)

    async def _close(self, timeout_s: float) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        task = self._in_flight
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=timeout_s)
            if not task.done():
                log.warning("progress update still in flight after %.1fs; dropped", timeout_s)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        aclose = getattr(self._sender, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    @property
    def closed(self) -> bool:
        return self._closed


def _step_totals(graph: dict[str, Any]) -> set[int]:
    """The totals the sampler's step bar can report: the scheduler's ``steps`` (less the skipped
    ``start_step``, up to ``end_step``). The sampler node also reports its model weights loading
    (one per parameter tensor) and its LoRAs under its own node id; those are no steps."""
    for node in graph.values():
        if isinstance(node, dict) and node.get("class_type") == SCHEDULER_NODE:
            inputs = node.get("inputs") or {}
            steps, start, end = (inputs.get(k) for k in ("steps", "start_step", "end_step"))
            if not isinstance(steps, int):
                return set()
            start = start if isinstance(start, int) else 0
            end = end if isinstance(end, int) and 0 <= end < steps else steps
            return {steps, max(end - start, 1)}
    return set()


async def _delivered(result: Any) -> None:
    try:
        await result
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # progress is best effort; never fail the job for it
        log.debug("progress update not delivered: %s", type(exc).__name__)


def _percent(stage: str, value: float | None, total: int | None) -> int:
    start, end = _BANDS.get(stage, _OTHER_BAND)
    if value is not None and total:
        fraction = min(max(value / total, 0.0), 1.0)
        return min(99, int(start + (end - start) * fraction))
    return min(99, start)


def _duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _message(
    stage: str,
    step: int | None,
    total: int | None,
    windows: int | None = None,
    window: int | None = None,
    eta_s: int | None = None,
) -> str:
    if step is not None and total:
        text = f"{stage} step {step}/{total}"
        if window is not None and windows and windows > 1:
            text += f", window {window}/{windows}"
        if eta_s is not None:
            text += f", about {_duration(eta_s)} left"
        return text
    return {
        "downloading": "downloading the inputs",
        "queued": "waiting for ComfyUI",
        "decoding": "decoding the video",
    }.get(stage, stage)
