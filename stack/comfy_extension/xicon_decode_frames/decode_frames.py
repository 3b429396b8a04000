"""The decoded clip reaches the host as one contiguous float32 frame tensor, a few frames at a
time while the VAE decodes, without the whole clip on the GPU or a bf16 host copy on the way.

Why: WanVideoWrapper's ``WanVideoDecode.decode`` (``nodes.py`` ~L2117-2177, pinned commit) takes
the VAE's output, the whole clip on the GPU in bf16 laid out (C, T, H, W), and runs
``images.cpu().float()``: a bf16 copy of the clip on the host, then a float32 copy of that, so for
a moment the host holds 1.5 float32 copies of the clip (at 60 s, 416x672: 2.4 GB + 4.8 GB). It
then normalises in place and returns ``images.permute(1, 2, 3, 0)``, a (T, H, W, C) view of the
channel-first tensor, so every reader (``VHS_VideoCombine``'s frame conversion) walks frames whose
channels lie a whole plane apart. And the Wan VAE's own decode loop (``VideoVAE_.decode``,
``wanvideo/wan_video_vae.py`` ~L1131-1167) gathers the clip on the GPU with ``torch.cat([out,
out_], 2)`` after every latent frame: the GPU holds the whole decoded clip, and for each
concatenation the clip so far twice (at 60 s the whole-GPU peak came at the end of the decode,
6-7 GiB above the sampler's, ``bench/results/gpu_h100_batch_ops``), however long the clip.

What: while ``WanVideoDecode.decode`` runs, its VAE's ``decode`` (``WanVideoVAE.decode``, which
returns one (C, T, H, W) tensor per batch item) is wrapped, for that call only: each tensor it
returns is copied, a few frames at a time, into a new contiguous float32 (T, H, W, C) host tensor,
and handed back as that tensor's (C, T, H, W) view. The node's ``.cpu()`` and ``.float()`` then
return the same tensor (already on the host, already float32), its in-place normalisation
writes into it, and its final ``permute(1, 2, 3, 0)`` gives back the contiguous frames. Where the
VAE decodes untiled (``WanVideoVAE.single_decode``, the graph's way), its decode loop is run by
``streamed_decode`` instead, for that call only: the same calls of the decoder on the same latent
frames, but the decoded frames go into that host tensor as they come: once ``FLUSH_BYTES`` of
them (in the VAE's dtype) wait on the GPU they are made float32 frames there and copied to the
host by a thread of their own while the decoder goes on, one batch at a time, so the GPU never
holds the clip (of its frames, at most three times ``FLUSH_BYTES`` and a chunk together: a
batch waiting, and the batch before in float32, twice its bytes, being copied). The values are
the node's own bit for bit (the decoder's calls are the same; bf16 -> float32 is exact; the
normalisation is the node's code on the same float32 numbers). The host holds one float32
copy instead of 1.5 at the peak, and the frames come out contiguous. For frames from the GPU the
host tensor's pages are touched (``zero_``, on every core) as it is made: a copy from the GPU
into new pageable memory faults its pages in one by one (808 MB: 0.46-0.57 s on an H100's host,
0.05 s once touched, the touch 0.035 s); a copy between host tensors already runs on every core.

Measured on an H100 (``bench/results/gpu_h100_decode_frames``): through the worker held to 32 GB,
the 60-s job's whole-GPU peak went from 28.8 to 22.7 GiB (node 28 then 1.4 s slower: its copies
were made between the decoder's calls, into untouched memory); alone, the 60-s decode (361
latent frames) takes 17.05 s streamed as now, against 19.95 s gathered on the GPU and copied
after (the GPU's torch peak 3.8 against 27.9 GiB) and 20.15 s streamed into untouched memory.

Installed once, before ComfyUI runs its first prompt (custom nodes load in no fixed order, so the
class is looked up in ComfyUI's node registry then), and only when ``WanVideoDecode.decode`` still
has the source this was written against (``UPSTREAM_SHA256``); the decode loop is replaced only
when ``single_decode`` and ``VideoVAE_.decode`` still have theirs (``STREAM_SHA256``; a VAE of
another kind, a tiled decode or the end-image path decode as upstream's, copied to the host
after). Otherwise nothing changes and the reason is logged. ``XICON_DECODE_FRAMES=off`` turns it
off. ``XICON_DECODE_LATENTS`` (1 to 8, default 1 as upstream) gives the streamed loop that many
latent frames per decoder call after the first (``streamed_decode``); not timed on a GPU yet.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

log = logging.getLogger("xicon_decode_frames")

ENV = "XICON_DECODE_FRAMES"
NODE = "WanVideoDecode"
# sha256 of inspect.getsource(WanVideoDecode.decode) at ComfyUI-WanVideoWrapper
# 088128b224242e110d3906c6750e9a3a348a659b's nodes.py.
UPSTREAM_SHA256 = "da438e95e22c5bc705eb8ce108c15a9b60dfeae26ce45d234ed4851ec8dfa76f"
WRAPPED = "_xicon_decode_frames"
CHUNK_BYTES = 64 * 1024 * 1024  # float32 bytes moved per step: the GPU temporary's size
# sha256 of inspect.getsource(WanVideoVAE.single_decode) and of VideoVAE_.decode, joined by a
# newline, at that commit's wanvideo/wan_video_vae.py.
STREAM_SHA256 = "144c0ba0ee52712183ef1133b28a843bdad00293c49f68ada90165b039d5d9df"
# latent frames per decoder call after the first (upstream: 1; LATENTS_ENV sets it at install;
# bench/vae_decode.py kernels_chunkN times it): 1 until timed on a GPU
DEFAULT_LATENTS_PER_CALL = 1
LATENTS_PER_CALL = DEFAULT_LATENTS_PER_CALL
LATENTS_ENV = "XICON_DECODE_LATENTS"
MAX_LATENTS_PER_CALL = 8  # a 416x672 call of 8 holds 32 frames of 96 channels at full size
FLUSH_BYTES = 128 * 1024 * 1024  # decoded frames waiting on the GPU, in their own dtype, at most


class Sink(Protocol):
    """Who else wants the decoded frames as they reach the host (``frame_feed.FrameFeed``).
    ``ready(frames, count)``: the first ``count`` frames of the (T, H, W, C) host tensor
    ``frames`` are final (called on the copying thread; an exception it raises stops the
    decode); ``fallback()``: the frames will not come that way, only as the node's result;
    ``decoded(videos)``: the VAE's decode has returned ``videos`` (on the decoding thread); what
    it returns goes on to the node in their place. ``flush_bytes``: the batch size it wants, when
    smaller than the decode's own (frames waiting on the GPU are of no use to it)."""

    flush_bytes: int

    def ready(self, frames: torch.Tensor, count: int) -> None: ...

    def fallback(self) -> None: ...

    def decoded(self, videos: list[torch.Tensor]) -> list[torch.Tensor]: ...


