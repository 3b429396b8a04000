"""Fetch every model file of ``model_manifest.json`` into a ComfyUI models folder.

Run as ``python -m xicon_dance.model_download [--manifest F] [--models-dir D] [--only NAME ...]``.

Contract:
- Each manifest entry lands at ``<models dir>/<folder>/<filename>``. The final path only ever holds
  a complete file: downloads go to a staging place and are moved in after verification.
- ``size`` and ``sha256`` are verified when the manifest knows them; a mismatch deletes the bad
  file and fails that entry (``DownloadFailed`` naming the file and both values).
- Idempotent: a file already present whose known size/hash match is skipped without network.
- Resumable: ``hf`` sources are resolved with huggingface_hub (``hf_hub_url`` +
  ``get_hf_file_metadata``: revision, size, Xet info). Xet-backed files go through
  ``hf_hub_download`` with hf_xet (its chunk cache keeps fetched chunks across runs); other files,
  and ``url`` sources, stream into ``<models dir>/.downloads/<name>/<file>.part``, which the next
  attempt or run continues with an HTTP ``Range`` request.
- ``HF_ENDPOINT`` / ``HF_TOKEN`` are honoured by huggingface_hub; a token never appears in logs.
- Exit status 0 when every entry is present and verified, 1 otherwise (each failure is logged).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

log = logging.getLogger("xicon_dance.model_download")

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "model_manifest.json"
STAGING_DIR = ".downloads"
CHUNK = 1024 * 1024
URL_RETRIES = 5
RETRY_BASE_S = 0.2  # waits 0.2, 0.4, 0.8, 1.6 s between the attempts (at most RETRY_MAX_S)
RETRY_MAX_S = 3.0
VALID_FOLDERS = {
    "diffusion_models",
    "text_encoders",
    "vae",
    "loras",
    "clip_vision",
    "nlf",
    "detection",
}


class DownloadFailed(Exception):
    """One manifest entry could not be fetched or verified (the message says which and why)."""


@dataclass(frozen=True)
class Entry:
    name: str
    folder: str
    filename: str
    source: dict[str, Any]
    size: int | None
    sha256: str | None
    # Other file names the same model may have in its folder (a volume laid out by another
    # guide): the worker uses one of them when the canonical file is absent.
    aliases: tuple[str, ...] = ()

    def dest(self, models_dir: Path) -> Path:
        return models_dir / self.folder / self.filename


def _entry(raw: dict[str, Any], index: int) -> Entry:
    where = f"models[{index}]"
    for key in ("name", "folder", "filename", "source"):
        if not raw.get(key):
            raise DownloadFailed(f"{where}: field {key!r} is missing or empty.")
    if raw["folder"] not in VALID_FOLDERS:
        raise DownloadFailed(
            f"{where} ({raw['name']}): folder must be one of {sorted(VALID_FOLDERS)}."
        )
    src = raw["source"]
    kind = src.get("type")
    if kind == "hf":
        missing = [k for k in ("repo", "path", "revision") if not src.get(k)]
        if missing:
            raise DownloadFailed(f"{where} ({raw['name']}): hf source lacks {missing}.")
    elif kind == "url":
        if not str(src.get("url", "")).startswith(("https://", "http://")):
            raise DownloadFailed(f"{where} ({raw['name']}): url source needs an http(s) url.")
    else:
        raise DownloadFailed(f"{where} ({raw['name']}): source.type must be 'hf' or 'url'.")
    if "/" in raw["filename"] or raw["filename"].startswith("."):
        raise DownloadFailed(f"{where} ({raw['name']}): filename must be a plain file name.")
    size, sha = raw.get("size"), raw.get("sha256")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise DownloadFailed(f"{where} ({raw['name']}): size must be a positive integer or null.")
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise DownloadFailed(f"{where} ({raw['name']}): sha256 must be 64 lowercase hex or null.")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or any(
        not isinstance(a, str) or not a or "/" in a or a.startswith(".") for a in aliases
    ):
        raise DownloadFailed(
            f"{where} ({raw['name']}): aliases must be a list of plain file names."
        )
    return Entry(raw["name"], raw["folder"], raw["filename"], src, size, sha, tuple(aliases))


def load_manifest(path: Path) -> list[Entry]:
    """Parse and validate the manifest; raises ``DownloadFailed`` naming the bad field."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DownloadFailed(f"cannot read manifest {path}: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise DownloadFailed(f"manifest {path}: 'models' must be a non-empty list.")
    entries = [_entry(raw, i) for i, raw in enumerate(models)]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise DownloadFailed(f"manifest {path}: entry names must be unique.")
    return entries


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify(entry: Entry, path: Path) -> None:
    """Raise ``DownloadFailed`` when ``path`` does not match the entry's known size/sha256."""
    actual = path.stat().st_size
    if entry.size is not None and actual != entry.size:
        raise DownloadFailed(
            f"{entry.filename}: size mismatch, expected {entry.size} bytes, got {actual}."
        )
    if entry.sha256 is not None:
        digest = sha256_of(path)
        if digest != entry.sha256:
            raise DownloadFailed(
                f"{entry.filename}: sha256 mismatch, expected {entry.sha256}, got {digest}."
            )


