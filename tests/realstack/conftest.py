"""Real-stack tier: the real ComfyUI v0.33.0 and the five pinned packs, on the CPU.

The stack comes from ``stack/install.py`` (``.ci/run`` installs it and sets ``XICON_STACK_HOME`` to
the directory holding ``ComfyUI/`` and ``venv/``). Without that variable every test here is skipped,
unless ``XICON_REQUIRE_REALSTACK=1`` (CI sets it): then a missing stack is a failure, never a silent
skip.

Session fixtures:
- ``stack``: the installed stack (paths, its Python).
- ``realstack_base``: a ComfyUI base directory for this session (``--base-directory``):
  ``custom_nodes/`` mirrors the stack's packs file by file (so nothing a node writes, e.g.
  WanVideoWrapper's text-embedding cache, lands in the shared stack), ``models/`` holds the tiny
  synthetic model files (``scripts/make_synthetic_models.py --size tiny``), ``input/`` the shipped
  graph's two file names. The text-embedding cache is seeded for the job's prompts: the umt5-xxl
  encoder has a fixed 5.7 B parameter architecture (10.6 GiB, ~40 s per layer on two CPU cores), so
  this tier never runs it; the GPU run does.
- ``real_worker``: the project's own ``entrypoint.sh`` started as in the image, with the CPU flags
  (``--cpu``, no SageAttention, no GPU preflight), ComfyUI on one free port and the handler's local
  API (``--rp_serve_api``) on another. The handler uses the shipped graph with the CPU profile of
  ``cpu_profile.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.comfy import stop_process
from tests.realstack.cpu_profile import cpu_graph
from xicon_dance.schema import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT

ROOT = Path(__file__).resolve().parent.parent.parent
GRAPH = ROOT / "XiCON_Dance_SCAIL_vFinal.json"
STARTUP_TIMEOUT_S = 900.0  # a loaded 2-core machine imports torch and the packs slowly
TEST_TIMEOUT_S = 1800  # session set-up (models, ComfyUI start) counts against the first test
POLL_S = 0.5


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.realstack)
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


@dataclass(frozen=True)
class Stack:
    home: Path

    @property
    def comfy_dir(self) -> Path:
        return self.home / "ComfyUI"

    @property
    def python(self) -> Path:
        return self.home / "venv" / "bin" / "python"

    @property
    def record(self) -> dict:
        return json.loads((self.comfy_dir / ".xicon-stack.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen[bytes]
    comfy_url: str
    api_url: str
    base: Path
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def stack() -> Stack:
    home = os.environ.get("XICON_STACK_HOME")
    if not home:
        reason = (
            "XICON_STACK_HOME not set: install the stack with stack/install.py (see README, Tests)"
        )
        if os.environ.get("XICON_REQUIRE_REALSTACK") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    found = Stack(Path(home))
    assert found.python.is_file(), f"no venv in {home}"
    assert (found.comfy_dir / "main.py").is_file(), f"no ComfyUI in {home}"
    return found


def mirror_pack(src: Path, dest: Path) -> None:
    """A real directory whose entries link to the pack's: the pack imports as usual, and files it
    creates next to its own code land here."""
    dest.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "__pycache__":
            (dest / entry.name).symlink_to(entry)


def make_base(stack: Stack, base: Path, *, packs: set[str] | None = None) -> Path:
    """A ComfyUI base directory: mirrored packs (all, or the named ones), empty input/output."""
    for src in sorted((stack.comfy_dir / "custom_nodes").iterdir()):
        if src.is_dir() and src.name != "__pycache__" and (packs is None or src.name in packs):
            mirror_pack(src, base / "custom_nodes" / src.name)
    for sub in ("input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def generate_models(stack: Stack, base: Path) -> None:
    """Tiny synthetic model files under the manifest's names, and the seeded text cache."""
    cache = base / "custom_nodes" / "ComfyUI-WanVideoWrapper" / "text_embed_cache"
    shipped = json.loads(GRAPH.read_text(encoding="utf-8"))["368"]["inputs"]
    prompts = {
        DEFAULT_PROMPT,
        DEFAULT_NEGATIVE_PROMPT,
        shipped["positive_prompt"],
        shipped["negative_prompt"],
    }
    cmd = [str(stack.python), str(ROOT / "scripts" / "make_synthetic_models.py")]
    cmd += ["--size", "tiny", "--out", str(base / "models"), "--text-cache", str(cache)]
    for prompt in sorted(prompts):
        cmd += ["--prompt", prompt]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900)


