"""Job inputs: safe download / base64 decode, content checks, per-job folder. OWNER: core-input helper.

Contract:
- ``ImageInfo(path, width, height, format, bytes)``; ``VideoInfo(path, width, height, fps, frames,
  duration_s, has_audio, bytes)`` (frozen dataclasses).
- ``job_folder(settings, job_id) -> contextmanager[Path]``: creates ``<comfy_input_dir>/jobs/<safe id>``
  and removes it when the job ends, failed or not.
- ``async fetch_image(job: JobInput, folder: Path, settings) -> ImageInfo`` and
  ``async fetch_video(job, folder, settings) -> VideoInfo``: from URL (http/https only, SSRF guard after
  DNS resolution and on every redirect, at most 5 redirects, byte caps, timeouts, retries with backoff
  on connection errors and 5xx) or base64 (raw or data: URI, length capped before decoding), or the
  default video. Content checked by decoding (Pillow with the decompression-bomb limit; PyAV probe).
  Every failure raises ``InputError(field=...)`` with a clear sentence.
- ``probe_video(path) -> VideoInfo`` (also used on the result video).
"""
