"""The node definitions the graph is validated against must come from the code the image installs:
the fixture's recorded commits equal the Dockerfile's pins."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARG_FOR_NODE = {
    "ComfyUI-WanVideoWrapper": "WANVIDEOWRAPPER_COMMIT",
    "ComfyUI-VideoHelperSuite": "VIDEOHELPERSUITE_COMMIT",
    "ComfyUI-KJNodes": "KJNODES_COMMIT",
    "ComfyUI-SCAIL-Pose": "SCAIL_POSE_COMMIT",
    "ComfyUI-WanAnimatePreprocess": "WANANIMATEPREPROCESS_COMMIT",
}


def dockerfile_args() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))


def test_fixture_commits_match_the_image() -> None:
    meta = json.loads((ROOT / "tests/fixtures/object_info.json").read_text())["_meta"]
    args = dockerfile_args()
    assert set(meta["custom_nodes"]) == set(ARG_FOR_NODE)
    for node, arg in ARG_FOR_NODE.items():
        assert meta["custom_nodes"][node] == args[arg], f"{node}: fixture vs Dockerfile {arg}"
    comfy_commit = meta["comfyui"]["commit"]
    if meta["source"] == "live" or comfy_commit is not None:
        assert comfy_commit == args["COMFYUI_COMMIT"]
