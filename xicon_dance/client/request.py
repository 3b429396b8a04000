"""The request: job input from paths or URLs, the exact body, and the ``--out`` check."""

from __future__ import annotations

import base64
import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .model import (
    DEFAULT_BASE_URL,
    MB,
    OPTION_FIELDS,
    RUN_PAYLOAD_LIMIT,
    PayloadTooLarge,
    UsageError,
)


def is_url(value: str) -> bool:
    return value.lower().startswith(("http://", "https://"))


def default_base_url(endpoint: str) -> str:
    return DEFAULT_BASE_URL.format(endpoint=endpoint)


def build_job_input(
    image: str,
    video: str | None = None,
    *,
    limit: int = RUN_PAYLOAD_LIMIT,
    **options: Any,
) -> dict[str, Any]:
    """The job ``input``: media as URL or base64, plus the options that are not ``None``."""
    unknown = set(options) - set(OPTION_FIELDS)
    if unknown:
        raise UsageError(f"unknown job option(s): {', '.join(sorted(unknown))}.")
    job: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    media = [("image", image)] + ([("video", video)] if video else [])
    local = [(name, Path(value)) for name, value in media if not is_url(value)]
    for name, path in local:
        _check_file(name, path)
    _check_estimated_size(job, media, local, limit)
    for name, value in media:
        if is_url(value):
            job[f"{name}_url"] = value
        else:
            job[f"{name}_base64"] = base64.b64encode(Path(value).read_bytes()).decode("ascii")
    return job


def check_out(path: Path | str) -> Path:
    """``path`` if a video can be written there, else ``UsageError`` (nothing was sent).

    The real target is tried: missing folders are created and the file opened for appending
    (never truncated), then whatever did not exist before is removed again. Permission bits
    alone cannot tell (root passes ``os.access`` for ``/proc/x.mp4``, which cannot be created).
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise UsageError(
            f"--out: {out} is a folder; give a file name such as {out / 'result.mp4'}."
        )
    parent = out.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"--out: {out} lies under {existing}, which is a file, not a folder.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == parent else f" (needed to create {parent})"
        raise UsageError(f"--out: the folder {existing} is not writable{where}.")
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"--out: {out} exists and is not writable.")
    _try_writing(out)
    return out


def _try_writing(out: Path) -> None:
    """Create (then remove) or open ``out`` for appending; ``UsageError`` when that fails."""
    created: list[Path] = []
    existed = out.exists()
    try:
        for folder in reversed([out.parent, *out.parent.parents]):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        with out.open("ab"):
            pass
        if not existed:
            out.unlink()
    except OSError as exc:
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
        raise UsageError(f"--out: cannot write {out}: {reason}.") from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break


def _check_file(name: str, path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"--{name}: {path} is not a file (give a local file or an http(s) URL).")
    if not os.access(path, os.R_OK):
        raise UsageError(f"--{name}: {path} is not readable.")


def _check_estimated_size(
    job: dict[str, Any],
    media: list[tuple[str, str]],
    local: list[tuple[str, Path]],
    limit: int,
) -> None:
    """Refuse before reading: base64 makes 4 bytes of every 3."""
    urls = sum(len(value) for _, value in media if is_url(value))
    encoded = {name: 4 * ((path.stat().st_size + 2) // 3) for name, path in local}
    estimate = len(json.dumps({"input": job}, ensure_ascii=False).encode()) + urls
    estimate += sum(encoded.values()) + 64
    if estimate > limit:
        raise PayloadTooLarge(_too_large_message(estimate, limit, encoded))


def _too_large_message(size: int, limit: int, encoded: Mapping[str, int]) -> str:
    parts = ", ".join(f"{name} {n / MB:.1f} MB as base64" for name, n in encoded.items())
    shown = f" ({parts})" if parts else ""
    return (
        f"The request would be {size / MB:.1f} MB{shown}, over RunPod's {limit / MB:.0f} MB "
        "payload limit. Upload the files somewhere the worker can download them and pass "
        "their http(s) URLs instead (--image https://..., --video https://...)."
    )


def encode_request(job_input: Mapping[str, Any], limit: int = RUN_PAYLOAD_LIMIT) -> bytes:
    """The JSON body ``{"input": ...}``, refused when over ``limit`` bytes."""
    body = json.dumps({"input": dict(job_input)}, ensure_ascii=False).encode("utf-8")
    if len(body) > limit:
        encoded = {
            key.removesuffix("_base64"): len(value)
            for key, value in job_input.items()
            if key.endswith("_base64") and isinstance(value, str)
        }
        raise PayloadTooLarge(_too_large_message(len(body), limit, encoded))
    return body
