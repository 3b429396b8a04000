"""Checks of ``xicon_vae_channels_last``'s CUDA kernels on the CPU, run by the stack's Python with
``TRITON_INTERPRET=1`` (Triton's CPU interpreter runs the kernel's own code): the fused norm and
SiLU against PyTorch's two kernels, the stacked convolution against ``F.conv3d``, and the
pinned VAE decoding and encoding through both with their CUDA-only gates opened. Prints one JSON
object of figures, which ``test_vae_channels_last.py`` asserts. The test runs it after
``tests/plugins/realstack.py``'s ``PINNED_VAE_LOADER`` (``load``, ``Pinned``, ``torch``), with
``comfy_dir``, ``ext_dir`` and ``vae_file`` set and ``TRITON_INTERPRET=1`` in the environment.
"""
# ruff: noqa: F821 (the names above come from the fragment run before this file)

import json
import os
import sys

import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

kern = load("xicon_vae_norm_silu", f"{ext_dir}/norm_silu.py")
ops = load("xicon_vae_decoder_ops", f"{ext_dir}/decoder_ops.py")
ext = load("xicon_vae_channels_last_impl", f"{ext_dir}/vae_channels_last.py")
out: dict = {"triton": kern.triton is not None}


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between ``a`` and ``b`` in units of their type's last place."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    ia, ib = a.view(bits[a.dtype]).long(), b.view(bits[b.dtype]).long()
    return int((ia - ib).abs().max()) if a.numel() else 0


# 1. the fused norm and SiLU against F.rms_norm then F.silu: every type, odd sizes, big values
gen = torch.Generator().manual_seed(3)
norm = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for c, t, h, w in ((96, 2, 5, 7), (24, 1, 3, 3), (7, 3, 2, 5), (200, 1, 1, 9)):
        x = (torch.randn(1, c, t, h, w, generator=gen) * 3).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        weight = torch.rand(c, generator=gen) + 0.5
        got, want = kern.fused(x, weight, 1e-24), kern.reference(x, weight, 1e-24)
        norm[f"{str(dtype)[6:]}/{c}x{t}x{h}x{w}"] = {
            "ulps": ulps(got, want),
            "differing": float((got != want).float().mean()),
            "shape_ok": got.shape == x.shape and got.dtype == x.dtype,
            "channels_last": got.is_contiguous(memory_format=torch.channels_last_3d),
        }
out["norm"] = norm

# the convolution's bias added first (as PyTorch's add_ after the sum), and room left before the
# result for the next convolution's cached frames
biased = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for c, t, h, w in ((96, 2, 5, 7), (7, 3, 2, 5)):
        x = (torch.randn(1, c, t, h, w, generator=gen) * 3).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        weight = torch.rand(c, generator=gen) + 0.5
        bias = (torch.randn(c, generator=gen) * 2).to(dtype)
        got = kern.fused(x, weight, 1e-24, bias=bias, room=2)
        want = kern.reference(x, weight, 1e-24, bias)
        separate = kern.reference(
            x + bias.reshape(1, c, 1, 1, 1), weight, 1e-24
        )  # PyTorch's own add
        biased[f"{str(dtype)[6:]}/{c}x{t}x{h}x{w}"] = {
            "ulps": ulps(got, want),
            "reference_is_add": bool(torch.equal(want, separate)),
            "room": kern.room_before(got),
            "offset_frames": got.storage_offset() // got.stride(2),
            "storage_frames": got.untyped_storage().nbytes()
            // (got.stride(2) * got.element_size()),
            "channels_last": got.is_contiguous(memory_format=torch.channels_last_3d),
        }
out["biased"] = biased
two = torch.randn(2, 8, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d)
out["room_batch2"] = kern.room_before(kern.fused(two, torch.ones(8), 1e-24, room=2))

