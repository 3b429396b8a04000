"""The Wan VAE's RMS norm and the SiLU after it in one pass over a channels-last clip: one Triton
kernel on CUDA, PyTorch's two kernels elsewhere.

Why: in the decoder's residual blocks and head (``wanvideo/wan_video_vae.py`` at WanVideoWrapper
088128b) every ``RMS_norm`` is followed by an ``nn.SiLU``. With ``decoder_ops.py`` the norm is one
``F.rms_norm`` and the SiLU another kernel: two passes reading and writing the whole activation,
and on an H100 PyTorch's norm kernel over rows of 96-384 channels runs well below the memory's
rate (``bench/vae_layers.py``).

What: ``norm_silu(x, weight, eps)`` is ``F.silu(F.rms_norm(x over its channels, weight, eps))``
for a channels-last ``(N, C, T, H, W)`` clip, with the same roundings: the norm's result rounded
to ``x``'s type, then the SiLU computed in float32 and rounded again, as the two PyTorch kernels
do. On CUDA, with Triton, for a bf16, fp16 or float32 clip of at most ``MAX_CHANNELS`` channels it
runs as one kernel (``fused``), each program a block of rows held in registers; the float32
arithmetic inside is the same formula, so values match PyTorch's up to the last bit of a float32
intermediate (a differently rounded reciprocal square root or exponential can move a result by
one unit of its type). Anything else runs ``reference``, PyTorch's two kernels, and so does
everything after the kernel once failed (``norm_silu``: the reason logged once).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

try:  # Triton ships with PyTorch's CUDA wheels; without it the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the stack's torch brings it
    triton = None

log = logging.getLogger("xicon_vae_channels_last")

MAX_CHANNELS = 1024  # a row of the clip in one program's registers
ROW_ELEMENTS = 2048  # elements per program: BLOCK_R = ROW_ELEMENTS // BLOCK_C rows
ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROOM_FRAMES = "_xicon_room_frames"  # on a result of ``fused``: free frames before it

if triton is not None:

    @triton.jit
    def _rounded(x, ROUND: tl.constexpr):
        """float32 ``x`` rounded to nearest-even in the clip's type, kept in float32 (by bits
        for bf16: the same on a GPU and in Triton's CPU interpreter, whose cast truncates)."""
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        elif ROUND == 2:
            x = x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def _norm_silu_kernel(
        x_ptr,
        weight_ptr,
        bias_ptr,
        y_ptr,
        rows,
        eps,
        C: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        ROUND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        inside = (r[:, None] < rows) & (c[None, :] < C)
        offsets = r[:, None].to(tl.int64) * C + c[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:  # the convolution's bias, added and rounded as PyTorch's ``add_`` does
            b = tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32)
            x = tl.where(inside, _rounded(x + b[None, :], ROUND), 0.0)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
        w = tl.load(weight_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        y = _rounded(x * rstd[:, None] * w[None, :], ROUND)
        y = _rounded(y / (1.0 + tl.exp(-y)), ROUND)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)


def channels_last_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` (N, C, T, H, W) as its contiguous (N, T, H, W, C) view, or None when it is not
    laid out so."""
    if x.dim() != 5:
        return None
    last = x.permute(0, 2, 3, 4, 1)
    return last if last.is_contiguous() else None


def fusable(x: torch.Tensor) -> bool:
    """Whether ``norm_silu`` runs ``x`` as one kernel."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in ROUNDING
        and x.dim() == 5
        and 0 < x.shape[1] <= MAX_CHANNELS
        and channels_last_rows(x) is not None
    )


def with_room(shape: tuple[int, ...], room: int, like: torch.Tensor) -> torch.Tensor:
    """A new (N, T, H, W, C) tensor of ``shape``, for ``N`` = 1 with ``room`` free frames before
    it in its storage."""
    n, t, h, w, c = shape
    if not room or n != 1:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.empty((1, t + room, h, w, c), dtype=like.dtype, device=like.device)[:, room:]


def fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    row_elements: int = ROW_ELEMENTS,
    bias: torch.Tensor | None = None,
    room: int = 0,
) -> torch.Tensor:
    """The kernel on ``x`` (channels-last (N, C, T, H, W); on any device Triton runs on, the CPU
    under ``TRITON_INTERPRET=1`` included), ``bias`` (one per channel, in ``x``'s type) added to
    ``x`` first; a new channels-last tensor, which for ``N`` = 1 has ``room`` free frames
    before it in its storage, marked on it as ``ROOM_FRAMES`` (``room_before``)."""
    assert triton is not None
    last = channels_last_rows(x)
    if last is None or x.dtype not in ROUNDING:
        raise ValueError("a channels-last bf16, fp16 or float32 (N, C, T, H, W) clip")
    channels = x.shape[1]
    rows = last.numel() // channels if channels else 0
    out = with_room(tuple(last.shape), room, last)
    if rows:
        block_c = triton.next_power_of_2(channels)
        block_r = max(1, row_elements // block_c)
        grid = (triton.cdiv(rows, block_r),)
        weight = weight.reshape(channels).to(device=x.device, dtype=x.dtype).contiguous()
        if bias is not None:
            bias = bias.reshape(channels).to(device=x.device, dtype=x.dtype).contiguous()
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _norm_silu_kernel[grid](
                last, weight, weight if bias is None else bias, out, rows, float(eps),
                C=channels, BLOCK_C=block_c, BLOCK_R=block_r, ROUND=ROUNDING[x.dtype],
                HAS_BIAS=bias is not None,
            )  # fmt: skip
    result = out.permute(0, 4, 1, 2, 3)
    if room and x.shape[0] == 1:
        setattr(result, ROOM_FRAMES, room)
    return result


def room_before(x: torch.Tensor) -> int:
    """Free frames before ``x`` in its storage that ``fused`` left for the next convolution's
    cached frames (0 for any other tensor)."""
    return getattr(x, ROOM_FRAMES, 0)


def biased(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` plus ``bias`` per channel, as a convolution adds its bias after its sum (one
    rounding to ``x``'s type)."""
    if bias is None:
        return x
    return x + bias.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)


def reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch's kernels: ``bias`` added, ``F.rms_norm`` over the channels of the channels-last
    view, then ``F.silu``."""
    x = biased(x, bias)
    channels = x.shape[1]
    last = x.permute(0, 2, 3, 4, 1)
    weight = weight.reshape(channels).to(x.dtype)
    return F.silu(F.rms_norm(last, (channels,), weight, eps)).permute(0, 4, 1, 2, 3)


FAILED: list[str] = []  # the kernel's failure (its compile, its launch), once: then PyTorch's


def norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    bias: torch.Tensor | None = None,
    room: int = 0,
) -> torch.Tensor:
    """``F.silu(F.rms_norm(x + bias, ...))`` over the channels of channels-last ``x``: one kernel
    where ``fusable`` (its result with ``room``, see ``fused``), PyTorch's kernels otherwise; if
    the kernel fails (Triton cannot compile it for this GPU, say) the reason is logged once and
    PyTorch's run from then on."""
    if not FAILED and fusable(x):
        try:
            return fused(x, weight, eps, bias=bias, room=room)
        except Exception as error:  # a kernel that cannot run must not fail the job
            FAILED.append(repr(error))
            log.warning(
                "xicon_vae_channels_last: the fused RMS norm and SiLU failed (%r); PyTorch's "
                "kernels from now on",
                error,
            )
    return reference(x, weight, eps, bias)
