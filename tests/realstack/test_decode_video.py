"""The project's extension ``xicon_decode_frames``'s merged decode and encode
(``decode_video.py``) against the pinned WanVideoWrapper and VideoHelperSuite, in the stack's
Python: the frames the encoder reads while the tiny Wan VAE decodes are upstream's decoded frames
to the bit (streamed, and from the node's result when they cannot stream), the decode's and the
encoder's failures are raised as they came and leave no thread, an encoder's failure stops the
decode, the decoding thread runs in the caller's context and inference mode; the prompt rewrite
merges only plain pairs; the node takes VideoHelperSuite's and WanVideoDecode's inputs and checks
the pinned source. In the real ComfyUI: a clip decoded and encoded with the merge on and off
gives the same MP4 byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import av
from PIL import Image

from tests.plugins.realstack import (
    GRAPH,
    PINNED_DECODE,
    PINNED_VAE_LOADER,
    ROOT,
    Stack,
    cpu_comfy,
    gradient_clip,
    h264_combine,
    make_base,
    pack_script,
    run_prompt,
    stack_json,
    wan_decode,
    wan_encode,
    wan_vae_loader,
)

FOLDER = ROOT / "stack" / "comfy_extension" / "xicon_decode_frames"
EXT = FOLDER / "decode_video.py"
FRAMES = FOLDER / "decode_frames.py"
WVW = "ComfyUI-WanVideoWrapper"
VHS = "ComfyUI-VideoHelperSuite"
# the node's closing log line (frame_feed.overlapped)
TIMED = re.compile(
    r"xicon_decode_video: 21 frames encoded as they were decoded \((?P<how>[^)]*)\): the "
    r"decode took (?P<decoded>\d+\.\d\d) s, the encode ended (?P<encoded>\d+\.\d\d) s "
    r"after the decode began"
)


FLOW_SCRIPT = (
    r"""
import contextvars, json, logging, sys, threading
ext_file, frames_file, comfy_dir, vae_file, nodes_py, graph_file = sys.argv[1:7]
"""
    + PINNED_VAE_LOADER
    + r"""
import torch
"""
    + PINNED_DECODE
    + r"""
Decode = PinnedDecode
df = load("xicon_decode_frames_impl", frames_file)  # the name decode_video looks it up by
dv = load("decode_video_under_test", ext_file)
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("xicon_decode_frames").addHandler(Keep())
logging.getLogger("xicon_decode_frames").setLevel(logging.INFO)

Wrapped = type("WanVideoDecode", (Decode,), {"decode": df.wrap_node_decode(Decode.decode)})
(vae,) = Pinned().loadmodel("vae.safetensors", "bf16")
g = torch.Generator().manual_seed(7)
samples = {"samples": torch.randn(1, 16, 6, 6, 8, generator=g)}  # 6 latent frames: 21 of 64x48
plain = (False, 272, 272, 144, 128, "default")
tiled = (True, 32, 32, 16, 16, "default")
with torch.inference_mode():
    want = Decode().decode(vae, samples, *plain)[0]
    want_tiled = Decode().decode(vae, samples, *tiled)[0]

def collect(images):
    n = len(images)
    first = images[0]
    return {"len": n, "first": first, "frames": torch.stack(list(images))}

def threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("xicon-decode")]

out = {"expected": dv.expected_frames(samples)}
node_shapes = []
def node_decode(args):
    def run():
        images = Wrapped().decode(vae, samples, *args)[0]
        node_shapes.append(list(images.shape))
        return images
    return run

for name, args, reference in (("streamed", plain, want), ("tiled", tiled, want_tiled)):
    del lines[:]
    with torch.inference_mode():
        got = dv.overlapped(node_decode(args), collect, out["expected"])
    out[name] = {
        "len": got["len"], "shape": list(got["frames"].shape),
        "equal": bool(torch.equal(got["frames"], reference)),
        "first_equal": bool(torch.equal(got["first"], reference[0])),
        "node_shape": node_shapes[-1], "log": list(lines), "threads": threads(),
    }

