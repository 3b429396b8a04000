"""Write synthetic stand-ins for every model file of ``model_manifest.json``.

Contract: ``make_models(out, size)`` writes ``<out>/<folder>/<filename>`` for each manifest entry
(the manifest's ComfyUI folder key and file name) holding random small-magnitude weights in the
exact layout the real loader of the SCAIL graph accepts, so the shipped graph runs end to end on
real ComfyUI without the real weights (about 30 GB). The pixels it produces are noise; the point is
that every node executes and can be timed.

Two size classes:

* ``tiny`` (CPU tier, a few seconds to write, ~1.3 GB in all): a Wan 2.1 i2v + SCAIL diffusion model
  of width 96 (the loader then picks 12 heads / 30 layers), bf16, no fp8; a rank-4 LoRA; the pruned
  "lightVAE" (decoder width 96) under the Wan 2.1 VAE name; the full CLIP ViT-H (comfy picks the
  architecture by key presence, so no smaller file selects it); a scripted NLF returning a rest pose
  4 m in front of the camera; constant-output YOLO and one-conv ViTPose ONNX graphs. The umt5-xxl
  file is only a placeholder: the loader has a fixed 5.7 B-parameter architecture, so the CPU tier
  seeds WanVideoWrapper's text-embedding disk cache instead (``seed_text_cache``) and runs the graph
  with ``use_disk_cache`` true, which never loads the T5 file. Loading the placeholder fails with
  the loader's own "expects the 'umt5-xxl' model" error.
* ``full`` (GPU machine, ``--device cuda``): the real shapes: SCAIL-14B in the fp8 "scaled" layout
  of the real ``_fp8_e4m3fn_scaled`` file (block linears fp8_e4m3fn, each with a float32
  ``<layer>.scale_weight``, plus the ``scaled_fp8`` marker; everything else bf16), rank-64 LoRA,
  the full Wan 2.1 VAE, the full umt5-xxl encoder in bf16, ViTPose-L's layers at their true
  shapes as ONNX, written as easy_ViTPose exports it (ViT-L/16 at 256x192 and its deconvolution
  head, 1.2 GB: its per-frame compute and its session start-up are the real model's), a YOLO
  stand-in of YOLOv10m's size and compute (a stack of 3x3 convolutions, 15.6 M parameters,
  60 GFLOPs, whose result is added to the same fixed person box times zero), the same CLIP/NLF
  files.

Files are written by a streaming safetensors writer: the header is computed from the shape table
first, then one tensor at a time is generated (on ``--device``), cast, copied to the host and
appended, so peak memory is one tensor however large the file. ``--dry-run`` prints the table and
total bytes without allocating anything. Every tensor is seeded from ``--seed`` and its own name,
so ``--only`` reproduces the same bytes as a full run (on the same device type: CPU and CUDA
generators differ). Measured on two CPU cores: ``tiny`` about 30 s (1.3 GB, mostly CLIP), ``full``
about 6 min (28.2 GiB of tensors, peak RSS 2.9 GiB: the T5 token embedding).

``check_against_upstream(comfy_dir, size)`` compares the key set and shapes with the real model
classes built on the meta device (WanVideoWrapper's ``WanModel``, ``WanVideoVAE``, umt5-xxl, comfy's
CLIP vision model); the real-stack test tier calls it with the ComfyUI source tree.

Needs torch and safetensors (and onnx for the detection models); imports are lazy so the module
imports without them.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import struct
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("make_synthetic_models")

SIZES = ("tiny", "full")
DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "model_manifest.json"

# safetensors dtype tag, bytes per element
_DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file: its name, shape, dtype name, and how to fill it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    init: str = "normal"  # normal | ones | zeros | const
    std: float = 0.02
    value: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype][1]


# --------------------------------------------------------------------------------------------
# Diffusion model (WanVideoModelLoader): Wan 2.1 i2v backbone + SCAIL pose patch embedding
# --------------------------------------------------------------------------------------------

WAN_SIZES = {
    # dim, ffn_dim, layers (the loader derives heads/layers from dim: 5120 -> 40/40, else 12/30)
    "tiny": {"dim": 96, "ffn_dim": 128, "layers": 30, "rank": 4},
    "full": {"dim": 5120, "ffn_dim": 13824, "layers": 40, "rank": 64},
}
WAN_IN_DIM = 20  # 16 latent + 4 mask channels (SCAIL); patch_embedding_pose takes the same
WAN_OUT_DIM = 16
WAN_TEXT_DIM = 4096  # umt5-xxl width, fixed in WanModel
WAN_CLIP_DIM = 1280  # CLIP ViT-H width, fixed in MLPProj
WAN_FREQ_DIM = 256
WAN_PATCH = (1, 2, 2)
# Linear layers of a block that the real fp8-scaled file stores as fp8 with a scale_weight, and
# that the LoRA patches.
BLOCK_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "cross_attn.k_img",
    "cross_attn.v_img",
    "ffn.0",
    "ffn.2",
)


def _linear(prefix: str, out_f: int, in_f: int, dtype: str, bias: bool = True) -> list[TensorSpec]:
    specs = [TensorSpec(f"{prefix}.weight", (out_f, in_f), dtype)]
    if bias:
        specs.append(TensorSpec(f"{prefix}.bias", (out_f,), dtype, "zeros"))
    return specs


def _norm(prefix: str, dim: int, dtype: str, bias: bool = False) -> list[TensorSpec]:
    specs = [TensorSpec(f"{prefix}.weight", (dim,), dtype, "ones")]
    if bias:
        specs.append(TensorSpec(f"{prefix}.bias", (dim,), dtype, "zeros"))
    return specs


def _block_linear_shape(layer: str, dim: int, ffn_dim: int) -> tuple[int, int]:
    if layer == "ffn.0":
        return ffn_dim, dim
    if layer == "ffn.2":
        return dim, ffn_dim
    return dim, dim


def wan_specs(size: str, fp8: bool | None = None) -> list[TensorSpec]:
    """Tensors of the SCAIL diffusion model file of one size class (see module docstring).

    ``fp8`` picks the layout (default: fp8-scaled for ``full`` only); ``wan_specs("tiny", True)``
    is a small file in the real file's fp8-scaled layout, to exercise that loader path on a CPU.
    """
    cfg = WAN_SIZES[size]
    dim, ffn_dim, layers = cfg["dim"], cfg["ffn_dim"], cfg["layers"]
    fp8 = size == "full" if fp8 is None else fp8
    dt = "bfloat16"
    patch = (dim, WAN_IN_DIM, *WAN_PATCH)
    specs: list[TensorSpec] = [
        TensorSpec("patch_embedding.weight", patch, dt),
        TensorSpec("patch_embedding.bias", (dim,), dt, "zeros"),
        TensorSpec("patch_embedding_pose.weight", patch, dt),
        TensorSpec("patch_embedding_pose.bias", (dim,), dt, "zeros"),
        *_linear("text_embedding.0", dim, WAN_TEXT_DIM, dt),
        *_linear("text_embedding.2", dim, dim, dt),
        *_linear("time_embedding.0", dim, WAN_FREQ_DIM, dt),
        *_linear("time_embedding.2", dim, dim, dt),
        *_linear("time_projection.1", 6 * dim, dim, dt),
    ]
    for i in range(layers):
        b = f"blocks.{i}"
        specs.append(TensorSpec(f"{b}.modulation", (1, 6, dim), dt))
        for layer in BLOCK_LINEARS:
            out_f, in_f = _block_linear_shape(layer, dim, ffn_dim)
            if fp8:
                # stored values span the fp8 range; the scale brings them back to ~N(0, 0.02)
                specs.append(
                    TensorSpec(f"{b}.{layer}.weight", (out_f, in_f), "float8_e4m3fn", std=1.0)
                )
                specs.append(TensorSpec(f"{b}.{layer}.bias", (out_f,), dt, "zeros"))
                specs.append(
                    TensorSpec(f"{b}.{layer}.scale_weight", (1,), "float32", "const", value=0.02)
                )
            else:
                specs.extend(_linear(f"{b}.{layer}", out_f, in_f, dt))
        for norm in (
            "self_attn.norm_q",
            "self_attn.norm_k",
            "cross_attn.norm_q",
            "cross_attn.norm_k",
        ):
            specs.extend(_norm(f"{b}.{norm}", dim, dt))
        specs.extend(_norm(f"{b}.cross_attn.norm_k_img", dim, dt))
        specs.extend(_norm(f"{b}.norm3", dim, dt, bias=True))
    specs += [
        TensorSpec("head.modulation", (1, 2, dim), dt),
        *_linear("head.head", math.prod(WAN_PATCH) * WAN_OUT_DIM, dim, dt),
        *_norm("img_emb.proj.0", WAN_CLIP_DIM, dt, bias=True),
        *_linear("img_emb.proj.1", WAN_CLIP_DIM, WAN_CLIP_DIM, dt),
        *_linear("img_emb.proj.3", dim, WAN_CLIP_DIM, dt),
        *_norm("img_emb.proj.4", dim, dt, bias=True),
    ]
    if fp8:
        # the marker comfy-format scaled files carry; WanVideoModelLoader treats it as "scaled"
        specs.append(TensorSpec("scaled_fp8", (0,), "float8_e4m3fn", "zeros"))
    return specs


def lora_specs(size: str) -> list[TensorSpec]:
    """Kohya-style LoRA on every block linear (``diffusion_model.blocks.N.<layer>.lora_*``)."""
    cfg = WAN_SIZES[size]
    dim, ffn_dim, layers, rank = cfg["dim"], cfg["ffn_dim"], cfg["layers"], cfg["rank"]
    specs: list[TensorSpec] = []
    for i in range(layers):
        for layer in BLOCK_LINEARS:
            out_f, in_f = _block_linear_shape(layer, dim, ffn_dim)
            p = f"diffusion_model.blocks.{i}.{layer}"
            specs.append(TensorSpec(f"{p}.lora_down.weight", (rank, in_f), "bfloat16"))
            specs.append(TensorSpec(f"{p}.lora_up.weight", (out_f, rank), "bfloat16"))
            specs.append(TensorSpec(f"{p}.alpha", (), "bfloat16", "const", value=float(rank)))
    return specs


# --------------------------------------------------------------------------------------------
# Wan 2.1 VAE (WanVideoVAELoader): fixed architecture, strict load; decoder width 96 = lightVAE
# --------------------------------------------------------------------------------------------


def _conv(
    prefix: str, out_c: int, in_c: int, kernel: Sequence[int], dtype: str
) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", (out_c, in_c, *kernel), dtype),
        TensorSpec(f"{prefix}.bias", (out_c,), dtype, "zeros"),
    ]


def _vae_residual(p: str, in_c: int, out_c: int, dt: str) -> list[TensorSpec]:
    specs = [
        TensorSpec(f"{p}.residual.0.gamma", (in_c, 1, 1, 1), dt, "ones"),
        *_conv(f"{p}.residual.2", out_c, in_c, (3, 3, 3), dt),
        TensorSpec(f"{p}.residual.3.gamma", (out_c, 1, 1, 1), dt, "ones"),
        *_conv(f"{p}.residual.6", out_c, out_c, (3, 3, 3), dt),
    ]
    if in_c != out_c:
        specs += _conv(f"{p}.shortcut", out_c, in_c, (1, 1, 1), dt)
    return specs


def _vae_attention(p: str, c: int, dt: str) -> list[TensorSpec]:
    return [
        TensorSpec(f"{p}.norm.gamma", (c, 1, 1), dt, "ones"),
        *_conv(f"{p}.to_qkv", 3 * c, c, (1, 1), dt),
        *_conv(f"{p}.proj", c, c, (1, 1), dt),
    ]


def _vae_middle(p: str, c: int, dt: str) -> list[TensorSpec]:
    return [
        *_vae_residual(f"{p}.0", c, c, dt),
        *_vae_attention(f"{p}.1", c, dt),
        *_vae_residual(f"{p}.2", c, c, dt),
    ]


def vae_specs(size: str, base: int = 96, z_dim: int = 16) -> list[TensorSpec]:
    """Wan 2.1 VAE: full (base width 96) or the 75 %-pruned lightVAE for ``tiny``."""
    dt = "bfloat16"
    keep = 0.25 if size == "tiny" else 1.0
    mult = [1, 2, 4, 4]
    enc = [int(base * m * keep) for m in [1, *mult]]
    specs = _conv("encoder.conv1", enc[0], 3, (3, 3, 3), dt)
    idx = 0
    for i, (cin, cout) in enumerate(itertools.pairwise(enc)):
        for _ in range(2):
            specs += _vae_residual(f"encoder.downsamples.{idx}", cin, cout, dt)
            cin, idx = cout, idx + 1
        if i != len(mult) - 1:
            specs += _conv(f"encoder.downsamples.{idx}.resample.1", cout, cout, (3, 3), dt)
            if i > 0:  # temporal downsample on stages 1 and 2
                specs += _conv(f"encoder.downsamples.{idx}.time_conv", cout, cout, (3, 1, 1), dt)
            idx += 1
    specs += _vae_middle("encoder.middle", enc[-1], dt)
    specs += [TensorSpec("encoder.head.0.gamma", (enc[-1], 1, 1, 1), dt, "ones")]
    specs += _conv("encoder.head.2", 2 * z_dim, enc[-1], (3, 3, 3), dt)
    specs += _conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1), dt)
    specs += _conv("conv2", z_dim, z_dim, (1, 1, 1), dt)
    dec = [int(base * m * keep) for m in [mult[-1], *mult[::-1]]]
    specs += _conv("decoder.conv1", dec[0], z_dim, (3, 3, 3), dt)
    specs += _vae_middle("decoder.middle", dec[0], dt)
    idx = 0
    for i, (cin, cout) in enumerate(itertools.pairwise(dec)):
        if i in (1, 2, 3):
            cin //= 2
        for _ in range(3):
            specs += _vae_residual(f"decoder.upsamples.{idx}", cin, cout, dt)
            cin, idx = cout, idx + 1
        if i != len(mult) - 1:
            specs += _conv(f"decoder.upsamples.{idx}.resample.1", cout // 2, cout, (3, 3), dt)
            if i < 2:  # temporal upsample on stages 0 and 1
                specs += _conv(f"decoder.upsamples.{idx}.time_conv", 2 * cout, cout, (3, 1, 1), dt)
            idx += 1
    specs += [TensorSpec("decoder.head.0.gamma", (dec[-1], 1, 1, 1), dt, "ones")]
    specs += _conv("decoder.head.2", 3, dec[-1], (3, 3, 3), dt)
    return specs


# --------------------------------------------------------------------------------------------
# umt5-xxl encoder (WanVideoTextEncodeCached), CLIP ViT-H (core CLIPVisionLoader)
# --------------------------------------------------------------------------------------------

T5_XXL = {"vocab": 256384, "dim": 4096, "ffn": 10240, "heads": 64, "layers": 24, "buckets": 32}


def t5_specs(size: str) -> list[TensorSpec]:
    """umt5-xxl encoder in WanVideoWrapper's native key names; ``tiny`` is a placeholder only."""
    dt = "bfloat16"
    if size == "tiny":
        return [TensorSpec("synthetic_placeholder", (1,), dt, "zeros")]
    c = T5_XXL
    specs = [TensorSpec("token_embedding.weight", (c["vocab"], c["dim"]), dt, std=1.0)]
    for i in range(c["layers"]):
        b = f"blocks.{i}"
        specs += _norm(f"{b}.norm1", c["dim"], dt)
        for proj in ("q", "k", "v", "o"):
            specs += _linear(f"{b}.attn.{proj}", c["dim"], c["dim"], dt, bias=False)
        specs += _norm(f"{b}.norm2", c["dim"], dt)
        specs += _linear(f"{b}.ffn.gate.0", c["ffn"], c["dim"], dt, bias=False)
        specs += _linear(f"{b}.ffn.fc1", c["ffn"], c["dim"], dt, bias=False)
        specs += _linear(f"{b}.ffn.fc2", c["dim"], c["ffn"], dt, bias=False)
        specs.append(
            TensorSpec(f"{b}.pos_embedding.embedding.weight", (c["buckets"], c["heads"]), dt)
        )
    specs += _norm("norm", c["dim"], dt)
    return specs