def place_graph_inputs(base: Path, image: Path, video: Path) -> None:
    """The shipped graph's own input names (LoadImage, VHS_LoadVideo) as real files."""
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    shutil.copyfile(image, base / "input" / graph["106"]["inputs"]["image"])
    shutil.copyfile(video, base / "input" / graph["130"]["inputs"]["video"])


def job_input(media: tuple[Path, Path], **extra: Any) -> dict[str, Any]:
    """A small job for the CPU (256×256, 5 frames, 1 step) with both inputs as base64;
    ``extra`` overrides any field."""
    image, video = media
    return {
        "image_base64": base64.b64encode(image.read_bytes()).decode(),
        "video_base64": base64.b64encode(video.read_bytes()).decode(),
        "width": 256,
        "height": 256,
        "max_frames": 5,
        "steps": 1,
        "seed": 11,
        "output": "base64",
        **extra,
    }


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers; fail at once if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            pytest.fail(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            get(url, timeout=5)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(POLL_S)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def realstack_media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 256×256 reference PNG and a 1 s, 24 fps, 256×256 driving MP4 with audio."""
    from tests.plugins.media_factory import make_image, make_video

    folder = tmp_path_factory.mktemp("realstack-media")
    image = make_image(folder / "ref.png", 256, 256)
    video = make_video(folder / "drive.mp4", 256, 256, fps=24, frames=24, audio=True)
    return image, video


@pytest.fixture(scope="session")
def realstack_base(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory, realstack_media: tuple[Path, Path]
) -> Path:
    base = make_base(stack, tmp_path_factory.mktemp("realstack") / "comfy")
    generate_models(stack, base)
    place_graph_inputs(base, *realstack_media)
    return base


def entrypoint_env(stack: Stack, base: Path, comfy_port: int, api_port: int) -> dict[str, str]:
    graph = base / "graph_cpu.json"
    graph.write_text(json.dumps(cpu_graph(json.loads(GRAPH.read_text("utf-8")))), "utf-8")
    db = base / "user" / "comfyui.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "BUCKET_"))}
    env.update(
        PYTHON_BIN=str(stack.python),
        COMFY_DIR=str(base),
        COMFY_MAIN=str(stack.comfy_dir / "main.py"),
        COMFY_HOST=f"127.0.0.1:{comfy_port}",
        COMFY_PID_FILE=str(base / "comfyui.pid"),
        COMFY_LOG_FILE=str(base / "comfyui.log"),
        # the database lives in <ComfyUI>/user by default, like the image's; here in the base
        COMFY_EXTRA_ARGS=f"--cpu --base-directory {base} --database-url sqlite:///{db}",
        COMFY_STARTUP_TIMEOUT_S=str(int(STARTUP_TIMEOUT_S)),
        GPU_PREFLIGHT="0",
        SAGEATTENTION_ENABLED="0",
        POSE_RENDER_DEVICE="cpu",
        SERVE_API_LOCALLY="1",
        RP_API_PORT=str(api_port),
        WORKFLOW_PATH=str(graph),
        VOLUME_MODELS_DIR=str(base / "no-volume"),
        HF_CACHE_DIR=str(base / "no-hf-cache"),
        JOB_TIMEOUT_S="900",
        LOCAL_OUTPUT_DIR=str(base / "saved"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def real_worker(stack: Stack, realstack_base: Path) -> Iterator[Server]:
    comfy_port, api_port = free_port(), free_port()
    log = realstack_base / "worker.log"
    env = entrypoint_env(stack, realstack_base, comfy_port, api_port)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "entrypoint.sh")], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(
        proc, f"http://127.0.0.1:{comfy_port}", f"http://127.0.0.1:{api_port}", realstack_base, log
    )
    try:
        wait_for(f"{server.comfy_url}/system_stats", proc, log, STARTUP_TIMEOUT_S)
        wait_for(f"{server.api_url}/docs", proc, log, STARTUP_TIMEOUT_S)
        yield server
    finally:
        stop_process(proc)
        pid_file = realstack_base / "comfyui.pid"
        if pid_file.is_file():  # the handler replaced the shell: stop ComfyUI by its PID
            _kill_pid(int(pid_file.read_text().strip() or 0))


def _kill_pid(pid: int) -> None:
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