# the decode fails at its third latent frame: its own exception, no thread left
real_decoder = vae.model.decoder
calls = []
gate = threading.Event()
class Decoder(torch.nn.Module):
    def __init__(self, fail_at=None, wait_at=None):
        super().__init__()
        self.inner = real_decoder  # the VAE counts its causal convolutions through it
        self.fail_at, self.wait_at = fail_at, wait_at
    def forward(self, *a, **k):
        calls.append(1)
        if len(calls) == self.fail_at:
            raise RuntimeError("the decoder failed")
        if len(calls) == self.wait_at:
            gate.wait(60)
        return self.inner(*a, **k)

def failing_case(decoder, combine):
    del calls[:]
    vae.model.decoder = decoder
    try:
        with torch.inference_mode():
            dv.overlapped(node_decode(plain), combine, out["expected"])
        return {"raised": None}
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc), "calls": len(calls),
                "threads": threads()}
    finally:
        vae.model.decoder = real_decoder
        vae.model.clear_cache()

out["decode_fails"] = failing_case(Decoder(fail_at=3), collect)

# the encoder fails after the first frame: its exception; the decode stops at its next batch
# (every chunk flushed on its own here; the decoder's second call waits for the encoder to stop)
release = dv.FrameFeed.release
def released(self, abandon):
    release(self, abandon)
    gate.set()
dv.FrameFeed.release = released
defaults = df.streamed_decode.__defaults__
df.streamed_decode.__defaults__ = (True, 1)
def first_only(images):
    images[0]
    raise ValueError("the encoder failed")
out["encoder_fails"] = failing_case(Decoder(wait_at=2), first_only)
df.streamed_decode.__defaults__ = defaults
dv.FrameFeed.release = release

# a decode that hands nothing over: the frames come from its result; it runs in the caller's
# context (ComfyUI's executing node) and inference mode
var = contextvars.ContextVar("node", default=None)
seen = {}
def bare():
    seen["node"] = var.get()
    seen["inference"] = torch.is_inference_mode_enabled()
    seen["thread"] = threading.current_thread().name
    return want.clone()
var.set("139")
with torch.inference_mode():
    got = dv.overlapped(bare, collect, out["expected"])
out["bare"] = {"equal": bool(torch.equal(got["frames"], want)), "seen": seen, "log": lines[-1]}

# expected frame counts and the cases that cannot overlap
lat = lambda t: {"samples": torch.zeros(1, 16, t, 2, 2)}
out["counts"] = [dv.expected_frames(lat(6)), dv.expected_frames({**lat(6), "has_ref": True}),
                 dv.expected_frames({**lat(6), "has_ref": True, "drop_last": True}),
                 dv.expected_frames(lat(1)), dv.expected_frames({**lat(1), "has_ref": True})]
video = {"format": "video/h264-mp4", "pingpong": False, "loop_count": 0}
reason = lambda s=lat(6), norm="default", opts=video, streams=True, v=vae: dv.sequential_reason(
    v, s, norm, opts, streams)
TAEHV = type("TAEHV", (), {})
out["reasons"] = {
    "plain": reason(),
    "not_streamed": reason(streams=False),
    "video": reason(s={**lat(6), "video": torch.zeros(1)}),
    "end_image": reason(s={**lat(6), "end_image": torch.zeros(1)}),
    "looped": reason(s={**lat(6), "looped": True}),
    "no_frames": reason(s={**lat(1), "has_ref": True}),
    "batch": reason(s={"samples": torch.zeros(2, 16, 6, 2, 2)}),
    "taehv": reason(v=TAEHV()),
    "minmax": reason(norm="minmax"),
    "gif": reason(opts={**video, "format": "image/gif"}),
    "pingpong": reason(opts={**video, "pingpong": True}),
    "loop": reason(opts={**video, "loop_count": 2}),
}

# the prompt rewrite: the shipped graph's pair, and the pairs it leaves apart
graph = json.load(open(graph_file))
combine_inputs = sorted(k for k in graph["139"]["inputs"] if k != "images")
decode_inputs = dict(graph["28"]["inputs"])
out["shipped"] = {"merged": dv.rewrite(graph), "has_28": "28" in graph,
                  "class": graph["139"]["class_type"], "inputs": sorted(graph["139"]["inputs"]),
                  "wan_vae": graph["139"]["inputs"]["wan_vae"] == decode_inputs["vae"],
                  "samples": graph["139"]["inputs"]["samples"] == decode_inputs["samples"],
                  "combine_inputs": combine_inputs}