CLIP_H = {"width": 1280, "layers": 32, "mlp": 5120, "patch": 14, "image": 224, "proj": 1024}


def clip_specs(size: str) -> list[TensorSpec]:
    """CLIP ViT-H/14 vision tower in HF key names, fp16 (same in both sizes, see docstring)."""
    del size
    dt = "float16"
    c = CLIP_H
    w = c["width"]
    v = "vision_model"
    positions = (c["image"] // c["patch"]) ** 2 + 1
    specs = [
        TensorSpec(f"{v}.embeddings.class_embedding", (w,), dt),
        TensorSpec(f"{v}.embeddings.patch_embedding.weight", (w, 3, c["patch"], c["patch"]), dt),
        TensorSpec(f"{v}.embeddings.position_embedding.weight", (positions, w), dt),
        *_norm(f"{v}.pre_layrnorm", w, dt, bias=True),
    ]
    for i in range(c["layers"]):
        p = f"{v}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += _linear(f"{p}.self_attn.{proj}", w, w, dt)
        specs += _norm(f"{p}.layer_norm1", w, dt, bias=True)
        specs += _linear(f"{p}.mlp.fc1", c["mlp"], w, dt)
        specs += _linear(f"{p}.mlp.fc2", w, c["mlp"], dt)
        specs += _norm(f"{p}.layer_norm2", w, dt, bias=True)
    specs += _norm(f"{v}.post_layernorm", w, dt, bias=True)
    specs += _linear("visual_projection", c["proj"], w, dt, bias=False)
    return specs


SAFETENSORS_SPECS = {
    "scail_diffusion": wan_specs,
    "lightx2v_lora": lora_specs,
    "wan21_vae": vae_specs,
    "umt5_xxl": t5_specs,
    "clip_vision_h": clip_specs,
}


# --------------------------------------------------------------------------------------------
# Streaming safetensors writer
# --------------------------------------------------------------------------------------------


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": _DTYPES[s.dtype][0],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _make_tensor(spec: TensorSpec, seed: int, device: str) -> Any:
    import torch

    dtype = getattr(torch, spec.dtype)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype, device=device)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype, device=device)
    if spec.init == "const":
        return torch.full(spec.shape, spec.value, dtype=torch.float32, device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, spec.name))
    out = torch.empty(spec.shape, dtype=dtype, device=device)
    chunk = 1 << 26  # fill in slices so a 1 G-element embedding never needs a float32 copy
    flat = out.view(-1)
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        piece = torch.randn(n, generator=gen, device=device, dtype=torch.float32).mul_(spec.std)
        flat[start : start + n] = piece.to(dtype)
    return out


