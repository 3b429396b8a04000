#!/usr/bin/env bash
# Container entry point of the XiCON Dance SCAIL worker.
#
# 1. GPU preflight: nvidia-smi, then scripts/gpu_preflight.py (torch sees the GPU and the image's
#    arch list covers its compute capability). GPU_PREFLIGHT=0 skips it.
# 2. Models: RunPod cached models are linked in; MODEL_DOWNLOAD_AT_START=1 fetches the manifest
#    onto the network volume (or the image's models folder when there is no volume).
# 3. ComfyUI on COMFY_HOST (127.0.0.1:8188), in the background, PID in COMFY_PID_FILE; its log is
#    shown and kept in COMFY_LOG_FILE; "Error running sage attention" raises a loud warning.
# 4. Wait until ComfyUI answers (COMFY_STARTUP_TIMEOUT_S); if it dies first, exit non-zero.
# 5. Optional warm-up (WARMUP=1), then exec the handler so that SIGTERM reaches it.
#
# Until the handler is exec'd this shell is PID 1: a PID 1 without a handler never receives SIGTERM,
# so a trap stops ComfyUI and any long step (download, warm-up) at once and exits 143. Long steps
# run in the background and are waited for, so the trap is not held up until they finish.
#
# Paths are overridable (tests run this script against stand-ins): PYTHON_BIN, COMFY_MAIN,
# HANDLER, WORKER_DIR, COMFY_DIR, MODELS_DIR.
set -euo pipefail

WORKER_DIR="${WORKER_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
PYTHON_BIN="${PYTHON_BIN:-python}"
COMFY_DIR="${COMFY_DIR:-/comfyui}"
COMFY_MAIN="${COMFY_MAIN:-$COMFY_DIR/main.py}"
HANDLER="${HANDLER:-$WORKER_DIR/handler.py}"
COMFY_HOST="${COMFY_HOST:-127.0.0.1:8188}"
COMFY_PID_FILE="${COMFY_PID_FILE:-/tmp/comfyui.pid}"
COMFY_LOG_FILE="${COMFY_LOG_FILE:-/tmp/comfyui.log}"
COMFY_STARTUP_TIMEOUT_S="${COMFY_STARTUP_TIMEOUT_S:-900}"
COMFY_EXTRA_ARGS="${COMFY_EXTRA_ARGS:-}"
MODELS_DIR="${MODELS_DIR:-$COMFY_DIR/models}"
VOLUME_MODELS_DIR="${VOLUME_MODELS_DIR:-/runpod-volume/models}"
HF_CACHE_DIR="${HF_CACHE_DIR:-/runpod-volume/huggingface-cache/hub}"
MODEL_MANIFEST="${MODEL_MANIFEST:-$WORKER_DIR/model_manifest.json}"

COMFY_PID=""
CHILD_PID=""

log() { printf '[entrypoint] %s\n' "$*"; }
die() {
    printf '[entrypoint] ERROR: %s\n' "$*" >&2
    stop_children
    exit 1
}

stop_children() {
    local pid
    for pid in "$CHILD_PID" "$COMFY_PID"; do
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    done
}

on_signal() {
    log "received SIG$1 during start-up; stopping ComfyUI and exiting."
    stop_children
    exit "$2"
}

run_child() {
    # Run "$@" in the background and wait for it, so that a SIGTERM is handled at once.
    "$@" &
    CHILD_PID=$!
    local rc=0
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    return "$rc"
}

check_settings() {
    [[ "${COMFY_STARTUP_TIMEOUT_S}" =~ ^[0-9]+(\.[0-9]*)?$ ]] \
        || die "COMFY_STARTUP_TIMEOUT_S must be a number of seconds, got '${COMFY_STARTUP_TIMEOUT_S}'."
}

is_true() {
    case "${1,,}" in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac
}

gpu_preflight() {
    if ! is_true "${GPU_PREFLIGHT:-1}"; then
        log "GPU preflight skipped (GPU_PREFLIGHT=${GPU_PREFLIGHT})."
        return 0
    fi
    command -v nvidia-smi >/dev/null 2>&1 \
        || die "nvidia-smi not found: no NVIDIA driver is visible in this container."
    local smi
    smi="$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>&1)" \
        || die "nvidia-smi failed: ${smi}"
    log "GPU: ${smi}"
    local rc=0
    IMAGE_CUDA_ARCH_LIST="${IMAGE_CUDA_ARCH_LIST:-${TORCH_CUDA_ARCH_LIST:-}}" \
        "$PYTHON_BIN" "$WORKER_DIR/scripts/gpu_preflight.py" || rc=$?
    if [ "$rc" -ne 0 ]; then
        die "GPU preflight failed (exit ${rc}); see the GPU PREFLIGHT line above. This worker cannot run jobs on this GPU."
    fi
    if is_true "${SAGEATTENTION_ENABLED:-1}"; then
        sage_self_test
    fi
}