def pair(**change):
    dec = {"class_type": "WanVideoDecode", "inputs": {"vae": ["v", 0], "samples": ["s", 0],
           "enable_vae_tiling": False, "tile_x": 272, "tile_y": 272, "tile_stride_x": 144,
           "tile_stride_y": 128}}
    comb = {"class_type": "VHS_VideoCombine", "inputs": {"images": ["d", 0], "frame_rate": 24,
            "loop_count": 0, "filename_prefix": "x", "format": "video/h264-mp4",
            "pingpong": False, "save_output": True}}
    prompt = {"d": dec, "c": comb}
    for key, value in change.items():
        node, _, name = key.partition("__")
        prompt[node]["inputs"][name] = value
    return prompt
def second_user():
    prompt = pair()
    prompt["p"] = {"class_type": "SaveImage", "inputs": {"images": ["d", 0]}}
    return prompt
def other_source():
    prompt = pair()
    prompt["d"]["class_type"] = "VAEDecode"
    return prompt
out["apart"] = {
    "plain": dv.rewrite(pair()),
    "second_user": dv.rewrite(second_user()),
    "meta_batch": dv.rewrite(pair(c__meta_batch=["m", 0])),
    "latents": dv.rewrite(pair(c__latents=["l", 0])),
    "combine_vae": dv.rewrite(pair(c__vae=["v", 0])),
    "unknown_decode_input": dv.rewrite(pair(d__something=1)),
    "other_source": dv.rewrite(other_source()),
    "second_output": dv.rewrite(pair(c__images=["d", 1])),
}
# a second clip of a batch (its own host tensor) does not replace the first clip's frames
feed = dv.FrameFeed(5)
first, second = torch.zeros(5, 2, 2, 3), torch.ones(5, 2, 2, 3)
feed.ready(first, 5)
feed.ready(second, 1)
out["second_clip"] = [feed.frames is first, feed.count]
# with the encoder waiting, the decode's frames go over in the feed's smaller batches
with df.feeding(dv.FrameFeed(5)):
    fed = df.HostFrames(2)
alone = df.HostFrames(2)
out["flush"] = [fed.flush_bytes, alone.flush_bytes, df.FLUSH_BYTES, dv.SINK_FLUSH_BYTES]
fed.close()
alone.close()
out["threads_left"] = threads()
print(json.dumps(out))
"""
)

NODE_SCRIPT = pack_script(
    [f"custom_nodes/{VHS}"],
    "xicon_decode_frames",
    r"""
import torch
frames_file, nodes_py = script_args
spec = importlib.util.spec_from_file_location("xicon_decode_frames_impl", frames_file)
df = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = df
spec.loader.exec_module(df)
"""
    + PINNED_DECODE
    + r"""
Decode = PinnedDecode
Combine = nodes.NODE_CLASS_MAPPINGS["VHS_VideoCombine"]
digest = ext.combine_digest(Combine)
out = {"digest": digest, "digest_ok": digest == ext.COMBINE_SHA256}
Streaming = type("WanVideoDecode", (Decode,), {"decode": df.wrap_node_decode(Decode.decode)})

class Server:
    def __init__(self):
        self.on_prompt_handlers = []
    def add_on_prompt_handler(self, handler):
        self.on_prompt_handlers.append(handler)

server = Server()
registry = {"WanVideoDecode": Streaming, "VHS_VideoCombine": Combine}
names = {}
out["off"] = ext.install(server, registry, names, {"XICON_DECODE_VIDEO": "off"})
out["installed"] = ext.install(server, registry, names, {})
out["again"] = ext.install(server, registry, names, {})
handler = server.on_prompt_handlers[0]
out["before_prompt"] = ext.NODE in registry
out["no_pair"] = handler({"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}})["prompt"]
out["registered_by_no_pair"] = ext.NODE in registry
prompt = {"prompt": {
    "d": {"class_type": "WanVideoDecode", "inputs": {"vae": ["v", 0], "samples": ["s", 0],
          "enable_vae_tiling": False, "tile_x": 272, "tile_y": 272, "tile_stride_x": 144,
          "tile_stride_y": 128, "normalization": "default"}},
    "c": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["d", 0], "frame_rate": 24,
          "loop_count": 0, "filename_prefix": "x", "format": "video/h264-mp4", "crf": 19,
          "pingpong": False, "save_output": True}}}}
