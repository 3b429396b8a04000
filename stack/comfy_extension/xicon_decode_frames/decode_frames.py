"""The decoded clip reaches the host as one contiguous float32 frame tensor, without a bf16
host copy on the way.

Why: WanVideoWrapper's ``WanVideoDecode.decode`` (``nodes.py`` ~L2117-2177, pinned commit) takes
the VAE's output, the whole clip on the GPU in bf16 laid out (C, T, H, W), and runs
``images.cpu().float()``: a bf16 copy of the clip on the host, then a float32 copy of that, so for
a moment the host holds 1.5 float32 copies of the clip (at 60 s, 416x672: 2.4 GB + 4.8 GB). It
then normalises in place and returns ``images.permute(1, 2, 3, 0)``, a (T, H, W, C) view of the
channel-first tensor, so every reader (``VHS_VideoCombine``'s frame conversion) walks frames whose
channels lie a whole plane apart.

What: while ``WanVideoDecode.decode`` runs, its VAE's ``decode`` (``WanVideoVAE.decode``, which
returns one (C, T, H, W) tensor per batch item) is wrapped, for that call only: each tensor it
returns is copied, a few frames at a time, into a new contiguous float32 (T, H, W, C) host tensor,
and handed back as that tensor's (C, T, H, W) view. The node's ``.cpu()`` and ``.float()`` then
return the same tensor (already on the host, already float32), its in-place normalisation
writes into it, and its final ``permute(1, 2, 3, 0)`` gives back the contiguous frames. The
values are the node's own bit for bit (bf16 -> float32 is exact; the normalisation is the node's
code on the same float32 numbers). The host holds one float32 copy instead of 1.5 at the peak,
and the frames come out contiguous.

Installed once, before ComfyUI runs its first prompt (custom nodes load in no fixed order, so the
class is looked up in ComfyUI's node registry then), and only when ``WanVideoDecode.decode`` still
has the source this was written against (``UPSTREAM_SHA256``); otherwise nothing changes and the
reason is logged. ``XICON_DECODE_FRAMES=off`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger("xicon_decode_frames")

ENV = "XICON_DECODE_FRAMES"
NODE = "WanVideoDecode"
# sha256 of inspect.getsource(WanVideoDecode.decode) at ComfyUI-WanVideoWrapper
# 088128b224242e110d3906c6750e9a3a348a659b's nodes.py.
UPSTREAM_SHA256 = "da438e95e22c5bc705eb8ce108c15a9b60dfeae26ce45d234ed4851ec8dfa76f"
WRAPPED = "_xicon_decode_frames"
CHUNK_BYTES = 64 * 1024 * 1024  # float32 bytes moved per step: the GPU temporary's size


def enabled(env: Mapping[str, str]) -> bool:
    """False when ``ENV`` is ``0``/``off``/``false``/``no``; True otherwise (the default)."""
    return env.get(ENV, "").strip().lower() not in {"0", "off", "false", "no"}


def to_host_frames(video: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """``video`` (C, T, H, W, any device and float dtype) as a (C, T, H, W) view of a new
    contiguous float32 (T, H, W, C) tensor on the host, filled a few frames at a time."""
    c, t, h, w = video.shape
    frames = torch.empty((t, h, w, c), dtype=torch.float32, device="cpu")
    step = max(1, chunk_bytes // max(1, h * w * c * 4))
    for start in range(0, t, step):
        stop = min(t, start + step)
        part = video[:, start:stop].permute(1, 2, 3, 0).to(torch.float32)
        frames[start:stop].copy_(part)
    return frames.permute(3, 0, 1, 2)


def host_decoding(decode: Callable[..., Any]) -> Callable[..., Any]:
    """The VAE's bound ``decode``, returning each (C, T, H, W) video through ``to_host_frames``
    and dropping its own copy of each as soon as it is converted. A video already on the host in
    float32 (an fp32 VAE decoding on the CPU or tiled: its tiles are gathered on the host) is
    passed on as it is: the node's ``.cpu().float()`` copies nothing then either."""

    @functools.wraps(decode)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        videos = decode(*args, **kwargs)
        if not isinstance(videos, list) or not all(
            isinstance(v, torch.Tensor) and v.dim() == 4 for v in videos
        ):
            return videos  # not the shape this was written for: the node gets it as it came
        for i, video in enumerate(videos):
            if video.device.type == "cpu" and video.dtype == torch.float32:
                continue  # already what the node makes of it: a copy would only add one
            videos[i] = to_host_frames(video)
            _, t, h, w = video.shape
            del video
            log.info(
                "xicon_decode_frames: %d frames of %dx%d to the host as one float32 tensor "
                "(%.1f MiB)",
                t,
                w,
                h,
                videos[i].numel() * 4 / 2**20,
            )
        return videos

    return wrapped


def wrap_node_decode(original: Callable[..., Any]) -> Callable[..., Any]:
    """``WanVideoDecode.decode`` that runs ``original`` with the VAE's ``decode`` wrapped by
    ``host_decoding`` for the call's duration (an attribute on that VAE object, removed after)."""

    @functools.wraps(original)
    def decode(self: Any, vae: Any, samples: Any, *args: Any, **kwargs: Any) -> Any:
        inner = getattr(vae, "decode", None)
        if not callable(inner) or "decode" in getattr(vae, "__dict__", {}):
            return original(self, vae, samples, *args, **kwargs)
        vae.decode = host_decoding(inner)
        try:
            return original(self, vae, samples, *args, **kwargs)
        finally:
            del vae.decode

    setattr(decode, WRAPPED, True)
    return decode


def upstream_digest(node_class: type) -> str:
    return hashlib.sha256(inspect.getsource(node_class.decode).encode()).hexdigest()


def patch(registry: Mapping[str, Any]) -> str:
    """Wrap ``registry[NODE].decode``; the line to log."""
    node_class = registry.get(NODE)
    if node_class is None:
        return f"{NODE} not loaded; nothing to do"
    current = getattr(node_class, "decode", None)
    if current is None or getattr(current, WRAPPED, False):
        return f"{NODE}.decode already wrapped or missing; nothing to do"
    try:
        digest = upstream_digest(node_class)
    except (OSError, TypeError):
        return f"{NODE}.decode's source cannot be read; decoding left as it is"
    if digest != UPSTREAM_SHA256:
        return (
            f"{NODE}.decode changed upstream (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); decoding left as it is"
        )
    node_class.decode = wrap_node_decode(current)
    return f"{NODE} hands its frames to the host as one contiguous float32 tensor"


def install(executor_class: type, registry: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Patch ``registry``'s ``WanVideoDecode`` when ``executor_class`` (ComfyUI's
    ``PromptExecutor``) runs its first prompt; the line to log now."""
    if not enabled(env):
        return f"off ({ENV})"
    original = executor_class.execute_async
    if getattr(original, WRAPPED, False):
        return "already installed"
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_decode_frames: %s", patch(registry))
            except Exception:  # never break a prompt: the node then runs as upstream ships it
                log.exception("xicon_decode_frames: decoding left as it is")
        return await original(self, *args, **kwargs)

    setattr(execute_async, WRAPPED, True)
    executor_class.execute_async = execute_async
    return f"{NODE} will be wrapped before the first prompt"
