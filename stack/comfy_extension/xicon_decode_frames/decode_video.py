"""The decoded clip encoded while the VAE still decodes it: ``WanVideoDecode`` followed by
``VHS_VideoCombine`` run as one node, each frame handed to the encoder once it is on the host.

Why: ComfyUI runs a node only once the node before has returned, so the video encode (node 139,
``VHS_VideoCombine``: each frame to bytes, piped to ffmpeg's x264) starts when the decode (node
28, ``WanVideoDecode``) has decoded the whole clip. The decode holds the GPU while the CPU waits,
then the encode holds the CPU while the GPU waits: at 60 s on an H100 17.4 s, then 3.0 s for a
real dance's frames (12.5 s for the random pixels of synthetic weights).

What:
- ``rewrite(prompt)``: in a prompt where a ``VHS_VideoCombine``'s ``images`` come from a
  ``WanVideoDecode`` whose output goes nowhere else, and the combine takes no ``latents``,
  ``vae`` or ``meta_batch``, the pair becomes one node of class ``NODE`` under the combine's id
  (its outputs keep their id), its inputs the combine's (less ``images``) and the decode's
  (``vae`` renamed ``wan_vae``: the combine has a ``vae`` of its own); the decode's id is gone
  from the prompt. Installed as a ComfyUI on-prompt handler (``server.py``
  ``PromptServer.trigger_on_prompt``: the prompt as posted, before validation), which also
  registers ``NODE`` in ComfyUI's node registry the first time it meets a pair.
- The node (``make_node``): upstream's own classes, subclassed: VideoHelperSuite's
  ``VideoCombine`` with its inputs, and a ``WanVideoDecode`` for the decode. On the graph's plain
  path (latents decoded by the Wan VAE, no end image, not looped, ``normalization`` default; a
  video format, no ping-pong, no loop; ``xicon_decode_frames`` wrapping the decode) upstream's
  ``WanVideoDecode.decode`` runs on a thread of its own (ComfyUI's execution context and
  inference mode carried over) inside ``decode_frames.feeding(FrameFeed)``, while this node's
  thread runs upstream's ``combine_video`` over a ``FrameSequence``: ``len`` the clip's frame
  count (one, then four per latent frame), ``[0]`` and iteration wait for each frame to be on the
  host and return it normalised as the node normalises it (clamp to [-1, 1], +1, /2, clamp to
  [0, 1]: element by element, so the same float32 values to the bit), in a copy of its own.
  While the encoder waits, the decode sends its frames to the host in batches of
  ``SINK_FLUSH_BYTES`` (16 MiB, about 10 frames at 416x672) instead of its own 128 MiB.
  Once every frame was encoded the decode's node gets back an empty clip instead of the whole
  one (its result is not used: nothing normalises or keeps the 4.8 GB of a 60-s clip again), and
  the VAE goes back to its offload device as upstream's code says. Any other case runs the
  decode, then the combine, one after the other, as ComfyUI would have.
- The hand-over between the two threads (``FrameFeed``, ``FrameSequence``, ``overlapped``) is
  ``frame_feed.py``'s.
- Faults: the decode's exception (an interrupt included: ComfyUI's progress hook raises it on
  the decoding thread) reaches the encoder's next frame and is raised by the node as it came; an
  encoder's exception stops the decode at its next batch (``FrameFeed.ready`` raises) and is
  raised by the node; either way the node returns or raises only once the decoding thread has
  ended.

Measured on an H100 held to 32 GB (``bench/results/gpu_h100_decode_video``, 128-MiB batches
then): the 60-s job's decode and encode 30.7-31.9 s apart, 18.7-18.9 s merged (most of it the
encode of synthetic weights' random pixels; a real dance's frames encode in about 3 s).

Installed only when VideoHelperSuite's ``VideoCombine`` still has the source this was written
against (``COMBINE_SHA256``: ``len(images)``, ``images[0]``, then one pass over the frames) and
``xicon_decode_frames`` is installed; otherwise nothing changes and the reason is logged.
``XICON_DECODE_VIDEO=off`` turns it off.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("xicon_decode_frames")

ENV = "XICON_DECODE_VIDEO"
NODE = "XiconWanDecodeVideoCombine"
DISPLAY = "WanVideo Decode + Video Combine (overlapped)"
DECODE = "WanVideoDecode"
COMBINE = "VHS_VideoCombine"
# sha256 of inspect.getsource(VideoCombine.INPUT_TYPES) and of VideoCombine.combine_video,
# joined by a newline, at ComfyUI-VideoHelperSuite 4ee72c06's videohelpersuite/nodes.py.
COMBINE_SHA256 = "6196e2213c9972edd03e9311cb359a587af63f1806f92b7f52469da1f4f18223"
# the decode node's inputs and the names they take in the merged node
DECODE_INPUTS = {
    "vae": "wan_vae",
    "samples": "samples",
    "enable_vae_tiling": "enable_vae_tiling",
    "tile_x": "tile_x",
    "tile_y": "tile_y",
    "tile_stride_x": "tile_stride_x",
    "tile_stride_y": "tile_stride_y",
    "normalization": "normalization",
}
FRAMES_MODULE = "xicon_decode_frames_impl"  # the name this package's __init__ loads it under
NOT_MERGED = ("latents", "vae", "meta_batch")  # combine inputs that keep the pair apart


def _sibling(name: str) -> Any:
    """This package's ``name``.py, loaded by path once (ComfyUI loads the package by path)."""
    module_name = f"xicon_decode_frames_{name}"
    module = sys.modules.get(module_name)
    if module is None:
        path = Path(__file__).resolve().with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module


