"""A transformer that the sampler left on the GPU is not loaded onto it again.

Why: WanVideoWrapper's sampler (``nodes_sampler.py`` ~L124-126, pinned commit) calls
``load_weights`` (``nodes_model_loading.py`` ~L807-933) on every run. That function walks
``transformer.named_parameters()`` and gives every parameter a new tensor made from the model
file's state dict on the load device. With ``force_offload`` on (the node's default) the previous
run left every parameter on the ``meta`` device, so this costs the copy only (15.9 GB for SCAIL-14B
in fp8: 2.1-2.5 s a job on an H200). With ``force_offload`` off the transformer is still on the
GPU, and the walk keeps every old parameter alive until it ends (``named_parameters`` holds each
parameter it has yielded in its ``memo`` set), so the GPU holds two copies of the weights near the
end of the walk: the second job ran out of memory at 33,225 MiB on a card held to 31.5 GiB.

What: ``load_weights`` as the sampler's module sees it is wrapped. After a load that this can
vouch for (not GGUF, no block swap) the wrapper notes, on the transformer, the state dict, the
dtypes and device it was loaded with, and each parameter's device, dtype, shape, storage address
and version counter (which in-place writes advance; tensors made in inference mode, as ComfyUI
runs nodes, have none). The next call with the same state dict, dtypes
and device, on a transformer whose parameters all still match that note, returns at once: the
weights are already where and what the load would make them. Anything else (the parameters moved
to ``meta`` by ``force_offload``, another device or dtype, another state dict, a GGUF or block-swap
load) runs upstream's load as it is. LoRA weights are not parameters (``custom_linear.py``
registers them as buffers) and the sampler sets them again after this call on every run, as
before.

Installed once, before ComfyUI runs its first prompt (custom nodes load in no fixed order, so the
sampler's class is looked up in ComfyUI's node registry then), and only when ``load_weights`` and
``WanVideoSampler.process`` still have the source this was written against (``UPSTREAM_SHA256``);
otherwise nothing changes and the reason is logged. ``XICON_RESIDENT_WEIGHTS=off`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("xicon_resident_weights")

ENV = "XICON_RESIDENT_WEIGHTS"
NODE = "WanVideoSamplerv2"
# sha256 of inspect.getsource(load_weights) + inspect.getsource(WanVideoSampler.process) at
# ComfyUI-WanVideoWrapper 088128b224242e110d3906c6750e9a3a348a659b.
UPSTREAM_SHA256 = "dabf8dc177f5c026bd8020f43a84ec9b538462fd947d0fe3d47d2dae196f5f21"
WRAPPED = "_xicon_resident_weights"
NOTE = "_xicon_resident_note"
SKIPPED = ("loras", "uni3c")  # parameters upstream's load_weights leaves alone


def enabled(env: Mapping[str, str]) -> bool:
    """False when ``ENV`` is ``0``/``off``/``false``/``no``; True otherwise (the default)."""
    return env.get(ENV, "").strip().lower() not in {"0", "off", "false", "no"}


def fingerprint(transformer: Any) -> tuple[tuple[Any, ...], ...]:
    """Every loaded parameter's name, device, dtype, shape, storage address and version (names
    as upstream's loader reads them: ``torch.compile``'s ``_orig_mod.`` left out)."""
    return tuple(
        (
            name.replace("_orig_mod.", ""),
            str(p.device),
            p.dtype,
            tuple(p.shape),
            p.data_ptr(),
            version(p),
        )
        for name, p in transformer.named_parameters()
        if not any(word in name for word in SKIPPED)
    )


def version(tensor: Any) -> int | None:
    """The tensor's version counter; None for a tensor made in inference mode (ComfyUI runs
    nodes in it), which has none: then only its storage address and the rest are compared."""
    return None if tensor.is_inference() else tensor._version


@dataclass(frozen=True)
class Note:
    """What the last load left: its state dict (the object), its settings, the parameters."""

    sd: Any
    settings: tuple[str, ...]
    params: tuple[tuple[Any, ...], ...]

    def still(self, sd: Any, settings: tuple[str, ...], transformer: Any) -> bool:
        return (
            sd is self.sd and settings == self.settings and fingerprint(transformer) == self.params
        )


def resident_loading(load_weights: Callable[..., Any]) -> Callable[..., Any]:
    """``load_weights`` that returns at once when the transformer still holds what the last
    load it made gave it (module doc); upstream's otherwise."""

    @functools.wraps(load_weights)
    def wrapped(
        transformer: Any, sd: Any = None, weight_dtype: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        plain = (
            sd is not None
            and not args
            and not kwargs.get("gguf", False)
            and kwargs.get("block_swap_args") is None
            and kwargs.get("reader") is None
        )
        settings = (
            str(weight_dtype),
            str(kwargs.get("base_dtype")),
            str(kwargs.get("transformer_load_device")),
        )
        try:
            note = getattr(transformer, NOTE, None)
            kept = plain and isinstance(note, Note) and note.still(sd, settings, transformer)
        except Exception:  # never break a job: upstream's load then runs as it would
            log.exception("xicon_resident_weights: the transformer's weights are loaded again")
            kept = False
        if kept:
            log.info(
                "xicon_resident_weights: the transformer's %d parameters are on %s as the "
                "last load left them; not loaded again",
                len(note.params),
                settings[2],
            )
            return None
        setattr(transformer, NOTE, None)
        result = load_weights(transformer, sd, weight_dtype, *args, **kwargs)
        if plain:
            try:
                setattr(transformer, NOTE, Note(sd, settings, fingerprint(transformer)))
            except Exception:
                log.exception("xicon_resident_weights: the next run loads the weights again")
        return result

    setattr(wrapped, WRAPPED, True)
    return wrapped


def upstream_digest(load_weights: Callable[..., Any], sampler_class: type) -> str:
    source = inspect.getsource(load_weights) + inspect.getsource(sampler_class.process)
    return hashlib.sha256(source.encode()).hexdigest()


def sampler_base(node_class: type) -> type | None:
    """``WanVideoSampler``: the class in ``node_class``'s MRO that defines the sampling."""
    return next((c for c in node_class.__mro__ if c.__name__ == "WanVideoSampler"), None)


def patch(registry: Mapping[str, Any]) -> str:
    """Wrap ``load_weights`` in the sampler's module; the line to log."""
    node_class = registry.get(NODE)
    if node_class is None:
        return f"{NODE} not loaded; nothing to do"
    base = sampler_base(node_class)
    module = sys.modules.get(base.__module__) if base is not None else None
    current = getattr(module, "load_weights", None)
    if base is None or module is None or not callable(current):
        return f"{NODE}'s sampler module or its load_weights not found; loading left as it is"
    if getattr(current, WRAPPED, False):
        return "load_weights already wrapped; nothing to do"
    try:
        digest = upstream_digest(current, base)
    except (OSError, TypeError):
        return "load_weights' source cannot be read; loading left as it is"
    if digest != UPSTREAM_SHA256:
        return (
            f"load_weights or WanVideoSampler.process changed upstream (sha256 {digest[:12]}, "
            f"expected {UPSTREAM_SHA256[:12]}); loading left as it is"
        )
    module.load_weights = resident_loading(current)
    return "a transformer left on its device by the sampler is not loaded again"


def install(executor_class: type, registry: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Patch the sampler's ``load_weights`` when ``executor_class`` (ComfyUI's
    ``PromptExecutor``) runs its first prompt; the line to log now."""
    if not enabled(env):
        return f"off ({ENV})"
    original = executor_class.execute_async
    if getattr(original, WRAPPED, False):
        return "already installed"
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_resident_weights: %s", patch(registry))
            except Exception:  # never break a prompt: the sampler then loads as upstream does
                log.exception("xicon_resident_weights: loading left as it is")
        return await original(self, *args, **kwargs)

    setattr(execute_async, WRAPPED, True)
    executor_class.execute_async = execute_async
    return f"{NODE}'s weight loading will be wrapped before the first prompt"
