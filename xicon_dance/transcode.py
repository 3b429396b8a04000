"""The driving clip's streamed transcode to the job's size, fps and length (``clip.ClipPlan``).

Contract: ``transcode(src, dest, plan, width, height, audio=..., stop=...) -> Transcoded`` streams
the driving video into ``dest`` (H.264 in MP4) at exactly width x height (scaled to cover, then
centre-cropped, as the template's node 131 ``ImageResizeKJv2`` crop/center would; display rotation
applied), at the job's fps (for each output time i/fps the source frame shown at that time),
exactly ``plan.frames`` frames, and, with ``audio``, the source audio encoded to AAC (the only
encode it gets: ``remux`` copies it into the result) and trimmed to the rendered length. One
decoded frame and a few queued frames at a time: memory does not grow with the clip's length,
resolution or rate. Setting ``stop`` ends it early with ``TranscodeStopped``; a video that cannot
be decoded to the end of the rendered part raises ``InputError(field, code="invalid_video")``. The
job runs it in its folder's thread pool (``jobdir.JobFolder.run``, which sets ``stop`` and waits
for the thread when the job is cancelled).

Three threads, so that decoding, the video encode and the audio encode overlap on a multi-core
host (PyAV releases the GIL in decode, swscale, encode and mux):

- the calling thread demuxes and decodes the video, picks for each output time i/fps the source
  frame shown at that time, scales and crops it (``cover_crop``) and converts it to the
  encoder's yuv420p exactly as PyAV's encode would (one swscale context each for the whole
  clip), and hands the frames in order to the encoder thread through a queue of
  ``QUEUE_FRAMES``;
- the video encoder thread encodes them (libx264, same frames in the same order as one thread
  would: the same bitstream);
- the audio thread opens the source a second time, demuxes only the audio, resamples it, shifts
  it to the first video frame's time (published by the calling thread), trims it to the rendered
  length and encodes it (AAC).

Both encoders mux into the one output under a lock (the muxer interleaves by time). The first
failure or a set ``stop`` ends every thread; all are joined before ``transcode`` returns or
raises, and a worker thread's error is raised in the caller (a decode/encode error as
``InputError(code="invalid_video")``, a stop as ``TranscodeStopped``). Memory: one decoded frame,
the queued frames and the muxer's interleaving buffer, whatever the clip's length.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from av.stream import Discard
from av.video.reformatter import VideoReformatter

from .errors import InputError

if TYPE_CHECKING:
    from .clip import ClipPlan

log = logging.getLogger(__name__)

VIDEO_CODEC = "libx264"
# near-lossless (crf 12) and quick to write and to read back: x264's ultrafast preset (no CABAC,
# no B-frames, no deblocking, no adaptive quantisation). Against superfast on the 60-s dance,
# 2 cores (bench/results/cpu_transcode_preset): the transcode 4.88 -> 4.05 s, node 130's load of
# it 3.78-3.89 -> 2.98 s, luma PSNR against a lossless encode 56.5 -> 58.9 dB; the file 40 %
# larger (19 MB a minute; it stays in the job's folder)
VIDEO_OPTIONS = {"crf": "12", "preset": "ultrafast"}
AUDIO_RATES = (48000, 44100, 32000, 24000, 22050, 16000)
QUEUE_FRAMES = 8  # frames between the decoder and the video encoder (416x672: 0.4 MB each)


@dataclass(frozen=True)
class Transcoded:
    path: Path
    frames: int
    has_audio: bool


class TranscodeStopped(Exception):
    """The transcode was told to stop (the job was cancelled or timed out)."""


class _Abandoned(Exception):
    """Another thread of the transcode failed or stopped: this one ends quietly."""


def transcode(
    src: Path,
    dest: Path,
    plan: ClipPlan,
    width: int,
    height: int,
    *,
    audio: bool = True,
    field: str = "video_url",
    stop: threading.Event | None = None,
) -> Transcoded:
    """Stream ``src`` into ``dest`` at the job's size, fps and length (see ``clip``'s doc)."""
    try:
        with av.open(str(src)) as inp, av.open(str(dest), "w", format="mp4") as out:
            job = _Transcode(src, inp, out, plan, width, height, audio, stop)
            job.run()
    except (av.FFmpegError, ValueError, OSError) as exc:
        log.info("transcode failed: %s: %s", type(exc).__name__, exc)
        raise InputError(
            f"{field}: unusable video (it could not be decoded to the end of the rendered part).",
            field=field,
            code="invalid_video",
        ) from None
    if job.frames_out == 0:
        raise InputError(
            f"{field}: unusable video (no frame could be decoded).",
            field=field,
            code="invalid_video",
        )
    return Transcoded(dest, job.frames_out, job.aout is not None)


class _Transcode:
    """One transcode: video frames decoded, picked by time, cropped and converted in the calling
    thread, encoded in a second; the audio decoded, shifted to the video's start, trimmed and
    re-encoded in a third (see module doc)."""

    def __init__(
        self,
        src: Path,
        inp: Any,
        out: Any,
        plan: ClipPlan,
        width: int,
        height: int,
        audio: bool,
        stop: threading.Event | None,
    ) -> None:
        self.src, self.inp, self.out, self.plan = src, inp, out, plan
        self.width, self.height = width, height
        self.stop = stop if stop is not None else threading.Event()
        self.failed = threading.Event()  # set by the first thread that ends with an error
        self.errors: list[BaseException] = []
        self.mux_lock = threading.Lock()
        self.frames: queue.Queue[Any] = queue.Queue(QUEUE_FRAMES)  # yuv420p frames, then None
        self.end_seen = False  # the encoder thread took the decoder's end mark
        self.vin = inp.streams.video[0]
        self.vin.thread_type = "AUTO"
        self.vout = out.add_stream(VIDEO_CODEC, rate=plan.fps)
        self.vout.width, self.vout.height, self.vout.pix_fmt = width, height, "yuv420p"
        self.vout.codec_context.time_base = Fraction(1, plan.fps)
        self.vout.options = dict(VIDEO_OPTIONS)
        ain = inp.streams.audio[0] if audio and inp.streams.audio else None
        self.aout: Any = None
        if ain is not None:
            rate = ain.rate if ain.rate in AUDIO_RATES else 48000
            layout = "mono" if ain.channels == 1 else "stereo"
            self.aout = out.add_stream("aac", rate=rate, layout=layout)
            self.audio_index = ain.index
            self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            self.audio_end = round(plan.duration_s * rate)
            self.samples_out = 0
            self.audio_origin: int | None = None
        for stream in inp.streams:
            if stream is not self.vin:
                stream.discard = Discard.all  # this reader reads the video only
        self.frames_picked = 0  # frames queued (calling thread)
        self.frames_out = 0  # frames encoded (video encoder thread)
        self.origin: float | None = None  # time of the first video frame
        self.origin_known = threading.Event()  # set once origin is known or the video pass ended
        self.prev: Any = None  # the last decoded frame
        self.prev_yuv: Any = None  # it, cropped and converted (made once, queued once per output)
        self.crop = VideoReformatter()
        self.to_yuv = VideoReformatter()

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        """Run the three parts, join every thread, raise the first error (see module doc)."""
        self.out.start_encoding()  # opens both encoders here, not in a worker thread's first mux
        parts = [("transcode-video", self._video_encoder)]
        if self.aout is not None:
            parts.append(("transcode-audio", functools.partial(self._guard, self._audio)))
        started: list[threading.Thread] = []
        try:
            for name, target in parts:
                thread = threading.Thread(target=target, name=name)
                thread.start()
                started.append(thread)
            self._guard(self._decode_video)
        except BaseException:  # a thread could not start: end those that did
            self.failed.set()
            raise
        finally:
            self.origin_known.set()  # the audio thread waits for nothing more
            self.frames.put(None)  # the encoder takes frames until this end mark
            for thread in started:
                thread.join()
        if self.errors:
            raise self.errors[0]

    def _guard(self, part: Callable[[], None]) -> None:
        """Run one part; its error is kept for the caller and ends the other parts."""
        try:
            part()
        except _Abandoned:
            pass
        except BaseException as exc:  # re-raised in the calling thread by run()
            self.errors.append(exc)
            self.failed.set()

    def _check(self) -> None:
        """Raise when the transcode was stopped or another thread failed."""
        if self.stop.is_set():
            raise TranscodeStopped()
        if self.failed.is_set():
            raise _Abandoned()

    # ------------------------------------------------------------------ video: calling thread
    def _decode_video(self) -> None:
        for packet in self.inp.demux(self.vin):
            self._check()
            for frame in packet.decode():
                self._video_frame(frame)
            if self.video_done:
                break
        while not self.video_done and self.prev is not None:  # the clip ended: hold its last frame
            self._emit()

    @property
    def video_done(self) -> bool:
        return self.frames_picked >= self.plan.frames

    def _video_frame(self, frame: Any) -> None:
        t = frame.time if frame.time is not None else self.frames_picked / self.plan.fps
        if self.origin is None:
            self.origin = t
            self.origin_known.set()
        t -= self.origin
        # the previous frame is shown until this one: it serves every output time before it
        while self.prev is not None and not self.video_done and self._next_time() < t - 1e-4:
            self._emit()
        self.prev, self.prev_yuv = frame, None

    def _next_time(self) -> float:
        return self.frames_picked / self.plan.fps

    def _emit(self) -> None:
        self._check()
        if self.prev_yuv is None:
            rgb = cover_crop(self.prev, self.width, self.height, self.crop)
            ctx = self.vout.codec_context
            # what PyAV's encode does to an rgb24 frame (same arguments), done here in parallel
            self.prev_yuv = self.to_yuv.reformat(
                av.VideoFrame.from_ndarray(rgb, format="rgb24"),
                ctx.width,
                ctx.height,
                ctx.format,
                threads=ctx.thread_count,
            )
        self.frames.put(self.prev_yuv)  # a held frame goes again: the encoder copies, never writes
        self.frames_picked += 1

    # ------------------------------------------------------------------ video: encoder thread
    def _video_encoder(self) -> None:
        """Encode the frames up to the end mark; whatever happened, take (and drop) the rest up to
        it, so the decoder never waits on a full queue."""
        self._guard(self._encode_video)
        while not self.end_seen:
            self._next_frame()

    def _next_frame(self) -> Any:
        frame = self.frames.get()
        self.end_seen = frame is None
        return frame

    def _encode_video(self) -> None:
        while (frame := self._next_frame()) is not None:
            self._check()
            frame.pts = self.frames_out
            frame.time_base = Fraction(1, self.plan.fps)
            self._mux(self.vout.encode(frame))
            self.frames_out += 1
        self._check()
        self._mux(self.vout.encode(None))

    def _mux(self, packets: list[Any]) -> None:
        with self.mux_lock:
            self.out.mux(packets)

    # ------------------------------------------------------------------ audio thread
    def _audio(self) -> None:
        """Decode, resample, shift (to the first video frame's time), trim and encode the audio,
        from a second reader of the source."""
        with av.open(str(self.src)) as inp:
            ain = inp.streams[self.audio_index]
            for stream in inp.streams:
                if stream is not ain:
                    stream.discard = Discard.all  # this reader reads the audio only
            for packet in inp.demux(ain):
                self._check()
                for frame in packet.decode():
                    self._audio_frame(frame)
                if self.samples_out >= self.audio_end:
                    break
        self._check()
        self._mux(self.aout.encode(None))

    def _audio_frame(self, frame: Any) -> None:
        for part in self.resampler.resample(frame):
            samples = part.to_ndarray()
            if self.audio_origin is None:
                self.origin_known.wait()  # set by the video's first frame or the video's end
                self._check()
                start = part.time if part.time is not None else 0.0
                lead = round((start - (self.origin or 0.0)) * part.sample_rate)
                self.audio_origin = lead
                if lead > 0:  # audio starts after the first picture: keep it in sync
                    self._write_samples(np.zeros((samples.shape[0], lead), np.float32))
                elif lead < 0:  # audio before the first picture is not part of the clip
                    samples = samples[:, -lead:]
            self._write_samples(samples)

    def _write_samples(self, samples: np.ndarray) -> None:
        samples = samples[:, : max(0, self.audio_end - self.samples_out)]
        if samples.shape[1] == 0:
            return
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.float32),
            format="fltp",
            layout=self.aout.layout.name,
        )
        frame.sample_rate = self.aout.rate
        frame.pts = self.samples_out
        frame.time_base = Fraction(1, self.aout.rate)
        self._mux(self.aout.encode(frame))
        self.samples_out += samples.shape[1]


def cover_crop(
    frame: Any, width: int, height: int, reformatter: VideoReformatter | None = None
) -> np.ndarray:
    """The frame as displayed (rotation applied), scaled to cover width x height, centre-cropped:
    the picture node 131 (ImageResizeKJv2, keep_proportion crop, crop_position center) makes.
    ``reformatter``: one swscale context kept for a whole clip (same pixels, no per-frame set-up;
    the default makes one for this frame)."""
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # counter-clockwise quarter turns
    shown_w, shown_h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    scale = max(width / shown_w, height / shown_h)
    cover_w = max(width, round(shown_w * scale))
    cover_h = max(height, round(shown_h * scale))
    coded_w, coded_h = (cover_h, cover_w) if turns % 2 else (cover_w, cover_h)
    # area averaging when shrinking (anti-aliased, 3x quicker than lanczos at 1080p), else lanczos
    interpolation = "AREA" if scale < 1 else "LANCZOS"
    rgb = (reformatter or VideoReformatter()).reformat(
        frame, width=coded_w, height=coded_h, format="rgb24", interpolation=interpolation
    )
    rgb = rgb.to_ndarray()
    if turns:
        rgb = np.rot90(rgb, turns)
    x, y = (cover_w - width) // 2, (cover_h - height) // 2
    return np.ascontiguousarray(rgb[y : y + height, x : x + width])