merged = handler(prompt)["prompt"]
out["merged"] = {k: v["class_type"] for k, v in merged.items()}
out["crf_kept"] = merged["c"]["inputs"].get("crf")
Node = registry.get(ext.NODE)
out["display"] = names.get(ext.NODE)
types_ = Node.INPUT_TYPES()
out["required"] = sorted(types_["required"])
out["optional"] = sorted(types_["optional"])
out["hidden_takes_any"] = "crf" in types_["hidden"] and "prompt" in types_["hidden"]
out["combine_required"] = sorted(Combine.INPUT_TYPES()["required"])
out["returns"] = [list(Node.RETURN_TYPES), Node.OUTPUT_NODE, Node.FUNCTION]
out["validate_bad"] = Node.VALIDATE_INPUTS(64, 64, 64, 32)
out["validate_ok"] = Node.VALIDATE_INPUTS(272, 272, 144, 128)
# the reasons it stays apart: a changed VideoCombine, a missing class, decode_frames missing
vhs = sys.modules[Combine.__module__]
vhs_source = open(vhs.__file__).read()
vhs_lines = vhs_source.splitlines(keepends=True)
vc = next(n for n in ast.parse(vhs_source).body
          if isinstance(n, ast.ClassDef) and n.name == "VideoCombine")
edited = "".join(vhs_lines[vc.lineno - 1:vc.end_lineno]).replace(
    "num_frames = len(images)", "num_frames = len(list(images))")
