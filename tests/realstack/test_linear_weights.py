"""The project's extension ``xicon_linear_weights`` against the pinned WanVideoWrapper's own
``custom_linear`` module (imported from the pack, its custom ops registered), with the stack's
torch and Triton's CPU interpreter (``TRITON_INTERPRET=1``: the kernel's own code runs on the
CPU): the one-pass weight equals upstream's expressions bit for bit for every stored and compute
type, scale and number of LoRAs, special values included; ``CustomLinear`` with the replaced
``forward`` gives upstream's outputs bit for bit, through the kernel where it applies and
through upstream's ``forward`` where it does not (GGUF, an input-side scale without a LoRA, a
scale of another type) or once the kernel failed; the operation's registration passes
``torch.library.opcheck``; the patch is made before the first prompt, only on the pinned source,
and not at all when turned off.
"""

from __future__ import annotations

import os

from tests.plugins.realstack import ROOT, Stack, stack_json

EXT = ROOT / "stack" / "comfy_extension" / "xicon_linear_weights" / "linear_weights.py"

SCRIPT = r"""
import asyncio, importlib, importlib.util, json, sys, types
comfy_dir, ext_file = sys.argv[1:3]
import torch

root = f"{comfy_dir}/custom_nodes/ComfyUI-WanVideoWrapper"
package = types.ModuleType("wvw_pkg")
package.__path__ = [root]
sys.modules["wvw_pkg"] = package
custom_linear = importlib.import_module("wvw_pkg.custom_linear")
CustomLinear = custom_linear.CustomLinear
upstream = CustomLinear.forward

spec = importlib.util.spec_from_file_location("linear_weights_under_test", ext_file)
ext = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ext
spec.loader.exec_module(ext)
kernel = ext.weight_kernel
out = {"digest_ok": ext.upstream_digest(custom_linear) == ext.UPSTREAM_SHA256}

def bits(t):  # a 2-byte result's bit patterns, its NaNs (compared by nan_alike) as 0
    return torch.where(t.isnan(), 0, t.view(torch.int16).int())

gen = torch.Generator().manual_seed(3)

def stored(shape, dtype):
    x = torch.randn(shape, generator=gen) * 30
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -0.0, 3e38])
    if dtype.itemsize == 1:  # Triton's interpreter reads fp8's NaN codes as numbers (480 for
        # e4m3fn's), a GPU as NaN: fp8 weights here hold the largest finite values instead
        finite = torch.finfo(dtype).max
        x = x.nan_to_num(nan=finite, posinf=finite, neginf=-finite).clamp(-finite, finite)
    return x.to(dtype)

# the kernel against upstream's expressions (reference): every stored and compute type, with
# and without the scale, zero to two LoRAs; 4096 + 37 elements (a last, partial block)
kernel_rows = {}
for wdt in kernel.STORED:
    for cdt in (torch.bfloat16, torch.float16):
        w = stored((37, 4096 // 37 + 2), wdt).contiguous()
        for scaled in (False, True):
            for count in (0, 1, 2):
                if not scaled and not count:
                    continue
                scale = torch.tensor([0.0213], dtype=cdt) if scaled else None
                patches = [(torch.randn(w.shape, generator=gen).to(cdt),
                            torch.tensor(0.7 - 0.3 * i, dtype=cdt)) for i in range(count)]
                want = kernel.reference(w, cdt, scale, patches)
                got = kernel.compute_weight(w, cdt, scale, patches)
                key = f"{str(wdt)[6:]}>{str(cdt)[6:]}/scale={scaled}/loras={count}"
                kernel_rows[key] = {
                    "equal": bool(torch.equal(bits(got), bits(want))),
                    "nan_alike": bool(torch.equal(got.isnan(), want.isnan())),
                    "dtype": got.dtype == want.dtype and got.shape == want.shape,
                }
out["kernel"] = kernel_rows

# CustomLinear: upstream's forward against the replaced one; which calls ran the kernel
ran = []
compute = kernel.compute_weight
def counted(*args, **kwargs):
    ran.append(1)
    return compute(*args, **kwargs)
kernel.compute_weight = counted
replaced = ext.replace(upstream)

def layer(out_f=48, in_f=80, scale=torch.bfloat16, loras=1, scheduled=False, single=False,
          dtype=torch.bfloat16, wdtype=torch.float8_e4m3fn):
    l = CustomLinear(in_f, out_f, True, compute_dtype=dtype,
                     scale_weight=None if scale is None else torch.tensor([0.0213], dtype=scale))
    l.weight = torch.nn.Parameter(stored((out_f, in_f), torch.float32).nan_to_num(0.0)
                                  .clamp(-400, 400).to(wdtype), requires_grad=False)
    l.bias = torch.nn.Parameter(torch.randn(out_f, generator=gen).to(dtype), requires_grad=False)
    if single:
        diffs = [(torch.randn(out_f, in_f, generator=gen) * 0.01,)]
    else:
        diffs = [(torch.randn(out_f, 8, generator=gen) * 0.1, torch.randn(8, in_f, generator=gen)
                  * 0.1, 8.0 if i == 0 else 0.0) for i in range(loras)]
    l.set_lora_diffs(diffs)
    l.set_lora_strengths([[1.0, 0.5, 0.25] if scheduled else 0.8] * len(diffs))
    return l

cases = {
    "weight scale, one LoRA": dict(),
    "no scale": dict(scale=None),
    "two LoRAs": dict(loras=2),
    "scheduled strength": dict(scheduled=True),
    "one single diff": dict(single=True),
    "scale only": dict(loras=0),
    "fp16": dict(dtype=torch.float16, scale=torch.float16),
    "bf16 weight": dict(wdtype=torch.bfloat16),
    "float32 scale": dict(scale=torch.float32),
}
layers_out = {}
for name, kwargs in cases.items():
    l = layer(**kwargs)
    dtype = kwargs.get("dtype", torch.bfloat16)
    for tokens in (3, 200):  # 3: upstream scales the input, 200: the weight
        for step in (0, 2):
            custom_linear.update_lora_step(l, step)
            x = torch.randn(tokens, 80, generator=gen).to(dtype)
            ran.clear()
            try:
                want = upstream(l, x)
            except Exception as error:
                want = repr(error)
            try:
                got = replaced(l, x)
            except Exception as error:
                got = repr(error)
            same = (want == got if isinstance(want, str) or isinstance(got, str)
                    else bool(torch.equal(want.view(torch.int16), got.view(torch.int16))))
            layers_out[f"{name}/{tokens}/{step}"] = {"same": same, "kernel": len(ran)}
gguf = layer()
gguf.is_gguf = True
ran.clear()
x = torch.randn(200, 80, generator=gen).to(torch.bfloat16)
try:
    replaced(gguf, x)
except Exception:
    pass
layers_out["gguf"] = {"kernel": len(ran)}
removed = layer()
custom_linear.remove_lora_from_module(removed)
ran.clear()
layers_out["LoRA removed, input scaled"] = {
    "same": bool(torch.equal(upstream(removed, x[:3]), replaced(removed, x[:3]))),
    "kernel": len(ran)}
out["layers"] = layers_out

# a failing kernel: upstream's result, the reason kept, upstream's from then on
kernel.compute_weight = compute
launch = kernel._launch
def broken(*args, **kwargs):
    raise RuntimeError("no kernel for this GPU")
kernel._launch = broken
l = layer()
x = torch.randn(200, 80, generator=gen).to(torch.bfloat16)
first = replaced(l, x)
kernel._launch = launch
out["failed"] = {
    "same": bool(torch.equal(first, upstream(l, x))),
    "reason": list(ext.FAILED),
    "fusable_after": ext.fusable(l, x, l.scale_weight),
}
ext.FAILED.clear()

# the operation's registration (schema, fake tensor, dispatch) as torch checks it
w = stored((16, 24), torch.bfloat16)  # fp8 has no allclose on the CPU, which opcheck uses
opcheck = torch.library.opcheck(
    kernel._op, (w, torch.bfloat16, torch.tensor([0.5], dtype=torch.bfloat16),
                 [torch.randn(16, 24, generator=gen).to(torch.bfloat16)],
                 [torch.tensor(0.25, dtype=torch.bfloat16)]),
    test_utils=("test_schema", "test_faketensor"))
out["opcheck"] = {k: v == "SUCCESS" for k, v in opcheck.items()}

# patch: the sampler's custom_linear found through its own imports; replaced once; a changed
# source and a missing sampler left alone
sampler_module = types.ModuleType("wvw_pkg.nodes_sampler")
sampler_module._replace_linear = custom_linear._replace_linear
sys.modules[sampler_module.__name__] = sampler_module
Sampler = type("WanVideoSamplerv2", (), {"__module__": sampler_module.__name__})
registry = {"WanVideoSamplerv2": Sampler}
digest = ext.UPSTREAM_SHA256
ext.UPSTREAM_SHA256 = "0" * 64
out["changed"] = ext.patch(registry)
out["changed_left"] = CustomLinear.forward is upstream
ext.UPSTREAM_SHA256 = digest
out["missing"] = ext.patch({})

# install: off by the setting; else the patch is made at the first prompt, once
class Executor:
    async def execute_async(self, *a, **k):
        return "ran"
out["off"] = ext.install(Executor, registry, {"XICON_LINEAR_WEIGHTS": " Off "})
out["installed"] = ext.install(Executor, registry, {})
out["again_installed"] = ext.install(Executor, registry, {})
out["before_prompt"] = getattr(CustomLinear.forward, ext.REPLACED, False)
out["first_prompt"] = asyncio.run(Executor().execute_async())
out["after_prompt"] = getattr(CustomLinear.forward, ext.REPLACED, False)
out["again"] = ext.patch(registry)
print(json.dumps(out))
"""


