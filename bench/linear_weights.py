"""The transformer's linear layers as the shipped graph runs them (WanVideoWrapper's
``CustomLinear`` from the pinned pack: an fp8 weight with its bf16 scale, a rank-64 LoRA left
unmerged), upstream's ``forward`` against ``xicon_linear_weights``' one-pass weight, on one
Wan-14B block's twelve linears at their true shapes. Prints one JSON object: per way and layer
the milliseconds of the whole call and of making the weight alone (median of ``--repeat``, CUDA
events, after a warm-up), the sum over a block and over the forward's ``--blocks`` blocks, and
whether both ways give the same outputs and weights, bit for bit.

Run on a GPU machine with the stack's torch (``PYTHONPATH=$SITE python3``):

    python bench/linear_weights.py --comfy-dir $COMFY_DIR --tokens 29757

Random weights and inputs: the figures are time, not quality.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

EXT = (
    Path(__file__).resolve().parent.parent
    / "stack"
    / "comfy_extension"
    / "xicon_linear_weights"
    / "linear_weights.py"
)
DIM, FFN = 5120, 13824
# (name, out, in, tokens it multiplies: "x" the clip's, "text" / "image" the context's)
LAYERS = (
    ("self_attn.q", DIM, DIM, "x"),
    ("self_attn.k", DIM, DIM, "x"),
    ("self_attn.v", DIM, DIM, "x"),
    ("self_attn.o", DIM, DIM, "x"),
    ("cross_attn.q", DIM, DIM, "x"),
    ("cross_attn.k", DIM, DIM, "text"),
    ("cross_attn.v", DIM, DIM, "text"),
    ("cross_attn.k_img", DIM, DIM, "image"),
    ("cross_attn.v_img", DIM, DIM, "image"),
    ("cross_attn.o", DIM, DIM, "x"),
    ("ffn.0", FFN, DIM, "x"),
    ("ffn.2", DIM, FFN, "x"),
)


def load_custom_linear(comfy_dir: Path) -> Any:
    """The pinned pack's ``custom_linear`` module, imported as part of a package of its own."""
    root = comfy_dir / "custom_nodes" / "ComfyUI-WanVideoWrapper"
    package = types.ModuleType("wvw_bench")
    package.__path__ = [str(root)]
    sys.modules["wvw_bench"] = package
    return importlib.import_module("wvw_bench.custom_linear")


def load_extension() -> Any:
    spec = importlib.util.spec_from_file_location("xicon_linear_weights_bench", EXT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=29757, help="the clip's tokens per window")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--image-tokens", type=int, default=257)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run, TRITON_INTERPRET=1")
    parser.add_argument("--scale-dims", type=int, default=1, help="divide the shapes by this")
    args = parser.parse_args(argv)

    import torch

    custom_linear = load_custom_linear(args.comfy_dir)
    ext = load_extension()
    upstream = custom_linear.CustomLinear.forward
    replaced = ext.replace(upstream)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = {"x": args.tokens, "text": args.text_tokens, "image": args.image_tokens}

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.repeat):
            if not cuda:
                began = time.perf_counter()
                fn()
                times.append((time.perf_counter() - began) * 1000)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    rows = []
    for name, out_f, in_f, kind in LAYERS:
        out_f, in_f = out_f // args.scale_dims, in_f // args.scale_dims
        layer = custom_linear.CustomLinear(
            in_f,
            out_f,
            True,
            compute_dtype=dtype,
            scale_weight=torch.tensor([0.0213], dtype=dtype, device=device),
        )
        weight = torch.randn(out_f, in_f, device=device, generator=gen) * 40
        layer.weight = torch.nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)
        bias = torch.randn(out_f, device=device, generator=gen).to(dtype)
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        up = torch.randn(out_f, args.rank, device=device, generator=gen) * 0.01
        down = torch.randn(args.rank, in_f, device=device, generator=gen) * 0.01
        layer.set_lora_diffs([(up, down, float(args.rank))], device=device)
        layer.set_lora_strengths([1.0], device=device)
        x = torch.randn(tokens[kind], in_f, device=device, generator=gen).to(dtype)

        def upstream_weight(layer: Any = layer, x: torch.Tensor = x) -> torch.Tensor:
            w = layer._prepare_weight(x)
            if layer.weight.numel() < x.numel():
                w = w * layer.scale_weight
            return layer._get_weight_with_lora(w)

        def kernel_weight(layer: Any = layer, x: torch.Tensor = x) -> torch.Tensor:
            scale = layer.scale_weight if layer.weight.numel() < x.numel() else None
            patches = ext.lora_patches(layer, layer.weight.shape)
            return ext.weight_kernel.compute_weight(layer.weight, x.dtype, scale, patches)

        with torch.no_grad():
            same_out = torch.equal(upstream(layer, x), replaced(layer, x))
            same_weight = torch.equal(upstream_weight(), kernel_weight())
            rows.append(
                {
                    "layer": name,
                    "shape": [out_f, in_f],
                    "tokens": tokens[kind],
                    "upstream_ms": round(timed(functools.partial(upstream, layer, x)), 4),
                    "one_pass_ms": round(timed(functools.partial(replaced, layer, x)), 4),
                    "upstream_weight_ms": round(timed(upstream_weight), 4),
                    "one_pass_weight_ms": round(timed(kernel_weight), 4),
                    "same_output": same_out,
                    "same_weight": same_weight,
                }
            )
        del layer, x

    def total(key: str) -> float:
        return round(sum(r[key] for r in rows), 3)

    block = {k: total(k) for k in ("upstream_ms", "one_pass_ms")}
    block.update({k: total(k) for k in ("upstream_weight_ms", "one_pass_weight_ms")})
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "torch": torch.__version__,
                "dtype": args.dtype,
                "tokens": tokens,
                "rank": args.rank,
                "repeat": args.repeat,
                "layers": rows,
                "block_ms": block,
                "forward_ms": {k: round(v * args.blocks, 1) for k, v in block.items()},
                "all_same": all(r["same_output"] and r["same_weight"] for r in rows),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
