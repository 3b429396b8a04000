"""The project's extension ``xicon_pose_embeds`` against the pinned WanVideoWrapper, with the
stack's torch on the CPU and the tiny synthetic VAE: upstream's own
``WanVideoAddSCAILPoseEmbeds`` (its pinned source) and the replaced ``add`` give the same
embeds bit for bit; the frames' first step done a chunk at a time is upstream's expression to
the bit, strides included; the replacement is installed before the first prompt, only on the
pinned source, and not at all when turned off. Through ComfyUI the extension runs in every
real-stack job (node 324 of the shipped graph).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.plugins.realstack import PINNED_VAE_LOADER, ROOT, Stack, stack_json

EXT = ROOT / "stack" / "comfy_extension" / "xicon_pose_embeds" / "pose_embeds.py"

SCRIPT = (
    r"""
import asyncio, json, sys
comfy_dir, ext_file, vae_file = sys.argv[1:4]
"""
    + PINNED_VAE_LOADER
    + r"""
ext = load("pose_embeds_under_test", ext_file)

# upstream's own node class, compiled from the pinned file's lines (linecache lets inspect read
# them), with its module's globals on the CPU
nodes_source = open(f"{root}/SCAIL/nodes.py").read()
node_lines = nodes_source.splitlines(keepends=True)
cls = next(n for n in ast.parse(nodes_source).body
           if isinstance(n, ast.ClassDef) and n.name == "WanVideoAddSCAILPoseEmbeds")
embeds_source = "".join(node_lines[cls.lineno - 1:cls.end_lineno])
efname = "<pinned WanVideoWrapper SCAIL/nodes.py: WanVideoAddSCAILPoseEmbeds>"
linecache.cache[efname] = (len(embeds_source), None, embeds_source.splitlines(keepends=True),
                           efname)
logged = []
class Log:
    def info(self, text):
        logged.append(text)
embeds_globals = {"torch": torch, "device": torch.device("cpu"),
                  "offload_device": torch.device("cpu"), "log": Log()}
exec(compile(embeds_source, efname, "exec"), embeds_globals)
Upstream = embeds_globals["WanVideoAddSCAILPoseEmbeds"]
out = {"digest_ok": ext.upstream_digest(Upstream) == ext.UPSTREAM_SHA256}

# the first step, chunk by chunk, against upstream's expression: values and strides
gen = torch.Generator().manual_seed(5)
first = {}
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for channels in (3, 4):
        frames = torch.rand(7, 5, 6, channels, generator=gen)
        frames[0, 0, 0, 0] = float("nan")
        want = (frames[..., :3].permute(3, 0, 1, 2) * 2 - 1).to(torch.device("cpu"), dtype)
        got = ext.frames_on_device(frames, torch.device("cpu"), dtype, chunk_bytes=2 * 5 * 6 * 12)
        first[f"{str(dtype)[6:]}/{channels}"] = {
            "equal": bool(torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))),
            "nan_kept": bool(got[0, 0, 0, 0].isnan()),
            "strides": got.stride() == want.stride(),
            "dtype": got.dtype == want.dtype,
        }
out["first"] = first

# the node: upstream's add and the replaced one, the tiny VAE in bf16 on the CPU
(vae,) = Pinned().loadmodel("vae.safetensors", "bf16")
pose = torch.rand(9, 24, 32, 3, generator=gen)
embeds = {"keep": 1}
(want,) = Upstream().add(embeds, vae, pose, 0.7, 0.1, 0.5)
Replaced = type("WanVideoAddSCAILPoseEmbeds", (Upstream,), {"add": ext.replace(Upstream.add)})
(got,) = Replaced().add(embeds, vae, pose, 0.7, 0.1, 0.5)
w, g = want["scail_embeds"], got["scail_embeds"]
out["node"] = {
    "latent_equal": bool(torch.equal(w["pose_latent"], g["pose_latent"])),
    "latent_shape": list(g["pose_latent"].shape),
    "rest_equal": {k: w[k] == g[k] for k in w if k != "pose_latent"},
    "keys": sorted(got),
    "embeds_untouched": embeds == {"keep": 1},
    "logged": logged,
}
# not a clip on the host: upstream's add itself
calls = []
def spy(*args):
    calls.append(args)
    return ("upstream's",)
