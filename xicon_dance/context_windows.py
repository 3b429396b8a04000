"""How many context windows WanVideoWrapper's sampler runs per step, and where a long run stands.

A clip longer than the graph's ``WanVideoContextOptions.context_frames`` is sampled in
overlapping windows: every sampler step runs the model once per window. The sampler's progress
bar then counts windows: after window ``k`` of ``W`` in step ``i`` (0-based) it reports the value
``i + k / W`` of ``steps`` (ComfyUI-WanVideoWrapper ``nodes_sampler.py``, the context-window
branch: a fresh ``ProgressBar`` per step, ``update_absolute(step + (k + 1) / len(windows),
steps)``; the latent-preview callback then reports ``i + 1``). ComfyUI drops updates closer than
0.1 s and 0.5 % apart, never a bar's first or final one.

Contract:
- ``ContextOptions(frames, stride, overlap, schedule)`` in pixel frames, as the node takes them;
  ``ContextOptions.from_graph(graph)`` reads the first ``WanVideoContextOptions`` node (None
  when the graph has none).
- ``latent_frames(frames)``: ``(frames - 1) // 4 + 1``.
- ``windows(step, frames, options) -> list[list[int]]``: the latent frame indices of each window
  at sampler step ``step`` (0-based). No options, or ``options.frames > frames``: one window of
  every latent frame (the sampler turns context windows off). Schedules: ``uniform_standard``
  (windows shift from step to step by the bit-reversed step number; a window running past the
  end is moved to end at the last frame, a missing start window is added, duplicates dropped),
  ``uniform_looped`` (the shifted windows wrap around), ``static_standard`` (fixed windows, the
  last one moved back to end at the last frame). An unknown schedule or a stride/overlap that
  leaves no window gives ``[]``.
- ``loaded_frames(source_frames, source_fps, force_rate, cap)``: the frames VHS_LoadVideo yields
  in the ``Wan`` format (resampled to ``force_rate``, capped, truncated to 4n+1).
- ``SamplingPlan(frames, options)``: ``windows_at(step)``, ``windows_before(step)`` (cached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CONTEXT_NODE = "WanVideoContextOptions"
LOADER_NODE = "VHS_LoadVideo"


@dataclass(frozen=True)
class ContextOptions:
    frames: int = 81
    stride: int = 4
    overlap: int = 16
    schedule: str = "uniform_standard"

    @classmethod
    def from_graph(cls, graph: dict[str, Any]) -> ContextOptions | None:
        for _nid, node in sorted(graph.items()):
            if isinstance(node, dict) and node.get("class_type") == CONTEXT_NODE:
                inputs = node.get("inputs") or {}
                try:
                    return cls(
                        frames=int(inputs["context_frames"]),
                        stride=int(inputs["context_stride"]),
                        overlap=int(inputs["context_overlap"]),
                        schedule=str(inputs["context_schedule"]),
                    )
                except (KeyError, TypeError, ValueError):
                    return None  # a linked (computed) input: unknown here
        return None


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


def loaded_frames(source_frames: int, source_fps: float, force_rate: float, cap: int) -> int:
    """Frames VHS_LoadVideo yields in the ``Wan`` format (a close estimate: VHS resamples by
    frame times, this by the frame count)."""
    count = source_frames
    if force_rate and source_fps > 0:
        count = int(source_frames / source_fps * force_rate)
    if cap:
        count = min(count, cap)
    return (count - 1) // 4 * 4 + 1 if count >= 1 else 0


def _bit_reversed(step: int) -> float:
    """``step``'s 64 bits in reverse order, as a fraction of 2**64 (0, 1/2, 1/4, 3/4, ...)."""
    value, out = step, 0
    for _ in range(64):
        out = (out << 1) | (value & 1)
        value >>= 1
    return out / 2**64


def _shifted(step: int, length: int, size: int, stride: int, overlap: int) -> list[list[int]]:
    """Windows of ``size`` latents (spaced 1, 2, 4... for each stride level), starting at an
    offset that changes with the step, wrapping past the end."""
    levels = min(stride, math.ceil(math.log2(length / size)) + 1)
    shift = _bit_reversed(step)
    out: list[list[int]] = []
    for level in range(levels):
        spacing = 1 << level
        offset = round(length * shift)
        advance = size * spacing - overlap
        if advance <= 0:
            return []
        for start in range(int(shift * spacing) + offset, length + offset, advance):
            out.append([i % length for i in range(start, start + size * spacing, spacing)])
    return out


def _wraps_at(window: list[int]) -> int | None:
    """Index where a window's frame numbers go down (it wrapped past the end), or None."""
    for i in range(1, len(window)):
        if window[i] < window[i - 1]:
            return i
    return None


def _uniform_standard(step: int, length: int, size: int, stride: int, overlap: int) -> list:
    queue = _shifted(step, length, size, stride, overlap)
    i = 0
    while i < len(queue):
        window = queue[i]
        at = _wraps_at(window)
        if at is not None:
            wrapped_to = window[at]
            # the same spacing, moved to end at the last frame
            rel = [(f - window[0]) % length for f in window]
            queue[i] = [f + length - 1 - rel[-1] for f in rel]
            if wrapped_to not in queue[(i + 1) % len(queue)]:
                queue.insert(i + 1, list(range(wrapped_to, wrapped_to + size)))
        i += 1
    unique: list[list[int]] = []
    for window in queue:
        if window not in unique:
            unique.append(window)
    return unique


def _static_standard(length: int, size: int, overlap: int) -> list[list[int]]:
    if size - overlap <= 0:
        return []
    out = []
    for start in range(0, length, size - overlap):
        if start + size >= length:
            out.append(list(range(length - size, length)))
            break
        out.append(list(range(start, start + size)))
    return out


def windows(step: int, frames: int, options: ContextOptions | None) -> list[list[int]]:
    length = latent_frames(frames)
    if options is None or options.frames > frames:
        return [list(range(length))]
    size = latent_frames(options.frames)
    stride, overlap = options.stride // 4, options.overlap // 4
    if size < 1:
        return []
    if length <= size:
        return [list(range(length))]
    if options.schedule == "uniform_standard":
        return _uniform_standard(step, length, size, stride, overlap)
    if options.schedule == "uniform_looped":
        return _shifted(step, length, size, stride, overlap)
    if options.schedule == "static_standard":
        return _static_standard(length, size, overlap)
    return []


@dataclass
class SamplingPlan:
    """The windows of each sampler step for a clip of ``frames`` pixel frames."""

    frames: int
    options: ContextOptions | None
    _counts: dict[int, int] = field(default_factory=dict, repr=False)

    def windows_at(self, step: int) -> int:
        """Windows of sampler step ``step`` (0-based); 0 when unknown."""
        if step not in self._counts:
            self._counts[step] = len(windows(step, self.frames, self.options))
        return self._counts[step]

    def windows_before(self, step: int) -> int:
        """Windows of all steps before ``step`` (0-based)."""
        return sum(self.windows_at(i) for i in range(step))
