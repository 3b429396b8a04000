"""The ComfyUI double's aiohttp application: routes, queue, executor and fault switches.

See the package docstring for the protocol facts it reproduces and the fault switches.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from xicon_dance.graph_check import check_prompt

from . import media

log = logging.getLogger("comfy_double")

MAXIMUM_HISTORY_SIZE = 10000  # ComfyUI v0.33.0 execution.py:1249
OUTPUT_CLASSES = {"VHS_VideoCombine", "SaveImage", "PreviewImage", "SaveVideo"}
Validator = Callable[[dict[str, Any]], tuple[dict[str, Any] | None, dict[str, Any]]]
DEFAULT_OBJECT_INFO = Path(__file__).resolve().parent.parent / "fixtures" / "object_info.json"
# The release the double imitates (stack/components.json) and what its /system_stats reports:
# comfyui_version.py, requirements.txt (frontend, templates) and the lock's torch of v0.33.0.
COMFYUI_VERSION = "0.33.0"
REQUIRED_FRONTEND_VERSION = "1.48.7"
TEMPLATES_VERSION = "0.11.41"
PYTORCH_VERSION = "2.11.0"


class PortInUse(OSError):
    """The double's port could not be bound; the message names the address and what to do."""


@dataclass
class Faults:
    """Fault switches; every field is documented in the package docstring."""

    drop_socket_at_node: str | None = None
    silent_socket: bool = False
    die_at_node: str | None = None
    error_at_node: str | None = None
    oom_at_node: str | None = None
    node_errors_in_200: bool = False
    node_delay_s: float = 0.0
    step_delay_s: float = 0.0
    refuse_start_s: float = 0.0
    hang_at_node: str | None = None
    view_stall_s: float = 0.0
    prompt_http_status: int = 0

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name: f for f in fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown fault {key!r}; known: {sorted(names)}")
            setattr(self, key, value)


class InterruptedRun(Exception):
    def __init__(self, node: str) -> None:
        self.node = node


class ExecutionFailed(Exception):
    def __init__(self, node: str, exc_type: str, message: str, inputs: dict[str, Any]) -> None:
        super().__init__(message)
        self.node, self.exc_type, self.message, self.inputs = node, exc_type, message, inputs

    def frame_fields(self) -> dict[str, Any]:
        """The ``execution_error`` fields beyond those it shares with an interrupt (§3.3)."""
        return {
            "exception_message": self.message,
            "exception_type": self.exc_type,
            "traceback": ["Traceback (most recent call last):\n", f"{self.exc_type}: {self}\n"],
            "current_inputs": self.inputs,
            "current_outputs": [],  # execution.py:710: a list of node ids
        }


