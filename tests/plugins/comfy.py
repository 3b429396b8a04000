"""pytest plugin: the ComfyUI double (see tests/comfy_double) as fixtures.

Fixtures:
- ``comfy_double`` (async, function): a ``ComfyDouble`` running in this process on a free loopback
  port, its ``root`` a fresh tmp dir with ``input/`` and ``output/``. Change faults through
  ``comfy_double.faults`` (a ``Faults``) before or during a run.
- ``comfy_media``: writes ``ref.png`` and ``drive.mp4`` (with audio) and ``drive_silent.mp4`` into
  the double's ``input/`` and returns a ``ComfyMedia`` with their names.
- ``comfy_process``: a factory ``start(root=None, *, args=(), wait=True) -> DoubleProcess`` that
  runs ``python -m tests.comfy_double`` as a subprocess (for end-to-end tests of the handler).
  ``DoubleProcess`` has ``url``, ``host`` (``127.0.0.1:<port>``, the COMFY_HOST value), ``port``,
  ``root``, ``pid_file``, ``proc``, ``set_faults(**faults)``, ``sockets()`` (websockets open on
  the server, replaced ones included). Every process started is
  terminated at the end of the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.comfy_double import ComfyDouble, media
from tests.plugins.ports import server_port

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM a test subprocess, SIGKILL it after 10 s; a no-op when it already exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class ComfyMedia:
    image: str = "ref.png"
    video: str = "drive.mp4"
    silent_video: str = "drive_silent.mp4"


@pytest.fixture
async def comfy_double(tmp_path: Path) -> AsyncIterator[ComfyDouble]:
    double = ComfyDouble(tmp_path / "comfy")
    await double.start()
    try:
        yield double
    finally:
        await double.stop()


def write_media(input_dir: Path) -> ComfyMedia:
    names = ComfyMedia()
    media.make_image(input_dir / names.image)
    media.make_video(input_dir / names.video, frames=24, fps=24, audio=True)
    media.make_video(input_dir / names.silent_video, frames=24, fps=24, audio=False)
    return names


@pytest.fixture
def comfy_media(comfy_double: ComfyDouble) -> ComfyMedia:
    return write_media(comfy_double.input_dir)


def free_port() -> int:
    """A loopback port for a server started later (below the ephemeral range: ``ports``)."""
    return server_port()


@dataclass
class DoubleProcess:
    proc: subprocess.Popen
    port: int
    root: Path
    pid_file: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def set_faults(self, **faults: object) -> dict:
        req = urllib.request.Request(
            self.url + "/_double/faults",
            data=json.dumps(faults).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def sockets(self) -> dict:
        """``{"open": n, "registered": [client ids]}``: websockets still open on the server."""
        with urllib.request.urlopen(self.url + "/_double/sockets", timeout=5) as resp:
            return json.loads(resp.read())

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"comfy double exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("comfy double did not start")

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def comfy_process(tmp_path: Path) -> Iterator[Callable[..., DoubleProcess]]:
    started: list[DoubleProcess] = []

    def start(
        root: Path | None = None,
        *,
        args: Sequence[str] = (),
        wait: bool = True,
        media_files: bool = True,
    ) -> DoubleProcess:
        root = root or tmp_path / f"comfy-proc-{len(started)}"
        (root / "input").mkdir(parents=True, exist_ok=True)
        if media_files:
            write_media(root / "input")
        port = free_port()
        pid_file = root / "comfyui.pid"
        cmd = [
            sys.executable,
            "-m",
            "tests.comfy_double",
            "--port",
            str(port),
            "--root",
            str(root),
            "--pid-file",
            str(pid_file),
            *args,
        ]
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=(root / "double.log").open("wb")
        )
        double = DoubleProcess(proc, port, root, pid_file)
        started.append(double)
        if wait:
            double.wait_ready()
        return double

    yield start
    for double in started:
        double.stop()
