"""Three of the Wan VAE's memory-bound steps done in fewer passes over a channels-last clip, with
the same arithmetic.

Why: the Wan 2.1 VAE decode (node 28) runs, per latent frame and layer, steps that only move
memory beside its 3-D convolutions (``wanvideo/wan_video_vae.py`` at WanVideoWrapper
088128b): ``CausalConv3d.forward`` concatenates the cached frames and then copies the clip again
into a zero-padded tensor (``F.pad``) for every convolution; ``RMS_norm.forward`` is
``F.normalize`` (a norm, a clamp, a division) times a scale times ``gamma`` plus a zero bias, a
pass over the activations each; the decoder's ``Upsample`` turns bf16 into float32 and back
around a nearest-neighbour resize ("Fix bfloat16 support", a limit of old PyTorch). At 60 s the
decode is the largest stage outside the sampler (24.6 s of 72.9 s on an H100,
``bench/results/gpu_h100_sessions_pages``).

What: per module instance of the converted parts (``vae_channels_last.convert``'s), once per load:
- ``CausalConv3d``: the spatial zero padding given to the convolution itself (its ``padding``
  ``(0, ph, pw)``), so only the time padding, if any, copies; the cached frames are concatenated
  as upstream does. Zero padding inside the convolution is the same sum.
- ``RMS_norm`` (channel-first, no bias): on a channels-last input, ``F.rms_norm`` over the
  channels of the channels-last view, weight ``gamma`` (times ``scale / sqrt(C)``, which is 1
  here): ``x / ||x|| * sqrt(C)`` is ``x / rms(x)``, in one kernel, float32 inside; upstream
  rounds to bf16 after each of its steps, so values differ in their last bits. Any other input
  goes to upstream's ``forward``.
- ``Upsample`` (nearest or nearest-exact): a bf16 or fp16 input resized in its own type; nearest
  copies values, so the result is upstream's bit for bit. Other modes and types: upstream's.

``install``ed only when the three upstream ``forward``s still have the source this was written
against (``UPSTREAM_SHA256``); otherwise nothing changes and the reason is given.
"""

from __future__ import annotations

import hashlib
import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F

# sha256 of the sources of CausalConv3d.forward, RMS_norm.forward and Upsample.forward, joined,
# at ComfyUI-WanVideoWrapper 088128b224242e110d3906c6750e9a3a348a659b's wanvideo/wan_video_vae.py.
UPSTREAM_SHA256 = "1576c590d96b824494d65755165c95c80152be9205f974bab4baab11f928581f"
CLASSES = ("CausalConv3d", "RMS_norm", "Upsample")
DONE = "_xicon_decoder_ops"
EPS = 1e-24  # F.normalize clamps the norm at 1e-12: the same floor on the mean square


def upstream_classes(module: torch.nn.Module) -> dict[str, type] | None:
    """The three classes, from the module that defines ``module``'s own layers (None when
    ``module`` holds none of them)."""
    for m in module.modules():
        if type(m).__name__ in CLASSES:
            source = inspect.getmodule(type(m))
            found = {name: getattr(source, name, None) for name in CLASSES}
            return found if all(isinstance(c, type) for c in found.values()) else None
    return None


def upstream_digest(classes: dict[str, type]) -> str:
    parts = [inspect.getsource(classes[name].forward) for name in CLASSES]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def conv_forward(conv_class: type) -> Any:
    """``CausalConv3d.forward`` with the spatial padding inside the convolution."""
    parent = conv_class.__mro__[1]  # the convolution class CausalConv3d derives from

    def forward(self: Any, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        front = self._padding[4]
        if cache_x is not None and front > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            front -= cache_x.shape[2]
        if front != 0:
            x = F.pad(x, (0, 0, 0, 0, front, 0))
        return parent.forward(self, x)

    return forward


def norm_forward(norm_class: type) -> Any:
    """``RMS_norm.forward`` as one ``F.rms_norm`` on a channels-last input."""

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        plain = self.channel_first and not torch.is_tensor(self.bias) and self.bias == 0
        if x.dim() == 5 and plain:
            last = x.permute(0, 2, 3, 4, 1)
            if last.is_contiguous():
                channels = x.shape[1]
                # rms_norm's x / rms(x) is x / ||x|| * sqrt(C): upstream's scale is that root
                weight = self.gamma.reshape(channels) * (self.scale / channels**0.5)
                weight = weight.to(x.dtype)
                return F.rms_norm(last, (channels,), weight, EPS).permute(0, 4, 1, 2, 3)
        return norm_class.forward(self, x)

    return forward


def upsample_forward(upsample_class: type) -> Any:
    """The decoder's ``Upsample.forward`` without the float32 round trip for nearest modes."""

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("nearest", "nearest-exact") and x.dtype in (torch.bfloat16, torch.float16):
            return torch.nn.Upsample.forward(self, x)
        return upsample_class.forward(self, x)

    return forward


def streamline(part: torch.nn.Module, classes: dict[str, type]) -> dict[str, int]:
    """Each layer of ``part`` of the three classes given its new ``forward``, in place; how many
    of each (layers already done are not counted again)."""
    makers = {
        "CausalConv3d": conv_forward(classes["CausalConv3d"]),
        "RMS_norm": norm_forward(classes["RMS_norm"]),
        "Upsample": upsample_forward(classes["Upsample"]),
    }
    counts = dict.fromkeys(CLASSES, 0)
    for m in part.modules():
        name = next((n for n in CLASSES if type(m) is classes[n]), None)
        if name is None or getattr(m, DONE, False):
            continue
        if name == "CausalConv3d":
            pw, ph = m._padding[0], m._padding[2]
            if m.padding_mode != "zeros" or tuple(m.padding) != (0, 0, 0):
                continue
            m.padding = (0, ph, pw)
        m.forward = types.MethodType(makers[name], m)
        setattr(m, DONE, True)
        counts[name] += 1
    return counts
