"""GPU-dependent graph settings, chosen once at start from the GPU ComfyUI runs on.

Contract:
- ``GpuInfo.from_system_stats(body) -> GpuInfo | None``: the first device of ComfyUI's
  ``GET /system_stats`` answer (``devices[0]``: ``name`` such as
  ``"cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync"``, ``type``, ``vram_total`` in bytes);
  ``None`` when the answer holds no device.
- ``choose(gpu, settings) -> GpuProfile``: the settings the worker patches into every job's graph,
  each with the reason it was picked. A setting other than ``auto`` wins over the GPU.
- ``GpuProfile.summary()``: the one log line the worker writes at start.

Choices (measured on an H200 through the worker, see the benchmark docs):
- ``base_precision`` (WanVideoModelLoader, node 22): ``fp16_fast`` (fp16 with fp16 accumulation)
  on GeForce cards, whose tensor cores run fp16 with fp32 accumulation at half rate and with fp16
  accumulation at full rate (NVIDIA's Ada and Blackwell GeForce whitepapers: 209.5 vs 419 dense
  TFLOP/s on the RTX 5090); ``bf16`` elsewhere: data-centre and workstation cards accumulate in
  fp32 at full rate, and on the H200 fp16_fast was slower than bf16, not faster. ComfyUI on the
  CPU keeps ``bf16``.
- ``torch_compile`` (``TORCH_COMPILE``, off unless set): the transformer's blocks compiled by
  ``torch.compile`` (a ``WanVideoTorchCompileSettings`` node wired into node 22, see
  ``workflow``), on CUDA devices only (inductor's GPU kernels are Triton's); elsewhere it stays
  off and the reason says so. Off by default because the first job of every ComfyUI process
  pays the compile (H200: 19-21 s, 7-9 s with inductor's cache from an earlier start) while
  each window-step gains 6.9 %: it pays back within the first job of a long dance, after about
  ten 81-frame jobs.
- ``resident_transformer`` (``RESIDENT_TRANSFORMER``, ``auto`` by default): the sampler keeps the
  transformer on the GPU after a job (node 348 ``force_offload`` off), so the next job does not
  copy its 15.9 GB onto the GPU again, and CLIP vision with it (node 327, 1.2 GB: its encode
  0.9-1.1 -> 0.1 s on an H100). ``auto`` keeps it on CUDA GPUs of at least
  ``RESIDENT_MIN_VRAM_GIB`` (an RTX 5090 reports 31.8 GiB). Measured on an H200 held to
  31.5 GiB: the warm default job 26.6 -> 22.6 s, whole-GPU peak 21.1-21.5 GiB, a prompt never
  encoded before (the 11-GB text encoder beside it) 27.8 GiB. The image's ComfyUI extension
  ``xicon_resident_weights`` lets the sampler use the weights already there (WanVideoWrapper's
  sampler at the pinned commit loads them again on every run and, with them still on the GPU,
  held two copies at once: out of memory at 33,225 MiB on a card held to 31.5 GiB). Elsewhere
  (smaller cards, the CPU) it offloads.
  A job larger than the largest measured with it (``RESIDENT_MAX_PIXEL_FRAMES``: 60 s at 24 fps
  and 416x672, whole-GPU peak 27.4 GiB at the decode, whose memory grows with frames x pixels)
  lets it go after sampling, as the shipped graph does; the next job loads it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .settings import Settings

log = logging.getLogger(__name__)

GIB = 1024**3
RESIDENT_MIN_VRAM_GIB = 30.0
# The largest job measured with the transformer kept on the GPU: 60 s at 24 fps (1441 frames) at
# 416x672, whole-GPU peak 27.4 GiB, at the decode (H200, ComfyUI held to 31.5 GiB). The decode's
# memory grows with frames x pixels; a larger job lets the transformer go before it.
RESIDENT_MAX_PIXEL_FRAMES = 1441 * 416 * 672


@dataclass(frozen=True)
class GpuInfo:
    name: str
    type: str
    vram_total: int

    @classmethod
    def from_system_stats(cls, body: Any) -> GpuInfo | None:
        devices = body.get("devices") if isinstance(body, dict) else None
        if not isinstance(devices, list) or not devices or not isinstance(devices[0], dict):
            return None
        first = devices[0]
        total = first.get("vram_total")
        return cls(
            name=str(first.get("name") or "unknown"),
            type=str(first.get("type") or "unknown"),
            vram_total=int(total) if isinstance(total, int | float) else 0,
        )

    @property
    def geforce(self) -> bool:
        return self.type == "cuda" and "geforce" in self.name.lower()

    def describe(self) -> str:
        name = self.name.split(" : ")[0]
        return f"{name} ({self.vram_total / GIB:.1f} GiB)" if self.vram_total else name


@dataclass(frozen=True)
class GpuProfile:
    base_precision: str
    reasons: tuple[str, ...]
    gpu: GpuInfo | None = None
    torch_compile: bool = False
    resident_transformer: bool = False

    def keeps_transformer(self, frames: int, width: int, height: int) -> bool:
        """Whether a job of ``frames`` at ``width`` x ``height`` leaves the transformer on the
        GPU: when the profile keeps it and the job is no larger than the largest measured so."""
        return self.resident_transformer and frames * width * height <= RESIDENT_MAX_PIXEL_FRAMES

    def summary(self) -> str:
        where = self.gpu.describe() if self.gpu else "an unknown device"
        return f"GPU profile for {where}: " + "; ".join(self.reasons)


def choose(gpu: GpuInfo | None, settings: Settings) -> GpuProfile:
    """The graph settings for ``gpu``; explicit settings win (see module doc)."""
    if settings.base_precision != "auto":
        precision = settings.base_precision
        why = f"base_precision {precision} (BASE_PRECISION)"
    elif gpu is not None and gpu.geforce:
        precision = "fp16_fast"
        why = "base_precision fp16_fast (auto: GeForce tensor cores accumulate fp16 at 2x)"
    else:
        precision = "bf16"
        why = "base_precision bf16 (auto: fp16 accumulation pays only on GeForce cards)"
    compile_on = settings.torch_compile and gpu is not None and gpu.type == "cuda"
    if compile_on:
        compile_why = "torch.compile on (TORCH_COMPILE)"
    elif settings.torch_compile:
        compile_why = "torch.compile off (TORCH_COMPILE is set, but ComfyUI runs on no CUDA GPU)"
    else:
        compile_why = "torch.compile off (TORCH_COMPILE)"
    resident, resident_why = _resident(gpu, settings.resident_transformer)
    return GpuProfile(
        base_precision=precision,
        reasons=(why, compile_why, resident_why),
        gpu=gpu,
        torch_compile=compile_on,
        resident_transformer=resident,
    )


def _resident(gpu: GpuInfo | None, setting: str) -> tuple[bool, str]:
    if setting != "auto":
        on = setting == "on"
        where = "kept on" if on else "offloaded from"
        return on, f"transformer {where} the GPU between jobs (RESIDENT_TRANSFORMER)"
    if gpu is None or gpu.type != "cuda":
        return False, "transformer offloaded after each job (auto: ComfyUI runs on no CUDA GPU)"
    gib = gpu.vram_total / GIB
    if gib < RESIDENT_MIN_VRAM_GIB:
        return False, (
            f"transformer offloaded after each job (auto: {gib:.1f} GiB of VRAM, under "
            f"{RESIDENT_MIN_VRAM_GIB:.0f} GiB)"
        )
    return True, (
        f"transformer kept on the GPU between jobs (auto: {gib:.1f} GiB of VRAM, at least "
        f"{RESIDENT_MIN_VRAM_GIB:.0f} GiB)"
    )