def _tensor_bytes(tensor: Any) -> memoryview:
    import torch

    host = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(host.view(torch.uint8).numpy()).cast("B")


def write_safetensors(
    path: Path,
    specs: Sequence[TensorSpec],
    seed: int,
    device: str = "cpu",
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``specs`` to ``path`` one tensor at a time; returns the file size in bytes."""
    ordered = sorted(specs, key=lambda s: s.name)
    names = [s.name for s in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"{path.name}: duplicate tensor names in the spec")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as fh:
        fh.write(_header(ordered, {"synthetic": "true", **(metadata or {})}))
        for spec in ordered:
            if spec.numel:
                fh.write(_tensor_bytes(_make_tensor(spec, seed, device)))
    tmp.replace(path)
    return path.stat().st_size


# --------------------------------------------------------------------------------------------
# NLF (TorchScript), YOLO and ViTPose (ONNX)
# --------------------------------------------------------------------------------------------

# SMPL-24 rest pose in metres, y up, facing the camera (pelvis at the origin).
SMPL24_REST_M = (
    (0.0, 0.0, 0.0), (0.06, -0.09, 0.0), (-0.06, -0.09, 0.0), (0.0, 0.11, 0.0),
    (0.10, -0.47, 0.0), (-0.10, -0.47, 0.0), (0.0, 0.25, 0.0), (0.09, -0.87, 0.0),
    (-0.09, -0.87, 0.0), (0.0, 0.30, 0.0), (0.12, -0.93, 0.12), (-0.12, -0.93, 0.12),
    (0.0, 0.51, 0.0), (0.08, 0.41, 0.0), (-0.08, 0.41, 0.0), (0.0, 0.60, 0.05),
    (0.17, 0.45, 0.0), (-0.17, 0.45, 0.0), (0.43, 0.43, 0.0), (-0.43, 0.43, 0.0),
    (0.68, 0.43, 0.0), (-0.68, 0.43, 0.0), (0.76, 0.43, 0.0), (-0.76, 0.43, 0.0),
)  # fmt: skip
NLF_DISTANCE_MM = 4000.0


def _rest_pose_camera_mm() -> Any:
    """SMPL-24 joints in camera space (x right, y down, z forward), millimetres."""
    import torch

    joints = torch.tensor(SMPL24_REST_M, dtype=torch.float32) * 1000.0
    joints[:, 1] = -joints[:, 1]
    joints[:, 2] = NLF_DISTANCE_MM - joints[:, 2]
    return joints


def _nlf_module_class() -> type:
    import torch

    class SyntheticNLF(torch.nn.Module):
        """Stands in for NLF: one person per image, the same rest pose, a centred box."""

        def __init__(self, joints: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("rest_joints", joints)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.rest_joints.expand(images.shape[0], 24, 3)

        @torch.jit.export
        def detect_smpl_batched(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
            n = images.shape[0]
            h = float(images.shape[2])
            w = float(images.shape[3])
            box = torch.tensor([[0.3 * w, 0.05 * h, 0.7 * w, 0.95 * h, 0.99]], device=images.device)
            joints = self.rest_joints.to(images.device).unsqueeze(0)
            boxes: list[torch.Tensor] = []
            joints3d: list[torch.Tensor] = []
            for _ in range(n):
                boxes.append(box.clone())
                joints3d.append(joints.clone())
            return {"boxes": boxes, "joints3d_nonparam": joints3d}

    return SyntheticNLF


def write_nlf(path: Path) -> int:
    """TorchScript module with ``detect_smpl_batched`` (the API LoadNLFModel/NLFPredict call)."""
    import torch

    module = torch.jit.script(_nlf_module_class()(_rest_pose_camera_mm()))
    path.parent.mkdir(parents=True, exist_ok=True)
    module.save(str(path))
    return path.stat().st_size


YOLO_INPUT = (1, 3, 640, 640)
# one person box (x1, y1, x2, y2, score, class) in the 640x640 input frame, YOLOv10 end-to-end
YOLO_BOX = (192.0, 32.0, 448.0, 608.0, 0.9, 0.0)
VITPOSE_INPUT = (1, 3, 256, 192)
VITPOSE_KEYPOINTS = 133  # COCO-WholeBody; heatmaps at 1/4 resolution: 64 x 48


# YOLOv10m's size and compute (15.4 M parameters, 59 GFLOPs at 640x640, its published figures)
# from a plain stack of 3x3 convolutions with SiLU, stage by stage at the model's widths and
# strides, then 3x3 heads on the 1/8, 1/16 and 1/32 maps: (output channels, stride, repeats).
YOLO_STAGES = ((48, 2, 1), (96, 2, 2), (192, 2, 4), (384, 2, 3), (576, 2, 2))
YOLO_HEAD = 96  # a head's width on each of the last three maps


def yolo_compute(stages: tuple[tuple[int, int, int], ...] = YOLO_STAGES) -> tuple[int, float]:
    """Parameters and GFLOPs (2 x multiply-adds) of ``_yolo_large``'s convolutions."""
    params, flops, c_in, side = 0, 0.0, 3, YOLO_INPUT[2]
    heads = []
    for c_out, stride, repeats in stages:
        side //= stride
        for c_from in (c_in, *([c_out] * repeats)):
            params += 9 * c_from * c_out + c_out
            flops += 2 * 9 * c_from * c_out * side * side
        heads.append((c_out, side))
        c_in = c_out
    for c, side in heads[-3:]:
        for c_from, c_to in ((c, YOLO_HEAD), (YOLO_HEAD, YOLO_HEAD)):
            params += 9 * c_from * c_to + c_to
            flops += 2 * 9 * c_from * c_to * side * side
    return params, flops / 1e9


def write_yolo(path: Path, size: str = "tiny") -> int:
    """ONNX graph: input ``images`` [1,3,640,640] -> output [1,1,6], one constant person box.
    ``full``: the box after a convolution stack of YOLOv10m's size and compute (``YOLO_STAGES``),
    whose result is added to it times zero, so that every frame pays the compute."""
    import onnx
    from onnx import TensorProto, helper

    if size == "full":
        return _save_onnx(onnx, _yolo_large(0), path)

    box = helper.make_tensor("box", TensorProto.FLOAT, (1, 1, 6), list(YOLO_BOX))
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["output0"], value=box)],
        "synthetic_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, YOLO_INPUT)],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, (1, 1, 6))],
    )
    return _save_onnx(
        onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path
    )


