"""The endpoint's REST API (``/run``, ``/runsync``, ``/status``, ``/cancel``) with polite retries.

Retries (tenacity): HTTP 429 and 5xx answers and connection failures are retried with growing
pauses (``Retry-After`` honoured), each retry reported to ``on_retry`` before its pause. A
request that may start a paid job (``POST /run``, ``POST /runsync``) is retried only when it
cannot have been accepted: the connection was refused, the name did not resolve, the connect
timed out, or the answer was 429. A read timeout, a dropped connection or a 5xx after the
request went out stops at once with ``ApiError`` saying how to find the job (the endpoint's
``/status`` or the RunPod console) instead of risking a second paid job. Connection refused on a
loopback host (a local server that is not running) gets one quick retry, unreported, then one
line naming ``host:port`` and how to start the local API.

The API key is sent only here, never shown in messages.
"""

from __future__ import annotations

import contextlib
import errno
import html
import ipaddress
import json
import logging
import random
import re
from collections.abc import Callable
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)
from yarl import URL

from ..logs import redact
from .model import API_TIMEOUT_S, CONNECT_TIMEOUT_S, MAX_BACKOFF_S, ApiError

log = logging.getLogger(__name__)

LOCAL_API_COMMAND = "python handler.py --rp_serve_api"
CONSOLE_URL = "https://www.runpod.io/console/serverless"
LOCAL_REFUSED_ATTEMPTS = 2  # a local server that is not running: one quick retry
LOCAL_REFUSED_PAUSE_S = 0.3


class _Transient(Exception):
    """A failure that a later attempt may not see: 429/5xx or a connection problem.

    ``sent``: the request may have reached the server (it may have started a job)."""

    def __init__(
        self,
        why: str,
        *,
        sent: bool,
        status: int | None = None,
        retry_after: str | None = None,
        text: str = "",
        refused: bool = False,
    ) -> None:
        super().__init__(why)
        self.why = why
        self.sent = sent
        self.status = status
        self.retry_after = retry_after
        self.text = text
        self.refused = refused


