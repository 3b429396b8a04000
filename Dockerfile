# syntax=docker/dockerfile:1
# XiCON Dance SCAIL — RunPod serverless worker image.
#
# Stages (BuildKit builds "builder" and "models" in parallel):
#   builder  CUDA 12.8 cuDNN devel: Python venv, torch cu128, ComfyUI + custom nodes at 40-hex
#            commits, SageAttention compiled from source (nvcc is needed only here).
#   models   a small Python with the `models` extra only: fetches model_manifest.json into /models
#            (BAKE_MODELS=1) — its layer cache depends on the manifest and the script alone.
#   runtime  CUDA 12.8 base (the torch wheels bring their own CUDA/cuDNN libraries) + the venv,
#            ComfyUI, the worker and the weights.
#
# Build (linux/amd64):
#   docker build --platform linux/amd64 -t blendx/xicon-dance-scail:5090 .
#   docker build --platform linux/amd64 --build-arg TORCH_CUDA_ARCH_LIST="9.0" ...   (H100/H200)
#   docker build --platform linux/amd64 --build-arg BAKE_MODELS=0 ...   (models on a volume)

ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS builder

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (deadsnakes) and the build tools; scripts/apt_python311.sh is shared with pybase.
RUN --mount=type=bind,source=scripts/apt_python311.sh,target=/tmp/apt_python311.sh \
    bash /tmp/apt_python311.sh git build-essential

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1

# The ComfyUI stack, by the one script that CI and developers run too (stack/install.py): ComfyUI and
# the five custom-node packs cloned at the commits of stack/components.json (each HEAD verified, the
# T5 tokenizer files checked), the project's ComfyUI extension (stack/comfy_extension), torch
# 2.11.0+cu128 from PyTorch's CUDA 12.8 index (the CUDA 13 build on PyPI needs a newer driver than
# CUDA 12.8 hosts have), then every other package exactly as stack/requirements.lock pins it
# (--no-deps), the worker itself (editable, no deps: its pins are in the lock) and a check that the
# installed set equals the lock. CI runs the same steps from a source archive with PyPI's torch build.
COPY stack /build/stack
COPY pyproject.toml README.md /worker/
COPY xicon_dance /worker/xicon_dance
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/python /build/stack/install.py install --git --comfy-dir /comfyui \
        --venv /opt/venv --torch-build cu128 --worker /worker --tools-dir /opt/tools \
    && pip freeze --exclude-editable > /opt/constraints.txt \
    && rm -rf /opt/tools

# Later pip installs (the SageAttention build) are held to the installed set, so nothing can replace
# the torch build.
ENV PIP_CONSTRAINT=/opt/constraints.txt

# Build tools for SageAttention only (not in the runtime lock).
ARG WHEEL_VERSION=0.45.1
ARG NINJA_VERSION=1.13.0
RUN pip install "wheel==${WHEEL_VERSION}" "ninja==${NINJA_VERSION}"

# SageAttention 2.2 from source (no 2.x on PyPI for Linux). Since v2.2.0 (eb615cf) setup.py honours
# TORCH_CUDA_ARCH_LIST, so no GPU is needed at build time. Pinned past the tag: at eb615cf the sm90
# (H100) path silently returns an uninitialised buffer (fixed upstream in d970424; measured in
# bench/README.md); d1a57a5 built and gave correct output on an H100. entrypoint.sh re-checks
# sageattn against SDPA on the actual GPU at start.
ARG SAGEATTENTION_COMMIT=d1a57a546c3d395b1ffcbeecc66d81db76f3b4b5
ARG TORCH_CUDA_ARCH_LIST=12.0
ARG EXT_PARALLEL=4
ARG MAX_JOBS=8
ARG NVCC_APPEND_FLAGS="--threads 4"
RUN set -eux; \
    case ";${TORCH_CUDA_ARCH_LIST};" in \
        *";9.0;"*) [ "${TORCH_CUDA_ARCH_LIST}" = "9.0" ] || { \
            echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}: SageAttention's sm90 kernels build for 9.0 alone (thu-ml/SageAttention #291); build one image per GPU family" >&2; exit 1; } ;; \
    esac; \
    git init -q /tmp/sageattention; \
    git -C /tmp/sageattention remote add origin https://github.com/thu-ml/SageAttention.git; \
    git -C /tmp/sageattention fetch -q --depth 1 origin "${SAGEATTENTION_COMMIT}"; \
    git -C /tmp/sageattention checkout -q FETCH_HEAD; \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" EXT_PARALLEL="${EXT_PARALLEL}" \
        MAX_JOBS="${MAX_JOBS}" NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS}" \
        pip install --no-build-isolation /tmp/sageattention; \
    rm -rf /tmp/sageattention; \
    pip freeze > /opt/pip-freeze.txt

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_RUNTIME_IMAGE} AS pybase

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (deadsnakes; python3.11-dev + gcc: Triton compiles its launcher stubs at run time).
# ffmpeg: VideoHelperSuite and the worker's media checks. libgl1/libglib2.0-0: OpenCV.
RUN --mount=type=bind,source=scripts/apt_python311.sh,target=/tmp/apt_python311.sh \
    bash /tmp/apt_python311.sh gcc libc6-dev ffmpeg libgl1 libglib2.0-0 libgomp1 curl

