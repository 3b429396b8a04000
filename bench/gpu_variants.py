"""Graph variants for the GPU benchmark: the shipped graph and the levers tried against it.

Each variant is the shipped ``XiCON_Dance_SCAIL_vFinal.json`` run through the worker with a few
changes; the changes are data (``LEVERS``, ``VARIANTS``), so every figure in ``bench/results``
names exactly what differed. A lever adds nodes (``nodes``, ids from 9000 up, which the
shipped graph does not use), changes node inputs the worker leaves alone (``graph``),
sets worker settings (``settings``) for inputs the worker writes itself (its role table: a graph
patch there would be overwritten when the worker builds the job's graph), or changes the job's
own fields (``job``).
``build(name, template)`` returns the patched graph, ``settings(name)`` the variant's settings,
``job(name)`` its job fields;
``--save-latents`` adds a core ``SaveLatent`` node on the sampler's output, so two variants'
latents can be compared (cosine, max difference, finite) for the same seed.

Levers:
- ``resident``: the sampler keeps the transformer on the GPU after the job
  (``RESIDENT_TRANSFORMER=1``: node 348's ``force_offload`` off), so a warm job does not move
  15.9 GB again (with the image's extension ``xicon_resident_weights``, which lets the sampler
  use the weights already there). ``offload`` is ``RESIDENT_TRANSFORMER=0``, the graph as
  shipped: the transformer leaves the GPU after every job (the worker's ``auto`` keeps it on
  CUDA cards of 30 GiB or more, so a GPU run names the one it measures). ``resident16`` and
  ``offload16`` are those with ``long16``'s overlap and steps; ``resident_prompt`` sends a
  prompt whose encoding is not on disk (``new_prompt``), so the 11-GB text encoder runs on the
  GPU beside the resident transformer; ``resident_compile`` and ``resident_compile16`` add
  ``torch_compile``.
- ``clip_resident``: CLIP vision stays on the GPU after its encode
  (``WanVideoClipVisionEncode.force_offload`` false, node 327: 1.2 GB of VRAM); the warm job
  spent 0.9 s in node 327, mostly moving the model (``nodes.py`` ~L645). ``resident_clip`` and
  ``resident_clip16`` are ``resident`` and ``resident16`` with it.
- ``fp16_fast``: ``BASE_PRECISION=fp16_fast`` (fp16 with fp16 accumulation; the worker's
  default on GeForce cards); pays on GeForce cards (twice the fp32-accumulate rate), not on the
  H200.
- ``bf16``: ``BASE_PRECISION=bf16`` (the worker's default elsewhere), to pin a baseline.
- ``overlap16``: context windows overlapping by 16 frames instead of 48 (node 355): fewer
  windows per step (21-23 instead of 39-40 at 1441 frames).
- ``fps16``: the job at 16 fps (SCAIL-preview's training rate): 961 frames for 60 s of dance.
- ``rms_fused``: the q/k RMSNorm of every block as torch's ``nn.RMSNorm`` (node 22
  ``rms_norm_function: pytorch``) instead of WanVideoWrapper's own ``WanRMSNorm``
  (``wanvideo/modules/model.py``), which runs square, mean, scale and weight as separate
  passes over each 29,757 x 5,120 activation; the loader's tooltip says the torch one "is faster
  ... but changes results slightly". Measured on the H200 (``gpu_h200_windows``): -3.4 % per
  step; the shipped graph has used it since. ``rms_default`` puts WanVideoWrapper's own back, for
  an A/B against the shipped graph.
- ``sdpa``: WanVideoWrapper's attention as PyTorch SDPA (``SAGEATTENTION_ENABLED=0``: node 22
  ``attention_mode: sdpa``) in a ComfyUI started for ``sageattn``, so one run profiles a step in
  both attention modes on the same server.
- ``compile``: the transformer's blocks compiled by ``torch.compile`` (inductor, default mode,
  static shapes): a ``WanVideoTorchCompileSettings`` node added (``COMPILE_NODE``, with the inputs
  the worker writes for ``TORCH_COMPILE``, ``xicon_dance.workflow.COMPILE_SETTINGS``) and wired
  into the model loader's ``compile_args``, on any device (the worker's setting is for CUDA
  only); the sampler compiles each block when it runs
  (``nodes_sampler.py`` ~L145, ``utils.compile_model``). ``allow_unmerged_lora_compile`` is on:
  the checkpoint is scaled fp8, so the LoRA stays unmerged, and without it every LoRA'd linear
  is a graph break (``custom_linear.py`` ~L54). The lever aims at the memory-bound work between
  the matmuls (435 ms per profiled pose step: norms, modulation, RoPE, fp8 -> bf16 weight
  upcasts), which inductor can fuse. The first job pays the compile.
- ``torch_compile``: the same through the worker's own setting (``TORCH_COMPILE=1``: node 900,
  chosen at start on a CUDA GPU), the product path for the next GPU run.
- ``steps2``: 2 sampler steps (the job's ``steps``), for memory runs on a long clip: the
  clip's host copies and the decode do not depend on the steps, and the sampler's time per
  window-step is still measured. ``long16`` is ``overlap16`` with it, ``torch_compile16`` that
  with ``TORCH_COMPILE`` (the compile lever on a 60-s clip against ``long16`` in one run).
- ``pose_cpu``: the pose detectors on onnxruntime's CPU provider (node 364 ``onnx_device``)
  instead of its CUDA provider, as the H100 sittings before 2026-12-05's eighth ran them:
  the pose render (node 362) of a warm job took 0.26-0.42 s then and 0.83-1.5 s since, in jobs
  whose detectors ran on CUDA (``resident_clip_posecpu`` against ``resident_clip`` in one
  ComfyUI tells whether the CUDA provider's session slows the render after it).
- ``vae_fp32``: the VAE in fp32, only for a smoke test of the benchmark on a CPU (bf16
  convolutions there take minutes per chunk; ``tests/realstack/cpu_profile.py`` does the same):
  variants ``cpu_smoke`` and ``cpu_smoke16``.
- ``cpu_long``: windows overlapping by 4 frames (``overlap4``, node 355: 19 windows per step at
  1441 frames instead of 39-40), the VAE as shipped (bf16, so the decoder's host copies are the
  GPU's): a 60-s clip at a tiny size through the whole graph on a CPU in minutes, for memory
  figures (``bench/README.md``, the released outputs).

Results name the graph of their day: in ``bench/results/gpu_h200_windows`` ``baseline`` still
had ``rms_norm_function: default``, so ``rms_fused`` there is today's shipped graph. Earlier
results (``bench/results/gpu_h200_long``) name the variants of their day: ``lean`` was
node 131 on the GPU plus NLFPredict in batches, both now in the shipped graph (node 131 is left
out by the worker, NLFPredict runs in batches of 32), ``tuned`` that plus ``resident``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xicon_dance.workflow import COMPILE_SETTINGS

COMPILE_NODE = "9002"  # the worker's own (TORCH_COMPILE) is node 900, with the same inputs

LEVERS: dict[str, dict[str, dict[str, Any]]] = {
    "resident": {"settings": {"RESIDENT_TRANSFORMER": "1"}},
    "offload": {"settings": {"RESIDENT_TRANSFORMER": "0"}},
    "new_prompt": {
        "job": {"prompt": "A dancer in a red jacket spins across a wooden stage, full body."}
    },
    "clip_resident": {"graph": {"327": {"force_offload": False}}},
    "fp16_fast": {"settings": {"BASE_PRECISION": "fp16_fast"}},
    "bf16": {"settings": {"BASE_PRECISION": "bf16"}},
    "overlap16": {"graph": {"355": {"context_overlap": 16}}},
    "overlap4": {"graph": {"355": {"context_overlap": 4}}},
    "fps16": {"job": {"fps": 16}},
    "steps2": {"job": {"steps": 2}},
    "rms_fused": {"graph": {"22": {"rms_norm_function": "pytorch"}}},
    "rms_default": {"graph": {"22": {"rms_norm_function": "default"}}},
    "sdpa": {"settings": {"SAGEATTENTION_ENABLED": "0"}},
    "vae_fp32": {"graph": {"38": {"precision": "fp32"}}},
    "pose_cpu": {"graph": {"364": {"onnx_device": "CPUExecutionProvider"}}},
    "torch_compile": {"settings": {"TORCH_COMPILE": "1"}},
    "compile": {
        "nodes": {
            COMPILE_NODE: {
                "class_type": "WanVideoTorchCompileSettings",
                "inputs": dict(COMPILE_SETTINGS),
                "_meta": {"title": "bench: torch.compile settings"},
            }
        },
        "graph": {"22": {"compile_args": [COMPILE_NODE, 0]}},
    },
}

VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "bf16": ("bf16",),
    "fp16": ("fp16_fast",),
    "resident": ("resident",),
    "offload": ("offload",),
    "resident16": ("resident", "overlap16", "steps2"),
    "offload16": ("offload", "overlap16", "steps2"),
    "resident_prompt": ("resident", "new_prompt"),
    "resident_compile": ("resident", "torch_compile"),
    "resident_compile16": ("resident", "torch_compile", "overlap16", "steps2"),
    "clip_resident": ("clip_resident",),
    "resident_clip": ("resident", "clip_resident"),
    "resident_clip16": ("resident", "clip_resident", "overlap16", "steps2"),
    "resident_clip_posecpu": ("resident", "clip_resident", "pose_cpu"),
    "overlap16": ("overlap16",),
    "fps16": ("fps16",),
    "rms_fused": ("rms_fused",),
    "rms_default": ("rms_default",),
    "sdpa": ("sdpa",),
    "compile": ("compile",),
    "torch_compile": ("torch_compile",),
    "long16": ("overlap16", "steps2"),
    "torch_compile16": ("torch_compile", "overlap16", "steps2"),
    "cpu_smoke": ("vae_fp32",),
    "cpu_long": ("overlap4",),
    "cpu_smoke16": ("vae_fp32", "fps16"),
    "cpu_smoke_rms": ("vae_fp32", "rms_fused"),
    "cpu_smoke_compile": ("vae_fp32", "compile"),
    "cpu_smoke_torch_compile": ("vae_fp32", "torch_compile"),
}

SAVE_LATENT_NODE = "9001"


def build(name: str, template: dict[str, Any], *, save_latents: bool = False) -> dict[str, Any]:
    """The template with variant ``name``'s graph levers applied (a deep copy)."""
    graph = copy.deepcopy(template)
    for lever in VARIANTS[name]:
        graph.update(copy.deepcopy(LEVERS[lever].get("nodes", {})))
        for node_id, inputs in LEVERS[lever].get("graph", {}).items():
            graph[node_id]["inputs"].update(inputs)
    if save_latents:
        graph[SAVE_LATENT_NODE] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["348", 0], "filename_prefix": f"latents/bench_{name}"},
        }
    return graph


def settings(name: str) -> dict[str, str]:
    """The worker settings (environment) variant ``name`` sets on top of the run's."""
    env: dict[str, str] = {}
    for lever in VARIANTS.get(name, ()):
        env.update(LEVERS[lever].get("settings", {}))
    return env


def job(name: str) -> dict[str, Any]:
    """The job fields variant ``name`` sets on top of the run's job."""
    fields: dict[str, Any] = {}
    for lever in VARIANTS.get(name, ()):
        fields.update(LEVERS[lever].get("job", {}))
    return fields
