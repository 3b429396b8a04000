"""The stack lock (stack/components.json, stack/requirements.lock) and stack/install.py, without
installing anything: pins agree everywhere they appear, the source check refuses a wrong commit, and
the project's ComfyUI extension is a no-op once upstream lists .onnx itself."""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import tomllib
import types
from pathlib import Path

import pytest

from tests.plugins.modules import load_file as load

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT.parent / "shared" / "stack" / "MANIFEST.json"
HEX40 = re.compile(r"^[0-9a-f]{40}$")


install = load(ROOT / "stack" / "install.py", "stack_install")
COMPONENTS = install.components()["components"]


def test_every_component_is_pinned_to_a_full_commit() -> None:
    names = [c["name"] for c in COMPONENTS]
    assert names[0] == "ComfyUI" and len(set(names)) == len(names) == 6
    for comp in COMPONENTS:
        assert HEX40.match(comp["commit"]), comp["name"]
        assert comp["repo"].startswith("https://github.com/"), comp["name"]


def test_lock_agrees_with_the_source_archive_manifest() -> None:
    if not MANIFEST.is_file():
        pytest.skip("no source-archive manifest beside this checkout")
    manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    root = manifest["root"]
    recorded = {c["path"]: (c["commit"], c["repo"].rstrip("/")) for c in manifest["components"]}
    for comp in COMPONENTS:
        path = root if comp["path"] == "." else f"{root}/{comp['path']}"
        assert recorded.get(path) == (comp["commit"], comp["repo"].rstrip("/")), comp["name"]
    assert len(recorded) == len(COMPONENTS)


def test_worker_pins_are_the_locked_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    locked = install.lock_pins()
    extras = project["optional-dependencies"]
    for req in [*project["dependencies"], *extras["worker"], *extras["models"]]:
        name, version = req.split("==")
        assert locked.get(install.normalise(name)) == version, req


def test_constraints_are_locked_and_the_lock_is_exact() -> None:
    locked = install.lock_pins()
    for name, version in install.lock_pins(install.CONSTRAINTS).items():
        assert locked[name] == version, name
    for line in install.LOCK.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith((" ", "#")):
            assert re.match(r"^[A-Za-z0-9._-]+==[^=\s]+$", line), line
    # torch's CUDA libraries belong to its build, never to the lock
    assert not [n for n in locked if n.startswith(("nvidia-", "cuda-", "triton"))]


def test_torch_build_requirements() -> None:
    index, reqs = install.torch_requirements("cu128")
    assert index == ["--index-url", "https://download.pytorch.org/whl/cu128"]
    assert reqs == ["torch==2.11.0+cu128", "torchvision==0.26.0+cu128", "torchaudio==2.11.0+cu128"]
    assert install.torch_requirements("pypi") == ([], [r.split("+")[0] for r in reqs])


def test_dockerfile_installs_through_the_script_and_pins_no_component() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "stack/install.py install" in text and "--torch-build cu128" in text
    for comp in COMPONENTS:
        assert comp["commit"] not in text, f"{comp['name']} commit repeated in the Dockerfile"
    assert "COMFYUI_COMMIT" not in text


