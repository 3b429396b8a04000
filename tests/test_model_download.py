"""The model download script against a real local HTTP server in the Hugging Face URL layout.

The server answers ``HEAD``/``GET /{repo}/resolve/{revision}/{path}`` with ``X-Repo-Commit``,
``ETag`` and ``Content-Length`` as huggingface_hub expects (``HF_ENDPOINT`` points at it), honours
``Range`` and can cut a response short to simulate an interrupted download. It also serves plain
URLs for ``url`` sources. Also checks the real manifest against the graph's model file names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from xicon_dance import model_download as md

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubState:
    files: dict[str, bytes] = field(default_factory=dict)  # url path -> body
    cut_after: int | None = None  # GET answers stop after this many bytes, then fail
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)


def _handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _headers(self, body: bytes, status: int, start: int) -> None:
            self.send_response(status)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()

        def _lookup(self) -> bytes | None:
            path = self.path.split("?", 1)[0]
            return state.files.get(path)

        def do_HEAD(self) -> None:
            state.requests.append(("HEAD", self.path, None))
            body = self._lookup()
            if body is None:
                self.send_error(404)
                return
            self._headers(body, 200, 0)

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append(("GET", self.path, rng))
            body = self._lookup()
            if body is None:
                self.send_error(404)
                return
            if state.cut_after is not None and any(
                m == "GET" and p == self.path for m, p, _ in state.requests[:-1]
            ):
                self.send_error(503)  # later attempts of an "interrupted" phase: hard failure
                return
            start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
            self._headers(body, 206 if start else 200, start)
            payload = body[start:]
            if state.cut_after is not None:
                self.wfile.write(payload[: state.cut_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, HubState]]:
    state = HubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hc, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    yield endpoint, state
    server.shutdown()
    server.server_close()


def _body(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


def _manifest(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"models": entries}))
    return path


def _hf_entry(name: str, body: bytes, *, size: int | None = None, sha: str | None = None) -> dict:
    return {
        "name": name,
        "folder": "vae",
        "filename": f"{name}.safetensors",
        "source": {"type": "hf", "repo": "org/repo", "path": f"sub/{name}.bin", "revision": "main"},
        "size": len(body) if size is None else size,
        "sha256": hashlib.sha256(body).hexdigest() if sha is None else sha,
    }


def test_hf_and_url_sources_land_verified_then_skip(hub, tmp_path: Path) -> None:
    endpoint, state = hub
    a, b = _body(50_000, 1), _body(7_000, 2)
    state.files["/org/repo/resolve/main/sub/a.bin"] = a
    state.files["/files/b.onnx"] = b
    url_entry = {
        "name": "b",
        "folder": "detection",
        "filename": "b.onnx",
        "source": {"type": "url", "url": f"{endpoint}/files/b.onnx"},
        "size": len(b),
        "sha256": hashlib.sha256(b).hexdigest(),
    }
    manifest = _manifest(tmp_path, [_hf_entry("a", a), url_entry])
    models = tmp_path / "models"
    assert md.main(["--manifest", str(manifest), "--models-dir", str(models)]) == 0
    assert (models / "vae" / "a.safetensors").read_bytes() == a
    assert (models / "detection" / "b.onnx").read_bytes() == b
    assert not (models / md.STAGING_DIR).exists()
    seen = len(state.requests)
    assert md.main(["--manifest", str(manifest), "--models-dir", str(models)]) == 0
    assert len(state.requests) == seen, "a present, verified file must be skipped without network"


def test_hf_download_resumes_after_interruption(hub, tmp_path: Path) -> None:
    _, state = hub
    body = _body(40_000, 3)
    state.files["/org/repo/resolve/main/sub/r.bin"] = body
    manifest = _manifest(tmp_path, [_hf_entry("r", body)])
    models = tmp_path / "models"
    state.cut_after = 10_000
    assert md.main(["--manifest", str(manifest), "--models-dir", str(models)]) == 1
    assert not (models / "vae" / "r.safetensors").exists(), "no partial file at the final path"
    state.cut_after = None
    state.requests.clear()
    assert md.main(["--manifest", str(manifest), "--models-dir", str(models)]) == 0
    assert (models / "vae" / "r.safetensors").read_bytes() == body
    ranges = [r for m, _, r in state.requests if m == "GET"]
    assert ranges == ["bytes=10000-"], f"second run must continue the partial file: {ranges}"


def test_url_download_resumes_partial_file(hub, tmp_path: Path) -> None:
    endpoint, state = hub
    body = _body(30_000, 4)
    state.files["/rel/n.torchscript"] = body
    entry = {
        "name": "n",
        "folder": "nlf",
        "filename": "n.torchscript",
        "source": {"type": "url", "url": f"{endpoint}/rel/n.torchscript"},
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    models = tmp_path / "models"
    part = models / md.STAGING_DIR / "n" / "n.torchscript.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(body[:12_345])
    assert (
        md.main(["--manifest", str(_manifest(tmp_path, [entry])), "--models-dir", str(models)]) == 0
    )
    assert (models / "nlf" / "n.torchscript").read_bytes() == body
    assert [r for m, _, r in state.requests if m == "GET"] == ["bytes=12345-"]


def test_url_retries_are_bounded_and_4xx_is_not_retried(
    hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cut body, then 5xx on every later attempt: URL_RETRIES GETs, each resuming, then a
    failure naming the file; a 404 is final at once."""
    monkeypatch.setattr(md, "RETRY_BASE_S", 0.001)
    endpoint, state = hub
    body = _body(20_000, 5)
    state.files["/rel/f.bin"] = body
    entry = {
        "name": "f",
        "folder": "nlf",
        "filename": "f.bin",
        "source": {"type": "url", "url": f"{endpoint}/rel/f.bin"},
        "size": len(body),
        "sha256": None,
    }
    state.cut_after = 1_000
    with pytest.raises(md.DownloadFailed, match=r"f\.bin: download failed: HTTP Error 503"):
        md.fetch(md._entry(entry, 0), tmp_path / "models")
    gets = [r for m, _, r in state.requests if m == "GET"]
    assert len(gets) == md.URL_RETRIES and gets[1:] == ["bytes=1000-"] * (md.URL_RETRIES - 1)
    state.cut_after = None
    state.requests.clear()
    missing = {**entry, "source": {"type": "url", "url": f"{endpoint}/rel/none.bin"}}
    with pytest.raises(md.DownloadFailed, match="HTTP 404 from the source"):
        md.fetch(md._entry(missing, 0), tmp_path / "models")
    assert len(state.requests) == 1


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_mismatch_is_refused(hub, tmp_path: Path, wrong: str, caplog) -> None:
    _, state = hub
    body = _body(5_000, 5)
    state.files["/org/repo/resolve/main/sub/m.bin"] = body
    entry = _hf_entry("m", body)
    entry[wrong] = 4_999 if wrong == "size" else "0" * 64
    models = tmp_path / "models"
    rc = md.main(["--manifest", str(_manifest(tmp_path, [entry])), "--models-dir", str(models)])
    assert rc == 1
    assert not (models / "vae" / "m.safetensors").exists()
    assert f"{wrong} mismatch" in caplog.text and "m.safetensors" in caplog.text


