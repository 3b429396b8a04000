"""Job inputs: safe download, base64 decode or network-volume copy, content checks.

OWNER: core-input helper.

Contract:
- ``ImageInfo(path, width, height, format, bytes)``; ``VideoInfo(path, width, height, fps, frames,
  duration_s, has_audio, bytes)`` (frozen dataclasses).
- ``job_folder(settings, job_id)`` (from ``xicon_dance.jobdir``): ``async with`` it to get the
  job's ``JobFolder`` (``<comfy_input_dir>/jobs/<safe id>``); every blocking step below runs in
  that folder's threads, which are joined before the folder is removed, once, when the job ends.
- ``async fetch_image(job: JobInput, folder: JobFolder, settings) -> ImageInfo`` and
  ``async fetch_video(job, folder, settings) -> VideoInfo``: from URL (http/https only, SSRF guard
  after DNS resolution and on every redirect, at most 5 redirects, byte caps, timeouts, retries
  with backoff on connection errors and 5xx) or base64 (raw or data: URI, length capped before
  decoding) or a file on the endpoint's network volume (``image_path`` / ``video_path``, see
  ``xicon_dance.volume``), or the default video. Content checked by decoding (Pillow with the
  decompression-bomb limit; PyAV probe). Every failure raises ``InputError(field=...)`` with a
  clear sentence.
- ``probe_video(path) -> VideoInfo`` (also used on the result video), ``VideoInfo`` and
  ``ProbeStopped`` come from ``xicon_dance.video_probe`` and are re-exported here.

Details:
- ``input_name(settings, path) -> str``: the name ComfyUI loaders take (relative to the ComfyUI
  input folder, POSIX separators), e.g. ``jobs/<id>/reference.png``.
- Files in the job folder get generated names (``reference.<ext>``, ``driving.<ext>``), never the
  caller's. Images keep their original bytes; the extension follows the decoded format. The
  default video is linked (or copied) into the job folder so that every input is under it.
- Reported image width/height are after EXIF orientation (as ComfyUI's LoadImage sees them).
- ``probe_video(path, field=..., stop=...)`` raises ``InputError(code="invalid_video"|
  "too_many_pixels")``; a caller probing a result video converts that into its own error. Its
  long loops (decoding up to the first frame, counting packets) end early once ``stop`` is set
  (the job was cancelled or timed out).
- ``check_default_video(settings) -> VideoInfo`` probes the bundled default video; a missing or
  broken one raises ``ConfigError(code="default_video_missing")`` (call it at start).
- URL downloads are ``xicon_dance.download`` (SSRF guard of ``xicon_dance.netguard``, redirects,
  caps, timeouts, retries); network-volume paths are ``xicon_dance.volume``.
- Error codes: see ``xicon_dance.schema.INPUT_ERROR_CODES``. Messages show a URL without its
  query string (presigned URLs carry credentials there).
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError

from .download import download, too_large
from .errors import ConfigError, InputError
from .jobdir import JobFolder, job_folder, safe_job_id
from .schema import JobInput
from .settings import Settings
from .video_probe import ProbeStopped, VideoInfo, probe_video, video_extension
from .volume import copy_from_volume

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 16
IMAGE_FORMATS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
}
__all__ = [
    "ImageInfo",
    "ProbeStopped",
    "VideoInfo",
    "check_default_video",
    "fetch_image",
    "fetch_video",
    "input_name",
    "job_folder",
    "probe_video",
    "safe_job_id",
]


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int
    height: int
    format: str
    bytes: int


# --------------------------------------------------------------------------- job folder


def input_name(settings: Settings, path: Path) -> str:
    """The file name ComfyUI's loaders take: relative to its input folder, POSIX separators."""
    return Path(path).resolve().relative_to(Path(settings.comfy_input_dir).resolve()).as_posix()


# --------------------------------------------------------------------------- public fetchers


