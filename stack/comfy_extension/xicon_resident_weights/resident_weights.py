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

The model file's pages, once the weights live on the GPU: ComfyUI's loader hands the sampler a
state dict of views of the mapped ``.safetensors`` file (``file_pages.py``), and upstream's load
reads every page of it, so ComfyUI's resident set keeps the whole file (15.9 GB for SCAIL-14B in
fp8) as long as the process lives, though a resident transformer never reads it again. When the
sampler keeps the transformer (its ``force_offload`` off, read by a wrapper of
``WanVideoSampler.process``) and a plain load puts the weights off the host, the state dict
upstream's load reads is a copy of the dict whose reads give back the pages of the tensor read
before (its copy is on the device by then); at the end, the rest of the file's mappings. The pages
stay in the page cache; a load after ``force_offload`` (or any later read) maps them in again, with
the same bytes. A mapping holding a page the process wrote is left alone, and so is every load that
offloads afterwards (it reads the file again on the next job), loads onto the host, or has no
mapped file behind it. ``XICON_RESIDENT_PAGES=keep`` keeps the pages mapped.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import importlib.util
import inspect
import logging
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
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
PAGES_ENV = "XICON_RESIDENT_PAGES"
# True while WanVideoSampler.process runs with force_offload off: the transformer stays
KEEPING: contextvars.ContextVar[bool] = contextvars.ContextVar("xicon_keeping", default=False)


def _sibling(name: str) -> types.ModuleType:
    """This package's ``name``.py, loaded by path once (ComfyUI loads this package by path)."""
    module_name = f"xicon_resident_weights_{name}"
    module = sys.modules.get(module_name)
    if module is None:
        path = Path(__file__).resolve().with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module


file_pages = _sibling("file_pages")


def enabled(env: Mapping[str, str]) -> bool:
    """False when ``ENV`` is ``0``/``off``/``false``/``no``; True otherwise (the default)."""
    return env.get(ENV, "").strip().lower() not in {"0", "off", "false", "no"}


def releases_pages(env: Mapping[str, str]) -> bool:
    """False when ``PAGES_ENV`` is ``keep``/``0``/``off``/``false``/``no``; True otherwise."""
    return env.get(PAGES_ENV, "").strip().lower() not in {"keep", "0", "off", "false", "no"}


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


def host_range(value: Any) -> tuple[int, int] | None:
    """The address range of a host tensor's storage; None for anything else."""
    if getattr(getattr(value, "device", None), "type", None) != "cpu":
        return None
    try:
        storage = value.untyped_storage()
        start = storage.data_ptr()
        return start, start + storage.nbytes()
    except Exception:  # not a plain tensor: nothing to give back
        return None


def off_host(device: str) -> bool:
    """Whether a load onto ``device`` (as ``str(torch.device)``) copies the weights off the host;
    ``meta`` keeps no copy at all."""
    return device.split(":")[0] not in {"cpu", "None", ""}


