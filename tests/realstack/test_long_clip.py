"""A whole dance in one job, on the real ComfyUI v0.33.0 stack (CPU, tiny models; see conftest.py).

One long job serves the two main tests (the CPU run takes minutes): a 1080x1920, 30 fps driving
clip of 6.4 s with audio, rendered at 256x256 and 24 fps without max_frames, so the worker renders
the whole clip: 153 frames (39 latent frames), three of the graph's context windows (node 355: 81
frames = 21 latent frames, overlap 48 = 12). The worker transcodes the clip to 256x256 at 24 fps
before ComfyUI runs; the peak memory of ComfyUI and of the handler shows that no frame exists at
the source's size (153 such frames as float32 would be 3.8 GB in the loader's output alone).

A 5-frame job on the same clip runs first: it renders the clip's first part, and the peak after
it is the baseline the long job's frames add to (printed as float32 copies of the frames: the
measure behind ``clip.FRAME_COPIES``).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import urllib.request
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from tests.plugins.realstack import Server, released_nodes

RUNSYNC_TIMEOUT_S = 1750  # the worker's own JOB_TIMEOUT_S (conftest) ends the job before this
SOURCE_SIZE = (1080, 1920)
SOURCE_FPS = 30
SOURCE_FRAMES = 192  # 6.4 s -> 153 frames at 24 fps (4n+1): the fewest for three windows
RENDERED = 153
# ComfyUI with the tiny models peaks near 4 GB on a 161-frame 256x256 job; the loader's own
# output at the source size would add 3.8 GB (153 x 1080 x 1920 x 12 bytes).
COMFY_PEAK_LIMIT_GB = 6.5
HANDLER_PEAK_LIMIT_GB = 1.0  # the transcode holds one source frame at a time
# ComfyUI's RSS growth during the long job over its resident size after the short one (models
# loaded): node 130's output alone at the source size would be 3.8 GB
JOB_GROWTH_LIMIT_GB = 2.0


def make_source(path: Path) -> Path:
    """A 1080x1920 clip whose picture moves every frame (a rolling gradient), with a sine."""
    w, h = SOURCE_SIZE
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.stack([xs * 255 // w, ys * 255 // h, (xs + ys) % 256], -1).astype(np.uint8)
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=SOURCE_FPS)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "30"}
        audio = out.add_stream("aac", rate=44100, layout="mono")
        for k in range(SOURCE_FRAMES):
            picture = np.roll(base, 9 * k, axis=1)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(vs.encode(None))
        total = round(SOURCE_FRAMES / SOURCE_FPS * 44100)
        for start in range(0, total, 1024):
            t = np.arange(start, min(start + 1024, total), dtype=np.float32) / 44100
            wave = (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 44100, start, Fraction(1, 44100)
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


def peak_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def handler_pid(server: Server) -> int:
    """The handler: the entrypoint's child running handler.py."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(next(x for x in status.splitlines() if x.startswith("PPid")).split()[1])
        if ppid == server.proc.pid and b"handler.py" in cmdline:
            return int(entry.name)
    pytest.fail("the handler process was not found under the entrypoint")


