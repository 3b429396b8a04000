"""The project's extension ``xicon_resident_weights`` against the pinned WanVideoWrapper, in the
stack's Python (torch).

Upstream's own ``load_weights`` (the pinned pack imported as ComfyUI imports it) runs through the
wrapper on a small transformer: the first call loads, a call that would only repeat it returns at
once, and every change the wrapper must not miss makes it load again (the weights moved to
``meta`` by upstream's own ``offload_transformer``, an in-place write, another state dict or
dtype, a block-swap load). In the real ComfyUI, the shipped graph on the CPU with the sampler's
``force_offload`` off: the second job does not load the transformer again and its latents are
equal, value for value, to those of a ComfyUI with the extension off, which loads it again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.plugins.realstack import (
    GRAPH,
    ROOT,
    Stack,
    cpu_comfy,
    make_base,
    pack_script,
    place_graph_inputs,
    run_prompt,
    stack_json,
)
from tests.realstack.cpu_profile import cpu_graph

EXTENSION = "xicon_resident_weights"
EXT = ROOT / "stack" / "comfy_extension" / EXTENSION / "resident_weights.py"
PACK = "ComfyUI-WanVideoWrapper"
UPSTREAM_LOAD = "Loading and assigning model weights to device..."  # load_weights' own log line
SKIPPED = "as the last load left them; not loaded again"

PREAMBLE = pack_script(
    ["custom_nodes/ComfyUI-WanVideoWrapper"],
    "xicon_resident_weights",
    r"""
import torch
rw = ext
node = nodes.NODE_CLASS_MAPPINGS["WanVideoSamplerv2"]
base = rw.sampler_base(node)
module = sys.modules[base.__module__]
upstream = module.load_weights
out = {"digest_ok": rw.upstream_digest(upstream, base) == rw.UPSTREAM_SHA256}
""",
)

SCRIPT = (
    PREAMBLE
    + r"""
calls = []
def counted(*a, **k):
    calls.append(1)
    return upstream(*a, **k)

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8, device="meta")
        self.norm = torch.nn.LayerNorm(8, device="meta")

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.patched_linear = True
        self.audio_model = None
        for name in ("teacache_state", "magcache_state", "easycache_state"):
            setattr(self, name, types.SimpleNamespace(clear_all=lambda: None))

g = torch.Generator().manual_seed(5)
def state_dict():
    return {k: torch.randn(v.shape, generator=g) for k, v in Tiny().state_dict().items()}
sd = state_dict()
model = Tiny()
load = rw.resident_loading(counted)
cpu = torch.device("cpu")
args = dict(base_dtype=torch.bfloat16, transformer_load_device=cpu, block_swap_args=None,
            compile_args=None)

def run(label, transformer=model, weights=sd, dtype=torch.bfloat16, **over):
    before = len(calls)
    load(transformer, weights, dtype, **{**args, **over})
    values = {k: torch.equal(p.float(), weights[k].to(p.dtype).float())
              for k, p in transformer.named_parameters()}
    out[label] = {"loaded": len(calls) - before, "values_ok": all(values.values()),
                  "device": str(next(transformer.parameters()).device)}

run("first")
run("again")
module.offload_transformer(model)  # what force_offload does after sampling: every weight to meta
out["offloaded_to"] = str(next(model.parameters()).device)
run("after_offload")
run("again_2")
with torch.no_grad():
    model.blocks[0].q.weight.add_(1.0)  # an in-place write
run("after_write")
run("other_sd", weights=dict(sd))
run("other_dtype", weights=sd, dtype=torch.float16)
run("block_swap", block_swap_args={"blocks_to_swap": 0})
run("block_swap_again", block_swap_args={"blocks_to_swap": 0})
run("after_block_swap")
# as ComfyUI runs nodes: in inference mode, whose tensors have no version counter
model2 = Tiny()
with torch.inference_mode():
    run("inference_first", transformer=model2)
    run("inference_again", transformer=model2)
    module.offload_transformer(model2)
    run("inference_after_offload", transformer=model2)
out["skip_lines"] = [line for line in lines if "not loaded again" in line]

class Executor:
    async def execute_async(self, *a, **k):
        return "ran"