def test_the_one_pass_weight_is_upstreams_bit_for_bit(stack: Stack) -> None:
    out = stack_json(
        stack,
        SCRIPT,
        stack.comfy_dir,
        EXT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"},
    )
    assert out["digest_ok"], "custom_linear.py changed at the pinned commit"
    assert len(out["kernel"]) == 5 * 2 * 5
    for key, row in out["kernel"].items():
        assert row == {"equal": True, "nan_alike": True, "dtype": True}, key
    layers = out["layers"]
    for key, row in layers.items():
        if "same" in row:
            assert row["same"] is True, (key, row)
    # the kernel ran wherever upstream would make the weight in more than a conversion
    for name in ("weight scale, one LoRA", "no scale", "two LoRAs", "scheduled strength"):
        for tokens in (3, 200):
            assert layers[f"{name}/{tokens}/0"]["kernel"] == 1, name
    assert layers["one single diff/200/2"]["kernel"] == 1
    assert layers["fp16/200/0"]["kernel"] == 1 and layers["bf16 weight/200/0"]["kernel"] == 1
    assert layers["scale only/200/0"]["kernel"] == 1  # the weight's scale alone
    # ... and upstream's forward where it does not apply
    assert layers["scale only/3/0"]["kernel"] == 0  # the input scaled, nothing to add
    assert layers["float32 scale/200/0"]["kernel"] == 0  # another type: upstream's promotion
    assert layers["gguf"] == {"kernel": 0}
    assert layers["LoRA removed, input scaled"] == {"same": True, "kernel": 0}
    failed = out["failed"]
    assert failed["same"] is True and failed["fusable_after"] is False
    assert failed["reason"] == ["RuntimeError('no kernel for this GPU')"]
    assert out["opcheck"] == {"test_schema": True, "test_faketensor": True}
    assert "changed upstream" in out["changed"] and out["changed_left"] is True
    assert out["missing"] == "WanVideoWrapper's CustomLinear not loaded; nothing to do"
    assert out["off"] == "off (XICON_LINEAR_WEIGHTS)"
    assert out["installed"] == "CustomLinear will be patched before the first prompt"
    assert out["again_installed"] == "already installed"
    assert not out["before_prompt"] and out["first_prompt"] == "ran" and out["after_prompt"]
    assert out["again"] == "CustomLinear.forward already replaced; nothing to do"
