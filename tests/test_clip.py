"""The driving clip: frames to render, the memory refusal, the streamed transcode."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

import xicon_dance.transcode as pipeline
from xicon_dance import clip
from xicon_dance.errors import InputError
from xicon_dance.media import VideoInfo, probe_video
from xicon_dance.schema import parse_job_input
from xicon_dance.settings import PACKAGE_ROOT, Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = Settings()
IMG = {"image_url": "https://example.com/ref.png", "video_url": "https://example.com/d.mp4"}


def info(duration_s: float, fps: float = 24.0, frames: int | None = None) -> VideoInfo:
    count = round(duration_s * fps) if frames is None else frames
    return VideoInfo(Path("d.mp4"), 1080, 1920, fps, count, duration_s, True, 1)


def plan(video: VideoInfo, settings: Settings = SETTINGS, **job: Any) -> clip.ClipPlan:
    return clip.plan_clip(video, parse_job_input({**IMG, **job}, settings), settings)


# --------------------------------------------------------------------------- frame arithmetic


@pytest.mark.parametrize(
    ("duration", "job", "frames", "cap"),
    [
        (10.0, {}, 237, None),  # 240 frames -> 4n+1; the 3 frames of the rule are no cut
        (120.0, {}, 1437, "MAX_SECONDS"),  # 60 s cap: 1440 frames -> 1437
        (120.0, {"fps": 30}, 1797, "MAX_SECONDS"),  # the cap in seconds follows the job's fps
        (10.0, {"max_frames": 81}, 81, "max_frames"),
        (10.0, {"max_seconds": 5}, 117, "max_seconds"),  # 120 frames -> 117
        (10.0, {"max_seconds": 5, "max_frames": 200}, 117, "max_seconds"),  # the smaller wins
        (10.0, {"max_seconds": 5, "max_frames": 49}, 49, "max_frames"),
        (10.0, {"max_seconds": 2.5, "fps": 16}, 37, "max_seconds"),  # 40 frames -> 37
        (3.0, {"max_frames": 200, "max_seconds": 30}, 69, None),  # caps above the clip: whole
        (3.0, {"fps": 8}, 21, None),  # 24 frames at 8 fps
    ],
)
def test_frames_to_render(
    duration: float, job: dict[str, Any], frames: int, cap: str | None
) -> None:
    got = plan(info(duration), **job)
    assert (got.frames, got.cap, got.truncated) == (frames, cap, cap is not None)
    assert got.frames % 4 == 1
    assert got.clip_frames == int(duration * got.fps)
    assert got.duration_s == pytest.approx(frames / got.fps)


def test_max_frames_setting_is_an_optional_extra_cap() -> None:
    assert plan(info(30.0), dataclasses.replace(SETTINGS, max_frames=100)).frames == 97
    assert plan(info(30.0), dataclasses.replace(SETTINGS, max_frames=None)).frames == 717
    short = dataclasses.replace(SETTINGS, max_seconds=2.0)
    assert plan(info(30.0), short).frames == 45 and plan(info(30.0), short).cap == "MAX_SECONDS"


def test_the_clip_length_is_never_more_than_its_frames() -> None:
    """A container may claim more time than the video stream has frames for (e.g. a longer audio
    track): the frames decide, so the transcode never pads a frozen picture."""
    got = plan(info(10.0, fps=24, frames=120))
    assert (got.clip_duration_s, got.clip_frames, got.frames) == (5.0, 120, 117)


def test_a_clip_shorter_than_five_frames_at_the_fps_is_refused_by_its_field() -> None:
    with pytest.raises(InputError) as err:
        plan(info(0.5, fps=8, frames=4), fps=8)
    assert err.value.field == "video_url" and err.value.code == "invalid_video"
    assert "4 frames at 8 fps" in err.value.message and "at least 5" in err.value.message
    assert plan(info(0.5, fps=8, frames=4), fps=24).frames == 9  # the same clip at 24 fps


def test_a_max_seconds_below_five_frames_is_refused_by_name() -> None:
    with pytest.raises(InputError) as err:
        plan(info(10.0), max_seconds=0.1)
    assert err.value.field == "max_seconds" and "only 2 frames at 24 fps" in err.value.message


def test_the_bundled_default_dance_renders_whole() -> None:
    video = probe_video(PACKAGE_ROOT / "assets" / "default_video.mp4")
    got = clip.plan_clip(
        video, parse_job_input({"image_url": IMG["image_url"]}, SETTINGS), SETTINGS
    )
    assert not got.truncated and got.clip_frames - got.frames < 4
    assert got.frames > 81  # more than the old fixed default


# --------------------------------------------------------------------------- memory budget


def test_an_over_budget_clip_is_refused_naming_field_and_limit() -> None:
    settings = dataclasses.replace(SETTINGS, max_clip_memory_gb=20.0)
    big = plan(info(60.0), settings, width=1280, height=1280)
    with pytest.raises(InputError) as err:
        clip.check_memory(big, 1280, 1280, settings)
    assert err.value.field == "max_frames" and err.value.code == "clip_too_long"
    assert "MAX_CLIP_MEMORY_GB" in err.value.message and "20 GB" in err.value.message
    fits = int(err.value.message.split("at most ")[1].split(" frames")[0])
    assert fits % 4 == 1
    clip.check_memory(dataclasses.replace(big, frames=fits), 1280, 1280, settings)  # it does fit
    with pytest.raises(InputError):
        clip.check_memory(dataclasses.replace(big, frames=fits + 4), 1280, 1280, settings)


def test_the_default_budget_takes_a_whole_minute_at_the_default_size() -> None:
    clip.check_memory(plan(info(60.0)), 416, 672, SETTINGS)
    minute = clip.clip_memory_bytes(plan(info(60.0)).frames, 416, 672)
    assert minute < SETTINGS.max_clip_memory_gb * clip.GB < 2 * minute * 2


@pytest.mark.parametrize(
    ("stats", "warned"),
    [
        ({"system": {"ram_total": 32 * 10**9}}, True),  # 32 GB host, 48 GB budget
        ({"system": {"ram_total": 125 * 2**30}}, False),
        ({"system": {"ram_total": 48 * 10**9}}, False),  # exactly the budget
        ({"system": {}}, False),  # no figure: nothing to say
        ({}, False),
        (None, False),
        ({"system": {"ram_total": "lots"}}, False),
    ],
)
def test_a_host_with_less_ram_than_the_clip_budget_is_warned_about(
    stats: Any, warned: bool
) -> None:
    warning = clip.host_ram_warning(stats, SETTINGS)
    assert (warning is not None) == warned
    if warning:
        assert "32 GB of RAM" in warning and "MAX_CLIP_MEMORY_GB (48 GB)" in warning
        smaller = dataclasses.replace(SETTINGS, max_clip_memory_gb=24.0)
        assert clip.host_ram_warning(stats, smaller) is None


def test_answer_keys() -> None:
    got = clip.answer(plan(info(75.5)))
    assert got == {
        "clip": {"duration_s": 75.5, "frames": 1812},
        "rendered": {"frames": 1437, "duration_s": 59.875, "truncated": True},
    }


# --------------------------------------------------------------------------- transcode


def index_video(path: Path, w: int, h: int, fps: int, frames: int, audio_s: float = 0) -> Path:
    """Frame k is flat grey 8*k: the frame shown at any time can be read back from the picture."""
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": "0", "preset": "ultrafast"}
        audio = out.add_stream("aac", rate=44100, layout="mono") if audio_s else None
        for k in range(frames):
            arr = np.full((h, w, 3), 8 * k % 256, np.uint8)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(vs.encode(None))
        if audio is not None:
            _audio(out, audio, audio_s)
    return path


def _audio(out: Any, stream: Any, seconds: float) -> None:
    total, chunk = int(44100 * seconds), 1024
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        t = (np.arange(start, start + n, dtype=np.float32) / 44100).reshape(1, -1)
        wave = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 44100, start, Fraction(1, 44100)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def read(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        pictures = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
        audio = c.streams.audio[0] if c.streams.audio else None
        audio_s = float(audio.duration * audio.time_base) if audio is not None else 0.0
        return {
            "size": (v.width, v.height),
            "fps": Fraction(v.average_rate),
            "pictures": pictures,
            "audio_s": audio_s,
        }


def make_plan(fps: int, frames: int) -> clip.ClipPlan:
    return clip.ClipPlan(fps, frames / fps, frames, frames, False, None)


@pytest.mark.parametrize(("src_fps", "fps"), [(30, 24), (60, 24), (8, 24), (24, 24), (25, 16)])
def test_frames_are_picked_by_time(tmp_path: Path, src_fps: int, fps: int) -> None:
    src = index_video(tmp_path / "src.mp4", 64, 64, src_fps, 31)
    frames = clip.to_4n1(int(31 / src_fps * fps))
    done = pipeline.transcode(src, tmp_path / "out.mp4", make_plan(fps, frames), 32, 32)
    got = read(done.path)
    assert done.frames == len(got["pictures"]) == frames
    assert got["size"] == (32, 32) and got["fps"] == fps
    shown = [round(float(p.mean()) / 8) for p in got["pictures"]]
    assert shown == [int(i * src_fps / fps + 1e-9) for i in range(frames)]


def test_audio_is_trimmed_to_the_rendered_length(tmp_path: Path) -> None:
    src = index_video(tmp_path / "src.mp4", 64, 64, 24, 96, audio_s=4.0)
    done = pipeline.transcode(src, tmp_path / "out.mp4", make_plan(24, 41), 32, 32)
    got = read(done.path)
    assert done.has_audio and len(got["pictures"]) == 41
    assert got["audio_s"] == pytest.approx(41 / 24, abs=0.03)  # one AAC frame
    silent = pipeline.transcode(
        src, tmp_path / "silent.mp4", make_plan(24, 41), 32, 32, audio=False
    )
    assert not silent.has_audio and read(silent.path)["audio_s"] == 0


def gradient_video(path: Path, w: int, h: int) -> tuple[Path, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w]
    arr = np.stack([xs * 255 // (w - 1), ys * 255 // (h - 1), (xs // 16 + ys // 16) % 2 * 255], -1)
    picture = arr.astype(np.uint8)
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=8)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv444p"
        vs.options = {"crf": "0", "preset": "ultrafast"}
        for _ in range(5):
            out.mux(vs.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(vs.encode(None))
    return path, picture


def centre_cover(picture: np.ndarray, w: int, h: int) -> np.ndarray:
    """The reference: scale to cover, centre crop (what ImageResizeKJv2 crop/center gives)."""
    src_h, src_w = picture.shape[:2]
    scale = max(w / src_w, h / src_h)
    cw, ch = max(w, round(src_w * scale)), max(h, round(src_h * scale))
    big = np.asarray(Image.fromarray(picture).resize((cw, ch), Image.Resampling.LANCZOS))
    x, y = (cw - w) // 2, (ch - h) // 2
    return big[y : y + h, x : x + w]


@pytest.mark.parametrize(
    ("src", "out"),
    [((320, 160), (96, 96)), ((160, 320), (96, 96)), ((180, 320), (128, 96)), ((64, 64), (96, 64))],
    ids=["landscape-to-square", "portrait-to-square", "portrait-to-landscape", "upscale"],
)
def test_the_picture_is_scaled_to_cover_and_cropped_centrally(
    tmp_path: Path, src: tuple[int, int], out: tuple[int, int]
) -> None:
    path, picture = gradient_video(tmp_path / "src.mp4", *src)
    done = pipeline.transcode(path, tmp_path / "out.mp4", make_plan(8, 5), *out)
    got = read(done.path)["pictures"][2].astype(int)
    want = centre_cover(picture, *out).astype(int)
    assert got.shape == want.shape == (out[1], out[0], 3)
    # red = x and green = y of the source: a shifted crop moves them by whole columns/rows
    assert np.abs(got[..., :2] - want[..., :2]).mean() < 4
    off_centre = np.roll(want, 3, axis=1) if src[0] / src[1] > out[0] / out[1] else want
    if off_centre is not want:
        assert np.abs(got[..., :2] - off_centre[..., :2]).mean() > 4


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    """A phone's portrait clip is stored landscape with a display matrix: ComfyUI's loader (cv2)
    shows it upright, so the transcode must too (checked against cv2 on the real stack)."""
    path, picture = gradient_video(tmp_path / "src.mp4", 96, 48)
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    assert data[at + 4] == 0  # version 0 box: the matrix starts 44 bytes after the type
    data[at + 44 : at + 80] = struct.pack(">9i", 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
    rotated = tmp_path / "rotated.mp4"
    rotated.write_bytes(bytes(data))
    done = pipeline.transcode(rotated, tmp_path / "out.mp4", make_plan(8, 5), 48, 96)
    got = read(done.path)["pictures"][0].astype(int)
    upright = np.rot90(picture, -1)  # 90 degrees clockwise, as players show it
    assert got.shape == upright.shape and np.abs(got - upright.astype(int)).mean() < 4


def test_a_set_stop_event_ends_the_transcode(tmp_path: Path) -> None:
    src = index_video(tmp_path / "src.mp4", 64, 64, 24, 30)
    stop = threading.Event()
    stop.set()
    with pytest.raises(pipeline.TranscodeStopped):
        pipeline.transcode(src, tmp_path / "out.mp4", make_plan(24, 25), 32, 32, stop=stop)


def test_an_undecodable_clip_is_an_input_error(tmp_path: Path) -> None:
    src = index_video(tmp_path / "src.mp4", 64, 64, 24, 30)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 64 + src.read_bytes()[64:])
    with pytest.raises(InputError) as err:
        pipeline.transcode(
            broken, tmp_path / "out.mp4", make_plan(24, 25), 32, 32, field="video_base64"
        )
    assert err.value.field == "video_base64" and err.value.code == "invalid_video"


def transcode_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("transcode-")}


def test_a_decode_error_mid_clip_is_an_input_error(tmp_path: Path) -> None:
    """Bytes zeroed in the middle of the video data: the decoder fails after the first frames,
    and the threads started for the encoders are ended too."""
    src = index_video(tmp_path / "src.mp4", 64, 64, 24, 96, audio_s=4.0)
    data = bytearray(src.read_bytes())
    middle = data.find(b"mdat") + (len(data) - data.find(b"mdat")) // 3
    data[middle : middle + 4096] = bytes(4096)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        pipeline.transcode(broken, tmp_path / "out.mp4", make_plan(24, 93), 32, 32)
    assert err.value.field == "video_url" and err.value.code == "invalid_video"
    assert not transcode_threads()


def test_an_audio_decode_error_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audio is decoded in its own thread: its error reaches the caller as today's error."""
    src = index_video(tmp_path / "src.mp4", 64, 64, 24, 96, audio_s=4.0)
    calls = 0
    write = pipeline._Transcode._write_samples

    def failing(self: Any, samples: np.ndarray) -> None:
        nonlocal calls
        calls += 1
        if calls == 20:
            raise av.error.InvalidDataError(-1094995529, "Invalid data found")
        write(self, samples)

    monkeypatch.setattr(pipeline._Transcode, "_write_samples", failing)
    with pytest.raises(InputError) as err:
        pipeline.transcode(src, tmp_path / "out.mp4", make_plan(24, 93), 32, 32, field="video_path")
    assert (err.value.field, err.value.code) == ("video_path", "invalid_video")
    assert calls == 20 and not transcode_threads()


