"""After every node, ComfyUI's output cache lets go of large finished results (clip-sized frame
tensors), the running job's included.

Why: ComfyUI v0.33.0 keeps every node's result in its output cache (``execution.py``, the default
RAM-pressure cache) so that a later prompt with the same inputs can reuse it, and drops results
only when free RAM falls under its headroom (``execution.py`` ~L799-811: after a node, large
results first, ``min_entry_size=RAM_CACHE_LARGE_INTERMEDIATE``). In this worker no later job
reuses a clip-sized result: each job's clip lies in its own input folder, so the nodes that load
and transform it get new cache keys every time. Kept, those results are only memory: a 60-s clip
at 416x672 is 4.8 GB per float32 copy, the loaded frames stay cached while the decoder makes the
next copies, and after the job the last clip's copies stay until the next job's first node.

What: ``install`` wraps ``ExecutionList.complete_node_execution`` (``comfy_execution/graph.py``),
which ComfyUI calls after each node finishes. The wrapper asks the cache to do what it does under
RAM pressure, every time: ``RAMPressureCache.ram_release(inf, free_active=True,
min_entry_size=threshold)`` (``comfy_execution/caching.py``) drops each cached result that holds at
least ``threshold`` bytes of CPU tensors. Nodes still to run keep their inputs: ComfyUI hands each
finished result to its readers through the prompt's own execution cache
(``ExecutionList.cache_update``), which holds it until the last reader has run. Smaller results
(models, text encodings, the reference image) stay cached across jobs as before.

The threshold is ``XICON_RELEASE_OUTPUTS_MIB`` MiB, default 64: every clip-sized result of a
job from about 20 frames at 416x672 on (a default 81-frame job is 272 MB per float32 copy, its
half-size pose images 68 MB), far above anything worth keeping for the next job (the reference
image at 416x672 is 3.4 MB; models and text encodings are not counted: ``ram_release`` counts
the CPU tensors a result holds directly). ``0`` or ``off`` turns it off. A small result that is
a view of a large tensor (``ImageCrop``'s output, for one) keeps the whole tensor alive and is
not released: ``ram_release`` counts elements, not storage. Nothing is
installed when ComfyUI's caches are not the ones this was written against (the reason is
logged); with another cache mode (``--cache-classic``, ``--cache-lru``, ``--cache-none``) the
wrapper does nothing. A node added to a running prompt later (lazy inputs, node expansion) whose
input was released makes ComfyUI run that input's node again, as after an eviction under RAM
pressure; the worker's graph has neither.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import types
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("xicon_release_outputs")

ENV = "XICON_RELEASE_OUTPUTS_MIB"
MIB = 1024 * 1024
MARK = "_xicon_release_outputs"
RAM_RELEASE_PARAMS = ("self", "target", "free_active", "min_entry_size")
DEFAULT_MIB = 64


def threshold_from_env(env: Mapping[str, str]) -> int | None:
    """Bytes from ``ENV`` (MiB; ``DEFAULT_MIB`` when unset); None when ``0`` or ``off``."""
    raw = env.get(ENV, "").strip().lower()
    if raw == "":
        return DEFAULT_MIB * MIB
    if raw in {"0", "off", "false", "no"}:
        return None
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a number of MiB or off, got {raw!r}") from None
    if not math.isfinite(mib) or mib <= 0:
        raise ValueError(f"{ENV} must be a positive number of MiB or off, got {raw!r}")
    return int(mib * MIB)


def node_of(execution_list: Any, key: Any) -> str:
    """The prompt's node id whose cache key is ``key``, for the log ("?" when none is)."""
    keys = execution_list.output_cache.cache_key_set
    for node_id in execution_list.dynprompt.all_node_ids():
        if keys.get_data_key(node_id) == key:
            return str(node_id)
    return "?"


def release_large(execution_list: Any, cache_class: type, threshold: int) -> int:
    """Drop the large results from ``execution_list``'s output cache; bytes of CPU tensors freed."""
    cache = execution_list.output_cache
    if not isinstance(cache, cache_class):
        return 0
    before = set(cache.cache)
    freed = cache.ram_release(math.inf, free_active=True, min_entry_size=threshold)
    gone = before - set(cache.cache)
    if gone:
        nodes = ", ".join(sorted(node_of(execution_list, key) for key in gone))
        log.info(
            "xicon_release_outputs: released the cached results of node(s) %s (%.2f GiB)",
            nodes,
            freed / 1024**3,
        )
    return int(freed)


def install(graph: types.ModuleType, caching: types.ModuleType, threshold: int | None) -> str:
    """Wrap ``graph.ExecutionList.complete_node_execution``; the line to log."""
    if threshold is None:
        return f"off ({ENV}); ComfyUI caches as upstream does"
    execution_list = getattr(graph, "ExecutionList", None)
    cache_class = getattr(caching, "RAMPressureCache", None)
    original: Callable[..., Any] | None = getattr(execution_list, "complete_node_execution", None)
    release = getattr(cache_class, "ram_release", None)
    if original is None or release is None:
        return "not installed: ComfyUI has no ExecutionList.complete_node_execution or ram_release"
    if tuple(inspect.signature(release).parameters) != RAM_RELEASE_PARAMS:
        return f"not installed: RAMPressureCache.ram_release{inspect.signature(release)} differs"
    if getattr(original, MARK, False):
        return "already installed"

    @functools.wraps(original)
    def complete_node_execution(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            release_large(self, cache_class, threshold)
        except Exception:  # the prompt goes on; the results stay cached as upstream keeps them
            log.exception("xicon_release_outputs: release failed")
        return result

    setattr(complete_node_execution, MARK, True)
    execution_list.complete_node_execution = complete_node_execution
    return (
        f"cached results of {threshold / MIB:.0f} MiB or more are released once their node has "
        "finished (readers still to run keep them)"
    )


def install_from_env(env: Mapping[str, str] = os.environ) -> str:
    """``install`` on ComfyUI's own modules, the threshold from ``env``."""
    from comfy_execution import caching, graph  # ComfyUI's; importable once it loads packs

    return install(graph, caching, threshold_from_env(env))
