"""GPU preflight for the image: can torch use this GPU, and was the image built for its arch?

Contract (run by entrypoint.sh before ComfyUI starts; exit status 0 = fit):
- exit 2: torch sees no CUDA device, or a tiny kernel on it fails ("CUDA unknown error" hosts);
- exit 3: the GPU's compute capability is not in the arch list the image was compiled for
  (``IMAGE_CUDA_ARCH_LIST``, e.g. ``12.0`` or ``8.9;9.0;12.0``: SageAttention's kernels) or not in
  torch's own ``torch.cuda.get_arch_list()``; the message names the GPU, its capability, the
  list and the build argument to change — instead of a later "CUDA error: no kernel image".
One line per finding on stderr, prefixed ``GPU PREFLIGHT``.
"""

from __future__ import annotations

import os
import sys


def parse_arch_list(raw: str) -> set[str]:
    """``"8.9;9.0 12.0+PTX"`` -> ``{"8.9", "9.0", "12.0"}``."""
    items = raw.replace(",", ";").replace(" ", ";").split(";")
    return {i.strip().removesuffix("+PTX") for i in items if i.strip()}


def _say(message: str) -> None:
    sys.stderr.write(f"GPU PREFLIGHT: {message}\n")
    sys.stderr.flush()


def check(arch_list: str) -> int:
    try:
        import torch
    except ImportError as exc:
        _say(f"torch cannot be imported: {exc}")
        return 2
    if not torch.cuda.is_available():
        _say("torch sees no CUDA device (driver too old for CUDA 12.8, or no GPU attached).")
        return 2
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    cap = f"{major}.{minor}"
    wanted = parse_arch_list(arch_list)
    if wanted and cap not in wanted:
        _say(
            f"{name} has compute capability {cap}, but this image was built for "
            f"{';'.join(sorted(wanted))} only (SageAttention kernels would fail with 'no kernel "
            f'image\'). Rebuild with --build-arg TORCH_CUDA_ARCH_LIST="{cap}" (or a list '
            f"including it), or pick a GPU pool of that arch."
        )
        return 3
    torch_archs = set(torch.cuda.get_arch_list())
    if f"sm_{major}{minor}" not in torch_archs and f"compute_{major}{minor}" not in torch_archs:
        _say(f"{name} ({cap}) is not supported by this torch build ({sorted(torch_archs)}).")
        return 3
    try:
        x = torch.ones(64, 64, device="cuda")
        float((x @ x).sum().item())
    except Exception as exc:  # any CUDA failure here means the host is unusable
        _say(f"a test kernel on {name} failed: {exc}")
        return 2
    sys.stderr.write(f"GPU PREFLIGHT: ok, {name}, capability {cap}, torch {torch.__version__}\n")
    return 0


def main() -> int:
    return check(os.environ.get("IMAGE_CUDA_ARCH_LIST", ""))


if __name__ == "__main__":
    sys.exit(main())