def is_present(entry: Entry, models_dir: Path) -> bool:
    dest = entry.dest(models_dir)
    if not dest.is_file():
        for alias in entry.aliases:
            if (dest.parent / alias).is_file():
                log.info("%s: %s is present under its other name; not fetching.", dest, alias)
                return True
        return False
    try:
        verify(entry, dest)
    except DownloadFailed as exc:
        log.warning("%s is present but fails verification (%s); fetching again.", dest, exc)
        return False
    return True


def _fetch_hf(entry: Entry, staging: Path) -> Path:
    # imported late: only hf sources need huggingface_hub
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers
    from huggingface_hub.utils._runtime import is_xet_available

    src = entry.source
    repo_type = src.get("repo_type", "model")
    url = hf_hub_url(src["repo"], src["path"], revision=src["revision"], repo_type=repo_type)
    meta = get_hf_file_metadata(url)
    if entry.size is not None and meta.size is not None and meta.size != entry.size:
        raise DownloadFailed(
            f"{entry.filename}: size mismatch, expected {entry.size} bytes, "
            f"the Hub reports {meta.size} (revision {meta.commit_hash})."
        )
    if meta.xet_file_data is not None and is_xet_available() and not constants.HF_HUB_DISABLE_XET:
        # Xet-backed: hf_xet fetches chunks in parallel and keeps them in its chunk cache,
        # so an interrupted run re-uses what it already has.
        path = hf_hub_download(
            repo_id=src["repo"],
            filename=src["path"],
            revision=src["revision"],
            repo_type=repo_type,
            local_dir=staging,
        )
        return Path(path)
    same_host = urllib.parse.urlsplit(meta.location).netloc == urllib.parse.urlsplit(url).netloc
    headers = build_hf_headers() if same_host else {}  # never send the token to a CDN
    return _fetch_http(entry, staging, meta.location, headers)


def _open_range(url: str, start: int, headers: dict[str, str]) -> Any:
    headers = {"User-Agent": "xicon-dance-model-download", **headers}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)


def _stream_once(url: str, part: Path, headers: dict[str, str]) -> None:
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open_range(url, start, headers)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the part is already complete
            return
        raise
    with resp:
        if start and resp.status != 206:
            log.info("%s: server ignored Range, restarting from 0.", part.name)
            start = 0
        with part.open("ab" if start else "wb") as fh:
            while block := resp.read(CHUNK):
                fh.write(block)
        expected = resp.headers.get("Content-Length")
    if expected is not None and part.stat().st_size != start + int(expected):
        raise OSError(f"connection ended early at {part.stat().st_size} bytes")


