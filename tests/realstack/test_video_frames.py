"""The project's extension ``xicon_video_frames`` against the pinned VideoHelperSuite, in the
stack's Python: upstream's own ``load_video`` (OpenCV's loader, the module ComfyUI loads) and the
wrapped one give the same frames to the bit, the same frame count, audio and video info, the same
errors (no file, the memory limit, a failing decode, which leaves no thread behind), and every
load that is not plain goes to upstream's; the pinned source is the one the extension was written
against, and a changed one is left alone. In the real ComfyUI: a clip loaded and encoded by nodes
130 and 139 as the graph runs them gives the same MP4s byte for byte and the same first-frame
picture with the extension on and off.
"""

from __future__ import annotations

import io
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from tests.plugins.realstack import (
    ROOT,
    Stack,
    cpu_comfy,
    h264_combine,
    make_base,
    pack_script,
    run_prompt,
    stack_json,
)

EXTENSION = "xicon_video_frames"
EXT = ROOT / "stack" / "comfy_extension" / EXTENSION / "video_frames.py"
PACK = "ComfyUI-VideoHelperSuite"

SCRIPT = pack_script(
    [f"custom_nodes/{PACK}"],
    "xicon_video_frames",
    r"""
import threading
import numpy as np
import torch

clip, odd_clip, odd_size = script_args
vhs = sys.modules[nodes.NODE_CLASS_MAPPINGS["VHS_LoadVideo"].__module__]
out = {"load_digest": ext.load_digest(vhs) == ext.LOAD_SHA256}
upstream = vhs.load_video
calls = []
def counted(**kwargs):
    calls.append(1)
    return upstream(**kwargs)
fast = ext.fast_load_video(counted, vhs)

def args(video, **over):
    base = {"video": video, "force_rate": 0, "custom_width": 0, "custom_height": 0,
            "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1, "format": "Wan"}
    base.update(over)
    return base

def compare(name, **kw):
    calls.clear()
    a = upstream(**kw)
    b = fast(**kw)
    info_a, info_b = a[3], b[3]
    out[name] = {
        "equal": torch.equal(a[0], b[0]) and a[0].dtype == b[0].dtype,
        "shape": list(b[0].shape), "count": [a[1], b[1]], "info": info_a == info_b,
        "audio": [type(a[2]).__name__, a[2].file == b[2].file, a[2].start_time == b[2].start_time,
                  a[2].duration == b[2].duration] if hasattr(a[2], "file") else repr(a[2]),
        "upstream_calls": len(calls), "contiguous": b[0].is_contiguous(),
    }

compare("whole", **args(clip))
compare("cap_skip", **args(clip, frame_load_cap=10, skip_first_frames=3))
compare("none_format", **args(clip, format="None"))
compare("skip_past_cap", **args(clip, frame_load_cap=40, skip_first_frames=5))
compare("odd_count", **args(odd_clip, format="None"))
compare("resized", **args(odd_size))                     # VHS would resize it: upstream's path
compare("rate", **args(clip, force_rate=8))                 # not plain: upstream's path
compare("nth", **args(clip, select_every_nth=2))            # not plain: upstream's path

import resource
real_capture = vhs.cv2.VideoCapture
class Lying:
    # a header that claims a billion frames: upstream reads what is there; so must the wrapper,
    # without taking the memory the claim would need
    def __init__(self, path):
        self.cap = real_capture(path)
    def get(self, prop):
        return 10**9 if prop == vhs.cv2.CAP_PROP_FRAME_COUNT else self.cap.get(prop)
    def __getattr__(self, name):
        return getattr(self.cap, name)
vhs.cv2.VideoCapture = Lying
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
compare("lying_count", **args(clip))
rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out["lying_rss_growth_mib"] = (rss_after - rss_before) / 1024
vhs.cv2.VideoCapture = real_capture

def error(fn, **kw):
    try:
        fn(**kw)
        return "no exception"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

out["missing"] = [error(upstream, **args("/nonexistent/clip.mp4")),
                  error(fast, **args("/nonexistent/clip.mp4"))]
real_psutil = vhs.psutil
class Low:
    # room for five 64x48 frames by upstream's own formula
    def virtual_memory(self):
        return types.SimpleNamespace(available=2**27 + 5 * 64 * 48 * 3 * 0.1 + 1)
    def swap_memory(self):
        return types.SimpleNamespace(free=0)
vhs.psutil = Low()
out["memory"] = [error(upstream, **args(clip)), error(fast, **args(clip))]
out["memory_capped"] = [len(fast(**args(clip, frame_load_cap=5))[0]),
                        len(upstream(**args(clip, frame_load_cap=5))[0])]
vhs.psutil = real_psutil

real_cvt = vhs.cv2.cvtColor
seen = []
def failing(frame, code):
    seen.append(1)
    if len(seen) > 20:
        raise RuntimeError("the decoder failed")
    return real_cvt(frame, code)
vhs.cv2.cvtColor = failing
out["failing"] = error(fast, **args(clip))
vhs.cv2.cvtColor = real_cvt
out["threads_left"] = [t.name for t in threading.enumerate() if t.name.startswith("xicon-video")]

class Cap:
    # a capture whose frame count was wrong: it has `frames` frames of 2x3
    def __init__(self, frames):
        self.frames = [np.full((2, 3, 3), k, dtype=np.uint8) for k in range(frames)]
        self.at = 0
    def isOpened(self):
        return True
    def grab(self):
        self.at += 1
        return self.at <= len(self.frames)
    def retrieve(self):
        return True, self.frames[self.at - 1][:, :, ::-1]
def direct(frames, expected, limit=None):
    cap = Cap(frames)
    cap.grab()
    got = ext.load_frames(vhs.cv2, cap, 0, limit, expected, 2, 3)
    want = torch.arange(frames, dtype=torch.float32)[:limit].view(-1, 1, 1, 1)
    want = want.expand(-1, 2, 3, 3) / 255
    return {"shape": list(got.shape), "equal": torch.equal(got, want),
            "contiguous": got.is_contiguous()}
out["more_than_counted"] = direct(40, 7)
out["fewer_than_counted"] = direct(7, 40)
out["limited"] = direct(40, 40, 9)

class Executor:
    async def execute_async(self, *args, **kwargs):
        return "ran"
registry = nodes.NODE_CLASS_MAPPINGS
out["off"] = ext.install(Executor, registry, {"XICON_VIDEO_FRAMES": "off"})
out["installed"] = ext.install(Executor, registry, {})
out["again"] = ext.install(Executor, registry, {})
out["before"] = getattr(vhs.load_video, ext.WRAPPED, False)
out["first_prompt"] = asyncio.run(Executor().execute_async())
out["after"] = getattr(vhs.load_video, ext.WRAPPED, False)
out["lines"] = [line for line in lines if "VHS_LoadVideo" in line]
out["load_lines"] = [line for line in lines if "loaded as one float32 tensor" in line]
out["repatch"] = ext.patch_load(registry)
out["missing_nodes"] = ext.patch_load({})
vhs.load_video = upstream
import linecache
real_source = vhs.cv_frame_generator
changed = "def cv_frame_generator(*a, **k):\n    return real_source(*a, **k)\n"
linecache.cache["<changed>"] = (len(changed), None, changed.splitlines(True), "<changed>")
scope = {"real_source": real_source}
exec(compile(changed, "<changed>", "exec"), scope)
vhs.cv_frame_generator = scope["cv_frame_generator"]  # another source: the load is left alone
out["changed"] = ext.patch_load(registry)
out["changed_left"] = vhs.load_video is upstream
vhs.cv_frame_generator = real_source
print(json.dumps(out))
""",
)