# ViTPose-L (wholebody): ViT-L/16 at 256x192 (192 tokens, 24 blocks of width 1024, 16 heads, MLP
# 4096), then the classic decoder: two 4x4 stride-2 deconvolutions of 256 channels with batch norm
# and ReLU, a 1x1 convolution to the 133 heatmaps. About 307 M parameters (1.2 GB in float32).
VITPOSE_L = {"width": 1024, "depth": 24, "heads": 16, "mlp": 4096, "patch": 16, "deconv": 256}


def write_vitpose(path: Path, seed: int, size: str = "tiny") -> int:
    """ONNX graph: input [N,3,256,192] -> heatmaps [N,133,64,48], the batch axis dynamic as in
    easy_ViTPose's export. ``tiny``: sigmoid(conv 4x4/4); ``full``: ViTPose-L's layers at their
    true shapes (``VITPOSE_L``), random weights."""
    if size == "full":
        return _save_onnx_large(_vitpose_large(seed), path)
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(_tensor_seed(seed, "vitpose"))
    weight = (rng.standard_normal((VITPOSE_KEYPOINTS, 3, 4, 4)) * 0.02).astype(np.float32)
    in_shape = ("batch_size", *VITPOSE_INPUT[1:])
    out_shape = ("batch_size", VITPOSE_KEYPOINTS, VITPOSE_INPUT[2] // 4, VITPOSE_INPUT[3] // 4)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["input", "w"], ["logits"], kernel_shape=[4, 4], strides=[4, 4]
            ),
            helper.make_node("Sigmoid", ["logits"], ["heatmaps"]),
        ],
        "synthetic_vitpose",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    return _save_onnx(
        onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path
    )


