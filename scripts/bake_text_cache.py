"""Fill WanVideoWrapper's text-embedding cache with the default prompts' encodings (image build).

Why: the shipped graph's text node (368, ``WanVideoTextEncodeCached`` with ``use_disk_cache``)
loads the 11.4-GB umt5-xxl file and encodes whenever a prompt is not in its disk cache. A fresh
worker's cache is empty, so its first job with the default prompts (every job that sends no
``prompt``/``negative_prompt``) paid 6.0 s in that node on an H200 with the file in the page cache
(``bench/results/gpu_h200_compile``: ``baseline:cold``), and a fresh worker reads the file from
disk too. Encoded once at build, those prompts never touch the file again.

What it does: starts the real ComfyUI (``main.py --cpu``, loopback, a free port), queues one graph
per prompt pair, ``WanVideoTextEncodeCached`` with node 368's model inputs from the shipped graph
and ``use_disk_cache`` on, read by core ``PreviewAny`` (an output node, so the encode runs), waits
for each prompt's history entry, then checks that WanVideoWrapper's cache file
``<ComfyUI>/custom_nodes/ComfyUI-WanVideoWrapper/text_embed_cache/<sha256(prompt.strip())>.pt``
(``nodes.py`` ``get_cache_path``) exists for every prompt, and stops ComfyUI.

Prompts: the job's defaults (``xicon_dance.schema``; the worker writes them into node 368 when a
job sends none), and any ``--prompt`` given (paired with the default negative prompt). Each
prompt is one T5 forward on the CPU: with a true-shape umt5-xxl the default pair took 787 s on a
2-core machine that was running the test suite at the same time (docs/image.md).

Run (the Dockerfile does, with the image's venv)::

    python scripts/bake_text_cache.py --comfy-dir /comfyui
    # a base directory: --comfy-arg=--base-directory=DIR --cache-dir DIR/custom_nodes/...

Exit status 0 when every cache file exists; 1 with the reason (ComfyUI's own error message for
a failed encode, or its log's tail when it does not start) otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xicon_dance.schema import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT  # noqa: E402

log = logging.getLogger("bake_text_cache")

GRAPH = ROOT / "XiCON_Dance_SCAIL_vFinal.json"
TEXT_NODE = "368"
CACHE = Path("custom_nodes") / "ComfyUI-WanVideoWrapper" / "text_embed_cache"


class BakeError(Exception):
    """The cache could not be filled; the message says why."""


def cache_file(cache_dir: Path, prompt: str) -> Path:
    """WanVideoWrapper's cache file for ``prompt`` (``nodes.py`` ``get_cache_path``)."""
    return cache_dir / f"{hashlib.sha256(prompt.strip().encode('utf-8')).hexdigest()}.pt"


def prompt_pairs(extra: list[str]) -> list[tuple[str, str]]:
    """(positive, negative) pairs to encode, without repeats, in a stable order."""
    pairs = [(DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT)]
    pairs += [(p, DEFAULT_NEGATIVE_PROMPT) for p in extra]
    return list(dict.fromkeys(pairs))


def encode_graph(graph: dict[str, Any], positive: str, negative: str) -> dict[str, Any]:
    """Node 368 as shipped, with these prompts and the disk cache on, read by PreviewAny."""
    inputs = dict(graph[TEXT_NODE]["inputs"])
    inputs.update(positive_prompt=positive, negative_prompt=negative, use_disk_cache=True)
    return {
        "1": {"class_type": graph[TEXT_NODE]["class_type"], "inputs": inputs},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as answer:
        return json.loads(answer.read() or b"null")


class Comfy:
    """The real ComfyUI on loopback, for the length of a ``with`` block."""

    def __init__(self, comfy_dir: Path, python: str, extra_args: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # ComfyUI's output, kept for the error message; closed (and removed) by __exit__
        self.log = tempfile.NamedTemporaryFile("w", suffix=".log")  # noqa: SIM115
        args = ["--cpu", "--listen", "127.0.0.1", "--port", str(self.port)]
        self.cmd = [python, str(comfy_dir / "main.py"), *args, "--disable-auto-launch", *extra_args]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Comfy:
        log.info("starting ComfyUI: %s", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BakeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                _request(f"{self.url}/system_stats", timeout=2)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise BakeError(f"ComfyUI did not answer within {timeout:g} s:\n{self.tail()}")

    def run(self, graph: dict[str, Any], timeout: float) -> None:
        """Queue ``graph`` and wait for its history entry; a failure raises ``BakeError``."""
        try:
            queued = _request(f"{self.url}/prompt", {"prompt": graph})
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            raise BakeError(f"ComfyUI refused the graph: {body}") from None
        prompt_id = queued["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = _request(f"{self.url}/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed"):
                return
            if status.get("status_str") == "error":
                errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                detail = errors[0].get("exception_message", "") if errors else ""
                raise BakeError(f"the encode failed in ComfyUI: {detail.strip()}")
            time.sleep(1.0)
        raise BakeError(f"the encode did not finish within {timeout:g} s:\n{self.tail()}")


def bake(
    comfy_dir: Path,
    python: str,
    extra_args: list[str],
    prompts: list[str],
    startup_timeout: float,
    encode_timeout: float,
    cache_dir: Path | None = None,
) -> list[Path]:
    """Encode every prompt pair through ComfyUI; the cache files, all present (else BakeError).
    ``cache_dir``: where WanVideoWrapper writes (its folder's ``text_embed_cache``; default
    under ``comfy_dir``, another with ``--base-directory``)."""
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    pairs = prompt_pairs(prompts)
    cache_dir = cache_dir or comfy_dir / CACHE
    with Comfy(comfy_dir, python, extra_args) as comfy:
        comfy.wait_ready(startup_timeout)
        for positive, negative in pairs:
            started = time.monotonic()
            comfy.run(encode_graph(graph, positive, negative), encode_timeout)
            log.info("encoded %r in %.1f s", positive[:40], time.monotonic() - started)
    files = [cache_file(cache_dir, p) for pair in pairs for p in pair]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BakeError(f"ComfyUI finished but the cache lacks {missing} in {cache_dir}")
    return list(dict.fromkeys(files))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--comfy-dir", type=Path, required=True, help="ComfyUI with the custom nodes")
    p.add_argument("--python", default=sys.executable, help="ComfyUI's Python")
    p.add_argument(
        "--comfy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra ComfyUI argument (repeatable; --comfy-arg=--base-directory=DIR)",
    )
    p.add_argument("--prompt", action="append", default=[], help="another prompt to encode")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help=f"WanVideoWrapper's cache folder (default: COMFY_DIR/{CACHE.as_posix()})",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--encode-timeout", type=float, default=1800.0, help="per prompt pair")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bake_text_cache] %(message)s")
    try:
        files = bake(
            args.comfy_dir.resolve(),
            args.python,
            args.comfy_arg,
            args.prompt,
            args.startup_timeout,
            args.encode_timeout,
            args.cache_dir,
        )
    except BakeError as exc:
        log.error("%s", exc)
        return 1
    for f in files:
        log.info("cached %s (%d bytes)", f.name, f.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
