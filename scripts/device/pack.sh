#!/usr/bin/env bash
# Build the payload that stages the ComfyUI stack on an offline GPU machine (Python 3.12, torch
# preinstalled, no package index, at most ~64 MiB carried per call).
#
# Usage (on a machine with pip and network, from the repository root):
#   scripts/device/pack.sh STACK_ARCHIVE SAGEATTENTION_SRC_TARBALL [OUT_DIR]
#
# Writes into OUT_DIR (default .device; keep it ignored by git, never commit it):
#   whl/                 the cp312 manylinux x86_64 wheels the GPU machine lacks (exact pins below)
#   c1/ c2/ ...          one folder per carried call, each at most PART_MIB (52) MiB, leaving room
#                        for the repository copy that travels with every call:
#     c1: the stack archive + MANIFEST.json, the SageAttention source, site.tar.xz.00
#     c2 ... c5: the next parts of site.tar.xz
# site.tar.xz is the wheels installed for Python 3.12 into one tree (`pip install --target` with
# --python-version 3.12 --platform manylinux…, 807 MB), compressed with `xz -1`: 258 MB of wheels
# (deflate inside) become 203 MB (comfy-kitchen's CUDA fatbins shrink from 58 to 28 MB), so the
# payload with the 26 MB stack travels in five calls instead of six; `xz -6` saves little more
# and took over ten minutes on two busy cores. scripts/device/stage.sh joins the parts there and
# unpacks the tree as $SITE.
#
# The pins are the stack's (stack/requirements.lock) for every package the GPU image lacks
# (its package list: torch 2.11 cu130, transformers, accelerate, peft, onnx, onnxruntime,
# opencv-python-headless, einops, sentencepiece, aiohttp, scipy, pyyaml, requests, ...).
set -euo pipefail

STACK_ARCHIVE="${1:?stack archive (comfy-stack-*.tar.gz) required}"
SAGE_SRC="${2:?SageAttention source tarball required}"
OUT="${3:-.device}"
PART_MIB="${PART_MIB:-52}"  # 58 left too little room once the repository copy passed 6 MB
PY="${PYTHON:-python3}"

# What the GPU image lacks, at the stack's pins. ComfyUI core: av, comfy-kitchen, comfy-aimdo,
# torchsde, alembic, SQLAlchemy, simpleeval, blake3, pydantic(-settings), kornia, spandrel;
# WanVideoWrapper: diffusers, ftfy, gguf, pyloudnorm; SCAIL-Pose: taichi; VHS: imageio-ffmpeg (its
# ffmpeg binary; the machine has none); KJNodes: color-matcher, mss; the worker: runpod and the
# parts of its dependency tree that are missing there, boto3. Enough for `handler.py --test_input`;
# the SDK's local API server (`--rp_serve_api`) also needs fastapi's opentelemetry packages, which
# are not carried.
PKGS=(
    av==18.1.0 taichi==1.7.4 dill==0.4.1 imageio-ffmpeg==0.8.1 comfy-kitchen==0.2.31
    comfy-aimdo==0.4.13 diffusers==0.42.1 importlib_metadata==10.2.0 torchsde==0.2.6
    trampoline==0.1.2 kornia==0.9.0 kornia_rs==0.2.0 spandrel==0.4.2 ftfy==6.3.1 wcwidth==0.9.4
    gguf==0.19.0 pyloudnorm==0.2.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9
    pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
    annotated-types==0.8.0 typing-inspection==0.4.5 simpleeval==1.0.8 blake3==1.0.11
    color-matcher==0.6.0 mss==10.2.0 tenacity==9.2.1
    runpod==1.12.0 aiohttp-retry==2.9.1 backoff==2.2.1 boto3==1.44.8 botocore==1.44.8
    s3transfer==0.19.3 jmespath==1.1.0 fastapi==0.165.0 starlette==1.10.0
    python-multipart==0.0.34 uvicorn==0.54.0 watchdog==7.1.0 paramiko==5.1.0
    cryptography==50.0.2 bcrypt==5.0.0 pynacl==1.6.2 cffi==2.1.1 pycparser==3.12 invoke==3.0.3
    InquirerPy==0.3.4 pfzy==0.3.4 prompt_toolkit==3.0.53 prettytable==3.18.0 tomli==2.5.0
    tomlkit==0.15.2 tqdm-loggable==0.4.1
)
PLATFORMS=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 \
    manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}")