registry = {"WanVideoSamplerv2": node}
out["off"] = rw.install(Executor, registry, {"XICON_RESIDENT_WEIGHTS": "off"})
out["installed"] = rw.install(Executor, registry, {})
out["again_installed"] = rw.install(Executor, registry, {})
out["wrapped_before_prompt"] = getattr(module.load_weights, rw.WRAPPED, False)
out["first_prompt"] = asyncio.run(Executor().execute_async())
out["wrapped_after_prompt"] = getattr(module.load_weights, rw.WRAPPED, False)
out["patch_again"] = rw.patch(registry)
module.load_weights = upstream
import linecache
text = "def load_weights(transformer, sd=None, *a, **k):\n    return None\n"
linecache.cache["<edited>"] = (len(text), None, text.splitlines(keepends=True), "<edited>")
space = {}
exec(compile(text, "<edited>", "exec"), space)
module.load_weights = space["load_weights"]
out["changed"] = rw.patch(registry)
module.load_weights = upstream
out["missing"] = rw.patch({})
print(json.dumps(out))
"""
)


def test_the_wrapper_loads_only_what_changed(stack: Stack, tmp_path: Path) -> None:
    out = stack_json(stack, SCRIPT, EXT, cwd=stack.comfy_dir)

    assert out["digest_ok"], "load_weights or WanVideoSampler.process changed at the pinned commit"
    expected = {
        "first": 1,  # meta -> loaded
        "again": 0,  # nothing changed: returned at once
        "after_offload": 1,  # upstream's offload left every weight on meta
        "again_2": 0,
        "after_write": 1,  # a weight written in place
        "other_sd": 1,  # another state dict (equal values, another object)
        "other_dtype": 1,
        "block_swap": 1,  # block swap: upstream's load, every time
        "block_swap_again": 1,
        "after_block_swap": 1,  # a block-swap load leaves no note behind
        "inference_first": 1,
        "inference_again": 0,
        "inference_after_offload": 1,
    }
    assert {label: out[label]["loaded"] for label in expected} == expected
    for label in expected:  # whichever way, the weights are the state dict's afterwards
        assert out[label]["values_ok"] and out[label]["device"] == "cpu", (label, out[label])
    assert out["offloaded_to"] == "meta"
    assert len(out["skip_lines"]) == 3
    assert "the transformer's 8 parameters are on cpu" in out["skip_lines"][0]

    assert out["off"] == "off (XICON_RESIDENT_WEIGHTS)"
    assert (
        out["installed"]
        == "WanVideoSamplerv2's weight loading will be wrapped before the first prompt"
    )
    assert out["again_installed"] == "already installed"
    assert not out["wrapped_before_prompt"] and out["wrapped_after_prompt"]
    assert out["first_prompt"] == "ran"
    assert out["patch_again"] == "load_weights already wrapped; nothing to do"
    assert "changed upstream" in out["changed"] and "left as it is" in out["changed"]
    assert out["missing"] == "WanVideoSamplerv2 not loaded; nothing to do"


PAGES_SCRIPT = (
    PREAMBLE
    + r"""
import inspect
from pathlib import Path
import comfy.utils
from safetensors.torch import save_file
fp = rw.file_pages
path = Path(script_args[0]) / "weights.safetensors"

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(512, 512, device="meta")  # 1 MiB of float32 weights
        self.norm = torch.nn.LayerNorm(512, device="meta")

class Big(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(8)])
        self.patched_linear = True
        self.audio_model = None

g = torch.Generator().manual_seed(7)
saved = {k: torch.randn(v.shape, generator=g) for k, v in Big().state_dict().items()}
save_file(saved, str(path))
out["file_kib"] = path.stat().st_size // 1024

def mapped_kib():
    maps = [m for m in fp.parse_maps(Path("/proc/self/maps").read_text()) if m.path == str(path)]
    fields = fp.parse_smaps(Path("/proc/self/smaps").read_text(), maps).values()
    return sum(f.get("Rss", 0) for f in fields)

# A copy to a GPU reads its source; a "copy" to meta reads nothing. So each value is read here as
# the copy to a GPU would read it, then the file's resident pages are counted, then upstream's own
# set_module_tensor_to_device runs.
samples = []
upstream_set = upstream.__globals__["set_module_tensor_to_device"]
def reading_set(module_, name, device, value=None, dtype=None):
    if value is not None and value.device.type == "cpu":
        value.clone()
    samples.append(mapped_kib())
    return upstream_set(module_, name, device, value=value, dtype=dtype)
upstream.__globals__["set_module_tensor_to_device"] = reading_set

