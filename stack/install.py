"""Install the ComfyUI stack the worker runs on: one script for the image, CI and developers.

The stack is ComfyUI plus the five custom-node packs of the SCAIL graph, each at the 40-hex
commit in ``stack/components.json``, and one Python set: ``stack/requirements.lock`` (exact pins
produced by ``uv pip compile`` for linux x86_64 / Python 3.11) plus the torch trio of
``stack/constraints.txt`` in one *build*:

- ``cu128`` (the image): torch from PyTorch's CUDA 12.8 index, with the CUDA libraries that build
  pins;
- ``pypi`` (CI and developers without the CUDA 12.8 index): PyPI's build of the same versions,
  which runs on the CPU. Nothing else differs.

Commands (run with the Python the venv should use, 3.11):

    python stack/install.py install --comfy-dir DIR --venv DIR (--git | --archive FILE)
                                    [--torch-build cu128|pypi] [--worker DIR]
    python stack/install.py cached  --cache-root DIR (--git | --archive FILE) [--torch-build pypi]
    python stack/install.py lock    --comfy-dir DIR
    python stack/install.py key     [--torch-build pypi]

``install`` does the same steps whatever the source: place ComfyUI and the packs (``--git``: a
one-commit fetch of each repository; ``--archive``: a tarball of the same trees whose
``MANIFEST.json`` beside it must name the same commits), verify every commit and the T5
tokenizer files, add the project's ComfyUI extension (``stack/comfy_extension``), create the
venv, install torch in the chosen build, install the lock with ``--no-deps`` and check that every
pin is installed at its version. ``cached`` installs into ``<cache-root>/stack-<key>`` unless a
complete install with that key is there, and prints that directory (``ComfyUI/`` and ``venv/``
inside) as its only stdout line; the key hashes everything that decides the install. ``lock``
regenerates ``requirements.lock`` from a placed tree.
Exit status: 0 done, 1 a step failed (the message names it), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

log = logging.getLogger("install_stack")
STACK = Path(__file__).resolve().parent
ROOT = STACK.parent
COMPONENTS = STACK / "components.json"
LOCK = STACK / "requirements.lock"
CONSTRAINTS = STACK / "constraints.txt"
EXTENSION = STACK / "comfy_extension"
KEY_FILES = (COMPONENTS, LOCK, CONSTRAINTS, STACK / "uv.toml", Path(__file__).resolve())
RECORD = ".xicon-stack.json"
# umt5 tokenizer files of WanVideoWrapper: when absent, transformers builds a tokenizer of the added
# tokens only and every prompt is silently ignored.
T5_TOKENIZER = ("configs/T5_tokenizer/tokenizer.json", "configs/T5_tokenizer/spiece.model")
T5_MIN_BYTES = 1_000_000
LOCK_PLATFORM = ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_35")


NO_GIT_HINT = (
    "Without access to GitHub, install from a source archive instead: --archive FILE (a tarball "
    "of the ComfyUI/ tree at the locked commits, MANIFEST.json beside it; README, Tests)."
)


class StackError(Exception):
    """A step failed; the message says which and why."""


def components() -> dict:
    return json.loads(COMPONENTS.read_text(encoding="utf-8"))


def run(cmd: list[str], **kwargs) -> None:
    log.info("$ %s", " ".join(cmd))
    result = subprocess.run(cmd, **kwargs)
    if result.returncode != 0:
        raise StackError(f"command failed with exit {result.returncode}: {' '.join(cmd[:4])} …")


# --- sources -------------------------------------------------------------------------------------


def place_from_git(comfy_dir: Path) -> dict[str, str]:
    """One-commit fetch of every repository; returns name -> HEAD commit as git reports it."""
    heads = {}
    for comp in components()["components"]:
        dest = comfy_dir / comp["path"]
        dest.mkdir(parents=True, exist_ok=True)
        git = ["git", "-C", str(dest)]
        run([*git, "init", "-q"])
        run([*git, "remote", "add", "origin", comp["repo"]])
        try:
            run([*git, "fetch", "-q", "--depth", "1", "origin", comp["commit"]])
        except StackError as exc:
            raise StackError(
                f"{comp['name']}: fetching {comp['repo']} failed ({exc}). {NO_GIT_HINT}"
            ) from None
        run([*git, "checkout", "-q", "FETCH_HEAD"])
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        heads[comp["name"]] = head.stdout.strip()
        shutil.rmtree(dest / ".git")
    return heads


def place_from_archive(comfy_dir: Path, archive: Path) -> dict[str, str]:
    """Unpack the archive's ``ComfyUI/`` tree; returns name -> commit as its manifest records it."""
    manifest_path = archive.parent / "MANIFEST.json"
    if not manifest_path.is_file():
        raise StackError(f"{manifest_path} not found: the archive's commits cannot be verified.")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    root = manifest.get("root", "ComfyUI")
    with tempfile.TemporaryDirectory(dir=comfy_dir.parent) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        if comfy_dir.exists():
            shutil.rmtree(comfy_dir)
        shutil.move(str(Path(tmp) / root), comfy_dir)
    by_path = {c["path"]: c["commit"] for c in manifest["components"]}
    heads = {}
    for comp in components()["components"]:
        rel = root if comp["path"] == "." else f"{root}/{comp['path']}"
        heads[comp["name"]] = by_path.get(rel, "")
    return heads


