"""Job input schema (pydantic v2). OWNER: core-input helper.

Contract:
- ``parse_job_input(raw: object, settings: Settings) -> JobInput`` validates the RunPod ``job["input"]``.
  Raises ``InputError(field=<name>, message=<one sentence naming the field and the reason>)``.
  Unknown keys are refused by name. Exactly one of image_url / image_base64. At most one of
  video_url / video_base64 (neither -> the bundled default video).
- Fields and defaults: image_url, image_base64, video_url, video_base64, prompt
  ("the person starts to dance"), negative_prompt (the usual Wan negative prompt), width (416),
  height (672) (multiples of 32, 256..1280), auto_size (false), steps (6; 1..50), cfg (1.0; 0..20),
  seed (0; -1 = random), fps (24; 1..60), max_frames (81, capped by settings.max_frames, rounded down to
  4n+1), keep_audio (true), output ("auto" | "url" | "base64").
- ``JobInput.resolve_size(image_width, image_height) -> tuple[int, int]``: with auto_size, a dimension
  the caller did not give is derived from the reference image aspect ratio (multiple of 32, in range).
- ``JobInput.resolve_seed() -> int``: -1 -> a random seed in the sampler's range.
"""
