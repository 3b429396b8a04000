"""Logging: job id on every record, secrets redacted from messages, arguments and tracebacks."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xicon_dance import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    handler.addFilter(logs.JobFilter())
    logger = logging.getLogger("xicon_dance.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_job_id_on_every_line_and_reset_after(captured: io.StringIO) -> None:
    log = logging.getLogger("xicon_dance.test_logs")
    with logs.job_context("job-123"):
        log.info("one")
        log.warning("two %s", "args")
    log.info("outside")
    lines = captured.getvalue().splitlines()
    assert "[job=job-123]" in lines[0] and "[job=job-123]" in lines[1] and "two args" in lines[1]
    assert "[job=-]" in lines[2]


async def test_concurrent_tasks_keep_their_own_job_id(captured: io.StringIO) -> None:
    log = logging.getLogger("xicon_dance.test_logs")

    async def job(job_id: str) -> None:
        with logs.job_context(job_id):
            for _ in range(3):
                log.info("working on %s", job_id)
                await asyncio.sleep(0)

    await asyncio.gather(job("a"), job("b"))
    for line in captured.getvalue().splitlines():
        tag = line.split("[job=")[1].split("]")[0]
        assert line.endswith(f"working on {tag}")


def test_presigned_urls_and_key_values_are_redacted() -> None:
    url = (
        "https://s3.example.com/b/results/j/v.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=abcdef0123&X-Amz-Expires=60"
    )
    out = logs.redact(f"uploaded to {url}")
    assert "AKIAEXAMPLE" not in out and "abcdef0123" not in out
    assert out.startswith("uploaded to https://s3.example.com/b/results/j/v.mp4?X-Amz-Algorithm=")
    assert "api_key=[REDACTED]" in logs.redact("call with api_key=sk-live-123")
    assert "sk-live" not in logs.redact('{"RUNPOD_API_KEY": "rpa_abc"}')
    assert "tok" not in logs.redact("Authorization: Bearer tok123456")
    assert "AWSAccessKeyId=[REDACTED]" in logs.redact("x?AWSAccessKeyId=AKIA1&Signature=zz")


def test_registered_secrets_are_masked_everywhere(captured: io.StringIO) -> None:
    logs.register_secret("very-secret-bucket-key")
    logs.register_secret("")  # ignored
    log = logging.getLogger("xicon_dance.test_logs")
    log.error("failed with %s", "very-secret-bucket-key")
    try:
        raise RuntimeError("boom very-secret-bucket-key")
    except RuntimeError:
        log.exception("upload failed")
    text = captured.getvalue()
    assert "very-secret-bucket-key" not in text
    assert text.count(logs.MASK) >= 2 and "Traceback" in text


def test_setup_logging_is_idempotent_and_registers_secrets() -> None:
    from pydantic import SecretStr

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        first = logs.setup_logging("DEBUG", secrets=(SecretStr("s3cr3t-from-settings"),))
        second = logs.setup_logging("INFO")
        assert first is second
        assert logs.redact("key s3cr3t-from-settings") == f"key {logs.MASK}"
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)


def test_signed_urls_of_any_provider_lose_their_query_values() -> None:
    """Input URLs may be GCS- or Azure-signed, not only S3-presigned: no query value of an http(s)
    URL survives, the host, path and parameter names do."""
    gcs = (
        "https://storage.googleapis.com/b/o.mp4?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        "&X-Goog-Credential=sa%40p.iam.gserviceaccount.com&X-Goog-Signature=deadbeef42"
    )
    sas = "https://acct.blob.core.windows.net/c/v.mp4?sv=2022-11-02&se=2026-01-01&sig=AbC%2Bd"
    other = "http://cdn.example.com/v.mp4?access_token=opensesame&Key-Pair-Id=K2JCJ"
    out = logs.redact(f"GET {gcs} failed; also {sas} and '{other}'")
    for secret in ("deadbeef42", "gserviceaccount", "AbC%2Bd", "2026-01-01", "opensesame", "K2JCJ"):
        assert secret not in out
    assert "https://storage.googleapis.com/b/o.mp4?X-Goog-Algorithm=[REDACTED]&" in out
    assert "http://cdn.example.com/v.mp4?access_token=[REDACTED]&Key-Pair-Id=[REDACTED]'" in out


def test_redacting_stream_masks_lines_split_over_writes() -> None:
    """``print`` writes the message and the newline apart; a URL split over writes is masked."""
    inner = io.StringIO()
    stream = logs.RedactingStream(inner)
    url = "https://s3.example.com/b/k.mp4?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=cafe01"
    print(f"DEBUG  | job | Handler output: {{'url': '{url}'}}", file=stream)
    stream.write("partial https://h/x?X-Amz-Sig")
    stream.write("nature=beef02")
    assert "beef02" not in inner.getvalue() and "cafe01" not in inner.getvalue()
    assert "partial" not in inner.getvalue()  # held until its line ends or a flush
    stream.flush()
    text = inner.getvalue()
    assert "AKIAXYZ" not in text and "cafe01" not in text and "beef02" not in text
    assert "X-Amz-Signature=[REDACTED]" in text and text.count("\n") == 1
    assert stream.getvalue() == inner.getvalue()  # other attributes are the inner stream's


def test_redact_std_streams_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    logs.redact_std_streams()
    logs.redact_std_streams()
    import sys

    assert isinstance(sys.stdout, logs.RedactingStream) and sys.stdout.inner is out
    assert isinstance(sys.stderr, logs.RedactingStream) and sys.stderr.inner is err
    logs.register_secret("printed-secret-42")
    print("key printed-secret-42 here")
    sys.stdout.flush()
    assert out.getvalue() == f"key {logs.MASK} here\n"


def _timed_writes(count: int, piece: str) -> float:
    """Seconds for ``count`` writes of ``piece`` (no line end) and a final flush; best of 3."""
    best = float("inf")
    for _ in range(3):
        stream = logs.RedactingStream(io.StringIO())
        started = time.perf_counter()
        for _ in range(count):
            stream.write(piece)
        stream.write("\n")
        best = min(best, time.perf_counter() - started)
    return best


def test_redacting_stream_cost_is_linear_in_the_writes() -> None:
    """Many small writes of one long line: the held text is not rescanned on every write."""
    piece = "tick 0123456789 "
    small, large = _timed_writes(20_000, piece), _timed_writes(200_000, piece)
    assert large <= 15 * small, (small, large)


def test_redacting_stream_holds_a_bounded_amount() -> None:
    inner = io.StringIO()
    stream = logs.RedactingStream(inner)
    word = "w" * 100 + " "
    for _ in range(3 * logs.RedactingStream.HOLD_CHARS // len(word)):
        stream.write(word)
    assert stream._held_chars <= logs.RedactingStream.HOLD_CHARS
    assert len(inner.getvalue()) >= logs.RedactingStream.HOLD_CHARS  # written as it went
    stream.write("x" * (3 * logs.RedactingStream.HOLD_CHARS))  # one word, no whitespace
    stream.write("y")
    assert stream._held_chars <= logs.RedactingStream.TAIL_CHARS + 1


def test_redacting_stream_catches_a_secret_split_across_many_writes() -> None:
    logs.register_secret("split-secret-value-77")
    inner = io.StringIO()
    stream = logs.RedactingStream(inner)
    for char in "key split-secret-value-77 and token=hunter2-xyz\n":
        stream.write(char)
    text = inner.getvalue()
    assert "split-secret" not in text and "hunter2" not in text
    assert text == f"key {logs.MASK} and token={logs.MASK}\n"


def test_redacting_stream_buffer_writes_are_redacted_in_order() -> None:
    logs.register_secret("bytes-secret-31337")
    inner = io.StringIO()
    stream = logs.RedactingStream(inner)
    stream.write("text first, ")
    written = stream.buffer.write(b"then bytes-secr")
    stream.buffer.write("et-31337 é https://h/v?X-Amz-Signature=abc\n".encode())
    stream.buffer.write("é".encode()[:1])  # half a character: decoded once the rest arrives
    stream.buffer.write("é".encode()[1:] + b"\n")
    text = inner.getvalue()
    assert written == len(b"then bytes-secr")
    assert "31337" not in text and "abc" not in text
    assert text == f"text first, then {logs.MASK} é https://h/v?X-Amz-Signature={logs.MASK}\né\n"


def test_redacting_stream_is_a_text_stream(tmp_path: Path) -> None:
    with (tmp_path / "out.txt").open("w", encoding="utf-8") as inner:
        stream = logs.RedactingStream(inner)
        assert isinstance(stream, io.TextIOBase)
        assert stream.writable() and not stream.readable()
        assert stream.write("abc") == 3
        assert stream.fileno() == inner.fileno() and stream.isatty() is False
        assert stream.encoding == "utf-8" and stream.buffer.writable()
        stream.writelines(["x\n", "y\n"])
        stream.close()  # writes what is held; the inner file stays open
        assert stream.closed and not inner.closed
    assert (tmp_path / "out.txt").read_text() == "abcx\ny\n"
