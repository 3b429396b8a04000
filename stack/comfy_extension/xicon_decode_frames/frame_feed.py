"""The decoded frames handed from a decoding thread to an encoder as they reach the host
(``decode_video``'s merged node): ``FrameFeed`` is the decode's ``decode_frames.Sink`` and the
encoder's source, ``FrameSequence`` what the encoder reads as its images, ``overlapped`` runs the
two side by side.

Contract: the encoder gets each frame once the decode has it on the host, normalised in a copy
of its own as WanVideoDecode normalises (clamp to [-1, 1], +1, /2, clamp to [0, 1]: element by
element, the same float32 values), or, where the frames do not come that way, from the decode's
result. A failed decode is raised as it came (``DecodeFailed`` only inside the encoder); a failed
encoder stops the decode at its next batch (``Abandoned``) and is raised; ``overlapped`` returns
or raises only once the decoding thread has ended. No ComfyUI here: ``decode_video`` gives the
decode, the encoder and ``feeding``.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

log = logging.getLogger("xicon_decode_frames")

# decoded frames waiting on the GPU before they go to the host, with the encoder waiting for
# them (the decode's own 128 MiB is 77 frames at 416x672: an 81-frame job's frames all came at
# its end, and the encode overlapped nothing there)
SINK_FLUSH_BYTES = 16 * 1024 * 1024


class DecodeFailed(Exception):
    """Raised into the encoder when the decode failed; the node raises the decode's own."""


class Abandoned(Exception):
    """Raised into the decode when the encoder has stopped: nobody wants its frames."""


class FrameFeed:
    """The decoded frames between the decoding thread and the encoder (``decode_frames.Sink``).

    Raw frames (the VAE's float32 values) are read while they arrive; once the VAE's decode has
    returned, ``decoded`` either holds the decoding thread until the encoder is done (``release``)
    and gives the node an empty clip (the frames all came: ``streamed``), or lets the node go on
    with its clip (``fallback``: the frames did not all come that way), whose normalised frames
    the encoder then reads from ``finish``'s result. ``fail`` passes the decode's exception on."""

    flush_bytes = SINK_FLUSH_BYTES

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.cond = threading.Condition()
        self.frames: torch.Tensor | None = None
        self.count = 0
        self.streamed = False
        self.fell_back = False
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.released = False
        self.abandoned = False

    # --- the decoding side (decode_frames.Sink) -------------------------------------------------
    def ready(self, frames: torch.Tensor, count: int) -> None:
        with self.cond:
            if self.abandoned:
                raise Abandoned("the video encode has stopped")
            if self.frames is not None and frames is not self.frames:
                return  # another clip of the batch: the node encodes the first one only
            self.frames, self.count = frames, count
            self.cond.notify_all()

    def fallback(self) -> None:
        with self.cond:
            self.fell_back = True
            self.cond.notify_all()

    def decoded(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        with self.cond:
            frames = self.frames
            whole = (
                not self.fell_back
                and frames is not None
                and len(videos) == 1
                and self.count == frames.shape[0]
                and videos[0].dim() == 4
                and videos[0].shape[1] == self.count
                and videos[0].data_ptr() == frames.data_ptr()
            )
            if not whole:
                self.fell_back = True
                self.cond.notify_all()
                return videos
            self.streamed = True
            self.cond.notify_all()
            while not self.released:
                self.cond.wait()
            return [videos[0][:, :0]]

    def finish(self, result: torch.Tensor) -> None:
        with self.cond:
            self.result = result
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()

    # --- the encoder's side ---------------------------------------------------------------------
    def frame(self, index: int) -> torch.Tensor:
        """Frame ``index`` (H, W, C) normalised as the node does, once decoded; IndexError past
        the last; ``DecodeFailed`` once the decode has failed."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise DecodeFailed(repr(self.error))
                if index < self.count and self.frames is not None:
                    raw = self.frames[index]
                    break
                if self.streamed:
                    raise IndexError(index)
                if self.result is not None:
                    if index < self.result.shape[0]:
                        return self.result[index]
                    raise IndexError(index)
                self.cond.wait()
        # the node's normalisation, element by element: the same float32 values
        image = raw.clone()
        image.clamp_(-1.0, 1.0)
        image.add_(1.0).div_(2.0)
        image.clamp_(0.0, 1.0)
        return image

    def release(self, abandon: bool) -> None:
        """The encoder is done (``abandon``: it failed): the decoding thread may go on."""
        with self.cond:
            self.released = True
            self.abandoned = abandon
            self.cond.notify_all()


class FrameSequence:
    """What ``combine_video`` reads as ``images``: the clip's length, its frames by index, and
    its frames in order, each waited for."""

    def __init__(self, feed: FrameFeed) -> None:
        self.feed = feed

    def __len__(self) -> int:
        return self.feed.expected

    def __getitem__(self, index: int) -> torch.Tensor:
        if not isinstance(index, int) or index < 0:
            raise TypeError("frames are read by a non-negative index")
        return self.feed.frame(index)

    def __iter__(self) -> Iterator[torch.Tensor]:
        index = 0
        while True:
            try:
                image = self.feed.frame(index)
            except IndexError:
                return
            yield image
            index += 1


def overlapped(
    decode: Callable[[], torch.Tensor],
    combine: Callable[[FrameSequence], Any],
    expected: int,
    feeding: Callable[[FrameFeed], AbstractContextManager[Any]],
) -> Any:
    """``combine`` over the frames ``decode`` (run on a thread of its own, inside
    ``feeding(feed)``: ``decode_frames.feeding``) hands over as they come; ``combine``'s result.
    Raises the decode's exception if it failed, else ``combine``'s; returns or raises once the
    thread has ended."""
    feed = FrameFeed(expected)
    context = contextvars.copy_context()  # ComfyUI's executing node: the progress bars' node id
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()

    started = time.perf_counter()
    decoded: list[float] = []

    def run() -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), feeding(feed):
                result = decode()
        except BaseException as error:  # handed to the encoder, raised by the node
            feed.fail(error)
        else:
            decoded.append(time.perf_counter() - started)
            feed.finish(result)

    thread = threading.Thread(target=context.run, args=(run,), name="xicon-decode-video")
    thread.start()
    combine_error: BaseException | None = None
    encoded = 0.0
    try:
        out = combine(FrameSequence(feed))
        encoded = time.perf_counter() - started
    except BaseException as error:
        combine_error = error
    finally:
        feed.release(abandon=combine_error is not None)
        thread.join()
    if feed.error is not None and not isinstance(feed.error, Abandoned):
        raise feed.error
    if combine_error is not None:
        raise combine_error
    frames = feed.count if feed.streamed else expected
    log.info(
        "xicon_decode_video: %d frames encoded as they were decoded (%s): the decode took "
        "%.2f s, the encode ended %.2f s after the decode began",
        frames,
        "streamed" if feed.streamed else "from the decode's result",
        decoded[0] if decoded else float("nan"),
        encoded,
    )
    return out
