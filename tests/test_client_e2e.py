"""The command-line client end to end: ``xicon-dance run`` against the worker's own
``--rp_serve_api`` server (the RunPod SDK's local test server) in front of the ComfyUI
double. The saved file must be the real MP4 the worker produced."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from tests.plugins.comfy import DoubleProcess
from tests.plugins.media_factory import make_image, make_video
from xicon_dance.client.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _job_args(tmp_path: Path, url: str, *extra: str) -> list[str]:
    image = make_image(tmp_path / "me.png", 96, 160, "PNG")
    video = make_video(tmp_path / "dance.mp4", 64, 64, 8, 12, audio=True)
    return [
        "run", "--base-url", url, "--image", str(image), "--video", str(video),
        "--width", "256", "--height", "256", "--max-frames", "9", "--steps", "2", *extra,
    ]  # fmt: skip


def _probe(path: Path) -> tuple[int, int, int, bool]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        has_audio = bool(container.streams.audio)
        return stream.width, stream.height, frames, has_audio


@pytest.mark.parametrize("local_flag", [["--local"], []], ids=["runsync", "status-405-detected"])
def test_client_saves_the_workers_video(
    serve_api: tuple[str, DoubleProcess],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    local_flag: list[str],
) -> None:
    url, _double = serve_api
    out = tmp_path / "result.mp4"
    code = main(_job_args(tmp_path, url, "--out", str(out), "--seed", "7", *local_flag))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert _probe(out) == (256, 256, 9, True)
    assert "Seed: 7" in printed.out
    assert not out.with_name(out.name + ".part").exists()


def test_client_reports_the_workers_error(
    serve_api: tuple[str, DoubleProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _double = serve_api
    out = tmp_path / "never.mp4"
    code = main([*_job_args(tmp_path, url, "--out", str(out), "--local"), "--width", "250"])
    printed = capsys.readouterr()
    assert code == 1
    assert "width" in printed.err + printed.out
    assert "multiple of 32" in printed.err + printed.out
    assert not out.exists()
