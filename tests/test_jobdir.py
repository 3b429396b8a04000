"""The job folder and its threads (``xicon_dance.jobdir``), without a worker around them: a
cancel, even a repeated one, waits for the thread; errors of the thread reach the caller; the
folder is gone and no thread of it is left after the ``async with``."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest

from xicon_dance import jobdir
from xicon_dance.settings import Settings


def job_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(jobdir.THREAD_PREFIX)]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dataclasses.replace(Settings(), comfy_input_dir=tmp_path / "input")


async def test_repeated_cancels_still_wait_for_the_thread(settings: Settings) -> None:
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def work(folder: Path) -> None:
        started.set()
        assert release.wait(30)
        (folder / "late.bin").write_bytes(b"x")  # lands before the folder is removed
        ended.set()

    async def job() -> None:
        async with jobdir.job_folder(settings, "j") as folder:
            await folder.run(work, folder.path)

    task = asyncio.create_task(job())
    assert await asyncio.to_thread(started.wait, 30)
    for _ in range(3):  # the platform's cancel, then the SDK's, then a timeout's
        task.cancel()
        await asyncio.sleep(0)
    assert not task.done() and not ended.is_set()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended.is_set() and job_threads() == []
    assert not (Path(settings.comfy_input_dir) / "jobs" / "j").exists()


async def test_errors_of_the_thread_and_of_the_folder_reach_the_caller(
    settings: Settings, tmp_path: Path
) -> None:
    def fail() -> None:
        raise ValueError("bad bytes")

    with pytest.raises(ValueError, match="bad bytes"):
        async with jobdir.job_folder(settings, "j") as folder:
            await folder.run(fail)
    assert not folder.path.exists() and job_threads() == []
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")
    with pytest.raises(OSError):
        async with jobdir.job_folder(dataclasses.replace(settings, comfy_input_dir=blocked), "j"):
            pass


async def test_a_leftover_folder_of_the_same_id_is_replaced(settings: Settings) -> None:
    stale = Path(settings.comfy_input_dir) / "jobs" / "j"
    stale.mkdir(parents=True)
    (stale / "old.png").write_bytes(b"old")
    async with jobdir.job_folder(settings, "j") as folder:
        assert folder.path == stale and list(stale.iterdir()) == []
    assert not stale.exists()
