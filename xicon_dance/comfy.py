"""Async ComfyUI client. OWNER: comfy helper.

Contract (all network errors are mapped to the errors module; nothing else leaks):
- ``ComfyClient(base_url: str, *, pid_file: Path | None = None)``; ``async with`` or ``await close()``.
- ``await wait_ready(timeout_s)``: polls until ComfyUI answers; checks the PID in ``pid_file`` for
  liveness on every try; raises ``ComfyUnavailable`` with a clear message on death or deadline.
- ``await run(graph, *, prompt_id, client_id, timeout_s, on_progress) -> RunResult``: submits with our
  client_id and prompt_id, follows the websocket AND /history at the same time (a dropped socket
  cannot lose the completion; the socket is reconnected), on timeout or task cancellation POSTs
  /interrupt for that prompt (then raises ``JobTimeout`` / re-raises ``CancelledError``).
  Non-empty ``node_errors`` (even in a 200) -> ``ComfyError(code="comfyui_validation")``;
  ``execution_error`` -> ``ComfyError(code="comfyui_execution" | "out_of_memory")`` with message
  "node <id> (<class>): <exception_message>" (plus a hint for OOM); ComfyUI dying -> ``ComfyUnavailable``.
  ``on_progress(Progress)`` is called for node starts and sampler steps.
- ``RunResult``: prompt_id, outputs (history ``outputs``), queue_s, execution_s, node_times (dict).
- ``output_files(outputs) -> list[OutputFile]`` reads ``gifs``, ``videos`` and ``images`` items
  (filename, subfolder, type, format); ``await download(item, dest: Path) -> Path`` streams /view.
- ``Progress(stage: str, node: str | None, step: int | None, total: int | None)``.
"""