@pytest.mark.timeout(30, method="thread")  # a deadlock ends the run, not hangs it
def test_a_failed_video_encoder_never_leaves_the_decoder_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder thread fails once the decoder waits on a full queue, with many more frames to
    come: the transcode still ends (nobody is left blocked on the queue), with the encoder's
    error, and nothing left running."""
    src = index_video(tmp_path / "src.mp4", 64, 64, 24, 120, audio_s=5.0)

    def broken(self: Any) -> None:
        self._next_frame()
        deadline = time.monotonic() + 10
        while not self.frames.full() and time.monotonic() < deadline:  # the decoder is waiting
            time.sleep(0.01)
        raise RuntimeError("encoder bug")

    monkeypatch.setattr(pipeline._Transcode, "_encode_video", broken)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="encoder bug"):
        pipeline.transcode(src, tmp_path / "out.mp4", make_plan(24, 117), 32, 32)
    assert set(threading.enumerate()) == before


def test_a_stop_set_mid_run_ends_every_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = index_video(tmp_path / "src.mp4", 64, 64, 24, 120, audio_s=5.0)
    stop = threading.Event()
    crops = 0
    crop = pipeline.cover_crop

    def crop_then_stop(*args: Any) -> np.ndarray:
        nonlocal crops
        crops += 1
        if crops == 10:
            stop.set()
        return crop(*args)

    monkeypatch.setattr(pipeline, "cover_crop", crop_then_stop)
    before = set(threading.enumerate())
    with pytest.raises(pipeline.TranscodeStopped):
        pipeline.transcode(src, tmp_path / "out.mp4", make_plan(24, 117), 32, 32, stop=stop)
    assert crops == 10  # stopped at the next frame, not at the end of the clip
    assert set(threading.enumerate()) == before


def test_late_audio_is_padded_to_the_first_picture_and_trimmed_to_the_rendered_length(
    tmp_path: Path,
) -> None:
    """The source's audio starts 0.5 s after its first picture and outlasts the rendered part:
    the output's audio starts with that much silence and lasts exactly the rendered length (to
    the AAC frame of 1024 samples the decoder rounds up to)."""
    src = tmp_path / "src.mp4"
    with av.open(str(src), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=24)
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        audio = out.add_stream("aac", rate=44100, layout="mono")
        for k in range(72):
            out.mux(vs.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), k, np.uint8))))
        out.mux(vs.encode(None))
        for start in range(0, 3 * 44100, 1024):
            t = np.arange(start, start + 1024, dtype=np.float32).reshape(1, -1) / 44100
            wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
            frame.sample_rate, frame.time_base = 44100, Fraction(1, 44100)
            frame.pts = start + 44100 // 2
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    done = pipeline.transcode(src, tmp_path / "out.mp4", make_plan(24, 41), 32, 32)
    with av.open(str(done.path)) as c:
        samples = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    rendered = round(41 / 24 * 44100)
    assert rendered <= len(samples) < rendered + 1024
    assert np.abs(samples[: int(0.4 * 44100)]).max() < 0.01  # before the source's audio
    assert np.sqrt(np.mean(samples[int(0.6 * 44100) : rendered] ** 2)) > 0.2  # the tone


BIG_SOURCE = """
import sys
from fractions import Fraction
import av, numpy as np
path, frames = sys.argv[1], int(sys.argv[2])
ys, xs = np.mgrid[0:1920, 0:1080]
base = np.stack([xs % 256, ys % 256, (xs + ys) % 256], -1).astype(np.uint8)
with av.open(path, "w", format="mp4") as out:
    vs = out.add_stream("libx264", rate=30)
    vs.width, vs.height, vs.pix_fmt = 1080, 1920, "yuv420p"
    vs.options = {"preset": "ultrafast"}
    for k in range(frames):
        frame = av.VideoFrame.from_ndarray(np.roll(base, 7 * k, axis=1), format="rgb24")
        out.mux(vs.encode(frame))
    out.mux(vs.encode(None))