WRITTEN = "blocks.3.q.weight"
def case(label, keep, device, release=True, write=False):
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)  # views of the mapped file
    if write:
        with torch.no_grad():
            sd[WRITTEN][0, :4] = 1.5  # that page becomes the process's own copy
    model = Big()
    samples.clear()
    lines.clear()
    token = rw.KEEPING.set(keep)
    try:
        rw.resident_loading(upstream, release)(
            model, sd, torch.float32, base_dtype=torch.float32, transformer_load_device=device,
            block_swap_args=None, compile_args=None)
    finally:
        rw.KEEPING.reset(token)
    after = mapped_kib()  # before the checks below read the values again
    out[label] = {
        "peak": max(samples), "after": after, "lines": list(lines),
        "device": str(next(model.parameters()).device),
        "values": all(torch.equal(sd[k], saved[k]) for k in saved if not (write and k == WRITTEN)),
        "write_kept": bool(write) and float(sd[WRITTEN][0, 0]) == 1.5,
        "read_again": mapped_kib(),
    }
    del sd, model

meta, cpu = torch.device("meta"), torch.device("cpu")
case("kept", True, meta)
case("offloaded", False, meta)  # the sampler's force_offload on: the next job reads the file
case("on_host", True, cpu)  # the parameters are the file's pages themselves
case("setting_keep", True, meta, release=False)
case("written", True, meta, write=True)

# KEEPING as the wrapper of WanVideoSampler.process sets it, on upstream's own signature
seen = []
def stand_in(*a, **k):
    seen.append(rw.KEEPING.get())