async def fetch_image(job: JobInput, folder: JobFolder, settings: Settings) -> ImageInfo:
    """Get the reference image into ``folder`` and check it by decoding."""
    staging = folder.path / "reference.part"
    if job.image_url is not None:
        field = "image_url"
        await download(job.image_url, staging, settings.max_image_bytes, field, settings)
    elif job.image_path is not None:
        field = "image_path"
        await folder.run(
            copy_from_volume,
            settings,
            job.image_path,
            staging,
            settings.max_image_bytes,
            field,
            folder.stop,
        )
    else:
        field = "image_base64"
        data = job.image_base64 or ""
        await folder.run(decode_base64_to_file, data, staging, settings.max_image_bytes, field)
    width, height, fmt = await folder.run(check_image, staging, field)
    final = folder.path / f"reference.{IMAGE_FORMATS[fmt]}"
    staging.replace(final)
    info = ImageInfo(final, width, height, fmt, final.stat().st_size)
    log.info("reference image from %s: %dx%d %s, %d bytes", field, width, height, fmt, info.bytes)
    return info


async def fetch_video(job: JobInput, folder: JobFolder, settings: Settings) -> VideoInfo:
    """Get the driving video into ``folder`` (or link the default video) and probe it."""
    staging = folder.path / "driving.part"
    cap = settings.max_video_bytes
    if job.video_url is not None:
        field = "video_url"
        await download(job.video_url, staging, cap, field, settings)
    elif job.video_path is not None:
        field = "video_path"
        await folder.run(
            copy_from_volume, settings, job.video_path, staging, cap, field, folder.stop
        )
    elif job.video_base64 is not None:
        field = "video_base64"
        await folder.run(decode_base64_to_file, job.video_base64, staging, cap, field)
    else:
        return await folder.run(_use_default_video, folder.path, settings, folder.stop)
    info, extension = await folder.run(_probe_staged, staging, field, folder.stop)
    final = folder.path / f"driving.{extension}"
    staging.replace(final)
    _log_video(field, info)
    return dataclasses.replace(info, path=final)


def _probe_staged(path: Path, field: str, stop: threading.Event) -> tuple[VideoInfo, str]:
    return probe_video(path, field=field, stop=stop), video_extension(path)


def check_default_video(
    settings: Settings, path: Path | None = None, stop: threading.Event | None = None
) -> VideoInfo:
    """Probe the bundled default video (or its copy ``path``); missing/broken -> ``ConfigError``."""
    source = Path(settings.default_video)
    if not source.is_file():
        raise ConfigError(
            f"The default driving video {source.name} is missing (DEFAULT_VIDEO); jobs without "
            "video_url, video_base64 or video_path cannot run.",
            code="default_video_missing",
        )
    try:
        return probe_video(path or source, field="video_url", stop=stop)
    except InputError as exc:
        raise ConfigError(
            f"The default driving video {source.name} is unusable: {exc.message}",
            code="default_video_missing",
        ) from None


def _use_default_video(folder: Path, settings: Settings, stop: threading.Event) -> VideoInfo:
    source = Path(settings.default_video)
    final = folder / f"driving{source.suffix or '.mp4'}"
    if source.is_file():
        _link_or_copy(source, final)
    info = check_default_video(settings, final, stop)
    _log_video("the default video", info)
    return info


def _log_video(source: str, info: VideoInfo) -> None:
    log.info(
        "driving video from %s: %dx%d, %d frames at %g fps, %.2fs, audio %s, %d bytes",
        source,
        info.width,
        info.height,
        info.frames,
        info.fps,
        info.duration_s,
        "yes" if info.has_audio else "no",
        info.bytes,
    )


# --------------------------------------------------------------------------- base64