_sinks = threading.local()


@contextlib.contextmanager
def feeding(sink: Sink) -> Iterator[None]:
    """Decodes run on this thread inside the block hand their frames to ``sink`` too."""
    before = getattr(_sinks, "sink", None)
    _sinks.sink = sink
    try:
        yield
    finally:
        _sinks.sink = before


def current_sink() -> Sink | None:
    return getattr(_sinks, "sink", None)


def enabled(env: Mapping[str, str]) -> bool:
    """False when ``ENV`` is ``0``/``off``/``false``/``no``; True otherwise (the default)."""
    return env.get(ENV, "").strip().lower() not in {"0", "off", "false", "no"}


def latents_per_call(env: Mapping[str, str]) -> tuple[int, str | None]:
    """``LATENTS_ENV`` as the latent frames per decoder call after the first: a whole number
    from 1 to ``MAX_LATENTS_PER_CALL``; unset or empty, ``DEFAULT_LATENTS_PER_CALL``. Anything
    else gives the default and the reason to log."""
    raw = env.get(LATENTS_ENV, "").strip()
    if not raw:
        return DEFAULT_LATENTS_PER_CALL, None
    if raw.isdigit() and 1 <= int(raw) <= MAX_LATENTS_PER_CALL:
        return int(raw), None
    return DEFAULT_LATENTS_PER_CALL, (
        f"{LATENTS_ENV}={raw!r} is not a whole number from 1 to {MAX_LATENTS_PER_CALL}; "
        f"{DEFAULT_LATENTS_PER_CALL} latent frame(s) per decoder call"
    )