_feed = _sibling("frame_feed")
FrameFeed = _feed.FrameFeed
FrameSequence = _feed.FrameSequence
SINK_FLUSH_BYTES = _feed.SINK_FLUSH_BYTES


def enabled(env: Mapping[str, str]) -> bool:
    """False when ``ENV`` is ``0``/``off``/``false``/``no``; True otherwise (the default)."""
    return env.get(ENV, "").strip().lower() not in {"0", "off", "false", "no"}


def combine_digest(combine_class: type) -> str:
    sources = [
        inspect.getsource(combine_class.INPUT_TYPES),
        inspect.getsource(combine_class.combine_video),
    ]
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()


def _link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def rewrite(prompt: MutableMapping[str, Any]) -> list[tuple[str, str]]:
    """Merge each plain decode -> combine pair of ``prompt`` (API format) in place into one
    ``NODE`` under the combine's id; the ``(decode id, combine id)`` pairs merged."""
    users: dict[str, int] = {}
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values() if isinstance(node, dict) else ():
            if _link(value):
                users[str(value[0])] = users.get(str(value[0]), 0) + 1
    merged = []
    for combine_id, node in list(prompt.items()):
        if not isinstance(node, dict) or node.get("class_type") != COMBINE:
            continue
        inputs = node.get("inputs")
        if not isinstance(inputs, dict) or any(name in inputs for name in NOT_MERGED):
            continue
        images = inputs.get("images")
        if not _link(images) or images[1] != 0:
            continue
        decode_id = str(images[0])
        decode = prompt.get(decode_id)
        if not isinstance(decode, dict) or decode.get("class_type") != DECODE:
            continue
        decode_inputs = decode.get("inputs")
        if not isinstance(decode_inputs, dict) or users.get(decode_id) != 1:
            continue
        if set(decode_inputs) - set(DECODE_INPUTS):
            continue  # an input this node does not know: left as it is
        new_inputs = {k: v for k, v in inputs.items() if k != "images"}
        new_inputs.update({DECODE_INPUTS[k]: v for k, v in decode_inputs.items()})
        node["class_type"] = NODE
        node["inputs"] = new_inputs
        del prompt[decode_id]
        merged.append((decode_id, str(combine_id)))
    return merged


def expected_frames(samples: Mapping[str, Any]) -> int:
    """Frames the Wan VAE decodes ``samples`` to (one, then four per latent frame; 0 if none)."""
    latents = samples["samples"]
    t = int(latents.shape[2]) - bool(samples.get("has_ref")) - bool(samples.get("drop_last"))
    return 1 + 4 * (t - 1) if t > 0 else 0


def sequential_reason(
    vae: Any, samples: Any, normalization: str, options: Mapping[str, Any], streams: bool
) -> str | None:
    """Why this decode and encode cannot overlap (None when they can)."""
    if not streams:
        return "xicon_decode_frames does not wrap the decode"
    if not isinstance(samples, Mapping) or not isinstance(samples.get("samples"), torch.Tensor):
        return "no latents to decode"
    if samples.get("video") is not None:
        return "the samples carry decoded video"
    if samples.get("end_image") is not None or samples.get("looped"):
        return "an end image or a looped clip"
    if samples["samples"].dim() != 5 or expected_frames(samples) < 1:
        return "not a clip of latent frames"
    if samples["samples"].shape[0] != 1:
        return "more than one clip in the batch"
    if type(vae).__name__ == "TAEHV":
        return "a TAEHV decoder"
    if normalization != "default":
        return f"normalization {normalization}"
    if not str(options.get("format", "")).startswith("video/"):
        return "not a video format"
    if options.get("pingpong") or options.get("loop_count"):
        return "ping-pong or a loop"
    return None


