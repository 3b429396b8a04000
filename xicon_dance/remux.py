"""The result file: ComfyUI's video with the driving clip's audio, both copied, never re-encoded.

Contract:
- ``finish(video, audio_from, dest) -> bool`` writes ``dest`` (MP4): the first video stream of
  ``video`` (node 139's silent H.264) and, when ``audio_from`` is given and has an audio stream,
  that stream (the AAC the worker encoded while transcoding the driving clip, already trimmed to
  the rendered length), packet for packet, without decoding. Audio packets that start at or after
  the video's end are left out. Packets are interleaved by time and the index (``moov``) is put
  at the front (``+faststart``), so a player can start before the whole file has arrived.
  Returns whether ``dest`` has audio. An unreadable ``video`` raises ``ComfyError``
  (``comfyui_output_invalid``).

Why here and not in node 139: VHS_VideoCombine would decode the audio to float32 and encode it to
AAC again (a second lossy generation, ``videohelpersuite/nodes.py`` ~L577-600), and its audio
link to node 130 keeps node 130's whole output, every frame of the clip as float32, alive until
the very last node (ComfyUI's execution list holds a node's outputs until all its readers ran,
``comfy_execution/graph.py`` ``cache_link``/``complete_node_execution``); without the link those
frames are released to ComfyUI's RAM-pressure cache once the pose nodes have read them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import av
from av.container import InputContainer

from .errors import ComfyError

log = logging.getLogger(__name__)


def finish(video: Path, audio_from: Path | None, dest: Path) -> bool:
    """Write ``dest`` from ``video`` and the audio of ``audio_from`` (see module doc)."""
    try:
        with av.open(str(video)) as vin:
            if not vin.streams.video:
                raise ValueError("no video stream")
            if audio_from is None:
                return _write(vin, None, dest)
            with av.open(str(audio_from)) as ain:
                return _write(vin, ain if ain.streams.audio else None, dest)
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise ComfyError(
            f"ComfyUI wrote an unreadable output video {video.name}: {exc}",
            code="comfyui_output_invalid",
        ) from None


def _write(vin: InputContainer, ain: InputContainer | None, dest: Path) -> bool:
    """Video packets streamed from ``vin``; the audio (small) read first, merged in by time."""
    vsrc = vin.streams.video[0]
    end = float(vsrc.duration * vsrc.time_base) if vsrc.duration else math.inf
    with av.open(str(dest), "w", format="mp4", options={"movflags": "+faststart"}) as out:
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
    log.debug("result %s written: %d audio packets", dest.name, len(audio))
    return bool(audio)


def _seconds(ts: int, packet: av.Packet) -> float:
    return float(ts * packet.time_base)
