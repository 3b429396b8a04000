"""WanVideoWrapper's ``CustomLinear.forward`` with its compute weight made in one pass
(``weight_kernel.compute_weight``) instead of one PyTorch kernel per step.

Why: with the shipped graph (an fp8-scaled SCAIL-14B and the lightx2v LoRA left unmerged, as a
32-GB card needs: merged, the weights would be bf16) every linear of the transformer converts its
fp8 weight to bf16, scales it and adds the LoRA's product on every call, in separate passes over
the weight: at most 175 ms of each 2,260-ms forward on an H200, once per context window and
sampler step (``weight_kernel``'s docstring has the profile).

What: ``CustomLinear.forward`` (its module's pinned source, ``UPSTREAM_SHA256``) is replaced by
``forward``, which runs upstream's own steps in the same order with the same values: the bias
converted, the scale given to the input when the weight is the larger (upstream's test), each
LoRA's strength read by upstream's ``_get_lora_strength`` (scheduled strengths included) and its
product by ``torch.mm`` as upstream's ``apply_lora`` makes it, then ``compute_weight`` makes the
weight upstream's expressions make, bit for bit, and upstream's ``_linear_forward_impl`` runs
the linear. Only where the kernel applies (``fusable``): a CUDA input of a compute type, the
weight on its device in a stored type the kernel reads, a one-value scale and LoRA tensors of the
input's type, no GGUF; any other call is upstream's ``forward``, and so is every call after the
kernel once failed (the reason logged once).

Installed before ComfyUI's first prompt, only when ``custom_linear.py`` still has the source this
was written against; otherwise nothing changes and the reason is logged.
``XICON_LINEAR_WEIGHTS=off`` leaves upstream's ``forward``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("xicon_linear_weights")

ENV = "XICON_LINEAR_WEIGHTS"
OFF = {"0", "off", "false", "no"}
NODE = "WanVideoSamplerv2"
# sha256 of inspect.getsource(the custom_linear module) at ComfyUI-WanVideoWrapper
# 088128b224242e110d3906c6750e9a3a348a659b's custom_linear.py.
UPSTREAM_SHA256 = "6841721813b89869e7dae8488b9fee7b9dd607aa6d6614c79b19079a8bd8ec59"
REPLACED = "_xicon_linear_weights"
FAILED: list[str] = []  # the kernel's failure (its compile, its launch), once: then upstream's


def _sibling(name: str) -> Any:
    module_name = f"xicon_linear_weights_{name}"
    module = sys.modules.get(module_name)
    if module is None:
        path = Path(__file__).resolve().with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module


weight_kernel = _sibling("weight_kernel")


def lora_patches(layer: Any, shape: torch.Size) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each LoRA of ``layer`` as (its weight-shaped product, its strength times alpha), made as
    upstream's ``_get_weight_with_lora`` and ``apply_lora`` make them; [] without LoRA buffers
    (upstream's test), None when one is not a tensor pair or single diff."""
    if not hasattr(layer, "lora_diff_0_0"):
        return []
    patches = []
    for idx, names in enumerate(layer.lora_diffs):
        strength = layer._get_lora_strength(idx)
        if isinstance(names, tuple):
            up, down = getattr(layer, names[0]), getattr(layer, names[1])
            diff_2 = getattr(layer, names[2])
            diff_2 = float(diff_2) if diff_2 is not None else 0.0
            alpha = diff_2 / down.shape[0] if diff_2 != 0.0 else 1.0
            product = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))
            patches.append((product.reshape(shape), strength * alpha))
        elif isinstance(names, str):
            patches.append((getattr(layer, names), strength))
        else:
            return None
    return patches


