#!/usr/bin/env bash
# Container entry point of the XiCON Dance SCAIL worker.
#
# 1. GPU preflight: nvidia-smi, then scripts/gpu_preflight.py (torch sees the GPU and the image's
#    arch list covers its compute capability). GPU_PREFLIGHT=0 skips it.
# 2. SageAttention self-test (SAGEATTENTION_ENABLED=1 and SAGE_SELF_TEST=1, independent of
#    GPU_PREFLIGHT): sageattn against PyTorch attention at the job's attention shape, bounded by
#    SAGE_SELF_TEST_TIMEOUT_S; on disagreement, failure or overrun the worker runs with sdpa. It
#    runs in the background beside steps 3-5 (its ~13 s of imports, kernel builds and CUDA
#    start-up overlap ComfyUI's own start); its result is taken once ComfyUI is ready, and if it
#    failed, ComfyUI is started again without --use-sage-attention before anything is served.
# 3. Models: RunPod cached models are linked in; MODEL_DOWNLOAD_AT_START=1 fetches the manifest
#    onto the network volume (or the image's models folder when there is no volume).
# 4. ComfyUI on COMFY_HOST, which must be 127.0.0.1:<port> or localhost:<port> (ComfyUI has no
#    authentication: it never listens beyond loopback, and COMFY_EXTRA_ARGS may not carry
#    --listen), in the background, PID in COMFY_PID_FILE, without the worker's secrets in its
#    environment. Its log is shown and kept in COMFY_LOG_FILE, rotated to COMFY_LOG_FILE.1 past
#    COMFY_LOG_MAX_BYTES; "Error running sage attention" raises a loud warning.
# 5. Wait until ComfyUI answers (COMFY_STARTUP_TIMEOUT_S); if it dies first, exit non-zero.
# 6. Optional warm-up (WARMUP=1), then the handler, as a child of this shell (see below), with
#    RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true (the SDK's start-up checks would import torch and open a
#    second CUDA context in the handler beside the model; the GPU was checked in step 1) and the
#    SDK's log level RUNPOD_LOG_LEVEL=INFO unless set. SERVE_API_LOCALLY=true serves the SDK's
#    local API on 0.0.0.0:RP_API_PORT (8000).
#
# This shell is PID 1 for the container's whole life, a small supervisor: it is the only process
# that gets the platform's SIGTERM, and the parent of ComfyUI and of the handler. During start-up
# a trap stops ComfyUI and any long step (download, warm-up) at once and exits 143; long steps run
# in the background and are waited for, so the trap is not held up. While serving, SIGTERM/SIGINT
# are forwarded to the handler (the SDK finishes or stops its job and ends its loop). When the
# handler exits, ComfyUI is stopped (SIGTERM, SIGKILL after COMFY_STOP_TIMEOUT_S) and reaped, and
# the shell exits with the handler's status. When ComfyUI dies first, the handler is stopped the
# same way (HANDLER_STOP_TIMEOUT_S) and the shell exits 1, so the platform replaces the worker.
# As PID 1, bash also reaps any orphan re-parented to it: nothing is left a zombie.
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
COMFY_LOG_MAX_BYTES="${COMFY_LOG_MAX_BYTES:-52428800}"
COMFY_STOP_TIMEOUT_S="${COMFY_STOP_TIMEOUT_S:-10}"
HANDLER_STOP_TIMEOUT_S="${HANDLER_STOP_TIMEOUT_S:-60}"
SAGE_SELF_TEST_TIMEOUT_S="${SAGE_SELF_TEST_TIMEOUT_S:-300}"
RP_API_PORT="${RP_API_PORT:-8000}"
# Never handed to ComfyUI: it needs none of them, and custom nodes may log their environment.
SECRET_ENV_NAMES=(BUCKET_ACCESS_KEY_ID BUCKET_SECRET_ACCESS_KEY RUNPOD_AI_API_KEY RUNPOD_API_KEY
    AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN HF_TOKEN HUGGING_FACE_HUB_TOKEN)
MODELS_DIR="${MODELS_DIR:-$COMFY_DIR/models}"
VOLUME_MODELS_DIR="${VOLUME_MODELS_DIR:-/runpod-volume/models}"
HF_CACHE_DIR="${HF_CACHE_DIR:-/runpod-volume/huggingface-cache/hub}"
MODEL_MANIFEST="${MODEL_MANIFEST:-$WORKER_DIR/model_manifest.json}"

COMFY_PID=""
CHILD_PID=""
HANDLER_PID=""
SAGE_PID=""
COMFY_SAGE=0 # ComfyUI was started with --use-sage-attention