# the room filled by the convolution: the cached frames and zeros where upstream concatenates and
# pads, the same convolution; the room used once
room = {}
for cached in (None, 1, 2):
    x = torch.randn(1, 6, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    cache = None if cached is None else torch.randn(1, 6, cached, 4, 5)
    with_room = kern.fused(x, torch.ones(6), 1e-24, room=2)
    plain = with_room.clone()
    wide = ops.widened(with_room, 2, cache)
    front = plain if cache is None else torch.cat([cache, plain], 2)
    front = F.pad(front, (0, 0, 0, 0, 2 - (0 if cache is None else cached), 0))
    room[str(cached)] = {
        "same_frames": bool(torch.equal(wide, front)),
        "no_copy": wide.untyped_storage().data_ptr() == with_room.untyped_storage().data_ptr(),
        "mark_left": kern.room_before(with_room),
    }
out["room"] = room

# a time upsample's frames interleaved as upstream's reshape and stack do, channels-last or not
inter = {}
for layout in ("channels_last", "default"):
    b, c, t, h, w = 1, 6, 3, 4, 5
    y = torch.randn(b, 2 * c, t, h, w, generator=gen)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last_3d)
    halves = y.reshape(b, 2, c, t, h, w)
    want = torch.stack((halves[:, 0], halves[:, 1]), 3).reshape(b, c, t * 2, h, w)
    got = ops.interleaved(y)
    inter[layout] = {
        "equal": bool(torch.equal(got, want)),
        "channels_last": got.is_contiguous(memory_format=torch.channels_last_3d),
    }
out["interleaved"] = inter
plain = torch.randn(1, 8, 2, 3, 3)  # a default-layout clip is refused by the kernel
try:
    kern.fused(plain, torch.ones(8), 1e-24)
    out["refused"] = None
except ValueError as error:
    out["refused"] = str(error)
out["fusable_cpu"] = kern.fusable(plain.contiguous(memory_format=torch.channels_last_3d))

# a kernel that fails (its compile, its launch): PyTorch's values, the reason kept, never again
x = torch.randn(1, 8, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d)
tries = []


def failing(*args: object, **kwargs: object) -> torch.Tensor:
    tries.append(1)
    raise RuntimeError("no kernel image for this GPU")


saved = kern.fused, kern.fusable
kern.fused, kern.fusable = failing, lambda x: True
first, second = kern.norm_silu(x, torch.ones(8), 1e-24), kern.norm_silu(x, torch.ones(8), 1e-24)
kern.fused, kern.fusable = saved
out["failed"] = {
    "tries": len(tries),
    "reason": list(kern.FAILED),
    "values": bool(torch.equal(first, kern.reference(x, torch.ones(8), 1e-24)))
    and bool(torch.equal(second, first)),
}
kern.FAILED.clear()

# 2. the stacked convolution against F.conv3d (float32: one accumulation, another order)
conv = {}
for n, c_in, c_out, t, h, w, pad in (
    (2, 96, 96, 3, 6, 5, 1),
    (2, 8, 5, 6, 4, 7, 1),
    (2, 4, 4, 4, 5, 5, 0),
    (1, 96, 96, 6, 6, 5, 1),  # one clip, as the VAE's: 4-D pieces
    (1, 8, 5, 3, 4, 7, 0),
):
    x = torch.randn(n, c_in, t, h, w, generator=gen).contiguous(
        memory_format=torch.channels_last_3d
    )
    weight = torch.randn(c_out, c_in, 3, 3, 3, generator=gen) / (27 * c_in) ** 0.5
    bias = torch.randn(c_out, generator=gen)
    got = ops.stacked_conv(x, weight, bias, (pad, pad))
    want = F.conv3d(x, weight, bias, padding=(0, pad, pad))
    conv[f"{n}x{c_in}-{c_out}x{t}x{h}x{w}p{pad}"] = {
        "max_abs_diff": float((got - want).abs().max()),
        "shape_ok": got.shape == want.shape,
        "channels_last": got.is_contiguous(memory_format=torch.channels_last_3d),
    }
out["conv"] = conv

