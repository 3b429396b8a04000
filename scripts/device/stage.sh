#!/usr/bin/env bash
# Stage the ComfyUI stack on the offline GPU machine from the parts made by scripts/device/pack.sh.
# Run from the repository root there; each step is one carried call, made back to back (files
# outside the repository copy, under STAGE, survive between calls while the machine stays warm).
#
#   scripts/device/stage.sh part DIR     copy the parts in DIR (.device/cN) to $STAGE
#   scripts/device/stage.sh stack        unpack the stack as $COMFY_DIR (ComfyUI v0.33.0 + packs,
#                                        commits checked against MANIFEST.json by
#                                        stack/install.py) and add the project's ComfyUI extension;
#                                        placed again, it keeps the last placement's models and
#                                        cached text encodings
#   scripts/device/stage.sh site         join site.tar.xz.NN, check its sha256, unpack it as $SITE
#   scripts/device/stage.sh check        import every module the graph and the worker need
#   scripts/device/stage.sh ort          (after `part .device/oN` for every oN that pack.sh made
#                                        with ORT_GPU=1) join ort.whl.NN, check its sha256 and
#                                        install onnxruntime-gpu as $SITE_ORT; say its providers
#
# Then use: PYTHONPATH=$SITE python3 ...  (the machine's python3 holds torch).
set -euo pipefail

TMP="${TMPDIR:-/tmp}"
STAGE="${STAGE:-$TMP/xicon-stage}"
SITE="${SITE:-$TMP/xicon-site}"
SITE_ORT="${SITE_ORT:-$TMP/xicon-ort}"
STACK_ROOT="${STACK_ROOT:-$TMP/xicon-stack}"
COMFY_DIR="${COMFY_DIR:-$STACK_ROOT/ComfyUI}"
TEXT_CACHE="custom_nodes/ComfyUI-WanVideoWrapper/text_embed_cache"
PY="${PYTHON:-python3}"

log() { printf '[stage] %s\n' "$*"; }

part() {
    local dir="${1:?folder of parts}"
    mkdir -p "$STAGE"
    cp -v "$dir"/* "$STAGE"/
}

site() {
    local t0=$SECONDS
    cat "$STAGE"/site.tar.xz.[0-9][0-9] >"$STAGE/site.tar.xz"
    echo "$(cat "$STAGE/site.tar.xz.sha256")  $STAGE/site.tar.xz" | sha256sum -c --quiet
    rm -rf "$SITE" && mkdir -p "$(dirname "$SITE")"
    local unpack
    unpack="$(mktemp -d "$(dirname "$SITE")/site.XXXXXX")"
    tar -C "$unpack" -xJf "$STAGE/site.tar.xz"
    mv "$unpack/site" "$SITE" && rmdir "$unpack"
    rm -f "$STAGE/site.tar.xz" "$STAGE"/site.tar.xz.[0-9][0-9]
    ln -sf "$SITE/imageio_ffmpeg/binaries/"ffmpeg-* "$SITE/bin/ffmpeg" 2>/dev/null || true
    log "site unpacked to $SITE in $((SECONDS - t0)) s ($(du -sh "$SITE" | cut -f1))"
}

stack() {
    local t0=$SECONDS archive kept="$STACK_ROOT/kept"
    archive="$(ls "$STAGE"/comfy-stack-*.tar.gz)"
    # a stack placed again keeps what the machine wrote into the last one: the models
    # (session.sh prepare, about 30 GB) and the text encodings WanVideoWrapper cached
    rm -rf "$kept" && mkdir -p "$kept"
    if [ -d "$COMFY_DIR/models" ]; then mv "$COMFY_DIR/models" "$kept/models"; fi
    if [ -d "$COMFY_DIR/$TEXT_CACHE" ]; then mv "$COMFY_DIR/$TEXT_CACHE" "$kept/text_embed_cache"; fi
    rm -rf "$COMFY_DIR" && mkdir -p "$(dirname "$COMFY_DIR")"
    "$PY" - "$COMFY_DIR" "$archive" <<'EOF'
import logging, sys
from pathlib import Path
sys.path.insert(0, "stack")
import install  # stack/install.py: the same placing and checks as the image and CI
logging.basicConfig(level=logging.INFO, format="[stage] %(message)s")
comfy, archive = Path(sys.argv[1]), Path(sys.argv[2])
heads = install.place_from_archive(comfy, archive)
install.verify_sources(comfy, heads)
install.add_extension(comfy)
EOF
    if [ -d "$kept/models" ]; then
        rm -rf "$COMFY_DIR/models" && mv "$kept/models" "$COMFY_DIR/models"
        log "models of the last placement kept"
    fi
    if [ -d "$kept/text_embed_cache" ]; then
        rm -rf "${COMFY_DIR:?}/$TEXT_CACHE" && mv "$kept/text_embed_cache" "$COMFY_DIR/$TEXT_CACHE"
        log "text encodings of the last placement kept"
    fi
    log "stack placed at $COMFY_DIR; total $((SECONDS - t0)) s"
}

ort() {
    local name wheel
    name="$(cat "$STAGE/ort.whl.name")"
    wheel="$STAGE/$name"
    cat "$STAGE"/ort.whl.[0-9][0-9] >"$wheel"
    echo "$(cat "$STAGE/ort.whl.sha256")  $wheel" | sha256sum -c --quiet
    rm -rf "$SITE_ORT"
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE_ORT" "$wheel"
    rm -f "$wheel" "$STAGE"/ort.whl.[0-9][0-9]
    PYTHONPATH="$SITE_ORT:$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import torch  # loads CUDA 13 libraries first, as ComfyUI does
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.__file__)
print("providers:", ort.get_available_providers())'
}

check() {
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import importlib, sys
mods = ["av", "taichi", "imageio_ffmpeg", "comfy_kitchen", "comfy_aimdo", "diffusers", "torchsde",
        "kornia", "spandrel", "ftfy", "gguf", "pyloudnorm", "alembic", "sqlalchemy", "pydantic",
        "pydantic_settings", "simpleeval", "blake3", "color_matcher", "mss", "runpod", "boto3", "tenacity",
        "onnxruntime", "cv2", "transformers", "accelerate", "peft", "torch"]
bad = 0
for m in mods:
    try:
        mod = importlib.import_module(m)
        print(f"ok   {m} {getattr(mod, '__version__', '')}")
    except Exception as exc:  # report every missing module, not only the first
        bad += 1
        print(f"FAIL {m}: {type(exc).__name__}: {exc}")
import onnxruntime, imageio_ffmpeg, torch
print("onnxruntime providers:", onnxruntime.get_available_providers())
print("ffmpeg:", imageio_ffmpeg.get_ffmpeg_exe())
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
sys.exit(1 if bad else 0)
EOF
}

case "${1:-}" in
part) part "${2:-}" ;;
stack) stack ;;
site) site ;;
check) check ;;
ort) ort ;;
*)
    echo "usage: $0 part DIR | stack | site | check | ort" >&2
    exit 2
    ;;
esac
