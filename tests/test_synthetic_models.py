"""make_synthetic_models.py: the tables follow each loader's rules; the files are valid.

Table tests need no torch (they run in the project's own venv). The file checks
(``tests/synthetic_file_checks.py``) need torch, safetensors and onnx: they run in this Python when
it has them, else in the real stack's (``XICON_STACK_HOME``); without either they skip, and under
``XICON_REQUIRE_REALSTACK=1`` (CI) they fail. The comparison with the real model classes
(``check_against_upstream``) runs in the real stack's Python too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_synthetic_models.py"
MANIFEST = ROOT / "model_manifest.json"


def _load_module():
    spec = importlib.util.spec_from_file_location("make_synthetic_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


msm = _load_module()


def _names(specs) -> dict:
    return {s.name: s for s in specs}


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# ---- tables (no torch) ------------------------------------------------------------------------


def test_every_manifest_entry_has_a_generator():
    names = {m["name"] for m in json.loads(MANIFEST.read_text(encoding="utf-8"))["models"]}
    assert names == set(msm.KNOWN_MODELS)


@pytest.mark.parametrize(
    ("size", "dim", "ffn", "blocks"),
    [("tiny", 96, 128, 30), ("full", 5120, 13824, 40)],
)
def test_diffusion_table_drives_the_loader_to_the_intended_model(size, dim, ffn, blocks):
    t = _names(msm.wan_specs(size))
    # WanVideoModelLoader: dim/in_dim from patch_embedding, ffn from blocks.0.ffn.0.bias,
    # i2v from k_img, SCAIL from patch_embedding_pose; heads/layers follow from dim
    assert t["patch_embedding.weight"].shape == (dim, 20, 1, 2, 2)
    assert t["patch_embedding_pose.weight"].shape == (dim, 20, 1, 2, 2)
    assert t["blocks.0.ffn.0.bias"].shape == (ffn,)
    assert "blocks.0.cross_attn.k_img.weight" in t
    assert t["text_embedding.0.weight"].shape == (dim, 4096)
    assert t["img_emb.proj.1.weight"].shape == (1280, 1280)
    assert {int(k.split(".")[1]) for k in t if k.startswith("blocks.")} == set(range(blocks))


def test_tiny_diffusion_has_no_fp8_so_the_loader_keeps_quantization_disabled():
    specs = msm.wan_specs("tiny")
    assert {s.dtype for s in specs} == {"bfloat16"}
    assert not [s for s in specs if s.name.endswith(".scale_weight") or s.name == "scaled_fp8"]


def test_full_diffusion_follows_the_fp8_scaled_layout():
    t = _names(msm.wan_specs("full"))
    fp8 = {k for k, s in t.items() if s.dtype == "float8_e4m3fn" and k != "scaled_fp8"}
    expected = {f"blocks.{i}.{layer}.weight" for i in range(40) for layer in msm.BLOCK_LINEARS}
    assert fp8 == expected
    for key in expected:
        scale = t[key.replace(".weight", ".scale_weight")]
        assert (scale.shape, scale.dtype) == ((1,), "float32")
    assert "scaled_fp8" in t
    assert t["patch_embedding.weight"].dtype == "bfloat16"
    # 14 B-class: the block linears alone are 16.3 G parameters
    assert 16.0e9 < sum(s.numel for s in t.values()) < 16.6e9


@pytest.mark.parametrize(("size", "rank"), [("tiny", 4), ("full", 64)])
def test_lora_patches_exactly_the_block_linears_with_matching_shapes(size, rank):
    model = _names(msm.wan_specs(size))
    lora = msm.lora_specs(size)
    assert len(lora) == 3 * len(msm.BLOCK_LINEARS) * msm.WAN_SIZES[size]["layers"]
    for s in lora:
        key = s.name.removeprefix("diffusion_model.")
        if key.endswith(".alpha"):
            assert s.shape == () and s.value == rank, s.name
            continue
        layer, kind, _ = key.rsplit(".", 2)
        out_f, in_f = model[f"{layer}.weight"].shape
        assert s.shape == ((rank, in_f) if kind == "lora_down" else (out_f, rank)), s.name


@pytest.mark.parametrize(("size", "decoder_width"), [("tiny", 96), ("full", 384)])
def test_vae_has_194_keys_and_the_width_that_selects_the_variant(size, decoder_width):
    t = _names(msm.vae_specs(size))
    assert len(t) == 194
    assert t["conv2.weight"].shape[0] == 16  # Wan 2.1, not 2.2
    assert t["decoder.conv1.bias"].shape == (decoder_width,)  # 96 -> lightVAE


def test_full_vae_matches_the_real_126_9_m_parameters():
    assert sum(s.numel for s in msm.vae_specs("full")) == 126_892_531


def test_clip_is_the_full_vit_h_in_both_sizes():
    for size in msm.SIZES:
        t = _names(msm.clip_specs(size))
        assert len(t) == 520
        assert "vision_model.encoder.layers.31.layer_norm1.weight" in t
        assert "vision_model.encoder.layers.32.layer_norm1.weight" not in t
        assert sum(s.numel for s in t.values()) == 632_076_800


def test_full_t5_is_umt5_xxl_and_tiny_is_a_placeholder():
    full = msm.t5_specs("full")
    assert len(full) == 242
    assert sum(s.numel for s in full) == 5_680_910_336
    assert [s.name for s in msm.t5_specs("tiny")] == ["synthetic_placeholder"]


@pytest.mark.parametrize("name", ["umt5_xxl", "clip_vision_h"])
def test_full_files_come_within_a_header_of_the_real_file_sizes(name):
    entry = next(
        m for m in json.loads(MANIFEST.read_text(encoding="utf-8"))["models"] if m["name"] == name
    )
    ours = sum(s.nbytes for s in msm.specs_for(name, "full"))
    # the real file is our tensor bytes plus its JSON header (tens of KiB)
    assert 0 < entry["size"] - ours < 256 * 1024


def test_header_offsets_are_contiguous_and_aligned():
    specs = msm.vae_specs("tiny")
    raw = msm._header(specs, {"synthetic": "true"})
    (n,) = struct.unpack("<Q", raw[:8])
    assert n == len(raw) - 8 and n % 8 == 0
    header = json.loads(raw[8:])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] == sum(s.nbytes for s in specs)


def test_text_cache_key_is_the_sha256_of_the_stripped_prompt():
    assert msm.text_cache_key("  a dancer \n") == hashlib.sha256(b"a dancer").hexdigest()


def test_dry_run_prints_every_tensor_without_torch():
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--size",
            "full",
            "--dry-run",
            "--only",
            "wan21_vae",
            "umt5_xxl",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert len([ln for ln in lines if not ln.startswith("#")]) == 194 + 242
    assert lines[-1].startswith("# total tensor bytes: 11,615,605,734 ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "tiny", "--dry-run", "--only", "nope"], "--only: unknown model name(s) nope"),
        (["--size", "tiny"], "--out: required"),
        ([], "nothing to do"),
        (["--text-cache", "x"], "--text-cache: give at least one --prompt"),
    ],
)
def test_cli_errors_name_the_option(argv, message):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- files (torch, safetensors, onnx) ---------------------------------------------------------
REQUIRED = os.environ.get("XICON_REQUIRE_REALSTACK") == "1"
FILE_CHECKS = ROOT / "tests" / "synthetic_file_checks.py"
CHECK_NAMES = [
    "tiny_files_load_with_the_shapes_and_dtypes_of_the_tables",
    "same_seed_same_bytes_and_only_does_not_change_them",
    "fp8_tensors_round_trip_through_the_streaming_writer",
    "nlf_answers_the_calls_the_nodes_make",
    "onnx_detectors_have_the_io_the_loaders_read",
    "vitpose_large_runs_at_a_reduced_width",
    "yolo_large_has_yolov10m_size_and_the_box",
    "seeded_text_cache_is_what_the_node_loads",
]


def _file_check_python() -> str:
    """This interpreter when it has the packages the file checks need, else the real stack's
    (which has them); without either, a skip, or a failure under XICON_REQUIRE_REALSTACK=1."""
    if _has("torch", "safetensors", "onnx", "onnxruntime", "numpy"):
        return sys.executable
    home = os.environ.get("XICON_STACK_HOME")
    if home:
        return str(Path(home) / "venv" / "bin" / "python")
    reason = (
        "the model file checks need torch, safetensors, onnx and onnxruntime: this Python has "
        "none and XICON_STACK_HOME (the real stack, which has them) is not set"
    )
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def file_checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every check of tests/synthetic_file_checks.py, run once in an interpreter with torch."""
    python = _file_check_python()
    out = tmp_path_factory.mktemp("synthetic-files")
    proc = subprocess.run(
        [python, str(FILE_CHECKS), str(out), *CHECK_NAMES],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{"check": '):
            result = json.loads(line)
            results[result["check"]] = result
    assert set(results) == set(CHECK_NAMES), f"rc {proc.returncode}: {proc.stderr[-4000:]}"
    return results


def test_the_file_checks_are_all_named() -> None:
    from tests.synthetic_file_checks import CHECKS

    assert list(CHECKS) == CHECK_NAMES


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECK_NAMES)
def test_model_files(check: str, file_checks: dict[str, dict]) -> None:
    """The written files load with torch, safetensors and onnxruntime as the nodes load them."""
    result = file_checks[check]
    assert result["ok"], result["error"]


# ---- against the real model classes (real stack) ----------------------------------------------


def _stack_home() -> Path:
    home = os.environ.get("XICON_STACK_HOME")
    if not home:
        if REQUIRED:
            pytest.fail("XICON_STACK_HOME is not set")
        pytest.skip("needs the real stack (XICON_STACK_HOME)")
    return Path(home)


@pytest.mark.realstack
@pytest.mark.slow
@pytest.mark.parametrize("size", msm.SIZES)
def test_tables_equal_the_real_classes_on_the_meta_device(size):
    home = _stack_home()
    python = home / "venv" / "bin" / "python"
    proc = subprocess.run(
        [str(python), str(SCRIPT), "--size", size, "--check-upstream", str(home / "ComfyUI")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("matches the real class") == (5 if size == "full" else 4)


PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import make_synthetic_models as m
from pathlib import Path
out = Path(sys.argv[3])
name = "Wan21-14B-SCAIL-preview_fp8_e4m3fn_scaled_KJ.safetensors"
result = {}
for layout, fp8 in (("bf16", False), ("fp8_scaled", True)):
    path = out / layout / name
    m.write_safetensors(path, m.wan_specs("tiny", fp8=fp8), seed=0)
    result[layout] = m.probe_diffusion_loader(Path(sys.argv[2]), path)
print("PROBE " + json.dumps(result))
"""


@pytest.mark.realstack
@pytest.mark.slow
def test_real_loader_reads_quantization_from_the_tensors_not_the_file_name(tmp_path):
    """The shipped file name says fp8_e4m3fn_scaled; the loader decides by dtype and scale keys."""
    home = _stack_home()
    python = str(home / "venv" / "bin" / "python")
    argv = [python, "-c", PROBE, str(SCRIPT.parent), str(home / "ComfyUI"), str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))
    result = json.loads(line.removeprefix("PROBE "))
    assert result["bf16"] == {
        "quantization": "disabled",
        "scale_weights": 0,
        "blocks": 30,
        "dim": 96,
    }
    blocks = 30 * len(msm.BLOCK_LINEARS)
    assert result["fp8_scaled"] == {
        "quantization": "fp8_e4m3fn_scaled",
        "scale_weights": blocks,
        "blocks": 30,
        "dim": 96,
    }
