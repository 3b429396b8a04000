"""An honest ComfyUI server double (aiohttp) for the worker's tests.

It imitates ComfyUI v0.33.0, the release of ``stack/components.json`` (``/system_stats`` reports
that version). The § numbers below refer to a protocol description first written for ComfyUI
v0.8.0; where v0.33.0 differs from it, the double follows v0.33.0 (each rule cites the file and
line of that release next to the code that copies it):

- Routes, each also under ``/api/`` (§2.1): POST/GET ``/prompt`` (§2.2; the queue number counts
  every POST from 0; a client ``prompt_id`` must be a canonical lowercase hyphenated UUID, else
  HTTP 400 ``invalid_prompt_id`` before any graph check; absent or null -> the double mints one;
  200 ``{"prompt_id", "number", "node_errors": {}}``; 400 ``{"error", "node_errors"}`` in the
  shapes of §4), ``/history`` and ``/history/{id}`` (§2.3; unknown id -> ``{}``; POST
  ``{"delete": [ids]}`` / ``{"clear": true}``), ``/view``
  (§2.4: 400 for a leading ``/`` or ``..``, 403 for a subfolder escape, 404 missing),
  ``/upload/image`` (§2.5, hash dedupe and ``name (1).ext``), ``/interrupt`` (§2.6: optional
  prompt_id, no-op when not running, bare 200, cooperative: noticed before the next node starts
  and at the next progress frame), GET/POST ``/queue``, ``/free`` (``free_memory`` resets the
  cache), ``/system_stats`` (§2.7 shape), ``/object_info`` and ``/object_info/{class}`` (from
  ``tests/fixtures/object_info.json`` or ``--object-info``; ``{}`` for an unknown class) and
  ``/ws?clientId=`` (§3).
- Websockets: a socket with a clientId already in use takes over the table entry but the old
  socket is NOT closed; a socket whose handler ends pops the entry of its id unconditionally
  (so a replaced socket closing later unregisters its successor). A new socket gets ``status``
  (with its ``sid``), and, when its id is the running prompt's client, ``executing`` with the
  node now running and no ``prompt_id``. ``open_websockets`` counts the sockets still open on
  the server (replaced ones included); GET ``/_double/sockets`` shows it.
- Validation: ``xicon_dance.graph_check.check_prompt(prompt, object_info[, model_files=])`` (the
  whole-prompt checks of §4.1 and the input checks of §4.2); a ``validator`` callable can replace
  it. Then the existence checks of LoadImage / VHS_LoadVideo files under
  ``input/`` (``custom_validation_failed``, "image - Invalid image file: <name>", §4.2).
- Execution: one prompt at a time from a real queue. Frames in the observed order (§3.2):
  ``execution_start``, ``execution_cached``, per node (topological order) ``progress_state``
  (start), ``executing``, its ``progress`` frames (each after a ``progress_state``), ``executed``
  for output nodes, ``progress_state`` (finished); then ``execution_success``; history is stored,
  THEN ``executing`` with ``node: null`` (§3.5). ``progress`` comes from the sampler (one per
  step, ``steps`` from its scheduler link) AND from other nodes, as the packs' progress bars send
  it: WanVideoModelLoader, PoseDetectionVitPoseToDWPose (two per frame), WanVideoDecode (one per
  latent frame). Every per-prompt frame, ``progress_state`` and ``execution_interrupted``
  included, goes only to the socket whose id is the prompt's ``client_id``; for a prompt without
  one, ``progress``, ``progress_state`` and ``execution_interrupted`` go to every socket and the
  others are not sent. ``status`` is broadcast.
  LoadImage and VHS_LoadVideo read their input when they run (the double keeps a private copy, as
  ComfyUI keeps the tensors), so later nodes do not need input/ any more.
  A corrupt reference image fails at LoadImage with ``execution_error``
  (§4.2 last rule). An identical re-run is fully cached: old filenames, nothing written (§7.2).
  A failed or interrupted run keeps in history the outputs of the nodes that ran before it.
- VHS_VideoCombine (node 139) writes a REAL h264/yuv420p MP4 into ``output/`` named
  ``<filename_prefix>_00001.mp4`` (counter increments), size = INTConstant 203/204, fps =
  139.frame_rate, frames = min(frame_load_cap, driving-video frames at force_rate) truncated by
  the load format's frame rule (Wan: 4n+1, from object_info; pitfall 10), drawn from the
  reference image. With an ``audio`` link and a driving video that has audio it also writes
  ``<name>-audio.mp4`` and names THAT file in ``gifs``; it writes the first-frame ``<name>.png``
  unless the prompt's ``extra_data.extra_pnginfo.workflow.extra.VHS_MetadataImage``
  is false (scail-workflow.md pitfall 19). Any other exception in a node becomes an
  ``execution_error`` for that node (§3.3).

Fault switches (constructor ``faults=Faults(...)``, CLI flags, or POST ``/_double/faults`` with a
JSON object of the same names; GET ``/_double/faults`` shows them, GET ``/_double/requests`` lists
the interrupt / queue / free / POST history calls received; ``prompts`` keeps every queued item
by prompt id, even once its history entry is deleted):

- ``drop_socket_at_node`` (``--drop-socket-at-node ID``): closes the prompt's socket right after
  its ``executing`` frame for node ID; the client may reconnect (§3.1) — completion must still be
  found (through the new socket or ``/history``, §3.5).
- ``silent_socket`` (``--silent-socket``): never sends ``execution_success`` nor ``executing``
  ``node: null``; history is still stored, so ``/history/{id}`` is the only completion signal.
- ``die_at_node`` (``--die-at-node ID``): ComfyUI dies mid-run at node ID; as a process it exits
  (code 17), in-process the server stops listening and closes every socket.
- ``error_at_node`` (``--error-at-node ID``): ``execution_error`` at node ID (§3.3), RuntimeError.
- ``oom_at_node`` (``--oom-at-node ID``): ``execution_error`` with ``exception_type``
  ``torch.OutOfMemoryError`` and the "ran out of memory" tip (§3.3).
- ``node_errors_in_200`` (``--node-errors-in-200``): a 200 answer to ``/prompt`` that still carries
  a non-empty ``node_errors`` (§2.2); the prompt is queued anyway.
- ``node_delay_s`` / ``step_delay_s`` (``--node-delay-s S`` / ``--step-delay-s S``): slow execution,
  seconds per node and per sampler step.
- ``refuse_start_s`` (``--refuse-start-s S``): connections are refused for the first S seconds
  (the port is not bound yet), as while ComfyUI imports its nodes.
- ``hang_at_node`` (``--hang-at-node ID``): node ID never returns and never checks the
  interrupt (a hung CUDA call, a node without interrupt checks): the prompt stays running until
  the fault is cleared; a pending interrupt is then noticed before the next node.
- ``view_stall_s`` (``--view-stall-s S``): ``/view`` sends the headers and the first KiB of the
  file, then nothing for S seconds (a slow disk, a busy event loop), then the rest.
- ``prompt_http_status`` (``--prompt-http-status N``): ``/prompt`` answers HTTP N with a text
  body (aiohttp's 500 text, an injected cause, then about 6 KB of traceback lines); nothing is
  queued.

Standalone: ``python -m tests.comfy_double --port P --root DIR [--object-info FILE] [faults]``;
``--pid-file F`` writes the process id there.
"""

from .server import ComfyDouble, Faults, topological_order

__all__ = ["ComfyDouble", "Faults", "topological_order"]
