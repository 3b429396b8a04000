"""Async ComfyUI client. OWNER: comfy helper.

Contract (all network errors are mapped to the errors module; nothing else leaks):
- ``ComfyClient(base_url: str, *, pid_file: Path | None = None, poll_interval_s=1.0,
  unreachable_grace_s=15.0, request_timeout_s=30.0, interrupt_grace_s=INTERRUPT_GRACE_S)``;
  ``async with`` or ``await close()``.
  While ComfyUI cannot be reached, a dead PID in ``pid_file`` (or a zombie) gives
  ``ComfyUnavailable`` at once; without a PID verdict, after ``unreachable_grace_s``.
- ``await wait_ready(timeout_s)``: polls until ComfyUI answers; checks the PID in ``pid_file`` for
  liveness on every try; raises ``ComfyUnavailable`` with a clear message on death or deadline.
- ``await run(graph, *, prompt_id, client_id, timeout_s, on_progress) -> RunResult``: submits
  with our client_id and prompt_id, follows the websocket AND /history at the same time (a
  dropped socket cannot lose the completion; the socket is reconnected), on timeout, task
  cancellation or a refused 200 deletes the prompt from the pending queue (POST /queue) and then
  POSTs /interrupt for it (then raises ``JobTimeout`` / re-raises ``CancelledError``). The
  interrupt is cooperative: after a timeout the client watches ``/queue`` for up to
  ``interrupt_grace_s`` (default ``INTERRUPT_GRACE_S``); a prompt still running or queued then,
  or a ComfyUI that does not answer, gives ``JobTimeout`` with ``refresh_worker`` (a stuck
  prompt would hold every later job behind it).
  Non-empty ``node_errors`` (even in a 200) -> ``ComfyError(code="comfyui_validation")``; any
  other answer than 200/400 -> ``ComfyError`` whose ``details`` keep the status and the body
  (the cause; cut to ``BODY_EXCERPT_CHARS``);
  ``execution_error`` -> ``ComfyError(code="comfyui_execution" | "out_of_memory")`` with message
  "ComfyUI failed at node <id> (<class>): <exception_message>" (OOM: first line plus a hint;
  ``details`` (for the log) has node_id, node_type, exception_type); ComfyUI dying ->
  ``ComfyUnavailable``. ``execution_interrupted`` not requested by us -> code "comfyui_interrupted".
  ``on_progress(Progress)`` is called for node starts (stage = the node's class_type, no step)
  and for ``progress`` frames (step/total, stage = the class of the node that sent them: the
  sampler, but also loaders, pose detection and VAE decode report progress; a frame naming a
  node outside the graph counts for the node now executing); it must not block (a coroutine
  result is scheduled, exceptions are logged).
- ``RunResult``: prompt_id, outputs (history ``outputs``), queue_s (submit -> execution_start),
  execution_s (execution_start -> execution_success), node_times (node id -> seconds, from the
  arrival of ``executing`` frames; history timestamps when the socket saw nothing).
- ``output_files(outputs) -> list[OutputFile]`` reads ``gifs``, ``videos`` and ``images`` items
  (filename, subfolder, type, format); ``await download(item, dest: Path) -> Path`` streams /view.
- ``Progress(stage: str, node: str | None, step: int | None, total: int | None)``.
- Helpers: ``await interrupt(prompt_id)``, ``await delete_queued(prompt_id)``,
  ``await delete_history(prompt_ids)`` (never raises),
  ``await free(unload_models, free_memory)``, ``await object_info(node_class=None)``,
  ``await history(prompt_id)``; pure ``validation_message(body)``, ``execution_error(data)``,
  ``pid_alive(pid)``.

Protocol facts (ComfyUI v0.33.0: server.py, execution.py, main.py): the socket is opened BEFORE
POST /prompt, because per-prompt frames (``executing``, ``progress``, ``progress_state``,
``execution_*``) go only to the socket registered under the prompt's client_id; completion is
``executing`` with ``node: null`` (sent after history is stored) or ``/history/{id}`` showing
the prompt finished, whichever comes first. ComfyUI never closes a client's socket, and a
socket that closes unregisters whichever socket then holds its client id: every socket opened
here is closed here, whatever the outcome (a refused submission included). On reconnect the
server may send ``executing`` without a ``prompt_id``; frames without our prompt_id are
ignored. A client ``prompt_id`` must be a canonical lowercase hyphenated UUID (``str(uuid4())``),
else ``/prompt`` answers HTTP 400 ``invalid_prompt_id``. The submitted ``extra_data`` sets
``VHS_MetadataImage: false`` so VideoHelperSuite writes no first-frame PNG next to the video.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from .errors import ComfyError, ComfyUnavailable, JobTimeout, WorkerError

log = logging.getLogger(__name__)

OOM_HINT = (
    "Hint: ComfyUI ran out of GPU memory; try a smaller width/height, fewer frames "
    "(max_frames), or enable block swap."
)
EXTRA_DATA = {"extra_pnginfo": {"workflow": {"extra": {"VHS_MetadataImage": False}}}}
OUTPUT_KEYS = ("gifs", "videos", "images")
# After a job timeout: how long the interrupted prompt may take to stop before the worker asks
# to be replaced. ComfyUI checks the interrupt before each node and at each progress update
# (a sampler step, a decoded latent frame), so this must exceed the slowest such interval.
INTERRUPT_GRACE_S = 60.0
BODY_EXCERPT_CHARS = 2000  # of an unexpected HTTP answer, kept in the error details (logged)


@dataclass(frozen=True)
class Progress:
    stage: str
    node: str | None
    step: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class OutputFile:
    filename: str
    subfolder: str = ""
    type: str = "output"
    format: str | None = None
    node: str | None = None

    def as_query(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict[str, Any]
    queue_s: float | None = None
    execution_s: float | None = None
    node_times: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], Any]


def output_files(outputs: dict[str, Any]) -> list[OutputFile]:
    """Every file item of history ``outputs`` under ``gifs``, ``videos`` or ``images``."""
    files: list[OutputFile] = []
    for node, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for key in OUTPUT_KEYS:
            for item in ui.get(key) or []:
                if isinstance(item, dict) and item.get("filename"):
                    files.append(
                        OutputFile(
                            filename=str(item["filename"]),
                            subfolder=str(item.get("subfolder") or ""),
                            type=str(item.get("type") or "output"),
                            format=item.get("format"),
                            node=str(node),
                        )
                    )
    return files


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def validation_message(body: dict[str, Any]) -> str:
    """One readable sentence from a /prompt error body (``error`` and ``node_errors``)."""
    parts = []
    for nid, entry in (body.get("node_errors") or {}).items():
        cls = entry.get("class_type", "?") if isinstance(entry, dict) else "?"
        errors = entry.get("errors", []) if isinstance(entry, dict) else entry
        for err in errors or []:
            text = str(err.get("message", "invalid"))
            if err.get("details"):
                text += f": {err['details']}"
            parts.append(f"node {nid} ({cls}): {text}")
    if not parts:
        err = body.get("error")
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("type") or "invalid prompt")
            if err.get("details"):
                text += f": {err['details']}"
            parts.append(text)
        elif err:
            parts.append(str(err))
    return "ComfyUI rejected the graph: " + ("; ".join(parts) or "no reason given") + "."


def body_excerpt(body: Any, limit: int = BODY_EXCERPT_CHARS) -> str:
    """An HTTP answer body as text for the log, cut to ``limit`` characters."""
    text = body if isinstance(body, str) else json.dumps(body)
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


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


def _queued(body: Any, prompt_id: str) -> bool:
    """Whether a ``GET /queue`` answer lists ``prompt_id`` as running or pending."""
    if not isinstance(body, dict):
        return True  # not a queue listing: no proof that it stopped
    items = [*(body.get("queue_running") or []), *(body.get("queue_pending") or [])]
    return any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in items)


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
            self.progress(Progress(stage=cls, node=str(node), step=int(step), total=int(total)))

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


class ComfyClient:
    """One ComfyUI server. Errors: ComfyError, ComfyUnavailable, JobTimeout (errors module)."""

    def __init__(
        self,
        base_url: str,
        *,
        pid_file: Path | None = None,
        poll_interval_s: float = 1.0,
        unreachable_grace_s: float = 15.0,
        request_timeout_s: float = 30.0,
        interrupt_grace_s: float = INTERRUPT_GRACE_S,
        download_read_timeout_s: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.pid_file = pid_file
        self.poll_interval_s = poll_interval_s
        self.unreachable_grace_s = unreachable_grace_s
        self.request_timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self.interrupt_grace_s = interrupt_grace_s
        self.download_read_timeout_s = download_read_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._unreachable_since: float | None = None

    async def __aenter__(self) -> ComfyClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.request_timeout)
        return self._session

    # ------------------------------------------------------------------ liveness
    def pid(self) -> int | None:
        if self.pid_file is None:
            return None
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def process_dead(self) -> bool:
        pid = self.pid()
        return pid is not None and not pid_alive(pid)

    def _reached(self) -> None:
        self._unreachable_since = None

    def _unreachable(self, exc: BaseException) -> None:
        """Connection failed: ComfyUnavailable when the PID is dead or after the grace period."""
        now = time.monotonic()
        self._unreachable_since = self._unreachable_since or now
        if self.process_dead():
            raise ComfyUnavailable(
                f"ComfyUI (pid {self.pid()}) exited; the job could not finish."
            ) from None
        if now - self._unreachable_since >= self.unreachable_grace_s:
            raise ComfyUnavailable(
                f"ComfyUI stopped answering at {self.base_url} for "
                f"{now - self._unreachable_since:.0f} s ({type(exc).__name__})."
            ) from None

    # ------------------------------------------------------------------ simple calls
    async def _json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            async with self.session.request(method, self.base_url + path, json=body) as resp:
                text = await resp.text()
                self._reached()
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            self._unreachable(exc)
            raise ComfyUnavailable(
                f"ComfyUI at {self.base_url} is not reachable: {type(exc).__name__}.",
                refresh_worker=False,
            ) from None
        try:
            return resp.status, json.loads(text) if text.strip() else None
        except ValueError:
            return resp.status, text

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            pid = self.pid()
            if pid is not None and not pid_alive(pid):
                raise ComfyUnavailable(f"ComfyUI exited during start (pid {pid}).")
            try:
                async with self.session.get(
                    self.base_url + "/system_stats", timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    if resp.status == 200:
                        await resp.read()
                        log.info("ComfyUI is ready at %s", self.base_url)
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = type(exc).__name__
            left = deadline - time.monotonic()
            if left <= 0:
                raise ComfyUnavailable(
                    f"ComfyUI did not answer at {self.base_url} within {timeout_s:g} s "
                    f"(last: {last})."
                )
            await asyncio.sleep(min(0.5, left))

    async def interrupt(self, prompt_id: str | None = None) -> None:
        await self._json("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    async def delete_queued(self, prompt_id: str) -> None:
        await self._json("POST", "/queue", {"delete": [prompt_id]})

    async def delete_history(self, prompt_ids: list[str]) -> None:
        """Forget these prompts' history entries (``POST /history {"delete": [...]}``; unknown
        ids are ignored by ComfyUI). ComfyUI keeps up to 10,000 entries, each with its whole
        graph, for the life of the process. Never raises: a failure is logged."""
        if not prompt_ids:
            return
        try:
            async with asyncio.timeout(5):
                await self._json("POST", "/history", {"delete": list(prompt_ids)})
        except (WorkerError, TimeoutError) as exc:
            log.warning("could not delete ComfyUI history entries: %s", type(exc).__name__)

    async def free(self, unload_models: bool = False, free_memory: bool = False) -> None:
        await self._json(
            "POST", "/free", {"unload_models": unload_models, "free_memory": free_memory}
        )

    async def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        status, body = await self._json(
            "GET", "/object_info" + (f"/{node_class}" if node_class else "")
        )
        if status != 200 or not isinstance(body, dict):
            raise ComfyError(f"ComfyUI /object_info answered HTTP {status}.")
        return body

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        status, body = await self._json("GET", f"/history/{prompt_id}")
        if status != 200 or not isinstance(body, dict):
            return None
        return body.get(prompt_id)

    # ------------------------------------------------------------------ run
    async def run(
        self,
        graph: dict[str, Any],
        *,
        prompt_id: str,
        client_id: str,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
    ) -> RunResult:
        state = _Run(prompt_id, graph, on_progress)
        tasks: list[asyncio.Task] = []
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            async with asyncio.timeout(timeout_s):
                ws = await self._connect(client_id, first=True)  # before /prompt
                await self._submit(graph, prompt_id, client_id)
                state.submitted = time.monotonic()
                tasks = [
                    asyncio.create_task(self._follow_socket(state, ws, client_id)),
                    asyncio.create_task(self._poll_history(state)),
                ]
                return await asyncio.shield(state.done)
        except TimeoutError:
            await asyncio.shield(self._abort(state))
            stuck = await asyncio.shield(self._stops_within(prompt_id, self.interrupt_grace_s))
            if stuck is not None:
                raise JobTimeout(
                    f"The job ran past its time limit and {stuck}; the worker will be replaced.",
                    refresh_worker=True,
                ) from None
            cause = (
                f" ComfyUI's /history kept answering {state.history_error}, so the end of the "
                "prompt may have been missed."
                if state.history_error
                else ""
            )
            raise JobTimeout(
                f"The job ran past its time limit; ComfyUI was interrupted.{cause}"
            ) from None
        except asyncio.CancelledError:
            await asyncio.shield(self._abort(state))
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if ws is not None and not ws.closed:  # a failed submission: nobody followed it
                await asyncio.shield(self._close_socket(ws))
            if not state.done.done():
                state.done.cancel()
            elif not state.done.cancelled():
                state.done.exception()  # retrieved: never "exception was never retrieved"

    async def _stops_within(self, prompt_id: str, grace_s: float) -> str | None:
        """None once ``/queue`` lists the prompt neither running nor pending (ComfyUI removes it
        from the running set and stores its history in one step), within ``grace_s``. Else why
        the worker must be replaced: the prompt is still there at the deadline, or ComfyUI does
        not answer (frozen or dead). The interrupt is cooperative, and a prompt that never stops
        holds every later job behind it in the queue."""
        try:
            async with asyncio.timeout(grace_s):
                while True:
                    try:
                        status, body = await self._json("GET", "/queue")
                    except ComfyUnavailable as exc:
                        if exc.refresh_worker:  # dead, or unreachable past the grace period
                            log.error("ComfyUI stopped answering after the interrupt: %s", exc)
                            return "ComfyUI stopped answering after the interrupt"
                    else:
                        if status == 200 and not _queued(body, prompt_id):
                            return None
                    await asyncio.sleep(self.poll_interval_s)
        except TimeoutError:
            log.error(
                "prompt %s still running %.0f s after the interrupt; asking for a new worker",
                prompt_id,
                grace_s,
            )
            return f"ComfyUI did not stop it within {grace_s:g} s of the interrupt"

    @staticmethod
    async def _close_socket(ws: aiohttp.ClientWebSocketResponse) -> None:
        """Close a socket of ours; never raises. ComfyUI never closes a client's socket, not
        even one replaced by a newer socket with the same client id, and a replaced socket that
        closes later unregisters its successor (server.py websocket_handler): a socket left
        open leaks on both ends."""
        try:
            await ws.close()
        except Exception as exc:
            log.debug("closing the ComfyUI websocket failed: %s", type(exc).__name__)

    async def _abort(self, state: _Run) -> None:
        """Drop our prompt from the queue, then interrupt it; never raises. In this order no
        moment is left uncovered: a prompt still pending is deleted, one that started meanwhile is
        interrupted (interrupt first would miss a prompt that starts between the two calls)."""
        state.interrupt_requested = True
        for call in (self.delete_queued(state.prompt_id), self.interrupt(state.prompt_id)):
            try:
                await asyncio.wait_for(call, 5)
            except Exception as exc:
                log.warning(
                    "could not interrupt prompt %s: %s", state.prompt_id, type(exc).__name__
                )
        log.info("interrupted prompt %s", state.prompt_id)

    async def _connect(
        self, client_id: str, *, first: bool = False
    ) -> aiohttp.ClientWebSocketResponse:
        url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        try:
            ws = await self.session.ws_connect(url, heartbeat=30, max_msg_size=64 * 1024 * 1024)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._unreachable(exc)
            if first:
                raise ComfyUnavailable(
                    f"ComfyUI at {self.base_url} is not reachable ({type(exc).__name__})."
                ) from None
            raise
        self._reached()
        return ws

    async def _submit(self, graph: dict[str, Any], prompt_id: str, client_id: str) -> None:
        body = {
            "prompt": graph,
            "client_id": client_id,
            "prompt_id": prompt_id,
            "extra_data": EXTRA_DATA,
        }
        status, raw = await self._json("POST", "/prompt", body)
        answer = raw if isinstance(raw, dict) else {"error": str(raw)[:300]}
        if status not in (200, 400):
            raise ComfyError(
                f"ComfyUI refused the prompt with HTTP {status}.",
                details={"http_status": status, "body": body_excerpt(raw)},
            )
        if status == 400 or answer.get("node_errors"):
            if status == 200:
                await self._abort(_Run(prompt_id, graph, None))
            raise ComfyError(
                validation_message(answer),
                code="comfyui_validation",
                details={"node_errors": answer.get("node_errors") or {}},
            )
        log.info("submitted prompt %s (queue number %s)", prompt_id, answer.get("number"))

    async def _follow_socket(
        self, state: _Run, ws: aiohttp.ClientWebSocketResponse, client_id: str
    ) -> None:
        backoff = 0.1
        while not state.done.done():
            if ws is None or ws.closed:
                try:
                    ws = await self._connect(client_id)
                    backoff = 0.1
                    state.poll_now.set()  # frames may have been missed while away
                except ComfyUnavailable as exc:
                    state.fail(exc)
                    return
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
            try:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary preview images
                    try:
                        frame = json.loads(msg.data)
                        etype, data = frame.get("type"), frame.get("data") or {}
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(data, dict) and state.on_frame(etype, data):
                        state.poll_now.set()
                        await self._finish_from_history(state)
            except (aiohttp.ClientError, TimeoutError):
                pass
            finally:
                await self._close_socket(ws)
            if not state.done.done():
                log.warning(
                    "ComfyUI websocket dropped during prompt %s; reconnecting", state.prompt_id
                )
                state.poll_now.set()

    async def _finish_from_history(self, state: _Run) -> None:
        try:
            status, body = await self._json("GET", f"/history/{state.prompt_id}")
        except ComfyUnavailable as exc:
            if exc.refresh_worker:
                state.fail(exc)
            return
        if status != 200 or not isinstance(body, dict):
            if state.history_error is None:
                log.warning(
                    "ComfyUI /history answered HTTP %s for prompt %s; following the websocket only",
                    status,
                    state.prompt_id,
                )
            state.history_error = f"HTTP {status}"
            return
        state.history_error = None
        entry = body.get(state.prompt_id)
        if entry is not None:
            state.from_history(entry)

    async def _poll_history(self, state: _Run) -> None:
        while not state.done.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.poll_now.wait(), self.poll_interval_s)
            state.poll_now.clear()
            await self._finish_from_history(state)

    # ------------------------------------------------------------------ outputs
    output_files = staticmethod(output_files)

    async def download(self, item: OutputFile, dest: Path) -> Path:
        """Stream ``/view`` for ``item`` into ``dest`` (a file path, or a folder). A transfer
        that fails (no byte for ``download_read_timeout_s``, a dropped connection) is a
        ``ComfyUnavailable`` only when ComfyUI then does not answer either; otherwise it is a
        ``ComfyError`` for this job alone (code ``comfyui_output_unreadable``)."""
        target = dest / item.filename if dest.is_dir() else dest
        try:
            async with self.session.get(
                self.base_url + "/view",
                params=item.as_query(),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self.download_read_timeout_s),
            ) as resp:
                if resp.status != 200:
                    raise ComfyError(
                        f"ComfyUI has no output file {item.filename!r} (HTTP {resp.status}).",
                        code="comfyui_output_missing",
                    )
                with target.open("wb") as fh:
                    async for chunk in resp.content.iter_chunked(1024 * 1024):
                        fh.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            target.unlink(missing_ok=True)
            what = "timed out" if isinstance(exc, TimeoutError) else "failed"
            if await self._answers():
                raise ComfyError(
                    f"Downloading {item.filename!r} from ComfyUI {what} "
                    f"({type(exc).__name__}); ComfyUI itself still answers.",
                    code="comfyui_output_unreadable",
                ) from None
            raise ComfyUnavailable(
                f"Downloading {item.filename!r} from ComfyUI {what} ({type(exc).__name__}) and "
                "ComfyUI no longer answers."
            ) from None
        return target

    async def _answers(self, timeout_s: float = 10.0) -> bool:
        """Whether ComfyUI is alive and answers ``/system_stats`` within ``timeout_s``."""
        if self.process_dead():
            return False
        try:
            async with self.session.get(
                self.base_url + "/system_stats", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False