log() { printf '[entrypoint] %s\n' "$*"; }
die() {
    printf '[entrypoint] ERROR: %s\n' "$*" >&2
    stop_children
    exit 1
}

stop_children() {
    local pid
    for pid in "$CHILD_PID" "$SAGE_PID" "$COMFY_PID"; do
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
    local name
    for name in COMFY_STARTUP_TIMEOUT_S COMFY_STOP_TIMEOUT_S HANDLER_STOP_TIMEOUT_S \
        SAGE_SELF_TEST_TIMEOUT_S; do
        [[ "${!name}" =~ ^[0-9]+(\.[0-9]*)?$ ]] \
            || die "${name} must be a number of seconds, got '${!name}'."
    done
    [[ "${COMFY_LOG_MAX_BYTES}" =~ ^[0-9]+$ ]] \
        || die "COMFY_LOG_MAX_BYTES must be a number of bytes, got '${COMFY_LOG_MAX_BYTES}'."
    [[ "${RP_API_PORT}" =~ ^[0-9]+$ ]] && [ "${RP_API_PORT}" -ge 1 ] && [ "${RP_API_PORT}" -le 65535 ] \
        || die "RP_API_PORT must be a port number (1-65535), got '${RP_API_PORT}'."
    case "${COMFY_HOST%:*}" in
        127.0.0.1 | localhost) ;;
        *) die "COMFY_HOST must be 127.0.0.1:<port> or localhost:<port>, got '${COMFY_HOST}': ComfyUI has no authentication and must not listen beyond loopback." ;;
    esac
    [[ "${COMFY_HOST##*:}" =~ ^[0-9]+$ ]] || die "COMFY_HOST needs a port (127.0.0.1:<port>), got '${COMFY_HOST}'."
    [[ " ${COMFY_EXTRA_ARGS} " != *" --listen"* ]] \
        || die "COMFY_EXTRA_ARGS may not set --listen: ComfyUI listens on COMFY_HOST (loopback) only."
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
}

# SageAttention can be wrong without raising (ComfyUI then never falls back), so compare it with
# PyTorch attention on this GPU once, at the job's attention shape (the kernel path the job takes);
# if it disagrees, fails or overruns SAGE_SELF_TEST_TIMEOUT_S, run with sdpa rather than deliver
# garbage. Independent of GPU_PREFLIGHT; SAGE_SELF_TEST=0 skips it. It starts here and runs in the
# background while the models are prepared and ComfyUI starts; sage_self_test_result takes its
# result once ComfyUI is ready.
sage_self_test_start() {
    is_true "${SAGEATTENTION_ENABLED:-1}" || return 0
    if ! is_true "${SAGE_SELF_TEST:-1}"; then
        log "SageAttention self-test skipped (SAGE_SELF_TEST=${SAGE_SELF_TEST})."
        return 0
    fi
    log "SageAttention self-test started beside ComfyUI's start."
    timeout --kill-after=10 "$SAGE_SELF_TEST_TIMEOUT_S" \
        "$PYTHON_BIN" "$WORKER_DIR/scripts/gpu_preflight.py" --sage-self-test &
    SAGE_PID=$!
}

