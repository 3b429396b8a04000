"""The RTX 5090 estimate, operation class by operation class and lever by lever, from the H200.

Not a measurement: arithmetic on what was measured on one H200 through the worker
(``bench/results/gpu_h200_windows``: one sampler step of each kind under ``torch.profiler``, and
whole jobs from 81 frames to 60 s; ``bench/results/gpu_h200_long``: the 10-s and the 60-s
overlap-48 jobs) and the RTX 5090's published rates. Every input is read from those files or
named below. Run: ``python bench/estimate_5090.py``.

One window-step on the H200 (the profiled transformer forward at the job's shape, 29,757 tokens
with the pose tokens, 24,024 without; 40 blocks), split by the profile's kernel classes:
- self-attention: the SageAttention kernel (``qk_int8_sv_f8_attn``), or with ``sdpa`` PyTorch's
  flash kernel less the cross-attention share;
- cross-attention (text and CLIP tokens): PyTorch's flash kernel in the ``sageattn`` profile (80
  calls per forward);
- gemm: the linears (nvjet / cuBLAS kernels);
- memory-bound: norms, RoPE, modulation, residuals, copies, SageAttention's quantisation passes
  (``norm/elementwise`` + ``copy`` + ``other``);
- host: wall time of the forward less the GPU's busy time.

Scaling to the RTX 5090 (each factor is an assumption the estimate stands on):
- gemm: time x 989 / 209.5 in bf16 (the H200's dense bf16 peak, H200 datasheet, against the
  5090's fp16/bf16 with fp32 accumulation, NVIDIA RTX Blackwell whitepaper), x 989 / 419 with
  ``fp16_fast`` (fp16 accumulation); i.e. the same share of peak as on the H200;
- ``fp16_fast`` also costs what it cost the H200 beyond its matmuls (there it does not change the
  matmul rate): +0.22 s per pose step, +0.15 s per plain step (``gpu_h200_long``: 2.53 / 1.93 s
  against 2.31 / 1.78 s), counted as memory-bound work;
- self-attention: its operations (4 N^2 x 5,120 per call) at SageAttention2++'s 583-643 TOPS on
  the RTX 5090 (SageAttention's published chart), or at FlashAttention-2's 173-215 TFLOP/s there
  (same chart) for ``sdpa``; cross-attention at the FlashAttention ratio of its H200 time;
- memory-bound work and the host gap: x 4.8 / 1.79 (HBM3e against GDDR7 bandwidth) and x 1;
- ``rms_fused`` (torch's RMSNorm, node 22): the memory-bound time of the profiled pose step with
  it; plain steps lose the same share;
- ``TORCH_COMPILE`` (inductor fuses the work between the matmuls): the memory-bound time scaled by
  what compiling did to it in one H200 run (``bench/results/gpu_h200_compile/compile/profile``:
  a compiled pose step against the shipped graph's, both with the fused RMSNorm); plain steps lose
  the same share; attention and gemm as without it (the profile shows them unchanged). A warm
  process: the compile itself (first job of a process, H200: 19-21 s, 7-9 s from inductor's
  cache on disk) is not in these figures;
- outside the sampler: ComfyUI's nodes as measured per job; the tensor-core nodes (decode, CLIP
  vision, pose and reference embeds) x 3.0-4.7 (the bf16 rate ratio is 4.7, memory-bound parts
  less), NLF and the taichi pose render x 1.0-1.5 (fp32 on CUDA cores, where the 5090's
  published 104.8 TFLOP/s exceed the H200's 67, and much of it is host work), CPU nodes and the
  worker's stages as on the H200; pose detection
  ran there on the CPU provider (the image uses the CUDA one), so its CPU time is an upper bound;
- before the first window-step the sampler node moves the transformer to the GPU (PCIe) and
  encodes the pose latents: x 1.0-3.0; with the transformer kept on the GPU between jobs
  (``bench/results/gpu_h200_resident``, the worker's default on cards of 30 GiB or more) a warm
  job only does the rest, measured in that run's warm job.
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUN = RESULTS / "gpu_h200_windows"
LONG = RESULTS / "gpu_h200_long"
COMPILE_RUN = RESULTS / "gpu_h200_compile" / "compile"
RESIDENT_RUN = RESULTS / "gpu_h200_resident" / "res"
COMPILE_CALLS = {"shipped": 9, "compiled": 21}  # pose steps of that run's warm jobs

BLOCKS = 40
TOKENS = {"pose": 29_757, "plain": 24_024}
STEPS = {"pose": 4, "plain": 2}  # per window: the pose tokens end at 50 % (node 324)
MODEL_DIM = 5_120
LINEAR_TFLOP = 17.8  # one block's linears at 29,757 tokens (597.7 MFLOP per token)
H200_BF16 = 989.0
RTX_GEMM = {"bf16": 209.5, "fp16_fast": 419.0}
RTX_SAGE_TOPS = (583.0, 643.0)
RTX_FA2_TFLOPS = (173.0, 215.0)
BANDWIDTH_RATIO = 4.8 / 1.79
FP16_FAST_EXTRA_S = {"pose": 0.22, "plain": 0.15}
GPU_SCALE = (3.0, 4.7)
RENDER_SCALE = (1.0, 1.5)
PRE_SCALE = (1.0, 3.0)
PRICE_H200 = 0.00155  # RunPod H200 PRO flex, $ per second (published price)
TENSOR_NODES = {  # convolutions and attention on tensor cores
    "WanVideoDecode",
    "WanVideoClipVisionEncode",
    "WanVideoAddSCAILPoseEmbeds",
    "WanVideoAddSCAILReferenceEmbeds",
}
RENDER_NODES = {"NLFPredict", "RenderNLFPoses"}  # a small network; taichi's fp32 rasteriser
SAMPLER = "WanVideoSamplerv2"
# profiled forwards (bench/results/gpu_h200_windows/profile): warm job, sdpa job, rms_fused job
CALLS = {
    ("sageattn", "pose"): 9,
    ("sageattn", "plain"): 11,
    ("sdpa", "pose"): 15,
    ("sdpa", "plain"): 17,
    ("rms_fused", "pose"): 21,
}


@functools.cache
def profile(call: int, run: Path = RUN) -> dict:
    return json.loads((run / "profile" / f"call{call}.json").read_text())


def _memory_ms(prof: dict) -> float:
    by = prof["by_class_ms"]
    return sum(by.get(k, 0.0) for k in ("norm/elementwise", "copy", "other"))


def compile_memory_ratio() -> float:
    """Memory-bound time of a compiled pose step over the shipped graph's (one H200 run)."""
    shipped, compiled = (profile(COMPILE_CALLS[k], COMPILE_RUN) for k in ("shipped", "compiled"))
    return _memory_ms(compiled) / _memory_ms(shipped)


