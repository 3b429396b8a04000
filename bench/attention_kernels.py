"""Kernel-level attention benchmark at this job's attention shape.

Contract: times one self-attention call of the diffusion transformer (batch 1, 40 heads, head dim
128, bf16, non-causal) with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) and with
every SageAttention kernel that the importable ``sageattention`` package offers, all in the same
process, and prints the figures. It prints; it is not a test and does not run in CI. It needs a
CUDA GPU.

Shapes (tokens after Wan 2.1's 8x spatial / 4x temporal VAE and 2x2 patches):

- ``scail``: 416x672, 81 frames: video 21x26x42 = 22,932, reference 1,092, pose at half size
  21x13x21 = 5,733; total 29,757.
- ``wan480``: a standard Wan 2.1 480x832, 81-frame run: 21x30x52 = 32,760.

For each kernel: warm-up calls, then each measured call bracketed by its own pair of CUDA
events; the median, min and max over the measured calls are reported, with the rate
4*N^2*d*heads / time (for the quantised kernels this counts the same work, not the int8/fp8
operations they issue), the ratio SDPA time / kernel time from the same run (> 1 is faster than
SDPA), and the cosine similarity and max absolute difference of the output against SDPA's.

Inputs are synthetic (``torch.randn``), so the accuracy figures are a floor check only: real
activations with outliers quantise worse than Gaussian noise.

Run once per SageAttention build, with that build first on ``PYTHONPATH``::

    PYTHONPATH=<dir with sageattention 1.0.6> python bench/attention_kernels.py
    PYTHONPATH=<dir with sageattention 2.2 built for sm90> python bench/attention_kernels.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEADS = 40
HEAD_DIM = 128
SHAPES: dict[str, tuple[int, str]] = {
    "scail": (22_932 + 1_092 + 5_733, "416x672x81 video + reference + half-size pose"),
    "wan480": (21 * 30 * 52, "480x832x81 video (standard Wan 2.1 480p)"),
}

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Timing:
    """Per-call times of one kernel, in milliseconds."""

    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)


def time_kernel(fn: Callable[[], torch.Tensor], warmup: int, iters: int) -> Timing:
    """Run ``fn`` ``warmup`` times, then time ``iters`` calls with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return Timing(times)


def sage_version() -> str:
    """The installed sageattention version and location, or why it is not importable."""
    try:
        import sageattention
    except Exception as exc:  # any import failure is a figure to report
        return f"not importable ({type(exc).__name__}: {exc})"
    try:
        version = importlib.metadata.version("sageattention")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return f"{version} ({sageattention.__file__})"


def dispatched_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel that ``sageattn`` dispatches to on this GPU (2.x), found by recording calls."""
    try:
        import sageattention.core as core
    except Exception as exc:
        return f"unknown ({exc})"
    names = [n for n in dir(core) if n.startswith("sageattn_qk_")]
    if not names:
        return "no dispatcher (1.x: sageattn is itself the Triton kernel)"
    seen: list[str] = []
    originals = {n: getattr(core, n) for n in names}

    def recorder(name: str, orig: Kernel) -> Callable[..., torch.Tensor]:
        def wrapped(*args: object, **kwargs: object) -> torch.Tensor:
            seen.append(f"{name}({', '.join(f'{a}={b}' for a, b in sorted(kwargs.items()))})")
            return orig(*args, **kwargs)

        return wrapped

    try:
        for n, orig in originals.items():
            setattr(core, n, recorder(n, orig))
        core.sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except Exception as exc:
        seen.append(f"raised {type(exc).__name__}: {exc}")
    finally:
        for n, orig in originals.items():
            setattr(core, n, orig)
    return "; ".join(seen) or "none recorded"


NHD_LABEL = 'sageattn(tensor_layout="NHD") [WanVideoWrapper layout]'


def sage_kernels() -> dict[str, Kernel]:
    """The SageAttention entry points to time; all take [B, H, N, d] tensors but NHD_LABEL's."""
    try:
        import sageattention
    except Exception:
        return {}
    kernels: dict[str, Kernel] = {
        'sageattn(tensor_layout="HND")': _bind(sageattention.sageattn, {}),
        # WanVideoWrapper calls sageattn on contiguous [B, N, H, d] tensors.
        NHD_LABEL: lambda q, k, v: sageattention.sageattn(
            q, k, v, tensor_layout="NHD", is_causal=False
        ),
    }
    extra = {
        "sageattn_qk_int8_pv_fp8_cuda_sm90 (sm90 default)": {"pv_accum_dtype": "fp32+fp32"},
        "sageattn_qk_int8_pv_fp8_cuda per_warp fp32+fp16 (the sm120 default)": {
            "qk_quant_gran": "per_warp",
            "pv_accum_dtype": "fp32+fp16",
        },
        "sageattn_qk_int8_pv_fp16_cuda fp32 (the sm80 default)": {"pv_accum_dtype": "fp32"},
        "sageattn_qk_int8_pv_fp16_triton (the sm86 default)": {},
    }
    for label, kwargs in extra.items():
        name = label.split()[0]
        fn = getattr(sageattention, name, None)
        if fn is not None:
            kernels[label] = _bind(fn, kwargs)
    return kernels


