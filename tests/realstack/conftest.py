"""Real-stack tier: the real ComfyUI v0.33.0 and the five pinned packs, on the CPU.

The stack comes from ``stack/install.py`` (``.ci/run`` installs it and sets ``XICON_STACK_HOME`` to
the directory holding ``ComfyUI/`` and ``venv/``). Without that variable every test here is skipped,
unless ``XICON_REQUIRE_REALSTACK=1`` (CI sets it): then a missing stack is a failure, never a silent
skip.

Session fixtures:
- ``stack``: the installed stack (paths, its Python; ``tests/plugins/realstack.py`` holds the
  helpers that build on it, shared with bench/soak.py).
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

At the end of the run, the terminal summary lists every fault case of ``test_faults.py`` that
ran, with its outcome and figures (CI's log says which fault cases ran and which did not).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.comfy import free_port, stop_process
from tests.plugins.media_factory import make_image, make_video
from tests.plugins.realstack import (
    ROOT,
    STARTUP_TIMEOUT_S,
    Server,
    Stack,
    entrypoint_env,
    generate_models,
    make_base,
    place_graph_inputs,
    wait_for,
)

TEST_TIMEOUT_S = 1800  # session set-up (models, ComfyUI start) counts against the first test
FAULTS = Path(__file__).parent / "test_faults.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.realstack)
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


_fault_cases: dict[str, list[str]] = {}  # test name -> [outcome, figures or reason]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keeps each fault case's outcome: its call, or the set-up or tear-down that failed or
    skipped it, with the figures its ``report`` fixture recorded."""
    if not report.nodeid.split("::", 1)[0].endswith(f"realstack/{FAULTS.name}"):
        return
    name = report.nodeid.split("::", 1)[-1]
    if report.when == "call" or not report.passed:
        figures = [v for k, v in report.user_properties if k == "fault"]
        if report.skipped and isinstance(report.longrepr, tuple):
            figures = [str(report.longrepr[2])]
        outcome = "ERROR" if report.failed and report.when != "call" else report.outcome.upper()
        known = _fault_cases.get(name)
        if known is None or known[0] == "PASSED":
            _fault_cases[name] = [outcome, "; ".join(figures)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _fault_cases:
        return
    terminalreporter.write_sep("=", f"fault cases ({FAULTS.name})")
    for name, (outcome, figures) in _fault_cases.items():
        terminalreporter.write_line(f"{outcome:<8} {name}" + (f" | {figures}" if figures else ""))
    passed = sum(outcome == "PASSED" for outcome, _ in _fault_cases.values())
    terminalreporter.write_line(f"{passed} of {len(_fault_cases)} fault cases ran and passed")


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


@pytest.fixture(scope="session")
def realstack_media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 256×256 reference PNG and a 1 s, 24 fps, 256×256 driving MP4 with audio."""
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