def _kernel_ms(prof: dict, needle: str) -> float:
    return sum(t["ms"] for t in prof["top"] if needle in t["name"])


def h200_parts(attention: str, kind: str) -> dict[str, float]:
    """One window-step on the H200 in ms per class (see the module doc)."""
    prof = profile(CALLS[(attention, kind)])
    sage = profile(CALLS[("sageattn", kind)])
    by = prof["by_class_ms"]
    cross = _kernel_ms(sage, "flash_fwd")
    attention_ms = by.get("attention", 0.0)
    return {
        "self": attention_ms - cross,
        "cross": cross,
        "gemm": by.get("gemm", 0.0),
        "memory": _memory_ms(prof),
        "host": prof["wall_ms"] - prof["busy_ms"],
        "wall": prof["wall_ms"],
    }


def attention_flops(kind: str) -> float:
    """Self-attention operations of one forward: 4 N^2 x model width per block."""
    return BLOCKS * 4 * TOKENS[kind] ** 2 * MODEL_DIM


def _fa2_h200_tflops() -> float:
    """What PyTorch's flash kernel reached on the H200 in the ``sdpa`` pose step (TFLOP/s)."""
    return attention_flops("pose") / (h200_parts("sdpa", "pose")["self"] / 1e3) / 1e12


def rtx_step_s(
    attention: str, precision: str, rms: bool, kind: str, compiled: bool = False
) -> tuple[float, float]:
    """One window-step on the RTX 5090 in seconds (low, high)."""
    parts = h200_parts(attention, kind)
    memory = parts["memory"]
    if rms:
        fused, unfused = h200_parts("rms_fused", "pose"), h200_parts("sageattn", "pose")
        memory *= fused["memory"] / unfused["memory"]
    if compiled:
        memory *= compile_memory_ratio()
    memory *= BANDWIDTH_RATIO
    if precision == "fp16_fast":
        memory += FP16_FAST_EXTRA_S[kind] * 1e3 * BANDWIDTH_RATIO
    fixed_ms = parts["gemm"] * H200_BF16 / RTX_GEMM[precision] + memory + parts["host"]
    rates = RTX_SAGE_TOPS if attention == "sageattn" else RTX_FA2_TFLOPS
    fa2_h200 = _fa2_h200_tflops()
    low, high = (
        (fixed_ms + attention_flops(kind) / (rate * 1e12) * 1e3 + parts["cross"] * fa2_h200 / fa2)
        / 1e3
        for rate, fa2 in zip(rates[::-1], RTX_FA2_TFLOPS[::-1], strict=True)  # high rate first
    )
    return low, high


