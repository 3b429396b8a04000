"""The result file: node 139's video and the transcoded clip's audio, both copied as they are."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from tests.plugins.media_factory import make_text, make_truncated, make_video
from xicon_dance.errors import ComfyError, DeliveryError
from xicon_dance.remux import finish


def packets(path: Path, kind: str) -> list[tuple[int | None, bytes]]:
    with av.open(str(path)) as c:
        streams = c.streams.audio if kind == "audio" else c.streams.video
        if not streams:
            return []
        return [(p.pts, bytes(p)) for p in c.demux(streams[0]) if p.size]


def seconds(path: Path, kind: str) -> float:
    with av.open(str(path)) as c:
        s = (c.streams.audio if kind == "audio" else c.streams.video)[0]
        return float(s.duration * s.time_base)


def atoms(path: Path) -> list[str]:
    """Top-level MP4 box names, in file order."""
    data, names, at = path.read_bytes(), [], 0
    while at + 8 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        names.append(data[at + 4 : at + 8].decode("latin-1"))
        if size < 8:
            break
        at += size
    return names


def test_video_and_audio_are_copied_packet_for_packet(tmp_path: Path) -> None:
    silent = make_video(tmp_path / "combine.mp4", 64, 64, 24, 24)
    clip = make_video(tmp_path / "clip.mp4", 32, 32, 24, 24, audio=True)
    dest = tmp_path / "result.mp4"
    assert finish(silent, clip, dest) is True
    assert packets(dest, "video") == packets(silent, "video")
    assert [d for _, d in packets(dest, "audio")] == [d for _, d in packets(clip, "audio")]
    assert seconds(dest, "audio") == pytest.approx(seconds(silent, "video"), abs=0.05)
    names = atoms(dest)
    assert names.index("moov") < names.index("mdat")  # faststart: playable while arriving


def test_audio_past_the_video_is_left_out(tmp_path: Path) -> None:
    silent = make_video(tmp_path / "combine.mp4", 64, 64, 24, 12)  # 0.5 s
    clip = make_video(tmp_path / "clip.mp4", 32, 32, 24, 48, audio=True)  # 2 s of audio
    dest = tmp_path / "result.mp4"
    assert finish(silent, clip, dest) is True
    assert seconds(dest, "audio") < 0.6
    assert len(packets(dest, "audio")) < len(packets(clip, "audio")) / 2


def test_without_audio_the_video_is_copied_alone(tmp_path: Path) -> None:
    silent = make_video(tmp_path / "combine.mp4", 64, 64, 24, 9)
    clip_without = make_video(tmp_path / "clip.mp4", 32, 32, 24, 9)
    for audio_from in (None, clip_without):
        dest = tmp_path / f"result-{audio_from is None}.mp4"
        assert finish(silent, audio_from, dest) is False
        assert packets(dest, "video") == packets(silent, "video")
        assert packets(dest, "audio") == []


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_an_unreadable_output_is_a_comfy_error(tmp_path: Path, kind: str) -> None:
    if kind == "text":
        bad = make_text(tmp_path / "combine.mp4")
    else:
        whole = make_video(tmp_path / "whole.mp4", 64, 64, 24, 48)
        bad = make_truncated(whole, tmp_path / "combine.mp4", 0.5)
    with pytest.raises(ComfyError) as info:
        finish(bad, None, tmp_path / "result.mp4")
    assert info.value.code == "comfyui_output_invalid"
    assert info.value.message == "ComfyUI wrote an unreadable output video combine.mp4."


def test_a_result_that_cannot_be_written_is_a_delivery_error(tmp_path: Path) -> None:
    silent = make_video(tmp_path / "combine.mp4", 64, 64, 24, 9)
    with pytest.raises(DeliveryError) as info:
        finish(silent, None, tmp_path / "missing-folder" / "result.mp4")
    assert info.value.code == "output_write_failed"
    assert str(tmp_path) not in info.value.message  # no server path in the answer