# SageAttention can be wrong without raising (ComfyUI then never falls back), so compare it with
# PyTorch attention on this GPU once; if it disagrees, run with sdpa rather than deliver garbage.
sage_self_test() {
    local rc=0
    "$PYTHON_BIN" "$WORKER_DIR/scripts/gpu_preflight.py" --sage-self-test || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '[entrypoint] WARNING: SAGEATTENTION SELF-TEST FAILED (exit %s; see the GPU PREFLIGHT line above). This worker runs with PyTorch attention (SAGEATTENTION_ENABLED=0): correct output, slower. Rebuild SageAttention for this GPU to get the speed back.\n' "$rc" >&2
        SAGEATTENTION_ENABLED=0
        export SAGEATTENTION_ENABLED
    fi
}

locked_download() {
    # Runs in a background subshell: take the lock on fd 9, then become the download process, so
    # that a SIGTERM reaches the download itself.
    exec 9>>"$1"
    flock 9 || {
        printf '[entrypoint] ERROR: could not lock %s (does this filesystem support locks?)\n' "$1" >&2
        exit 1
    }
    exec "$PYTHON_BIN" -m xicon_dance.model_download --manifest "$MODEL_MANIFEST" --models-dir "$2"
}

prepare_models() {
    local target="$MODELS_DIR"
    if [ -d "$VOLUME_MODELS_DIR" ]; then
        log "network volume models folder found: ${VOLUME_MODELS_DIR} (mapped by extra_model_paths.yaml)."
        target="$VOLUME_MODELS_DIR"
    fi
    if [ -d "$HF_CACHE_DIR" ]; then
        log "RunPod model cache found: ${HF_CACHE_DIR}; linking manifest files from it."
        "$PYTHON_BIN" -m xicon_dance.model_download --manifest "$MODEL_MANIFEST" \
            --models-dir "$MODELS_DIR" --link-from-hf-cache "$HF_CACHE_DIR" \
            || log "WARNING: linking from the model cache failed; continuing with what is present."
    fi
    if is_true "${MODEL_DOWNLOAD_AT_START:-0}"; then
        log "MODEL_DOWNLOAD_AT_START: fetching missing model files into ${target}."
        mkdir -p "$target"
        # One writer at a time on a shared volume: other workers wait, then skip verified files.
        local lock="$target/.download.lock"
        local busy=0
        flock -n -E 75 "$lock" true 2>/dev/null || busy=$?
        if [ "$busy" -eq 75 ]; then
            log "another worker holds ${lock} (downloading); waiting for it."
        fi
        run_child locked_download "$lock" "$target" || die "model download failed; see the lines above."
    fi
}

watch_log() {
    # Show every ComfyUI line, keep it in the log file, and shout about a silent sage fallback.
    # This reader must outlive every write error (a full disk, a removed log file): if it died,
    # ComfyUI's next print would hit a closed pipe and fail the running job.
    set +e
    trap '' TERM INT
    local warned=0 line
    while IFS= read -r line || [ -n "$line" ]; do
        printf '%s\n' "$line"
        printf '%s\n' "$line" 2>/dev/null >>"$COMFY_LOG_FILE"
        if [ "$warned" -eq 0 ] && [[ "$line" == *"Error running sage attention"* ]]; then
            warned=1
            printf '[entrypoint] WARNING: SAGEATTENTION FALLBACK: ComfyUI reports "Error running sage attention" and is using PyTorch attention instead (slower). Check that the image was built for this GPU (IMAGE_CUDA_ARCH_LIST=%s) or set SAGEATTENTION_ENABLED=0.\n' \
                "${IMAGE_CUDA_ARCH_LIST:-?}" >&2
        fi
    done
}

