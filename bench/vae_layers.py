"""The Wan 2.1 VAE decoder's per-chunk layers alone, at the job's size, each done the way the
decode runs it today and in other ways with the same arithmetic: where its GPU time goes and what
another formulation would save. Torch (and Triton) only; no ComfyUI, no model file.

The decoder (WanVideoWrapper's ``wanvideo/wan_video_vae.py``, dim 96, ``dim_mult`` 1, 2, 4, 4)
decodes one latent frame at a time; each latent frame runs, at four sizes, residual blocks of
``RMS_norm`` → ``SiLU`` → ``CausalConv3d`` (3×3×3, two cached frames before the new ones) twice.
With the image's ``xicon_vae_channels_last`` the clip is channels-last, the spatial padding is
inside each convolution and the norm is one ``F.rms_norm``. For each level:

- ``conv3d``: today's convolution (``F.conv3d`` on the channels-last clip, bias added by
  PyTorch after cuDNN's kernel);
- ``conv3d_nobias``: the same without the bias (what the bias's own pass costs);
- ``taps2d``: three 2-D convolutions, one per time tap, on views of the same clip, summed;
- ``stack2d``: the three frames of each tap stacked on the channels (a copy) and one 2-D
  convolution with the weight's taps as input channels (the same sum as the 3-D convolution;
  the image's ``decoder_ops.stacked_conv``);
- ``conv3d_pad128``: output channels padded to 128 (a wider tile for cuDNN), where there are 96;
- ``head_*`` (at 96 channels): the decoder's last convolution, 96 to 3 channels, as it runs
  (``head_conv3d``), with its output channels padded to 8, 16 or 32 and cut after, and stacked;
- ``bias_add``: the pass PyTorch adds after cuDNN's kernel for a convolution's bias;
- ``norm_silu``: today's ``F.rms_norm`` and ``F.silu``, two kernels;
- ``norm_silu_fused_N``: the image's ``norm_silu.py`` kernel, the two in one pass (``N``
  elements per program).

Each prints its median time over ``--repeat`` runs (CUDA events), its TFLOP/s for convolutions
and its largest difference from today's way (bf16). The last line is the JSON of every figure.

    python bench/vae_layers.py --levels 0,1,2,3 --repeat 20
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# (channels, latent frames' output frames per chunk, height, width) at 416x672
EPS = 1e-24  # decoder_ops.py's floor on the mean square
LEVELS = {
    0: (384, 1, 52, 84),
    1: (384, 2, 104, 168),
    2: (192, 4, 208, 336),
    3: (96, 4, 416, 672),
    4: (96, 4, 336, 208),  # the encoder's first level on the pose frames (node 324)
    9: (96, 4, 8, 12),  # a smoke test's size (``--device cpu`` with ``TRITON_INTERPRET=1``)
}


def timed(fn: Any, repeat: int) -> float:
    import torch

    if not torch.cuda.is_available():  # the smoke test: wall time
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


EXTENSION = Path(__file__).resolve().parent.parent / "stack" / "comfy_extension"


def extension_module(name: str, file: str) -> Any:
    """One of ``xicon_vae_channels_last``'s files, loaded as the image loads it."""
    path = EXTENSION / "xicon_vae_channels_last" / file
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def level_figures(
    level: int, repeat: int, row_elements: list[int], ns: Any, ops: Any
) -> dict[str, Any]:
    """Every way's figures at one level of the decoder."""
    import torch
    import torch.nn.functional as F

    dev, dt = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
    cl3, cl2 = torch.channels_last_3d, torch.channels_last
    c, t, h, w = LEVELS[level]
    x = torch.randn(1, c, t + 2, h, w, device=dev, dtype=dt).to(memory_format=cl3)
    weight = (torch.randn(c, c, 3, 3, 3, device=dev, dtype=dt) / (27 * c) ** 0.5).to(
        memory_format=cl3
    )
    bias = torch.randn(c, device=dev, dtype=dt) * 0.1
    flops = 2 * c * c * 27 * h * w * t
    out: dict[str, Any] = {}

    def conv3d() -> torch.Tensor:
        return F.conv3d(x, weight, bias, padding=(0, 1, 1))

    def conv3d_nobias() -> torch.Tensor:
        return F.conv3d(x, weight, None, padding=(0, 1, 1))

    taps = [weight[:, :, k].contiguous(memory_format=cl2) for k in range(3)]

    def frames(k: int) -> torch.Tensor:
        return x[0, :, k : k + t].permute(1, 0, 2, 3)  # (t, c, h, w), channels-last view

    def taps2d() -> torch.Tensor:
        y = F.conv2d(frames(0), taps[0], bias, padding=1)
        y += F.conv2d(frames(1), taps[1], None, padding=1)
        y += F.conv2d(frames(2), taps[2], None, padding=1)
        return y.permute(1, 0, 2, 3).unsqueeze(0)

    def stack2d() -> torch.Tensor:  # the image's decoder_ops.stacked_conv
        return ops.stacked_conv(x, weight, bias, (1, 1))

    ways = {
        "conv3d": conv3d,
        "conv3d_nobias": conv3d_nobias,
        "taps2d": taps2d,
        "stack2d": stack2d,
    }
    if c == 96:
        wide = torch.zeros(128, c, 3, 3, 3, device=dev, dtype=dt)
        wide[:c] = weight
        wide = wide.to(memory_format=cl3)
        wide_b = torch.zeros(128, device=dev, dtype=dt)
        wide_b[:c] = bias

        def conv3d_pad128() -> torch.Tensor:
            return F.conv3d(x, wide, wide_b, padding=(0, 1, 1))[:, :c]

        ways["conv3d_pad128"] = conv3d_pad128
        head = (torch.randn(3, c, 3, 3, 3, device=dev, dtype=dt) / (27 * c) ** 0.5).to(
            memory_format=cl3
        )
        ways["head_conv3d"] = lambda: F.conv3d(x, head, bias[:3], padding=(0, 1, 1))
        for width in (8, 16, 32):
            padded = torch.zeros(width, c, 3, 3, 3, device=dev, dtype=dt)
            padded[:3] = head
            padded = padded.to(memory_format=cl3)
            padded_b = torch.zeros(width, device=dev, dtype=dt)
            padded_b[:3] = bias[:3]
            ways[f"head_pad{width}"] = functools.partial(
                lambda w_, b_: F.conv3d(x, w_, b_, padding=(0, 1, 1))[:, :3], padded, padded_b
            )
        ways["head_stack2d"] = lambda: ops.stacked_conv(x, head, bias[:3], (1, 1))

    reference = conv3d().float()
    head_out: dict[str, Any] = {}
    for name, fn in ways.items():
        for bench_mode in (False, True):
            torch.backends.cudnn.benchmark = bench_mode
            ms = timed(fn, repeat)
            y = fn()
            key = name + ("+bench" if bench_mode else "")
            entry = {"ms": round(ms, 4)}
            if not name.startswith("head"):
                entry["tflops"] = round(flops / ms / 1e9, 1)
                entry["max_abs_diff"] = float((y.float() - reference).abs().max())
            else:
                head_reference = head_out.setdefault("y", y.float())
                entry["max_abs_diff"] = float((y.float() - head_reference).abs().max())
            out[key] = entry
            print(f"level {level} c={c} t={t} {h}x{w} {key}: {entry}", flush=True)
    torch.backends.cudnn.benchmark = False

    # the norm and SiLU after a convolution, on its output
    y = conv3d()  # (1, c, t, h, w) channels-last
    gamma = torch.rand(c, device=dev, dtype=dt) + 0.5
    ops_ms = timed(lambda: ns.reference(y, gamma, EPS), repeat)
    bias_ms = timed(lambda: y + bias.reshape(1, -1, 1, 1, 1), repeat)
    out["bias_add"] = {"ms": round(bias_ms, 4)}
    out["norm_silu"] = {"ms": round(ops_ms, 4)}
    print(f"level {level} bias_add: {out['bias_add']} norm_silu: {out['norm_silu']}", flush=True)
    expected = ns.reference(y, gamma, EPS).float()
    for rows in row_elements:
        ms = timed(lambda rows=rows: ns.fused(y, gamma, EPS, rows), repeat)
        diff = (ns.fused(y, gamma, EPS, rows).float() - expected).abs()
        entry = {
            "ms": round(ms, 4),
            "max_abs_diff": float(diff.max()),
            "differing": float((diff > 0).float().mean()),
        }
        out[f"norm_silu_fused_{rows}"] = entry
        print(f"level {level} norm_silu_fused_{rows}: {entry}", flush=True)
    out["norm_bytes_gb"] = round(2 * y.numel() * y.element_size() / 1e9, 4)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="0,1,2,3")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--row-elements", default="1024,2048,4096", help="elements per program of the kernel"
    )
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"device": name, "levels": {}}
    ns = extension_module("xicon_vae_norm_silu", "norm_silu.py")
    ops = extension_module("xicon_vae_decoder_ops", "decoder_ops.py")
    if ns.triton is None:
        raise SystemExit("Triton is not installed")

    row_elements = [int(v) for v in args.row_elements.split(",")]
    for level in (int(v) for v in args.levels.split(",")):
        out = level_figures(level, args.repeat, row_elements, ns, ops)
        results["levels"][str(level)] = out
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