def test_corrupt_present_file_is_fetched_again(hub, tmp_path: Path) -> None:
    _, state = hub
    body = _body(6_000, 6)
    state.files["/org/repo/resolve/main/sub/c.bin"] = body
    models = tmp_path / "models"
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "c.safetensors").write_bytes(b"x" * len(body))
    manifest = _manifest(tmp_path, [_hf_entry("c", body)])
    assert md.main(["--manifest", str(manifest), "--models-dir", str(models)]) == 0
    assert (models / "vae" / "c.safetensors").read_bytes() == body


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"folder": "checkpoints"}, "folder"),
        ({"source": {"type": "s3"}}, "source.type"),
        ({"sha256": "ABC"}, "sha256"),
        ({"size": -1}, "size"),
        ({"filename": "../x"}, "filename"),
        ({"aliases": ["../x.pth"]}, "aliases"),
        ({"aliases": "x.pth"}, "aliases"),
    ],
)
def test_bad_manifest_entries_are_named(tmp_path: Path, patch: dict, needle: str) -> None:
    entry = _hf_entry("bad", b"x") | patch
    with pytest.raises(md.DownloadFailed, match=needle):
        md.load_manifest(_manifest(tmp_path, [entry]))


def test_real_manifest_is_valid_and_matches_the_graph() -> None:
    entries = md.load_manifest(ROOT / "model_manifest.json")
    names = {e.filename for e in entries}
    for e in entries:
        if e.source["type"] == "hf":
            assert re.fullmatch(r"[0-9a-f]{40}|main", e.source["revision"]), e.name
    workflow = ROOT / "XiCON_Dance_SCAIL_vFinal.json"
    if not workflow.exists():
        pytest.skip("workflow template not committed yet")
    graph = json.loads(workflow.read_text())
    nodes = graph.get("prompt", graph) if isinstance(graph, dict) else {}
    folder_of = {e.filename: e.folder for e in entries}
    used = set()
    for node in nodes.values():
        if not isinstance(node, dict):
            continue
        for value in node.get("inputs", {}).values():
            if isinstance(value, str) and value.endswith(MODEL_EXTS):
                used.add(value)  # exact: the file lands at <folder>/<filename>, no sub-folder
                expected = LOADER_FOLDER.get(node.get("class_type"))
                assert expected is None or folder_of.get(value) == expected, (value, expected)
    assert used == names, f"graph-only: {used - names}, manifest-only: {names - used}"