def make_node(decode_class: type, combine_class: type, streams: Callable[[], bool]) -> type:
    """The merged node's class: ``combine_class`` (VideoHelperSuite's ``VideoCombine``) with the
    decode's inputs, running ``decode_class`` (``WanVideoDecode``) beside its encode.
    ``streams()``: whether ``xicon_decode_frames`` wraps the decode now."""

    def input_types(cls: type) -> dict[str, Any]:
        types = copy.copy(combine_class.INPUT_TYPES())
        decode_types = decode_class.INPUT_TYPES()
        required = {k: v for k, v in types["required"].items() if k != "images"}
        for name, spec in decode_types["required"].items():
            required[DECODE_INPUTS[name]] = spec
        optional = dict(types.get("optional", {}))
        for name, spec in decode_types.get("optional", {}).items():
            optional[DECODE_INPUTS[name]] = spec
        return {**types, "required": required, "optional": optional}

    def validate_inputs(
        cls: type, tile_x: int, tile_y: int, tile_stride_x: int, tile_stride_y: int
    ) -> Any:
        return decode_class.VALIDATE_INPUTS(tile_x, tile_y, tile_stride_x, tile_stride_y)

    def decode_combine(
        self: Any,
        wan_vae: Any,
        samples: Any,
        enable_vae_tiling: bool,
        tile_x: int,
        tile_y: int,
        tile_stride_x: int,
        tile_stride_y: int,
        normalization: str = "default",
        **options: Any,
    ) -> Any:
        decoder = decode_class()
        decode_args = (wan_vae, samples, enable_vae_tiling, tile_x, tile_y, tile_stride_x)
        decode_args += (tile_stride_y,)
        reason = sequential_reason(wan_vae, samples, normalization, options, streams())
        if reason is not None:
            log.info("xicon_decode_video: decoded, then encoded (%s)", reason)
            images = decoder.decode(*decode_args, normalization=normalization)[0]
            return self.combine_video(images=images, **options)
        return overlapped(
            lambda: decoder.decode(*decode_args, normalization=normalization)[0],
            lambda images: self.combine_video(images=images, **options),
            expected_frames(samples),
        )

    return type(
        NODE,
        (combine_class,),
        {
            "INPUT_TYPES": classmethod(input_types),
            "VALIDATE_INPUTS": classmethod(validate_inputs),
            "FUNCTION": "decode_combine",
            "decode_combine": decode_combine,
            "__module__": __name__,
        },
    )


def overlapped(
    decode: Callable[[], torch.Tensor], combine: Callable[[Any], Any], expected: int
) -> Any:
    """``frame_feed.overlapped`` with ``decode_frames.feeding`` (this package's)."""
    return _feed.overlapped(decode, combine, expected, _frames_module().feeding)


def _frames_module() -> Any:
    """``decode_frames`` as this package's ``__init__`` loaded it (None when it did not)."""
    return sys.modules.get(FRAMES_MODULE)


class Installer:
    """The on-prompt handler: registers ``NODE`` once and merges the pairs of each prompt."""

    def __init__(self, registry: MutableMapping[str, Any], names: MutableMapping[str, str]):
        self.registry = registry
        self.names = names
        self.state: str | None = None  # None: not tried yet; "ok" or the reason it is not

    def ensure(self) -> str:
        if self.state is None:
            self.state = self._register()
            log.info("xicon_decode_video: %s", self.state)
        return self.state

    def _register(self) -> str:
        decode_class, combine_class = self.registry.get(DECODE), self.registry.get(COMBINE)
        if decode_class is None or combine_class is None:
            return f"{DECODE} or {COMBINE} not loaded; decode and encode left apart"
        try:
            digest = combine_digest(combine_class)
        except (OSError, TypeError):
            return f"{COMBINE}'s source cannot be read; decode and encode left apart"
        if digest != COMBINE_SHA256:
            return (
                f"{COMBINE} changed upstream (sha256 {digest[:12]}, expected "
                f"{COMBINE_SHA256[:12]}); decode and encode left apart"
            )
        frames = _frames_module()
        if frames is None:
            return "xicon_decode_frames not loaded; decode and encode left apart"

        def streams() -> bool:
            current = self.registry.get(DECODE)
            return current is decode_class and getattr(current.decode, frames.WRAPPED, False)

        self.registry[NODE] = make_node(decode_class, combine_class, streams)
        self.names[NODE] = DISPLAY
        return "ok"

    def __call__(self, json_data: Any) -> Any:
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        if not isinstance(prompt, dict):
            return json_data
        pairs = [
            (k, n)
            for k, n in prompt.items()
            if isinstance(n, dict) and n.get("class_type") == COMBINE
        ]
        if not pairs or self.ensure() != "ok":
            return json_data
        for decode_id, combine_id in rewrite(prompt):
            log.info(
                "xicon_decode_video: nodes %s (%s) and %s (%s) run as one %s: the clip is "
                "encoded as it is decoded",
                decode_id,
                DECODE,
                combine_id,
                COMBINE,
                NODE,
            )
        return json_data


def install(
    server: Any,
    registry: MutableMapping[str, Any],
    names: MutableMapping[str, str],
    env: Mapping[str, str],
) -> str:
    """Add the on-prompt handler to ComfyUI's ``server`` (``PromptServer.instance``); the line
    to log."""
    if not enabled(env):
        return f"off ({ENV})"
    if any(isinstance(h, Installer) for h in getattr(server, "on_prompt_handlers", [])):
        return "already installed"
    server.add_on_prompt_handler(Installer(registry, names))
    return f"{DECODE} -> {COMBINE} pairs will run as one node, the encode beside the decode"
