#!/usr/bin/env bash
# Build SageAttention from source on the GPU machine for the given CUDA arch lists, one after the
# other, and record what each build holds. Meant to run in the background (setsid) while the stack
# is staged: every result is written under RESULTS and a build never blocks the caller.
#
#   scripts/device/build_sage.sh SRC_TARBALL RESULTS ARCHLIST [ARCHLIST ...]
#     e.g. build_sage.sh "$STAGE/sageattention-d1a57a5.tar.gz" "$TMPDIR/sage" "12.0" "9.0"
#
# For each ARCHLIST (tag: the list with ';' and '.' removed, "9.0;12.0" -> 90120):
#   RESULTS/<tag>/site/            the installed package (PYTHONPATH=RESULTS/<tag>/site)
#   RESULTS/<tag>/build.log        pip's build output, with wall time and the exit status
#   RESULTS/<tag>/elf.txt          `cuobjdump --list-elf` of every compiled extension
#   RESULTS/<tag>/done             written last (holds the exit status)
# RESULTS/toolchain.txt: nvcc --version, torch and its CUDA, gcc.
# Builds run under nice so that a job measured at the same time keeps the CPU.
set -uo pipefail

SRC="${1:?source tarball}"
RESULTS="${2:?results folder}"
shift 2
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS"
{
    nvcc --version
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    gcc --version | head -1
    nproc
} >"$RESULTS/toolchain.txt" 2>&1

for arch in "$@"; do
    tag="${arch//[;.]/}"
    out="$RESULTS/$tag"
    rm -rf "$out" && mkdir -p "$out/src"
    tar -C "$out/src" -xzf "$SRC" --strip-components=1
    start=$(date +%s)
    rc=0
    (
        cd "$out/src" &&
            TORCH_CUDA_ARCH_LIST="$arch" EXT_PARALLEL="${EXT_PARALLEL:-4}" MAX_JOBS="${MAX_JOBS:-8}" \
                NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:---threads 4}" \
                nice -n 19 "$PY" -m pip install -v --no-build-isolation --no-deps --no-index \
                --target "$out/site" .
    ) >"$out/build.log" 2>&1 || rc=$?
    echo "TORCH_CUDA_ARCH_LIST=$arch exit=$rc wall_s=$(($(date +%s) - start))" | tee -a "$out/build.log"
    for so in "$out"/site/sageattention/*.so; do
        [ -e "$so" ] || continue
        echo "== $(basename "$so")"
        cuobjdump --list-elf "$so" 2>&1
    done >"$out/elf.txt"
    echo "$rc" >"$out/done"
done
