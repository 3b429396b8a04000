"""The ComfyUI client: submit a prompt, follow it over the websocket and ``/history`` at the same
time, and abort it (queue delete, then interrupt) on timeout or cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    retry_if_exception_type,
    wait_exponential,
    wait_fixed,
)

from ..errors import ComfyError, ComfyUnavailable, JobTimeout
from .outputs import OutputFile, download, output_files
from .run_state import ProgressCallback, RunResult, _Run
from .transport import INTERRUPT_GRACE_S, ComfyTransport, body_excerpt, validation_message

log = logging.getLogger(__name__)

EXTRA_DATA = {"extra_pnginfo": {"workflow": {"extra": {"VHS_MetadataImage": False}}}}


class _StillQueued(Exception):
    """``/queue`` still lists the prompt (or gave no usable answer)."""


def _passing(exc: BaseException) -> bool:
    """ComfyUI out of reach for now, within its grace period and with a live process."""
    return isinstance(exc, ComfyUnavailable) and not exc.refresh_worker


def _queued(body: Any, prompt_id: str) -> bool:
    """Whether a ``GET /queue`` answer lists ``prompt_id`` as running or pending."""
    if not isinstance(body, dict):
        return True  # not a queue listing: no proof that it stopped
    items = [*(body.get("queue_running") or []), *(body.get("queue_pending") or [])]
    return any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in items)


class ComfyClient(ComfyTransport):
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
        super().__init__(
            base_url,
            pid_file=pid_file,
            unreachable_grace_s=unreachable_grace_s,
            request_timeout_s=request_timeout_s,
            download_read_timeout_s=download_read_timeout_s,
        )
        self.poll_interval_s = poll_interval_s
        self.interrupt_grace_s = interrupt_grace_s

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
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_StillQueued) | retry_if_exception(_passing),
            wait=wait_fixed(self.poll_interval_s),
            reraise=True,
        )
        try:
            async with asyncio.timeout(grace_s):
                await retrying(self._gone_from_queue, prompt_id)
        except ComfyUnavailable as exc:  # dead, or unreachable past the grace period
            log.error("ComfyUI stopped answering after the interrupt: %s", exc)
            return "ComfyUI stopped answering after the interrupt"
        except (TimeoutError, _StillQueued):
            log.error(
                "prompt %s still running %.0f s after the interrupt; asking for a new worker",
                prompt_id,
                grace_s,
            )
            return f"ComfyUI did not stop it within {grace_s:g} s of the interrupt"
        return None

    async def _gone_from_queue(self, prompt_id: str) -> None:
        """Returns when ``/queue`` lists the prompt neither running nor pending, else raises
        ``_StillQueued`` (an answer other than 200 included)."""
        status, body = await self._json("GET", "/queue")
        if status != 200 or _queued(body, prompt_id):
            raise _StillQueued(prompt_id)

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
        self, state: _Run, ws: aiohttp.ClientWebSocketResponse | None, client_id: str
    ) -> None:
        while not state.done.done():
            if ws is None or ws.closed:
                ws = await self._reconnect(state, client_id)
                if ws is None:
                    return
                state.poll_now.set()  # frames may have been missed while away
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

    async def _reconnect(
        self, state: _Run, client_id: str
    ) -> aiohttp.ClientWebSocketResponse | None:
        """A new socket for ``client_id``; a failed connection is tried again after 0.1 s,
        doubling to 2 s, until the run ends. ``None`` when the run ended meanwhile or ComfyUI
        is gone (then the run has failed with ``ComfyUnavailable``)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((aiohttp.ClientError, TimeoutError)),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            stop=lambda _state: state.done.done(),
            reraise=True,
        )
        try:
            return await retrying(self._connect, client_id)
        except ComfyUnavailable as exc:
            state.fail(exc)
        except (aiohttp.ClientError, TimeoutError):
            pass  # the run ended while the socket was away
        return None

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
        """``outputs.download`` from this server."""
        return await download(self, item, dest)
