"""The project's extension ``xicon_release_outputs`` in the real ComfyUI v0.33.0 (CPU): large
finished results leave the output cache once their node has run, small ones stay for the next job.

One prompt of core nodes: a 288 MiB image and three inversions of it (each a new 288 MiB result),
an 8x8 scaled copy to a preview, and a small side branch (an 8x8 image to a second preview). It runs
twice on one ComfyUI; the second run's ``execution_cached`` message says which results ComfyUI
still held. The same on a ComfyUI with the extension turned off (``XICON_RELEASE_OUTPUTS_MIB=0``)
is the control: upstream keeps every result, so it holds the four large ones (1.1 GiB) after the
prompt, which the extension's ComfyUI does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from tests.plugins.comfy import free_port, stop_process
from tests.plugins.realstack import (
    STARTUP_TIMEOUT_S,
    Stack,
    get,
    make_base,
    post_json,
    released_nodes,
    wait_for,
)

EXTENSION = "xicon_release_outputs"
MIB = 1024 * 1024
WIDTH, HEIGHT, BATCH = 2048, 2048, 6  # 288 MiB of float32 RGB per result
IMAGE_BYTES = WIDTH * HEIGHT * BATCH * 3 * 4
LARGE = ("1", "2", "3", "4")  # the image and its inversions
SMALL = ("s1", "crop")  # 8x8 results: kept across prompts by both servers


def graph() -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": BATCH, "color": 0},
        },
        "s1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7},
        },
        "s2": {"class_type": "PreviewImage", "inputs": {"images": ["s1", 0]}},
    }
    for i in range(2, 5):
        nodes[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [str(i - 1), 0]}}
    # a scaled copy, not a crop: ImageCrop returns a view, which would keep node 4's storage alive
    nodes["crop"] = {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["4", 0],
            "upscale_method": "nearest-exact",
            "width": 8,
            "height": 8,
            "crop": "disabled",
        },
    }
    nodes["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["crop", 0]}}
    return nodes


def run(url: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Queue the prompt and wait for its history entry."""
    prompt_id = str(uuid.uuid4())
    post_json(f"{url}/prompt", {"prompt": graph(), "prompt_id": prompt_id})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = json.loads(get(f"{url}/history/{prompt_id}")).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.2)
    raise TimeoutError(f"the prompt did not finish within {timeout_s:.0f} s")


def cached_nodes(entry: dict[str, Any]) -> set[str]:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            return set(data["nodes"])
    raise AssertionError(f"no execution_cached message: {entry['status']}")


def serve_twice(stack: Stack, folder: Path, threshold: str | None) -> dict[str, Any]:
    """ComfyUI (CPU, only this extension) runs the prompt twice; what it logged and held."""
    base = make_base(stack, folder / "comfy", packs={EXTENSION})
    log = folder / "comfyui.log"
    port = free_port()
    cmd = [str(stack.python), "-u", str(stack.comfy_dir / "main.py"), "--cpu"]
    cmd += ["--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
    env = {k: v for k, v in os.environ.items() if k != "XICON_RELEASE_OUTPUTS_MIB"}
    if threshold is not None:
        env["XICON_RELEASE_OUTPUTS_MIB"] = threshold
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/system_stats", proc, log, STARTUP_TIMEOUT_S)
        first = run(url)
        rss = psutil.Process(proc.pid).memory_info().rss  # idle, after the prompt
        second = run(url)
    finally:
        stop_process(proc)
    return {
        "first": first,
        "second": second,
        "rss": rss,
        "log": log.read_text(errors="replace"),
    }


def test_large_results_are_released_and_small_ones_kept(stack: Stack, tmp_path: Path) -> None:
    on = serve_twice(stack, tmp_path / "on", None)  # the default, as the image runs it
    off = serve_twice(stack, tmp_path / "off", "0")
    for served in (on, off):
        assert served["first"]["status"]["status_str"] == "success", served["log"][-3000:]
        assert served["second"]["status"]["status_str"] == "success", served["log"][-3000:]

    assert "xicon_release_outputs: cached results of 64 MiB or more are released" in on["log"]
    assert "xicon_release_outputs: off (XICON_RELEASE_OUTPUTS_MIB)" in off["log"]
    # each large result released once its node had run (its reader took it from the prompt's own
    # execution cache, which put it back in the output cache until the reader had run too)
    assert released_nodes(on["log"]) == set(LARGE), on["log"][-3000:]
    assert released_nodes(off["log"]) == set()

    print(
        f"ComfyUI idle after the prompt: RSS {on['rss'] / MIB:.0f} MiB with the extension, "
        f"{off['rss'] / MIB:.0f} MiB without; held for the next prompt: "
        f"{sorted(cached_nodes(on['second']))} / {sorted(cached_nodes(off['second']))}"
    )
    # what ComfyUI still held when the same prompt came again
    held_on, held_off = cached_nodes(on["second"]), cached_nodes(off["second"])
    assert set(SMALL) <= held_on and not set(LARGE) & held_on, held_on
    assert set(LARGE) | set(SMALL) <= held_off, held_off

    # and in memory: upstream keeps four 288 MiB results after the prompt, the extension none
    assert off["rss"] - on["rss"] > 3 * IMAGE_BYTES, (on["rss"] / MIB, off["rss"] / MIB)
