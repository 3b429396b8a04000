"""The Wan VAE that ``WanVideoVAELoader`` loads, with its decoder's weights in channels-last
memory; the decode is the same operations on another memory layout.

Why: the Wan 2.1 VAE decode (node 28, ``WanVideoDecode``) is a chain of 3-D convolutions over the
whole clip, one latent frame at a time. With the weights in PyTorch's default layout cuDNN runs
them in NCDHW; with the weights in ``channels_last_3d`` it picks its NDHWC kernels (a
convolution's output follows its weight's layout, so the activations follow), which on an H100
decoded 10-11 % faster alone and peaked 0.5-0.8 GiB lower (``bench/vae_decode.py``), and took
node 28 from 1.65 to 1.53 s in a warm 81-frame job, 27.9 to 25.1 s at 60 s. The frames differ
from the default layout's only by the order of the same bf16 operations: at most 0.063, on
average 0.001-0.006, on [-1, 1] there; in float32 on the CPU within 1e-4.

What: ``WanVideoVAELoader.loadmodel`` (``nodes_model_loading.py``, pinned commit) is wrapped: the
VAE it returns has every 5-D weight of its decoder (and of ``conv2``, the latent projection in
front of it) made ``channels_last_3d`` and every 4-D one ``channels_last``, in place, once per
load (ComfyUI keeps the loaded VAE for later jobs). Moving the VAE between devices keeps the
layout (``Module.to`` preserves a dense tensor's memory format). The encoder, which the pose and
reference embeds use, keeps upstream's layout unless ``XICON_VAE_CHANNELS_LAST=all`` (alone on an
H100 its encode took 7-19 % less with it, not yet measured through the worker).

With ``XICON_VAE_OPS=on`` the converted parts also get ``decoder_ops.py``'s steps (the spatial
padding inside each convolution, the RMS norm in one kernel, the nearest upsample in bf16); off
by default until their time is measured on a GPU (on a 2-core CPU in bf16 a decode took 17 %
longer with them, ``bench/results/cpu_batch_ops``; the CPU's kernels are not the GPU's).

Installed once, before ComfyUI runs its first prompt, and only when ``loadmodel`` still has the
source this was written against (``UPSTREAM_SHA256``); otherwise nothing changes and the reason
is logged. ``XICON_VAE_CHANNELS_LAST=off`` turns it off; ``all`` adds the encoder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import logging
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("xicon_vae_channels_last")

ENV = "XICON_VAE_CHANNELS_LAST"
OPS_ENV = "XICON_VAE_OPS"
OFF = {"0", "off", "false", "no"}
NODE = "WanVideoVAELoader"
# sha256 of inspect.getsource(WanVideoVAELoader.loadmodel) at ComfyUI-WanVideoWrapper
# 088128b224242e110d3906c6750e9a3a348a659b's nodes_model_loading.py.
UPSTREAM_SHA256 = "cbec2605e9af21cd86072ee9838471a346155be1938fc284eb155ac2d8849f2e"
WRAPPED = "_xicon_vae_channels_last"
DECODER = ("decoder", "conv2")  # the parts of ``WanVideoVAE.model`` the decode runs
ENCODER = ("encoder", "conv1")  # the parts the encode runs


def chosen_parts(env: Mapping[str, str]) -> tuple[str, ...]:
    """The parts ``ENV`` asks for: none for ``0``/``off``/``false``/``no``, the decoder's and the
    encoder's for ``all``, the decoder's otherwise (the default)."""
    value = env.get(ENV, "").strip().lower()
    if value in OFF:
        return ()
    return DECODER + ENCODER if value == "all" else DECODER


def described(parts: tuple[str, ...]) -> str:
    if "encoder" not in parts:
        return "decoder's"
    return "decoder's and encoder's" if "decoder" in parts else "encoder's"


def ops_chosen(env: Mapping[str, str]) -> bool:
    """Whether the converted parts also get ``decoder_ops.py``'s steps: only when ``OPS_ENV``
    is on (their time on a GPU is not measured yet)."""
    return env.get(OPS_ENV, "").strip().lower() in {"1", "on", "true", "yes"}


def decoder_ops() -> types.ModuleType:
    """``decoder_ops.py`` beside this file, loaded once."""
    name = "xicon_vae_decoder_ops"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).resolve().with_name("decoder_ops.py")
        )
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def streamline(vae: Any, parts: tuple[str, ...] = DECODER) -> str:
    """``parts`` of ``vae.model`` given ``decoder_ops.py``'s steps, in place; what was done."""
    ops = decoder_ops()
    model = getattr(vae, "model", None)
    classes = ops.upstream_classes(model) if isinstance(model, torch.nn.Module) else None
    if classes is None:
        return "not the Wan VAE this was written for; its steps left as they are"
    digest = ops.upstream_digest(classes)
    if digest != ops.UPSTREAM_SHA256:
        return (
            f"the VAE's layers changed upstream (sha256 {digest[:12]}, expected "
            f"{ops.UPSTREAM_SHA256[:12]}); their steps left as they are"
        )
    counts = dict.fromkeys(ops.CLASSES, 0)
    for name in parts:
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Module):
            for layer, n in ops.streamline(part, classes).items():
                counts[layer] += n
    return (
        f"the VAE {described(parts)} steps streamlined: {counts['CausalConv3d']} convolutions "
        f"pad inside, {counts['RMS_norm']} RMS norms in one kernel, {counts['Upsample']} "
        "upsamples in their own type"
    )


