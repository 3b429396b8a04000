"""WanVideoWrapper's Wan 2.1 VAE decode (node 28's work) in one process, as the graph runs it and
with levers that keep its arithmetic: cuDNN's algorithm search (``torch.backends.cudnn.
benchmark``), the decoder's weights in channels-last memory (``channels_last``: the conversion
of the image's extension ``xicon_vae_channels_last``), and the decoder compiled by
``torch.compile`` (what ``WanVideoVAELoader``'s ``compile_args`` does). ``encode`` and
``encode_channels_last`` time the encode instead (the pose embeds' work, node 324: the rendered
pose frames at ``--encode-size``), with upstream's layout and with the encoder's weights
channels-last. For each: seconds per run (the first run apart: it pays searches and
compiles), the torch allocator's peak, the whole GPU's peak (sampled every 10 ms: cuDNN's and
inductor's own memory included), and the output against the plain decode's or encode's (max
|difference|, cosine, finite).

Run by the stack's Python on the GPU machine:

    python bench/vae_decode.py --comfy-dir ComfyUI \\
        --vae ComfyUI/models/vae/Wan2_1_VAE_bf16.safetensors \\
        --latent-frames 21,61 --variants plain,benchmark,channels_last,both,compile,encode,\
encode_channels_last

``streamlined`` and ``encode_streamlined`` add the extension's ``decoder_ops.py`` steps to the
channels-last layout (``XICON_VAE_OPS``). ``streamlined_host`` is ``streamlined`` with the clip
then copied to the host as ``xicon_decode_frames`` did before 2026-12-06 (the VAE's loop gathers
it on the GPU, ``to_host_frames`` copies it over), ``streamed`` the same with that extension's
``streamed_decode`` (the frames sent to the host as they come): their times include the copy to
the host, and their torch peak tells what the decode holds on the GPU. ``streamed_autotune`` and
``encode_autotune`` are ``streamed`` and ``encode_streamlined`` with cuDNN's algorithm search
on (as ``benchmark`` is ``plain`` with it): the search is paid in their first run.
``kernels`` and ``encode_kernels`` are ``streamed`` and ``encode_streamlined`` with the
extension's CUDA kernels too (``XICON_VAE_KERNELS``: the RMS norm and its SiLU in one Triton
kernel, the 96-channel convolutions stacked as one 2-D convolution).
``kernels_copying`` and ``encode_kernels_copying`` are those kernels as of 2026-12-06's
fifteenth sitting: each convolution copies its cached frames and its input into a new tensor,
and adds its bias in a pass of its own (without the fused norm's room and the bias it takes
over, ``decoder_ops.ROOM`` and ``DEFER``). ``kernels_5d`` is ``kernels`` with the stacked
convolutions' input cut in 5-D pieces as before 2026-12-06's sixteenth sitting
(``decoder_ops.FLAT_PIECES`` off); ``kernels_resample`` is ``kernels`` with upstream's
``Resample.forward`` (its time upsample's frames stacked in PyTorch's default layout, not
interleaved channels-last: ``decoder_ops.INTERLEAVED``). ``kernels_chunkN`` is ``kernels`` with
``N`` latent frames to each decoder call after the first (``decode_frames.LATENTS_PER_CALL``).
``--profile VARIANT,...`` runs those variants once more under ``torch.profiler`` and prints
their top kernels and GPU time by kind.

``--vae`` is the model file, loaded as ``WanVideoVAELoader`` loads it (the synthetic one works:
its figures are time and memory; PyTorch's default initialisation of this VAE decodes to NaN).
The last line printed is the JSON of every figure.
"""

import argparse
import functools
import importlib
import importlib.util
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

VARIANTS = (
    "plain",
    "benchmark",
    "channels_last",
    "both",
    "compile",
    "streamlined",
    "streamlined_host",
    "streamed",
    "streamed_autotune",
    "kernels",
    "kernels_copying",
    "kernels_5d",
    "kernels_resample",
    "kernels_chunk2",
    "kernels_chunk3",
    "kernels_chunk4",
)
ENCODE_VARIANTS = (
    "encode",
    "encode_channels_last",
    "encode_streamlined",
    "encode_autotune",
    "encode_kernels",
    "encode_kernels_copying",
)
# the image's conversion, the one function both use
LAYOUT = (
    Path(__file__).resolve().parent.parent
    / "stack"
    / "comfy_extension"
    / "xicon_vae_channels_last"
    / "vae_channels_last.py"
)
FRAMES = LAYOUT.parent.parent / "xicon_decode_frames" / "decode_frames.py"