def _archive(tmp_path: Path, commits: dict[str, str]) -> Path:
    """A source archive of empty trees and its MANIFEST.json, with the given commits."""
    archive = tmp_path / "stack.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for comp in COMPONENTS:
            path = "ComfyUI" if comp["path"] == "." else f"ComfyUI/{comp['path']}"
            info = tarfile.TarInfo(f"{path}/README")
            tar.addfile(info, io.BytesIO(b""))
        for rel in install.T5_TOKENIZER:
            data = b"x" * install.T5_MIN_BYTES
            info = tarfile.TarInfo(f"ComfyUI/custom_nodes/ComfyUI-WanVideoWrapper/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = {
        "root": "ComfyUI",
        "components": [
            {
                "path": "ComfyUI" if c["path"] == "." else f"ComfyUI/{c['path']}",
                "commit": commits.get(c["name"], c["commit"]),
            }
            for c in COMPONENTS
        ],
    }
    (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
    return archive


def test_archive_sources_are_verified(tmp_path: Path) -> None:
    comfy = tmp_path / "out" / "ComfyUI"
    comfy.parent.mkdir()
    heads = install.place_from_archive(comfy, _archive(tmp_path, {}))
    install.verify_sources(comfy, heads)
    install.add_extension(comfy)
    assert (comfy / "custom_nodes" / "xicon_detection_onnx" / "__init__.py").is_file()
    memory = comfy / "custom_nodes" / "xicon_memory_limit"
    assert {p.name for p in memory.iterdir()} == {
        "__init__.py",
        "prestartup_script.py",
        "cgroup_memory.py",
    }
    pose = comfy / "custom_nodes" / "xicon_pose_decode"
    assert {p.name for p in pose.iterdir()} == {
        "__init__.py",
        "prestartup_script.py",
        "pose_decode.py",
    }
    release = comfy / "custom_nodes" / "xicon_release_outputs"
    assert {p.name for p in release.iterdir()} == {"__init__.py", "release_outputs.py"}
    decode = comfy / "custom_nodes" / "xicon_decode_frames"
    assert {p.name for p in decode.iterdir()} == {
        "__init__.py",
        "decode_frames.py",
        "decode_video.py",
        "frame_feed.py",
    }
    resident = comfy / "custom_nodes" / "xicon_resident_weights"
    assert {p.name for p in resident.iterdir()} == {
        "__init__.py",
        "resident_weights.py",
        "file_pages.py",
    }
    layout = comfy / "custom_nodes" / "xicon_vae_channels_last"
    assert {p.name for p in layout.iterdir()} == {
        "__init__.py",
        "vae_channels_last.py",
        "decoder_ops.py",
        "norm_silu.py",
    }
    batch = comfy / "custom_nodes" / "xicon_pose_batch"
    assert {p.name for p in batch.iterdir()} == {
        "__init__.py",
        "prestartup_script.py",
        "pose_batch.py",
    }
    sessions = comfy / "custom_nodes" / "xicon_pose_sessions"
    assert {p.name for p in sessions.iterdir()} == {"__init__.py", "pose_sessions.py"}
    render = comfy / "custom_nodes" / "xicon_pose_render"
    assert {p.name for p in render.iterdir()} == {
        "__init__.py",
        "prestartup_script.py",
        "pose_render.py",
        "renderer.py",
        "skeleton.py",
        "node_output.py",
    }
    frames = comfy / "custom_nodes" / "xicon_video_frames"
    assert {p.name for p in frames.iterdir()} == {"__init__.py", "video_frames.py"}
    embeds = comfy / "custom_nodes" / "xicon_pose_embeds"
    assert {p.name for p in embeds.iterdir()} == {"__init__.py", "pose_embeds.py"}
    linear = comfy / "custom_nodes" / "xicon_linear_weights"
    assert {p.name for p in linear.iterdir()} == {
        "__init__.py",
        "linear_weights.py",
        "weight_kernel.py",
    }


def test_archive_with_another_commit_is_refused(tmp_path: Path) -> None:
    comfy = tmp_path / "out" / "ComfyUI"
    comfy.parent.mkdir()
    heads = install.place_from_archive(comfy, _archive(tmp_path, {"ComfyUI-KJNodes": "0" * 40}))
    with pytest.raises(install.StackError, match="ComfyUI-KJNodes: source is at 0000"):
        install.verify_sources(comfy, heads)


def test_truncated_t5_tokenizer_is_refused(tmp_path: Path) -> None:
    comfy = tmp_path / "out" / "ComfyUI"
    comfy.parent.mkdir()
    heads = install.place_from_archive(comfy, _archive(tmp_path, {}))
    wvw = comfy / "custom_nodes" / "ComfyUI-WanVideoWrapper"
    (wvw / install.T5_TOKENIZER[1]).write_bytes(b"short")
    with pytest.raises(install.StackError, match=r"spiece\.model missing or truncated"):
        install.verify_sources(comfy, heads)


def test_cli_refuses_missing_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        install.main(["cached", "--cache-root", "x"])
    assert exit_.value.code == 2


# --- the ComfyUI extension -------------------------------------------------------------------


def load_extension(registry: dict) -> types.ModuleType:
    """Import the extension against a stand-in ``folder_paths`` holding ``registry``."""
    fake = types.ModuleType("folder_paths")
    fake.folder_names_and_paths = registry
    fake.filename_list_cache = {"detection": (["stale"], {}, 0.0)}
    sys.modules["folder_paths"] = fake
    try:
        path = ROOT / "stack" / "comfy_extension" / "xicon_detection_onnx" / "__init__.py"
        return load(path, "xicon_detection_onnx_under_test")
    finally:
        del sys.modules["folder_paths"]


def test_extension_adds_onnx_without_touching_the_shared_set() -> None:
    pt = {".safetensors", ".pt"}
    paths = ["/m/detection"]
    registry = {"detection": (paths, pt), "checkpoints": (["/m/c"], pt)}
    module = load_extension(registry)
    new_paths, exts = registry["detection"]
    assert new_paths is paths and exts == {".safetensors", ".pt", ".onnx"}
    assert pt == {".safetensors", ".pt"} and registry["checkpoints"][1] is pt
    assert module.allow_onnx(registry) is False  # idempotent


@pytest.mark.parametrize("extensions", [set(), {".onnx", ".pt"}])
def test_extension_is_a_no_op_once_upstream_lists_onnx(extensions: set[str]) -> None:
    registry = {"detection": (["/m/detection"], extensions)}
    before = registry["detection"]
    load_extension(registry)
    assert registry["detection"] is before


def test_extension_without_the_folder_does_nothing() -> None:
    registry: dict = {}
    load_extension(registry)
    assert registry == {}
