"""The project's extension ``xicon_decode_frames`` against the pinned WanVideoWrapper, in the
stack's Python (torch): upstream's own ``WanVideoDecode.decode`` (its pinned source, run with a
VAE double that returns what ``WanVideoVAE.decode`` returns) gives bit-identical frames with and
without the wrapper, the wrapper's frames are contiguous and upstream's are not, the VAE object is
left as it was, and the pinned source is the one the extension was written against. In the real
ComfyUI: the extension wraps the node before the first prompt, and a decode through it gives the
same frames as a ComfyUI with it turned off.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tests.plugins.realstack import (
    PINNED_DECODE,
    PINNED_VAE_LOADER,
    ROOT,
    Stack,
    serve_on_gradient,
    stack_json,
    vae_round_trip_prompt,
)

EXTENSION = "xicon_decode_frames"
EXT = ROOT / "stack" / "comfy_extension" / EXTENSION / "decode_frames.py"
PACK = "ComfyUI-WanVideoWrapper"

SCRIPT = (
    r"""
import ast, importlib.util, inspect, json, linecache, sys, types
import torch

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

df = load("decode_frames_under_test", sys.argv[1])
nodes_py = sys.argv[2]
"""
    + PINNED_DECODE
    + r"""
Pinned, ns, class_source = PinnedDecode, decode_globals, decode_source
digest = df.upstream_digest(Pinned)
ns["decode"] = Pinned.decode
Upstream = type("WanVideoDecode", (), {"decode": ns["decode"]})
Wrapped = type("WanVideoDecode", (), {"decode": df.wrap_node_decode(ns["decode"])})

class VAE(torch.nn.Module):
    # what WanVideoVAE.decode returns: one (C, T, H, W) tensor per batch item
    def __init__(self, video):
        super().__init__()
        self.video = video
        self.dtype = video.dtype
        self.calls = 0
    def decode(self, latents, device, end_=False, tiled=False, tile_size=None, tile_stride=None):
        self.calls += 1
        return [self.video.clone()]

def run(cls, video, **samples):
    vae = VAE(video)
    lat = {"samples": torch.zeros(1, 16, 3, 4, 4), **samples}
    norm = samples.pop("normalization", "default")
    out = cls().decode(vae, lat, False, 272, 272, 144, 128, norm)[0]
    return out, vae

g = torch.Generator().manual_seed(3)
out = {"digest_ok": digest == df.UPSTREAM_SHA256, "cases": {}}
for name, dtype, shape in [("bf16", torch.bfloat16, (3, 9, 24, 40)),
                           ("float32", torch.float32, (3, 5, 16, 16)),
                           ("long", torch.bfloat16, (3, 41, 8, 8))]:
    video = (torch.randn(shape, generator=g) * 1.5).to(dtype)  # beyond [-1, 1]: clamping matters
    a, vae_a = run(Upstream, video)
    b, vae_b = run(Wrapped, video)
    out["cases"][name] = {
        "equal": bool(torch.equal(a, b)), "shape": list(b.shape), "dtype": str(b.dtype),
        "upstream_contiguous": a.is_contiguous(), "wrapped_contiguous": b.is_contiguous(),
        "decode_calls": vae_b.calls, "vae_restored": "decode" not in vae_b.__dict__,
    }
