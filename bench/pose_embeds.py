"""The pose embeds' first step (node 324, ``WanVideoAddSCAILPoseEmbeds.add``): the rendered pose
frames scaled to [-1, 1] and converted to the VAE's type on ``--device``, as upstream does it
(the arithmetic and the conversion on the host, then the copy) and as ``xicon_pose_embeds`` does
it (``frames_on_device``: copied a chunk at a time, the arithmetic on the device). Prints one
JSON object: each way's seconds per run (median of ``--repeat``), the first run apart, the
host memory its first run added to a fresh process's peak (``ru_maxrss``, each way in a process
of its own), and whether the results are equal, values and strides.

Run by any Python with torch (the stack's; on the GPU machine ``PYTHONPATH=$SITE python3``):

    python bench/pose_embeds.py --frames 1441 --size 208x336 --device cuda

On the CPU both ways run on the CPU: the upstream figure is then the host time that a GPU
machine's node spends before its encode.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXT = (
    Path(__file__).resolve().parent.parent
    / "stack"
    / "comfy_extension"
    / "xicon_pose_embeds"
    / "pose_embeds.py"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1441)
    parser.add_argument("--size", default="208x336", help="WIDTHxHEIGHT of the pose frames")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peak-of", choices=("upstream", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_of is None:
        # each way's host peak in a fresh process of its own (ru_maxrss only grows)
        peaks = {}
        for way in ("upstream", "chunked"):
            done = subprocess.run(
                [sys.executable, __file__, *(argv or sys.argv[1:]), "--peak-of", way],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[way] = json.loads(done.stdout.strip().splitlines()[-1])["peak_growth_mib"]

    import torch

    spec = importlib.util.spec_from_file_location("xicon_pose_embeds_impl", EXT)
    assert spec and spec.loader
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)

    width, height = (int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    frames = torch.rand(args.frames, height, width, 3, generator=torch.Generator().manual_seed(1))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def upstream() -> Any:
        return (frames[..., :3].permute(3, 0, 1, 2) * 2 - 1).to(device, dtype)

    def ours() -> Any:
        return ext.frames_on_device(frames, device, dtype)

    if args.peak_of is not None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = (upstream if args.peak_of == "upstream" else ours)()
        sync()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({"peak_growth_mib": grown // 1024, "shape": list(result.shape)}))
        return

    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "frames": args.frames,
        "size": [width, height],
        "dtype": args.dtype,
        "ways": {},
    }
    results = {}
    for name, way in (("upstream", upstream), ("chunked", ours)):
        times = []
        for _ in range(1 + args.repeat):
            sync()
            t0 = time.perf_counter()
            results[name] = way()
            sync()
            times.append(time.perf_counter() - t0)
        out["ways"][name] = {
            "first_s": round(times[0], 3),
            "median_s": round(statistics.median(times[1:] or times), 3),
            "host_peak_growth_mib": peaks[name],
        }
    a, b = results["upstream"], results["chunked"]
    out["equal"] = bool(torch.equal(a, b))
    out["same_strides"] = a.stride() == b.stride()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
