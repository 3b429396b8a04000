"""``scripts/device/session.sh``'s queue of benchmark runs, with a stand-in for ``bench/gpu_run.py``
(a script that notes when it starts and ends): runs queued with ``after`` start one after the
other in the order given, even when several ``after`` calls come at once (the second used to
start at once, its previous run being only queued), and ``poll`` waits for a run still queued.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SESSION = ROOT / "scripts" / "device" / "session.sh"

STAND_IN = """#!/usr/bin/env bash
# called as: PY bench/gpu_run.py --comfy-dir D --out RUNS/NAME ...
name=""
while [ $# -gt 0 ]; do
    if [ "$1" = --out ]; then name=$(basename "$2"); fi
    shift
done
echo "start $name" >> "$ORDER"
sleep 1
echo "end $name" >> "$ORDER"
"""


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="session.sh needs pgrep (procps)")
def test_queued_runs_start_one_after_the_other(tmp_path: Path) -> None:
    runs, sage = tmp_path / "runs", tmp_path / "sage"
    (sage / "90").mkdir(parents=True)
    runs.mkdir()
    (sage / "90" / "done").write_text("0\n")
    (runs / "models.done").write_text("0\n")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    stand_in = tmp_path / "gpu_run_stand_in"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    order = tmp_path / "order.log"
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "SAGE": str(sage),
        "RUNS": str(runs),
        "CLIP": str(clip),
        "PYTHON": str(stand_in),
        "OUT": str(tmp_path),
        "ORDER": str(order),
    }

    def session(*args: str) -> str:
        done = subprocess.run(
            ["bash", str(SESSION), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return done.stdout

    session("start", "a", "--plan", "x")
    session("after", "a", "b", "--plan", "y")  # given at once: b waits for a ...
    session("after", "b", "c", "--plan", "z")  # ... and c for b, though b is only queued
    assert (runs / "c.queued").exists()
    polled = session("poll", "c", "240")  # c is still queued when the poll starts
    assert "run c: finished" in polled, polled
    assert order.read_text().split("\n")[:-1] == [
        "start a",
        "end a",
        "start b",
        "end b",
        "start c",
        "end c",
    ]
    assert not list(runs.glob("*.queued"))
    assert (tmp_path / "c.tgz").exists()
