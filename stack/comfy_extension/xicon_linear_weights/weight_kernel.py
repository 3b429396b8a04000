"""A linear's compute weight made in one pass: the stored weight converted to the input's type,
times its scale, plus each LoRA's product times its strength, with upstream's roundings.

Why: WanVideoWrapper's ``CustomLinear.forward`` (``custom_linear.py`` at the pinned commit) makes
the weight it multiplies by in separate PyTorch kernels on every call: ``self.weight.to(input)``
(fp8 to bf16, a copy PyTorch runs unvectorised), ``weight * self.scale_weight``, and per LoRA
``weight + torch.mm(up, down) * (strength * alpha)`` (a multiplication and an addition), each a
pass over the whole weight. In the profile of one pose window-step of the 14B transformer on an
H200 (``bench/results/gpu_h200_windows``, 2,260 ms) they are among 480 copies (53.4 ms), 1,041
bf16 multiplications (70.8 ms, 960 of them these), 600 bf16 additions (39.2 ms, 480 of them
these) and 480 rank-64 products (11.1 ms): at most 175 ms of every forward, paid once per
context window and sampler step.

What: ``compute_weight`` gives the same tensor, bit for bit: ``torch.mm`` still makes each
LoRA's product (cuBLAS, as upstream), and one Triton kernel (``_weight_kernel``) reads the stored
weight, the scale, the product and its strength and writes the result, rounding to the input's
type after each step as PyTorch's kernels do (to nearest, ties to even: every step is one
float32 operation of two values of that type). A second LoRA, if any, is added in place by the
same kernel. ``reference`` is upstream's expressions, for the tests and the bench.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton ships with PyTorch's CUDA wheels; without it upstream's forward runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the stack's torch brings it
    triton = None

ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the compute types
STORED = (  # weights the kernel reads: each converts to float32 exactly
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.bfloat16,
    torch.float16,
    torch.float32,
)
BLOCK = 4096  # elements per program

if triton is not None:

    @triton.jit
    def _rounded(x, ROUND: tl.constexpr):
        """float32 ``x`` rounded to nearest-even in the compute type, kept in float32 (by bits
        for bf16: the same on a GPU and in Triton's CPU interpreter, whose cast truncates)."""
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        elif ROUND == 2:
            x = x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def _weight_kernel(
        w_ptr,
        scale_ptr,
        p_ptr,
        strength_ptr,
        out_ptr,
        n,
        ROUND: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_PATCH: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        w = _rounded(tl.load(w_ptr + offsets, mask=inside).to(tl.float32), ROUND)  # .to(input)
        if HAS_SCALE:  # weight * scale_weight
            w = _rounded(w * tl.load(scale_ptr).to(tl.float32), ROUND)
        if HAS_PATCH:  # weight + patch * (strength * alpha)
            p = tl.load(p_ptr + offsets, mask=inside).to(tl.float32)
            p = _rounded(p * tl.load(strength_ptr).to(tl.float32), ROUND)
            w = _rounded(w + p, ROUND)
        tl.store(out_ptr + offsets, w.to(out_ptr.dtype.element_ty), mask=inside)


# Triton's CPU interpreter, read once (a traced forward reads no environment)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t: torch.Tensor) -> bool:
    """Whether the kernel runs where ``t`` is: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    return triton is not None and (t.is_cuda or (t.device.type == "cpu" and INTERPRETED))


def _launch(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    patch: torch.Tensor | None,
    strength: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    n = out.numel()
    if not n:
        return
    grid = (triton.cdiv(n, BLOCK),)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _weight_kernel[grid](
            weight, out if scale is None else scale, out if patch is None else patch,
            out if strength is None else strength, out, n,
            ROUND=ROUNDING[out.dtype], HAS_SCALE=scale is not None,
            HAS_PATCH=patch is not None, BLOCK=BLOCK,
        )  # fmt: skip


def _compute(
    weight: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor | None,
    patches: list[torch.Tensor],
    strengths: list[torch.Tensor],
) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    first = (patches[0], strengths[0]) if patches else (None, None)
    _launch(weight, scale, *first, out)
    for patch, strength in zip(patches[1:], strengths[1:], strict=True):
        _launch(out, None, patch, strength, out)
    return out


def _fake(weight, dtype, scale, patches, strengths):  # the op's result: shape and type
    return weight.new_empty(weight.shape, dtype=dtype)


OP = "xicon_linear_weights::compute_weight"
# one opaque operation for torch.compile (a traced launch could break the graph at every linear);
# registered once per process, whichever copy of this file loads first
if not hasattr(torch.ops.xicon_linear_weights, "compute_weight"):
    torch.library.custom_op(OP, mutates_args=())(_compute).register_fake(_fake)
_op = torch.ops.xicon_linear_weights.compute_weight


def compute_weight(
    weight: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    patches: list[tuple[torch.Tensor, torch.Tensor]] = (),
) -> torch.Tensor:
    """``reference(weight, dtype, scale, patches)`` by the kernel: ``weight`` (contiguous, a
    ``STORED`` type) in ``dtype`` (a ``ROUNDING`` type), times ``scale`` (one value of ``dtype``)
    if given, plus each ``patch`` (``weight``'s shape, ``dtype``, contiguous) times its
    ``strength`` (one value of ``dtype``) in turn; a new contiguous tensor on ``weight``'s
    device. The caller checks ``runs_on`` and the types."""
    return _op(weight, dtype, scale, [p for p, _ in patches], [s for _, s in patches])


def reference(
    weight: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    patches: list[tuple[torch.Tensor, torch.Tensor]] = (),
) -> torch.Tensor:
    """Upstream's expressions (``CustomLinear.forward`` and ``apply_lora``): ``weight.to(dtype)``,
    ``weight * scale``, ``weight + patch * strength`` for each patch."""
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale
    for patch, strength in patches:
        w = w + patch * strength
    return w