def window_step_s(step: tuple[float, float], plain: tuple[float, float]) -> tuple[float, float]:
    total = sum(STEPS.values())
    pairs = zip(step, plain, strict=True)
    return tuple((STEPS["pose"] * a + STEPS["plain"] * b) / total for a, b in pairs)


def job(summary: Path, label: str) -> dict:
    return next(j for j in json.loads(summary.read_text())["jobs"] if j["job"] == label)


def _sampling_s(j: dict) -> float:
    """Seconds from the first window-step's start to the last one's end (the span of the
    sampler's events plus the first window-step, which ends before the first event)."""
    times = [e[0] for e in j["sampler_events"] if e[2] == 6]
    steps = [s for s in j["sampler_step_s"] if s > 0]
    return max(times) - min(times) + statistics.mean(steps)


# (row, summary, job, window-steps per job); the 81-frame row is the earlier run's unprofiled
# warm job (this run's warm job had two forwards under the profiler). The time before the first
# window-step is the cold job's (the transformer moved to the GPU), except in the row whose job
# found it there (RESIDENT_ROW: its own).
RESIDENT_ROW = "81 frames (3.4 s), warm, transformer kept on the GPU"
ROWS = [
    ("81 frames (3.4 s), warm", LONG / "lean_summary.json", "lean:warm", 6),
    (RESIDENT_ROW, RESIDENT_RUN / "summary.json", "resident:b", 6),
    ("241 frames (10 s)", LONG / "frames241_summary.json", "lean:w241", 40),
    ("721 frames (30 s)", RUN / "summary.json", "baseline:w721", 121),
    ("1441 frames (60 s)", LONG / "lean_summary.json", "lean:long", 239),
    ("1441 frames (60 s), overlap 16", RUN / "summary.json", "overlap16:long", 136),
    ("961 frames (60 s at 16 fps)", RUN / "summary.json", "fps16:long", 159),
]


def outside(j: dict) -> tuple[float, float, float]:
    """(CPU nodes + the worker's stages, tensor-core nodes, NLF + pose render) in seconds."""
    nodes = {v["class"]: v["s"] for v in j["node_times"].values() if v["class"] != SAMPLER}
    tensor = sum(s for c, s in nodes.items() if c in TENSOR_NODES)
    render = sum(s for c, s in nodes.items() if c in RENDER_NODES)
    cpu = sum(nodes.values()) - tensor - render
    worker = j["wall_s"] - j["timings"]["inference"]
    return cpu + worker, tensor, render


