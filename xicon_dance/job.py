"""Per-job orchestration. OWNER: core-run helper.

Contract:
- ``Worker(settings, workflow, comfy)`` built once at start; ``await worker.run(job: dict) -> dict``
  runs one RunPod job: schema -> media -> workflow -> comfy -> delivery, reports progress, always
  cleans the job folder, and returns either the success result
  ``{"video": {url|base64, filename, content_type, bytes, width, height, frames, fps, duration_s,
  has_audio}, "seed", "prompt_id", "timings": {download, queue, inference, upload, total}}``
  or ``WorkerError.to_response()``. It re-raises ``asyncio.CancelledError`` after interrupting ComfyUI.
"""