start_comfy() {
    local host="${COMFY_HOST%:*}" port="${COMFY_HOST##*:}"
    local -a args=(--listen "$host" --port "$port" --disable-auto-launch --disable-metadata --log-stdout)
    if is_true "${SAGEATTENTION_ENABLED:-1}"; then
        args+=(--use-sage-attention)
    else
        log "SAGEATTENTION_ENABLED=${SAGEATTENTION_ENABLED}: ComfyUI starts without --use-sage-attention."
    fi
    if [ -n "$COMFY_EXTRA_ARGS" ]; then
        local -a extra
        read -r -a extra <<<"$COMFY_EXTRA_ARGS"
        args+=("${extra[@]}")
    fi
    : >"$COMFY_LOG_FILE"
    log "starting ComfyUI: ${COMFY_MAIN} ${args[*]}"
    "$PYTHON_BIN" -u "$COMFY_MAIN" "${args[@]}" > >(watch_log) 2>&1 &
    COMFY_PID=$!
    printf '%s\n' "$COMFY_PID" >"$COMFY_PID_FILE"
}

probe() {
    # One readiness probe of ComfyUI's /system_stats (curl in the image; python as a fallback).
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
    else
        "$PYTHON_BIN" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "$1" 2>/dev/null
    fi
}

wait_ready() {
    local url="http://${COMFY_HOST}/system_stats" start=$SECONDS
    while true; do
        if ! kill -0 "$COMFY_PID" 2>/dev/null; then
            local rc=0
            wait "$COMFY_PID" || rc=$?
            sleep 0.2 # let the log reader flush
            printf '[entrypoint] ComfyUI log (last 40 lines):\n' >&2
            tail -n 40 "$COMFY_LOG_FILE" >&2 || true
            die "ComfyUI exited with code ${rc} during startup (before answering on ${COMFY_HOST})."
        fi
        if probe "$url"; then
            log "ComfyUI ready on ${COMFY_HOST} after $((SECONDS - start)) s (pid ${COMFY_PID})."
            return 0
        fi
        if [ $((SECONDS - start)) -ge "${COMFY_STARTUP_TIMEOUT_S%.*}" ]; then
            kill "$COMFY_PID" 2>/dev/null || true
            die "ComfyUI did not answer on ${COMFY_HOST} within ${COMFY_STARTUP_TIMEOUT_S} s."
        fi
        sleep 0.5
    done
}

# The SDK takes the warm-up job on its command line; Linux limits one argument to 128 KiB.
WARMUP_INPUT_MAX_BYTES=131000

warmup() {
    is_true "${WARMUP:-0}" || return 0
    local input="${WARMUP_INPUT:-$WORKER_DIR/test_input.json}"
    [ -f "$input" ] || die "WARMUP=1 but WARMUP_INPUT ${input} does not exist."
    local size
    size="$(wc -c <"$input")"
    if [ "$size" -gt "$WARMUP_INPUT_MAX_BYTES" ]; then
        log "WARNING: WARMUP_INPUT ${input} is ${size} bytes, over the ${WARMUP_INPUT_MAX_BYTES}-byte limit of one command-line argument; warm-up skipped. Use image_url/video_url in the warm-up job instead of base64."
        return 0
    fi
    log "WARMUP: running one job from ${input} to load the models before serving."
    # RUNPOD_LOG_LEVEL=WARN: the SDK would otherwise log the whole result (a base64 video).
    if ! RUNPOD_LOG_LEVEL=WARN run_child "$PYTHON_BIN" -u "$HANDLER" --test_input "$(cat "$input")"; then
        if ! kill -0 "$COMFY_PID" 2>/dev/null; then
            printf '[entrypoint] ComfyUI log (last 40 lines):\n' >&2
            tail -n 40 "$COMFY_LOG_FILE" >&2 || true
            die "ComfyUI exited during the warm-up job; the worker cannot serve."
        fi
        log "WARNING: warm-up job failed; serving anyway (the first job loads the models)."
    else
        log "WARMUP: done."
    fi
}

main() {
    trap 'on_signal TERM 143' TERM
    trap 'on_signal INT 130' INT
    check_settings
    gpu_preflight
    prepare_models
    start_comfy
    wait_ready
    warmup
    local -a handler_args=()
    if is_true "${SERVE_API_LOCALLY:-false}"; then
        handler_args+=(--rp_serve_api --rp_api_host 0.0.0.0 --rp_api_port "${RP_API_PORT:-8000}")
        log "SERVE_API_LOCALLY: local API server on port ${RP_API_PORT:-8000}."
    fi
    cd "$WORKER_DIR"
    trap - TERM INT
    log "starting handler: ${HANDLER} ${handler_args[*]}"
    exec "$PYTHON_BIN" -u "$HANDLER" "${handler_args[@]}"
}

main "$@"
