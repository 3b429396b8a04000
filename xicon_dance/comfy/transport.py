"""HTTP and websocket transport to one ComfyUI server: JSON calls mapped to the errors module,
the websocket's connect and close, the liveness of ComfyUI's process (PID file), the start-up
wait and the small calls (interrupt, queue and history deletes, free, object_info)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay

from ..errors import ComfyError, ComfyUnavailable, WorkerError

log = logging.getLogger(__name__)

# After a job timeout: how long the interrupted prompt may take to stop before the worker asks
# to be replaced. ComfyUI checks the interrupt before each node and at each progress update
# (a sampler step, a decoded latent frame), so this must exceed the slowest such interval.
INTERRUPT_GRACE_S = 60.0
BODY_EXCERPT_CHARS = 2000  # of an unexpected HTTP answer, kept in the error details (logged)
READY_POLL_S = 0.5  # between start-up probes


class _NotReady(Exception):
    """One start-up probe got no good answer (retried until the deadline)."""


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


class ComfyTransport:
    """HTTP and websocket access to one ComfyUI server, and whether its process lives.
    Errors: ComfyError, ComfyUnavailable (errors module)."""

    def __init__(
        self,
        base_url: str,
        *,
        pid_file: Path | None = None,
        unreachable_grace_s: float = 15.0,
        request_timeout_s: float = 30.0,
        download_read_timeout_s: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.pid_file = pid_file
        self.unreachable_grace_s = unreachable_grace_s
        self.request_timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self.download_read_timeout_s = download_read_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._unreachable_since: float | None = None

    async def __aenter__(self) -> Self:
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
        """Probe ``/system_stats`` every ``READY_POLL_S`` until it answers 200; a dead PID ends
        the wait at once, ``timeout_s`` without an answer gives ``ComfyUnavailable``."""
        deadline = time.monotonic() + timeout_s
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_NotReady),
            stop=stop_after_delay(timeout_s),
            wait=lambda _state: max(0.0, min(READY_POLL_S, deadline - time.monotonic())),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._probe_ready()
        except _NotReady as exc:
            raise ComfyUnavailable(
                f"ComfyUI did not answer at {self.base_url} within {timeout_s:g} s (last: {exc})."
            ) from None
        log.info("ComfyUI is ready at %s", self.base_url)

    async def _probe_ready(self) -> None:
        """One start-up probe: returns when ComfyUI answers, ``_NotReady`` (what it got) when
        not yet, ``ComfyUnavailable`` when its process exited."""
        pid = self.pid()
        if pid is not None and not pid_alive(pid):
            raise ComfyUnavailable(f"ComfyUI exited during start (pid {pid}).")
        try:
            async with self.session.get(
                self.base_url + "/system_stats", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status == 200:
                    await resp.read()
                    return
                raise _NotReady(f"HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _NotReady(type(exc).__name__) from None

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

    async def system_stats(self) -> dict[str, Any]:
        """ComfyUI's ``GET /system_stats`` (system facts and ``devices``); ``{}`` on a non-200."""
        status, body = await self._json("GET", "/system_stats")
        return body if status == 200 and isinstance(body, dict) else {}

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        status, body = await self._json("GET", f"/history/{prompt_id}")
        if status != 200 or not isinstance(body, dict):
            return None
        return body.get(prompt_id)

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

    async def answers(self, timeout_s: float = 10.0) -> bool:
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
