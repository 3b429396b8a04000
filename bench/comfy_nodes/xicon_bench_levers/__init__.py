"""Bench-only ComfyUI nodes for levers that no node input reaches (``bench/gpu_variants.py``
wires them in; ``bench/gpu_probes.py`` installs this folder for a run and removes it after).

- ``XiconBenchVAEChannelsLast``: a copy of the Wan VAE (``WANVAE``) whose decoder weights are in
  channels-last memory (5-D: ``channels_last_3d``, 4-D: ``channels_last``); the decode's
  arithmetic is the same operations on another memory layout (``bench/vae_decode.py``: -11 % on
  an H100 alone, frames within 0.063 on [-1, 1]). A copy, so the loader's cached VAE, which
  another variant's job reuses, stays as loaded; the pose embeds' encoder is not touched.
"""

import copy
import logging

import torch

log = logging.getLogger("xicon_bench_levers")


def channels_last(module: torch.nn.Module) -> int:
    """Every 5-D and 4-D parameter of ``module`` in channels-last memory; how many changed."""
    changed = 0
    for p in module.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
            changed += 1
        elif p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
            changed += 1
    return changed


class XiconBenchVAEChannelsLast:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("WANVAE",)}}

    RETURN_TYPES = ("WANVAE",)
    FUNCTION = "apply"
    CATEGORY = "xicon_bench"

    def apply(self, vae):
        vae = copy.deepcopy(vae)
        changed = channels_last(vae.model.decoder) + channels_last(vae.model.conv2)
        log.info("xicon_bench_levers: VAE decoder in channels-last memory (%d weights)", changed)
        return (vae,)


NODE_CLASS_MAPPINGS = {"XiconBenchVAEChannelsLast": XiconBenchVAEChannelsLast}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