def verify_sources(comfy_dir: Path, heads: dict[str, str]) -> None:
    for comp in components()["components"]:
        got = heads.get(comp["name"], "")
        if got != comp["commit"]:
            raise StackError(
                f"{comp['name']}: source is at {got or 'unknown'}, lock says {comp['commit']}"
            )
        if not (comfy_dir / comp["path"]).is_dir():
            raise StackError(f"{comp['name']}: {comp['path']} missing after placing the sources")
    wvw = comfy_dir / "custom_nodes/ComfyUI-WanVideoWrapper"
    for rel in T5_TOKENIZER:
        path = wvw / rel
        if not path.is_file() or path.stat().st_size < T5_MIN_BYTES:
            raise StackError(
                f"T5 tokenizer file {rel} missing or truncated: prompts would be ignored"
            )


def add_extension(comfy_dir: Path) -> None:
    """Copy the project's own ComfyUI extension(s) into custom_nodes/."""
    for ext in sorted(p for p in EXTENSION.iterdir() if p.is_dir() and p.name != "__pycache__"):
        dest = comfy_dir / "custom_nodes" / ext.name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ext, dest, ignore=shutil.ignore_patterns("__pycache__"))
        log.info("extension %s installed", ext.name)


# --- python --------------------------------------------------------------------------------------


