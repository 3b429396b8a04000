"""Async ComfyUI client.

Modules: ``transport`` (HTTP calls, websocket connect/close, liveness of the process, start-up
wait), ``run_state`` (``_Run``: one prompt's state, fed by socket frames and /history;
``Progress``, ``RunResult``, the error builders), ``outputs`` (``OutputFile``, ``output_files``,
the ``/view`` download), ``client`` (``ComfyClient``: submit, follow, abort).

Contract (all network errors are mapped to the errors module; nothing else leaks):
- ``ComfyClient(base_url: str, *, pid_file: Path | None = None, poll_interval_s=1.0,
  unreachable_grace_s=15.0, request_timeout_s=30.0, interrupt_grace_s=INTERRUPT_GRACE_S)``;
  ``async with`` or ``await close()``.
  While ComfyUI cannot be reached, a dead PID in ``pid_file`` (or a zombie) gives
  ``ComfyUnavailable`` at once; without a PID verdict, after ``unreachable_grace_s``.
- ``await wait_ready(timeout_s)``: polls until ComfyUI answers; checks the PID in ``pid_file`` for
  liveness on every try; raises ``ComfyUnavailable`` with a clear message on death or deadline.
- ``await run(graph, *, prompt_id, client_id, timeout_s, on_progress) -> RunResult``: submits
  with our client_id and prompt_id, follows the websocket AND /history at the same time (a
  dropped socket cannot lose the completion; the socket is reconnected), on timeout, task
  cancellation or a refused 200 deletes the prompt from the pending queue (POST /queue) and then
  POSTs /interrupt for it (then raises ``JobTimeout`` / re-raises ``CancelledError``). The
  interrupt is cooperative: after a timeout the client watches ``/queue`` for up to
  ``interrupt_grace_s`` (default ``INTERRUPT_GRACE_S``); a prompt still running or queued then,
  or a ComfyUI that does not answer, gives ``JobTimeout`` with ``refresh_worker`` (a stuck
  prompt would hold every later job behind it).
  Non-empty ``node_errors`` (even in a 200) -> ``ComfyError(code="comfyui_validation")``; any
  other answer than 200/400 -> ``ComfyError`` whose ``details`` keep the status and the body
  (the cause; cut to ``BODY_EXCERPT_CHARS``);
  ``execution_error`` -> ``ComfyError(code="comfyui_execution" | "out_of_memory")`` with message
  "ComfyUI failed at node <id> (<class>): <exception_message>" (OOM: first line plus a hint;
  ``details`` (for the log) has node_id, node_type, exception_type); ComfyUI dying ->
  ``ComfyUnavailable``. ``execution_interrupted`` not requested by us -> code "comfyui_interrupted".
  ``on_progress(Progress)`` is called for node starts (stage = the node's class_type, no step)
  and for ``progress`` frames (step/total, stage = the class of the node that sent them: the
  sampler, but also loaders, pose detection and VAE decode report progress; a frame naming a
  node outside the graph counts for the node now executing); it must not block (a coroutine
  result is scheduled, exceptions are logged).
- ``RunResult``: prompt_id, outputs (history ``outputs``), queue_s (submit -> execution_start),
  execution_s (execution_start -> execution_success), node_times (node id -> seconds, from the
  arrival of ``executing`` frames; history timestamps when the socket saw nothing).
- ``output_files(outputs) -> list[OutputFile]`` reads ``gifs``, ``videos`` and ``images`` items
  (filename, subfolder, type, format); ``await download(item, dest: Path) -> Path`` streams /view.
- ``Progress(stage: str, node: str | None, step: int | None, total: int | None,
  value: float | None)``: ``step`` is the frame's value cut to an integer, ``value`` the value as
  sent (a sampler with context windows reports fractions of a step, one per window).
- Helpers: ``await interrupt(prompt_id)``, ``await delete_queued(prompt_id)``,
  ``await delete_history(prompt_ids)`` (never raises),
  ``await free(unload_models, free_memory)``, ``await object_info(node_class=None)``,
  ``await history(prompt_id)``; pure ``validation_message(body)``, ``execution_error(data)``,
  ``pid_alive(pid)``.
- Retries (tenacity): the websocket's reconnect (after 0.1 s, doubling to 2 s, until the run
  ends), the start-up probe (every 0.5 s until the deadline), the ``/queue`` check after an
  interrupt (every ``poll_interval_s`` within ``interrupt_grace_s``).

Protocol facts (ComfyUI v0.33.0: server.py, execution.py, main.py): the socket is opened BEFORE
POST /prompt, because per-prompt frames (``executing``, ``progress``, ``progress_state``,
``execution_*``) go only to the socket registered under the prompt's client_id; completion is
``executing`` with ``node: null`` (sent after history is stored) or ``/history/{id}`` showing
the prompt finished, whichever comes first. ComfyUI never closes a client's socket, and a
socket that closes unregisters whichever socket then holds its client id: every socket opened
here is closed here, whatever the outcome (a refused submission included). On reconnect the
server may send ``executing`` without a ``prompt_id``; frames without our prompt_id are
ignored. A client ``prompt_id`` must be a canonical lowercase hyphenated UUID (``str(uuid4())``),
else ``/prompt`` answers HTTP 400 ``invalid_prompt_id``. The submitted ``extra_data`` sets
``VHS_MetadataImage: false`` so VideoHelperSuite writes no first-frame PNG next to the video.
"""

from .client import EXTRA_DATA, ComfyClient
from .outputs import OUTPUT_KEYS, OutputFile, download, output_files
from .run_state import (
    OOM_HINT,
    Progress,
    ProgressCallback,
    RunResult,
    _Run,
    execution_error,
    interrupted_error,
)
from .transport import (
    BODY_EXCERPT_CHARS,
    INTERRUPT_GRACE_S,
    ComfyTransport,
    body_excerpt,
    pid_alive,
    validation_message,
)

__all__ = [
    "BODY_EXCERPT_CHARS",
    "EXTRA_DATA",
    "INTERRUPT_GRACE_S",
    "OOM_HINT",
    "OUTPUT_KEYS",
    "ComfyClient",
    "ComfyTransport",
    "OutputFile",
    "Progress",
    "ProgressCallback",
    "RunResult",
    "_Run",
    "body_excerpt",
    "download",
    "execution_error",
    "interrupted_error",
    "output_files",
    "pid_alive",
    "validation_message",
]
