"""The Wan VAE that ``WanVideoVAELoader`` loads, with its weights in channels-last memory and its
memory-bound steps streamlined; the decode and the encode are the same operations on another
memory layout.

Why: the Wan 2.1 VAE decode (node 28, ``WanVideoDecode``) is a chain of 3-D convolutions over the
whole clip, one latent frame at a time. With the weights in PyTorch's default layout cuDNN runs
them in NCDHW; with the weights in ``channels_last_3d`` it picks its NDHWC kernels (a
convolution's output follows its weight's layout, so the activations follow), which on an H100
decoded 10-11 % faster alone and peaked 0.5-0.8 GiB lower (``bench/vae_decode.py``), and took
node 28 from 1.65 to 1.53 s in a warm 81-frame job, 27.9 to 25.1 s at 60 s. The frames differ
from the default layout's only by the order of the same bf16 operations: at most 0.063, on
average 0.001-0.006, on [-1, 1] there; in float32 on the CPU within 1e-4. The encode (the pose
and reference embeds, node 324) gains the same way: 0.727 to 0.629 s alone at 61 latent frames.

What: ``WanVideoVAELoader.loadmodel`` (``nodes_model_loading.py``, pinned commit) is wrapped: the
VAE it returns has every 5-D weight of its decoder and encoder (and of ``conv2`` and ``conv1``,
the latent projections beside them) made ``channels_last_3d`` and every 4-D one
``channels_last``, in place, once per load (ComfyUI keeps the loaded VAE for later jobs). Moving
the VAE between devices keeps the layout (``Module.to`` preserves a dense tensor's memory
format). The converted parts also get ``decoder_ops.py``'s steps (the spatial padding inside
each convolution, the RMS norm in one kernel, the nearest upsample in bf16): on an H100 held to
32 GB the decode of a 60-s job 24.4 to 19.8 s and its pose embeds 5.3 to 3.9 s, with both
(``bench/results/gpu_h100_batch_ops``).

Installed once, before ComfyUI runs its first prompt, and only when ``loadmodel`` still has the
source this was written against (``UPSTREAM_SHA256``); otherwise nothing changes and the reason
is logged. ``XICON_VAE_CHANNELS_LAST``: ``off`` leaves the VAE as upstream's, ``decoder`` converts
the decoder only; ``XICON_VAE_OPS=off`` keeps upstream's steps on the converted parts;
``XICON_VAE_KERNELS=off`` keeps the streamlined steps without ``decoder_ops.py``'s CUDA kernels
(the RMS norm and its SiLU in one Triton kernel, the 96-channel convolutions stacked).
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
KERNELS_ENV = "XICON_VAE_KERNELS"
OFF = {"0", "off", "false", "no"}
NODE = "WanVideoVAELoader"
# sha256 of inspect.getsource(WanVideoVAELoader.loadmodel) at ComfyUI-WanVideoWrapper
# 088128b224242e110d3906c6750e9a3a348a659b's nodes_model_loading.py.
UPSTREAM_SHA256 = "cbec2605e9af21cd86072ee9838471a346155be1938fc284eb155ac2d8849f2e"
WRAPPED = "_xicon_vae_channels_last"
DECODER = ("decoder", "conv2")  # the parts of ``WanVideoVAE.model`` the decode runs
ENCODER = ("encoder", "conv1")  # the parts the encode runs


def chosen_parts(env: Mapping[str, str]) -> tuple[str, ...]:
    """The parts ``ENV`` asks for: none for ``0``/``off``/``false``/``no``, the decoder's for
    ``decoder``, the decoder's and the encoder's otherwise (the default, ``all``)."""
    value = env.get(ENV, "").strip().lower()
    if value in OFF:
        return ()
    return DECODER if value == "decoder" else DECODER + ENCODER


def described(parts: tuple[str, ...]) -> str:
    if "encoder" not in parts:
        return "decoder's"
    return "decoder's and encoder's" if "decoder" in parts else "encoder's"


def ops_chosen(env: Mapping[str, str]) -> bool:
    """Whether the converted parts also get ``decoder_ops.py``'s steps: unless ``OPS_ENV`` is
    ``0``/``off``/``false``/``no``."""
    return env.get(OPS_ENV, "").strip().lower() not in OFF


def kernels_chosen(env: Mapping[str, str]) -> bool:
    """Whether the streamlined parts also get ``decoder_ops.py``'s CUDA kernels (the norm and
    its SiLU in one, the 96-channel convolutions stacked): unless ``KERNELS_ENV`` is
    ``0``/``off``/``false``/``no``."""
    return env.get(KERNELS_ENV, "").strip().lower() not in OFF


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


def streamline(vae: Any, parts: tuple[str, ...] = DECODER, kernels: bool = False) -> str:
    """``parts`` of ``vae.model`` given ``decoder_ops.py``'s steps (and its CUDA kernels, with
    ``kernels``), in place; what was done."""
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
    counts = dict.fromkeys((*ops.CLASSES, "SiLU", "stacked", "room", "bias", "interleaved"), 0)
    for name in parts:
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Module):
            for layer, n in ops.streamline(part, classes, kernels).items():
                counts[layer] += n
    line = (
        f"the VAE {described(parts)} steps streamlined: {counts['CausalConv3d']} convolutions "
        f"pad inside, {counts['RMS_norm']} RMS norms in one kernel, {counts['Upsample']} "
        "upsamples in their own type"
    )
    if kernels:
        line += (
            f"; on CUDA {counts['SiLU']} norms with their SiLU in one kernel ({counts['room']} "
            f"leaving room for the next convolution's cached frames, {counts['bias']} adding "
            f"the bias of the convolution before), {counts['stacked']} convolutions stacked as "
            f"one 2-D convolution, {counts['interleaved']} time upsamples interleaving their "
            "frames channels-last"
        )
    return line


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
    original: Callable[..., Any],
    parts: tuple[str, ...] = DECODER,
    ops: bool = False,
    kernels: bool = False,
) -> Callable[..., Any]:
    """``WanVideoVAELoader.loadmodel`` whose VAE comes back with ``parts`` channels-last (and
    streamlined, with ``ops``; with the CUDA kernels too, with ``kernels``)."""

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
                log.info("xicon_vae_channels_last: %s", streamline(result[0], parts, kernels))
        except Exception:  # never break the load: the VAE is then as upstream loaded it
            log.exception("xicon_vae_channels_last: the VAE left as loaded")
        return result

    setattr(loadmodel, WRAPPED, True)
    return loadmodel


def upstream_digest(node_class: type) -> str:
    return hashlib.sha256(inspect.getsource(node_class.loadmodel).encode()).hexdigest()


def patch(
    registry: Mapping[str, Any],
    parts: tuple[str, ...] = DECODER,
    ops: bool = False,
    kernels: bool = False,
) -> str:
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
    node_class.loadmodel = wrap_loader(current, parts, ops, kernels)
    steps = ", its steps streamlined" if ops else f", its steps as upstream's ({OPS_ENV}=off)"
    if ops and not kernels:
        steps += f" without the CUDA kernels ({KERNELS_ENV}=off)"
    return f"{NODE} gives the VAE {described(parts)} weights in channels-last memory{steps}"


def install(executor_class: type, registry: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Patch ``registry``'s ``WanVideoVAELoader`` when ``executor_class`` (ComfyUI's
    ``PromptExecutor``) runs its first prompt; the line to log now."""
    parts = chosen_parts(env)
    if not parts:
        return f"off ({ENV})"
    ops = ops_chosen(env)
    kernels = ops and kernels_chosen(env)
    original = executor_class.execute_async
    if getattr(original, WRAPPED, False):
        return "already installed"
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_vae_channels_last: %s", patch(registry, parts, ops, kernels))
            except Exception:  # never break a prompt: the VAE then loads as upstream ships it
                log.exception("xicon_vae_channels_last: the VAE left as upstream loads it")
        return await original(self, *args, **kwargs)

    setattr(execute_async, WRAPPED, True)
    executor_class.execute_async = execute_async
    return f"{NODE} will be wrapped before the first prompt"