LOADER_FOLDER = {
    "WanVideoModelLoader": "diffusion_models",
    "WanVideoVAELoader": "vae",
    "WanVideoLoraSelect": "loras",
    "CLIPVisionLoader": "clip_vision",
    "LoadNLFModel": "nlf",
    "OnnxDetectionModelLoader": "detection",
    "WanVideoTextEncodeCached": "text_encoders",
}
MODEL_EXTS = (".safetensors", ".onnx", ".torchscript", ".pth", ".pt", ".bin", ".gguf")


def test_cli_runs_as_module(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xicon_dance.model_download",
            "--manifest",
            str(tmp_path / "no.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot read manifest" in proc.stderr


def test_link_from_hf_cache(tmp_path: Path) -> None:
    body = _body(1_000, 7)
    entry = _hf_entry("k", body)
    cache = tmp_path / "hub"
    snap = cache / "models--org--repo" / "snapshots" / COMMIT / "sub"
    snap.mkdir(parents=True)
    (snap / "k.bin").write_bytes(body)
    (cache / "models--org--repo" / "refs").mkdir()
    (cache / "models--org--repo" / "refs" / "main").write_text(COMMIT)
    models = tmp_path / "models"
    args = ["--manifest", str(_manifest(tmp_path, [entry])), "--models-dir", str(models)]
    assert md.main([*args, "--link-from-hf-cache", str(cache)]) == 0
    dest = models / "vae" / "k.safetensors"
    assert dest.is_symlink() and dest.read_bytes() == body
    assert md.main(args) == 0  # already present and verified: no server needed


def test_an_alias_present_counts_as_present(tmp_path: Path) -> None:
    """A volume laid out with the original file name (e.g. Wan2.1_VAE.pth) fetches nothing."""
    entry = _hf_entry("vae", b"x") | {"folder": "vae", "aliases": ["Wan2.1_VAE.pth"]}
    (loaded,) = md.load_manifest(_manifest(tmp_path, [entry]))
    models = tmp_path / "models"
    assert not md.is_present(loaded, models)
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "Wan2.1_VAE.pth").write_bytes(b"weights")
    assert md.is_present(loaded, models)


def test_real_manifest_names_the_seed_vae_as_an_alias() -> None:
    entries = {e.name: e for e in md.load_manifest(ROOT / "model_manifest.json")}
    assert entries["wan21_vae"].aliases == ("Wan2.1_VAE.pth",)


def test_the_image_model_stage_installs_the_models_extra() -> None:
    """The Dockerfile's model stage runs this script with its own small venv: it installs
    exactly the ``models`` extra's pins (tenacity included), or the bake fails at import."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {r.split("==")[0].lower(): r.split("==")[1] for r in extra["models"]}
    text = (ROOT / "Dockerfile").read_text()
    stage = text[text.index("AS models") : text.index("AS runtime")]
    args = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", stage, re.M))
    installed = re.findall(r'"([\w-]+)==\$\{(\w+)_VERSION\}"', stage)
    assert {name.lower(): args[arg] for name, arg in installed} == wanted