# ---------------------------------------------------------------------------------------------
FROM pybase AS models

ARG BAKE_MODELS=1
ARG HUGGINGFACE_HUB_VERSION=2.4.0
ARG HF_XET_VERSION=1.8.0
ARG TENACITY_VERSION=9.2.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_DISABLE_TELEMETRY=1
RUN python3.11 -m venv /opt/dl \
    && /opt/dl/bin/pip install "huggingface_hub==${HUGGINGFACE_HUB_VERSION}" "hf_xet==${HF_XET_VERSION}" \
        "tenacity==${TENACITY_VERSION}"
COPY model_manifest.json /dl/model_manifest.json
COPY xicon_dance/__init__.py xicon_dance/model_download.py /dl/xicon_dance/
# A gated/private source would need a token: pass it as a build secret (id=hf_token).
RUN --mount=type=secret,id=hf_token,required=false \
    mkdir -p /models \
    && if [ "${BAKE_MODELS}" = "1" ]; then \
           if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi; \
           PYTHONPATH=/dl /opt/dl/bin/python -m xicon_dance.model_download \
               --manifest /dl/model_manifest.json --models-dir /models; \
       else echo "BAKE_MODELS=${BAKE_MODELS}: no weights in the image"; fi \
    && rm -rf /models/.downloads /root/.cache

# ---------------------------------------------------------------------------------------------
FROM pybase AS runtime

ARG TORCH_CUDA_ARCH_LIST=12.0
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    COMFY_DIR=/comfyui \
    MODELS_DIR=/comfyui/models \
    IMAGE_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DEFAULT_VIDEO=/worker/assets/default_video.mp4 \
    WORKFLOW_PATH=/worker/XiCON_Dance_SCAIL_vFinal.json \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/constraints.txt /opt/pip-freeze.txt /opt/
COPY --from=builder /comfyui /comfyui
COPY --from=models /models /comfyui/models

# Import check without a GPU: the torch build, its CUDA arch list, SageAttention's compiled
# extension, the onnxruntime CUDA provider and torchaudio (WanVideoWrapper imports it).
RUN python - <<'PY'
import onnxruntime, sageattention, torch, torchaudio, torchvision  # noqa: F401
from sageattention import _fused  # noqa: F401  (compiled for every arch; sageattention itself hides import errors)
assert torch.version.cuda and torch.version.cuda.startswith("12.8"), torch.version.cuda
assert "CUDAExecutionProvider" in onnxruntime.get_available_providers(), onnxruntime.get_available_providers()
print("torch", torch.__version__, "archs", torch.cuda.get_arch_list())
PY

COPY --from=builder /worker /worker
COPY extra_model_paths.yaml /comfyui/extra_model_paths.yaml
COPY handler.py model_manifest.json XiCON_Dance_SCAIL_vFinal.json entrypoint.sh test_input.json /worker/
COPY assets /worker/assets
COPY scripts/gpu_preflight.py /worker/scripts/gpu_preflight.py
RUN chmod +x /worker/entrypoint.sh

# Python's compiled files for ComfyUI, its packs and the worker (git and COPY bring sources only),
# and matplotlib's font cache (a pack imports it), made here once instead of at every worker's
# start: ComfyUI's start to ready on 2 CPU cores 14.1 -> 12.3 s (bench/cold_start.py, median of 3).
RUN python -m compileall -q -j 0 /comfyui /worker \
    && python -c "import matplotlib.font_manager"

# The default prompts' text encodings, made once here on the CPU by the real node with the image's
# umt5-xxl (scripts/bake_text_cache.py; ComfyUI's database and outputs of that run left in /tmp and
# removed): a fresh worker's first job with them never loads the 11.4-GB T5 (6.0 s in the node on an
# H200 with the file in the page cache). Skipped when the image holds no weights (BAKE_MODELS=0).
ARG BAKE_TEXT_CACHE=1
COPY scripts/bake_text_cache.py /worker/scripts/bake_text_cache.py
RUN if [ "${BAKE_TEXT_CACHE}" = "1" ] \
        && [ -s /comfyui/models/text_encoders/umt5-xxl-enc-bf16.safetensors ]; then \
        mkdir -p /tmp/bake/user \
        && python /worker/scripts/bake_text_cache.py --comfy-dir /comfyui \
            --comfy-arg=--user-directory=/tmp/bake/user \
            --comfy-arg=--database-url=sqlite:////tmp/bake/comfyui.db \
            --comfy-arg=--output-directory=/tmp/bake/output --comfy-arg=--temp-directory=/tmp/bake \
        && rm -rf /tmp/bake; \
    else echo "text cache not baked (BAKE_TEXT_CACHE=${BAKE_TEXT_CACHE}, or no umt5-xxl in the image)"; fi

WORKDIR /worker
CMD ["/worker/entrypoint.sh"]