def uv_binary(tools_dir: Path) -> str:
    """The pinned uv, installed once into ``tools_dir`` with pip."""
    version = components()["installer"]["uv"]
    target = tools_dir / f"uv-{version}"
    binary = target / "bin" / "uv"
    if not binary.is_file():
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--target",
                str(target),
                f"uv=={version}",
            ]
        )
    return str(binary)


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    """name (normalised) -> version of every ``name==version`` line of a requirements file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.split(";", 1)[0].strip()
    return pins


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def torch_requirements(build: str) -> tuple[list[str], list[str]]:
    """(uv index options, requirement strings) for the torch trio in ``build``."""
    spec = components()["torch"]
    info = spec["builds"][build]
    pins = lock_pins(CONSTRAINTS)
    label = f"+{info['local_version']}" if info["local_version"] else ""
    reqs = [f"{name}=={pins[name]}{label}" for name in spec["packages"]]
    index = ["--index-url", info["index_url"]] if info["index_url"] else []
    return index, reqs


def install_python(venv: Path, build: str, uv: str, worker: Path | None) -> None:
    if not (venv / "bin" / "python").is_file():
        run([sys.executable, "-m", "venv", str(venv)])
    python = ["--python", str(venv / "bin" / "python")]
    index, torch_reqs = torch_requirements(build)
    run([uv, "pip", "install", *python, *index, *torch_reqs])
    trio = set(components()["torch"]["packages"])
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as rest:
        for line in LOCK.read_text(encoding="utf-8").splitlines():
            name = line.split("==", 1)[0].strip()
            if "==" in line and normalise(name) not in trio:
                rest.write(line.split("#", 1)[0].strip() + "\n")
    try:
        run([uv, "pip", "install", *python, "--no-deps", "-r", rest.name])
    finally:
        os.unlink(rest.name)
    if worker is not None:
        run([uv, "pip", "install", *python, "--no-deps", "-e", str(worker)])
    verify_python(venv, uv)


def verify_python(venv: Path, uv: str) -> None:
    """Every pin of the lock is installed at its version (torch's build label aside)."""
    out = subprocess.run(
        [uv, "pip", "freeze", "--python", str(venv / "bin" / "python")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            installed[normalise(name)] = version.split("+", 1)[0]
    wrong = {
        name: (version, installed.get(name))
        for name, version in lock_pins().items()
        if installed.get(name) != version
    }
    if wrong:
        detail = ", ".join(
            f"{n} {want} (installed {got})" for n, (want, got) in sorted(wrong.items())
        )
        raise StackError(f"installed set differs from requirements.lock: {detail}")


# --- commands ------------------------------------------------------------------------------------


def install(args: argparse.Namespace) -> Path:
    comfy_dir, venv = args.comfy_dir.resolve(), args.venv.resolve()
    comfy_dir.parent.mkdir(parents=True, exist_ok=True)
    if args.archive:
        heads = place_from_archive(comfy_dir, args.archive.resolve())
        source = f"archive {args.archive.name}"
    else:
        heads = place_from_git(comfy_dir)
        source = "git"
    verify_sources(comfy_dir, heads)
    add_extension(comfy_dir)
    install_python(venv, args.torch_build, uv_binary(args.tools_dir), args.worker)
    record = {"key": stack_key(args.torch_build), "source": source, "torch_build": args.torch_build}
    record["components"] = {c["name"]: c["commit"] for c in components()["components"]}
    (comfy_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    log.info("stack installed: %s (%s, torch build %s)", comfy_dir, source, args.torch_build)
    return comfy_dir


def stack_key(build: str) -> str:
    digest = hashlib.sha256(f"{build}\n{sys.version_info[:2]}\n".encode())
    for path in KEY_FILES:
        digest.update(path.read_bytes())
    for path in sorted(EXTENSION.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached(args: argparse.Namespace) -> Path:
    home = args.cache_root.resolve() / f"stack-{stack_key(args.torch_build)}"
    record = home / "ComfyUI" / RECORD
    if record.is_file() and (home / "venv" / "bin" / "python").is_file():
        log.info("stack cached at %s", home)
        return home
    if home.exists():
        shutil.rmtree(home)  # an interrupted install: start again
    args.comfy_dir, args.venv, args.worker = home / "ComfyUI", home / "venv", None
    install(args)
    return home


def lock(args: argparse.Namespace) -> None:
    """Regenerate requirements.lock from the upstream requirement files of a placed tree."""
    comfy_dir = args.comfy_dir.resolve()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for comp in components()["components"]:
            req = comfy_dir / comp["path"] / "requirements.txt"
            name = Path(tmp) / f"{comp['name']}.requirements.txt"
            shutil.copyfile(req, name)
            inputs.append(name.name)
        extras = project["optional-dependencies"]
        worker = [*project["dependencies"], *extras["worker"], *extras["models"]]
        (Path(tmp) / "worker.requirements.txt").write_text("\n".join(worker) + "\n")
        inputs.append("worker.requirements.txt")
        shutil.copyfile(CONSTRAINTS, Path(tmp) / "constraints.txt")
        shutil.copyfile(STACK / "uv.toml", Path(tmp) / "uv.toml")
        cmd = [uv_binary(args.tools_dir), "pip", "compile", *LOCK_PLATFORM, "-c", "constraints.txt"]
        cmd += ["--custom-compile-command", "python stack/install.py lock --comfy-dir <ComfyUI>"]
        run([*cmd, *inputs, "-o", "requirements.lock"], cwd=tmp)
        shutil.copyfile(Path(tmp) / "requirements.lock", LOCK)
    log.info("wrote %s", LOCK)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tools = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xicon-dance" / "tools"
    for name in ("install", "cached", "lock", "key"):
        p = sub.add_parser(name)
        p.add_argument("--tools-dir", type=Path, default=tools, help="where the pinned uv goes")
        p.add_argument("--torch-build", choices=("cu128", "pypi"), default="cu128")
        if name in ("install", "cached"):
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--git", action="store_true", help="clone each locked commit")
            src.add_argument(
                "--archive", type=Path, help="source tarball with MANIFEST.json beside it"
            )
        if name in ("install", "lock"):
            p.add_argument("--comfy-dir", type=Path, required=True)
        if name == "install":
            p.add_argument("--venv", type=Path, required=True)
            p.add_argument("--worker", type=Path, help="install this worker checkout (editable)")
        if name == "cached":
            p.add_argument("--cache-root", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[install-stack] %(message)s", stream=sys.stderr)
    args = parse(argv)
    try:
        if args.command == "install":
            install(args)
        elif args.command == "cached":
            print(cached(args))
        elif args.command == "lock":
            lock(args)
        else:
            print(stack_key(args.torch_build))
    except StackError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
