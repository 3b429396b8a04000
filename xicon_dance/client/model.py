"""What the client reports and raises: errors (with exit codes), progress, updates, results."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1000 * 1000
RUN_PAYLOAD_LIMIT = 10 * MB  # POST /run (RunPod's documented request limit)
RUNSYNC_PAYLOAD_LIMIT = 20 * MB  # POST /runsync
DEFAULT_BASE_URL = "https://api.runpod.ai/v2/{endpoint}"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# Client-side events reported through on_update next to RunPod's job states.
SUBMITTED = "SUBMITTED"
DOWNLOADING = "DOWNLOADING"
CANCEL_SENT = "CANCEL_SENT"
CANCEL_FAILED = "CANCEL_FAILED"
RETRYING = "RETRYING"
API_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 30.0
OPTION_FIELDS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "cfg",
    "seed",
    "fps",
    "max_frames",
    "max_seconds",
    "context_overlap",
    "keep_audio",
    "output",
)


class ClientError(Exception):
    """A problem explained to the user in one message; ``exit_code`` for the command line."""

    exit_code = 3

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(ClientError):
    """Bad arguments or files; nothing was sent."""

    exit_code = 2


class PayloadTooLarge(UsageError):
    """The request would exceed RunPod's payload limit."""


class ApiError(ClientError):
    """The API answered with an HTTP error, or could not be reached after retries."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JobFailed(ClientError):
    """The job ended without a video: FAILED, CANCELLED, TIMED_OUT or an empty result."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None,
        status: str,
        code: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.status = status
        self.code = code
        self.field = field


class ClientTimeout(JobFailed):
    """The client stopped waiting (``timeout``); the job was cancelled."""


def _number(payload: Mapping[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class Progress:
    """The worker's latest progress payload (every key but ``stage`` optional).

    ``step``/``total`` (or ``steps``): the sampler step; ``window``/``windows``: the context
    window within the step and how many there are per step; ``eta_s``: seconds left."""

    stage: str
    step: int | None = None
    total: int | None = None
    percent: int | None = None
    message: str | None = None
    window: int | None = None
    windows: int | None = None
    eta_s: float | None = None

    @classmethod
    def from_payload(cls, payload: object) -> Progress | None:
        """Parse a ``/status`` output seen while IN_PROGRESS; anything else gives ``None``."""
        if not isinstance(payload, Mapping) or not isinstance(payload.get("stage"), str):
            return None

        def num(*keys: str) -> int | None:
            for key in keys:
                value = _number(payload, key)
                if value is not None:
                    return int(value)
            return None

        message = payload.get("message")
        eta = _number(payload, "eta_s")
        return cls(
            stage=payload["stage"],
            step=num("step"),
            total=num("steps", "total"),
            percent=num("percent"),
            message=message if isinstance(message, str) else None,
            window=num("window"),
            windows=num("windows"),
            eta_s=eta if eta is not None and eta >= 0 else None,
        )

    @property
    def fraction(self) -> float | None:
        """0..1 from ``percent``, else from ``step/total``; ``None`` when unknown."""
        if self.percent is not None:
            return max(0.0, min(1.0, self.percent / 100))
        if self.step is not None and self.total:
            return max(0.0, min(1.0, self.step / self.total))
        return None


@dataclass(frozen=True)
class JobUpdate:
    """One change seen by the client: a RunPod job state or a client event (SUBMITTED, ...)."""

    job_id: str | None
    status: str
    progress: Progress | None = None
    elapsed_s: float = 0.0
    detail: str | None = None


@dataclass
class JobResult:
    """A COMPLETED job: its output (base64 text removed) and where the video was written."""

    job_id: str | None
    output: dict[str, Any]
    video_path: Path | None = None
    status_doc: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # set when the video went somewhere else than ``out``

    @property
    def video(self) -> dict[str, Any]:
        video = self.output.get("video")
        return video if isinstance(video, dict) else {}

    @property
    def timings(self) -> dict[str, Any]:
        timings = self.output.get("timings")
        return timings if isinstance(timings, dict) else {}

    @property
    def seed(self) -> Any:
        return self.output.get("seed")


UpdateCallback = Callable[[JobUpdate], None]
