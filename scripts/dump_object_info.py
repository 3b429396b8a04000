"""Dump the real ``/object_info`` of the pinned ComfyUI stack into a test fixture.

Usage:
    python scripts/dump_object_info.py --comfyui DIR --node DIR [--node DIR ...] \
        [--python PY] [--graph XiCON_Dance_SCAIL_vFinal.json] [--manifest model_manifest.json] \
        [--out tests/fixtures/object_info.json] [--timeout 600]

What it does:
1. Builds a throw-away base directory: ``custom_nodes/`` links to the given node checkouts,
   ``models/<folder>/<filename>`` placeholder files for every manifest entry (so COMBO lists hold
   the manifest's names), ``input/`` placeholders for the graph's LoadImage/VHS_LoadVideo values,
   and an empty front-end root.
2. Starts ``PY main.py --cpu`` of the ComfyUI checkout on 127.0.0.1 and a free port, with that base
   directory, and waits for ``GET /object_info``. A log line ``IMPORT FAILED`` or a failed node
   registration makes the dump fail (the pin pair is then not usable).
3. Writes the entries of the node classes the graph uses (plus ``EXTRA_CLASSES``) and a ``_meta``
   entry: ``source: "live"``, ComfyUI tag and commit, each node checkout's commit (read with git),
   the date, and the VALIDATE_INPUTS rule used by ``xicon_dance.graph_check``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from xicon_dance.graph_check import VALIDATE_INPUTS_DEFAULT

log = logging.getLogger("dump_object_info")
ROOT = Path(__file__).resolve().parent.parent
EXTRA_CLASSES = ("WanVideoBlockSwap", "WanVideoSetBlockSwap", "LoadWanVideoT5TextEncoder")
FAIL_MARKERS = ("IMPORT FAILED", "Cannot import", "failed to register", "Failed to register")


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_base(base: Path, nodes: list[Path], manifest: dict, graph: dict) -> None:
    (base / "custom_nodes").mkdir(parents=True)
    for node in nodes:
        (base / "custom_nodes" / node.name).symlink_to(node.resolve())
    for model in manifest["models"]:
        target = base / "models" / model["folder"] / model["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"placeholder")
    (base / "input").mkdir()
    for node in graph.values():
        for key in ("image", "video"):
            value = node.get("inputs", {}).get(key)
            if node["class_type"] in ("LoadImage", "VHS_LoadVideo") and isinstance(value, str):
                (base / "input" / value).write_bytes(b"placeholder")
    (base / "frontend").mkdir()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/object_info", timeout=30) as resp:
                return json.load(resp)
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"ComfyUI was not ready within {timeout:.0f} s")


def _meta(comfyui: Path, nodes: list[Path]) -> dict:
    return {
        "source": "live",
        "comfyui": {
            "tag": _git(comfyui, "describe", "--tags", "--exact-match") or None,
            "commit": _git(comfyui, "rev-parse", "HEAD") or None,
        },
        "custom_nodes": {n.name: _git(n, "rev-parse", "HEAD") or None for n in nodes},
        "date": dt.date.today().isoformat(),
        "validate_inputs": VALIDATE_INPUTS_DEFAULT,
    }


def dump(args: argparse.Namespace) -> dict:
    graph = json.loads(args.graph.read_text(encoding="utf-8"))
    manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
    wanted = sorted({n["class_type"] for n in graph.values()} | set(EXTRA_CLASSES))
    with tempfile.TemporaryDirectory(prefix="comfy-dump-") as tmp:
        base = Path(tmp)
        _prepare_base(base, args.node, manifest, graph)
        port = _free_port()
        cmd = [
            args.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-directory",
            str(base),
            "--front-end-root",
            str(base / "frontend"),
            "--disable-auto-launch",
        ]
        logfile = base / "comfyui.log"
        with open(logfile, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=args.comfyui, stdout=fh, stderr=subprocess.STDOUT)
            try:
                info = _wait_ready(f"http://127.0.0.1:{port}", proc, args.timeout)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        text = logfile.read_text(errors="replace")
        bad = [line for line in text.splitlines() if any(m in line for m in FAIL_MARKERS)]
        if args.keep_log:
            shutil.copy(logfile, args.keep_log)
    if bad:
        raise RuntimeError("node packages failed to load:\n" + "\n".join(bad))
    missing = [c for c in wanted if c not in info and c not in EXTRA_CLASSES]
    if missing:
        raise RuntimeError(f"classes missing from /object_info: {missing}")
    out = {"_meta": _meta(args.comfyui, args.node)}
    out.update({c: info[c] for c in wanted if c in info})
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", type=Path, required=True, help="ComfyUI checkout")
    p.add_argument("--node", type=Path, action="append", required=True, help="custom-node checkout")
    p.add_argument("--python", default=sys.executable, help="interpreter with ComfyUI's deps")
    p.add_argument("--graph", type=Path, default=ROOT / "XiCON_Dance_SCAIL_vFinal.json")
    p.add_argument("--manifest", type=Path, default=ROOT / "model_manifest.json")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "object_info.json")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--keep-log", type=Path, help="copy ComfyUI's log here")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        data = dump(args)
    except (RuntimeError, TimeoutError, OSError) as exc:
        log.error("dump failed: %s", exc)
        return 1
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("wrote %d classes to %s", len(data) - 1, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
