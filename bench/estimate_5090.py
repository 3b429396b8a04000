"""The RTX 5090 estimate, operation by operation and lever by lever, from measured H200 figures.

Not a measurement: arithmetic from what was measured on the H200 (``bench/results``) and the
RTX 5090's published rates, with every assumption named below. It prints two Markdown tables:
the cost of one transformer block and one window-step per lever, and whole jobs (81 frames warm,
60 s) per lever. Run: ``python bench/estimate_5090.py``.

Measured inputs (H200, torch 2.11, job shape 416x672, 29,757 tokens with pose, 24,024 without):
- one Wan-14B block, bare (issue record, random weights): linears 24.3 ms (bf16), PyTorch SDPA
  30.9 ms, whole block 60.0 ms, so 4.8 ms for everything else (norms, RoPE, modulation,
  cross-attention, residuals);
- the sampler through the worker (``bench/results/gpu_h200``, ``gpu_h200_long``): 2.31 s per
  pose step / 1.78 s per plain step with ``sageattn`` (sm90), 3.42 / 2.49 s with ``sdpa``;
  sampler node 17.1 s for 6 steps of one window (so 4.3 s before the first step: the transformer
  moved to the GPU, the pose and reference latents);
- ``sageattn`` NHD on sm90: 25.8 ms per call (``bench/results/attention_h100.txt``, H100);
- outside the sampler, warm 81-frame job: 8.3 s; the 60-s job: 91.8 s (decode 24.2, VideoCombine
  16.4, pose detection on the CPU provider 21.8, pose render 9.4, load 7.3, pose embeds 5.0,
  resize 4.9, the last now left out of the graph).

Assumptions for the RTX 5090 (each one a factor the estimate stands on):
- linears reach the same share of peak as on the H200 (24.3 ms for 17.8 TFLOP = 732 TFLOP/s,
  74 % of 989); peaks: 209.5 TFLOP/s bf16/fp16 with fp32 accumulation, 419 with fp16
  accumulation (``fp16_fast``) and for fp8 (NVIDIA RTX Blackwell whitepaper);
- ``fp16_fast`` costs the 9 % it cost on the H200 beyond the matmul rate (measured: 2.53 vs
  2.31 s per step there, where the rate does not change);
- self-attention: SageAttention2++ at 583-643 TOPS (SageAttention's RTX 5090 chart) plus its
  quantisation passes scaled by memory bandwidth (2.3 ms on the H100): 32-35 ms; SDPA at
  FlashAttention's 173-215 TFLOP/s: 84-105 ms;
- the other ops are memory-bound: x2.68 (4.8 / 1.79 TB/s);
- WanVideoWrapper's own cost beyond the bare block (57.8 - 54.9 = 2.9 ms per block with
  ``sageattn``; 85.5 - 60.0 = 25.5 ms with ``sdpa``) stays as it is (host-side);
- stages outside the sampler: CPU stages as on the H200, GPU stages (decode, CLIP vision, pose
  embeds) x3-4.7 (the bf16 rate ratio is 4.7; memory-bound parts less), pose detection on the
  CUDA provider at most its CPU time; the move of the transformer as on the H200 (PCIe).
"""

from __future__ import annotations

BLOCKS = 40
STEPS_POSE, STEPS_PLAIN = 4, 2  # 6 steps; the pose tokens end at 50 % (node 324)
PLAIN_SHARE = 1.78 / 2.31  # plain step / pose step, measured with sageattn
LINEAR_TFLOP = 17.8  # per block at 29,757 tokens (597.7 MFLOP per token)
H200_LINEAR_EFF = LINEAR_TFLOP / 24.3e-3 / 989  # 0.74
OTHER_MS = 4.8 * 4.8 / 1.79
ATTN_MS = {"sdpa": (84.0, 105.0), "sageattn": (32.0, 35.0)}
WRAPPER_MS = {"sdpa": 25.5, "sageattn": 2.9}
RATE = {"bf16": 209.5, "fp16_fast": 419.0}
FP16_FAST_EXTRA = 2.53 / 2.31  # measured on the H200
PRE_SAMPLING_S = 4.3
OUTSIDE_81 = (8.3 - 1.5 - 1.0 - 0.3 + (1.5 + 1.0 + 0.3) * 3.0, 8.3 - 1.5 - 1.0 - 0.3 + 2.8 * 4.7)
# 60 s: CPU stages (VideoCombine 16.4, load 7.3, pose detection <= 21.8, render 9.4) + GPU
# stages (decode 24.2, pose embeds 5.0) x3-4.7; resize left out.
OUTSIDE_60 = (16.4 + 7.3 + 21.8 + 9.4 + 29.2 * 3.0, 16.4 + 7.3 + 21.8 + 9.4 + 29.2 * 4.7)
WINDOW_STEPS_60 = 40 * 6  # 39-40 windows per step at 1441 frames, overlap 48
WINDOW_STEPS_10 = 6.5 * 6  # 6-7 windows per step at 241 frames
# 241 frames outside the sampler: between the 81-frame and 60-s figures, linear in frames
OUTSIDE_10 = tuple(
    a + (b - a) * (241 - 81) / (1441 - 81) for a, b in zip(OUTSIDE_81, OUTSIDE_60, strict=True)
)


