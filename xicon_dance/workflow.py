"""Workflow template and patching. OWNER: core-run helper.

Contract:
- ``Workflow.load(path, settings) -> Workflow`` reads the API-format graph once and checks the role
  table against it; a mismatch raises ``ConfigError`` naming the node id, expected class and input.
- ``ROLES``: one declarative table, role -> (node id, expected class_type, input name).
- ``Workflow.build(params: PatchParams) -> dict``: a patched deep copy; the template is never mutated.
- ``PatchParams``: image_name, video_name (paths relative to ComfyUI's input folder), width, height,
  fps, frame_load_cap, steps, cfg, seed, prompt, negative_prompt, keep_audio, filename_prefix,
  attention_mode, pose_render_device. Derived values (pose size = half the generation size) are
  written here, nowhere else.
"""