class PageRelease:
    """The pages of a state dict's mapped model files, given back while upstream's load copies the
    weights off the host (module doc)."""

    def __init__(self, mappings: Any) -> None:
        self.mappings = mappings
        self.before_kib = file_pages.rss_file_kib()

    @classmethod
    def prepare(cls, sd: Mapping[str, Any]) -> tuple[PageRelease | None, str]:
        """A release for ``sd``, or None and the reason there is none."""
        if not file_pages.supported():
            return None, "no /proc/self/maps here"
        ranges = [r for r in map(host_range, sd.values()) if r is not None]
        mappings = file_pages.Mappings.holding(ranges)
        if not mappings:
            return None, "no mapped file behind the state dict"
        written = mappings.written_kib()
        if written:
            return None, f"the process wrote {written} KiB of the mapped file"
        return cls(mappings), ""

    def reading(self, sd: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``sd`` whose reads give back the pages of the tensor read before."""
        return Releasing(sd, self.give_back)

    def give_back(self, value: Any) -> None:
        span = host_range(value)
        if span is not None:
            self.mappings.release(*span)

    def finish(self, device: str) -> str:
        """Give back the rest of the mapped files' pages; the line to log."""
        written = self.mappings.written_kib()
        if written:  # nothing upstream's plain load does; never drop a write
            return f"the model file's mappings left as they are: {written} KiB written in the load"
        self.mappings.release_all()
        after = file_pages.rss_file_kib()
        files = self.mappings.paths()
        return (
            f"the weights went to {device}; {len(files)} model file(s) of "
            f"{size(self.mappings.mapped_bytes())} mapped taken out of ComfyUI's resident set "
            f"as the load read them (RssFile {size(self.before_kib * 1024)} before the load, "
            f"{size(after * 1024)} after it); the pages stay in the page cache"
        )


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


class Releasing(dict):
    """The state dict as upstream's load reads it, key by key: a read gives back the pages of the
    value read before it, whose copy is on the device by then (a copy from pageable host memory
    has read its source when ``Tensor.to`` returns)."""

    def __init__(self, sd: Mapping[str, Any], give_back: Callable[[Any], None]) -> None:
        super().__init__(sd)
        self._give_back = give_back
        self._last: Any = None

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        last, self._last = self._last, value
        if last is not None and last is not value:
            self._give_back(last)
        return value


def keeping(process: Callable[..., Any]) -> Callable[..., Any]:
    """``WanVideoSampler.process`` that sets ``KEEPING`` for its run: True when its
    ``force_offload`` is off, so the transformer stays where the load puts it."""
    signature = inspect.signature(process)

    @functools.wraps(process)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            keep = not bound.arguments.get("force_offload", True)
        except TypeError:  # upstream then fails on the same arguments
            keep = False
        token = KEEPING.set(keep)
        try:
            return process(*args, **kwargs)
        finally:
            KEEPING.reset(token)

    setattr(wrapped, WRAPPED, True)
    return wrapped


def page_release(sd: Any, device: str) -> PageRelease | None:
    """The release for a plain load of ``sd`` onto ``device`` while the sampler keeps the
    transformer; None (the reason logged) when there is none."""
    if not (KEEPING.get() and off_host(device)):
        return None
    try:
        release, why = PageRelease.prepare(sd)
    except Exception:  # never break a job: the pages then stay mapped
        log.exception("xicon_resident_weights: the model file's pages stay mapped")
        return None
    if release is None:
        log.info("xicon_resident_weights: the model file's pages stay mapped: %s", why)
    return release


def resident_loading(
    load_weights: Callable[..., Any], release_pages: bool = True
) -> Callable[..., Any]:
    """``load_weights`` that returns at once when the transformer still holds what the last
    load it made gave it (module doc); upstream's otherwise, giving back the model file's pages
    when ``release_pages`` and the sampler keeps the transformer off the host."""

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
        release = page_release(sd, settings[2]) if plain and release_pages else None
        try:
            reading = sd if release is None else release.reading(sd)
            result = load_weights(transformer, reading, weight_dtype, *args, **kwargs)
        finally:
            if release is not None:
                try:
                    log.info("xicon_resident_weights: %s", release.finish(settings[2]))
                except Exception:  # the pages then stay mapped; the load itself is done
                    log.exception("xicon_resident_weights: the model file's pages stay mapped")
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


def patch(registry: Mapping[str, Any], release_pages: bool = True) -> str:
    """Wrap ``load_weights`` in the sampler's module (and, to give back the model file's pages,
    ``WanVideoSampler.process``); the line to log."""
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
    module.load_weights = resident_loading(current, release_pages)
    done = "a transformer left on its device by the sampler is not loaded again"
    if not release_pages:
        return f"{done}; the model file's pages stay mapped ({PAGES_ENV})"
    if not getattr(base.process, WRAPPED, False):
        base.process = keeping(base.process)
    return f"{done}; the model file's pages leave ComfyUI's memory once it is kept off the host"


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
                log.info("xicon_resident_weights: %s", patch(registry, releases_pages(env)))
            except Exception:  # never break a prompt: the sampler then loads as upstream does
                log.exception("xicon_resident_weights: loading left as it is")
        return await original(self, *args, **kwargs)

    setattr(execute_async, WRAPPED, True)
    executor_class.execute_async = execute_async
    return f"{NODE}'s weight loading will be wrapped before the first prompt"
