"""The shipped default driving clip: portrait, 24 fps, about 4 s, H.264 + an audio track, small,
and reproducible from scripts/make_default_video.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "assets" / "default_video.mp4"
SCRIPT = ROOT / "scripts" / "make_default_video.py"


def _describe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return {
            "w": v.codec_context.width,
            "h": v.codec_context.height,
            "fps": float(v.average_rate),
            "codec": v.codec_context.name,
            "audio": [s.codec_context.name for s in a],
            "frames": frames,
            "duration": float(c.duration) / 1e6,
        }


def test_asset_properties() -> None:
    assert ASSET.stat().st_size < 2 * 1024 * 1024
    d = _describe(ASSET)
    assert d["h"] > d["w"], "portrait"
    assert d["w"] % 32 == 0 and d["h"] % 32 == 0
    assert d["fps"] == 24
    assert d["codec"] == "h264"
    assert d["audio"] == ["aac"]
    assert 3.0 <= d["duration"] <= 5.0
    assert len(d["frames"]) >= 81  # one SCAIL window (4n+1 frames at 16-24 fps)
    # The figure moves: frames differ, and the loop is not a still image.
    diffs = [np.abs(d["frames"][i].astype(int) - d["frames"][i + 6]).mean() for i in (0, 20, 40)]
    assert min(diffs) > 1.0


def test_audio_track_has_a_beat() -> None:
    with av.open(str(ASSET)) as c:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert np.abs(samples).max() > 0.3  # not silence


@pytest.mark.slow
def test_script_reproduces_the_asset(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, timeout=120)
    fresh, shipped = _describe(out), _describe(ASSET)
    assert len(fresh["frames"]) == len(shipped["frames"])
    # Same drawing; encoder builds may differ by a few code values, not by content.
    for a, b in zip(fresh["frames"][::12], shipped["frames"][::12], strict=True):
        assert np.abs(a.astype(int) - b).mean() < 2.0
