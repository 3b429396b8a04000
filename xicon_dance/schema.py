"""Job input schema (pydantic v2). OWNER: core-input helper.

Contract:
- ``parse_job_input(raw: object, settings: Settings) -> JobInput`` validates the RunPod
  ``job["input"]``. Raises ``InputError(field=<name>, message=<one sentence naming the field and
  the reason>)``. Unknown keys are refused by name. Exactly one of image_url / image_base64 /
  image_path. At most one of video_url / video_base64 / video_path (none -> the bundled default
  video).
- Fields and defaults: image_url, image_base64, image_path, video_url, video_base64, video_path,
  prompt ("the person starts to dance"), negative_prompt (the usual Wan negative prompt), width
  (416), height (672) (multiples of 32, 256..1280), auto_size (false), steps (6; 1..50), cfg
  (1.0; 0..20), seed (0; -1 = random), fps (24; 1..60), max_frames (unset; capped by
  settings.max_frames when that is set, rounded down to 4n+1), max_seconds (unset; 0.1..3600),
  context_overlap (unset: the graph's 48; 4..64, a multiple of 4), keep_audio (true), output
  ("auto" | "url" | "base64"). Without max_frames/max_seconds the whole
  driving clip is rendered up to ``MAX_SECONDS`` (see ``xicon_dance.clip.plan_clip``).
- ``JobInput.resolve_size(image_width, image_height) -> tuple[int, int]``: with auto_size, a
  dimension the caller did not give is derived from the reference image aspect ratio (multiple of
  32, in range).
- ``JobInput.resolve_seed() -> int``: -1 -> a random seed in the sampler's range.

Details:
- Types are strict: ``"6"`` is not a number and ``1`` is not a boolean (a caller's typo must not
  be guessed at). Integers are accepted where a float is expected (cfg).
- ``max_frames`` below 5 is refused; above ``settings.max_frames`` (when set) it is capped; the
  result is rounded down to the form 4n+1 (Wan's frame rule).
- ``seed`` is -1 or 0..2**64-1 (the sampler's range); ``resolve_seed`` draws a random seed in
  0..2**32-1.
- Prompts are at most ``MAX_PROMPT_CHARS`` characters and contain no NUL or other control
  characters (tab and newlines are allowed); ``prompt`` must not be blank.
- URLs: http or https, a host, at most ``MAX_URL_CHARS`` characters, no user:password part. Where
  they point is checked by ``xicon_dance.download`` (SSRF guard after DNS resolution).
- Paths (``image_path`` / ``video_path``): a file on the endpoint's network volume, for inputs
  too large to send (RunPod mounts the volume at ``/runpod-volume``). Relative to the volume
  root (``VOLUME_ROOT``, default ``/runpod-volume``) or absolute under it, e.g.
  ``"inputs/dancer.png"`` or ``"/runpod-volume/inputs/dance.mp4"``. At most ``MAX_PATH_CHARS``
  characters, no control characters, no ``..`` component. Refused here when
  ``VOLUME_ROOT=off`` (``path_forbidden``). When the job runs, ``xicon_dance.volume`` checks that
  the real path (symlinks resolved) stays inside the root and is a regular file (not a
  directory, FIFO, socket or device), opens it safely and copies it into the job folder; the
  byte caps (``MAX_IMAGE_BYTES`` / ``MAX_VIDEO_BYTES``) and the content checks are the same as
  for URLs.
- ``output="url"`` needs a configured bucket; this is refused here, before any work is done.
- With ``auto_size`` and neither width nor height given, the size keeps the default pixel area
  (416 x 672) at the reference image's aspect ratio.

Error codes (``InputError.code``), see ``INPUT_ERROR_CODES`` (media codes included):
``invalid_input`` (wrong type, out of range, bad choice), ``unknown_field``, ``missing_image``,
``conflicting_inputs`` (more than one source for the image or the video), ``unsupported_url``,
``bucket_not_configured`` and the media codes ``url_forbidden``, ``download_failed``,
``too_large``, ``invalid_base64``, ``invalid_image``, ``too_many_pixels``, ``invalid_video``,
``path_forbidden``, ``path_not_found``, ``path_not_file``, and ``clip_too_long`` (frames x size
over ``MAX_CLIP_MEMORY_GB``, see ``xicon_dance.clip``).
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails

from .errors import InputError
from .settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "the person starts to dance"
# The standard negative prompt shipped with Wan 2.1 (and the SCAIL example workflow).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
DEFAULT_WIDTH = 416
DEFAULT_HEIGHT = 672
MIN_SIDE = 256
MAX_SIDE = 1280
SIDE_STEP = 32
MIN_FRAMES = 5
# Context windows (node 355, pixel frames; the sampler uses overlap // 4 latent frames of the
# window's 21): the overlap a job may ask for. Windows per step grow steeply with it: for 60 s of
# dance (1441 frames, 6 steps) 136 window-steps at 16, 239 at 48, 419 at 64, 693 at 72 and 2046
# at 80 (the pinned schedule, ``context_windows``); at 72 a 60-s clip would already take about
# an hour on an RTX 5090 (estimated 4.7 s per window-step), the default ``JOB_TIMEOUT_S``.
MIN_OVERLAP, MAX_OVERLAP, OVERLAP_STEP = 4, 64, 4
MAX_PROMPT_CHARS = 2000
MAX_URL_CHARS = 4096
MAX_PATH_CHARS = 4096
SEED_MAX = 2**64 - 1
RANDOM_SEED_MAX = 2**32 - 1

INPUT_ERROR_CODES: dict[str, str] = {
    "invalid_input": "a field has the wrong type, is out of range or is not an allowed value",
    "unknown_field": "the input has a key this worker does not know (often a typo)",
    "missing_image": "none of image_url, image_base64 or image_path was given",
    "conflicting_inputs": "more than one source for the image or the video was given",
    "unsupported_url": "a URL is malformed, too long, not http/https or carries credentials",
    "bucket_not_configured": "output 'url' was asked for but no bucket is configured",
    "url_forbidden": "a URL (or a redirect) leads to a private, loopback or metadata address",
    "download_failed": "a URL could not be downloaded (HTTP error, timeout, too many redirects)",
    "too_large": "a download or base64 payload is larger than the configured byte cap",
    "invalid_base64": "a base64 field is not valid base64 (or not a base64 data: URI)",
    "invalid_image": "the reference image cannot be decoded or has an unsupported format",
    "too_many_pixels": "an image or video has more pixels than allowed (decompression bomb)",
    "invalid_video": "the driving video has no video stream, no frames or cannot be decoded",
    "path_forbidden": "a path leads outside the network volume, contains '..', cannot be read, "
    "or path inputs are off (VOLUME_ROOT=off)",
    "path_not_found": "a path names no file on the network volume (or no volume is mounted)",
    "path_not_file": "a path names a directory, FIFO, socket or device, not a regular file",
    "clip_too_long": "the rendered frames at this size exceed the worker's memory budget",
}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_PATH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no tab or newline in a path either
IMAGE_SOURCES = ("image_url", "image_base64", "image_path")
VIDEO_SOURCES = ("video_url", "video_base64", "video_path")
_FIELD_ORDER = (*IMAGE_SOURCES, *VIDEO_SOURCES)


class _PathForbidden(ValueError):
    """A path refused for where it may lead (``path_forbidden``), not for its form."""


class JobInput(BaseModel):
    """One validated job. Build it with ``parse_job_input``; the model itself is immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    image_url: str | None = None
    image_base64: str | None = None
    image_path: str | None = None
    video_url: str | None = None
    video_base64: str | None = None
    video_path: str | None = None
    prompt: str = Field(DEFAULT_PROMPT, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, max_length=MAX_PROMPT_CHARS)
    width: int = Field(DEFAULT_WIDTH, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP)
    height: int = Field(DEFAULT_HEIGHT, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP)
    auto_size: bool = False
    steps: int = Field(6, ge=1, le=50)
    cfg: float = Field(1.0, ge=0.0, le=20.0, allow_inf_nan=False)
    seed: int = Field(0, ge=-1, le=SEED_MAX)
    fps: int = Field(24, ge=1, le=60)
    max_frames: int | None = Field(None, ge=MIN_FRAMES)
    max_seconds: float | None = Field(None, ge=0.1, le=3600.0, allow_inf_nan=False)
    context_overlap: int | None = Field(
        None, ge=MIN_OVERLAP, le=MAX_OVERLAP, multiple_of=OVERLAP_STEP
    )
    keep_audio: bool = True
    output: Literal["auto", "url", "base64"] = "auto"

    @field_validator("image_url", "video_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        _check_url_syntax(value)
        return value

    @field_validator("image_path", "video_path")
    @classmethod
    def _check_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        settings = (info.context or {}).get("settings")
        if settings is not None and settings.volume_root is None:
            raise _PathForbidden("path inputs are turned off on this worker (VOLUME_ROOT=off)")
        if len(value) > MAX_PATH_CHARS:
            raise ValueError(f"is longer than {MAX_PATH_CHARS} characters")
        if _PATH_CONTROL.search(value):
            raise ValueError("must not contain control characters (such as NUL or a newline)")
        if ".." in value.replace("\\", "/").split("/"):
            raise _PathForbidden("must not contain '..'")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _check_text(cls, value: str, info: ValidationInfo) -> str:
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters (such as NUL)")
        if info.field_name == "prompt" and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("max_frames")
    @classmethod
    def _cap_frames(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        settings = (info.context or {}).get("settings")
        cap = settings.max_frames if settings is not None else Settings().max_frames
        return _round_frames(value if cap is None else min(value, cap))

    def resolve_size(self, image_width: int, image_height: int) -> tuple[int, int]:
        """The generation size; with ``auto_size`` a missing dimension follows the image aspect."""
        if not self.auto_size or image_width <= 0 or image_height <= 0:
            return self.width, self.height
        given = self.model_fields_set
        aspect = image_width / image_height
        if "width" in given and "height" in given:
            return self.width, self.height
        if "width" in given:
            return self.width, _snap(self.width / aspect)
        if "height" in given:
            return _snap(self.height * aspect), self.height
        area = DEFAULT_WIDTH * DEFAULT_HEIGHT
        return _snap(math.sqrt(area * aspect)), _snap(math.sqrt(area / aspect))

    def resolve_seed(self) -> int:
        """The seed to use: the given one, or a random one for -1."""
        if self.seed == -1:
            return secrets.randbelow(RANDOM_SEED_MAX + 1)
        return self.seed

    @property
    def uses_default_video(self) -> bool:
        return self.video_url is None and self.video_base64 is None and self.video_path is None


def parse_job_input(raw: object, settings: Settings) -> JobInput:
    """Validate ``job["input"]``; any problem becomes one ``InputError`` naming the field."""
    if not isinstance(raw, dict):
        raise InputError(
            f"input: must be a JSON object with the job fields, got {_type_name(raw)}.",
            field="input",
        )
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise InputError("input: every key must be a string.", field="input")
    _check_pairs(raw)
    try:
        job = JobInput.model_validate(raw, context={"settings": settings})
    except ValidationError as exc:
        raise _to_input_error(exc) from None
    if job.output == "url" and not settings.bucket_configured:
        raise InputError(
            "output: 'url' needs a bucket, but BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and "
            "BUCKET_SECRET_ACCESS_KEY are not all set on this worker; use 'base64' or 'auto'.",
            field="output",
            code="bucket_not_configured",
        )
    if (
        "max_frames" in raw
        and isinstance(raw["max_frames"], int)
        and job.max_frames != raw["max_frames"]
    ):
        log.info(
            "max_frames %s adjusted to %s (cap and 4n+1 rule)", raw["max_frames"], job.max_frames
        )
    return job


def _check_pairs(raw: dict[str, Any]) -> None:
    for key in _FIELD_ORDER:
        if isinstance(raw.get(key), str) and not raw[key].strip():
            raise InputError(f"{key}: must not be an empty string.", field=key)

    for sources in (IMAGE_SOURCES, VIDEO_SOURCES):
        given = [key for key in sources if raw.get(key) is not None]
        if len(given) > 1:
            raise InputError(
                f"{given[0]}: give only one of {_one_of(sources)}, not {' and '.join(given)}.",
                field=given[0],
                code="conflicting_inputs",
            )
    if not any(raw.get(key) is not None for key in IMAGE_SOURCES):
        raise InputError(
            f"image_url: a reference image is required; give {_one_of(IMAGE_SOURCES)}.",
            field="image_url",
            code="missing_image",
        )


def _one_of(keys: tuple[str, ...]) -> str:
    return ", ".join(keys[:-1]) + f" or {keys[-1]}"


def _check_url_syntax(url: str) -> None:
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        shown = parts.scheme or "no scheme"
        raise ValueError(f"must be an http or https URL (got {shown})")
    if not parts.hostname:
        raise ValueError("has no host name")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain a user name or password")
    if any(ch.isspace() for ch in url) or _CONTROL.search(url):
        raise ValueError("must not contain spaces or control characters")


def _snap(value: float) -> int:
    stepped = round(value / SIDE_STEP) * SIDE_STEP
    return max(MIN_SIDE, min(MAX_SIDE, stepped))


def _round_frames(value: int) -> int:
    return max(MIN_FRAMES, ((value - 1) // 4) * 4 + 1)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _to_input_error(exc: ValidationError) -> InputError:
    errors = exc.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    field = ".".join(str(p) for p in first["loc"]) or "input"
    kind = first["type"]
    if kind == "extra_forbidden":
        known = ", ".join(JobInput.model_fields)
        return InputError(
            f"{field}: unknown field {field!r}; the known fields are {known}.",
            field=field,
            code="unknown_field",
        )
    code = None
    if kind == "value_error" and field in ("image_url", "video_url"):
        code = "unsupported_url"
    elif isinstance((first.get("ctx") or {}).get("error"), _PathForbidden):
        code = "path_forbidden"
    return InputError(f"{field}: {_reason(first)}.", field=field, code=code)


def _reason(err: ErrorDetails) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f" (got {_shown(value)})"
    simple = {
        "int_type": "must be an integer",
        "int_from_float": "must be a whole number",
        "float_type": "must be a number",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
    }
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind in simple:
        return f"{simple[kind]}, not {_type_name(value)}{got}"
    if kind == "multiple_of":
        return f"must be a multiple of {ctx.get('multiple_of')}{got}"
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"must be {_bounds(err)}{got}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters (got {len(str(value))})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg'][:1].lower()}{err['msg'][1:]}{got}"


def _bounds(err: ErrorDetails) -> str:
    name = str(err["loc"][0]) if err["loc"] else ""
    info = JobInput.model_fields.get(name)
    lo = hi = None
    for meta in info.metadata if info else []:
        lo = getattr(meta, "ge", lo)
        hi = getattr(meta, "le", hi)
    if name == "seed":
        return "between 0 and 2**64-1, or -1 for a random seed"
    if hi is None:
        return f"at least {lo}"
    return f"between {lo} and {hi}"
