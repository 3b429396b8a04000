"""Logging: the job id on every line, secrets never printed.

Contract:
- ``setup_logging(level)`` configures the root logger once (idempotent): one stream handler whose
  format carries ``[job=<id>]``; a ``JobFilter`` that stamps ``record.job_id`` from a context
  variable and redacts the formatted message of every record (``-`` outside a job).
- ``job_context(job_id)`` context manager sets the job id for the current task/thread (a
  ``contextvars`` variable, so concurrent asyncio tasks do not mix ids).
- ``register_secret(value)`` adds a literal (bucket keys, API keys) to the redaction list;
  ``setup_logging`` registers the bucket keys from settings when given.
- ``redact(text) -> str`` removes registered secrets, every query value of an http(s) URL
  (presigned/signed URLs of any provider carry credentials there; parameter names are kept),
  stray signed-query fragments (``X-Amz-*``, ``X-Goog-*``, ``Signature=``, ``AWSAccessKeyId=``),
  ``Authorization`` headers and common ``key=value`` secrets (api_key, token, secret, password).
- ``redact_std_streams()`` replaces ``sys.stdout``/``sys.stderr`` with ``RedactingStream``s:
  whatever is printed in this process, by any component and at any level, passes through
  ``redact`` line by line (``sys.stdout.buffer`` writes too), at a cost linear in what is
  written, holding at most about one MiB of an unfinished line. It exists for the RunPod SDK,
  whose logger ``print``s directly (its DEBUG lines carry the handler's whole result,
  presigned URL included) and never reaches ``logging``; uvicorn and tracebacks of uncaught
  exceptions are covered too. Idempotent.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import io
import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_job_id: contextvars.ContextVar[str] = contextvars.ContextVar("xicon_job_id", default="-")
_secrets: set[str] = set()

FORMAT = "%(asctime)s %(levelname)s [job=%(job_id)s] %(name)s: %(message)s"
MASK = "[REDACTED]"

# Every query value of an http(s) URL: signed URLs carry credentials under many names (S3
# X-Amz-*, GCS X-Goog-*, Azure SAS sig/se/sp, CloudFront Signature/Key-Pair-Id, access_token...).
_URL_QUERY = re.compile(r"(?i)\bhttps?://[^\s?#\"'<>]*\?[^\s#\"'<>]*")
_QUERY_VALUE = re.compile(r"=[^&]*")
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:X-Amz-[A-Za-z-]+|X-Goog-[A-Za-z-]+|Signature|AWSAccessKeyId|token|sig)=)"
    r"[^&\s\"'<>]*"
)
_HEADER_SECRET = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?:bearer\s+)?[^\s\"',]+")
_KV_SECRET = re.compile(
    r"(?i)\b((?:api[_-]?key|access[_-]?key(?:[_-]?id)?|secret(?:[_-]?access)?[_-]?key|secret"
    r"|password|passwd|token|runpod_api_key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}&]+"
)


def current_job_id() -> str:
    return _job_id.get()


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every log record emitted inside the block with ``job_id``."""
    token = _job_id.set(str(job_id))
    try:
        yield
    finally:
        _job_id.reset(token)


def register_secret(value: str | None) -> None:
    """Add a literal secret to be masked wherever it appears (ignores short/empty values)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """Text with secrets, presigned query strings and credential key/values masked."""
    if not text:
        return text
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_QUERY.sub(lambda m: _QUERY_VALUE.sub("=" + MASK, m.group(0)), text)
    text = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, text)
    text = _HEADER_SECRET.sub(lambda m: m.group(1) + MASK, text)
    return _KV_SECRET.sub(lambda m: m.group(1) + MASK, text)


class JobFilter(logging.Filter):
    """Stamps ``record.job_id`` and replaces the message with its redacted, formatted form."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _job_id.get()
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "job_id"):
            record.job_id = _job_id.get()
        return redact(super().format(record))