# 3. the pinned VAE through the loader's wrapper, with and without the kernels, their CUDA
# gates opened so the CPU runs the kernel's code (the interpreter) and the stacked convolutions
ops.FUSE_MIN_ELEMENTS = 0
sys.modules["xicon_vae_decoder_ops"] = ops
sys.modules["xicon_vae_norm_silu"] = kern
calls = {"fused": 0, "stacked": 0, "deferred": 0, "widened": 0, "interleaved": 0}
real_fusable, real_stackable, real_fused = kern.fusable, ops.stackable, kern.fused
real_deferrable, real_widened = ops.deferrable, ops.widened
real_interleavable = ops.interleavable


def fusable(x: torch.Tensor) -> bool:  # any layout: the CPU's convolutions return their own
    calls["fused"] += 1
    return x.dim() == 5 and x.dtype in kern.ROUNDING


def fused(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return real_fused(x.contiguous(memory_format=torch.channels_last_3d), *args, **kwargs)


def stackable(conv: object, x: torch.Tensor) -> bool:
    calls["stacked"] += 1
    return x.dim() == 5 and x.shape[2] >= 3


def deferrable(conv: object, x: torch.Tensor) -> bool:
    calls["deferred"] += 1
    return True


def widened(*args: object) -> torch.Tensor:
    calls["widened"] += 1
    return real_widened(*args)


def interleavable(y: torch.Tensor) -> bool:  # any layout: interleaved's reshape copies then
    calls["interleaved"] += 1
    return y.dim() == 5


kern.fusable, ops.stackable, kern.fused = fusable, stackable, fused
ops.deferrable, ops.widened, ops.interleavable = deferrable, widened, interleavable
parts = ext.DECODER + ext.ENCODER
(base,) = ext.wrap_loader(Pinned.loadmodel, parts, ops=True)(Pinned(), vae_file, "fp32")
(fast,) = ext.wrap_loader(Pinned.loadmodel, parts, ops=True, kernels=True)(
    Pinned(),
    vae_file,
    "fp32",
)
out["identities"] = sum(isinstance(m, torch.nn.Identity) for m in fast.model.modules())
out["silus_left"] = sum(isinstance(m, torch.nn.SiLU) for m in fast.model.modules())
out["silus_before"] = sum(isinstance(m, torch.nn.SiLU) for m in base.model.modules())
out["streamline_again"] = ext.streamline(fast, parts, kernels=True)
(fresh,) = Pinned().loadmodel(vae_file, "fp32")
out["streamline_first"] = ext.streamline(fresh, parts, kernels=True)
latent = torch.randn(16, 2, 6, 8, generator=gen)
pixels = torch.rand(3, 5, 24, 32, generator=gen) * 2 - 1
with torch.no_grad():
    want = base.decode([latent], device="cpu", tiled=False, pbar=False)[0]
    got = fast.decode([latent], device="cpu", tiled=False, pbar=False)[0]
    want_z = base.encode([pixels], device="cpu", tiled=False, pbar=False)[0]
    got_z = fast.encode([pixels], device="cpu", tiled=False, pbar=False)[0]
out["decode"] = {
    "shape": list(got.shape),
    "max_abs_diff": float((got - want).abs().max()),
    "finite": bool(torch.isfinite(got).all()),
}
out["encode"] = {
    "shape": list(got_z.shape),
    "max_abs_diff": float((got_z - want_z).abs().max()),
    "finite": bool(torch.isfinite(got_z).all()),
}
out["calls"] = calls
kern.fusable, ops.stackable, kern.fused = real_fusable, real_stackable, real_fused
ops.deferrable, ops.widened = real_deferrable, real_widened
ops.interleavable = real_interleavable
out["marks"] = {
    "room": sum(getattr(m, ops.ROOM, 0) for m in fast.model.modules()),
    "room_norms": sum(bool(getattr(m, ops.ROOM, 0)) for m in fast.model.modules()),
    "defer": sum(bool(getattr(m, ops.DEFER, False)) for m in fast.model.modules()),
}
print(json.dumps(out))
