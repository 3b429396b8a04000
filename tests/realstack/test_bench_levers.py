"""The bench's graph lever ``vae_channels_last`` (``bench/comfy_nodes/xicon_bench_levers``) with
the pinned WanVideoWrapper VAE and the stack's torch, on the CPU with the tiny synthetic VAE:
the node hands the decode a copy with the decoder's weights in channels-last memory and leaves
the loader's VAE as it was; a decode through that layout gives the plain decode's frames (fp32
here: the layout changes only the order of the same operations). Run through
``bench/vae_decode.py``, which prints the same figures on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.plugins.realstack import ROOT, Stack, stack_json

BENCH = ROOT / "bench" / "vae_decode.py"
NODE = ROOT / "bench" / "comfy_nodes" / "xicon_bench_levers" / "__init__.py"

NODE_SCRIPT = r"""
import importlib, importlib.util, json, sys
comfy_dir, node_file, vae_file = sys.argv[1:4]
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
from safetensors.torch import load_file

spec = importlib.util.spec_from_file_location("levers_under_test", node_file)
node = importlib.util.module_from_spec(spec)
spec.loader.exec_module(node)
# the pack as a package for its relative imports, its __init__ (every node) not run
root = f"{comfy_dir}/custom_nodes/ComfyUI-WanVideoWrapper"
spec = importlib.util.spec_from_file_location(
    "wvw", f"{root}/__init__.py", submodule_search_locations=[root])
sys.modules["wvw"] = importlib.util.module_from_spec(spec)
vae_module = importlib.import_module("wvw.wanvideo.wan_video_vae")
sd = {f"model.{k}": v for k, v in load_file(vae_file).items()}
vae = vae_module.WanVideoVAE(dtype=torch.float32, pruning_rate=0.75)
vae.load_state_dict(sd)
(copy,) = node.XiconBenchVAEChannelsLast().apply(vae)

def layouts(module):
    # 5-D weights laid out otherwise than the default, and those not channels-last (a weight
    # with unit dimensions is both, and counts as neither)
    five = [p for p in module.parameters() if p.dim() == 5]
    return {
        "moved": sum(p.stride() != p.contiguous().stride() for p in five),
        "not_cl": sum(not p.is_contiguous(memory_format=torch.channels_last_3d) for p in five),
    }

print(json.dumps({
    "copy": copy is not vae and copy.model is not vae.model,
    "copy_decoder": layouts(copy.model.decoder),
    "loader_decoder": layouts(vae.model.decoder),
    "copy_encoder": layouts(copy.model.encoder),
    "types": node.XiconBenchVAEChannelsLast.INPUT_TYPES()["required"]["vae"][0],
}))
"""


def vae_file(realstack_base: Path) -> Path:
    return realstack_base / "models" / "vae" / "Wan2_1_VAE_bf16.safetensors"


def test_the_lever_node_converts_a_copy(stack: Stack, realstack_base: Path) -> None:
    out = stack_json(
        stack,
        NODE_SCRIPT,
        stack.comfy_dir,
        NODE,
        vae_file(realstack_base),
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out["copy"] is True
    assert out["types"] == "WANVAE"
    assert out["copy_decoder"]["moved"] > 10 and out["copy_decoder"]["not_cl"] == 0, out
    assert out["loader_decoder"]["moved"] == 0, out  # the cached VAE another job reuses: as loaded
    assert out["copy_encoder"]["moved"] == 0, out  # the pose embeds' encoder: not touched


def test_a_channels_last_decode_gives_the_plain_frames(stack: Stack, realstack_base: Path) -> None:
    out = stack_json(
        stack,
        f"__file__ = {str(BENCH)!r}\n{BENCH.read_text()}",  # run as ``-c``, where it is unset
        "--comfy-dir",
        stack.comfy_dir,
        "--vae",
        vae_file(realstack_base),
        "--latent-frames",
        "2",
        "--size",
        "64x48",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--repeat",
        "0",
        "--variants",
        "plain,channels_last",
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    plain, cl = out["runs"]["plain@2"], out["runs"]["channels_last@2"]
    assert plain["frames"] == cl["frames"] == [3, 5, 48, 64]
    assert plain["finite"] and cl["finite"]
    assert cl["max_abs_diff"] < 1e-4 and cl["cosine"] > 0.99999, cl
