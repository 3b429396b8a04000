"""The node definitions the graph is validated against come from the code the image installs: the
fixture's recorded commits equal stack/components.json (the one lock the Dockerfile, the install
script and the real-stack tests read)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fixture_commits_are_the_locked_stack() -> None:
    meta = json.loads((ROOT / "tests/fixtures/object_info.json").read_text())["_meta"]
    locked = {
        c["name"]: c["commit"]
        for c in json.loads((ROOT / "stack/components.json").read_text())["components"]
    }
    assert meta["source"] == "live"
    assert meta["comfyui"]["commit"] == locked.pop("ComfyUI")
    assert meta["custom_nodes"] == locked
