"""Generate ``assets/default_video.mp4``: the built-in driving clip (used when a job has no video).

A deterministic, synthetic clip we may ship: a full-body articulated human figure (head, hair,
torso, clothed limbs, shoes) on a plain studio background doing a simple dance loop (side steps,
hip sway, knee bounce, alternating arm waves and a two-hand raise), 480x832 portrait, 24 fps,
4 s (96 frames), H.264 yuv420p, with an AAC stereo track of a 120 bpm beat (kick on every beat,
hi-hat off-beats) so ``keep_audio`` has something to keep.

Usage: ``python scripts/make_default_video.py [--out assets/default_video.mp4]
[--test-input test_input.json] [--seconds N]`` (``--seconds`` makes a longer dance of the same
loop, e.g. the 60-s clip of the GPU benchmark; the default output is unchanged). The second
writes the sample job, whose ``image_base64`` is a reference character drawn by the same code.
Same inputs -> same pixels and samples (no randomness); the encoder runs single-threaded.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("make_default_video")

WIDTH, HEIGHT, FPS, SECONDS = 480, 832, 24, 4
FRAMES = FPS * SECONDS
LOOP = 48  # frames per dance loop (2 s = 4 beats at 120 bpm)
SAMPLE_RATE = 44100
SKIN, SHIRT, PANTS, SHOE, HAIR = (
    (224, 172, 140),
    (200, 60, 70),
    (40, 55, 110),
    (30, 30, 30),
    (50, 35, 25),
)

Point = tuple[float, float]


def _rot(origin: Point, length: float, angle_deg: float) -> Point:
    """End point of a limb of ``length`` leaving ``origin`` at ``angle_deg`` (0 = straight down)."""
    a = math.radians(angle_deg)
    return origin[0] + length * math.sin(a), origin[1] + length * math.cos(a)


def pose(frame: int) -> dict[str, Point]:
    """Joint positions for ``frame`` (pixels)."""
    t = (frame % LOOP) / LOOP * 2 * math.pi  # one loop
    beat = math.sin(2 * t)  # two bounces per loop
    cx = WIDTH / 2 + 40 * math.sin(t)  # side step
    bounce = 10 * abs(beat)
    hip: Point = (cx + 12 * math.sin(2 * t), 470 + bounce)
    neck: Point = (cx + 4 * math.sin(t), 250 + bounce)
    j: dict[str, Point] = {"hip": hip, "neck": neck, "head": (neck[0], neck[1] - 62)}
    for side, sign in (("l", -1), ("r", 1)):
        shoulder = (neck[0] + sign * 52, neck[1] + 14)
        wave = math.sin(t + (0 if sign < 0 else math.pi))
        raise_both = max(0.0, math.sin(2 * t - math.pi / 2)) * (1 if frame % 96 >= 48 else 0)
        upper = sign * min(160.0, 35 + 70 * max(0.0, wave) + 100 * raise_both)
        lower = upper + sign * min(20.0, 30 + 50 * max(0.0, wave))
        elbow = _rot(shoulder, 95, upper)
        wrist = _rot(elbow, 88, lower)
        hip_side = (hip[0] + sign * 30, hip[1])
        lean = 8 * math.sin(t)  # both legs lean with the side step
        bend = abs(beat)  # knees open on the bounce
        knee = _rot(hip_side, 130, sign * (8 + 10 * bend) + lean)
        ankle = _rot(knee, 125, sign * (2 - 8 * bend) + lean)
        j |= {
            f"{side}_shoulder": shoulder,
            f"{side}_elbow": elbow,
            f"{side}_wrist": wrist,
            f"{side}_hip": hip_side,
            f"{side}_knee": knee,
            f"{side}_ankle": ankle,
        }
    return j


def _limb(
    d: ImageDraw.ImageDraw, a: Point, b: Point, width: int, color: tuple[int, int, int]
) -> None:
    d.line([a, b], fill=color, width=width)
    r = width / 2
    for x, y in (a, b):
        d.ellipse([x - r, y - r, x + r, y + r], fill=color)


def render(frame: int, shirt: tuple[int, int, int] = SHIRT) -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT))
    d = ImageDraw.Draw(img)
    for y in range(HEIGHT):  # studio backdrop: vertical gradient, floor below 720
        shade = 235 - int(50 * y / HEIGHT) if y < 720 else 150
        d.line([(0, y), (WIDTH, y)], fill=(shade, shade - 5, shade - 15))
    j = pose(frame)
    shadow_x = j["hip"][0]
    d.ellipse([shadow_x - 90, 745, shadow_x + 90, 770], fill=(120, 118, 112))
    for side in ("l", "r"):  # legs behind the torso
        _limb(d, j[f"{side}_hip"], j[f"{side}_knee"], 42, PANTS)
        _limb(d, j[f"{side}_knee"], j[f"{side}_ankle"], 36, PANTS)
        ax, ay = j[f"{side}_ankle"]
        toe = 30 if side == "r" else -30
        d.ellipse([min(ax, ax + toe) - 8, ay - 10, max(ax, ax + toe) + 8, ay + 14], fill=SHOE)
    ls, rs, lh, rh = j["l_shoulder"], j["r_shoulder"], j["l_hip"], j["r_hip"]
    d.polygon([ls, rs, (rh[0] + 12, rh[1] + 10), (lh[0] - 12, lh[1] + 10)], fill=shirt)
    d.rectangle(
        [j["neck"][0] - 14, j["neck"][1] - 22, j["neck"][0] + 14, j["neck"][1] + 6], fill=SKIN
    )
    hx, hy = j["head"]
    d.ellipse([hx - 38, hy - 48, hx + 38, hy + 48], fill=SKIN)
    d.chord([hx - 40, hy - 52, hx + 40, hy + 20], 180, 360, fill=HAIR)
    for ex in (-14, 14):
        d.ellipse([hx + ex - 4, hy - 4, hx + ex + 4, hy + 4], fill=(40, 30, 30))
    d.arc([hx - 14, hy + 8, hx + 14, hy + 26], 20, 160, fill=(150, 60, 60), width=3)
    for side in ("l", "r"):  # arms in front
        _limb(d, j[f"{side}_shoulder"], j[f"{side}_elbow"], 30, shirt)
        _limb(d, j[f"{side}_elbow"], j[f"{side}_wrist"], 24, SKIN)
        wx, wy = j[f"{side}_wrist"]
        d.ellipse([wx - 15, wy - 15, wx + 15, wy + 15], fill=SKIN)
    return img


def beat_track(seconds: int = SECONDS) -> np.ndarray:
    """Stereo float32 samples [2, n]: kick on every beat (120 bpm), hi-hat on off-beats."""
    n = SAMPLE_RATE * seconds
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n, dtype=np.float64)
    beat = 0.5
    for k in range(int(seconds / beat)):
        start = int(k * beat * SAMPLE_RATE)
        seg = t[: int(0.25 * SAMPLE_RATE)]
        kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-seg * 30)) * seg) * np.exp(-seg * 12)
        out[start : start + len(seg)] += 0.8 * kick
        hat_start = start + int(beat / 2 * SAMPLE_RATE)
        hseg = t[: int(0.05 * SAMPLE_RATE)]
        # deterministic "noise": a sum of detuned high sines
        hat = sum(np.sin(2 * np.pi * f * hseg) for f in (6100, 7300, 8900, 10300)) / 4
        out[hat_start : hat_start + len(hseg)] += 0.25 * hat * np.exp(-hseg * 80)
    mono = np.clip(out, -1, 1).astype(np.float32)
    return np.stack([mono, mono])


def write(out: Path, seconds: int = SECONDS) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        container.metadata["title"] = "XiCON Dance default driving clip (synthetic)"
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = {"crf": "23", "preset": "medium", "threads": "1", "tune": "animation"}
        video.codec_context.thread_count = 1
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
        audio.bit_rate = 96_000
        for i in range(FPS * seconds):
            frame = av.VideoFrame.from_image(render(i))
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples = beat_track(seconds)
        chunk = 1024
        for pos in range(0, samples.shape[1], chunk):
            block = np.ascontiguousarray(samples[:, pos : pos + chunk])
            af = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            af.sample_rate = SAMPLE_RATE
            af.pts = pos
            af.time_base = Fraction(1, SAMPLE_RATE)
            container.mux(audio.encode(af))
        container.mux(audio.encode(None))
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)


def reference_jpeg() -> bytes:
    """A small reference character (same figure, green shirt, rest pose) as JPEG bytes.

    ``test_input.json`` embeds it as ``image_base64`` so the sample job needs no network."""
    buf = io.BytesIO()
    render(0, shirt=(60, 150, 90)).save(buf, format="JPEG", quality=80, optimize=True)
    return buf.getvalue()


def write_test_input(path: Path) -> None:
    job = {
        "input": {
            "image_base64": base64.b64encode(reference_jpeg()).decode("ascii"),
            "prompt": "a person dancing in a bright studio, full body, smooth motion",
            "width": 480,
            "height": 832,
            "steps": 6,
            "cfg": 1.0,
            "seed": 42,
            "max_frames": 81,
            "keep_audio": True,
            "output": "auto",
        }
    }
    path.write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s", path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default = Path(__file__).resolve().parent.parent / "assets" / "default_video.mp4"
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--test-input", type=Path, default=None, help="also write a sample job")
    parser.add_argument(
        "--seconds", type=int, default=SECONDS, help="clip length (a longer dance for benchmarks)"
    )
    args = parser.parse_args(argv)
    write(args.out, args.seconds)
    if args.test_input is not None:
        write_test_input(args.test_input)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