class Api:
    """One endpoint: ``call`` plus the RunPod operations ``submit``, ``status``, ``cancel``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None,
        retries: int,
        on_retry: Callable[[str], None] | None = None,
        timeout_s: float = API_TIMEOUT_S,
    ) -> None:
        self.session = session
        self.on_retry = on_retry
        self.base_url = base_url.rstrip("/")
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = api_key
        self.retries = max(1, retries)
        self.timeout_s = timeout_s
        self.status_method = "GET"
        url = URL(self.base_url)
        host = f"[{url.host}]" if url.host and ":" in url.host else url.host
        self.host_port = f"{host}:{url.port}"
        self.loopback = is_loopback(url.host)

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        no_time_limit: bool = False,
        allow: frozenset[int] = frozenset(),
        starts_job: bool = False,
    ) -> tuple[int, Any]:
        """``(http_status, json)``; retries as the module says, else raises ``ApiError``.

        Each attempt may take the API timeout, or as long as it needs with ``no_time_limit``
        (the caller's deadline applies). ``starts_job``: the request may start a paid job."""
        timeout = aiohttp.ClientTimeout(
            total=None if no_time_limit else self.timeout_s,
            connect=min(CONNECT_TIMEOUT_S, self.timeout_s),
        )
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retries) | self._local_refused_stop,
            wait=self._wait,
            retry=retry_if_exception(lambda exc: _may_retry(exc, starts_job)),
            before_sleep=lambda state: self._report(state, path),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(method, path, body, timeout, allow)
        except _Transient as exc:
            raise self._final_error(exc, method, path, starts_job) from None
        raise AssertionError("unreachable")

    async def _once(
        self,
        method: str,
        path: str,
        body: bytes | None,
        timeout: aiohttp.ClientTimeout,
        allow: frozenset[int],
    ) -> tuple[int, Any]:
        url = f"{self.base_url}{path}"
        try:
            async with self.session.request(
                method, url, data=body, headers=self.headers, timeout=timeout
            ) as resp:
                text = await resp.text()
                if resp.status in allow:
                    return resp.status, None
                if resp.status == 429 or resp.status >= 500:
                    retry_after = resp.headers.get("Retry-After")
                    raise _Transient(
                        f"HTTP {resp.status}",
                        sent=resp.status != 429,
                        status=resp.status,
                        retry_after=retry_after,
                        text=text,
                    )
                if resp.status >= 400:
                    raise ApiError(
                        _http_message(method, path, resp.status, text), status=resp.status
                    )
                return resp.status, _json(text, method, path)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            os_error = getattr(exc, "os_error", None)
            refused = isinstance(os_error, ConnectionRefusedError) or (
                getattr(os_error, "errno", None) == errno.ECONNREFUSED
            )
            why = f"cannot reach {self.base_url} ({_exc_text(exc)})"
            raise _Transient(why, sent=False, refused=refused) from None
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            why = f"no answer from {self.base_url} ({_exc_text(exc)})"
            raise _Transient(why, sent=True) from None
        except aiohttp.ClientError as exc:  # e.g. an invalid URL: retrying cannot help
            raise ApiError(f"{method} {path}: {_exc_text(exc)}.") from None

    def _local_refused_stop(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        refused = isinstance(exc, _Transient) and exc.refused and self.loopback
        return refused and state.attempt_number >= LOCAL_REFUSED_ATTEMPTS

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.refused and self.loopback:
            return LOCAL_REFUSED_PAUSE_S
        retry_after = exc.retry_after if isinstance(exc, _Transient) else None
        return backoff_delay(state.attempt_number, retry_after)

    def _report(self, state: RetryCallState, path: str) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if not isinstance(exc, _Transient):
            return
        delay = state.next_action.sleep if state.next_action else 0.0
        if exc.refused and self.loopback:
            log.debug("%s: %s; one quick retry in %.1f s", path, exc.why, delay)
            return
        text = f"{exc.why}; retry {state.attempt_number} of {self.retries - 1} in {delay:.1f} s"
        log.info("%s: %s", path, text)
        if self.on_retry is not None:
            self.on_retry(text)

    def _final_error(self, exc: _Transient, method: str, path: str, starts_job: bool) -> ApiError:
        if exc.refused and self.loopback:
            return ApiError(
                f"Nothing answers at {self.host_port} (connection refused). Start the local "
                f"API first ({LOCAL_API_COMMAND}, or docker compose up), or check --base-url."
            )
        if starts_job and exc.sent:
            happened = (
                _http_message(method, path, exc.status, exc.text).rstrip(".")
                if exc.status is not None
                else f"{method} {path}: {exc.why}"
            )
            return ApiError(
                f"{happened}. The request was sent, so the endpoint may have accepted the job "
                "and be running it; it was not retried. Before submitting again, look for it "
                f"in the RunPod console ({CONSOLE_URL}: the endpoint's requests, with their "
                "ids) and fetch its result from the endpoint's /status/<job id>: a retry may "
                "run a second paid job.",
                status=exc.status,
            )
        if exc.status is not None:
            return ApiError(_http_message(method, path, exc.status, exc.text), status=exc.status)
        return ApiError(f"{method} {path}: {exc.why}.")

    async def submit(self, body: bytes, *, local: bool) -> dict[str, Any]:
        """``POST /run`` (``/runsync`` when ``local``: no time limit, the job runs inside)."""
        path = "/runsync" if local else "/run"
        _, doc = await self.call("POST", path, body, no_time_limit=local, starts_job=True)
        return _as_doc(doc, f"POST {path}")

    async def status(self, job_id: str) -> dict[str, Any]:
        path = f"/status/{job_id}"
        if self.status_method == "GET":
            code, doc = await self.call("GET", path, allow=frozenset({405}))
            if code != 405:
                return _as_doc(doc, f"GET {path}")
            log.info("GET /status is not allowed: a local test server; using POST /status")
            self.status_method = "POST"
        # The local server runs the job inside this request: only the client's deadline applies.
        _, doc = await self.call("POST", path, no_time_limit=True)
        return _as_doc(doc, f"POST {path}")

    async def cancel(self, job_id: str) -> bool:
        try:
            await self.call("POST", f"/cancel/{job_id}")
        except ApiError as exc:
            log.warning("cancel of job %s failed: %s", job_id, exc.message)
            return False
        return True


def _may_retry(exc: BaseException, starts_job: bool) -> bool:
    return isinstance(exc, _Transient) and not (starts_job and exc.sent)


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (a server on this machine)."""
    if not host:
        return False
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def backoff_delay(attempt: int, retry_after: str | None = None) -> float:
    """Seconds before retry ``attempt``: 0.5 s doubling, jittered, capped; ``Retry-After`` wins."""
    delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1)) * (0.75 + random.random() / 2)
    if retry_after:
        with contextlib.suppress(ValueError):
            delay = min(MAX_BACKOFF_S, max(0.0, float(retry_after)))
    return delay


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {redact(str(exc)) or 'no answer'}"


def excerpt(text: str, limit: int = 200) -> str:
    """A short, single-line excerpt of an HTTP body; an HTML page gives its title or words."""
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title and title.group(1).strip():
        text = title.group(1)
    elif "<" in text and ">" in text:
        text = re.sub(r"<(script|style)\b.*?</\1>", " ", text, flags=re.IGNORECASE | re.DOTALL)
        text = re.sub(r"<[^>]+>", " ", text)
    flat = " ".join(html.unescape(text).split())
    flat = redact(flat)
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def _http_message(method: str, path: str, status: int, text: str) -> str:
    hint = {
        401: " Check RUNPOD_API_KEY.",
        403: " Check RUNPOD_API_KEY and that the key may use this endpoint.",
        404: " Check the endpoint id / --base-url (a finished job's result is kept 30 min).",
        413: " The request is too large; pass URLs instead of local files.",
    }.get(status, "")
    short = excerpt(text)
    shown = f": {short}" if short else ""
    return f"{method} {path} failed with HTTP {status}{shown}.{hint}"


def _json(text: str, method: str, path: str) -> Any:
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        raise ApiError(f"{method} {path}: the answer is not JSON: {excerpt(text)!r}.") from None


def _as_doc(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("status", ""), str):
        raise ApiError(f"{what}: unexpected answer {json.dumps(doc)[:200]}.")
    return doc
