"""The SCAIL pose embeds' frames (node 324) scaled to [-1, 1] and converted to the VAE's type on
ComfyUI's device, a chunk of frames at a time, with upstream's values and layout.

Why: ``WanVideoAddSCAILPoseEmbeds.add`` (WanVideoWrapper's ``SCAIL/nodes.py``, pinned commit)
starts with ``(pose_images[..., :3].permute(3, 0, 1, 2) * 2 - 1).to(device, vae.dtype)``: the
rendered pose clip (float32 on the host, 1.2 GB for 60 s at 208x336) is multiplied and shifted
on the CPU, two new float32 copies, and PyTorch's copy to another device and type converts it to
bf16 on the CPU first (``copy_`` between devices casts on the source's side), a third copy: on
a 2-core machine the step added 2,308 MiB to the process's peak for a 60-s clip and took 0.76 s
(``bench/pose_embeds.py``, ``bench/results/cpu_pose_embeds``); on a GPU machine these host passes
are part of node 324's 3.9-6.5 s at 60 s, the VAE's encode the rest.

What: ``add`` is replaced by the same steps in the same order, with that first step done by
``frames_on_device``: each chunk of ``CHUNK_BYTES`` of frames is copied to the device as it is
and scaled and converted there, into one tensor of the VAE's type laid out as upstream's (the
channels last in memory, viewed as ``(3, N, H, W)``). The values are upstream's bit for bit:
``x * 2`` is exact, and the subtraction and the rounding to bf16 (to nearest, ties to even) are
IEEE's on either side. On the CPU the chunks take the same time and add 675 MiB instead of
2,308 MiB (the result and one chunk, same bench); on a GPU nothing of the clip is added on the
host. Only for frames that are a 4-D tensor of at least three channels on the host; otherwise
upstream's ``add`` runs. The node's other steps
(the VAE moved to the device and back, the encode, the mask, the log line, the embeds) are
upstream's lines, with the globals of upstream's module.

Installed before ComfyUI's first prompt, only when ``add`` still has the source this was written
against (``UPSTREAM_SHA256``); otherwise nothing changes and the reason is logged.
``XICON_POSE_EMBEDS=off`` leaves upstream's ``add``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger("xicon_pose_embeds")

ENV = "XICON_POSE_EMBEDS"
OFF = {"0", "off", "false", "no"}
NODE = "WanVideoAddSCAILPoseEmbeds"
# sha256 of inspect.getsource(WanVideoAddSCAILPoseEmbeds.add) at ComfyUI-WanVideoWrapper
# 088128b224242e110d3906c6750e9a3a348a659b's SCAIL/nodes.py.
UPSTREAM_SHA256 = "cd667291a54508511faadb305ad4f904525f9fc7c8c94cbf686322a39468b1c6"
REPLACED = "_xicon_pose_embeds"
CHUNK_BYTES = 64 << 20  # frames copied and converted at a time


def frames_on_device(
    frames: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """``(frames[..., :3].permute(3, 0, 1, 2) * 2 - 1).to(device, dtype)`` for (N, H, W, C)
    ``frames``, the arithmetic done on ``device`` one chunk of frames at a time: the same values
    and strides; beside the result, only one chunk's copy and its two intermediate products
    (``* 2``, ``- 1``) exist at a time."""
    n, h, w = frames.shape[:3]
    out = torch.empty((n, h, w, 3), dtype=dtype, device=device)
    per = max(1, chunk_bytes // max(1, h * w * 3 * frames.element_size()))
    for start in range(0, n, per):
        part = frames[start : start + per, ..., :3].to(device)
        out[start : start + per] = part * 2 - 1
    return out.permute(3, 0, 1, 2)


def applies(pose_images: Any) -> bool:
    """Whether ``frames_on_device`` takes the frames: a 4-D tensor of at least three channels on
    the host."""
    return (
        isinstance(pose_images, torch.Tensor)
        and pose_images.dim() == 4
        and pose_images.shape[-1] >= 3
        and pose_images.device.type == "cpu"
    )


def replace(original: Callable[..., Any]) -> Callable[..., Any]:
    """``add`` with its first step done by ``frames_on_device`` (see the module's docstring)."""
    g = original.__globals__  # SCAIL/nodes.py: device, offload_device, log

    @functools.wraps(original)
    def add(
        self: Any,
        embeds: Any,
        vae: Any,
        pose_images: Any,
        strength: Any,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
    ) -> Any:
        if not applies(pose_images):
            return original(self, embeds, vae, pose_images, strength, start_percent, end_percent)
        device = g["device"]
        updated = dict(embeds)

        vae.to(device)
        pose_images_in = frames_on_device(pose_images, torch.device(device), vae.dtype)
        pose_latent = vae.encode([pose_images_in], device, tiled=False)[0]
        pose_mask = torch.ones_like(pose_latent[:4])
        pose_latent = torch.cat([pose_latent, pose_mask], dim=0)
        g["log"].info(f"SCAIL pose_latent shape: {pose_latent.shape}")

        vae.to(g["offload_device"])

        updated.setdefault("scail_embeds", {})
        updated["scail_embeds"]["pose_latent"] = pose_latent
        updated["scail_embeds"]["pose_strength"] = strength
        updated["scail_embeds"]["pose_start_percent"] = start_percent
        updated["scail_embeds"]["pose_end_percent"] = end_percent

        return (updated,)

    setattr(add, REPLACED, True)
    return add


def upstream_digest(node_class: type) -> str:
    return hashlib.sha256(inspect.getsource(node_class.add).encode()).hexdigest()


def patch(registry: Mapping[str, Any]) -> str:
    """Replace ``registry[NODE].add``; the line to log."""
    node_class = registry.get(NODE)
    if node_class is None:
        return f"{NODE} not loaded; nothing to do"
    current = getattr(node_class, "add", None)
    if current is None or getattr(current, REPLACED, False):
        return f"{NODE}.add already replaced or missing; nothing to do"
    try:
        digest = upstream_digest(node_class)
    except (OSError, TypeError):
        return f"{NODE}.add's source cannot be read; the node left as upstream's"
    if digest != UPSTREAM_SHA256:
        return (
            f"{NODE}.add changed upstream (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); the node left as upstream's"
        )
    node_class.add = replace(current)
    return f"{NODE} scales and converts the pose frames on ComfyUI's device, a chunk at a time"


def enabled(env: Mapping[str, str]) -> bool:
    """Unless ``ENV`` is ``0``/``off``/``false``/``no``."""
    return env.get(ENV, "").strip().lower() not in OFF


def install(executor_class: type, registry: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Patch ``registry``'s ``WanVideoAddSCAILPoseEmbeds`` when ``executor_class`` (ComfyUI's
    ``PromptExecutor``) runs its first prompt; the line to log now."""
    if not enabled(env):
        return f"off ({ENV})"
    original = executor_class.execute_async
    if getattr(original, REPLACED, False):
        return "already installed"
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_pose_embeds: %s", patch(registry))
            except Exception:  # never break a prompt: the node then runs as upstream's
                log.exception("xicon_pose_embeds: the node left as upstream's")
        return await original(self, *args, **kwargs)

    setattr(execute_async, REPLACED, True)
    executor_class.execute_async = execute_async
    return f"{NODE} will be patched before the first prompt"
