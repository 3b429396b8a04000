"""How faithful the worker's intermediate clip is for other x264 settings.

Transcodes the bundled dance (``scripts/make_default_video.py``, ``--seconds`` long) to the
job's size and fps as a job does (``xicon_dance.transcode``, no audio), once losslessly (crf 0,
the reference) and once per ``--variant`` (``NAME:KEY=VALUE,...``, over the transcode's own
options), and prints each file's size and its luma PSNR and largest luma difference against the
lossless one. The pose detectors read this clip, so its fidelity is what a faster setting may
cost.

Usage::

    python bench/transcode_fidelity.py [--seconds 61] [--frames 1441] [--size 416x672]
        [--variant superfast:preset=superfast --variant ultrafast:preset=ultrafast ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_default_video  # noqa: E402

from xicon_dance import clip, transcode  # noqa: E402

DEFAULT_VARIANTS = (
    "superfast:preset=superfast",
    "ultrafast:preset=ultrafast",
    "superfast_fastdecode:preset=superfast,tune=fastdecode",
)


def luma(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack(
            [f.to_ndarray(format="gray").astype(np.float32) for f in container.decode(video=0)]
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=61)
    parser.add_argument("--frames", type=int, default=1441)
    parser.add_argument("--size", default="416x672")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--variant", action="append", default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    own = dict(transcode.VIDEO_OPTIONS)
    plan = clip.ClipPlan(args.fps, args.frames / args.fps, args.frames, args.frames, False, None)
    with tempfile.TemporaryDirectory(prefix="transcode_fidelity_") as tmp:
        folder = Path(tmp)
        src = folder / "dance.mp4"
        make_default_video.write(src, args.seconds)

        def encode(name: str, options: dict[str, str]) -> Path:
            transcode.VIDEO_OPTIONS = {**own, **options}
            out = folder / f"{name}.mp4"
            transcode.transcode(src, out, plan, width, height, audio=False)
            return out

        reference = luma(encode("lossless", {"crf": "0"}))
        print(f"{args.frames} frames at {width}x{height}; the transcode's own options {own}")
        for variant in args.variant or DEFAULT_VARIANTS:
            name, _, text = variant.partition(":")
            options = dict(item.split("=", 1) for item in text.split(",") if item)
            path = encode(name, options)
            diff = luma(path) - reference
            psnr = 10 * np.log10(255**2 / float((diff**2).mean()))
            print(
                f"{name:22s} {path.stat().st_size / 1e6:5.1f} MB  luma PSNR against lossless "
                f"{psnr:.2f} dB  largest |difference| {np.abs(diff).max():.0f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