# the frames chunked across several steps equal one step's
video = torch.randn(3, 13, 8, 8, generator=g).to(torch.bfloat16)
one = df.to_host_frames(video, chunk_bytes=1 << 30)
many = df.to_host_frames(video, chunk_bytes=8 * 8 * 3 * 4 * 2)  # two frames a step
out["chunks_equal"] = bool(torch.equal(one, many))
out["view_of_contiguous"] = one.permute(1, 2, 3, 0).is_contiguous()
# the end_image path (the node drops the last frame) and minmax normalisation
video = torch.randn(3, 9, 8, 8, generator=g).to(torch.bfloat16)
for label, extra in [("end_image", {"end_image": torch.zeros(1)}), ("minmax", {})]:
    norm = "minmax" if label == "minmax" else "default"
    vae_u, vae_w = VAE(video), VAE(video)
    lat = {"samples": torch.zeros(1, 16, 3, 4, 4), **extra}
    a = Upstream().decode(vae_u, dict(lat), False, 272, 272, 144, 128, norm)[0]
    b = Wrapped().decode(vae_w, dict(lat), False, 272, 272, 144, 128, norm)[0]
    out["cases"][label] = {"equal": bool(torch.equal(a, b)), "shape": list(b.shape)}
# a VAE that already carries its own decode attribute is left alone
vae = VAE(video)
vae.decode = vae.decode
b = Wrapped().decode(vae, {"samples": torch.zeros(1, 16, 3, 4, 4)}, False, 272, 272, 144, 128)[0]
out["own_attribute_untouched"] = (not b.is_contiguous()) and "decode" in vae.__dict__
# install: off by the setting, wraps the registry's class before the first prompt, once
class Executor:
    async def execute_async(self, *a, **k):
        return "ran"
registry = {"WanVideoDecode": type("WanVideoDecode", (Pinned,), {"decode": Pinned.decode})}
out["off"] = df.install(Executor, registry, {"XICON_DECODE_FRAMES": "off"})
# the decoder call's latent frames: a whole number from 1 to 8, else the default and why
out["latents"] = {v: list(df.latents_per_call({"XICON_DECODE_LATENTS": v}))
                  for v in ("", " 4 ", "1", "8", "9", "0", "two", "-2", "2.5")}
class Chunked:
    async def execute_async(self, *a, **k):
        return "ran"
out["installed_chunked"] = df.install(Chunked, {}, {"XICON_DECODE_LATENTS": "3"})
out["chunked_set"] = df.LATENTS_PER_CALL
out["installed"] = df.install(Executor, registry, {})
out["default_set"] = df.LATENTS_PER_CALL
out["again"] = df.install(Executor, registry, {})
before = registry["WanVideoDecode"].decode is Pinned.decode
import asyncio
out["first_prompt"] = asyncio.run(Executor().execute_async())
out["wrapped_before_prompt"] = before
out["wrapped_after_prompt"] = getattr(registry["WanVideoDecode"].decode, df.WRAPPED, False)
edited = class_source.replace("images.clamp_(0.0, 1.0)", "images.clamp_(0.0, 0.5)")
fname2 = "<edited WanVideoDecode>"
linecache.cache[fname2] = (len(edited), None, edited.splitlines(keepends=True), fname2)
ns2 = dict(ns)
exec(compile(edited, fname2, "exec"), ns2)
out["changed"] = df.patch({"WanVideoDecode": ns2["WanVideoDecode"]})
unreadable = type("WanVideoDecode", (), {"decode": lambda self, vae, samples: None})
out["unreadable"] = df.patch({"WanVideoDecode": unreadable})
out["missing"] = df.patch({})
print(json.dumps(out))
"""
)


STREAM_SCRIPT = (
    r"""
import json, sys
ext_file, comfy_dir, vae_file = sys.argv[1:4]
"""
    + PINNED_VAE_LOADER
    + r"""
df = load("decode_frames_under_test", ext_file)

