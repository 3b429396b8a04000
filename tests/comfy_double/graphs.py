"""Test graphs with the node IDs and classes of the real SCAIL graph (the role table's IDs).

``small_graph`` is a cut-down API graph (same IDs/classes as ../shared/reference/scail-workflow.md
§6 for every node the worker patches). ``real_graph`` loads XiCON_Dance_SCAIL_vFinal.json from the
repository root when it exists and patches the same inputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
REAL_GRAPH = REPO_ROOT / "XiCON_Dance_SCAIL_vFinal.json"


def small_graph(
    image: str,
    video: str,
    *,
    width: int = 64,
    height: int = 64,
    frames: int = 9,
    fps: float = 8,
    force_rate: float = 24,
    steps: int = 3,
    prefix: str = "test",
    audio: bool = True,
    seed: int = 42,
) -> dict[str, Any]:
    graph: dict[str, Any] = {
        "106": {"class_type": "LoadImage", "inputs": {"image": image}},
        "130": {
            "class_type": "VHS_LoadVideo",
            "inputs": {
                "video": video,
                "force_rate": force_rate,
                "custom_width": 0,
                "custom_height": 0,
                "frame_load_cap": frames,
                "skip_first_frames": 0,
                "select_every_nth": 1,
                "format": "Wan",
            },
        },
        "203": {"class_type": "INTConstant", "inputs": {"value": width}},
        "204": {"class_type": "INTConstant", "inputs": {"value": height}},
        "107": {
            "class_type": "ImageResizeKJv2",
            "inputs": {
                "image": ["106", 0],
                "width": ["203", 0],
                "height": ["204", 0],
                "upscale_method": "lanczos",
                "keep_proportion": "crop",
                "pad_color": "0, 0, 0",
                "crop_position": "center",
                "divisible_by": 32,
                "device": "cpu",
            },
        },
        "368": {
            "class_type": "WanVideoTextEncodeCached",
            "inputs": {
                "model_name": "umt5-xxl-enc-bf16.safetensors",
                "precision": "bf16",
                "positive_prompt": "the person starts to dance",
                "negative_prompt": "",
                "quantization": "disabled",
                "use_disk_cache": False,
                "device": "gpu",
            },
        },
        "349": {
            "class_type": "WanVideoSchedulerv2",
            "inputs": {
                "scheduler": "dpm++_sde",
                "steps": steps,
                "shift": 7.0,
                "start_step": 0,
                "end_step": -1,
                "enhance_hf": False,
            },
        },
        "348": {
            "class_type": "WanVideoSamplerv2",
            "inputs": {
                "image_embeds": ["107", 0],
                "cfg": 1.0,
                "seed": seed,
                "force_offload": True,
                "scheduler": ["349", 0],
                "text_embeds": ["368", 0],
                "add_noise_to_samples": False,
            },
        },
        "139": {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["348", 0],
                "frame_rate": fps,
                "loop_count": 0,
                "filename_prefix": prefix,
                "format": "video/h264-mp4",
                "pix_fmt": "yuv420p",
                "crf": 19,
                "save_metadata": False,
                "trim_to_audio": False,
                "pingpong": False,
                "save_output": True,
            },
        },
    }
    if audio:
        graph["139"]["inputs"]["audio"] = ["130", 2]
    return graph


def real_graph(
    image: str,
    video: str,
    *,
    width: int = 64,
    height: int = 64,
    frames: int = 9,
    fps: float = 8,
    force_rate: float = 24,
    steps: int = 3,
    prefix: str = "test",
    audio: bool = True,
    seed: int = 42,
) -> dict[str, Any] | None:
    """The committed SCAIL graph with the same inputs set as ``small_graph``; None until the
    file exists."""
    if not REAL_GRAPH.is_file():
        return None
    graph = copy.deepcopy(json.loads(REAL_GRAPH.read_text()))
    values = {
        ("106", "image"): image,
        ("130", "video"): video,
        ("130", "force_rate"): force_rate,
        ("130", "frame_load_cap"): frames,
        ("203", "value"): width,
        ("204", "value"): height,
        ("205", "value"): width // 2,
        ("206", "value"): height // 2,
        ("349", "steps"): steps,
        ("348", "seed"): seed,
        ("139", "frame_rate"): fps,
        ("139", "filename_prefix"): prefix,
    }
    for (nid, name), value in values.items():
        graph[nid]["inputs"][name] = value
    if not audio:
        graph["139"]["inputs"].pop("audio", None)
    return graph


def job_graph(image: str, video: str, **kw: Any) -> dict[str, Any]:
    """The real graph when present (validated by the double like ComfyUI would), else the small
    graph."""
    return real_graph(image, video, **kw) or small_graph(image, video, **kw)