def runsync(server: Server, job_input: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"input": job_input}).encode()
    req = urllib.request.Request(
        f"{server.api_url}/runsync", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=RUNSYNC_TIMEOUT_S) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def long_job(
    real_worker: Server,
    realstack_media: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    source = make_source(tmp_path_factory.mktemp("long-clip") / "dance_1080x1920.mp4")
    comfy_pid = int((real_worker.base / "comfyui.pid").read_text().strip())
    handler = handler_pid(real_worker)
    before = {"comfy": peak_kb(comfy_pid), "handler": peak_kb(handler)}
    job = {
        "image_base64": base64.b64encode(realstack_media[0].read_bytes()).decode(),
        "video_base64": base64.b64encode(source.read_bytes()).decode(),
        "width": 256,
        "height": 256,
        "fps": 24,
        "steps": 1,
        "seed": 5,
        "output": "base64",
    }
    # the first 5 frames first: the clip's first part, and every model loaded for the long job
    short = runsync(real_worker, {**job, "max_frames": 5})
    warm = {"comfy": peak_kb(comfy_pid), "handler": peak_kb(handler)}
    # again, models loaded: what a job with almost no frames adds to the resident size
    resident = rss_kb(comfy_pid)
    with RssSampler(comfy_pid) as sampler:
        again = runsync(real_worker, {**job, "max_frames": 5, "seed": 6})
    short_growth = sampler.peak_kb - resident
    resident = rss_kb(comfy_pid)
    started = time.monotonic()
    with RssSampler(comfy_pid) as sampler:
        done = runsync(real_worker, job)
    elapsed = time.monotonic() - started
    after = {"comfy": peak_kb(comfy_pid), "handler": peak_kb(handler)}
    growth = sampler.peak_kb - resident
    copy_kb = RENDERED * 256 * 256 * 12 / 1024  # one float32 RGB copy of the rendered frames
    extra_kb = (RENDERED - 5) * 256 * 256 * 12 / 1024  # of the frames the long job adds
    print(
        f"long clip: {elapsed:.0f} s, source {source.stat().st_size} bytes; ComfyUI peak RSS "
        f"(VmHWM) {before['comfy'] / 2**20:.2f} -> {warm['comfy'] / 2**20:.2f} (5 frames) -> "
        f"{after['comfy'] / 2**20:.2f} GiB; during the {RENDERED}-frame job VmRSS "
        f"{resident / 2**20:.2f} -> peak {sampler.peak_kb / 2**20:.2f} GiB (+{growth / 2**20:.2f} "
        f"GiB = {growth / copy_kb:.1f} float32 copies of its frames; a 5-frame job: "
        f"+{short_growth / 2**20:.2f} GiB; the difference is "
        f"{(growth - short_growth) / extra_kb:.1f} float32 copies of the extra frames); "
        "handler VmHWM "
        f"{before['handler'] / 2**20:.2f} -> {warm['handler'] / 2**20:.2f} -> "
        f"{after['handler'] / 2**20:.2f} GiB; timings {done.get('output', {}).get('timings')}"
    )
    assert again["status"] == "COMPLETED", again
    return {"short": short, "done": done, "peak_kb": after, "growth_kb": growth}


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


class RssSampler:
    """The highest VmRSS of a process while the block runs (sampled every 50 ms in a thread)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb = pid, rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, rss_kb(self.pid))


def test_a_max_frames_job_renders_the_first_part(long_job: dict[str, Any]) -> None:
    short = long_job["short"]
    assert short["status"] == "COMPLETED", short
    out = short["output"]
    assert out["clip"]["frames"] == RENDERED
    assert out["rendered"] == {"frames": 5, "duration_s": round(5 / 24, 3), "truncated": True}
    assert (out["video"]["frames"], out["video"]["has_audio"]) == (5, True)


def test_a_clip_over_three_context_windows_renders_whole_with_its_audio(
    long_job: dict[str, Any],
) -> None:
    done = long_job["done"]
    assert done["status"] == "COMPLETED", done
    out = done["output"]
    clip_s = SOURCE_FRAMES / SOURCE_FPS
    assert out["clip"]["frames"] == RENDERED
    assert out["clip"]["duration_s"] == pytest.approx(clip_s, abs=0.01)
    assert out["rendered"] == {
        "frames": RENDERED,
        "duration_s": round(RENDERED / 24, 3),
        "truncated": False,
    }
    data = base64.b64decode(out["video"]["base64"])
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        size = (stream.width, stream.height)
        fps = float(stream.average_rate)
        audio = container.streams.audio
        audio_s = float(audio[0].duration * audio[0].time_base) if audio else 0.0
    assert (frames, size, fps) == (RENDERED, (256, 256), 24.0)
    # the whole clip, to within one frame at 24 fps; the audio as long as the picture
    assert abs(frames / fps - clip_s) < 1 / 24
    assert audio_s == pytest.approx(RENDERED / 24, abs=0.05)
    video = out["video"]
    assert (video["frames"], video["width"], video["height"], video["has_audio"]) == (
        RENDERED,
        256,
        256,
        True,
    )


def test_a_1080x1920_source_keeps_comfyui_and_the_handler_small(long_job: dict[str, Any]) -> None:
    assert long_job["done"]["status"] == "COMPLETED", long_job["done"]
    peak = {name: kb / 2**20 for name, kb in long_job["peak_kb"].items()}
    assert peak["comfy"] < COMFY_PEAK_LIMIT_GB, peak
    assert peak["handler"] < HANDLER_PEAK_LIMIT_GB, peak
    # what the frames add while the job runs: far below one copy at the source size
    assert long_job["growth_kb"] / 2**20 < JOB_GROWTH_LIMIT_GB


def test_the_clips_copies_leave_comfyuis_cache(
    long_job: dict[str, Any], real_worker: Server
) -> None:
    """The project's extension ``xicon_release_outputs`` in the worker's own ComfyUI: the loaded
    frames (node 130), 120 MB here, left ComfyUI's output cache once their node had run, instead
    of staying until the next job's first node. The decoded frames never reach the cache: node 28
    runs inside node 139 (``xicon_decode_frames``' merged decode and encode), whose result is the
    file names."""
    assert long_job["done"]["status"] == "COMPLETED", long_job["done"]
    text = real_worker.log.read_text(errors="replace")
    assert "xicon_release_outputs: cached results of 64 MiB or more are released" in text
    released = released_nodes(text)
    assert "130" in released and "28" not in released, released


def test_the_pose_render_ran_with_the_extension(
    long_job: dict[str, Any], real_worker: Server
) -> None:
    """The project's extension ``xicon_pose_render`` was put in place in the worker's own ComfyUI
    when node 362 first imported SCAIL-Pose's renderer (``tests/realstack/test_pose_render.py``:
    its frames are upstream's)."""
    assert long_job["done"]["status"] == "COMPLETED", long_job["done"]
    text = real_worker.log.read_text(errors="replace")
    assert "xicon_pose_render: SCAIL pose render: taichi runtime and kernels kept" in text
    # on this machine (no CUDA device) taichi is not started ahead of the first render
    assert "xicon_pose_render: no CUDA device; taichi starts with the first render" in text


def test_the_vae_decoder_ran_channels_last(long_job: dict[str, Any], real_worker: Server) -> None:
    """The project's extension ``xicon_vae_channels_last`` wrapped the VAE loader in the worker's
    own ComfyUI and the job's VAE came with its decoder and encoder channels-last and their steps
    streamlined (``tests/realstack/test_vae_channels_last.py``: its frames against upstream's
    layout)."""
    assert long_job["done"]["status"] == "COMPLETED", long_job["done"]
    text = real_worker.log.read_text(errors="replace")
    assert (
        "xicon_vae_channels_last: WanVideoVAELoader gives the VAE decoder's and encoder's weights "
        "in channels-last memory, its steps streamlined" in text
    )
    assert (
        "xicon_vae_channels_last: the VAE decoder's and encoder's weights in channels-last "
        "memory (" in text
    )
    assert re.search(
        r"xicon_vae_channels_last: the VAE decoder's and encoder's steps streamlined: [1-9]\d* "
        r"convolutions pad inside.*; on CUDA [1-9]\d* norms with their SiLU in one kernel "
        r"\([1-9]\d* leaving room for the next convolution's cached frames, [1-9]\d* adding the "
        r"bias of the convolution before\), [1-9]\d* convolutions stacked as one 2-D convolution, "
        r"[1-9]\d* time upsamples interleaving their frames channels-last",
        text,
    )


def test_the_pose_embeds_ran_with_the_extension(
    long_job: dict[str, Any], real_worker: Server
) -> None:
    """The project's extension ``xicon_pose_embeds`` replaced node 324's ``add`` in the worker's
    own ComfyUI before the job (``tests/realstack/test_pose_embeds.py``: the same embeds to the
    bit)."""
    assert long_job["done"]["status"] == "COMPLETED", long_job["done"]
    text = real_worker.log.read_text(errors="replace")
    assert (
        "xicon_pose_embeds: WanVideoAddSCAILPoseEmbeds scales and converts the pose frames on "
        "ComfyUI's device, a chunk at a time" in text
    )


def test_the_decode_sent_its_frames_to_the_host_as_they_came(
    long_job: dict[str, Any], real_worker: Server
) -> None:
    """The project's extension ``xicon_decode_frames`` ran the long job's decode loop in the
    worker's own ComfyUI: its frames went to the host as they were decoded, never the clip on the
    device (``tests/realstack/test_decode_frames.py``: the same frames to the bit)."""
    assert long_job["done"]["status"] == "COMPLETED", long_job["done"]
    text = real_worker.log.read_text(errors="replace")
    decodes = re.findall(
        r"xicon_decode_frames: (\d+) frames of 256x256 to the host as one float32 tensor "
        r"\([\d.]+ MiB\), as they were decoded: at most [\d.]+ MiB of them on the GPU at once",
        text,
    )
    # (the bound on what waits on the device: test_decode_frames.py; this clip is below it)
    assert str(RENDERED) in decodes, decodes


def test_the_pose_detectors_sessions_were_kept(
    long_job: dict[str, Any], real_worker: Server
) -> None:
    """The project's extension ``xicon_pose_sessions`` in the worker's own ComfyUI: after three
    jobs, each with two pose-detection runs, the sessions were kept (on this machine they hold no
    GPU memory) and never released (``tests/realstack/test_pose_sessions.py``: the starts saved,
    the same poses)."""
    assert long_job["done"]["status"] == "COMPLETED", long_job["done"]
    text = real_worker.log.read_text(errors="replace")
    assert (
        "xicon_pose_sessions: the pose detectors' ONNX sessions are kept between runs while "
        "there is room (no GPU)" in text
    )
    for name in ("Yolo", "ViTPose"):
        line = (
            f"xicon_pose_sessions: {name}'s session kept for the next run (it holds no GPU memory)"
        )
        assert text.count(line) == 1, name  # logged once per model and reason
    assert "session released" not in text


def test_the_clip_was_encoded_as_it_was_decoded(
    long_job: dict[str, Any], real_worker: Server
) -> None:
    """``xicon_decode_frames``' on-prompt handler merged the shipped graph's decode (node 28) and
    video encode (node 139) in the worker's own ComfyUI, and the long job's frames went to the
    encoder as they were decoded (``tests/realstack/test_decode_video.py``: the same MP4 byte for
    byte as the two nodes one after the other)."""
    assert long_job["done"]["status"] == "COMPLETED", long_job["done"]
    text = real_worker.log.read_text(errors="replace")
    assert (
        "xicon_decode_video: nodes 28 (WanVideoDecode) and 139 (VHS_VideoCombine) run as one "
        "XiconWanDecodeVideoCombine" in text
    )
    assert f"xicon_decode_video: {RENDERED} frames encoded as they were decoded (streamed)" in text
