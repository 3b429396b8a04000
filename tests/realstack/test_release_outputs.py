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

import os
from pathlib import Path
from typing import Any

import psutil

from tests.plugins.realstack import Stack, cpu_comfy, make_base, released_nodes, run_prompt

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


def cached_nodes(entry: dict[str, Any]) -> set[str]:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            return set(data["nodes"])
    raise AssertionError(f"no execution_cached message: {entry['status']}")


def serve_twice(stack: Stack, folder: Path, threshold: str | None) -> dict[str, Any]:
    """ComfyUI (CPU, only this extension) runs the prompt twice; what it logged and held."""
    base = make_base(stack, folder / "comfy", packs={EXTENSION})
    log = folder / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k != "XICON_RELEASE_OUTPUTS_MIB"}
    if threshold is not None:
        env["XICON_RELEASE_OUTPUTS_MIB"] = threshold
    with cpu_comfy(stack, base, log, env) as (url, proc):
        first = run_prompt(url, graph())
        rss = psutil.Process(proc.pid).memory_info().rss  # idle, after the prompt
        second = run_prompt(url, graph())
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