def vitpose_large_parameters(cfg: dict[str, int] = VITPOSE_L) -> int:
    """The parameter count of ``_vitpose_large(seed, cfg)`` (ViTPose-L: 308 M in its paper)."""
    width, patch, deconv, mlp = cfg["width"], cfg["patch"], cfg["deconv"], cfg["mlp"]
    tokens = (VITPOSE_INPUT[2] // patch) * (VITPOSE_INPUT[3] // patch)
    block = 2 * 2 * width + (width + 1) * 3 * width + (width + 1) * width
    block += (width + 1) * mlp + (mlp + 1) * width
    head = width * deconv * 16 + 4 * deconv + deconv * deconv * 16 + 4 * deconv
    head += (deconv + 1) * VITPOSE_KEYPOINTS
    stem = (3 * patch * patch + 1) * width + tokens * width
    return stem + cfg["depth"] * block + 2 * width + head


def _yolo_large(seed: int, stages: tuple[tuple[int, int, int], ...] = YOLO_STAGES) -> Any:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(_tensor_seed(seed, "yolo_m"))
    inits: list[Any] = []
    nodes: list[Any] = []

    def conv(x: str, name: str, c_in: int, c_out: int, stride: int) -> str:
        w = rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) * np.float32(0.02)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), f"{name}.b"))
        y = f"{name}.conv"
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [stride] * 2}
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], **attrs))
        nodes.append(helper.make_node("Sigmoid", [y], [f"{name}.sig"]))
        nodes.append(helper.make_node("Mul", [y, f"{name}.sig"], [f"{name}.out"]))  # SiLU
        return f"{name}.out"

    x, c_in, maps = "images", 3, []
    for i, (c_out, stride, repeats) in enumerate(stages):
        x = conv(x, f"stage{i}.down", c_in, c_out, stride)
        for r in range(repeats):
            x = conv(x, f"stage{i}.{r}", c_out, c_out, 1)
        maps.append((x, c_out))
        c_in = c_out
    means = []
    for j, (m, c) in enumerate(maps[-3:]):
        h = conv(conv(m, f"head{j}.0", c, YOLO_HEAD, 1), f"head{j}.1", YOLO_HEAD, YOLO_HEAD, 1)
        means.append(f"head{j}.mean")
        nodes.append(helper.make_node("ReduceMean", [h], [means[-1]], keepdims=0))
    nodes.append(helper.make_node("Sum", means, ["heads"]))
    inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    inits.append(numpy_helper.from_array(np.asarray(YOLO_BOX, np.float32).reshape(1, 1, 6), "box"))
    nodes.append(helper.make_node("Mul", ["heads", "zero"], ["nothing"]))
    nodes.append(helper.make_node("Add", ["box", "nothing"], ["output0"]))
    graph = helper.make_graph(
        nodes,
        "synthetic_yolo_m",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, YOLO_INPUT)],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, (1, 1, 6))],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def _vitpose_large(seed: int, cfg: dict[str, int] = VITPOSE_L) -> Any:
    """ViTPose-L as an ONNX graph written as easy_ViTPose's export writes it (opset 11, input
    ``input_0`` with a dynamic batch axis, layer norm and GELU in elementary operators, which
    onnxruntime fuses at session start), weights drawn like the other models'."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    width, heads, patch, deconv = cfg["width"], cfg["heads"], cfg["patch"], cfg["deconv"]
    rows, cols = VITPOSE_INPUT[2] // patch, VITPOSE_INPUT[3] // patch
    tokens, head_dim = rows * cols, width // heads
    rng = np.random.default_rng(_tensor_seed(seed, "vitpose_l"))
    inits: list[Any] = []
    nodes: list[Any] = []

    def weight(name: str, shape: tuple[int, ...], fill: float | None = None) -> str:
        if fill is None:
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        else:
            array = np.full(shape, fill, np.float32)
        inits.append(numpy_helper.from_array(array, name))
        return name

    def const(name: str, values: list[int] | list[float], dtype: Any = np.int64) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def linear(x: str, name: str, n_in: int, n_out: int) -> str:
        y = node("MatMul", [x, weight(f"{name}.w", (n_in, n_out))], f"{name}.mm")
        return node("Add", [y, weight(f"{name}.b", (n_out,), 0.0)], f"{name}.out")

    def norm(x: str, name: str) -> str:
        g, b = weight(f"{name}.g", (width,), 1.0), weight(f"{name}.b", (width,), 0.0)
        mean = node("ReduceMean", [x], f"{name}.mean", axes=[-1])
        d = node("Sub", [x, mean], f"{name}.d")
        var = node("ReduceMean", [node("Pow", [d, "two"], f"{name}.d2")], f"{name}.var", axes=[-1])
        std = node("Sqrt", [node("Add", [var, "eps"], f"{name}.var_eps")], f"{name}.std")
        y = node("Mul", [node("Div", [d, std], f"{name}.n"), g], f"{name}.g_out")
        return node("Add", [y, b], f"{name}.out")

    const("shape.tokens", [0, width, tokens])  # 0: the batch, as the input has it
    const("shape.qkv", [0, tokens, 3, heads, head_dim])
    const("shape.merge", [0, tokens, width])
    const("shape.map", [0, width, rows, cols])
    const("scale", [head_dim**-0.5], np.float32)
    const("two", [2.0], np.float32)
    const("eps", [1e-6], np.float32)
    const("sqrt2", [2.0**0.5], np.float32)
    const("one", [1.0], np.float32)
    const("half", [0.5], np.float32)

    w = weight("patch.w", (width, 3, patch, patch))
    x = node("Conv", ["input_0", w, weight("patch.b", (width,), 0.0)], "patch", strides=[patch] * 2)
    x = node("Reshape", [x, "shape.tokens"], "patch.flat")
    x = node("Transpose", [x], "patch.tokens", perm=[0, 2, 1])
    x = node("Add", [x, weight("pos", (1, tokens, width))], "x0")
    for i in range(cfg["depth"]):
        b = f"blocks.{i}"
        qkv = node("Reshape", [linear(norm(x, f"{b}.norm1"), f"{b}.qkv", width, 3 * width),
                               "shape.qkv"], f"{b}.qkv5")  # fmt: skip
        qkv = node("Transpose", [qkv], f"{b}.qkvT", perm=[2, 0, 3, 1, 4])
        nodes.append(helper.make_node("Split", [qkv], [f"{b}.{n}3" for n in "qkv"], axis=0))
        q, k, v = (node("Squeeze", [f"{b}.{n}3"], f"{b}.{n}", axes=[0]) for n in "qkv")
        scores = node("MatMul", [q, node("Transpose", [k], f"{b}.kT", perm=[0, 1, 3, 2])], f"{b}.s")
        scores = node("Mul", [scores, "scale"], f"{b}.s_scaled")
        attn = node("MatMul", [node("Softmax", [scores], f"{b}.p", axis=-1), v], f"{b}.o")
        attn = node("Transpose", [attn], f"{b}.oT", perm=[0, 2, 1, 3])
        attn = node("Reshape", [attn, "shape.merge"], f"{b}.o_merged")
        x = node("Add", [x, linear(attn, f"{b}.proj", width, width)], f"{b}.x1")
        h = linear(norm(x, f"{b}.norm2"), f"{b}.fc1", width, cfg["mlp"])
        erf = node("Erf", [node("Div", [h, "sqrt2"], f"{b}.h_scaled")], f"{b}.erf")
        gelu = node("Mul", [node("Mul", [h, node("Add", [erf, "one"], f"{b}.erf1")], f"{b}.hg"),
                            "half"], f"{b}.gelu")  # fmt: skip
        x = node("Add", [x, linear(gelu, f"{b}.fc2", cfg["mlp"], width)], f"{b}.x2")
    x = node("Transpose", [norm(x, "last_norm")], "feat.T", perm=[0, 2, 1])
    x = node("Reshape", [x, "shape.map"], "feat")
    channels = width
    for i in range(2):
        d = f"deconv.{i}"
        w = weight(f"{d}.w", (channels, deconv, 4, 4))
        x = node("ConvTranspose", [x, w], f"{d}.out", strides=[2, 2], pads=[1, 1, 1, 1])
        bn = [weight(f"{d}.bn.{n}", (deconv,), f) for n, f in (("g", 1.0), ("b", 0.0))]
        bn += [weight(f"{d}.bn.{n}", (deconv,), f) for n, f in (("mean", 0.0), ("var", 1.0))]
        x = node("Relu", [node("BatchNormalization", [x, *bn], f"{d}.bn")], f"{d}.relu")
        channels = deconv
    w = weight("final.w", (VITPOSE_KEYPOINTS, deconv, 1, 1))
    node("Conv", [x, w, weight("final.b", (VITPOSE_KEYPOINTS,), 0.0)], "output_0")
    in_shape = ("batch_size", *VITPOSE_INPUT[1:])
    out_shape = ("batch_size", VITPOSE_KEYPOINTS, VITPOSE_INPUT[2] // 4, VITPOSE_INPUT[3] // 4)
    graph = helper.make_graph(
        nodes,
        "synthetic_vitpose_l",
        [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    weights = sum(int(np.prod(t.dims)) for t in inits if t.data_type == TensorProto.FLOAT)
    weights -= 6  # the float constants
    if weights != vitpose_large_parameters(cfg):
        raise AssertionError(f"ViTPose graph has {weights} weights, its table says otherwise")
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def _save_onnx_large(model: Any, path: Path) -> int:
    """``_save_onnx`` for a model near protobuf's 2-GB limit: checked by path, written through a
    temporary file so that a stopped run leaves no half model behind."""
    import onnx

    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    onnx.save(model, str(tmp))
    onnx.checker.check_model(str(tmp))
    tmp.replace(path)
    return path.stat().st_size


def _save_onnx(onnx: Any, model: Any, path: Path) -> int:
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path.stat().st_size


# --------------------------------------------------------------------------------------------
# Manifest, text cache, top level
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    name: str
    folder: str
    filename: str


def load_manifest(path: Path = DEFAULT_MANIFEST) -> list[ModelEntry]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [ModelEntry(m["name"], m["folder"], m["filename"]) for m in data["models"]]


KNOWN_MODELS = (*SAFETENSORS_SPECS, "nlf", "yolov10m", "vitpose_l")


def specs_for(name: str, size: str) -> list[TensorSpec]:
    """The safetensors table of one manifest entry (empty for the NLF/ONNX files)."""
    if size not in SIZES:
        raise ValueError(f"size: must be one of {', '.join(SIZES)}, got {size!r}")
    fn = SAFETENSORS_SPECS.get(name)
    return fn(size) if fn else []


def write_model(entry: ModelEntry, out: Path, size: str, device: str = "cpu", seed: int = 0) -> int:
    """Write one manifest entry under ``out``; returns its size in bytes."""
    path = Path(out) / entry.folder / entry.filename
    if entry.name in SAFETENSORS_SPECS:
        meta = {"synthetic_size": size, "manifest_name": entry.name}
        return write_safetensors(path, specs_for(entry.name, size), seed, device, meta)
    if entry.name == "nlf":
        return write_nlf(path)
    if entry.name == "yolov10m":
        return write_yolo(path, size)
    if entry.name == "vitpose_l":
        return write_vitpose(path, seed, size)
    raise ValueError(
        f"{entry.name}: no synthetic generator for this manifest entry "
        f"(known: {', '.join(KNOWN_MODELS)})"
    )


def _select(entries: list[ModelEntry], only: Iterable[str] | None) -> list[ModelEntry]:
    if not only:
        return entries
    wanted = list(only)
    known = {e.name for e in entries}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(
            f"--only: unknown model name(s) {', '.join(unknown)}; "
            f"manifest has {', '.join(sorted(known))}"
        )
    return [e for e in entries if e.name in wanted]


def make_models(
    out: Path,
    size: str,
    manifest: Path = DEFAULT_MANIFEST,
    only: Iterable[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Path]:
    """Write every selected manifest entry under ``out``; returns name -> written path."""
    if size not in SIZES:
        raise ValueError(f"size: must be one of {', '.join(SIZES)}, got {size!r}")
    written: dict[str, Path] = {}
    for entry in _select(load_manifest(manifest), only):
        nbytes = write_model(entry, Path(out), size, device, seed)
        written[entry.name] = Path(out) / entry.folder / entry.filename
        log.info("wrote %s/%s (%.1f MiB)", entry.folder, entry.filename, nbytes / 2**20)
    return written


def text_cache_key(prompt: str) -> str:
    """File stem WanVideoWrapper's ``get_cache_path`` uses: sha256 of the stripped prompt."""
    return hashlib.sha256(prompt.strip().encode("utf-8")).hexdigest()


