"""ComfyUI's start to ready on a fresh copy of the stack, as a new container starts it, against
the same with its Python files compiled ahead (what the image does at build).

A serverless worker starts from the image's files every time. Python then compiles every module
of ComfyUI and the packs it imports (the stack's sources come from git, without ``.pyc`` files),
ComfyUI creates and migrates its database, and matplotlib builds its font cache; a second start on
the same files does none of that. This copies the stack's ComfyUI (its ``models`` folder linked,
every ``__pycache__`` left out) to a temporary folder and times, on the CPU, ComfyUI's spawn until
``/system_stats`` answers:

- ``fresh``: as a new container without compiled files (new database, empty matplotlib cache);
- ``again``: a second start on the same copy (everything above done by the first);
- ``compiled``: a new copy compiled by ``python -m compileall`` before the start (its time is
  printed apart: the image pays it once, at build), with a new database and matplotlib cache;
- ``compiled_cached``: the same, with matplotlib's font cache from an earlier start kept.

Each is repeated ``--repeat`` times (a new copy each time where the case needs one); the median
is printed. Usage, with the stack (``XICON_STACK_HOME`` as for the real-stack tests)::

    python bench/cold_start.py [--repeat 3] [--cases fresh,again,compiled,compiled_cached]

Say on what machine it ran; GPU machines add CUDA's start-up, which this leaves out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CASES = ("fresh", "again", "compiled", "compiled_cached")
READY_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def copy_stack(comfy: Path, dest: Path) -> Path:
    """ComfyUI's tree without compiled files; its models folder linked, not copied."""
    top = {"models", "output", "temp", "user"}  # ComfyUI's own folders, at the top only

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        return skipped | (top & set(names) if Path(folder) == comfy else set())

    shutil.copytree(comfy, dest, ignore=ignore, symlinks=True)
    (dest / "models").symlink_to((comfy / "models").resolve())
    return dest


def start_to_ready(python: str, comfy: Path, state: Path, mpl: Path) -> float:
    """Seconds from spawning ComfyUI on the CPU until ``/system_stats`` answers; then stopped."""
    port = free_port()
    state.mkdir(parents=True, exist_ok=True)
    empty = state / "empty-frontend"
    for folder in (empty, state / "user", state / "output"):
        folder.mkdir(exist_ok=True)
    cmd = [python, "-u", str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
           str(port), "--disable-auto-launch", "--front-end-root", str(empty),
           "--user-directory", str(state / "user"),
           "--database-url", f"sqlite:///{state / 'comfyui.db'}",
           "--output-directory", str(state / "output"), "--temp-directory", str(state)]  # fmt: skip
    env = {**os.environ, "MPLCONFIGDIR": str(mpl), "CUDA_VISIBLE_DEVICES": ""}
    with open(state / "comfyui.log", "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=comfy)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited ({proc.returncode}); see {log.name}")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2)
                    return time.perf_counter() - t0
                except OSError:
                    if time.perf_counter() - t0 > READY_TIMEOUT_S:
                        raise RuntimeError("ComfyUI did not answer") from None
                    time.sleep(0.1)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args(argv)
    home = os.environ.get("XICON_STACK_HOME")
    if not home:
        print("XICON_STACK_HOME is not set: install the stack (stack/install.py) first")
        return 2
    python, comfy = str(Path(home) / "venv" / "bin" / "python"), Path(home) / "ComfyUI"
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        print(f"--cases: unknown {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
        return 2
    times: dict[str, list[float]] = {c: [] for c in cases}
    compile_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kept_mpl = root / "mpl-kept"
        for i in range(args.repeat):
            run = root / f"run{i}"
            if {"fresh", "again"} & set(cases):
                copy = copy_stack(comfy, run / "plain")
                first = start_to_ready(python, copy, run / "plain-state", run / "mpl-plain")
                if "fresh" in cases:
                    times["fresh"].append(first)
                if "again" in cases:
                    times["again"].append(
                        start_to_ready(python, copy, run / "plain-state", run / "mpl-plain")
                    )
            if {"compiled", "compiled_cached"} & set(cases):
                copy = copy_stack(comfy, run / "compiled")
                t0 = time.perf_counter()
                subprocess.run([python, "-m", "compileall", "-q", "-j", "0", str(copy)], check=True)
                compile_s.append(time.perf_counter() - t0)
                if "compiled" in cases:
                    times["compiled"].append(
                        start_to_ready(python, copy, run / "c-state", run / "mpl-compiled")
                    )
                if "compiled_cached" in cases:
                    if not kept_mpl.exists():  # matplotlib's cache, made by one start
                        start_to_ready(python, copy, run / "mpl-state", kept_mpl)
                    times["compiled_cached"].append(
                        start_to_ready(python, copy, run / "cc-state", kept_mpl)
                    )
            shutil.rmtree(run, ignore_errors=True)
    print(f"ComfyUI start to ready on the CPU, {os.cpu_count()} cores, {args.repeat} repeats")
    for case, values in times.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"{case:16s} median {statistics.median(values):5.1f} s  ({shown})")
    if compile_s:
        shown = ", ".join(f"{v:.1f}" for v in compile_s)
        median = statistics.median(compile_s)
        print(f"compileall of the copy (once, at build): median {median:.1f} s ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