spied = ext.replace(spy)
out["passed_on"] = [spied(None, {}, vae, x, 1.0) for x in (pose[0], pose[..., :2])]

# patch: the pinned class replaced once; a changed source and a missing node left alone
registry = {"WanVideoAddSCAILPoseEmbeds": type("WanVideoAddSCAILPoseEmbeds", (Upstream,),
                                               {"add": Upstream.add})}
out["patched"] = ext.patch(registry)
out["again"] = ext.patch(registry)
out["replaced_flag"] = getattr(registry["WanVideoAddSCAILPoseEmbeds"].add, ext.REPLACED, False)
edited = embeds_source.replace("* 2 - 1", "* 2.0 - 1.0")
efname2 = "<edited WanVideoAddSCAILPoseEmbeds>"
linecache.cache[efname2] = (len(edited), None, edited.splitlines(keepends=True), efname2)
globals2 = dict(embeds_globals)
exec(compile(edited, efname2, "exec"), globals2)
out["changed"] = ext.patch({"WanVideoAddSCAILPoseEmbeds": globals2["WanVideoAddSCAILPoseEmbeds"]})
out["missing"] = ext.patch({})

# install: off by the setting; else wraps the registry's class before the first prompt, once
class Executor:
    async def execute_async(self, *a, **k):
        return "ran"
fresh = {"WanVideoAddSCAILPoseEmbeds": type("WanVideoAddSCAILPoseEmbeds", (Upstream,),
                                            {"add": Upstream.add})}
out["off"] = ext.install(Executor, fresh, {"XICON_POSE_EMBEDS": " Off "})
out["installed"] = ext.install(Executor, fresh, {})
out["again_installed"] = ext.install(Executor, fresh, {})
out["before_prompt"] = getattr(fresh["WanVideoAddSCAILPoseEmbeds"].add, ext.REPLACED, False)
out["first_prompt"] = asyncio.run(Executor().execute_async())
out["after_prompt"] = getattr(fresh["WanVideoAddSCAILPoseEmbeds"].add, ext.REPLACED, False)
print(json.dumps(out))
"""
)


def test_the_pose_embeds_are_upstreams_bit_for_bit(stack: Stack, realstack_base: Path) -> None:
    out = stack_json(
        stack,
        SCRIPT,
        stack.comfy_dir,
        EXT,
        realstack_base / "models" / "vae" / "Wan2_1_VAE_bf16.safetensors",
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out["digest_ok"], "WanVideoAddSCAILPoseEmbeds.add changed at the pinned commit"
    for name, row in out["first"].items():
        assert row == {"equal": True, "nan_kept": True, "strides": True, "dtype": True}, name
    node = out["node"]
    assert node["latent_equal"] is True, node
    assert node["latent_shape"][0] == 20 and node["latent_shape"][1] == 3, node  # 16 + 4 mask
    assert node["rest_equal"] == {
        "pose_strength": True,
        "pose_start_percent": True,
        "pose_end_percent": True,
    }
    assert node["keys"] == ["keep", "scail_embeds"] and node["embeds_untouched"], node
    # upstream's log line, once per add, from both
    assert len(node["logged"]) == 2 and node["logged"][0] == node["logged"][1], node["logged"]
    assert node["logged"][0].startswith("SCAIL pose_latent shape: torch.Size([20, 3,")
    # a 3-D tensor and a two-channel clip go to upstream's add as they are
    assert out["passed_on"] == [["upstream's"], ["upstream's"]]
    assert out["patched"] == (
        "WanVideoAddSCAILPoseEmbeds scales and converts the pose frames on ComfyUI's device, a "
        "chunk at a time"
    )
    assert (
        out["again"] == "WanVideoAddSCAILPoseEmbeds.add already replaced or missing; nothing to do"
    )
    assert out["replaced_flag"] is True
    assert "changed upstream" in out["changed"] and "left as upstream's" in out["changed"]
    assert out["missing"] == "WanVideoAddSCAILPoseEmbeds not loaded; nothing to do"
    assert out["off"] == "off (XICON_POSE_EMBEDS)"
    assert out["installed"] == "WanVideoAddSCAILPoseEmbeds will be patched before the first prompt"
    assert out["again_installed"] == "already installed"
    assert not out["before_prompt"] and out["first_prompt"] == "ran" and out["after_prompt"]