def _bind(fn: Callable[..., torch.Tensor], kwargs: dict[str, str]) -> Kernel:
    return lambda q, k, v: fn(q, k, v, tensor_layout="HND", is_causal=False, **kwargs)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def bench_shape(name: str, warmup: int, iters: int) -> None:
    """Time SDPA and every SageAttention kernel at one shape and print a table."""
    tokens, what = SHAPES[name]
    flops = 4 * tokens * tokens * HEAD_DIM * HEADS
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    print(f"\n== shape {name}: {tokens:,} tokens ({what}), B=1 H={HEADS} d={HEAD_DIM} bf16")
    print(f"   work per call 4*N^2*d*H = {flops / 1e12:.2f} TFLOP")
    q_nhd, k_nhd, v_nhd = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v)
    sdpa = time_kernel(lambda: F.scaled_dot_product_attention(q, k, v), warmup, iters)
    rows = [("torch SDPA, default backend (reference)", sdpa, 1.0, "")]
    rows += sdpa_backends(q, k, v, ref, sdpa, warmup, iters)
    for label, fn in sage_kernels().items():
        args = (q_nhd, k_nhd, v_nhd) if label == NHD_LABEL else (q, k, v)
        try:
            out = fn(*args)
            if label == NHD_LABEL:
                out = out.transpose(1, 2)
            diff = (out.float() - ref.float()).abs().max().item()
            cos = cosine(out, ref)
            acc = f"cos {cos:.6f}, max|diff| {diff:.4f}"
            if not cos > 0.99:
                acc += "  WRONG OUTPUT (its time is not a valid figure)"
            del out
            t = time_kernel(lambda fn=fn, args=args: fn(*args), warmup, iters)
            rows.append((label, t, sdpa.median / t.median, acc))
        except Exception as exc:  # a kernel missing on this arch is a result
            print(f"   {label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        torch.cuda.empty_cache()
    print(
        f"   {'kernel':<72} {'median ms':>9} {'min':>7} {'max':>7} {'TFLOP/s':>8} "
        f"{'vs SDPA':>8}  accuracy vs SDPA"
    )
    for label, t, ratio, acc in rows:
        rate = flops / (t.median / 1e3) / 1e12
        print(
            f"   {label:<72} {t.median:9.2f} {min(t.times_ms):7.2f} {max(t.times_ms):7.2f} "
            f"{rate:8.0f} {ratio:7.2f}x  {acc}"
        )
    again = time_kernel(lambda: F.scaled_dot_product_attention(q, k, v), warmup, iters)
    print(f"   drift check: SDPA again at the end, median {again.median:.2f} ms")
    if sage_version()[0].isdigit():
        print(f"   sageattn dispatch on this GPU: {dispatched_kernel(q, k, v)}")


def sdpa_backends(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref: torch.Tensor,
    sdpa: Timing,
    warmup: int,
    iters: int,
) -> list[tuple[str, Timing, float, str]]:
    """SDPA pinned to each fused backend, to show which one the default picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        label = f"torch SDPA, {backend.name} only"

        def call(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            acc = f"cos {cosine(call(), ref):.6f}"
            t = time_kernel(call, warmup, iters)
            rows.append((label, t, sdpa.median / t.median, acc))
        except Exception as exc:  # a backend missing here is a result
            print(f"   {label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["scail", "wan480"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=15)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_kernels.py needs a CUDA GPU")
    import triton

    major, minor = torch.cuda.get_device_capability()
    print(f"GPU: {torch.cuda.get_device_name()} (sm{major}{minor})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
    print(f"sageattention: {sage_version()}")
    print(
        f"timing: {args.warmup} warm-up calls, median of {args.iters} calls, CUDA events per call"
    )
    for name in args.shapes:
        bench_shape(name, args.warmup, args.iters)


if __name__ == "__main__":
    main()
