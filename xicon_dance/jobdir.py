"""The per-job input folder and the threads that write into it.

Contract:
- ``async with job_folder(settings, job_id) as folder:`` creates ``<comfy_input_dir>/jobs/<safe
  id>`` empty and yields a ``JobFolder``; on exit (success, failure, timeout or cancel) it first
  waits for every thread the folder started, then removes the folder, once.
- ``JobFolder.path`` is the folder. ``await folder.run(fn, *args)`` runs blocking work (base64
  decode, copy, image decode, video probe) in the folder's own thread pool (threads named
  ``THREAD_PREFIX``...). A thread cannot be cancelled: when the awaiting task is cancelled,
  ``run`` sets ``folder.stop`` (long loops check it and give up early) and waits for the thread
  to end before ``CancelledError`` goes on. So nothing the job started still runs, or writes into
  the folder, once the ``async with`` block is left: no CPU busy with a hostile file into the
  next job, no file landing in a folder already removed.
- ``safe_job_id(job_id)``: a folder name with safe characters only (a hash suffix when the id
  had to change), never ``..`` or empty.
- Waiting and removal run off the event loop (in a thread joined before the exit returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .settings import Settings

log = logging.getLogger(__name__)

THREAD_PREFIX = "xicon-job-io"
MAX_THREADS = 2  # the image and the video are fetched concurrently
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")
T = TypeVar("T")


def safe_job_id(job_id: str) -> str:
    """A folder name for ``job_id``: safe characters only, a hash suffix if anything changed."""
    cleaned = _SAFE_ID.sub("_", job_id)[:80].strip(".") or "job"
    if cleaned != job_id:
        cleaned += "-" + hashlib.sha256(job_id.encode()).hexdigest()[:10]
    return cleaned


class JobFolder:
    """One job's input folder; owns the threads that write into it (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stop = threading.Event()
        self._pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix=THREAD_PREFIX)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in this folder's thread pool; a cancel waits for the thread to end."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.stop.set()
            with contextlib.suppress(Exception):  # the outcome is nobody's any more
                await _join(future)
            raise

    async def close(self) -> None:
        """Stop and join every thread of the folder (off the loop), then remove the folder."""
        self.stop.set()
        await _join(asyncio.ensure_future(asyncio.to_thread(self._finish)))

    def _finish(self) -> None:
        self._pool.shutdown(wait=True)  # every writer has ended: nothing can land after this
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            log.error("could not remove job folder %s", self.path.name)


@contextlib.asynccontextmanager
async def job_folder(settings: Settings, job_id: str) -> AsyncIterator[JobFolder]:
    """``<comfy_input_dir>/jobs/<safe id>``, created empty, removed on exit (even on failure)."""
    path = Path(settings.comfy_input_dir) / "jobs" / safe_job_id(job_id)
    folder = JobFolder(path)
    try:  # a cancel while the folder is made still waits for it, and removes it
        await _join(asyncio.ensure_future(asyncio.to_thread(_create, path)))
        yield folder
    finally:
        await folder.close()


def _create(path: Path) -> None:
    if path.exists():
        log.warning("job folder %s already existed; replacing it", path.name)
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


async def _join(future: asyncio.Future[T]) -> T:
    """Wait until ``future`` is done even if this task is cancelled meanwhile (its work runs in a
    thread that cannot be stopped); then pass on a cancel that arrived, else its outcome."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not future.cancelled():
            future.exception()  # retrieved: nobody wants the outcome any more
        raise asyncio.CancelledError
    return future.result()
