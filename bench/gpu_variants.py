"""Graph variants for the GPU benchmark: the shipped graph and the levers tried against it.

Each variant is the shipped ``XiCON_Dance_SCAIL_vFinal.json`` with a few node inputs changed; the
changes are data (``VARIANTS``), so every figure in ``bench/results`` names exactly what differed.
``build(name, template)`` returns the patched graph; ``--save-latents`` adds a core ``SaveLatent``
node on the sampler's output, so two variants' latents can be compared (cosine, max difference,
finite) for the same seed.

Levers (node id -> inputs):
- ``resident``: the sampler keeps the transformer on the GPU after the job
  (``WanVideoSamplerv2.force_offload`` false), so a warm job does not move 15.9 GB again.
- ``resize_gpu``: node 131 (driving frames -> generation size) on the GPU with bilinear; the
  worker hands the clip over at the generation size already, so this resize is an identity.
  KJNodes refuses lanczos on the GPU.
- ``nlf_batch``: NLFPredict in batches of 64 frames instead of the whole clip at once.
- ``fp16_fast``: WanVideoModelLoader ``base_precision`` fp16_fast (fp16 with fp16 accumulation);
  pays on GeForce cards (twice the fp32-accumulate rate), not on the H200.
"""

from __future__ import annotations

import copy
from typing import Any

LEVERS: dict[str, dict[str, dict[str, Any]]] = {
    "resident": {"348": {"force_offload": False}},
    "resize_gpu": {"131": {"upscale_method": "bilinear", "device": "gpu"}},
    "nlf_batch": {"334": {"per_batch": 64}},
    "fp16_fast": {"22": {"base_precision": "fp16_fast"}},
}

VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "tuned": ("resident", "resize_gpu", "nlf_batch"),
    "fp16": ("resident", "resize_gpu", "nlf_batch", "fp16_fast"),
    "lean": ("resize_gpu", "nlf_batch"),
    "lean16": ("resize_gpu", "nlf_batch", "fp16_fast"),
}

SAVE_LATENT_NODE = "9001"


def build(name: str, template: dict[str, Any], *, save_latents: bool = False) -> dict[str, Any]:
    """The template with variant ``name``'s levers applied (a deep copy)."""
    graph = copy.deepcopy(template)
    for lever in VARIANTS[name]:
        for node_id, inputs in LEVERS[lever].items():
            graph[node_id]["inputs"].update(inputs)
    if save_latents:
        graph[SAVE_LATENT_NODE] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["348", 0], "filename_prefix": f"latents/bench_{name}"},
        }
    return graph