def to_host_frames(video: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """``video`` (C, T, H, W, any device and float dtype) as a (C, T, H, W) view of a new
    contiguous float32 (T, H, W, C) tensor on the host, filled a few frames at a time."""
    c, t, h, w = video.shape
    frames = torch.empty((t, h, w, c), dtype=torch.float32, device="cpu")
    if video.is_cuda:  # its pages touched by all cores: copies from the GPU go faster then
        frames.zero_()
    step = max(1, chunk_bytes // max(1, h * w * c * 4))
    for start in range(0, t, step):
        stop = min(t, start + step)
        part = video[:, start:stop].permute(1, 2, 3, 0).to(torch.float32)
        frames[start:stop].copy_(part)
    return frames.permute(3, 0, 1, 2)


class HostFrames:
    """Decoded chunks, each (1, C, t, H, W) on any device, gathered in order into one contiguous
    float32 (T, H, W, C) host tensor: kept on their device until ``flush_bytes`` of them (their
    own bytes) wait, then converted there to float32 frames and copied over together by a thread
    of this object's own, while the caller goes on decoding (on a CUDA device on a stream of its
    own, after the conversion). One batch is copied at a time: a flush first waits for the batch
    before it. The Wan 2.1 decoder gives one frame for the first latent frame and four for each
    after (``T = 1 + 4 (n - 1)``, allocated by the first batch, its pages touched then when the
    frames come from the GPU; a later chunk may hold several latent frames' four each); chunks
    of any other size are gathered all the same, joined at the end (one more copy). ``finish``
    returns the frames; ``close`` (also on leaving a ``with`` block) waits for the copy under
    way and ends the thread, whatever happened before. The ``Sink`` of this thread's ``feeding``
    block, if any, hears of each batch once it is on the host (``Sink.ready``), or that the
    frames are gathered in pieces (``Sink.fallback``)."""

    def __init__(self, latent_frames: int, flush_bytes: int = FLUSH_BYTES) -> None:
        self.latent_frames = latent_frames
        self.sink = current_sink()
        # a sink waits for the frames: they go over in its smaller batches when it has any
        self.flush_bytes = min(flush_bytes, getattr(self.sink, "flush_bytes", flush_bytes))
        self.pending: list[torch.Tensor] = []
        self.pending_bytes = 0
        self.copying_bytes = 0  # the float32 frames of the batch being copied, on their device
        self.most_held = 0  # the most bytes of frames on the chunks' device at once
        self.frames: torch.Tensor | None = None
        self.written = 0
        self.pieces: list[torch.Tensor] | None = None  # chunks that broke the 1 + 4 (n - 1) rule
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="xicon-decode-frames")
        self._copying: Future[None] | None = None
        self._stream: Any = None  # the copies' CUDA stream, made by the first CUDA batch

    def __enter__(self) -> HostFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _held(self, nbytes: int) -> None:
        self.most_held = max(self.most_held, nbytes)

    def add(self, chunk: torch.Tensor) -> None:
        self.pending.append(chunk)
        self.pending_bytes += chunk.numel() * chunk.element_size()
        self._held(self.pending_bytes + self.copying_bytes)
        if self.pending_bytes >= self.flush_bytes:
            self.flush()

    def wait(self) -> None:
        """Until the batch being copied is on the host; its copy's exception, if it failed."""
        copying, self._copying = self._copying, None
        self.copying_bytes = 0
        if copying is not None:
            copying.result()

    def flush(self) -> None:
        self.wait()  # the batch before is on the host, its memory on the device free
        if not self.pending:
            return
        parts = [
            chunk[0].permute(1, 2, 3, 0).to(torch.float32, memory_format=torch.contiguous_format)
            for chunk in self.pending  # (t, H, W, C)
        ]
        converted = sum(part.numel() * 4 for part in parts)
        self._held(self.pending_bytes + converted)
        self.pending.clear()
        self.pending_bytes = 0
        ready = None
        if parts[0].is_cuda:  # the copy's stream starts once the conversion is done
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(parts[0].device))
        self.copying_bytes = converted
        self._copying = self._copier.submit(self._copy, parts, ready)

    def _copy(self, parts: list[torch.Tensor], ready: Any) -> None:
        """On this object's thread: ``parts`` into the host frames (``copy_`` to the host's
        pageable memory returns once the copy is done, so ``parts`` may then be freed)."""
        if ready is None:
            self._place(parts)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=parts[0].device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            self._place(parts)

    def _place(self, parts: list[torch.Tensor]) -> None:
        for part in parts:
            t = part.shape[0]
            if self.frames is None and self.pieces is None:
                total = 1 + 4 * (self.latent_frames - 1)
                self.frames = torch.empty((total, *part.shape[1:]), dtype=torch.float32)
                if part.is_cuda:  # its pages touched by all cores: copies from the GPU go faster
                    self.frames.zero_()
            # the decoder's rule: 1 frame for the first latent frame, 4 for each after
            fits = (
                self.frames is not None
                and (t == 1 if self.written == 0 else t > 0 and t % 4 == 0)
                and part.shape[1:] == self.frames.shape[1:]
                and self.written + t <= self.frames.shape[0]
            )
            if fits:
                self.frames[self.written : self.written + t].copy_(part)
                self.written += t
                continue
            if self.pieces is None:  # leave the fixed-size tensor: gather pieces from here on
                self.pieces = [self.frames[: self.written]] if self.frames is not None else []
                self.frames = None
                if self.sink is not None:
                    self.sink.fallback()
            self.pieces.append(part.cpu())
        if self.sink is not None and self.frames is not None and self.pieces is None:
            self.sink.ready(self.frames, self.written)

    def finish(self) -> torch.Tensor:
        """All frames as a (1, C, T, H, W) view of the contiguous (T, H, W, C) host tensor."""
        self.flush()
        self.wait()
        self.close()
        if self.pieces is not None:
            frames = torch.cat(self.pieces, 0) if self.pieces else torch.empty(0)
        else:
            assert self.frames is not None
            frames = self.frames[: self.written]
            if self.written != self.frames.shape[0]:
                frames = frames.clone()  # fewer frames than the rule: a contiguous tensor still
        return frames.permute(3, 0, 1, 2).unsqueeze(0)

    def close(self) -> None:
        """Wait for the copy under way (its exception stays in it) and end the thread."""
        self._copier.shutdown(wait=True)


