"""A newcomer's first run without a GPU: the ComfyUI double started by hand, the stack installer
without GitHub. Each test is a problem a new user hit on a fresh clone."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.comfy_double.server import COMFYUI_VERSION
from tests.plugins.comfy import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent


def double_command(port: int, root: Path) -> list[str]:
    return [sys.executable, "-m", "tests.comfy_double", "--port", str(port), "--root", str(root)]


def _locked_comfyui_version() -> str:
    components = json.loads((ROOT / "stack" / "components.json").read_text(encoding="utf-8"))
    (comfy,) = [c for c in components["components"] if c["name"] == "ComfyUI"]
    return comfy["version"].removeprefix("v")


def test_double_reports_the_locked_comfyui_version() -> None:
    assert COMFYUI_VERSION == _locked_comfyui_version() == "0.33.0"


@pytest.mark.slow
def test_double_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            double_command(port, tmp_path / "comfy"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "OSError" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"comfy-double: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(is another ComfyUI or double running there? pick another --port)"
    ]


@pytest.mark.slow
def test_standalone_double_answers_with_its_version(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        double_command(port, tmp_path / "comfy"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # waits on the double's own start-up line, no fixed sleep
            if "ComfyUI double listening on" in line:
                break
        url = f"http://127.0.0.1:{port}/system_stats"
        with urllib.request.urlopen(url, timeout=10) as resp:
            stats = json.loads(resp.read())
    finally:
        stop_process(proc)
    assert stats["system"]["comfyui_version"] == "0.33.0"
    assert "GET /system_stats" not in proc.stdout.read()  # no access-log line per request
    assert stats["system"]["pytorch_version"] == "2.11.0"  # stack/constraints.txt


@pytest.mark.slow
def test_stack_install_without_github_points_to_the_archive(tmp_path: Path) -> None:
    """``--git`` where GitHub cannot be reached: git's failure, then the way round it."""
    env = {
        **os.environ,
        # every https://github.com/ URL leads to a folder that does not exist: a real git error
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"url.file://{tmp_path}/no-such-host/.insteadOf",
        "GIT_CONFIG_VALUE_0": "https://github.com/",
    }
    places = ["--comfy-dir", str(tmp_path / "ComfyUI"), "--venv", str(tmp_path / "venv")]
    proc = subprocess.run(
        [sys.executable, "stack/install.py", "install", "--git", *places],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    (last,) = [line for line in proc.stderr.splitlines() if "fetching" in line]
    assert "ComfyUI: fetching https://github.com/Comfy-Org/ComfyUI failed" in last
    assert "--archive FILE" in last and "MANIFEST.json" in last
    assert not (tmp_path / "venv").exists()  # stopped at the first source, before any install


def readme_recipe() -> list[str]:
    """The command lines of the README's "Try it without a GPU" block."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Try it without a GPU\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_recipe_runs_a_job_without_a_gpu(tmp_path: Path) -> None:
    """The three README lines, as written, with this machine's free port and temporary folders
    in place of port 8188, /tmp/xicon-comfy and the worker's output/ folder."""
    start, run, find = readme_recipe()
    assert start.endswith("&") and "tests.comfy_double" in start
    assert run.endswith("handler.py") and find.startswith("ls ")
    port, root, out = free_port(), tmp_path / "comfy", tmp_path / "output"

    def here(line: str) -> str:
        line = line.replace(".venv/bin/python", sys.executable).replace("8188", str(port))
        return line.replace("/tmp/xicon-comfy", str(root)).replace("output/", f"{out}/")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "COMFY_"))}
    env["LOCAL_OUTPUT_DIR"] = str(out)  # where the worker saves; the README's is output/
    double = subprocess.Popen(
        shlex.split(here(start).removesuffix("&")),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert double.stdout is not None
        for line in double.stdout:  # the double's own start-up line: no fixed sleep
            if "ComfyUI double listening on" in line:
                break
        job = subprocess.run(
            here(run), shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        stop_process(double)
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-3000:]
    listed = subprocess.run(here(find), shell=True, cwd=ROOT, capture_output=True, text=True)
    (video,) = listed.stdout.split()
    assert f"saved the result video: {video} (" in logs and "81 frames" in logs