_HANDLER_MARK = "_xicon_dance_handler"


def setup_logging(level: str = "INFO", *, secrets: tuple[Any, ...] = ()) -> logging.Handler:
    """Configure the root logger once; later calls only update the level and secrets."""
    for value in secrets:
        getter = getattr(value, "get_secret_value", None)
        register_secret(getter() if getter else value)
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if getattr(handler, _HANDLER_MARK, False):
            return handler
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(_RedactingFormatter(FORMAT))
    handler.addFilter(JobFilter())
    root.addHandler(handler)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


class RedactingStream(io.TextIOBase):
    """A text stream that writes ``redact``-ed lines to ``inner``.

    Text is held until its line ends, so a secret split over several ``write`` calls (``print``
    writes the message and the newline separately) is still seen whole; ``flush`` writes a held
    partial line too. Each write is searched only for a line end (the held part is never
    rescanned), so the cost is linear in what is written. What is held is bounded: past
    ``HOLD_CHARS`` the text up to its last whitespace is written (a secret never spans
    whitespace); the trailing word is kept, up to ``TAIL_CHARS``. ``buffer`` takes bytes (as
    ``sys.stdout.buffer`` does) and sends them through the same redaction, in order with the
    text (decoded incrementally with ``encoding``; undecodable bytes become U+FFFD).
    ``fileno``, ``isatty``, ``encoding`` and ``errors`` are the inner stream's; the inner stream
    is never closed here."""

    HOLD_CHARS = 1 << 20
    TAIL_CHARS = 8192

    def __init__(self, inner: TextIO) -> None:
        super().__init__()
        self.inner = inner
        self._held: list[str] = []
        self._held_chars = 0
        self._lock = threading.RLock()
        self._buffer: _RedactingBuffer | None = None

    # -- text stream protocol
    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.inner, "errors", None)

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return self.inner.isatty()

    @property
    def buffer(self) -> _RedactingBuffer:
        """A binary view: bytes are decoded with ``encoding`` and redacted like text."""
        with self._lock:
            if self._buffer is None:
                self._buffer = _RedactingBuffer(self)
            return self._buffer

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            end = text.rfind("\n")
            if end < 0:
                self._held.append(text)
                self._held_chars += len(text)
                if self._held_chars > self.HOLD_CHARS:
                    self._spill()
                return len(text)
            line = "".join([*self._held, text[: end + 1]])
            rest = text[end + 1 :]
            self._held, self._held_chars = ([rest], len(rest)) if rest else ([], 0)
            self.inner.write(redact(line))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._held:
                self.inner.write(redact("".join(self._held)))
                self._held, self._held_chars = [], 0
            self.inner.flush()

    def close(self) -> None:
        """Write what is held; the inner stream stays open (it is usually the process's)."""
        if not self.closed:
            with contextlib.suppress(ValueError, OSError):
                self.flush()
        super().close()

    def _spill(self) -> None:
        """Write the held text up to its last whitespace; keep the trailing word (bounded)."""
        text = "".join(self._held)
        cut = max(text.rfind(c) for c in " \t\r\f\v") + 1
        cut = max(cut, len(text) - self.TAIL_CHARS)
        self.inner.write(redact(text[:cut]))
        rest = text[cut:]
        self._held, self._held_chars = ([rest], len(rest)) if rest else ([], 0)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class _RedactingBuffer(io.RawIOBase):
    """``RedactingStream.buffer``: bytes go through the text stream's redaction, in order."""

    def __init__(self, stream: RedactingStream) -> None:
        super().__init__()
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder(stream.encoding)(errors="replace")

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def write(self, data: Any) -> int:
        raw = bytes(data)
        with self._stream._lock:
            text = self._decoder.decode(raw)
            if text:
                self._stream.write(text)
        return len(raw)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        super().close()  # the text stream (and the inner one) stay open


def redact_std_streams() -> None:
    """Route everything printed in this process through ``redact`` (see the module notes)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
