"""scripts/bake_text_cache.py against the real ComfyUI v0.33.0 and WanVideoWrapper at its pin.

The tiny model set holds no loadable umt5-xxl (a placeholder the loader refuses), so these tests
prove the script's graph, its waiting and its checks on the real server: with the prompts already
in the cache the node answers from it and the script succeeds without touching the files; with
an empty cache the real loader's refusal comes back as the script's error, and nothing is
cached. (The encode itself ran once with a true-shape umt5-xxl: docs/image.md.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.realstack import GRAPH, ROOT, Stack, make_base
from xicon_dance.schema import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT

SCRIPT = ROOT / "scripts" / "bake_text_cache.py"
PACK = "ComfyUI-WanVideoWrapper"
sys.path.insert(0, str(ROOT / "scripts"))
import bake_text_cache  # noqa: E402


@pytest.fixture
def base(stack: Stack, realstack_base: Path, tmp_path: Path) -> Path:
    """A base with WanVideoWrapper alone, an empty text cache and the session's tiny models."""
    folder = make_base(stack, tmp_path / "bake", packs={PACK})
    cache = folder / "custom_nodes" / PACK / "text_embed_cache"
    if cache.is_dir():
        for old in cache.iterdir():
            old.unlink()
    (folder / "models").symlink_to(realstack_base / "models")
    return folder


def run(stack: Stack, base: Path) -> subprocess.CompletedProcess[str]:
    cache = base / "custom_nodes" / PACK / "text_embed_cache"
    cmd = [str(stack.python), str(SCRIPT), "--comfy-dir", str(stack.comfy_dir)]
    cmd += [f"--comfy-arg=--base-directory={base}", "--cache-dir", str(cache)]
    cmd += [f"--comfy-arg=--database-url=sqlite:///{base}/db.sqlite", "--startup-timeout", "900"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)


def prompts() -> list[str]:
    return list(dict.fromkeys(p for pair in bake_text_cache.prompt_pairs([]) for p in pair))


def test_the_default_prompts_are_the_pairs_encoded() -> None:
    pairs = bake_text_cache.prompt_pairs(["a robot waltzes", DEFAULT_PROMPT])
    assert pairs == [
        (DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT),
        ("a robot waltzes", DEFAULT_NEGATIVE_PROMPT),
    ]  # the default pair once
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    encode = bake_text_cache.encode_graph(graph, "p", "n")
    shipped = graph["368"]["inputs"]
    assert encode["1"]["inputs"] == {**shipped, "positive_prompt": "p", "negative_prompt": "n"}
    assert encode["2"] == {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}


def test_with_the_prompts_cached_it_succeeds_and_leaves_the_files(stack: Stack, base: Path) -> None:
    cache = base / "custom_nodes" / PACK / "text_embed_cache"
    seed = [str(stack.python), str(ROOT / "scripts" / "make_synthetic_models.py")]
    seed += ["--text-cache", str(cache)]
    for prompt in prompts():
        seed += ["--prompt", prompt]
    subprocess.run(seed, check=True, cwd=ROOT, timeout=600, capture_output=True)
    before = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    assert len(before) == len(prompts()) == 2

    done = run(stack, base)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("cached ") == 2
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == before  # read, not written


def test_without_a_loadable_t5_it_fails_with_the_loaders_reason(stack: Stack, base: Path) -> None:
    done = run(stack, base)

    assert done.returncode == 1
    assert "the encode failed in ComfyUI" in done.stderr, done.stderr[-3000:]
    assert "umt5-xxl" in done.stderr  # WanVideoWrapper's loader: "expects the 'umt5-xxl' model"
    assert not list((base / "custom_nodes" / PACK / "text_embed_cache").glob("*.pt"))