def _is_link(value: Any, prompt: dict[str, Any]) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def topological_order(prompt: dict[str, Any]) -> list[str]:
    """Node ids so that every node comes after the nodes it links to (ties by id order)."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(nid: str) -> None:
        if state.get(nid) == 2 or nid not in prompt:
            return
        if state.get(nid) == 1:
            raise ValueError(f"cycle at node {nid}")
        state[nid] = 1
        for value in prompt[nid].get("inputs", {}).values():
            if _is_link(value, prompt):
                visit(value[0])
        state[nid] = 2
        order.append(nid)

    for nid in sorted(prompt, key=lambda k: (len(k), k)):
        visit(nid)
    return order


def _err(etype: str, message: str, details: str = "", extra: dict | None = None) -> dict:
    return {"type": etype, "message": message, "details": details, "extra_info": extra or {}}


# Fault ``prompt_http_status``: the text aiohttp answers for an exception in a handler, the
# cause, and a long tail (a traceback's worth) that a log line must not carry in full.
PROMPT_FAILURE = (
    "500 Internal Server Error\n\nServer got itself in trouble\n"
    "Injected cause: the prompt queue is not accepting prompts\n" + "traceback line\n" * 400
)

# ComfyUI v0.33.0 server.py:1098-1104: the error body for a client prompt_id that
# comfy_execution/jobs.py:34-50 (validate_job_id) refuses.
INVALID_PROMPT_ID = _err(
    "invalid_prompt_id",
    "prompt_id must be a valid UUID",
    "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let "
    "the server generate one",
)


def _prompt_id(value: Any) -> str:
    """ComfyUI v0.33.0 server.py:1090-1096 and comfy_execution/jobs.py:34-50: absent or null
    -> a fresh ``str(uuid4())``; otherwise the value itself, which must be a string that is
    exactly ``str(uuid.UUID(value))`` (ValueError for anything else: hex, upper case, braces,
    URN forms, numbers)."""
    if value is None:
        return str(uuid.uuid4())
    if not isinstance(value, str):
        raise ValueError(f"job id must be a string, got {type(value).__name__}")
    if str(uuid.UUID(value)) != value:
        raise ValueError("job id must be a UUID in canonical lowercase hyphenated form")
    return value


class ComfyDouble:
    """An aiohttp ComfyUI server double. ``await start()`` / ``await stop()``; ``url``, ``port``."""

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        object_info: dict[str, Any] | Path | None = None,
        faults: Faults | None = None,
        validator: Validator | None = None,
        model_files: dict[str, list[str]] | None = None,
        exit_process_on_die: bool = False,
    ) -> None:
        self.root = Path(root)
        self.input_dir, self.output_dir, self.temp_dir = (
            self.root / "input",
            self.root / "output",
            self.root / "temp",
        )
        for d in (self.input_dir, self.output_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port
        if isinstance(object_info, Path) or object_info is None:
            path = object_info or DEFAULT_OBJECT_INFO
            object_info = json.loads(path.read_text()) if path.is_file() else {}
        self.object_info: dict[str, Any] = object_info
        self.faults = faults or Faults()
        self.validator = validator
        self.model_files = model_files
        self.exit_process_on_die = exit_process_on_die
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self._open_ws: set[web.WebSocketResponse] = set()
        self.client_id: str | None = None  # the running (or last) prompt's client (server.py:265)
        self.last_node_id: str | None = None  # node now executing (server.py:264)
        self._registry: dict[str, dict[str, Any]] = {}  # progress of this prompt's nodes
        self.history: dict[str, dict[str, Any]] = {}
        self.prompts: dict[str, list[Any]] = {}  # every queued item by prompt id, for tests
        self.pending: list[list[Any]] = []
        self.running: list[Any] | None = None
        self.number = 0
        self.cache: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, Any]] = []  # (route, body) of control calls, for tests
        self._interrupt_flag = False
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self.dead = False
        self._loaded: dict[str, Path] = {}  # loader node id -> its input, as read when it ran

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        routes = [
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/history", self.get_history),
            ("POST", "/history", self.post_history),
            ("GET", "/history/{prompt_id}", self.get_history_id),
            ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload_image),
            ("POST", "/interrupt", self.interrupt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("POST", "/free", self.free),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/object_info", self.get_object_info),
            ("GET", "/object_info/{node_class}", self.get_object_info_class),
            ("GET", "/ws", self.websocket),
        ]
        for method, path, handler in routes:  # protocol §2.1: every route also under /api
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_post("/_double/faults", self.post_faults)
        app.router.add_get("/_double/faults", self.get_faults)
        app.router.add_get("/_double/requests", self.get_requests)
        app.router.add_get("/_double/sockets", self.get_sockets)
        return app

    async def start(self) -> ComfyDouble:
        self._runner = web.AppRunner(self.build_app(), handle_signals=False)
        await self._runner.setup()
        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        self._spawn(self._worker())
        if self.faults.refuse_start_s > 0:  # fault: connections refused for N seconds
            self._spawn(self._bind_later(self.faults.refuse_start_s))
        else:
            await self._bind()
        return self

    async def _bind(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()  # the queue worker task and the runner end here, not later
            raise PortInUse(
                exc.errno,
                f"cannot listen on {self.host}:{self.port}: "
                f"{os.strerror(exc.errno) if exc.errno else exc} "
                "(is another ComfyUI or double running there? pick another --port)",
            ) from None
        log.info("ComfyUI double listening on %s", self.url)

    async def _bind_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._bind()
        except PortInUse as exc:
            log.error("%s", exc.strerror)
            if self.exit_process_on_die:  # a standalone double has nothing left to serve
                os._exit(1)

    async def stop(self) -> None:
        for ws in list(self._open_ws):
            with contextlib.suppress(Exception):
                await ws.close()
        self.sockets.clear()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- websocket
    @property
    def open_websockets(self) -> int:
        """Server-side websockets whose handler still runs (replaced ones included)."""
        return len(self._open_ws)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """ComfyUI v0.33.0 server.py:270-327. A second socket with the same clientId takes the
        table entry (server.py:274-276, 281) but the old socket is NOT closed; whichever socket
        finishes pops the entry for its id unconditionally (server.py:324-325), so a replaced
        socket closing later unregisters its successor. A new socket gets ``status`` with its
        sid, then ``executing`` with the node now running (no ``prompt_id``) when its id is the
        running prompt's client (server.py:287-290)."""
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        sid = request.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self._open_ws.add(ws)
        try:
            await self.send("status", {"status": self._exec_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self.send("executing", {"node": self.last_node_id}, sid)
            first = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                with contextlib.suppress(ValueError):
                    data = json.loads(msg.data)
                    # server.py:302-312: only a first message of type feature_flags is answered
                    if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                        await self.send("feature_flags", {"supports_preview_metadata": False}, sid)
                first = False
        finally:
            self.sockets.pop(sid, None)
            self._open_ws.discard(ws)
        return ws

    @staticmethod
    async def _send_to(ws: web.WebSocketResponse, etype: str, data: Any) -> None:
        with contextlib.suppress(Exception):
            if not ws.closed:
                await ws.send_str(json.dumps({"type": etype, "data": data}))

    async def send(self, etype: str, data: Any, sid: str | None) -> None:
        """ComfyUI v0.33.0 server.py:1382-1390 (send_json): ``sid`` None -> every socket in the
        table; else only the socket registered under ``sid`` (none -> dropped)."""
        if sid is None:
            await self.broadcast(etype, data)
        elif (ws := self.sockets.get(sid)) is not None:
            await self._send_to(ws, etype, data)

    async def broadcast(self, etype: str, data: Any) -> None:
        for ws in list(self.sockets.values()):
            await self._send_to(ws, etype, data)

    async def to_client(self, etype: str, data: Any) -> None:
        """A frame the real server sends only when the running prompt has a client
        (``if server.client_id is not None``: execution.py:494 ``executing``, :577 ``executed``,
        :677-684 ``add_message(broadcast=False)``, main.py:383 ``executing`` node null)."""
        if self.client_id is not None:
            await self.send(etype, data, self.client_id)

    def _exec_info(self) -> dict[str, Any]:
        remaining = len(self.pending) + (1 if self.running else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    # ---------------------------------------------------------------- /prompt
    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self._exec_info())

    def _validate(self, prompt: dict[str, Any]) -> tuple[dict | None, dict]:
        if self.validator is not None:
            return self.validator(prompt)
        kwargs = {"model_files": self.model_files} if self.model_files is not None else {}
        return check_prompt(prompt, self.object_info, **kwargs)

    def _file_errors(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """LoadImage / VHS_LoadVideo VALIDATE_INPUTS: existence under input/ (protocol §4.2)."""
        errors: dict[str, Any] = {}
        for nid, node in prompt.items():
            cls = node.get("class_type")
            key, what = {"LoadImage": ("image", "image"), "VHS_LoadVideo": ("video", "video")}.get(
                cls, (None, None)
            )
            value = node.get("inputs", {}).get(key) if key else None
            if key and isinstance(value, str) and self._input_path(value) is None:
                errors[nid] = {
                    "errors": [
                        _err(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            f"{key} - Invalid {what} file: {value}",
                            {"input_name": key},
                        )
                    ],
                    "dependent_outputs": self._outputs_of(prompt),
                    "class_type": cls,
                }
        return errors

    def _outputs_of(self, prompt: dict[str, Any]) -> list[str]:
        return [n for n, v in prompt.items() if v.get("class_type") in OUTPUT_CLASSES]

    def _input_path(self, name: str) -> Path | None:
        m = re.fullmatch(r"(.*?)\s*\[(input|output|temp)\]", name)
        base = self.input_dir
        if m:
            name, base = (
                m.group(1),
                {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}[
                    m.group(2)
                ],
            )
        path = (base / name).resolve()
        if not path.is_relative_to(base.resolve()) or not path.is_file():
            return None
        return path

    async def post_prompt(self, request: web.Request) -> web.Response:
        if self.faults.prompt_http_status:  # fault: /prompt fails before queueing anything
            return web.Response(status=self.faults.prompt_http_status, text=PROMPT_FAILURE)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(
                {"error": _err("invalid_prompt", "Invalid JSON"), "node_errors": {}}, status=400
            )
        if not isinstance(body, dict):
            body = {}
        number = self._queue_number(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return web.json_response(
                {"error": _err("no_prompt", "No prompt provided"), "node_errors": {}}, status=400
            )
        try:  # ComfyUI v0.33.0 server.py:1090-1104, before any validation of the graph
            prompt_id = _prompt_id(body.get("prompt_id"))
        except ValueError:
            return web.json_response({"error": INVALID_PROMPT_ID, "node_errors": {}}, status=400)
        error, node_errors = self._validate(prompt)
        if error is None and not node_errors:
            node_errors = self._file_errors(prompt)
        if error is not None or node_errors:
            if error is None:
                error = _err("prompt_outputs_failed_validation", "Prompt outputs failed validation")
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        if self.faults.node_errors_in_200:  # fault: §2.2, a 200 that still carries node_errors
            victim = next(iter(prompt))
            node_errors = {
                victim: {
                    "errors": [
                        _err(
                            "value_not_in_list",
                            "Value not in list",
                            "mode: 'x' not in ['a', 'b']",
                            {"input_name": "mode"},
                        )
                    ],
                    "dependent_outputs": [],
                    "class_type": prompt[victim].get("class_type"),
                }
            }
        extra = dict(body.get("extra_data") or {})
        for secret in ("auth_token_comfy_org", "api_key_comfy_org"):  # kept out of history (§2.2)
            extra.pop(secret, None)
        if body.get("client_id"):
            extra["client_id"] = body["client_id"]
        extra["create_time"] = int(time.time() * 1000)
        item = [number, prompt_id, prompt, extra, self._outputs_of(prompt)]
        self.pending.append(item)
        self.prompts[prompt_id] = item
        self.pending.sort(key=lambda item: item[0])
        self._wake.set()
        await self.broadcast("status", {"status": self._exec_info()})
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}
        )

    def _queue_number(self, body: dict[str, Any]) -> float | int:
        """ComfyUI v0.33.0 server.py:1078-1086: a caller's ``number`` is used as given;
        otherwise the counter (from 0, negated for ``front``) advances on every POST, before
        the body is checked at all (a refused prompt uses up a number too)."""
        if "number" in body:
            return float(body["number"])
        number = -self.number if body.get("front") else self.number
        self.number += 1
        return number

    # ---------------------------------------------------------------- execution
    async def _worker(self) -> None:
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            self.running = self.pending.pop(0)
            self._interrupt_flag = False
            try:
                await self._execute(self.running)
            except Exception:
                log.exception("double executor failed")
            finally:
                self.running = None
            await self.broadcast("status", {"status": self._exec_info()})

    async def _execute(self, item: list[Any]) -> None:
        number, prompt_id, prompt, extra, outputs_to_execute = item
        self._loaded.clear()
        shutil.rmtree(self.root / "_loaded", ignore_errors=True)
        self.client_id = extra.get("client_id")  # execution.py:736-739
        self._registry = {}
        messages: list[list[Any]] = []

        async def event(etype: str, data: dict[str, Any], *, store: bool = True) -> None:
            if store:
                messages.append([etype, data])
            if etype in ("execution_success",) and self.faults.silent_socket:
                return
            await self.to_client(etype, data)

        outputs: dict[str, Any] = {}
        executed: list[str] = []
        status_str = "error"
        try:
            await self._run_prompt(prompt_id, prompt, outputs, executed, event)
            status_str = "success"
        except InterruptedRun as exc:
            data = self._failure_data(prompt_id, prompt, exc.node, executed)
            messages.append(["execution_interrupted", data])
            # execution.py:699 + :683-684 (broadcast=True): to the prompt's client only; to every
            # socket when the prompt has none
            await self.send("execution_interrupted", data, self.client_id)
        except ExecutionFailed as exc:
            data = self._failure_data(prompt_id, prompt, exc.node, executed)
            await event("execution_error", {**data, **exc.frame_fields()})
        # execution.py:775, 828-834: the ui outputs of the nodes that ran are stored even when a
        # later node failed or the run was interrupted
        self.last_node_id = None  # execution.py:835
        if len(self.history) > MAXIMUM_HISTORY_SIZE:  # execution.py:1290-1291: oldest goes
            self.history.pop(next(iter(self.history)))
        self.history[prompt_id] = {
            "prompt": [number, prompt_id, prompt, extra, outputs_to_execute],
            "outputs": outputs,
            "status": {
                "status_str": status_str,
                "completed": status_str == "success",
                "messages": messages,
            },
            "meta": {
                n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                for n in outputs
            },
        }
        if not self.faults.silent_socket:  # main.py:383-384: node null AFTER history is stored
            await self.to_client("executing", {"node": None, "prompt_id": prompt_id})

    async def _run_prompt(
        self,
        prompt_id: str,
        prompt: dict[str, Any],
        outputs: dict[str, Any],
        executed: list[str],
        event: Callable[..., Any],
    ) -> None:
        """Every node in order (or the cached outputs), filling ``outputs`` and ``executed``;
        §3.2 frame order."""
        await event("execution_start", {"prompt_id": prompt_id, "timestamp": _ms()})
        key = json.dumps(prompt, sort_keys=True)
        cached = self.cache.get(key)
        order = topological_order(prompt)
        await event(
            "execution_cached",
            {"nodes": order if cached else [], "prompt_id": prompt_id, "timestamp": _ms()},
        )

        async def ui_output(nid: str, ui: dict[str, Any]) -> None:
            outputs[nid] = ui
            frame = {"node": nid, "display_node": nid, "output": ui, "prompt_id": prompt_id}
            await event("executed", frame, store=False)

        if cached is not None:  # protocol §7.2: fully cached re-run writes nothing
            for nid, ui in copy.deepcopy(cached).items():
                await ui_output(nid, ui)
        else:
            for nid in order:
                ui = await self._run_node_reporting(nid, prompt, prompt_id)
                if ui is not None:
                    await ui_output(nid, ui)
                await self._progress_state(prompt_id, nid, "finished")  # execution.py:659
                executed.append(nid)  # execution.py:660
            self.cache[key] = copy.deepcopy(outputs)
        await event("execution_success", {"prompt_id": prompt_id, "timestamp": _ms()})

    async def _progress_state(
        self, prompt_id: str, nid: str, state: str, value: float = 0.0, max_value: float = 1.0
    ) -> None:
        """comfy_execution/progress.py:160-185 and :276-313: on a node's start, every progress
        update and its finish, ``progress_state`` with every node not pending, to the prompt's
        client (to every socket when it has none)."""
        entry = self._registry.setdefault(nid, {"value": 0.0, "max": 1.0})
        if state == "finished":
            value, max_value = entry["max"], entry["max"]
        entry.update(value=value, max=max_value, state=state)
        nodes = {
            n: {
                "value": e["value"],
                "max": e["max"],
                "state": e["state"],
                "node_id": n,
                "prompt_id": prompt_id,
                "display_node_id": n,
                "parent_node_id": None,
                "real_node_id": n,
            }
            for n, e in self._registry.items()
        }
        await self.send("progress_state", {"prompt_id": prompt_id, "nodes": nodes}, self.client_id)

    async def _report(self, prompt_id: str, nid: str, value: int, total: int) -> None:
        """The progress hook, main.py:436-450: checks the interrupt first (so any node that
        reports progress is interruptible there), updates the registry (``progress_state``),
        then sends ``progress`` to the prompt's client (to every socket when it has none)."""
        await self._check_interrupt(nid)
        await self._progress_state(prompt_id, nid, "running", value, total)
        frame = {"value": value, "max": total, "prompt_id": prompt_id, "node": nid}
        await self.send("progress", frame, self.client_id)

    @staticmethod
    def _failure_data(
        prompt_id: str, prompt: dict[str, Any], nid: str, executed: list[str]
    ) -> dict[str, Any]:
        """The fields shared by ``execution_interrupted`` and ``execution_error``
        (execution.py:692-711)."""
        return {
            "prompt_id": prompt_id,
            "node_id": nid,
            "node_type": prompt[nid]["class_type"],
            "executed": list(executed),
            "timestamp": _ms(),
        }

    async def _check_interrupt(self, nid: str) -> None:
        if self._interrupt_flag:
            self._interrupt_flag = False
            raise InterruptedRun(nid)

    async def _run_node_reporting(self, nid: str, prompt: dict, prompt_id: str) -> dict | None:
        """``_run_node``; any other exception a node raises is an ``execution_error`` naming the
        node, as in ComfyUI (protocol §3.3), never a run that ends without history."""
        try:
            return await self._run_node(nid, prompt, prompt_id)
        except (InterruptedRun, ExecutionFailed):
            raise
        except Exception as exc:
            exc_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
            raise ExecutionFailed(nid, exc_type, str(exc), {}) from exc

    async def _run_node(self, nid: str, prompt: dict, prompt_id: str) -> dict | None:
        """One node as execution.py:438-660 runs it: ``progress_state`` (start), ``executing``
        (only with a client), the interrupt check before the node's function
        (execution.py:258-259), the work with its progress frames; the caller sends the rest."""
        node = prompt[nid]
        cls, inputs = node["class_type"], node.get("inputs", {})
        await self._progress_state(prompt_id, nid, "running")  # execution.py:492
        if self.client_id is not None:  # execution.py:494-496
            self.last_node_id = nid
            await self.to_client(
                "executing", {"node": nid, "display_node": nid, "prompt_id": prompt_id}
            )
        await self._check_interrupt(nid)
        await self._inject_faults(nid, cls)
        for k in range(1, self._progress_total(cls, prompt) + 1):
            await self._report(prompt_id, nid, k, self._progress_total(cls, prompt))
        if cls == "LoadImage":
            self._load_image(nid, inputs)
            self._keep_loaded(nid, str(inputs.get("image")))
        elif cls == "VHS_LoadVideo":
            self._keep_loaded(nid, str(inputs.get("video")))
        elif cls == "WanVideoSamplerv2":
            await self._sample(nid, prompt, prompt_id)
        elif cls == "VHS_VideoCombine":
            return await asyncio.to_thread(self._combine, nid, prompt)
        return None

    async def _inject_faults(self, nid: str, cls: str) -> None:
        faults = self.faults
        if faults.drop_socket_at_node == nid and self.client_id in self.sockets:
            await self.sockets[self.client_id].close()  # fault: the socket drops mid-run
        if faults.die_at_node == nid:
            await self._die()
        while faults.hang_at_node == nid:  # a node that never returns nor checks interrupts
            await asyncio.sleep(0.05)
        if faults.node_delay_s:
            await asyncio.sleep(faults.node_delay_s)
        if faults.error_at_node == nid:
            raise ExecutionFailed(nid, "RuntimeError", f"Injected failure in {cls}", {})
        if faults.oom_at_node == nid:
            raise ExecutionFailed(
                nid,
                "torch.OutOfMemoryError",
                "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
                "Currently allocated     : 74.12 GiB\nThis error means you ran out of memory "
                "on your GPU.\n\nTIPS: If the workflow worked before you might have "
                "accidentally set the batch_size to a large number.",
                {},
            )

    @staticmethod
    def _progress_total(cls: str, prompt: dict[str, Any]) -> int:
        """How many ``progress`` frames a node other than the sampler sends (0: none), as the
        packs' ``comfy.utils.ProgressBar`` calls do: WanVideoModelLoader one per weight
        (ComfyUI-WanVideoWrapper nodes_model_loading.py:812; a few here), the ViTPose detector
        two per frame (ComfyUI-SCAIL-Pose nodes.py:178), WanVideoDecode one per latent frame
        (ComfyUI-WanVideoWrapper wanvideo/wan_video_vae.py:1131-1137)."""
        frames = int(prompt.get("130", {}).get("inputs", {}).get("frame_load_cap") or 9)
        return {
            "WanVideoModelLoader": 4,
            "PoseDetectionVitPoseToDWPose": 2 * frames,
            "WanVideoDecode": 1 + (frames - 1) // 4,
        }.get(cls, 0)

    def _keep_loaded(self, nid: str, name: str) -> None:
        """A loader node holds its input in memory once it ran: later nodes never read input/
        again (a caller may delete its files while the prompt runs). Kept as a private copy."""
        source = self._input_path(name)
        if source is None:
            raise ExecutionFailed(nid, "FileNotFoundError", f"Invalid file: {name}", {})
        copy_dir = self.root / "_loaded"
        copy_dir.mkdir(exist_ok=True)
        self._loaded[nid] = Path(shutil.copy(source, copy_dir / f"{nid}{source.suffix}"))

    def _load_image(self, nid: str, inputs: dict[str, Any]) -> None:
        from PIL import Image, UnidentifiedImageError

        path = self._input_path(str(inputs.get("image")))
        try:
            with Image.open(path) as im:  # type: ignore[arg-type]
                im.verify()
        except (UnidentifiedImageError, OSError, TypeError) as exc:
            raise ExecutionFailed(
                nid, "PIL.UnidentifiedImageError", str(exc), {"image": [inputs.get("image")]}
            ) from None

    async def _sample(self, nid: str, prompt: dict, prompt_id: str) -> None:
        steps = 1
        link = prompt[nid].get("inputs", {}).get("scheduler")
        if _is_link(link, prompt):
            steps = int(prompt[link[0]].get("inputs", {}).get("steps", 1))
        for k in range(1, steps + 1):
            if self.faults.step_delay_s:
                await asyncio.sleep(self.faults.step_delay_s)
            await self._report(prompt_id, nid, k, steps)

    def _const(self, prompt: dict, nid: str, default: int) -> int:
        node = prompt.get(nid)
        return (
            int(node["inputs"]["value"]) if node and "value" in node.get("inputs", {}) else default
        )

    def _frame_rule(self, load_format: str) -> tuple[int, int] | None:
        """VHS_LoadVideo's frame-count rule (step, offset) for a load ``format``, from the
        ``formats`` option in object_info (Wan: 4n+1; AnimateDiff: none; pitfall 10)."""
        inputs = self.object_info.get("VHS_LoadVideo", {}).get("input", {})
        spec = {**inputs.get("required", {}), **inputs.get("optional", {})}.get("format")
        formats = spec[1].get("formats", {}) if spec and len(spec) > 1 else {}
        rule = formats.get(load_format, {}).get("frames")
        return (int(rule[0]), int(rule[1])) if rule else None

    def _metadata_image_wanted(self) -> bool:
        """VHS_VideoCombine writes a first-frame PNG next to the video unless the prompt's
        ``extra_data.extra_pnginfo.workflow.extra.VHS_MetadataImage`` is false
        (../shared/reference/scail-workflow.md §10 pitfall 19)."""
        extra = self.running[3] if self.running else {}
        for key in ("extra_pnginfo", "workflow", "extra"):
            extra = extra.get(key) if isinstance(extra, dict) else None
        return not (isinstance(extra, dict) and extra.get("VHS_MetadataImage", True) is False)

    def _combine(self, nid: str, prompt: dict[str, Any]) -> dict[str, Any]:
        inputs = prompt[nid]["inputs"]
        width, height = self._const(prompt, "203", 64), self._const(prompt, "204", 64)
        fps = float(inputs.get("frame_rate", 8))
        loader = prompt.get("130", {}).get("inputs", {})
        image, video = self._loaded.get("106"), self._loaded.get("130")
        if image is None or video is None:
            raise ExecutionFailed(nid, "FileNotFoundError", "input image or video missing", {})
        count = media.loaded_frame_count(
            video,
            float(loader.get("force_rate", 0)),
            int(loader.get("frame_load_cap", 0)),
            self._frame_rule(str(loader.get("format", "AnimateDiff"))),
        )
        if count < 1:
            raise ExecutionFailed(nid, "RuntimeError", "No frames generated", {})
        prefix = str(inputs.get("filename_prefix", "AnimateDiff"))
        subfolder, base = os.path.split(prefix)
        folder = self.output_dir / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(base) + r"_(\d{5})")
        used = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
        name = f"{base}_{max(used, default=0) + 1:05}"
        path = folder / f"{name}.mp4"
        frames = media.render_frames(image, width, height, count)
        if self._metadata_image_wanted():
            media.write_png(folder / f"{name}.png", frames[0])
        media.write_mp4(path, frames, fps)
        if _is_link(inputs.get("audio"), prompt) and media.has_audio(video):
            audio_path = folder / f"{name}-audio.mp4"
            media.mux_audio(path, video, audio_path)
            path = audio_path  # VHS names the -audio file (pitfall 19)
        return {
            "gifs": [
                {
                    "filename": path.name,
                    "subfolder": subfolder,
                    "type": "output",
                    "format": str(inputs.get("format", "video/h264-mp4")),
                    "frame_rate": inputs.get("frame_rate", 8),
                    "workflow": f"{name}.png",
                    "fullpath": str(path),
                }
            ]
        }

    async def _die(self) -> None:
        """Fault: ComfyUI dies mid-run (the process exits, or the in-process server stops)."""
        self.dead = True
        if self.exit_process_on_die:
            log.warning("double: dying as instructed")
            os._exit(17)
        await self.stop()
        raise asyncio.CancelledError

    # ---------------------------------------------------------------- other routes
    async def get_history(self, request: web.Request) -> web.Response:
        items = list(self.history.items())
        offset = int(request.query.get("offset", 0) or 0)
        max_items = request.query.get("max_items")
        items = items[offset:]
        if max_items:
            items = items[-int(max_items) :]
        return web.json_response(dict(items))

    async def get_history_id(self, request: web.Request) -> web.Response:
        pid = request.match_info["prompt_id"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def post_history(self, request: web.Request) -> web.Response:
        """ComfyUI v0.33.0 server.py:1203-1214: ``clear`` wipes it, ``delete`` pops each id
        (unknown ids ignored); a bare 200."""
        body = await request.json()
        self.requests.append(("history", body))
        if body.get("clear"):
            self.history.clear()
        for pid in body.get("delete", []):
            self.history.pop(pid, None)
        return web.Response(status=200)

    async def view(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        filename = q.get("filename", "")
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        base = {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(
            q.get("type", "output")
        )
        if base is None:
            return web.Response(status=400)
        folder = (base / q.get("subfolder", "")).resolve()
        if os.path.commonpath([folder, base.resolve()]) != str(base.resolve()):
            return web.Response(status=403)
        path = folder / filename
        if not path.is_file():
            return web.Response(status=404)
        headers = {"Content-Disposition": f'filename="{filename}"'}
        if self.faults.view_stall_s:
            return await self._stalled_view(request, path, headers)
        return web.FileResponse(path, headers=headers)

    async def _stalled_view(
        self, request: web.Request, path: Path, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Fault ``view_stall_s``: headers and the first KiB, then silence for that long."""
        data = path.read_bytes()
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[:1024])
        await asyncio.sleep(self.faults.view_stall_s)
        await resp.write(data[1024:])
        return resp

    async def upload_image(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("image")
        if upload is None or not hasattr(upload, "file"):
            return web.Response(status=400)
        base = {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(
            str(form.get("type", "input")), self.input_dir
        )
        subfolder = str(form.get("subfolder", ""))
        folder = (base / subfolder).resolve()
        name = os.path.basename(upload.filename or "")
        if not name or not folder.is_relative_to(base.resolve()):
            return web.Response(status=400)
        folder.mkdir(parents=True, exist_ok=True)
        data = upload.file.read()
        path = folder / name
        if str(form.get("overwrite", "")).lower() not in ("true", "1"):
            stem, ext = os.path.splitext(name)
            i = 1
            while path.exists():
                if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
                    break
                path, i = folder / f"{stem} ({i}){ext}", i + 1
        path.write_bytes(data)
        return web.json_response(
            {"name": path.name, "subfolder": subfolder, "type": str(form.get("type", "input"))}
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {}

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.requests.append(("interrupt", body))
        wanted = body.get("prompt_id")
        if self.running is not None and (wanted is None or wanted == self.running[1]):
            self._interrupt_flag = True  # cooperative: next node boundary or step (§2.6)
        return web.Response(status=200)

    async def get_queue(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"queue_running": [self.running] if self.running else [], "queue_pending": self.pending}
        )

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.requests.append(("queue", body))
        if body.get("clear"):
            self.pending.clear()
        doomed = set(body.get("delete", []))
        self.pending = [item for item in self.pending if item[1] not in doomed]
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.requests.append(("free", body))
        if body.get("free_memory"):
            self.cache.clear()
        return web.Response(status=200)

    async def system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "system": {
                    "os": "linux",
                    "ram_total": 25769803776,
                    "ram_free": 17179869184,
                    "comfyui_version": COMFYUI_VERSION,
                    "required_frontend_version": REQUIRED_FRONTEND_VERSION,
                    "installed_templates_version": TEMPLATES_VERSION,
                    "required_templates_version": TEMPLATES_VERSION,
                    "python_version": "3.11.0",
                    "pytorch_version": PYTORCH_VERSION,
                    "embedded_python": False,
                    "deploy_environment": "local-git",
                    "argv": ["main.py", "--port", str(self.port)],
                },
                "devices": [
                    {
                        "name": "cpu",
                        "type": "cpu",
                        "index": None,
                        "vram_total": 0,
                        "vram_free": 0,
                        "torch_vram_total": 0,
                        "torch_vram_free": 0,
                    }
                ],
            }
        )

    async def get_object_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.object_info)

    async def get_object_info_class(self, request: web.Request) -> web.Response:
        cls = request.match_info["node_class"]
        return web.json_response({cls: self.object_info[cls]} if cls in self.object_info else {})

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(await self._body(request))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.faults))

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.faults))

    async def get_sockets(self, request: web.Request) -> web.Response:
        return web.json_response({"open": self.open_websockets, "registered": sorted(self.sockets)})

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response([list(r) for r in self.requests])


def _ms() -> int:
    return int(time.time() * 1000)
