"""A ComfyUI prompt whose cached results outgrow a memory limit, and ComfyUI started inside a
memory cgroup to run it (``tests/realstack/test_memory_limit.py``, ``bench/container_ram.py``).

``pressure_graph()`` uses core nodes only: a 4096x4096x3 float32 image (576 MiB) and
``INVERSIONS`` inversions of it, each a new 576 MiB result that ComfyUI's RAM-pressure cache keeps
until RAM runs short, then an 8x8 crop to a preview: 2 GiB more than ``LIMIT`` in all.
``start_in(cgroup, stack, base, log)`` starts ComfyUI on the CPU in the cgroup and waits for it;
``submit(url)`` queues the prompt; ``outcome(url, proc, prompt_id)`` is ``"success"``,
``"error"`` or ``"exited"`` (the process died), ``TimeoutError`` when none comes.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from tests.plugins.cgroups import MemoryCgroup
from tests.plugins.comfy import free_port
from tests.plugins.realstack import (
    STARTUP_TIMEOUT_S,
    Stack,
    cpu_comfy_command,
    get,
    post_json,
    wait_for,
)

GIB = 1024**3


def start_in(
    cgroup: MemoryCgroup, stack: Stack, base: Path, log: Path
) -> tuple[subprocess.Popen, str]:
    """ComfyUI on the CPU, moved into ``cgroup`` before it starts (``exec`` keeps the pid)."""
    port = free_port()
    cmd = cpu_comfy_command(stack, base, port)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cgroup.command(cmd), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/system_stats", proc, log, STARTUP_TIMEOUT_S)
    return proc, url


LIMIT = 4 * GIB
IMAGE = (4096, 4096, 3)  # width, height, batch: 576 MiB of float32 RGB per result
IMAGE_BYTES = IMAGE[0] * IMAGE[1] * IMAGE[2] * 3 * 4
# Results kept until RAM runs short: the empty image and every inversion, 2 GiB past the limit.
INVERSIONS = math.ceil((LIMIT + 2 * GIB) / IMAGE_BYTES)


def pressure_graph() -> dict[str, Any]:
    """EmptyImage -> ImageInvert x INVERSIONS -> ImageCrop 8x8 -> PreviewImage (core nodes)."""
    width, height, batch = IMAGE
    graph: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": 0},
        }
    }
    for i in range(INVERSIONS):
        graph[str(i + 2)] = {"class_type": "ImageInvert", "inputs": {"image": [str(i + 1), 0]}}
    last = str(INVERSIONS + 1)
    graph["crop"] = {
        "class_type": "ImageCrop",
        "inputs": {"image": [last, 0], "width": 8, "height": 8, "x": 0, "y": 0},
    }
    graph["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["crop", 0]}}
    return graph


def submit(url: str) -> str:
    prompt_id = str(uuid.uuid4())
    post_json(f"{url}/prompt", {"prompt": pressure_graph(), "prompt_id": prompt_id})
    return prompt_id


def outcome(url: str, proc: subprocess.Popen, prompt_id: str, timeout_s: float = 300.0) -> str:
    """``"success"`` / ``"error"`` from ComfyUI's history, or ``"exited"`` if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        with contextlib.suppress(OSError):
            entry = json.loads(get(f"{url}/history/{prompt_id}")).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return "success" if entry["status"]["completed"] else "error"
        time.sleep(0.5)
    raise TimeoutError(f"the pressure prompt neither finished nor failed within {timeout_s:.0f} s")
