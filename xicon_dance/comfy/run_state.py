"""One prompt's run: its state machine (``_Run``), fed by the websocket frames and ``/history``
entries, and what it yields (``Progress`` for the callback, ``RunResult``, ``ComfyError``)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ComfyError

log = logging.getLogger(__name__)

OOM_HINT = (
    "Hint: ComfyUI ran out of GPU memory; try a smaller width/height, fewer frames "
    "(max_frames), or enable block swap."
)


@dataclass(frozen=True)
class Progress:
    """A node start (``step`` None) or a ``progress`` frame: ``step`` is the frame's value cut to
    an integer, ``value`` the value as sent. A sampler with context windows reports a fraction
    of a step per window (``step_index + windows_done / windows``), so ``value`` can be
    fractional; it takes no part in comparisons."""

    stage: str
    node: str | None
    step: int | None = None
    total: int | None = None
    value: float | None = field(default=None, compare=False)


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict[str, Any]
    queue_s: float | None = None
    execution_s: float | None = None
    node_times: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], Any]


def execution_error(data: dict[str, Any]) -> ComfyError:
    """ComfyError from an ``execution_error`` payload (socket frame or history message)."""
    nid, cls = data.get("node_id"), data.get("node_type")
    message = str(data.get("exception_message") or "").strip() or "unknown error"
    exc_type = str(data.get("exception_type") or "")
    details = {"node_id": nid, "node_type": cls, "exception_type": exc_type}
    text = f"ComfyUI failed at node {nid} ({cls}): {message}"
    if "out of memory" in message.lower() or exc_type.endswith("OutOfMemoryError"):
        first = message.splitlines()[0]
        return ComfyError(
            f"ComfyUI failed at node {nid} ({cls}): {first} {OOM_HINT}",
            code="out_of_memory",
            details=details,
        )
    return ComfyError(text, code="comfyui_execution", details=details)


def interrupted_error(data: dict[str, Any]) -> ComfyError:
    return ComfyError(
        f"ComfyUI interrupted the run at node {data.get('node_id')} ({data.get('node_type')}) "
        "without a request from this worker.",
        code="comfyui_interrupted",
    )


class _Run:
    """State of one prompt run, fed by the socket and the history poller."""

    def __init__(self, prompt_id: str, graph: dict[str, Any], on_progress: ProgressCallback | None):
        self.prompt_id = prompt_id
        self.graph = graph
        self.on_progress = on_progress
        self.done: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self.current: tuple[str, float] | None = None
        self.node_times: dict[str, float] = {}
        self.poll_now = asyncio.Event()
        self.interrupt_requested = False
        self.history_error: str | None = None  # the last /history failure, while it lasts
        self._tasks: set[asyncio.Task] = set()

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def progress(self, progress: Progress) -> None:
        if self.on_progress is None:
            return
        try:
            result = self.on_progress(progress)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:
            log.exception("progress callback failed (ignored)")

    def close_node(self, now: float) -> None:
        if self.current is not None:
            nid, since = self.current
            self.node_times[nid] = round(self.node_times.get(nid, 0.0) + now - since, 6)
            self.current = None

    def on_frame(self, etype: str, data: dict[str, Any]) -> bool:
        """Handle one JSON frame; True when it says the prompt finished (history is stored)."""
        if data.get("prompt_id") != self.prompt_id:
            return False
        now = time.monotonic()
        if etype == "execution_start":
            self.started = now
        elif etype == "executing":
            self.close_node(now)
            node = data.get("node")
            if node is None:
                self.finished = self.finished or now
                return True
            self.current = (str(node), now)
            cls = self.graph.get(str(node), {}).get("class_type", str(node))
            self.progress(Progress(stage=cls, node=str(node)))
        elif etype == "progress":
            self._node_progress(data)
        elif etype == "execution_success":
            self.close_node(now)
            self.finished = now
        elif etype == "execution_error":
            self.fail(execution_error(data))
        elif etype == "execution_interrupted" and not self.interrupt_requested:
            self.fail(interrupted_error(data))
        return False

    def _node_progress(self, data: dict[str, Any]) -> None:
        """A ``progress`` frame: any node that reports progress sends them (model loader per
        weight, pose detector per frame, VAE decode per latent frame, the sampler per step),
        so the stage is that node's class; a node id not in the graph is attributed to the
        node now executing, never guessed to be the sampler."""
        node = data.get("node")
        cls = self.graph.get(str(node), {}).get("class_type") if node is not None else None
        if cls is None and self.current is not None:
            node = self.current[0]
            cls = self.graph.get(node, {}).get("class_type")
        if cls is None:
            return
        step, total = data.get("value"), data.get("max")
        if isinstance(step, int | float) and isinstance(total, int | float):
            self.progress(
                Progress(
                    stage=cls, node=str(node), step=int(step), total=int(total), value=float(step)
                )
            )

    def from_history(self, entry: dict[str, Any]) -> bool:
        """Finish from a /history entry; True when the prompt is finished."""
        status = entry.get("status") or {}
        if not (status.get("completed") or status.get("status_str") in ("success", "error")):
            return False
        messages = {m[0]: m[1] for m in status.get("messages", []) if isinstance(m, list | tuple)}
        if status.get("status_str") == "error":
            if "execution_error" in messages:
                self.fail(execution_error(messages["execution_error"]))
            elif "execution_interrupted" in messages:
                self.fail(interrupted_error(messages["execution_interrupted"]))
            else:
                self.fail(
                    ComfyError(
                        "ComfyUI reported the run as failed without a reason.",
                        code="comfyui_execution",
                    )
                )
            return True
        if self.done.done():
            return True
        result = RunResult(
            self.prompt_id, entry.get("outputs") or {}, node_times=dict(self.node_times)
        )
        start_ms = messages.get("execution_start", {}).get("timestamp")
        end_ms = messages.get("execution_success", {}).get("timestamp")
        if self.started is not None:
            result.queue_s = round(self.started - self.submitted, 6)
            result.execution_s = round((self.finished or time.monotonic()) - self.started, 6)
        elif start_ms and end_ms:
            prompt = entry.get("prompt") or []
            create_ms = prompt[3].get("create_time") if len(prompt) > 3 else None
            result.queue_s = (start_ms - create_ms) / 1000 if create_ms else None
            result.execution_s = (end_ms - start_ms) / 1000
        self.done.set_result(result)
        return True