sage_self_test_result() {
    [ -n "$SAGE_PID" ] || return 0
    local rc=0
    wait "$SAGE_PID" || rc=$?
    SAGE_PID=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        printf '[entrypoint] GPU PREFLIGHT: the SageAttention self-test ran past SAGE_SELF_TEST_TIMEOUT_S (%s s).\n' \
            "$SAGE_SELF_TEST_TIMEOUT_S" >&2
    fi
    [ "$rc" -ne 0 ] || return 0
    printf '[entrypoint] WARNING: SAGEATTENTION SELF-TEST FAILED (exit %s; see the GPU PREFLIGHT line above). This worker runs with PyTorch attention (SAGEATTENTION_ENABLED=0): correct output, slower. Rebuild SageAttention for this GPU to get the speed back.\n' "$rc" >&2
    SAGEATTENTION_ENABLED=0
    export SAGEATTENTION_ENABLED
    if [ "$COMFY_SAGE" -eq 1 ]; then
        log "restarting ComfyUI without --use-sage-attention."
        stop_pid "$COMFY_PID" "$COMFY_STOP_TIMEOUT_S"
        COMFY_PID=""
        start_comfy keep-log
        wait_ready
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
    # ComfyUI's next print would hit a closed pipe and fail the running job. The file is rotated
    # to COMFY_LOG_FILE.1 past COMFY_LOG_MAX_BYTES (0: never), so at most twice that is kept.
    set +e
    trap '' TERM INT
    local warned=0 line written=0
    while IFS= read -r line || [ -n "$line" ]; do
        printf '%s\n' "$line"
        if [ "$COMFY_LOG_MAX_BYTES" -gt 0 ] && [ "$written" -ge "$COMFY_LOG_MAX_BYTES" ]; then
            mv -f "$COMFY_LOG_FILE" "$COMFY_LOG_FILE.1" 2>/dev/null
            written=0
        fi
        printf '%s\n' "$line" 2>/dev/null >>"$COMFY_LOG_FILE" && written=$((written + ${#line} + 1))
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
    COMFY_SAGE=0
    if is_true "${SAGEATTENTION_ENABLED:-1}"; then
        args+=(--use-sage-attention)
        COMFY_SAGE=1
    else
        log "SAGEATTENTION_ENABLED=${SAGEATTENTION_ENABLED}: ComfyUI starts without --use-sage-attention."
    fi
    if [ -n "$COMFY_EXTRA_ARGS" ]; then
        local -a extra
        read -r -a extra <<<"$COMFY_EXTRA_ARGS"
        args+=("${extra[@]}")
    fi
    if [ "${1:-}" != keep-log ]; then # a restart goes on with the first start's log
        : >"$COMFY_LOG_FILE"
        rm -f "$COMFY_LOG_FILE.1"
    fi
    local -a unset_secrets=()
    local name
    for name in "${SECRET_ENV_NAMES[@]}"; do unset_secrets+=(-u "$name"); done
    log "starting ComfyUI: ${COMFY_MAIN} ${args[*]}"
    env "${unset_secrets[@]}" "$PYTHON_BIN" -u "$COMFY_MAIN" "${args[@]}" > >(watch_log) 2>&1 &
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

running() {
    # Is child "$1" still running (not gone, not a zombie waiting to be reaped)?
    local stat state
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    state="${stat##*) }"
    [ "${state%% *}" != "Z" ]
}

stop_pid() {
    # SIGTERM child "$1", SIGKILL it after "$2" seconds, and reap it.
    local pid="$1" ticks=$((${2%.*} * 10))
    kill -TERM "$pid" 2>/dev/null || true
    while running "$pid" && [ "$ticks" -gt 0 ]; do
        sleep 0.1
        ticks=$((ticks - 1))
    done
    if running "$pid"; then
        log "pid ${pid} ignored SIGTERM for ${2} s; killing it."
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

forward_signal() {
    log "received SIG$1; passing it to the handler (pid ${HANDLER_PID})."
    kill -"$1" "$HANDLER_PID" 2>/dev/null || true
}

serve() {
    # Run the handler as a child; supervise it and ComfyUI until one of them ends (see the top).
    local -a handler_args=()
    if is_true "${SERVE_API_LOCALLY:-false}"; then
        handler_args+=(--rp_serve_api --rp_api_host 0.0.0.0 --rp_api_port "$RP_API_PORT")
        log "SERVE_API_LOCALLY: local API server on port ${RP_API_PORT}."
    fi
    cd "$WORKER_DIR"
    export RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="${RUNPOD_SKIP_AUTO_SYSTEM_CHECKS:-true}"
    export RUNPOD_LOG_LEVEL="${RUNPOD_LOG_LEVEL:-INFO}"
    log "starting handler: ${HANDLER} ${handler_args[*]}"
    "$PYTHON_BIN" -u "$HANDLER" "${handler_args[@]}" &
    HANDLER_PID=$!
    trap 'forward_signal TERM' TERM
    trap 'forward_signal INT' INT
    local ended="" rc=0
    while [ -z "${ended:-}" ]; do # none ended: a trapped signal interrupted the wait
        rc=0
        wait -n -p ended "$HANDLER_PID" "$COMFY_PID" || rc=$?
    done
    trap '' TERM INT
    if [ "$ended" = "$HANDLER_PID" ]; then
        log "handler exited with code ${rc}; stopping ComfyUI."
        stop_pid "$COMFY_PID" "$COMFY_STOP_TIMEOUT_S"
        return "$rc"
    fi
    sleep 0.2 # let the log reader flush
    printf '[entrypoint] ERROR: ComfyUI exited with code %s while serving; stopping the handler so that the platform replaces this worker. ComfyUI log (last 40 lines):\n' "$rc" >&2
    tail -n 40 "$COMFY_LOG_FILE" >&2 || true
    stop_pid "$HANDLER_PID" "$HANDLER_STOP_TIMEOUT_S"
    return 1
}

main() {
    trap 'on_signal TERM 143' TERM
    trap 'on_signal INT 130' INT
    check_settings
    gpu_preflight
    sage_self_test_start
    prepare_models
    start_comfy
    wait_ready
    sage_self_test_result
    warmup
    serve
}

main "$@"