out = {}
g = torch.Generator().manual_seed(5)
for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    (vae,) = Pinned().loadmodel("vae.safetensors", precision)
    out.setdefault("digest_ok", df.stream_digest(vae) == df.STREAM_SHA256)
    z = torch.randn(16, 6, 6, 8, generator=g).to(dtype)  # 6 latent frames: 21 frames of 64x48
    with torch.no_grad():
        (upstream,) = vae.decode([z], device="cpu", pbar=False)
        vae.model.clear_cache()
        # every chunk flushed on its own, then the default (one flush at the end)
        each = df.streamed_decode(vae.model, z.unsqueeze(0), pbar=False, flush_bytes=1)
        vae.model.clear_cache()
        vae.single_decode = df.streaming_single_decode(vae)
        (through,) = vae.decode([z], device="cpu", pbar=False)
        del vae.single_decode
        # several latent frames to each decoder call after the first
        chunked = {}
        for per_call in (2, 4, 9):
            vae.model.clear_cache()
            many = df.streamed_decode(vae.model, z.unsqueeze(0), pbar=False, per_call=per_call)
            chunked[per_call] = {
                "shape": list(many.shape),
                "contiguous": many[0].permute(1, 2, 3, 0).is_contiguous(),
                "max_diff": float((many[0] - upstream.float()).abs().max()),
                "scale": float(upstream.float().abs().max()),
            }
        vae.model.clear_cache()
    name = str(dtype).split(".")[-1]
    out[name] = {
        "upstream": [list(upstream.shape), str(upstream.dtype)],
        "each": [list(each.shape), str(each.dtype)],
        "through": [list(through.shape), str(through.dtype)],
        "equal_each": bool(torch.equal(upstream.float(), each[0])),
        "equal_through": bool(torch.equal(upstream.float(), through)),
        "frames_contiguous": through.permute(1, 2, 3, 0).is_contiguous(),
        "chunked": chunked,
    }

# HostFrames alone: chunks as the Wan 2.1 decoder gives them, and chunks that break its rule
def chunks(sizes):
    return [torch.randn(1, 3, t, 4, 5, generator=g).to(torch.bfloat16) for t in sizes]
def gathered(sizes, flush_bytes):
    parts = chunks(sizes)
    frames = df.HostFrames(len(sizes), flush_bytes)
    for part in parts:
        frames.add(part)
    got = frames.finish()
    want = torch.cat(parts, 2).float()
    return {"equal": bool(torch.equal(got, want)), "shape": list(got.shape),
            "contiguous": got[0].permute(1, 2, 3, 0).is_contiguous(),
            "most_held": frames.most_held, "thread_ended": frames._copier._shutdown}
one_chunk = 4 * 3 * 4 * 5 * 2  # a four-frame bf16 chunk's bytes
out["rule"] = gathered([1, 4, 4, 4, 4], 2 * one_chunk)
out["rule_one_flush"] = gathered([1, 4, 4], 1 << 30)
out["rule_chunked"] = gathered([1, 8, 4], 1)  # two latent frames, then one
out["odd_middle"] = gathered([1, 4, 3, 4], one_chunk)
out["odd_first"] = gathered([2, 4, 4], 1)
out["each_alone"] = gathered([1, 4, 4], 1)  # every chunk flushed on its own
frames = df.HostFrames(4, 1)  # told of 4 latent frames, given 2: 5 frames, still contiguous
for part in chunks([1, 4]):
    frames.add(part)
got = frames.finish()
out["fewer"] = {"shape": list(got.shape), "contiguous": got[0].permute(1, 2, 3, 0).is_contiguous()}
# a copy that fails: its exception reaches the decode at the next flush, and leaving the block
# ends the thread all the same
import threading
failing = df.HostFrames(3, 1)
def broken(parts, ready):
    raise RuntimeError("the host copy failed")
failing._copy = broken
try:
    with failing:
        for part in chunks([1, 4, 4]):
            failing.add(part)
    out["failed"] = "no exception"
except RuntimeError as exc:
    out["failed"] = str(exc)
out["failed_thread_ended"] = failing._copier._shutdown
out["threads_left"] = [t.name for t in threading.enumerate() if "xicon-decode-frames" in t.name]
# the copies run on the object's own thread, not the caller's
names = []
seen = df.HostFrames(3, 1)
place = seen._place
seen._place = lambda parts: (names.append(threading.current_thread().name), place(parts))
for part in chunks([1, 4, 4]):
    seen.add(part)