mkdir -p "$OUT/whl"
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$OUT/whl" "${PKGS[@]}"

rm -rf "$OUT/site"
"$PY" -m pip install -q --no-deps --no-index "${TARGET[@]}" --target "$OUT/site" "$OUT"/whl/*.whl
find "$OUT/site" -name __pycache__ -type d -prune -exec rm -rf {} +

tar -C "$OUT" -cf - site | xz -T0 -1 >"$OUT/site.tar.xz"
rm -rf "$OUT"/c[0-9] "$OUT"/part.*
sha256sum "$OUT/site.tar.xz" | awk '{print $1}' >"$OUT/site.tar.xz.sha256"

# Call 1 also carries the stack (26 MB) and the SageAttention source, so its part of the site
# archive is smaller: re-split the first part across c1 and the rest.
first_budget=$(( PART_MIB * 1024 * 1024 - $(stat -c %s "$STACK_ARCHIVE") - $(stat -c %s "$SAGE_SRC") - 65536 ))
mkdir -p "$OUT/c1"
head -c "$first_budget" "$OUT/site.tar.xz" >"$OUT/c1/site.tar.xz.00"
tail -c +"$((first_budget + 1))" "$OUT/site.tar.xz" | split -b "${PART_MIB}M" -d -a 2 --numeric-suffixes=1 - "$OUT/part."
n=2
for f in "$OUT"/part.*; do
    mkdir -p "$OUT/c$n"
    mv "$f" "$OUT/c$n/site.tar.xz.$(printf '%02d' $((n - 1)))"
    n=$((n + 1))
done
cp "$STACK_ARCHIVE" "$(dirname "$STACK_ARCHIVE")/MANIFEST.json" "$SAGE_SRC" "$OUT/site.tar.xz.sha256" "$OUT/c1/"

# Optional (ORT_GPU=1): onnxruntime-gpu for the ONNX pose models' CUDA provider, in its own calls
# (o1, o2, ...: the wheel split in PART_MIB pieces). The GPU machines have torch for CUDA 13 and
# onnxruntime's CPU provider only; PyPI's onnxruntime-gpu 1.31.1 is the CUDA 13 build (its CUDA
# provider needs libcublas.so.13 and libcudart.so.13, which torch's CUDA 13 wheels bring). The
# image pins 1.22.0 (CUDA 12) for CUDA 12.8; this pin is the bench machine's only.
# `stage.sh ort` joins and installs it under $SITE_ORT, which session.sh puts before $SITE.
ORT_GPU_PIN="onnxruntime-gpu==1.31.1"
rm -rf "$OUT"/o[0-9] "$OUT/ort"
if [ "${ORT_GPU:-0}" = 1 ]; then
    mkdir -p "$OUT/ort"
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$OUT/ort" "$ORT_GPU_PIN"
    wheel="$(ls "$OUT"/ort/onnxruntime_gpu-*.whl)"
    split -b "${PART_MIB}M" -d -a 2 --numeric-suffixes=1 "$wheel" "$OUT/ort/part."
    n=1
    for f in "$OUT"/ort/part.*; do
        mkdir -p "$OUT/o$n"
        mv "$f" "$OUT/o$n/ort.whl.$(printf '%02d' "$n")"
        n=$((n + 1))
    done
    basename "$wheel" >"$OUT/o1/ort.whl.name"
    sha256sum "$wheel" | awk '{print $1}' >"$OUT/o1/ort.whl.sha256"
fi
du -sh "$OUT"/c[0-9] "$OUT"/o[0-9] 2>/dev/null