class GpuPeak:
    """The whole device's used memory, sampled in a thread (``torch.cuda.mem_get_info``)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(0.01)

    def __enter__(self) -> "GpuPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Wan 2.1 VAE decode, plain and with levers")
    parser.add_argument("--comfy-dir", type=Path, required=True)
    parser.add_argument("--vae", type=Path, required=True, help="Wan2_1_VAE_bf16.safetensors")
    parser.add_argument("--latent-frames", default="21", help="comma-separated (81 frames: 21)")
    parser.add_argument("--size", default="416x672", help="WIDTHxHEIGHT of the frames")
    parser.add_argument(
        "--encode-size", default="208x336", help="WIDTHxHEIGHT of the encoded pose frames"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after the first")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated variants to profile once more after their timed runs (CUDA: the "
        "kernels taking the most GPU time, to stderr)",
    )
    args = parser.parse_args(argv)
    profiled = set(filter(None, args.profile.split(",")))

    sys.path.insert(0, str(args.comfy_dir))
    import comfy.cli_args

    if args.device == "cpu":
        comfy.cli_args.args.cpu = True
    import torch

    spec = importlib.util.spec_from_file_location("xicon_vae_channels_last_impl", LAYOUT)
    assert spec and spec.loader
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    spec = importlib.util.spec_from_file_location("xicon_decode_frames_impl", FRAMES)
    assert spec and spec.loader
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)

    root = args.comfy_dir / "custom_nodes" / "ComfyUI-WanVideoWrapper"
    spec = importlib.util.spec_from_file_location(
        "wvw", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    assert spec and spec.loader
    package = importlib.util.module_from_spec(spec)
    sys.modules["wvw"] = package
    vae_module = importlib.import_module("wvw.wanvideo.wan_video_vae")

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    width, height = (int(v) for v in args.size.split("x"))
    enc_width, enc_height = (int(v) for v in args.encode_size.split("x"))

    from safetensors.torch import load_file

    sd = load_file(str(args.vae))
    if not any(k.startswith("model.") for k in sd):
        sd = {f"model.{k}": v for k, v in sd.items()}
    # as WanVideoVAELoader (nodes_model_loading.py, pinned commit): decoder width 96 is lightVAE
    pruning = 0.75 if sd["model.decoder.conv1.bias"].shape[0] == 96 else 0.0

    def fresh_vae() -> Any:
        vae = vae_module.WanVideoVAE(dtype=dtype, pruning_rate=pruning)
        vae.load_state_dict(sd)
        return vae.eval().to(device=device, dtype=dtype)

    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "size": [width, height],
        "encode_size": [enc_width, enc_height],
        "dtype": args.dtype,
        "weights": args.vae.name,
        "pruning_rate": pruning,
        "runs": {},
    }
    for t in (int(v) for v in args.latent_frames.split(",")):
        generator = torch.Generator().manual_seed(42)
        latent = torch.randn(16, t, height // 8, width // 8, generator=generator).to(dtype)
        # pose frames in [-1, 1], as node 324 hands them to the encoder
        pixels = torch.rand(3, 4 * (t - 1) + 1, enc_height, enc_width, generator=generator)
        pixels = (pixels * 2 - 1).to(dtype)
        references: dict[bool, Any] = {}
        for variant in args.variants.split(","):
            encoding = variant in ENCODE_VARIANTS
            torch.backends.cudnn.benchmark = variant in (
                "benchmark",
                "both",
                "streamed_autotune",
                "encode_autotune",
            )
            vae = fresh_vae()
            kernels = variant.startswith(("kernels", "encode_kernels"))  # every kernels_* way
            streamed = variant in ("streamed", "streamed_autotune") or variant.startswith("kernels")
            if variant in ("channels_last", "both", "streamlined", "streamlined_host") or streamed:
                layout.convert(vae, layout.DECODER)
            streamlined_encode = variant in ("encode_streamlined", "encode_autotune") or (
                encoding and kernels
            )
            if variant == "encode_channels_last" or streamlined_encode:
                layout.convert(vae, layout.ENCODER)
            if variant in ("streamlined", "streamlined_host") or streamed:
                print(layout.streamline(vae, layout.DECODER, kernels), file=sys.stderr)
            if streamed:
                assert host.stream_digest(vae) == host.STREAM_SHA256, "the VAE's loop changed"
                vae.single_decode = host.streaming_single_decode(vae)
            if streamlined_encode:
                print(layout.streamline(vae, layout.ENCODER, kernels), file=sys.stderr)
            layout.decoder_ops().FLAT_PIECES = variant != "kernels_5d"
            # latent frames per decoder call after the first (kernels_chunkN: N; else 1)
            chunked = variant.startswith("kernels_chunk")
            host.LATENTS_PER_CALL = int(variant[len("kernels_chunk") :]) if chunked else 1
            if variant == "kernels_resample":  # upstream's Resample.forward back
                ops = layout.decoder_ops()
                for m in vae.modules():
                    if m.__dict__.pop(ops.INTERLEAVED, None):
                        m.__dict__.pop("forward", None)
            if variant.endswith("_copying"):  # the kernels without the room and the moved bias
                ops = layout.decoder_ops()
                for m in vae.modules():
                    m.__dict__.pop(ops.ROOM, None)
                    m.__dict__.pop(ops.DEFER, None)
            if variant == "compile":
                vae.model.decoder = torch.compile(vae.model.decoder)
            times = []
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with GpuPeak() if device.type == "cuda" else _Null() as peak:
                for _ in range(1 + args.repeat):
                    t0 = time.perf_counter()
                    if encoding:
                        video = vae.encode([pixels], device=device, tiled=False, pbar=False)[0]
                    else:
                        video = vae.decode([latent], device=device, tiled=False, pbar=False)[0]
                        if variant == "streamlined_host":
                            video = host.to_host_frames(video)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            if variant in profiled and device.type == "cuda":
                run = functools.partial(
                    vae.encode if encoding else vae.decode,
                    [pixels if encoding else latent],
                    device=device,
                    tiled=False,
                    pbar=False,
                )
                profile(run, f"{variant}@{t}")
            frames = video.float().cpu()
            row: dict[str, Any] = {
                "first_s": times[0],
                "median_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
                "frames": list(frames.shape),
                "finite": bool(torch.isfinite(frames).all()),
            }
            if device.type == "cuda":
                row["torch_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
                row["gpu_peak_gib"] = peak.peak / 2**30
            reference = references.setdefault(encoding, frames)
            if reference is not frames:
                diff = (frames - reference).abs()
                row["max_abs_diff"] = float(diff.max())
                row["mean_abs_diff"] = float(diff.mean())
                a, b = frames.flatten().double(), reference.flatten().double()
                row["cosine"] = float(a @ b / (a.norm() * b.norm()))
            out["runs"][f"{variant}@{t}"] = row
            print(f"{variant:>14} @ {t:3d} latent frames: {row}", file=sys.stderr)
            del vae, video, frames
    print(json.dumps(out))


def profile(run: Any, label: str, top: int = 25) -> None:
    """``run()`` once under ``torch.profiler``: the kernels taking the most GPU time, and the
    GPU time by kind (convolution, copy and layout, normalisation and activation, the rest), to
    stderr."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels) or 1.0
    kinds = {
        "convolution": ("conv", "xmma", "implicit", "gemm", "cudnn", "winograd", "sm90", "sm80"),
        "copy and layout": ("copy", "cat", "pad", "nchw", "nhwc", "transpose", "permute"),
        "norm and activation": ("norm", "silu", "rsqrt", "reduce", "mul", "div", "add", "clamp"),
        "upsample": ("upsample", "nearest"),
    }
    by_kind = dict.fromkeys([*kinds, "other"], 0.0)
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), "other")
        by_kind[kind] += e.device_time_total
    print(f"profile {label}: GPU time {total / 1000:.1f} ms", file=sys.stderr)
    for kind, us in by_kind.items():
        print(f"  {kind:>20}: {us / 1000:8.1f} ms ({us / total:5.1%})", file=sys.stderr)
    for e in kernels[:top]:
        print(
            f"  {e.device_time_total / 1000:8.1f} ms {e.count:6d}x  {e.key[:110]}", file=sys.stderr
        )


class _Null:
    peak = 0

    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
