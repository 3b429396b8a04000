"""Input downloads: one URL into one file, under every guard.

Contract:
- ``await download(url, dest, max_bytes, field, settings) -> int`` streams ``url`` into ``dest``
  and returns the byte count; every failure is an ``InputError(field=field)`` with a clear
  sentence (codes ``url_forbidden``, ``unsupported_url``, ``download_failed``, ``too_large``).
- Guards: http/https only; the SSRF policy of ``xicon_dance.netguard`` after DNS resolution
  (``GuardedResolver``) and on every redirect hop (at most ``MAX_REDIRECTS``); the byte cap
  checked on Content-Length and while streaming; connect and between-bytes read timeouts; no
  proxy from the environment; no compression asked for.
- Retries (tenacity): ``settings.download_retries`` attempts on connection errors, timeouts and
  5xx, waiting ``RETRY_BACKOFF_S * 2**n`` (at most ``RETRY_BACKOFF_MAX_S``) between; a 4xx, a
  refused address or a cap overrun fails at once.
- Messages show a URL without its query string (presigned URLs carry credentials there).
- ``too_large(field, max_bytes, why)``: the one ``too_large`` error of every input source.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from .errors import InputError
from .netguard import (
    ForbiddenAddress,
    GuardedResolver,
    check_url_target,
    display_url,
    to_url,
)
from .settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 8.0
CHUNK_BYTES = 256 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
# Media is already compressed; identity also keeps the Content-Length pre-check meaningful (a
# server that compresses anyway is decoded, and the cap still counts the decoded bytes).
_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "xicon-dance-worker"}


class _Retryable(Exception):
    """A failure worth another attempt (connection problem, timeout, 5xx)."""


async def download(url: str, dest: Path, max_bytes: int, field: str, settings: Settings) -> int:
    """Stream ``url`` into ``dest`` under every guard; returns the byte count."""
    attempts = max(1, settings.download_retries)
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.download_connect_timeout_s,
        sock_read=settings.download_read_timeout_s,
    )

    def before_sleep(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: attempt %d failed (%s); retrying in %.1fs",
            field,
            state.attempt_number,
            failure,
            delay,
        )

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=RETRY_BACKOFF_S, max=RETRY_BACKOFF_MAX_S),
        retry=retry_if_exception_type(_Retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                connector = aiohttp.TCPConnector(
                    resolver=GuardedResolver(settings.allow_private_urls), use_dns_cache=False
                )
                async with aiohttp.ClientSession(
                    connector=connector, timeout=timeout, trust_env=False, headers=_HEADERS
                ) as session:
                    return await _download_once(session, url, dest, max_bytes, field, settings)
    except _Retryable as exc:
        raise InputError(
            f"{field}: the download failed after {attempts} attempt(s): {exc}.",
            field=field,
            code="download_failed",
        ) from None
    raise AssertionError("unreachable: tenacity re-raises the last failure")


async def _download_once(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    max_bytes: int,
    field: str,
    settings: Settings,
) -> int:
    current = to_url(url)
    for hop in range(MAX_REDIRECTS + 1):
        _check_hop(current, field, settings, first=hop == 0)
        try:
            async with session.get(current, allow_redirects=False) as resp:
                if resp.status in _REDIRECTS:
                    current = _next_hop(current, resp, field)
                    continue
                _check_status(resp, current, field)
                return await _stream_body(resp, dest, max_bytes, field)
        except (InputError, _Retryable):
            raise
        except Exception as exc:
            forbidden = _forbidden_cause(exc)
            if forbidden is not None:
                raise InputError(
                    f"{field}: refused to connect to {display_url(current)}: {forbidden}.",
                    field=field,
                    code="url_forbidden",
                ) from None
            if isinstance(exc, aiohttp.InvalidURL):
                raise InputError(
                    f"{field}: {display_url(current)} is not a usable URL.",
                    field=field,
                    code="unsupported_url",
                ) from None
            if isinstance(exc, asyncio.TimeoutError | aiohttp.ClientError | OSError):
                raise _Retryable(_describe(exc, current)) from None
            raise
    raise InputError(
        f"{field}: more than {MAX_REDIRECTS} redirects starting at {display_url(url)}.",
        field=field,
        code="download_failed",
    )


def _check_hop(url: URL, field: str, settings: Settings, *, first: bool) -> None:
    try:
        check_url_target(url, settings.allow_private_urls)
    except ForbiddenAddress as exc:
        where = "" if first else " (reached by a redirect)"
        raise InputError(
            f"{field}: refused to connect to {display_url(url)}{where}: {exc}.",
            field=field,
            code="url_forbidden",
        ) from None
    except ValueError as exc:
        where = "" if first else "a redirect target "
        raise InputError(
            f"{field}: {where}{display_url(url)} {exc}.", field=field, code="unsupported_url"
        ) from None


def _next_hop(current: URL, resp: aiohttp.ClientResponse, field: str) -> URL:
    location = resp.headers.get("Location", "")
    if not location:
        raise InputError(
            f"{field}: {display_url(current)} answered a redirect without a Location.",
            field=field,
            code="download_failed",
        )
    try:
        return current.join(to_url(location))
    except ValueError:
        raise InputError(
            f"{field}: {display_url(current)} redirected to an unparsable location.",
            field=field,
            code="download_failed",
        ) from None


def _check_status(resp: aiohttp.ClientResponse, url: URL, field: str) -> None:
    if resp.status >= 500:
        raise _Retryable(f"{display_url(url)} answered HTTP {resp.status}")
    if resp.status != 200:
        reason = f" {resp.reason}" if resp.reason else ""
        raise InputError(
            f"{field}: {display_url(url)} answered HTTP {resp.status}{reason}.",
            field=field,
            code="download_failed",
        )


async def _stream_body(resp: aiohttp.ClientResponse, dest: Path, max_bytes: int, field: str) -> int:
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise too_large(field, max_bytes, f"the server announces {resp.content_length} bytes")
    total = 0
    with dest.open("wb") as out:
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            total += len(chunk)
            if total > max_bytes:
                raise too_large(field, max_bytes, "the download grew past it")
            out.write(chunk)
    if total == 0:
        raise InputError(
            f"{field}: {display_url(resp.url)} returned an empty body.",
            field=field,
            code="download_failed",
        )
    return total


def _forbidden_cause(exc: BaseException) -> ForbiddenAddress | None:
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ForbiddenAddress):
            return cur
        stack += [cur.__cause__, cur.__context__, getattr(cur, "os_error", None)]
    return None


def _describe(exc: BaseException, url: URL) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"timed out talking to {display_url(url)}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"the body from {display_url(url)} was cut short"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect to {display_url(url)}"
    return f"{type(exc).__name__} from {display_url(url)}"


def too_large(field: str, max_bytes: int, why: str) -> InputError:
    return InputError(
        f"{field}: larger than the limit of {max_bytes} bytes ({why}).",
        field=field,
        code="too_large",
    )