def seed_text_cache(cache_dir: Path, prompts: Iterable[str], seed: int = 0) -> list[Path]:
    """Write ``<cache_dir>/<key>.pt`` per prompt: a list with one bf16 tensor (n_tokens, 4096).

    That is what ``get_cached_text_embeds`` loads with ``torch.load``; with both prompts of the
    graph cached, WanVideoTextEncodeCached returns without loading the T5 file at all.
    """
    import torch

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for prompt in prompts:
        if not prompt.strip():
            raise ValueError("--prompt: empty prompt; the graph's prompts are non-empty")
        key = text_cache_key(prompt)
        # about one token per word or per four characters (scripts without spaces), at most 512
        n_tokens = min(512, max(2, len(prompt.split()) + 1, len(prompt.strip()) // 4))
        gen = torch.Generator().manual_seed(_tensor_seed(seed, key))
        embeds = torch.randn(n_tokens, WAN_TEXT_DIM, generator=gen).mul_(0.1).to(torch.bfloat16)
        path = cache_dir / f"{key}.pt"
        torch.save([embeds], path)
        paths.append(path)
    return paths


def dry_run_table(
    size: str, manifest: Path = DEFAULT_MANIFEST, only: Iterable[str] | None = None
) -> tuple[list[str], int]:
    """Lines ``file tensor shape dtype bytes`` and the total, without allocating any tensor."""
    lines: list[str] = []
    total = 0
    for entry in _select(load_manifest(manifest), only):
        specs = specs_for(entry.name, size)
        file_bytes = sum(s.nbytes for s in specs)
        params = sum(s.numel for s in specs)
        for s in specs:
            lines.append(f"{entry.filename}\t{s.name}\t{list(s.shape)}\t{s.dtype}\t{s.nbytes}")
        if not specs:
            lines.append(f"{entry.filename}\t(non-safetensors file, a few KiB)")
        lines.append(
            f"# {entry.filename}: {len(specs)} tensors, {params:,} elements, {file_bytes:,} bytes"
        )
        total += file_bytes
    lines.append(f"# total tensor bytes: {total:,} ({total / 2**30:.2f} GiB)")
    return lines, total


# --------------------------------------------------------------------------------------------
# Check against the real model classes (real-stack tier)
# --------------------------------------------------------------------------------------------


def _import_upstream(comfy_dir: Path) -> dict[str, Any]:
    """Import the model classes from a ComfyUI tree without running any custom node's __init__."""
    import importlib
    import types

    comfy_dir = Path(comfy_dir).resolve()
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # model_management must not look for a GPU
    pkg_name = "_wvw_synthetic_check"
    if pkg_name not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [str(comfy_dir / "custom_nodes" / "ComfyUI-WanVideoWrapper")]
        sys.modules[pkg_name] = pkg
    return {
        "model": importlib.import_module(f"{pkg_name}.wanvideo.modules.model"),
        "vae": importlib.import_module(f"{pkg_name}.wanvideo.wan_video_vae"),
        "t5": importlib.import_module(f"{pkg_name}.wanvideo.modules.t5"),
        "clip": importlib.import_module("comfy.clip_vision"),
    }


def _upstream_wan_shapes(mods: dict[str, Any], size: str) -> dict[str, tuple[int, ...]]:
    import torch

    cfg = WAN_SIZES[size]
    dim = cfg["dim"]
    heads, layers = (40, 40) if dim == 5120 else (12, 30)  # the loader's rule
    with torch.device("meta"):
        model = mods["model"].WanModel(
            model_type="i2v", dim=dim, in_features=dim, out_features=dim, ffn_dim=cfg["ffn_dim"],
            ffn2_dim=cfg["ffn_dim"], in_dim=WAN_IN_DIM, out_dim=WAN_OUT_DIM, num_heads=heads,
            num_layers=layers, main_device=torch.device("cpu"), dtype=torch.bfloat16,
        )  # fmt: skip
        model.patch_embedding_pose = torch.nn.Conv3d(
            WAN_IN_DIM, dim, kernel_size=WAN_PATCH, stride=WAN_PATCH
        )
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _upstream_vae_shapes(mods: dict[str, Any], size: str) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        vae = mods["vae"].WanVideoVAE(pruning_rate=0.75 if size == "tiny" else 0.0)
    return {n.removeprefix("model."): tuple(t.shape) for n, t in vae.state_dict().items()}


def _upstream_t5_shapes(mods: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = mods["t5"].umt5_xxl(encoder_only=True, return_tokenizer=False, device="meta")
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _upstream_clip_shapes(mods: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import torch

    config = Path(mods["clip"].__file__).with_name("clip_vision_config_h.json")
    with torch.device("meta"):
        clip = mods["clip"].ClipVisionModel(str(config))
    return {n: tuple(p.shape) for n, p in clip.model.named_parameters()}


def _compare(
    label: str, ours: Sequence[TensorSpec], theirs: dict[str, tuple[int, ...]], extra_ok: set[str]
) -> list[str]:
    mine = {s.name: s.shape for s in ours if s.name not in extra_ok}
    problems = [f"{label}: missing {k} {v}" for k, v in sorted(theirs.items()) if k not in mine]
    problems += [f"{label}: unexpected {k}" for k in sorted(mine) if k not in theirs]
    problems += [
        f"{label}: {k} is {list(mine[k])}, model has {list(v)}"
        for k, v in sorted(theirs.items())
        if k in mine and mine[k] != v
    ]
    return problems


def check_against_upstream(
    comfy_dir: Path, size: str, names: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """Compare our tables with the real classes on the meta device; name -> list of mismatches.

    Extra keys the loaders read besides the parameters (``*.scale_weight``, ``scaled_fp8``) are
    allowed; the tiny T5 placeholder is skipped (it is never loaded).
    """
    mods = _import_upstream(comfy_dir)
    wanted = set(names) if names else set(SAFETENSORS_SPECS)
    result: dict[str, list[str]] = {}
    if "scail_diffusion" in wanted:
        ours = wan_specs(size)
        extra = {s.name for s in ours if s.name.endswith(".scale_weight") or s.name == "scaled_fp8"}
        result["scail_diffusion"] = _compare(
            "scail_diffusion", ours, _upstream_wan_shapes(mods, size), extra
        )
    if "wan21_vae" in wanted:
        result["wan21_vae"] = _compare(
            "wan21_vae", vae_specs(size), _upstream_vae_shapes(mods, size), set()
        )
    if "umt5_xxl" in wanted and size == "full":
        result["umt5_xxl"] = _compare("umt5_xxl", t5_specs(size), _upstream_t5_shapes(mods), set())
    if "clip_vision_h" in wanted:
        result["clip_vision_h"] = _compare(
            "clip_vision_h", clip_specs(size), _upstream_clip_shapes(mods), set()
        )
    if "lightx2v_lora" in wanted:
        model_keys = _upstream_wan_shapes(mods, size)
        problems = []
        for s in lora_specs(size):
            target = (
                s.name.removeprefix("diffusion_model.")
                .rsplit(".lora_", 1)[0]
                .removesuffix(".alpha")
                + ".weight"
            )
            if target not in model_keys:
                problems.append(f"lightx2v_lora: {s.name} patches {target}, which the model lacks")
            elif s.name.endswith("lora_down.weight") and s.shape[1] != model_keys[target][1]:
                problems.append(
                    f"lightx2v_lora: {s.name} in_features {s.shape[1]} != {model_keys[target][1]}"
                )
            elif s.name.endswith("lora_up.weight") and s.shape[0] != model_keys[target][0]:
                problems.append(
                    f"lightx2v_lora: {s.name} out_features {s.shape[0]} != {model_keys[target][0]}"
                )
        result["lightx2v_lora"] = problems
    return result


def probe_diffusion_loader(comfy_dir: Path, model_file: Path) -> dict[str, Any]:
    """Load ``model_file`` with the real WanVideoModelLoader (CPU, sdpa, quantization "disabled" as
    in the shipped graph) and report what it detected: quantization, scale count, blocks, width."""
    import torch

    _import_upstream(comfy_dir)
    import importlib

    import folder_paths

    model_file = Path(model_file).resolve()
    folder_paths.add_model_folder_path("diffusion_models", str(model_file.parent), is_default=True)
    loader = importlib.import_module("_wvw_synthetic_check.nodes_model_loading").WanVideoModelLoader
    with torch.inference_mode():
        (patcher,) = loader().loadmodel(
            model_file.name, "bf16", "offload_device", "disabled", attention_mode="sdpa"
        )
    model = patcher.model
    return {
        "quantization": model["quantization"],
        "scale_weights": len(model["scale_weights"]),
        "blocks": len(model.diffusion_model.blocks),
        "dim": model.diffusion_model.dim,
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size", choices=SIZES, help="tiny (CPU tier) or full (real shapes, GPU machine)"
    )
    p.add_argument("--out", type=Path, help="models directory to write <folder>/<filename> under")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument(
        "--only", nargs="+", metavar="NAME", help="manifest names to write (default: all)"
    )
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where random tensors are made"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print every tensor and the total bytes; write nothing",
    )
    p.add_argument(
        "--text-cache",
        type=Path,
        metavar="DIR",
        help="seed WanVideoWrapper's text-embedding cache here",
    )
    p.add_argument("--prompt", action="append", default=[], help="prompt to cache (repeatable)")
    p.add_argument(
        "--check-upstream",
        type=Path,
        metavar="COMFY_DIR",
        help="compare tables with the real classes",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        log.error("%s", exc)
        return 2


def _run(args: argparse.Namespace) -> int:
    did = False
    if args.text_cache:
        if not args.prompt:
            raise ValueError("--text-cache: give at least one --prompt")
        for path in seed_text_cache(args.text_cache, args.prompt, args.seed):
            log.info("cached text embeds %s", path.name)
        did = True
    if args.size and args.check_upstream:
        result = check_against_upstream(args.check_upstream, args.size, args.only)
        bad = [p for problems in result.values() for p in problems]
        for name, problems in result.items():
            log.info(
                "%s: %s",
                name,
                "matches the real class" if not problems else f"{len(problems)} mismatches",
            )
        for p in bad[:50]:
            log.error("%s", p)
        return 1 if bad else 0
    if args.size and args.dry_run:
        lines, _ = dry_run_table(args.size, args.manifest, args.only)
        sys.stdout.write("\n".join(lines) + "\n")
        return 0
    if args.size:
        if not args.out:
            raise ValueError("--out: required to write model files")
        make_models(args.out, args.size, args.manifest, args.only, args.device, args.seed)
        did = True
    if not did:
        raise ValueError(
            "nothing to do: give --size (with --out, --dry-run or --check-upstream) or --text-cache"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