def streamed_decode(
    model: Any,
    z: torch.Tensor,
    pbar: bool = True,
    flush_bytes: int = FLUSH_BYTES,
    per_call: int | None = None,
) -> torch.Tensor:
    """``VideoVAE_.decode`` (pinned source, ``STREAM_SHA256``) with the decoded frames handed to
    ``HostFrames`` as they come instead of concatenated on the GPU: the same calls of ``conv2``
    and (``per_call`` 1) the decoder on the same latent frames, the same progress and cache; the
    frames as a (1, C, T, H, W) view of a contiguous float32 (T, H, W, C) host tensor.
    ``per_call`` (default ``LATENTS_PER_CALL``) latent frames go to each decoder call after the
    first (which takes one alone, as upstream's): the decoder's causal convolutions and time
    upsamples see the same frames and cached frames either way, so the sums are the same ones,
    made by kernels for longer clips (their order of summation may differ)."""
    g = type(model).decode.__globals__  # the VAE module's tqdm, ProgressBar, device, log
    z = z / model.inv_std.to(z) + model.mean.to(z)
    input_shape = z.shape
    iter_ = z.shape[2]
    bar = g["ProgressBar"](iter_) if pbar else None
    with contextlib.suppress(Exception):  # as upstream: no CUDA, no statistics
        torch.cuda.reset_peak_memory_stats(g["device"])
    x = model.conv2(z)
    per_call = max(1, LATENTS_PER_CALL if per_call is None else per_call)
    with (
        HostFrames(iter_, flush_bytes) as frames,
        g["tqdm"](total=iter_, desc="WanVAE decoding frames", disable=not pbar) as progress,
    ):
        i = 0
        while i < iter_:
            n = 1 if i == 0 else min(per_call, iter_ - i)  # the first alone: its cache is 'Rep'
            model._conv_idx = [0]
            frames.add(
                model.decoder(
                    x[:, :, i : i + n, :, :], feat_cache=model._feat_map, feat_idx=model._conv_idx
                )
            )
            i += n
            progress.update(n)
            if bar:
                bar.update(n)
        if bar:
            bar.update_absolute(0)
        model.clear_cache()
        out = frames.finish()
    _, _, t, h, w = out.shape
    log.info(
        "xicon_decode_frames: %d frames of %dx%d to the host as one float32 tensor (%.1f MiB), "
        "as they were decoded: at most %.1f MiB of them on the GPU at once",
        t,
        w,
        h,
        out.numel() * 4 / 2**20,
        frames.most_held / 2**20,
    )
    if getattr(model, "verbose", False):
        try:
            g["log"].info(f"WanVAE decoded input:{input_shape} to {out.shape}")
            g["print_memory"](g["device"], process="WanVAE decode")
            torch.cuda.reset_peak_memory_stats(g["device"])
        except Exception:
            pass
    return out


def stream_digest(vae: Any) -> str | None:
    """sha256 of ``vae``'s ``single_decode`` and its model's ``decode`` sources (None when
    ``vae`` has no such methods or their source cannot be read)."""
    try:
        outer = inspect.getsource(type(vae).single_decode)
        inner = inspect.getsource(type(vae.model).decode)
    except (AttributeError, OSError, TypeError):
        return None
    return hashlib.sha256(f"{outer}\n{inner}".encode()).hexdigest()


def streaming_single_decode(vae: Any) -> Callable[..., Any]:
    """``WanVideoVAE.single_decode`` for ``vae``, with ``streamed_decode`` as its decode loop."""

    def single_decode(hidden_state: torch.Tensor, device: Any, pbar: bool = True) -> torch.Tensor:
        hidden_state = hidden_state.to(device)
        return streamed_decode(vae.model, hidden_state, pbar=pbar)

    return single_decode


