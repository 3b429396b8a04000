"""One error hierarchy for the whole worker, mapped to one response shape.

Contract:
- Every failure the worker can explain is a ``WorkerError`` subclass carrying a readable
  one-sentence ``message``, a machine ``code`` and, for input problems, the ``field`` it concerns.
- ``WorkerError.to_response()`` is the only place that builds the failure payload returned to
  RunPod: ``{"error": "<sentence>", "code": "<code>", "field": <str|None>}``. ``error`` is always a
  string (a dict there breaks RunPod's job status). ``refresh_worker: True`` is added when the
  worker process should be replaced after this job: ComfyUI died or is unusable
  (``ComfyUnavailable``), or a timed-out prompt did not stop after the interrupt (``JobTimeout``
  raised with ``refresh_worker=True``: every later job would queue behind it). ``details``
  (e.g. ComfyUI's ``node_errors``) are for the worker log, never part of the response.
- Messages never contain secrets: callers pass redacted text (see ``xicon_dance.logs.redact``).
"""

from __future__ import annotations

from typing import Any


class WorkerError(Exception):
    """Base class. Subclasses set a default ``code``; a raise site may give a more precise one."""

    code: str = "internal_error"
    refresh_worker: bool = False

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        refresh_worker: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code
        if refresh_worker is not None:
            self.refresh_worker = refresh_worker
        self.details = details or {}

    def to_response(self) -> dict[str, Any]:
        response: dict[str, Any] = {"error": self.message, "code": self.code, "field": self.field}
        if self.refresh_worker:
            response["refresh_worker"] = True
        return response


class ConfigError(WorkerError):
    """The worker is misconfigured (settings, workflow template). Stops the worker at start."""

    code = "config_error"


class InputError(WorkerError):
    """The job input is invalid: bad field, unreachable or undecodable media, too large, ..."""

    code = "invalid_input"


class ComfyError(WorkerError):
    """ComfyUI rejected or failed the graph (validation, execution error, out of memory)."""

    code = "comfyui_error"


class ComfyUnavailable(ComfyError):
    """ComfyUI is not reachable or died. The worker should be replaced."""

    code = "comfyui_unavailable"
    refresh_worker = True


class JobTimeout(WorkerError):
    """The job ran past its time limit; ComfyUI was interrupted (``refresh_worker`` when the
    prompt kept running anyway)."""

    code = "timeout"


class DeliveryError(WorkerError):
    """The finished video could not be delivered (upload failed, too large for base64, missing)."""

    code = "delivery_failed"


def internal_error_response() -> dict[str, Any]:
    """Response for an unexpected exception: no traceback, no internals, but never silent."""
    return WorkerError(
        "The worker hit an unexpected internal error; the job was not completed. "
        "The worker log has the details.",
        code="internal_error",
    ).to_response()
