"""The result file: ComfyUI's video with the driving clip's audio, both copied, never re-encoded.

Contract:
- ``finish(video, audio_from, dest) -> bool`` writes ``dest`` (MP4): the first video stream of
  ``video`` (node 139's silent H.264) and, when ``audio_from`` is given and has an audio stream,
  that stream (the AAC the worker encoded while transcoding the driving clip, already trimmed to
  the rendered length), packet for packet, without decoding. Audio packets that start at or after
  the video's end are left out. Packets are interleaved by time and the index (``moov``) is put
  at the front (``+faststart``), so a player can start before the whole file has arrived.
  Returns whether ``dest`` has audio. A ``video`` that cannot be read raises ``ComfyError``
  (``comfyui_output_invalid``); a failure to write ``dest`` (a full disk) raises
  ``DeliveryError`` (``output_write_failed``). The cause goes to the log, not into the answer.

Why here and not in node 139: VHS_VideoCombine would decode the audio to float32 and encode it to
AAC again (a second lossy generation, ``videohelpersuite/nodes.py`` ~L577-600), and its audio
link to node 130 keeps node 130's whole output, every frame of the clip as float32, alive until
the very last node (ComfyUI's execution list holds a node's outputs until all its readers ran,
``comfy_execution/graph.py`` ``cache_link``/``complete_node_execution``); without the link those
frames are released to ComfyUI's RAM-pressure cache once the pose nodes have read them.
"""

from __future__ import annotations

import errno
import logging
import math
from pathlib import Path

import av
from av.container import InputContainer, OutputContainer

from .errors import ComfyError, DeliveryError

log = logging.getLogger(__name__)


_AV_ERRORS = (av.FFmpegError, ValueError, OSError)


def finish(video: Path, audio_from: Path | None, dest: Path) -> bool:
    """Write ``dest`` from ``video`` and the audio of ``audio_from`` (see module doc)."""
    try:
        vin = av.open(str(video))
    except _AV_ERRORS as exc:
        raise _unreadable(video, exc) from None
    with vin:
        if not vin.streams.video:
            raise _unreadable(video, ValueError("no video stream"))
        try:
            out = av.open(str(dest), "w", format="mp4", options={"movflags": "+faststart"})
        except _AV_ERRORS as exc:
            raise _unwritable(dest, exc) from None
        try:
            with out:
                if audio_from is None:
                    return _write(vin, None, out)
                with av.open(str(audio_from)) as ain:
                    return _write(vin, ain if ain.streams.audio else None, out)
        except _AV_ERRORS as exc:
            # A system error (ENOSPC, EACCES, ENOENT...) comes from the output file, which
            # FFmpeg opens at the first write; the input is open already and its faults are
            # FFmpeg's own codes (invalid data), which are not system errno values.
            if getattr(exc, "errno", None) in errno.errorcode:
                raise _unwritable(dest, exc) from None
            raise _unreadable(video, exc) from None


def _unreadable(video: Path, exc: BaseException) -> ComfyError:
    log.warning("output %s cannot be read: %s: %s", video.name, type(exc).__name__, exc)
    return ComfyError(
        f"ComfyUI wrote an unreadable output video {video.name}.", code="comfyui_output_invalid"
    )


def _unwritable(dest: Path, exc: BaseException) -> DeliveryError:
    log.warning("result %s cannot be written: %s: %s", dest.name, type(exc).__name__, exc)
    reason = getattr(exc, "strerror", None) or "I/O error"
    return DeliveryError(
        f"The result video could not be written ({reason}).", code="output_write_failed"
    )


def _write(vin: InputContainer, ain: InputContainer | None, out: OutputContainer) -> bool:
    """Video packets streamed from ``vin``; the audio (small) read first, merged in by time."""
    vsrc = vin.streams.video[0]
    end = float(vsrc.duration * vsrc.time_base) if vsrc.duration else math.inf
    vout = out.add_stream_from_template(vsrc)
    aout, audio = None, []
    if ain is not None:
        asrc = ain.streams.audio[0]
        aout = out.add_stream_from_template(asrc)
        audio = [
            p
            for p in ain.demux(asrc)
            if p.dts is not None and (p.pts is None or _seconds(p.pts, p) < end)
        ]
    queue = iter(audio)
    pending = next(queue, None)
    for packet in vin.demux(vsrc):
        if packet.dts is None:
            continue
        at = _seconds(packet.dts, packet)
        while pending is not None and _seconds(pending.dts, pending) <= at:
            pending.stream = aout
            out.mux(pending)
            pending = next(queue, None)
        packet.stream = vout
        out.mux(packet)
    while pending is not None:
        pending.stream = aout
        out.mux(pending)
        pending = next(queue, None)
    return bool(audio)


def _seconds(ts: int, packet: av.Packet) -> float:
    return float(ts * packet.time_base)