def channels_last(module: torch.nn.Module) -> int:
    """Every 5-D and 4-D parameter of ``module`` in channels-last memory; how many changed."""
    changed = 0
    for p in module.parameters():
        if p.dim() not in (4, 5):
            continue
        fmt = torch.channels_last_3d if p.dim() == 5 else torch.channels_last
        moved = p.data.contiguous(memory_format=fmt)
        if moved.stride() != p.data.stride():  # a weight with unit dimensions may be both already
            p.data = moved
            changed += 1
    return changed


def convert(vae: Any, parts: tuple[str, ...] = DECODER) -> int:
    """``parts`` of ``vae.model`` in channels-last memory, in place; how many weights changed
    (0 when ``vae`` is not the Wan VAE this was written for)."""
    model = getattr(vae, "model", None)
    changed = 0
    for name in parts:
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Module):
            changed += channels_last(part)
    return changed


def wrap_loader(
    original: Callable[..., Any], parts: tuple[str, ...] = DECODER, ops: bool = False
) -> Callable[..., Any]:
    """``WanVideoVAELoader.loadmodel`` whose VAE comes back with ``parts`` channels-last (and
    streamlined, with ``ops``)."""

    @functools.wraps(original)
    def loadmodel(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            changed = convert(result[0], parts)
            log.info(
                "xicon_vae_channels_last: the VAE %s weights in channels-last memory (%d tensors)",
                described(parts),
                changed,
            )
            if ops:
                log.info("xicon_vae_channels_last: %s", streamline(result[0], parts))
        except Exception:  # never break the load: the VAE is then as upstream loaded it
            log.exception("xicon_vae_channels_last: the VAE left as loaded")
        return result

    setattr(loadmodel, WRAPPED, True)
    return loadmodel


def upstream_digest(node_class: type) -> str:
    return hashlib.sha256(inspect.getsource(node_class.loadmodel).encode()).hexdigest()


def patch(registry: Mapping[str, Any], parts: tuple[str, ...] = DECODER, ops: bool = False) -> str:
    """Wrap ``registry[NODE].loadmodel`` to convert ``parts``; the line to log."""
    node_class = registry.get(NODE)
    if node_class is None:
        return f"{NODE} not loaded; nothing to do"
    current = getattr(node_class, "loadmodel", None)
    if current is None or getattr(current, WRAPPED, False):
        return f"{NODE}.loadmodel already wrapped or missing; nothing to do"
    try:
        digest = upstream_digest(node_class)
    except (OSError, TypeError):
        return f"{NODE}.loadmodel's source cannot be read; the VAE left as upstream loads it"
    if digest != UPSTREAM_SHA256:
        return (
            f"{NODE}.loadmodel changed upstream (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); the VAE left as upstream loads it"
        )
    node_class.loadmodel = wrap_loader(current, parts, ops)
    steps = f", its steps streamlined ({OPS_ENV}=on)" if ops else ""
    return f"{NODE} gives the VAE {described(parts)} weights in channels-last memory{steps}"


def install(executor_class: type, registry: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Patch ``registry``'s ``WanVideoVAELoader`` when ``executor_class`` (ComfyUI's
    ``PromptExecutor``) runs its first prompt; the line to log now."""
    parts = chosen_parts(env)
    if not parts:
        return f"off ({ENV})"
    ops = ops_chosen(env)
    original = executor_class.execute_async
    if getattr(original, WRAPPED, False):
        return "already installed"
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_vae_channels_last: %s", patch(registry, parts, ops))
            except Exception:  # never break a prompt: the VAE then loads as upstream ships it
                log.exception("xicon_vae_channels_last: the VAE left as upstream loads it")
        return await original(self, *args, **kwargs)

    setattr(execute_async, WRAPPED, True)
    executor_class.execute_async = execute_async
    return f"{NODE} will be wrapped before the first prompt"
