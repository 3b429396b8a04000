"""Progress display for the command line: a bar redrawn in place on a terminal, else one line
per change. A sampler payload with the optional keys shows them, e.g.
``[01:05] [#######.................]  31% sampling 3/6 · window 5/27 · ETA 4m10s``."""

from __future__ import annotations

import re
import shutil
from typing import Any, TextIO

from .model import CANCEL_FAILED, CANCEL_SENT, DOWNLOADING, RETRYING, SUBMITTED, JobUpdate, Progress

BAR_WIDTH = 24


class ProgressView:
    """Draws job updates on ``stream``: a bar redrawn in place on a TTY, else one line each."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.drawn = False
        self.last: tuple[Any, ...] | None = None

    def __call__(self, update: JobUpdate) -> None:
        key = (update.status, update.progress, update.detail)
        if not self.tty and key == self.last:
            return
        self.last = key
        line = self.render(update)
        if self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)
            self.stream.write("\r\x1b[K" + line[:width])
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def note(self, text: str) -> None:
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    @staticmethod
    def render(update: JobUpdate) -> str:
        clock = _clock(update.elapsed_s)
        if update.status == SUBMITTED:
            return f"[{clock}] submitted job {update.job_id or '(local)'}"
        if update.status == DOWNLOADING:
            return f"[{clock}] saving the video"
        if update.status == RETRYING:
            return f"[{clock}] {update.detail or 'retrying'}"
        if update.status == CANCEL_SENT:
            return f"[{clock}] cancel sent for job {update.job_id}"
        if update.status == CANCEL_FAILED:
            detail = f": {update.detail}" if update.detail else ""
            return f"[{clock}] could not cancel job {update.job_id}{detail}"
        progress = update.progress
        if progress is None:
            return f"[{clock}] {update.status}"
        text = f"[{clock}] {_bar(progress.fraction)} {describe(progress)}"
        if progress.message and not _repeats(progress.message, progress):
            text += f" - {progress.message}"
        return text


def describe(progress: Progress) -> str:
    """``sampling 3/6 · window 5/27 · ETA 4m10s``; each part only when the worker sent it."""
    text = progress.stage
    if progress.step is not None and progress.total:
        text += f" {progress.step}/{progress.total}"
    parts = [text]
    if progress.window is not None and progress.windows:
        parts.append(f"window {progress.window}/{progress.windows}")
    elif progress.windows:
        parts.append(f"{progress.windows} windows")
    if progress.eta_s is not None:
        parts.append(f"ETA {eta(progress.eta_s)}")
    return " · ".join(parts)


def eta(seconds: float) -> str:
    """``45s``, ``4m10s``, ``1h05m``."""
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _repeats(message: str, progress: Progress) -> bool:
    """True when the worker's message only restates what is shown (stage, step, window, ETA)."""
    if progress.stage not in message:
        return False
    without_eta = re.sub(r"(?i)\beta\b[^,;·]*", "", message)
    numbers = {int(n) for n in re.findall(r"\d+", without_eta)}
    shown = {progress.step, progress.total, progress.window, progress.windows}
    return numbers <= {n for n in shown if n is not None}


def _bar(fraction: float | None) -> str:
    if fraction is None:
        return "[" + "." * BAR_WIDTH + "]  ?%"
    filled = round(fraction * BAR_WIDTH)
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + f"] {round(fraction * 100):3d}%"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"
