"""GPU preflight for the image: can torch use this GPU, and was the image built for its arch?

Contract (run by entrypoint.sh before ComfyUI starts; exit status 0 = fit):
- exit 2: torch sees no CUDA device, or a tiny kernel on it fails ("CUDA unknown error" hosts);
- exit 3: the GPU's compute capability is not in the arch list the image was compiled for
  (``IMAGE_CUDA_ARCH_LIST``, e.g. ``12.0`` or ``8.9;9.0;12.0``: SageAttention's kernels) or not in
  torch's own ``torch.cuda.get_arch_list()``; the message names the GPU, its capability, the
  list and the build argument to change — instead of a later "CUDA error: no kernel image".
- ``--sage-self-test`` (run by entrypoint.sh when SAGEATTENTION_ENABLED is on): runs
  ``sageattn`` and PyTorch's SDPA on the same random bf16 q/k/v (NHD layout, as WanVideoWrapper
  calls it) on this GPU and compares them, at the job's self-attention shape: 29,757 tokens
  (416x672, 81 frames: video 22,932 + reference 1,092 + half-size pose 5,733) x 40 heads x head
  dim 128, so the kernel configuration the job dispatches (tiling over a long sequence with a
  ragged last block) is the one tested; ``--tokens/--heads/--dim`` change it. One call takes
  about 30 ms on an H100; the run is dominated by CUDA start-up. exit 0 = they agree (cosine >=
  0.99); exit 4 = SageAttention is importable but gives wrong output or raises; exit 5 = it
  cannot be imported. Why: a SageAttention build can return garbage without raising (tag v2.2.0
  on sm90 returned an uninitialised buffer, bench/README.md), and ComfyUI only falls back to SDPA
  on an exception, so the log-line fallback detection cannot see it.
One line per finding on stderr, prefixed ``GPU PREFLIGHT``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

SAGE_MIN_COSINE = 0.99
# The job's self-attention shape (WanVideo 14B, SCAIL): tokens, heads, head dim.
JOB_TOKENS, JOB_HEADS, JOB_HEAD_DIM = 29_757, 40, 128


def parse_arch_list(raw: str) -> set[str]:
    """``"8.9;9.0 12.0+PTX"`` -> ``{"8.9", "9.0", "12.0"}``."""
    items = raw.replace(",", ";").replace(" ", ";").split(";")
    return {i.strip().removesuffix("+PTX") for i in items if i.strip()}


def _say(message: str) -> None:
    sys.stderr.write(f"GPU PREFLIGHT: {message}\n")
    sys.stderr.flush()


def check(arch_list: str) -> int:
    try:
        import torch
    except ImportError as exc:
        _say(f"torch cannot be imported: {exc}")
        return 2
    if not torch.cuda.is_available():
        _say("torch sees no CUDA device (driver too old for CUDA 12.8, or no GPU attached).")
        return 2
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    cap = f"{major}.{minor}"
    wanted = parse_arch_list(arch_list)
    if wanted and cap not in wanted:
        _say(
            f"{name} has compute capability {cap}, but this image was built for "
            f"{';'.join(sorted(wanted))} only (SageAttention kernels would fail with 'no kernel "
            f'image\'). Rebuild with --build-arg TORCH_CUDA_ARCH_LIST="{cap}" (or a list '
            f"including it), or pick a GPU pool of that arch."
        )
        return 3
    torch_archs = set(torch.cuda.get_arch_list())
    if f"sm_{major}{minor}" not in torch_archs and f"compute_{major}{minor}" not in torch_archs:
        _say(f"{name} ({cap}) is not supported by this torch build ({sorted(torch_archs)}).")
        return 3
    try:
        x = torch.ones(64, 64, device="cuda")
        float((x @ x).sum().item())
    except Exception as exc:  # any CUDA failure here means the host is unusable
        _say(f"a test kernel on {name} failed: {exc}")
        return 2
    sys.stderr.write(f"GPU PREFLIGHT: ok, {name}, capability {cap}, torch {torch.__version__}\n")
    return 0


def sage_cosine(tokens: int = JOB_TOKENS, heads: int = JOB_HEADS, dim: int = JOB_HEAD_DIM) -> float:
    """Cosine similarity of ``sageattn`` vs SDPA on one random input (raises on import errors)."""
    import torch
    from sageattention import sageattn

    torch.manual_seed(0)
    shape = (1, tokens, heads, dim)  # NHD: batch, tokens, heads, head dim
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    got = sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    cos = torch.nn.functional.cosine_similarity(ref.float().flatten(), got.float().flatten(), dim=0)
    return float(cos.item())


def sage_self_test(
    tokens: int = JOB_TOKENS, heads: int = JOB_HEADS, dim: int = JOB_HEAD_DIM
) -> int:
    started = time.monotonic()
    shape = f"{tokens} tokens x {heads} heads x {dim}"
    try:
        cos = sage_cosine(tokens, heads, dim)
    except ImportError as exc:
        _say(f"sageattention cannot be imported: {exc}")
        return 5
    except Exception as exc:  # a kernel that raises is as unusable as one that is wrong
        _say(f"sageattn raised on this GPU: {type(exc).__name__}: {exc}")
        return 4
    took = time.monotonic() - started
    if not math.isfinite(cos) or cos < SAGE_MIN_COSINE:
        _say(
            f"sageattn disagrees with PyTorch attention at {shape} "
            f"(cosine {cos:.5f} < {SAGE_MIN_COSINE}; {took:.1f} s)."
        )
        return 4
    _say(f"sageattn agrees with PyTorch attention (cosine {cos:.5f}) at {shape} in {took:.1f} s.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU preflight of the worker image.")
    parser.add_argument("--sage-self-test", action="store_true")
    parser.add_argument("--tokens", type=int, default=JOB_TOKENS)
    parser.add_argument("--heads", type=int, default=JOB_HEADS)
    parser.add_argument("--dim", type=int, default=JOB_HEAD_DIM)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.sage_self_test:
        return sage_self_test(args.tokens, args.heads, args.dim)
    return check(os.environ.get("IMAGE_CUDA_ARCH_LIST", ""))


if __name__ == "__main__":
    sys.exit(main())