def write_clip(path: Path, frames: int, width: int, height: int, fps: int = 24) -> None:
    """H.264 frames of moving gradients and noise, with a tone as its audio."""
    rng = np.random.default_rng(7)
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = Fraction(1, fps)
        audio = container.add_stream("aac", rate=16000)
        y, x = np.mgrid[0:height, 0:width]
        for k in range(frames):
            picture = np.stack([(x * 3 + k * 5) % 256, (y * 4 + k) % 256, (x + y) % 256], -1)
            picture = (picture + rng.integers(0, 40, picture.shape)) % 256
            frame = av.VideoFrame.from_ndarray(picture.astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples = frames * 16000 // fps
        tone = np.sin(np.arange(samples) * 2 * np.pi * 440 / 16000).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(
                tone[None, start : start + 1024], format="fltp", layout="mono"
            )
            chunk.sample_rate, chunk.pts = 16000, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))


def test_the_load_and_the_conversion_give_upstreams_values(stack: Stack, tmp_path: Path) -> None:
    clip, odd, odd_size = tmp_path / "clip.mp4", tmp_path / "odd.mp4", tmp_path / "size.mp4"
    write_clip(clip, 48, 64, 48)
    write_clip(odd, 23, 64, 48)
    write_clip(odd_size, 9, 60, 44)
    out = stack_json(stack, SCRIPT, EXT, clip, odd, odd_size, cwd=stack.comfy_dir)

    assert out["load_digest"], "VHS's load_video changed at the pinned commit"
    shapes = {
        "whole": [45, 48, 64, 3],  # the Wan format keeps 4n + 1 frames
        "cap_skip": [9, 48, 64, 3],
        "none_format": [48, 48, 64, 3],
        "skip_past_cap": [37, 48, 64, 3],
        "odd_count": [23, 48, 64, 3],
    }
    for name, shape in shapes.items():
        case = out[name]
        assert case["equal"] and case["info"], (name, case)
        assert case["shape"] == shape and case["count"] == [shape[0], shape[0]], (name, case)
        assert case["audio"][0] == "LazyAudioMap" and all(case["audio"][1:]), (name, case)
        assert case["upstream_calls"] == 0 and case["contiguous"], (name, case)
    lying = out["lying_count"]  # the header's count is in the info, the frames are the clip's
    assert lying["equal"] and lying["info"] and lying["shape"] == [45, 48, 64, 3], lying
    assert lying["upstream_calls"] == 0 and out["lying_rss_growth_mib"] < 256, out
    for name in ("resized", "rate", "nth"):  # not plain: upstream's own load, once
        assert out[name]["equal"] and out[name]["upstream_calls"] == 1, (name, out[name])
    assert out["resized"]["shape"] == [9, 48, 64, 3]
    assert out["missing"][0] == out["missing"][1]
    assert "could not be loaded with cv" in out["missing"][1]
    assert out["memory"][0] == out["memory"][1], out["memory"]
    assert out["memory"][1] == (
        "RuntimeError: Memory limit hit after loading 5 frames. Stopping execution."
    )
    assert out["memory_capped"] == [5, 5]
    assert out["failing"] == "RuntimeError: the decoder failed"
    assert out["threads_left"] == []
    assert out["more_than_counted"] == {"shape": [40, 2, 3, 3], "equal": True, "contiguous": True}
    assert out["fewer_than_counted"] == {"shape": [7, 2, 3, 3], "equal": True, "contiguous": True}
    assert out["limited"] == {"shape": [9, 2, 3, 3], "equal": True, "contiguous": True}
    assert out["off"] == "off (XICON_VIDEO_FRAMES)"
    assert out["installed"] == "VHS_LoadVideo will be wrapped before the first prompt"
    assert out["again"] == "already installed"
    assert out["before"] is False
    assert out["first_prompt"] == "ran"
    assert out["after"] is True
    assert out["lines"] == ["xicon_video_frames: VHS_LoadVideo loads a plain clip on every core"]
    # one line for each load the wrapper made itself (the plain ones, the lying header's, the
    # memory cap's), none for those it handed to upstream
    assert len(out["load_lines"]) == 7, out["load_lines"]
    assert out["load_lines"][0] == (
        "xicon_video_frames: 45 frames of 64x48 loaded as one float32 tensor (1.6 MiB)"
    )
    assert out["repatch"] == "VHS_LoadVideo's load already wrapped"
    assert out["missing_nodes"] == "VHS_LoadVideo not loaded; loading left as it is"
    assert "changed upstream" in out["changed"] and out["changed_left"]


