"""Start-up check: the folder the worker writes inputs to is the folder ComfyUI reads them from.

Contract:
- ``await check_input_folder(settings)`` writes a small probe file with random content into
  ``settings.comfy_input_dir`` (``COMFY_INPUT_DIR``, default ``$COMFY_DIR/input``), reads it back
  through ComfyUI's own ``GET /view?filename=<probe>&type=input`` route, and removes it again
  (also on failure). A folder that cannot be written, or ComfyUI answering anything but the
  probe's bytes, raises ``ConfigError`` naming the worker's folder and ComfyUI's (taken from the
  command line ComfyUI reports in ``GET /system_stats`` when it can be read).
- Why: with a wrong ``COMFY_DIR`` every job would fail later as ComfyUI validation ("Invalid image
  file"), which looks like a missing model rather than a wrong folder.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp

from .errors import ConfigError
from .settings import Settings

log = logging.getLogger(__name__)

TIMEOUT = aiohttp.ClientTimeout(total=30)


async def check_input_folder(settings: Settings) -> None:
    """Raise ``ConfigError`` unless ComfyUI serves a file written to ``comfy_input_dir``."""
    folder = Path(settings.comfy_input_dir)
    token = secrets.token_hex(16)
    probe = folder / f"xicon-dance-probe-{token[:12]}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token, encoding="ascii")
    except OSError as exc:
        raise ConfigError(
            f"The worker cannot write to its input folder {folder} ({exc.strerror or exc}); "
            "set COMFY_DIR to ComfyUI's folder (or COMFY_INPUT_DIR to its input folder).",
            field="COMFY_INPUT_DIR",
        ) from None
    try:
        async with aiohttp.ClientSession(settings.comfy_url, timeout=TIMEOUT) as session:
            seen = await _read_back(session, probe.name)
            if seen == token:
                log.info("input folder %s is the one ComfyUI reads", folder)
                return
            comfy_dir = await _comfy_input_dir(session)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    raise ConfigError(
        f"ComfyUI does not see the files the worker writes: the worker writes inputs to {folder} "
        f"(COMFY_INPUT_DIR, default $COMFY_DIR/input) but ComfyUI reads {comfy_dir}. Set COMFY_DIR "
        "to ComfyUI's base folder, or COMFY_INPUT_DIR to its input folder.",
        field="COMFY_INPUT_DIR",
    )


async def _read_back(session: aiohttp.ClientSession, name: str) -> str | None:
    try:
        async with session.get("/view", params={"filename": name, "type": "input"}) as resp:
            if resp.status != 200:
                return None
            return (await resp.read()).decode("ascii", "replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("could not read the probe file back from ComfyUI: %s", exc)
        return None


async def _comfy_input_dir(session: aiohttp.ClientSession) -> str:
    """ComfyUI's input folder as far as its command line tells, else a description."""
    argv: list[Any] = []
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with session.get("/system_stats") as resp:
            stats = await resp.json(content_type=None)
            argv = list(((stats or {}).get("system") or {}).get("argv") or [])
    args = [str(a) for a in argv]
    for flag, suffix in (("--input-directory", ""), ("--base-directory", "/input")):
        value = _flag_value(args, flag)
        if value:
            return value.rstrip("/") + suffix
    if args and args[0].endswith("main.py") and Path(args[0]).is_absolute():
        return str(Path(args[0]).parent / "input")
    shown = f" (started as: {' '.join(args)})" if args else ""
    return f"its own input folder, <ComfyUI folder>/input{shown}"


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    return None