def main() -> None:
    levers = [
        ("`sdpa`, bf16", "sdpa", "bf16", False),
        ("`sageattn`, bf16", "sageattn", "bf16", False),
        (
            "`sageattn`, `fp16_fast` (the worker's choice on GeForce)",
            "sageattn",
            "fp16_fast",
            False,
        ),
        ("`sageattn`, `fp16_fast`, fused RMSNorm", "sageattn", "fp16_fast", True),
        ("the same + `TORCH_COMPILE` (warm process)", "sageattn", "fp16_fast", True, True),
    ]
    print("One pose window-step on the H200, measured (ms, `torch.profiler`):\n")
    print("| attention | self-attention | cross-attention | gemm | memory-bound | host | wall |")
    print("|---|---|---|---|---|---|---|")
    for name in ("sageattn", "sdpa", "rms_fused"):
        p = h200_parts(name, "pose")
        print(
            f"| {name} | {p['self']:.0f} | {p['cross']:.0f} | {p['gemm']:.0f} | "
            f"{p['memory']:.0f} | {p['host']:.0f} | {p['wall']:.0f} |"
        )
    print(
        f"\n(`torch.compile`, same H200, another run: memory-bound work of a pose step "
        f"x{compile_memory_ratio():.2f}, "
        f"{_memory_ms(profile(COMPILE_CALLS['compiled'], COMPILE_RUN)):.0f} vs "
        f"{_memory_ms(profile(COMPILE_CALLS['shipped'], COMPILE_RUN)):.0f} ms)"
    )
    gemm_tflops = LINEAR_TFLOP * BLOCKS / (h200_parts("sageattn", "pose")["gemm"] / 1e3)
    print(
        f"\n(on the H200: PyTorch's flash kernel {_fa2_h200_tflops():.0f} TFLOP/s, the linears "
        f"{gemm_tflops:.0f} TFLOP/s)\n"
    )
    print("RTX 5090, estimated seconds per window-step:\n")
    print("| lever | pose step | plain step | mean window-step (4 pose + 2 plain) |")
    print("|---|---|---|---|")
    means = {}
    for name, att, prec, rms, *compiled in levers:
        pose = rtx_step_s(att, prec, rms, "pose", *compiled)
        plain = rtx_step_s(att, prec, rms, "plain", *compiled)
        mean = window_step_s(pose, plain)
        means[name] = mean
        print(
            f"| {name} | {pose[0]:.2f}-{pose[1]:.2f} | {plain[0]:.2f}-{plain[1]:.2f} | "
            f"{mean[0]:.2f}-{mean[1]:.2f} |"
        )
    cold = job(RUN / "summary.json", "baseline:cold")
    pre_81 = cold["node_times"]["348"]["s"] - _sampling_s(cold)
    print(f"\n(before the first window-step, 81 frames: {pre_81:.1f} s on the H200)\n")
    print("Whole jobs: H200 measured, RTX 5090 estimated per lever (min):\n")
    header = "| clip | window-steps | H200 end to end | H200 $ per output s | " + " | ".join(
        name for name, *_ in levers
    )
    print(header + " |")
    print("|" + "---|" * (4 + len(levers)))
    for row, path, label, wsteps in ROWS:
        j = job(path, label)
        cpu, tensor, render = outside(j)
        pre = j["node_times"]["348"]["s"] - _sampling_s(j) if row == RESIDENT_ROW else pre_81
        seconds = j["video"]["duration_s"]
        cells = []
        for name, *_ in levers:
            lo, hi = (
                pre * PRE_SCALE[i]
                + wsteps * means[name][i]
                + cpu
                + tensor * GPU_SCALE[i]
                + render * RENDER_SCALE[i]
                for i in (0, 1)
            )
            cells.append(f"{lo / 60:.1f}-{hi / 60:.1f}" if lo > 120 else f"{lo:.0f}-{hi:.0f} s")
        wall = j["wall_s"]
        h200 = f"{wall / 60:.1f} min" if wall > 120 else f"{wall:.1f} s"
        print(
            f"| {row} | {wsteps} | {h200} | ${wall * PRICE_H200 / seconds:.4f} | "
            + " | ".join(cells)
            + " |"
        )
    print(
        "\n(5090 cells in minutes unless marked s. The 81-frame, 10-s and 60-s overlap-48 rows "
        "are from the earlier run (gpu_h200_long): its clip needed no transcode and its pose "
        "detection took 0.04 s)"
    )


if __name__ == "__main__":
    main()