seen.finish()
out["copy_threads"] = sorted(set(names))
# a VAE of another kind (no single_decode, or another decode source) is not streamed
out["no_vae"] = df.stream_digest(object())
class Other(vae_module.WanVideoVAE):
    def single_decode(self, hidden_state, device, pbar=True):
        return super().single_decode(hidden_state, device, pbar)
out["other_digest"] = df.stream_digest(Other.__new__(Other)) == df.STREAM_SHA256
print(json.dumps(out))
"""
)


def test_the_wrapper_gives_upstreams_frames_contiguous(stack: Stack, tmp_path: Path) -> None:
    nodes_py = stack.comfy_dir / "custom_nodes" / PACK / "nodes.py"
    out = stack_json(stack, SCRIPT, EXT, nodes_py, cwd=tmp_path)

    assert out["digest_ok"], "WanVideoDecode.decode changed at the pinned commit"
    for name in ("bf16", "float32", "long"):
        case = out["cases"][name]
        assert case["equal"], (name, case)
        assert case["dtype"] == "torch.float32"
        assert not case["upstream_contiguous"], (name, case)
        # a float32 video already on the host is passed on as upstream gets it (no extra copy)
        assert case["wrapped_contiguous"] == (name != "float32"), (name, case)
        assert case["decode_calls"] == 1 and case["vae_restored"], (name, case)
    assert out["cases"]["bf16"]["shape"] == [9, 24, 40, 3]
    assert out["cases"]["end_image"] == {"equal": True, "shape": [8, 8, 8, 3]}
    assert out["cases"]["minmax"]["equal"]
    assert out["chunks_equal"] and out["view_of_contiguous"]
    assert out["own_attribute_untouched"]
    assert out["off"] == "off (XICON_DECODE_FRAMES)"
    assert out["installed"] == "WanVideoDecode will be wrapped before the first prompt"
    assert out["again"] == "already installed"
    latents = out["latents"]
    assert {v: latents[v][0] for v in latents} == {
        "": 1,
        " 4 ": 4,
        "1": 1,
        "8": 8,
        "9": 1,
        "0": 1,
        "two": 1,
        "-2": 1,
        "2.5": 1,
    }
    assert latents[""][1] is None and latents[" 4 "][1] is None
    for bad in ("9", "0", "two", "-2", "2.5"):
        assert "XICON_DECODE_LATENTS=" in latents[bad][1] and "from 1 to 8" in latents[bad][1]
    assert out["installed_chunked"] == (
        "WanVideoDecode will be wrapped before the first prompt; 3 latent frames per decoder call"
    )
    assert out["chunked_set"] == 3 and out["default_set"] == 1
    assert out["first_prompt"] == "ran"
    assert out["wrapped_before_prompt"] and out["wrapped_after_prompt"]
    assert "changed upstream" in out["changed"] and "left as it is" in out["changed"]
    assert (
        out["unreadable"] == "WanVideoDecode.decode's source cannot be read; decoding left as it is"
    )
    assert out["missing"] == "WanVideoDecode not loaded; nothing to do"


def test_the_decode_loop_sends_its_frames_to_the_host_as_they_come(
    stack: Stack, realstack_base: Path, tmp_path: Path
) -> None:
    vae = realstack_base / "models" / "vae" / "Wan2_1_VAE_bf16.safetensors"
    out = stack_json(
        stack,
        STREAM_SCRIPT,
        EXT,
        stack.comfy_dir,
        vae,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        cwd=tmp_path,
    )
    assert out["digest_ok"], "single_decode or VideoVAE_.decode changed at the pinned commit"
    for name in ("float32", "bfloat16"):
        case = out[name]
        # upstream's (C, T, H, W) clip in the VAE's dtype; the streamed one float32, equal
        assert case["upstream"] == [[3, 21, 48, 64], f"torch.{name}"], case
        assert case["each"] == [[1, 3, 21, 48, 64], "torch.float32"], case
        assert case["through"] == [[3, 21, 48, 64], "torch.float32"], case
        assert case["equal_each"] and case["equal_through"], case
        assert case["frames_contiguous"], case
        for per_call, many in case["chunked"].items():
            assert many["shape"] == [1, 3, 21, 48, 64] and many["contiguous"], (per_call, many)
            # the same sums, made by kernels for longer clips: float32 to its rounding
            assert many["max_diff"] <= (1e-5 if name == "float32" else 0.05), (per_call, many)
    one_chunk = 4 * 3 * 4 * 5 * 2  # a four-frame bf16 chunk's bytes
    for name, frames in (
        ("rule", 17),
        ("rule_one_flush", 9),
        ("rule_chunked", 13),
        ("each_alone", 9),
        ("odd_middle", 12),
        ("odd_first", 10),
    ):
        case = out[name]
        assert case["equal"] and case["contiguous"], (name, case)
        assert case["shape"] == [1, 3, frames, 4, 5], (name, case)
    # the device's share is bounded: the frames waiting (at most the flush size and a chunk)
    # and the batch before, in float32 (twice its bf16 bytes), being copied
    assert 2 * one_chunk <= out["rule"]["most_held"] <= 3 * (3 * one_chunk), out["rule"]
    assert all(out[name]["thread_ended"] for name in ("rule", "odd_middle", "each_alone"))
    assert out["failed"] == "the host copy failed" and out["failed_thread_ended"]
    assert out["threads_left"] == []
    assert out["copy_threads"] and all(
        name.startswith("xicon-decode-frames") for name in out["copy_threads"]
    ), out["copy_threads"]
    assert out["fewer"] == {"shape": [1, 3, 5, 4, 5], "contiguous": True}
    assert out["no_vae"] is None
    assert out["other_digest"] is False


def serve(stack: Stack, realstack_base: Path, folder: Path, setting: str | None) -> dict[str, Any]:
    """ComfyUI (CPU, WanVideoWrapper and this extension) decodes the clip once."""
    return serve_on_gradient(
        stack,
        realstack_base,
        folder,
        {PACK, EXTENSION},
        vae_round_trip_prompt(5),
        ("XICON_DECODE_FRAMES", setting),
    )


def test_comfyui_decodes_through_the_extension(
    stack: Stack, realstack_base: Path, tmp_path: Path
) -> None:
    on = serve(stack, realstack_base, tmp_path / "on", None)  # the default, as the image runs it
    off = serve(stack, realstack_base, tmp_path / "off", "off")
    for served in (on, off):
        assert served["entry"].get("status", {}).get("status_str") == "success", served["log"][
            -3000:
        ]
    assert (
        "xicon_decode_frames: WanVideoDecode will be wrapped before the first prompt" in on["log"]
    )
    assert (
        "xicon_decode_frames: WanVideoDecode hands its frames to the host as one contiguous "
        "float32 tensor" in on["log"]
    ), on["log"][-3000:]
    # the decode ran through it: the tiny VAE's 2 latent frames decode to 5 frames of 64x48,
    # sent to the host as they were decoded
    assert "xicon_decode_frames: 5 frames of 64x48 to the host as one float32 tensor" in on["log"]
    assert re.search(
        r"xicon_decode_frames: 5 frames of 64x48 to the host as one float32 tensor \([\d.]+ "
        r"MiB\), as they were decoded: at most [\d.]+ MiB of them on the GPU at once",
        on["log"],
    ), on["log"][-3000:]
    assert "xicon_decode_frames: off (XICON_DECODE_FRAMES)" in off["log"]
    assert "to the host as one float32 tensor" not in off["log"]
    assert len(on["pngs"]) == 5 and on["pngs"] == off["pngs"]
    assert len(on["latent"]) == 1 and on["latent"] == off["latent"]
