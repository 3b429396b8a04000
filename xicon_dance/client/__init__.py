"""Client for a deployed worker: submit a job, follow its progress, save the video.

Modules: ``request`` (job input, body, ``--out`` check), ``api`` (the REST API and its retries),
``jobs`` (``run_job``), ``output`` (saving the video), ``view`` (progress display), ``cli``
(the ``xicon-dance`` command), ``model`` (errors, progress, results). Everything a caller needs
is importable from ``xicon_dance.client``.

Contract:
- ``build_job_input(image, video=None, **options) -> dict`` turns a local path or an http(s) URL
  into ``image_base64``/``image_url`` (and ``video_base64``/``video_url``) and adds only the
  options that were given, so the worker's defaults apply to the rest. A missing or unreadable
  file raises ``UsageError``; a file whose base64 would push the request over ``limit`` raises
  ``PayloadTooLarge`` before the file is read.
- ``encode_request(job_input, limit) -> bytes`` is the exact JSON body ``{"input": {...}}``;
  over ``limit`` bytes (RunPod: 10 MB for ``/run``, 20 MB for ``/runsync``) it raises
  ``PayloadTooLarge`` naming the sizes.
- ``check_out(path) -> Path`` refuses, before anything is sent, an ``--out`` that is a folder, lies
  under a file, or cannot be created and written (the real file is tried, then removed again if
  it did not exist) (``UsageError``).
- ``await run_job(job_input, base_url=..., ...) -> JobResult`` submits with ``POST /run``, polls
  ``GET /status/{id}`` and reports each change to ``on_update(JobUpdate)``; while the job is
  IN_PROGRESS the worker's latest progress payload (``stage``, ``step``, ``total``/``steps``,
  ``percent``, ``message``, and optionally ``window``, ``windows``, ``eta_s``) arrives as
  ``JobUpdate.progress``. ``on_update`` is called after every poll (so a display can refresh its
  clock); consecutive updates may be equal. With ``local=True`` it uses ``POST /runsync`` (the
  SDK's ``--rp_serve_api`` server, which has no progress and no ``/cancel``); a server that
  answers 405 to ``GET /status`` is treated the same way (``POST /status/{id}``).
- COMPLETED: the video (``output.video.url``, streamed, or ``output.video.base64``) is written
  to ``out`` (``output.save_video``: through a ``.part`` file, size checked against
  ``video.bytes``); the returned ``JobResult`` carries the output without the base64 text. A
  finished video is never lost: if ``out`` cannot be written (disk full, folder removed
  meanwhile...) it is saved as ``xicon-dance-<job id>.mp4`` in the current folder, else in the
  temp folder, and ``JobResult.note`` says where and why. FAILED, CANCELLED, TIMED_OUT raise
  ``JobFailed`` with the worker's message, ``code`` and ``field``. COMPLETED without output
  (a result over RunPod's size limit) raises ``JobFailed`` too.
- Cancellation: ``asyncio.CancelledError`` or ``KeyboardInterrupt`` while the job runs sends
  ``POST /cancel/{id}`` before re-raising; passing ``timeout`` does the same, then raises
  ``ClientTimeout``.
- Retries (``api``): HTTP 429, 5xx and connection errors are retried with back-off
  (``Retry-After`` honoured), each retry reported at once to ``on_update`` (status ``RETRYING``,
  ``detail`` says why and when) — except that a submit (``/run``, ``/runsync``) is retried only
  when it cannot have been accepted (refused, DNS failure, connect timeout, 429): after a read
  timeout or a 5xx it raises ``ApiError`` saying how to find the job, as a retry may run a
  second paid job. A loopback server that refuses the connection gets one quick retry and an
  error naming ``host:port`` and how to start the local API. Other HTTP errors raise
  ``ApiError`` with the status and a short text excerpt (an HTML error page is reduced to its
  title or first words). The API key goes only to the API, never to the video URL, and never
  into messages.
- Every error is a ``ClientError`` whose ``exit_code`` the command line uses: 1 the job did not
  produce a video, 2 a usage problem (nothing was sent), 3 the API or the download failed.
"""

from __future__ import annotations

from .api import excerpt
from .jobs import run_job
from .model import (
    API_TIMEOUT_S,
    CANCEL_FAILED,
    CANCEL_SENT,
    DOWNLOADING,
    MB,
    OPTION_FIELDS,
    RETRYING,
    RUN_PAYLOAD_LIMIT,
    RUNSYNC_PAYLOAD_LIMIT,
    SUBMITTED,
    TERMINAL,
    ApiError,
    ClientError,
    ClientTimeout,
    JobFailed,
    JobResult,
    JobUpdate,
    PayloadTooLarge,
    Progress,
    UpdateCallback,
    UsageError,
)
from .output import save_video, write_video
from .request import build_job_input, check_out, default_base_url, encode_request, is_url

__all__ = [
    "API_TIMEOUT_S",
    "CANCEL_FAILED",
    "CANCEL_SENT",
    "DOWNLOADING",
    "MB",
    "OPTION_FIELDS",
    "RETRYING",
    "RUNSYNC_PAYLOAD_LIMIT",
    "RUN_PAYLOAD_LIMIT",
    "SUBMITTED",
    "TERMINAL",
    "ApiError",
    "ClientError",
    "ClientTimeout",
    "JobFailed",
    "JobResult",
    "JobUpdate",
    "PayloadTooLarge",
    "Progress",
    "UpdateCallback",
    "UsageError",
    "build_job_input",
    "check_out",
    "default_base_url",
    "encode_request",
    "excerpt",
    "is_url",
    "run_job",
    "save_video",
    "write_video",
]
