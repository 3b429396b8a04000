#!/usr/bin/env bash
# One GPU benchmark sitting on the offline GPU machine, after scripts/device/stage.sh has placed
# the stack ($COMFY_DIR) and the packages ($SITE). Run from the repository root there; each step
# is one short call, and the long run goes on detached between them (the machine stays warm only
# while calls keep coming, so `poll` is called back to back until the run ends).
#
#   scripts/device/session.sh prepare        in the background: SageAttention built for sm90
#                                            ($SAGE/90/site) and the true-shape synthetic models
#                                            written into $COMFY_DIR/models
#   scripts/device/session.sh start NAME ARGS...
#                                            wait for both, write the 61-s driving clip
#                                            ($CLIP, the bundled dance looped, 480x832) and start
#                                            `bench/gpu_run.py --comfy-dir $COMFY_DIR --out
#                                            $RUNS/NAME --attention sageattn --video $CLIP
#                                            --comfy-args "--front-end-root <empty>" ARGS...`
#                                            detached (setsid)
#   scripts/device/session.sh after PREV NAME ARGS...
#                                            the same, started (detached) once run PREV's
#                                            process has ended: two runs back to back on the GPU
#                                            with no call in between
#   scripts/device/session.sh poll NAME SECS wait until the run's process has ended or SECS
#                                            pass, then pack what it wrote so far (no videos, no
#                                            latents) into $OUT/NAME.tgz with the log's tail
set -euo pipefail

TMP="${TMPDIR:-/tmp}"
STAGE="${STAGE:-$TMP/xicon-stage}"
SITE="${SITE:-$TMP/xicon-site}"
SITE_ORT="${SITE_ORT:-$TMP/xicon-ort}"
COMFY_DIR="${COMFY_DIR:-$TMP/xicon-stack/ComfyUI}"
SAGE="${SAGE:-$TMP/sage}"
RUNS="${RUNS:-$TMP/xicon-runs}"
CLIP="${CLIP:-$TMP/d61.mp4}"
PY="${PYTHON:-python3}"

log() { printf '[session] %s\n' "$*"; }

prepare() {
    mkdir -p "$SAGE" "$RUNS"
    setsid nohup scripts/device/build_sage.sh "$STAGE"/sageattention-*.tar.gz "$SAGE" "9.0" \
        >"$SAGE/build_sage.log" 2>&1 </dev/null &
    setsid nohup bash -c "'$PY' scripts/make_synthetic_models.py --size full --device cuda \
        --out '$COMFY_DIR/models'; echo \$? >'$RUNS/models.done'" \
        >"$RUNS/models.log" 2>&1 </dev/null &
    log "SageAttention build and model writing started"
}

wait_for() {
    local file="$1" what="$2" limit="${3:-600}" t0=$SECONDS
    until [ -f "$file" ]; do
        if ((SECONDS - t0 > limit)); then
            log "$what: not done after ${limit} s" && return 1
        fi
        sleep 2
    done
    log "$what: exit $(cat "$file") (waited $((SECONDS - t0)) s)"
    [ "$(cat "$file")" = 0 ]
}

start() {
    local name="${1:?run name}"
    shift
    # shellcheck disable=SC2064 # the name now: a start that fails unqueues its run all the same
    trap "rm -f '$RUNS/$name.queued'" EXIT
    wait_for "$SAGE/90/done" "SageAttention sm90 build"
    wait_for "$RUNS/models.done" "synthetic models"
    # onnxruntime-gpu, where `stage.sh ort` installed it, before the machine's CPU-only build
    local ort_site=""
    [ -d "$SITE_ORT" ] && ort_site="$SITE_ORT:"
    export PYTHONPATH="$SAGE/90/site:$ort_site$SITE" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
    [ -f "$CLIP" ] || "$PY" scripts/make_default_video.py --seconds 61 --out "$CLIP"
    mkdir -p "$TMP/empty-fe" "$RUNS"
    rm -rf "${RUNS:?}/$name"
    setsid nohup "$PY" bench/gpu_run.py --comfy-dir "$COMFY_DIR" --out "$RUNS/$name" \
        --attention sageattn --video "$CLIP" --comfy-args "--front-end-root $TMP/empty-fe" "$@" \
        >"$RUNS/$name.log" 2>&1 </dev/null &
    sleep 1 # the run's process shows before its queued mark goes (`after` waits on either)
    rm -f "$RUNS/$name.queued"
    log "run $name started: $*"
}

# a run is pending while it runs or while `after` keeps it queued behind another
running() { pgrep -f "gpu_run.py .*--out $RUNS/$1( |\$)" >/dev/null || [ -f "$RUNS/$1.queued" ]; }

after() {
    local prev="${1:?previous run}" name="${2:?run name}"
    shift 2
    # queued until started: a run queued behind this one waits for it too (two `after`s given
    # at once used to start the second at once, its PREV not yet running)
    mkdir -p "$RUNS" && touch "$RUNS/$name.queued"
    # the inner script's $0, $1 and $@ are its own arguments (given after it), not this shell's
    # shellcheck disable=SC2016
    setsid nohup bash -c 'while [ -f "$1.queued" ] || pgrep -f "gpu_run.py .*--out $1( |$)" \
        >/dev/null; do sleep 5; done
        shift; exec bash "$0" start "$@"' "$0" "$RUNS/$prev" "$name" "$@" \
        >"$RUNS/$name.after.log" 2>&1 </dev/null &
    log "run $name starts when run $prev has ended: $*"
}

poll() {
    local name="${1:?run name}" secs="${2:-540}" t0=$SECONDS
    # summary.json is rewritten after every job: the run is over when its process is gone
    while running "$name" && ((SECONDS - t0 < secs)); do
        sleep 5
    done
    local state=finished
    running "$name" && state=running
    log "run $name: $state after $((SECONDS - t0)) s"
    : "${OUT:?}"
    tar -C "$RUNS" -czf "$OUT/$name.tgz" --exclude='*.mp4' --exclude='*.safetensors' \
        "$name" "$name.log" 2>/dev/null || true
    tail -n 25 "$RUNS/$name.log" || true
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
}

case "${1:-}" in
prepare) prepare ;;
start) shift && start "$@" ;;
after) shift && after "$@" ;;
poll) shift && poll "$@" ;;
*)
    echo "usage: $0 prepare | start NAME ARGS... | after PREV NAME ARGS... | poll NAME SECS" >&2
    exit 2
    ;;
esac