def _fetch_http(entry: Entry, staging: Path, url: str, headers: dict[str, str]) -> Path:
    """Stream ``url`` into ``<staging>/<filename>.part``, continuing an existing part by Range.
    ``URL_RETRIES`` attempts (tenacity) on connection errors and 5xx, each resuming the part."""
    staging.mkdir(parents=True, exist_ok=True)
    part = staging / f"{entry.filename}.part"

    def resuming(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: attempt %d failed (%s), resuming.", entry.filename, state.attempt_number, failure
        )

    retrying = Retrying(
        stop=stop_after_attempt(URL_RETRIES),
        wait=wait_exponential(multiplier=RETRY_BASE_S, max=RETRY_MAX_S),
        retry=retry_if_exception(_worth_retrying),
        before_sleep=resuming,
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                _stream_once(url, part, headers)
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            raise DownloadFailed(f"{entry.filename}: HTTP {exc.code} from the source.") from None
        raise DownloadFailed(f"{entry.filename}: download failed: {exc}") from None
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise DownloadFailed(f"{entry.filename}: download failed: {exc}") from None
    return part


def _worth_retrying(exc: BaseException) -> bool:
    """Connection problems, cut-short bodies and 5xx; a 4xx answer will not change."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500
    return isinstance(exc, (OSError, http.client.HTTPException))


def fetch(entry: Entry, models_dir: Path) -> Path:
    """Make ``entry`` present and verified under ``models_dir``; return its final path."""
    dest = entry.dest(models_dir)
    if is_present(entry, models_dir):
        log.info("skip %s: present and verified.", dest)
        return dest
    staging = models_dir / STAGING_DIR / entry.name
    log.info("fetch %s -> %s", entry.name, dest)
    try:
        if entry.source["type"] == "hf":
            got = _fetch_hf(entry, staging)
        else:
            got = _fetch_http(entry, staging, entry.source["url"], {})
    except DownloadFailed:
        raise
    except Exception as exc:  # huggingface_hub raises many types; keep the partial file
        raise DownloadFailed(
            f"{entry.filename}: download failed: {type(exc).__name__}: {exc}"
        ) from None
    try:
        verify(entry, got)
    except DownloadFailed:
        got.unlink(missing_ok=True)
        raise
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(got, dest)
    shutil.rmtree(staging, ignore_errors=True)
    if entry.size is None or entry.sha256 is None:
        log.warning("%s: stored without full verification (size/sha256 unknown).", dest.name)
    return dest


def cached_snapshot_file(entry: Entry, cache_root: Path) -> Path | None:
    """The entry's file in a Hugging Face hub cache (``models--org--name/snapshots/<rev>/...``)."""
    if entry.source["type"] != "hf":
        return None
    repo_dir = cache_root / ("models--" + entry.source["repo"].replace("/", "--"))
    revision = entry.source["revision"]
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8").strip()
    candidate = repo_dir / "snapshots" / revision / entry.source["path"]
    return candidate if candidate.is_file() else None


def link_from_cache(entries: list[Entry], models_dir: Path, cache_root: Path) -> int:
    """Symlink cached files into ``<models dir>/<folder>/<filename>`` where absent; return count."""
    linked = 0
    for entry in entries:
        dest = entry.dest(models_dir)
        found = cached_snapshot_file(entry, cache_root)
        if found is None or dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink():
            dest.unlink()  # a dangling link from an older cache
        dest.symlink_to(found.resolve())
        log.info("linked %s -> %s", dest, found)
        linked += 1
    return linked


def download_all(entries: list[Entry], models_dir: Path) -> list[str]:
    """Fetch every entry; return one message per failed entry (empty list = success)."""
    failures: list[str] = []
    for entry in entries:
        try:
            fetch(entry, models_dir)
        except DownloadFailed as exc:
            log.error("%s", exc)
            failures.append(str(exc))
    staging_root = models_dir / STAGING_DIR
    if not failures and staging_root.is_dir() and not any(staging_root.iterdir()):
        staging_root.rmdir()
    return failures


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument(
        "--models-dir", type=Path, default=Path(os.environ.get("MODELS_DIR", "/comfyui/models"))
    )
    parser.add_argument("--only", nargs="*", default=None, help="entry names to fetch")
    parser.add_argument(
        "--link-from-hf-cache",
        type=Path,
        default=None,
        help="only symlink files found in this Hugging Face hub cache; no download",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _args(argv)
    try:
        entries = load_manifest(args.manifest)
    except DownloadFailed as exc:
        log.error("%s", exc)
        return 1
    if args.only:
        unknown = set(args.only) - {e.name for e in entries}
        if unknown:
            log.error("--only names not in the manifest: %s", sorted(unknown))
            return 1
        entries = [e for e in entries if e.name in args.only]
    if args.link_from_hf_cache is not None:
        count = link_from_cache(entries, args.models_dir, args.link_from_hf_cache)
        log.info("linked %d model files from %s.", count, args.link_from_hf_cache)
        return 0
    failures = download_all(entries, args.models_dir)
    if failures:
        log.error("%d of %d model files failed.", len(failures), len(entries))
        return 1
    log.info("all %d model files present and verified.", len(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
