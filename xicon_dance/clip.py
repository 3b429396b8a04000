"""The driving clip: how much of it a job renders and the memory it may cost (its transcode to the
job's size, fps and length: ``xicon_dance.transcode``).

Contract:
- ``plan_clip(video, job, settings) -> ClipPlan``: the frames to render at the job's fps. The
  clip's length at that fps is ``floor(duration * fps)`` (duration: the probe's, never more than
  ``frames / source fps``); it is capped by ``MAX_SECONDS``, the job's ``max_seconds`` and
  ``max_frames`` and the optional ``MAX_FRAMES`` (the smallest wins), then rounded down to 4n+1
  (Wan's frame rule). ``truncated`` is true when a cap cut the clip, not for the at most 3
  frames the 4n+1 rule drops. Fewer than 5 frames raises ``InputError`` naming the field that
  made it so (the video field for a short clip, else ``max_seconds``).
- ``check_memory(plan, width, height, settings)``: ComfyUI holds every frame of the clip as
  float32 RGB at the generation size, several times over (loader, pose render, decoded result,
  buffers; ``FRAME_COPIES``, measured). A job whose estimate
  ``frames * width * height * 12 * FRAME_COPIES`` exceeds ``MAX_CLIP_MEMORY_GB`` is refused with
  ``InputError(field="max_frames", code="clip_too_long")``, naming the limit and the frames that
  would fit at that size.
- ``host_ram_warning(system_stats, settings) -> str | None``: checked once at start; a host
  with less RAM than ``MAX_CLIP_MEMORY_GB`` gets a warning in the log (ComfyUI keeps the models
  in RAM too, and drops them under RAM pressure).
- ``answer(plan) -> dict``: the success answer's ``clip`` and ``rendered`` entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .media import VideoInfo
from .schema import MIN_FRAMES, JobInput
from .settings import Settings

# Host memory per rendered frame, in float32 RGB copies of the frame at the generation size,
# over what an 81-frame job holds. Measured through the worker on an H100 host (models on the
# GPU), 60 s at 416x672, allocated memory at the job's peak (bench/results/gpu_h100_extensions):
# 2.9 copies as upstream caches and decodes, 1.5 with the image's two extensions
# (xicon_release_outputs, xicon_decode_frames). On the CPU with the tiny models
# (tests/realstack/test_long_clip.py, before the extensions) 3.4: the tiny VAE's activations on
# the host. 4 stays above every measurement; it was 8 before the GPU measured it.
FRAME_COPIES = 4
BYTES_PER_PIXEL = 12  # float32 RGB
GB = 1e9
_VIDEO_FIELDS = ("video_url", "video_base64", "video_path")


@dataclass(frozen=True)
class ClipPlan:
    fps: int
    clip_duration_s: float  # the whole driving clip
    clip_frames: int  # the whole clip at the job's fps
    frames: int  # frames to render (4n+1)
    truncated: bool  # a cap (seconds or frames) cut the clip
    cap: str | None  # what cut it: max_frames, max_seconds, MAX_SECONDS or MAX_FRAMES

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps


def video_field(job: JobInput) -> str:
    """The job field the driving video came from (``video_url`` for the default video)."""
    return next((f for f in _VIDEO_FIELDS if getattr(job, f, None) is not None), "video_url")


def to_4n1(frames: int) -> int:
    return (frames - 1) // 4 * 4 + 1 if frames >= 1 else 0


def plan_clip(video: VideoInfo, job: JobInput, settings: Settings) -> ClipPlan:
    """The frames to render (see module doc); too few frames -> ``InputError``."""
    fps = job.fps
    duration = video.duration_s
    if video.frames > 0 and video.fps > 0:
        duration = (
            min(duration, video.frames / video.fps) if duration > 0 else video.frames / video.fps
        )
    clip_frames = math.floor(duration * fps + 1e-6)
    caps: dict[str, int] = {"MAX_SECONDS": math.floor(settings.max_seconds * fps + 1e-6)}
    if job.max_seconds is not None:
        caps["max_seconds"] = math.floor(job.max_seconds * fps + 1e-6)
    if job.max_frames is not None:
        caps["max_frames"] = job.max_frames
    if settings.max_frames is not None:
        caps["MAX_FRAMES"] = settings.max_frames
    cap_name = min(caps, key=lambda k: caps[k])
    truncated = caps[cap_name] < clip_frames
    wanted = min(clip_frames, caps[cap_name])
    if wanted < MIN_FRAMES:
        if truncated and cap_name == "max_seconds":
            raise InputError(
                f"max_seconds: {job.max_seconds:g} s gives only {wanted} frames at {fps} fps; at "
                f"least {MIN_FRAMES} frames are needed.",
                field="max_seconds",
            )
        if truncated:  # MAX_SECONDS / MAX_FRAMES are at least 5 frames' worth at 1 fps and up
            raise InputError(
                f"fps: {cap_name} leaves only {wanted} frames at {fps} fps; at least "
                f"{MIN_FRAMES} frames are needed (use a higher fps).",
                field="fps",
            )
        field = video_field(job)
        raise InputError(
            f"{field}: the driving video lasts {duration:.3g} s, which gives only {wanted} "
            f"frames at {fps} fps; at least {MIN_FRAMES} frames are needed (a longer clip or a "
            "higher fps).",
            field=field,
            code="invalid_video",
        )
    return ClipPlan(
        fps=fps,
        clip_duration_s=round(duration, 3),
        clip_frames=clip_frames,
        frames=to_4n1(wanted),
        truncated=truncated,
        cap=cap_name if truncated else None,
    )


def clip_memory_bytes(frames: int, width: int, height: int) -> int:
    return frames * width * height * BYTES_PER_PIXEL * FRAME_COPIES


def check_memory(plan: ClipPlan, width: int, height: int, settings: Settings) -> None:
    """Refuse a job whose frames would not fit ``MAX_CLIP_MEMORY_GB`` (see module doc)."""
    need = clip_memory_bytes(plan.frames, width, height)
    limit = settings.max_clip_memory_gb * GB
    if need <= limit:
        return
    fits = to_4n1(int(limit // clip_memory_bytes(1, width, height)))
    hint = (
        f"at {width}x{height} at most {fits} frames ({fits / plan.fps:.1f} s at {plan.fps} fps) "
        "fit: give max_frames or max_seconds, or a smaller width/height"
        if fits >= MIN_FRAMES
        else "use a smaller width/height"
    )
    raise InputError(
        f"max_frames: {plan.frames} frames at {width}x{height} need about {need / GB:.1f} GB of "
        f"frame memory in ComfyUI, over this worker's limit of "
        f"{settings.max_clip_memory_gb:g} GB (MAX_CLIP_MEMORY_GB); {hint}.",
        field="max_frames",
        code="clip_too_long",
    )


def host_ram_warning(system_stats: Any, settings: Settings) -> str | None:
    """A warning when ComfyUI has less RAM than ``MAX_CLIP_MEMORY_GB`` allows for the frames
    alone (``system.ram_total`` of ``/system_stats``, bytes: the container's memory limit where
    one is set, through the stack's ``xicon_memory_limit`` extension, else the host's RAM); None
    otherwise or when the answer has no figure."""
    system = system_stats.get("system") if isinstance(system_stats, dict) else None
    total = system.get("ram_total") if isinstance(system, dict) else None
    if not isinstance(total, int | float) or total <= 0:
        return None
    if total >= settings.max_clip_memory_gb * GB:
        return None
    return (
        f"ComfyUI has {total / GB:.0f} GB of RAM (the container's limit or the host's), less "
        "than MAX_CLIP_MEMORY_GB "
        f"({settings.max_clip_memory_gb:g} GB) allows for a clip's frames alone, before the "
        "models: a long clip can make ComfyUI drop its loaded models or be killed. Lower "
        "MAX_CLIP_MEMORY_GB or MAX_SECONDS, or choose hosts with more RAM."
    )


def answer(plan: ClipPlan) -> dict[str, Any]:
    """The ``clip`` and ``rendered`` entries of the success answer."""
    return {
        "clip": {"duration_s": plan.clip_duration_s, "frames": plan.clip_frames},
        "rendered": {
            "frames": plan.frames,
            "duration_s": round(plan.duration_s, 3),
            "truncated": plan.truncated,
        },
    }