def block_ms(attention: str, precision: str) -> tuple[float, float]:
    linear = LINEAR_TFLOP / (RATE[precision] * H200_LINEAR_EFF) * 1e3
    lo, hi = (linear + a + OTHER_MS + WRAPPER_MS[attention] for a in ATTN_MS[attention])
    if precision == "fp16_fast":
        lo, hi = lo * FP16_FAST_EXTRA, hi * FP16_FAST_EXTRA
    return lo, hi


def main() -> None:
    levers = [
        ("`sdpa`, bf16 (no SageAttention)", "sdpa", "bf16"),
        ("`sageattn`, bf16 (`BASE_PRECISION=bf16`)", "sageattn", "bf16"),
        (
            "`sageattn`, `fp16_fast` (the worker's choice on a GeForce card)",
            "sageattn",
            "fp16_fast",
        ),
    ]
    print(
        "| lever | linears ms/block | attention ms | other + wrapper ms | ms/block "
        "| s per pose window-step |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for name, attention, precision in levers:
        linear = LINEAR_TFLOP / (RATE[precision] * H200_LINEAR_EFF) * 1e3
        lo, hi = block_ms(attention, precision)
        a_lo, a_hi = ATTN_MS[attention]
        rows.append((name, lo, hi))
        print(
            f"| {name} | {linear:.0f} | {a_lo:.0f}-{a_hi:.0f} | "
            f"{OTHER_MS + WRAPPER_MS[attention]:.0f} | {lo:.0f}-{hi:.0f} | "
            f"{lo * BLOCKS / 1e3:.1f}-{hi * BLOCKS / 1e3:.1f} |"
        )
    print()
    print(
        "| lever | 81 frames, warm: sampler | 81 frames, warm: job | 10 s: job "
        "| 60 s: sampler | 60 s: job |"
    )
    print("|---|---|---|---|---|---|")
    for name, lo, hi in rows:
        per_step = [(v * BLOCKS / 1e3) for v in (lo, hi)]
        mean_step = [s * (STEPS_POSE + STEPS_PLAIN * PLAIN_SHARE) / 6 for s in per_step]
        sampler = [PRE_SAMPLING_S + 6 * m for m in mean_step]
        job = [sampler[0] + OUTSIDE_81[0], sampler[1] + OUTSIDE_81[1]]
        mid_job = [
            PRE_SAMPLING_S + WINDOW_STEPS_10 * m + o
            for m, o in zip(mean_step, OUTSIDE_10, strict=True)
        ]
        long_sampler = [PRE_SAMPLING_S + WINDOW_STEPS_60 * m for m in mean_step]
        long_job = [long_sampler[0] + OUTSIDE_60[0], long_sampler[1] + OUTSIDE_60[1]]
        print(
            f"| {name} | {sampler[0]:.0f}-{sampler[1]:.0f} s | {job[0]:.0f}-{job[1]:.0f} s | "
            f"{mid_job[0] / 60:.1f}-{mid_job[1] / 60:.1f} min | "
            f"{long_sampler[0] / 60:.1f}-{long_sampler[1] / 60:.1f} min | "
            f"{long_job[0] / 60:.1f}-{long_job[1] / 60:.1f} min |"
        )
    print()
    print(
        f"(H200 linear efficiency {H200_LINEAR_EFF:.2f}; outside the sampler: 81 frames "
        f"{OUTSIDE_81[0]:.0f}-{OUTSIDE_81[1]:.0f} s, "
        f"60 s {OUTSIDE_60[0]:.0f}-{OUTSIDE_60[1]:.0f} s)"
    )


if __name__ == "__main__":
    main()
