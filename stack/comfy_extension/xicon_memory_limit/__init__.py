"""xicon_memory_limit: ComfyUI's RAM figures held to the container's cgroup memory limit.

All the work happens in ``prestartup_script.py`` (ComfyUI runs it before importing its memory
management); the logic is in ``cgroup_memory.py``. This package registers no node.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