"""

MEASURE = """
import json, sys
from pathlib import Path
from xicon_dance import clip, transcode
src, frames = Path(sys.argv[1]), int(sys.argv[2])
plan = clip.ClipPlan(24, frames / 24, frames, frames, False, None)
done = transcode.transcode(src, Path(sys.argv[3]), plan, 416, 672)
status = Path("/proc/self/status").read_text()
hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1])
print(json.dumps({"frames": done.frames, "hwm_kb": hwm}))
"""


def measure(src: Path, frames: int, dest: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), str(frames), str(dest)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_1080x1920_source_is_transcoded_with_bounded_memory(tmp_path: Path) -> None:
    """Peak RSS of a process transcoding 5 frames and one transcoding 73 frames of a 1080x1920,
    30 fps source: the same, within a few frames' worth. Held whole at the source size as
    float32 (what node 130 did), those 68 frames alone would be 1.7 GB."""
    src = tmp_path / "big.mp4"
    subprocess.run([sys.executable, "-c", BIG_SOURCE, str(src), "92"], check=True, timeout=600)
    few = measure(src, 5, tmp_path / "few.mp4")
    many = measure(src, 73, tmp_path / "many.mp4")
    assert (few["frames"], many["frames"]) == (5, 73)
    growth_mb = (many["hwm_kb"] - few["hwm_kb"]) / 1024
    print(
        f"transcode peak RSS: 5 frames {few['hwm_kb'] // 1024} MB, 73 frames "
        f"{many['hwm_kb'] // 1024} MB (growth {growth_mb:.0f} MB)"
    )
    frame_mb = 1080 * 1920 * 12 / 2**20  # one float32 RGB frame at the source size: 24 MB
    assert growth_mb < 4 * frame_mb