def host_decoding(decode: Callable[..., Any]) -> Callable[..., Any]:
    """The VAE's bound ``decode``, returning each (C, T, H, W) video through ``to_host_frames``
    and dropping its own copy of each as soon as it is converted. A video already on the host in
    float32 (an fp32 VAE decoding on the CPU or tiled: its tiles are gathered on the host) is
    passed on as it is: the node's ``.cpu().float()`` copies nothing then either."""

    @functools.wraps(decode)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        videos = decode(*args, **kwargs)
        if not isinstance(videos, list) or not all(
            isinstance(v, torch.Tensor) and v.dim() == 4 for v in videos
        ):
            return videos  # not the shape this was written for: the node gets it as it came
        for i, video in enumerate(videos):
            if video.device.type == "cpu" and video.dtype == torch.float32:
                continue  # already what the node makes of it: a copy would only add one
            videos[i] = to_host_frames(video)
            _, t, h, w = video.shape
            del video
            log.info(
                "xicon_decode_frames: %d frames of %dx%d to the host as one float32 tensor "
                "(%.1f MiB)",
                t,
                w,
                h,
                videos[i].numel() * 4 / 2**20,
            )
        sink = current_sink()
        return videos if sink is None else sink.decoded(videos)

    return wrapped


def wrap_node_decode(original: Callable[..., Any]) -> Callable[..., Any]:
    """``WanVideoDecode.decode`` that runs ``original`` with the VAE's ``decode`` wrapped by
    ``host_decoding`` for the call's duration (an attribute on that VAE object, removed after)."""

    @functools.wraps(original)
    def decode(self: Any, vae: Any, samples: Any, *args: Any, **kwargs: Any) -> Any:
        inner = getattr(vae, "decode", None)
        own = getattr(vae, "__dict__", {})
        if not callable(inner) or "decode" in own:
            return original(self, vae, samples, *args, **kwargs)
        vae.decode = host_decoding(inner)
        streams = "single_decode" not in own and stream_digest(vae) == STREAM_SHA256
        if streams:
            vae.single_decode = streaming_single_decode(vae)
        try:
            return original(self, vae, samples, *args, **kwargs)
        finally:
            del vae.decode
            if streams:
                del vae.single_decode

    setattr(decode, WRAPPED, True)
    return decode


def upstream_digest(node_class: type) -> str:
    return hashlib.sha256(inspect.getsource(node_class.decode).encode()).hexdigest()


def patch(registry: Mapping[str, Any]) -> str:
    """Wrap ``registry[NODE].decode``; the line to log."""
    node_class = registry.get(NODE)
    if node_class is None:
        return f"{NODE} not loaded; nothing to do"
    current = getattr(node_class, "decode", None)
    if current is None or getattr(current, WRAPPED, False):
        return f"{NODE}.decode already wrapped or missing; nothing to do"
    try:
        digest = upstream_digest(node_class)
    except (OSError, TypeError):
        return f"{NODE}.decode's source cannot be read; decoding left as it is"
    if digest != UPSTREAM_SHA256:
        return (
            f"{NODE}.decode changed upstream (sha256 {digest[:12]}, expected "
            f"{UPSTREAM_SHA256[:12]}); decoding left as it is"
        )
    node_class.decode = wrap_node_decode(current)
    return f"{NODE} hands its frames to the host as one contiguous float32 tensor"


def install(executor_class: type, registry: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Patch ``registry``'s ``WanVideoDecode`` when ``executor_class`` (ComfyUI's
    ``PromptExecutor``) runs its first prompt; the line to log now."""
    if not enabled(env):
        return f"off ({ENV})"
    original = executor_class.execute_async
    if getattr(original, WRAPPED, False):
        return "already installed"
    global LATENTS_PER_CALL
    LATENTS_PER_CALL, refused = latents_per_call(env)
    if refused:
        log.warning("xicon_decode_frames: %s", refused)
    done: list[bool] = []

    @functools.wraps(original)
    async def execute_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            try:
                log.info("xicon_decode_frames: %s", patch(registry))
            except Exception:  # never break a prompt: the node then runs as upstream ships it
                log.exception("xicon_decode_frames: decoding left as it is")
        return await original(self, *args, **kwargs)

    setattr(execute_async, WRAPPED, True)
    executor_class.execute_async = execute_async
    chunks = "" if LATENTS_PER_CALL == 1 else f"; {LATENTS_PER_CALL} latent frames per decoder call"
    return f"{NODE} will be wrapped before the first prompt{chunks}"