def _one_value(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.numel() == 1 and t.device == like.device


def fusable(layer: Any, input: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether ``compute_weight`` can make ``layer``'s weight for ``input``, as far as is known
    before the LoRAs' products are made (see the module's docstring); ``scale`` is the weight's
    scale when upstream gives it to the weight."""
    weight = layer.weight
    return (
        not FAILED
        and not layer.is_gguf
        and input.dtype in weight_kernel.ROUNDING
        and weight_kernel.runs_on(input)
        and weight.device == input.device
        and weight.dtype in weight_kernel.STORED
        and weight.is_contiguous()
        and (scale is None or _one_value(scale, weight, input.dtype))
    )


def patches_fit(
    layer: Any,
    input: torch.Tensor,
    scale: torch.Tensor | None,
    patches: list[tuple[torch.Tensor, torch.Tensor]],
) -> bool:
    """Whether the kernel takes ``patches`` (``lora_patches``) for a ``fusable`` call: something
    to do besides the conversion, each product of the weight's shape and ``input``'s type, each
    strength one value of that type."""
    weight = layer.weight
    return (scale is not None or bool(patches)) and all(
        p.dtype == input.dtype
        and p.shape == weight.shape
        and p.is_contiguous()
        and _one_value(s, weight, input.dtype)
        for p, s in patches
    )


def replace(original: Callable[..., Any]) -> Callable[..., Any]:
    """``CustomLinear.forward`` with its weight made by ``compute_weight`` where ``fusable``."""

    @functools.wraps(original)
    def forward(self: Any, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        scale = None
        if self.scale_weight is not None and weight.numel() < input.numel():
            scale = self.scale_weight
        if not fusable(self, input, scale):  # before the products: none made for upstream's
            return original(self, input)
        patches = lora_patches(self, weight.shape)
        if patches is None or not patches_fit(self, input, scale, patches):
            return original(self, input)
        try:
            made = weight_kernel.compute_weight(weight, input.dtype, scale, patches)
        except Exception as error:  # a kernel that cannot run must not fail the job
            FAILED.append(repr(error))
            log.warning(
                "xicon_linear_weights: the one-pass weight failed (%r); upstream's forward "
                "from now on",
                error,
            )
            return original(self, input)
        bias = self.bias.to(input) if self.bias is not None else None
        if self.scale_weight is not None and scale is None:
            input = input * self.scale_weight
        return self._linear_forward_impl(input, made, bias)

    setattr(forward, REPLACED, True)
    return forward


def upstream_digest(module: Any) -> str:
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()


def linear_module(registry: Mapping[str, Any]) -> Any:
    """WanVideoWrapper's ``custom_linear`` module, from the sampler's own imports (None when
    the sampler or the module is not loaded)."""
    node_class = registry.get(NODE)
    if node_class is None:
        return None
    sampler = sys.modules.get(node_class.__module__)
    replace_linear = getattr(sampler, "_replace_linear", None)
    name = getattr(replace_linear, "__module__", None)
    return sys.modules.get(name) if name else None


def patch(registry: Mapping[str, Any]) -> str:
    """Replace ``CustomLinear.forward``; the line to log."""
    module = linear_module(registry)
    layer_class = getattr(module, "CustomLinear", None)
    if layer_class is None:
        return "WanVideoWrapper's CustomLinear not loaded; nothing to do"
    current = layer_class.forward
    if getattr(current, REPLACED, False):
        return "CustomLinear.forward already replaced; nothing to do"
    if weight_kernel.triton is None:
        return "no Triton; CustomLinear left as upstream's"
    try:
        digest = upstream_digest(module)
    except (OSError, TypeError):
        return "custom_linear.py's source cannot be read; CustomLinear left as upstream's"
    if digest != UPSTREAM_SHA256:
        return (
            f"custom_linear.py changed upstream (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); CustomLinear left as upstream's"
        )
    layer_class.forward = replace(current)
    return "CustomLinear makes its weight in one pass (the stored weight, its scale and LoRAs)"


def enabled(env: Mapping[str, str]) -> bool:
    """Unless ``ENV`` is ``0``/``off``/``false``/``no``."""
    return env.get(ENV, "").strip().lower() not in OFF


def install(executor_class: type, registry: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Patch WanVideoWrapper's ``CustomLinear`` when ``executor_class`` (ComfyUI's
    ``PromptExecutor``) runs its first prompt; the line to log now."""
    if not enabled(env):
        return f"off ({ENV})"
    original = executor_class.execute_async
    if getattr(original, REPLACED, False):
        return "already installed"
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_linear_weights: %s", patch(registry))
            except Exception:  # never break a prompt: the layers then run as upstream's
                log.exception("xicon_linear_weights: CustomLinear left as upstream's")
        return await original(self, *args, **kwargs)

    setattr(execute_async, REPLACED, True)
    executor_class.execute_async = execute_async
    return "CustomLinear will be patched before the first prompt"