def load_and_encode(clip: str) -> dict[str, Any]:
    """Nodes 130 and 139 as the shipped graph runs them (the Wan load format, H.264 crf 19,
    the clip's audio), at the clip's own rate."""
    return {
        "130": {
            "class_type": "VHS_LoadVideo",
            "inputs": {
                "video": clip,
                "force_rate": 0,
                "custom_width": 0,
                "custom_height": 0,
                "frame_load_cap": 0,
                "skip_first_frames": 0,
                "select_every_nth": 1,
                "format": "Wan",
            },
        },
        "139": h264_combine(["130", 0], "vf", audio=["130", 2]),
    }


def serve(stack: Stack, folder: Path, clip: Path, setting: str | None) -> dict[str, Any]:
    base = make_base(stack, folder / "comfy", packs={PACK, EXTENSION})
    (base / "input" / clip.name).write_bytes(clip.read_bytes())
    log = folder / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k != "XICON_VIDEO_FRAMES"}
    if setting is not None:
        env["XICON_VIDEO_FRAMES"] = setting
    with cpu_comfy(stack, base, log, env) as (url, _):
        entry = run_prompt(url, load_and_encode(clip.name), timeout_s=600)
    output = base / "output"
    return {
        "entry": entry,
        "log": log.read_text(errors="replace"),
        "files": {p.name: p.read_bytes() for p in sorted(output.glob("vf_*"))},
    }