fname = "<edited VideoCombine>"
linecache.cache[fname] = (len(edited), None, edited.splitlines(keepends=True), fname)
vns = dict(vars(vhs))
exec(compile(edited, fname, "exec"), vns)
Changed = vns["VideoCombine"]
changed = {"WanVideoDecode": Streaming, "VHS_VideoCombine": Changed}
out["changed"] = ext.Installer(changed, {}).ensure()
out["missing"] = ext.Installer({"VHS_VideoCombine": Combine}, {}).ensure()
saved = sys.modules.pop("xicon_decode_frames_impl")
out["no_frames_module"] = ext.Installer(dict(registry), {}).ensure()
sys.modules["xicon_decode_frames_impl"] = saved
print(json.dumps(out))
""",
)


def test_the_encoder_reads_upstreams_frames_as_they_are_decoded(
    stack: Stack, realstack_base: Path, tmp_path: Path
) -> None:
    vae = realstack_base / "models" / "vae" / "Wan2_1_VAE_bf16.safetensors"
    nodes_py = stack.comfy_dir / "custom_nodes" / WVW / "nodes.py"
    out = stack_json(
        stack,
        FLOW_SCRIPT,
        EXT,
        FRAMES,
        stack.comfy_dir,
        vae,
        nodes_py,
        GRAPH,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        cwd=tmp_path,
    )
    assert out["expected"] == 21
    streamed = out["streamed"]
    assert streamed["equal"] and streamed["first_equal"], streamed
    assert streamed["len"] == 21 and streamed["shape"] == [21, 48, 64, 3], streamed
    # every frame went to the encoder: the node itself got an empty clip back
    assert streamed["node_shape"] == [0, 48, 64, 3], streamed
    # the line tells the decode's own time and when the encode ended (either may end first:
    # the decode's thread still clears its cache after handing over the last frame)
    timed = [m for line in streamed["log"] if (m := TIMED.fullmatch(line))]
    assert len(timed) == 1 and timed[0]["how"] == "streamed", streamed["log"]
    assert float(timed[0]["decoded"]) > 0 and float(timed[0]["encoded"]) > 0, streamed["log"]
    tiled = out["tiled"]  # a tiled decode is not streamed: the frames come from its result
    assert tiled["equal"] and tiled["first_equal"] and tiled["len"] == 21, tiled
    assert tiled["node_shape"] == [21, 48, 64, 3], tiled
    assert any("from the decode's result" in line for line in tiled["log"]), tiled["log"]
    assert streamed["threads"] == [] and tiled["threads"] == []

    fails = out["decode_fails"]
    assert fails["raised"] == "RuntimeError" and fails["message"] == "the decoder failed", fails
    assert fails["threads"] == [], fails
    encoder = out["encoder_fails"]
    assert encoder["raised"] == "ValueError" and encoder["message"] == "the encoder failed"
    # stopped at the batch after the encoder gave up: not all six latent frames decoded
    assert encoder["calls"] <= 3 and encoder["threads"] == [], encoder

    bare = out["bare"]
    assert bare["equal"], bare
    assert bare["seen"] == {"node": "139", "inference": True, "thread": "xicon-decode-video"}
    bare_line = TIMED.fullmatch(bare["log"])
    assert bare_line and bare_line["how"] == "from the decode's result", bare["log"]
    assert float(bare_line["encoded"]) >= 0 and float(bare_line["decoded"]) >= 0, bare["log"]

    assert out["counts"] == [21, 17, 13, 1, 0]
    reasons = out["reasons"]
    assert reasons["plain"] is None
    assert reasons["not_streamed"] == "xicon_decode_frames does not wrap the decode"
    assert reasons["video"] == "the samples carry decoded video"
    assert reasons["end_image"] == reasons["looped"] == "an end image or a looped clip"
    assert reasons["no_frames"] == "not a clip of latent frames"
    assert reasons["batch"] == "more than one clip in the batch"
    assert reasons["taehv"] == "a TAEHV decoder"
    assert reasons["minmax"] == "normalization minmax"
    assert reasons["gif"] == "not a video format"
    assert reasons["pingpong"] == reasons["loop"] == "ping-pong or a loop"

    shipped = out["shipped"]
    assert shipped["merged"] == [["28", "139"]] and not shipped["has_28"], shipped
    assert shipped["class"] == "XiconWanDecodeVideoCombine"
    assert shipped["wan_vae"] and shipped["samples"]
    decode_names = [
        "enable_vae_tiling",
        "normalization",
        "samples",
        "tile_stride_x",
        "tile_stride_y",
        "tile_x",
        "tile_y",
        "wan_vae",
    ]
    assert shipped["inputs"] == sorted(shipped["combine_inputs"] + decode_names), shipped
    apart = out["apart"]
    assert apart.pop("plain") == [["d", "c"]]
    assert all(merged == [] for merged in apart.values()), apart
    assert out["second_clip"] == [True, 5]
    fed, alone, default, sink = out["flush"]
    assert fed == sink < alone == default, out["flush"]
    assert out["threads_left"] == []


def test_the_node_takes_both_nodes_inputs_from_the_pinned_classes(
    stack: Stack, tmp_path: Path
) -> None:
    nodes_py = stack.comfy_dir / "custom_nodes" / WVW / "nodes.py"
    out = stack_json(
        stack, NODE_SCRIPT, EXT, FRAMES, nodes_py, cwd=stack.comfy_dir, env={**os.environ}
    )
    assert out["digest_ok"], f"VHS VideoCombine changed at the pinned commit: {out['digest']}"
    assert out["off"] == "off (XICON_DECODE_VIDEO)"
    assert out["installed"] == (
        "WanVideoDecode -> VHS_VideoCombine pairs will run as one node, the encode beside the "
        "decode"
    )
    assert out["again"] == "already installed"
    assert not out["before_prompt"] and not out["registered_by_no_pair"]
    assert out["no_pair"] == {"1": {"class_type": "SaveImage", "inputs": {}}}
    assert out["merged"] == {"c": "XiconWanDecodeVideoCombine"}
    assert out["crf_kept"] == 19
    assert out["display"] == "WanVideo Decode + Video Combine (overlapped)"
    combine = set(out["combine_required"]) - {"images"}
    assert set(out["required"]) == combine | {
        "wan_vae",
        "samples",
        "enable_vae_tiling",
        "tile_x",
        "tile_y",
        "tile_stride_x",
        "tile_stride_y",
    }
    assert set(out["optional"]) == {"audio", "meta_batch", "vae", "normalization"}
    assert out["hidden_takes_any"]
    assert out["returns"] == [["VHS_FILENAMES"], True, "decode_combine"]
    assert out["validate_bad"] == "Tile width must be larger than the tile stride width."
    assert out["validate_ok"] is True
    assert "changed upstream" in out["changed"] and "left apart" in out["changed"]
    assert out["missing"] == (
        "WanVideoDecode or VHS_VideoCombine not loaded; decode and encode left apart"
    )
    assert out["no_frames_module"] == (
        "xicon_decode_frames not loaded; decode and encode left apart"
    )


def decode_and_encode(frames: int) -> dict[str, Any]:
    """A gradient clip encoded by the tiny VAE, decoded, and encoded to H.264 as node 139 does."""
    return {
        "vae": wan_vae_loader(),
        **gradient_clip(frames),
        "enc": wan_encode(["clip", 0]),
        "28": wan_decode(["enc", 0]),
        "139": h264_combine(["28", 0], "dv"),
    }


def serve(stack: Stack, realstack_base: Path, folder: Path, setting: str | None) -> dict[str, Any]:
    base = make_base(stack, folder / "comfy", packs={WVW, VHS, "xicon_decode_frames"})
    (base / "models").symlink_to(realstack_base / "models")
    width, height = 64, 48
    Image.frombytes(
        "RGB",
        (width, height),
        bytes((x * 4 + y * 3) % 256 for y in range(height) for x in range(width) for _ in "rgb"),
    ).save(base / "input" / "gradient.png")
    log = folder / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k != "XICON_DECODE_VIDEO"}
    if setting is not None:
        env["XICON_DECODE_VIDEO"] = setting
    with cpu_comfy(stack, base, log, env) as (url, _):
        entry = run_prompt(url, decode_and_encode(21), timeout_s=600)
    output = base / "output"
    return {
        "entry": entry,
        "log": log.read_text(errors="replace"),
        "files": {p.name: p.read_bytes() for p in sorted(output.glob("dv_*"))},
        "output": output,
    }


def test_comfyui_encodes_the_clip_as_it_decodes_it(
    stack: Stack, realstack_base: Path, tmp_path: Path
) -> None:
    on = serve(stack, realstack_base, tmp_path / "on", None)  # the default, as the image runs it
    off = serve(stack, realstack_base, tmp_path / "off", "off")
    for served in (on, off):
        status = served["entry"].get("status", {})
        assert status.get("status_str") == "success", served["log"][-3000:]
    merged = "xicon_decode_video: nodes 28 (WanVideoDecode) and 139 (VHS_VideoCombine) run as one"
    assert merged in on["log"], on["log"][-3000:]
    assert "xicon_decode_video: 21 frames encoded as they were decoded (streamed)" in on["log"]
    assert "xicon_decode_video: off (XICON_DECODE_VIDEO)" in off["log"]
    assert "run as one" not in off["log"]
    # the outputs keep the combine's id; the decode's id is gone from the merged prompt
    assert set(on["entry"]["outputs"]) == {"139"} == set(off["entry"]["outputs"])
    names = sorted(on["files"])
    assert names == ["dv_00001.mp4", "dv_00001.png"] == sorted(off["files"]), names
    assert on["files"]["dv_00001.mp4"] == off["files"]["dv_00001.mp4"]
    pixels = [Image.open(io.BytesIO(served["files"]["dv_00001.png"])) for served in (on, off)]
    assert pixels[0].tobytes() == pixels[1].tobytes() and pixels[0].size == (64, 48)
    with av.open(str(on["output"] / "dv_00001.mp4")) as mp4:
        assert mp4.streams.video[0].frames == 21
    assert re.search(r"xicon_decode_video: ok", on["log"]), on["log"][-3000:]
    assert json.dumps(on["entry"]["outputs"]["139"])  # the combine's own output record