stand_in.__signature__ = inspect.signature(base.process)
params = list(inspect.signature(base.process).parameters.values())[1:]
required = {p.name: None for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
wrapped = rw.keeping(stand_in)
wrapped(object(), **required, force_offload=False)
wrapped(object(), **required, force_offload=True)
wrapped(object(), **required)
wrapped(object())  # arguments upstream would refuse: nothing kept
out["keeping"] = seen
out["keeping_after"] = rw.KEEPING.get()
out["patched_off"] = rw.patch({"WanVideoSamplerv2": node}, release_pages=False)
out["process_wrapped_off"] = getattr(base.process, rw.WRAPPED, False)
module.load_weights = upstream
out["patched"] = rw.patch({"WanVideoSamplerv2": node})
out["process_wrapped"] = getattr(base.process, rw.WRAPPED, False)
out["setting"] = [rw.releases_pages(e) for e in ({}, {"XICON_RESIDENT_PAGES": "keep"})]
print(json.dumps(out))
"""
)


def test_the_model_files_pages_leave_once_the_weights_are_kept_off_the_host(
    stack: Stack, tmp_path: Path
) -> None:
    out = stack_json(stack, PAGES_SCRIPT, EXT, tmp_path, cwd=stack.comfy_dir)

    assert out["digest_ok"]
    whole = out["file_kib"]  # 8 MiB of weights, 8.1 MiB with the small ones
    assert whole > 8 * 1024
    kept = out["kept"]
    # each tensor's pages left as the next was read: never much more than two 1-MiB weights
    # resident (the kernel maps up to 64 KiB around a faulting page), none once the load ended
    assert kept["peak"] < 2.5 * 1024, kept
    assert kept["after"] == 0, kept
    assert kept["values"] and kept["device"] == "meta"
    assert kept["read_again"] >= 8 * 1024  # read again: the same bytes, mapped in from the file
    assert len(kept["lines"]) == 1 and "taken out of ComfyUI's resident set" in kept["lines"][0]
    assert "1 model file(s)" in kept["lines"][0] and "went to meta" in kept["lines"][0]
    for label in ("offloaded", "on_host", "setting_keep"):
        case = out[label]
        assert case["peak"] >= 8 * 1024 and case["after"] >= 8 * 1024, (label, case)
        assert case["values"] and not case["lines"], (label, case)
    assert out["on_host"]["device"] == "cpu"
    written = out["written"]
    assert written["after"] >= 8 * 1024 and written["values"] and written["write_kept"], written
    assert written["lines"] == [
        "xicon_resident_weights: the model file's pages stay mapped: "
        "the process wrote 4 KiB of the mapped file"
    ]

    assert out["keeping"] == [True, False, False, False] and out["keeping_after"] is False
    assert out["patched_off"].endswith("the model file's pages stay mapped (XICON_RESIDENT_PAGES)")
    assert not out["process_wrapped_off"]
    assert out["patched"].endswith(
        "the model file's pages leave ComfyUI's memory once it is kept off the host"
    )
    assert out["process_wrapped"]
    assert out["setting"] == [True, False]


PATCH: dict[tuple[str, str], Any] = {
    ("22", "attention_mode"): "sdpa",
    ("362", "render_device"): "cpu",
    ("203", "value"): 128,
    ("204", "value"): 128,
    ("205", "value"): 64,
    ("206", "value"): 64,
    ("349", "steps"): 1,
    ("130", "frame_load_cap"): 5,
}


def job(seed: int, force_offload: bool, label: str) -> dict[str, Any]:
    """The shipped graph (CPU profile, 5 frames of 128x128, one step) with the sampler's latents
    saved as ``latents/<label>``."""
    graph = cpu_graph(json.loads(GRAPH.read_text(encoding="utf-8")))
    for (node, name), value in PATCH.items():
        graph[node]["inputs"][name] = value
    graph["348"]["inputs"].update(seed=seed, force_offload=force_offload)
    graph["139"]["inputs"]["filename_prefix"] = f"video_{label}"
    graph["9001"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["348", 0], "filename_prefix": f"latents/{label}"},
    }
    return graph


def serve(
    stack: Stack, realstack_base: Path, media: tuple[Path, Path], folder: Path, setting: str | None
) -> dict[str, Any]:
    base = make_base(stack, folder / "comfy")
    (base / "models").symlink_to(realstack_base / "models")
    cache = Path("custom_nodes", PACK, "text_embed_cache")  # the prompts' encodings (tiny T5)
    (base / cache).symlink_to(realstack_base / cache)
    place_graph_inputs(base, *media)
    log = folder / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k != "XICON_RESIDENT_WEIGHTS"}
    if setting is not None:
        env["XICON_RESIDENT_WEIGHTS"] = setting
    jobs = [(1, False, "j1"), (2, False, "j2")]
    if setting is None:  # then: offloaded at the end of j3, so j4 must load again
        jobs += [(3, True, "j3"), (4, False, "j4")]
    entries = {}
    with cpu_comfy(stack, base, log, env) as (url, _):
        for seed, offload, label in jobs:
            entries[label] = run_prompt(url, job(seed, offload, label), timeout_s=600)
    latents = base / "output" / "latents"
    return {
        "entries": entries,
        "log": log.read_text(errors="replace"),
        "latents": {label: sorted(latents.glob(f"{label}_*.latent")) for *_, label in jobs},
    }


def test_comfyui_keeps_a_resident_transformer(
    stack: Stack, realstack_base: Path, realstack_media: tuple[Path, Path], tmp_path: Path
) -> None:
    on = serve(stack, realstack_base, realstack_media, tmp_path / "on", None)
    off = serve(stack, realstack_base, realstack_media, tmp_path / "off", "off")
    for served in (on, off):
        for label, entry in served["entries"].items():
            status = entry.get("status", {}).get("status_str")
            assert status == "success", (label, served["log"][-3000:])
    assert (
        "xicon_resident_weights: a transformer left on its device by the sampler is not loaded "
        "again" in on["log"]
    ), on["log"][-3000:]
    assert "the model file's pages leave ComfyUI's memory once it is kept off the host" in on["log"]
    # on the CPU the parameters are the mapped file's pages themselves: none are given back
    assert "taken out of ComfyUI's resident set" not in on["log"]
    assert "xicon_resident_weights: off (XICON_RESIDENT_WEIGHTS)" in off["log"]
    # on: j1 loads, j2 and j3 find it resident, j3 offloads it, j4 loads again
    assert on["log"].count(UPSTREAM_LOAD) == 2, on["log"][-3000:]
    assert on["log"].count(SKIPPED) == 2
    # off: upstream loads on every run, the resident transformer included
    assert off["log"].count(UPSTREAM_LOAD) == 2 and SKIPPED not in off["log"]
    for label in ("j1", "j2"):
        a, b = on["latents"][label], off["latents"][label]
        assert len(a) == len(b) == 1, (label, a, b)
        assert same_latents(stack, a[0], b[0]), label
    assert not same_latents(stack, on["latents"]["j1"][0], on["latents"]["j2"][0])


def same_latents(stack: Stack, a: Path, b: Path) -> bool:
    """The two latent files hold equal tensors (their metadata, the prompt, may differ)."""
    script = (
        "import json, sys, torch; from safetensors.torch import load_file; "
        "a, b = (load_file(p) for p in sys.argv[1:]); "
        "print(json.dumps(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)))"
    )
    return stack_json(stack, script, a, b, timeout_s=120) is True