def test_comfyui_loads_and_encodes_through_the_extension(stack: Stack, tmp_path: Path) -> None:
    clip = tmp_path / "dance.mp4"
    write_clip(clip, 33, 64, 48)
    on = serve(stack, tmp_path / "on", clip, None)  # the default, as the image runs it
    off = serve(stack, tmp_path / "off", clip, "off")
    for served in (on, off):
        status = served["entry"].get("status", {})
        assert status.get("status_str") == "success", served["log"][-3000:]
    assert "xicon_video_frames: VHS_LoadVideo loads a plain clip on every core" in on["log"], on[
        "log"
    ][-3000:]
    assert re.search(  # the load went the wrapper's way: 33 frames, the Wan format keeps 33
        r"xicon_video_frames: 33 frames of 64x48 loaded as one float32 tensor \([\d.]+ MiB\)",
        on["log"],
    ), on["log"][-3000:]
    assert "xicon_video_frames: off (XICON_VIDEO_FRAMES)" in off["log"]
    assert "loaded as one float32 tensor" not in off["log"]
    names = sorted(on["files"])
    assert names == ["vf_00001-audio.mp4", "vf_00001.mp4", "vf_00001.png"], names
    for name in ("vf_00001.mp4", "vf_00001-audio.mp4"):
        assert on["files"][name] == off["files"][name], name
    # the PNG carries the time it was written (VHS's CreationTime text): its pixels must agree
    pixels = [Image.open(io.BytesIO(served["files"]["vf_00001.png"])) for served in (on, off)]
    assert pixels[0].tobytes() == pixels[1].tobytes() and pixels[0].size == (64, 48)
    with av.open(str(tmp_path / "on" / "comfy" / "output" / names[0])) as mp4:
        assert mp4.streams.video[0].frames == 33 and len(mp4.streams.audio) == 1