def decode_base64_to_file(data: str, dest: Path, max_bytes: int, field: str) -> int:
    """Strict base64 (raw or ``data:...;base64,``) -> ``dest``; the length is capped first."""
    limit = _b64_limit(max_bytes)
    if len(data) > limit + limit // 50 + 512:  # room for line breaks and a data: header
        raise too_large(field, max_bytes, f"the base64 text has {len(data)} characters")
    text = data.strip()
    if text[:5].lower() == "data:":
        header, sep, text = text.partition(",")
        if not sep:
            raise InputError(f"{field}: the data: URI has no ',' before the data.", **_b64(field))
        if not header.lower().endswith(";base64"):
            raise InputError(
                f"{field}: the data: URI must be base64-encoded (';base64,').", **_b64(field)
            )
    if any(ch.isspace() for ch in text[:1024]) or any(ch.isspace() for ch in text[-1024:]):
        text = "".join(text.split())
    if len(text) > limit:
        raise too_large(field, max_bytes, f"the base64 text has {len(text)} characters")
    if not text:
        raise InputError(f"{field}: is empty.", **_b64(field))
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(
            f"{field}: is not valid base64 ({_b64_reason(exc)}).", **_b64(field)
        ) from None
    if not raw:
        raise InputError(f"{field}: decodes to zero bytes.", **_b64(field))
    if len(raw) > max_bytes:
        raise too_large(field, max_bytes, f"it decodes to {len(raw)} bytes")
    dest.write_bytes(raw)
    return len(raw)


def _b64_limit(max_bytes: int) -> int:
    return 4 * ((max_bytes + 2) // 3)


def _b64(field: str) -> dict[str, Any]:
    return {"field": field, "code": "invalid_base64"}


def _b64_reason(exc: Exception) -> str:
    text = str(exc).strip().rstrip(".")
    return text[:1].lower() + text[1:] if text else "undecodable"


# --------------------------------------------------------------------------- images


def check_image(path: Path, field: str) -> tuple[int, int, str]:
    """Decode the image fully; returns (width, height, format) after EXIF orientation."""
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    try:
        with _bomb_is_an_error(), Image.open(path) as im:
            fmt = im.format or ""
            width, height = im.size
            _check_image_header(fmt, width, height, limit, field)
            if fmt != "MPO" and getattr(im, "n_frames", 1) > 1:
                raise InputError(
                    f"{field}: animated images are not supported; send a single still image.",
                    field=field,
                    code="invalid_image",
                )
            im.verify()
        with _bomb_is_an_error(), Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(field, limit) from None
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = (
            "it is not an image" if isinstance(exc, UnidentifiedImageError) else "it is damaged"
        )
        raise InputError(
            f"{field}: the image cannot be decoded ({reason}).", field=field, code="invalid_image"
        ) from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height, fmt


def _check_image_header(fmt: str, width: int, height: int, limit: int, field: str) -> None:
    if fmt not in IMAGE_FORMATS:
        allowed = ", ".join(sorted(set(IMAGE_FORMATS) - {"MPO"}))
        raise InputError(
            f"{field}: image format {fmt or 'unknown'} is not supported (use {allowed}).",
            field=field,
            code="invalid_image",
        )
    if width * height > limit:
        raise _too_many_pixels(field, limit, f"{width}x{height}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(
            f"{field}: the image is {width}x{height} pixels; at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed.",
            field=field,
            code="invalid_image",
        )


def _too_many_pixels(field: str, limit: int, size: str = "") -> InputError:
    shown = f" ({size})" if size else ""
    return InputError(
        f"{field}: the image has more than {limit} pixels{shown}; refused as a possible "
        "decompression bomb.",
        field=field,
        code="too_many_pixels",
    )


@contextlib.contextmanager
def _bomb_is_an_error() -> Iterator[None]:
    """Pillow *warns* for MAX_IMAGE_PIXELS..2x and raises only above 2x; here both are errors
    (caught by ``check_image`` and answered as ``too_many_pixels``), so nothing is printed. The
    filter is scoped to the block, not set for the whole process (where pytest, for one, resets
    it and the warning would be printed after all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


# Truncated images must fail, not be padded with grey (it only makes Pillow stricter here).
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
