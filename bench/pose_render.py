"""The SCAIL pose render (node 362, ``RenderNLFPoses``) as upstream ships it and with the project's
extension ``xicon_pose_render``, in one process, on the same synthetic poses: seconds per run
(each clip twice: the first run of a process builds taichi's runtime and kernels) and whether the
images and masks are equal: upstream, the extension with upstream's tail (the node's output made
from the whole clip, ``XICON_POSE_RENDER_STREAM=off``) and the extension as the image runs it
(the output made batch by batch), each with the growth of the process's resident set during the
node (sampled every 5 ms).

Run by the stack's Python (taichi, torch, the pinned SCAIL-Pose):

    python bench/pose_render.py --comfy-dir ComfyUI --frames 81,1441 --size 416x672 --device gpu

``--host-only`` times the extension's work on the host alone (its kernel replaced by a copy of
fixed frames; upstream not run). ``--checks`` adds the cases the real-stack test asserts (a
reference pose, so the camera is solved; two people; another size; the renderer alone on
upstream's random cylinders). The last
line printed is the JSON of every figure. Synthetic poses: a person 3 m away moving a little,
hands and face drawn; the pose detectors are not run.
"""

import argparse
import hashlib
import importlib
import importlib.util
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "stack" / "comfy_extension" / "xicon_pose_render" / "pose_render.py"
PACK = "ComfyUI-SCAIL-Pose"


def load(name: str, path: Path, package: Path | None = None) -> Any:
    locations = None if package is None else [str(package)]
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def clip(rng: np.random.Generator, n: int, people: int = 1) -> tuple[dict, dict]:
    """NLF's 24 joints (mm) of ``people`` persons about 3 m away, and their 2D poses."""
    import torch

    body = np.array([[0, -100, 3000]], np.float32) + rng.normal(0, 250, (24, 3)).astype(np.float32)
    smpl, dws = [], []
    for _ in range(n):
        joints = [body + rng.normal(0, 15, (24, 3)).astype(np.float32) for _ in range(people)]
        smpl.append(torch.from_numpy(np.stack(joints)))
        dws.append(
            {
                "bodies": {
                    "candidate": rng.uniform(0.25, 0.75, (people, 18, 2)),
                    "subset": np.tile(np.arange(18, dtype=np.float64), (people, 1)),
                },
                "hands": rng.uniform(0.3, 0.7, (2 * people, 21, 2)),
                "faces": rng.uniform(0.35, 0.45, (people, 68, 2)),
                "hands_score": np.ones((2 * people, 21)),
                "faces_score": np.ones((people, 68)),
            }
        )
    return {"joints3d_nonparam": [smpl]}, {"poses": dws}


def rss_mib() -> float:
    """This process's resident set (``VmRSS``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssPeak:
    """The resident set's largest growth over its value at the start, sampled every 5 ms."""

    def __init__(self) -> None:
        self.start = self.peak = rss_mib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> "RssPeak":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mib())

    @property
    def growth_mib(self) -> float:
        return round(self.peak - self.start, 1)


def digest(tensor: Any) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def stand_in_kernel(pr: Any, ti: Any, height: int, width: int) -> None:
    """The extension's kernel replaced by one that copies fixed frames into its batch (a person's
    worth of lit pixels, alpha on and off), so that a run times the host's work alone."""
    rng = np.random.default_rng(7)
    frame = np.zeros((height, width, 4), np.float32)
    frame[height // 4 : height // 2, width // 3 : width // 2] = rng.uniform(0, 1.1, 4)
    frame[height // 4 : height // 2, width // 3 : width // 2, 3] = 0.8  # the mask's part
    renderer_module = sys.modules[pr.Renderer.__module__]

    def build_kernel(*constants: Any) -> Any:
        def render(img: Any, first: int, n: int, *rest: Any) -> None:
            batch = np.broadcast_to(frame, (*img.shape, 4)).copy()
            img.from_numpy(batch)

        return render

    renderer_module.build_kernel = build_kernel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="RenderNLFPoses, upstream and xicon_pose_render")
    parser.add_argument("--comfy-dir", type=Path, required=True)
    parser.add_argument("--ext", type=Path, default=EXT)
    parser.add_argument("--frames", default="81,1441", help="clip lengths, comma-separated")
    parser.add_argument("--size", default="416x672", help="WIDTHxHEIGHT")
    parser.add_argument("--device", default="gpu", help="the node's render_device")
    parser.add_argument("--checks", action="store_true", help="also the test's cases")
    parser.add_argument(
        "--host-only",
        action="store_true",
        help="the extension's host work alone: its kernel replaced by a copy of fixed frames, "
        "upstream not run",
    )
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    frames = [int(v) for v in args.frames.split(",")]

    sys.path.insert(0, str(args.comfy_dir))
    import comfy.cli_args

    if args.device == "cpu":
        comfy.cli_args.args.cpu = True
    import taichi as ti
    import torch

    pr = load("xicon_pose_render_bench", args.ext)
    root = args.comfy_dir / "custom_nodes" / PACK
    pack = load(PACK, root / "__init__.py", root)
    nlf_render = importlib.import_module(f"{PACK}.NLFPoseExtract.nlf_render")
    cylinders = importlib.import_module(f"{PACK}.render_3d.taichi_cylinder")
    node = pack.NODE_CLASS_MAPPINGS["RenderNLFPoses"]()

    rng = np.random.default_rng(3)
    jobs: dict[str, tuple[tuple[dict, dict], tuple[int, int], bool]] = {
        f"{n} frames": (clip(rng, n), (width, height), False) for n in frames
    }
    if args.checks:
        n = frames[0]
        jobs["reference pose"] = (clip(rng, n), (width, height), True)
        jobs["two people"] = (clip(rng, max(2, n // 2), people=2), (width, height), False)
        jobs["another size"] = (clip(rng, 3), (width + 16, height - 8), False)
    reference = clip(rng, 1)[1]

    def run(job: str) -> dict[str, Any]:
        (poses, dw), (w, h), with_reference = jobs[job]
        random.seed(11)  # the 2D pass draws random numbers (upstream's drop_aug)
        with RssPeak() as rss:
            t0 = time.perf_counter()
            image, mask = node.predict(
                poses,
                w,
                h,
                dw_poses=dw,
                ref_dw_pose=reference if with_reference else None,
                render_device=args.device,
            )
            seconds = time.perf_counter() - t0
        return {
            "s": seconds,
            "image": digest(image),
            "mask": digest(mask),
            # the 2D pass draws random numbers: the state after the node
            "random": hashlib.sha256(repr(random.getstate()).encode()).hexdigest(),
            "rss_growth_mib": rss.growth_mib,  # the node's peak over the resident set before it
            "contiguous": image.is_contiguous(),  # upstream's is a view of RGBA frames
            "dtypes": [str(image.dtype), str(mask.dtype)],
            "lit": float(mask.mean()),
            "drawn": float((image > 0).float().mean()),
            "shape": list(image.shape),
        }

    out: dict[str, Any] = {"size": [width, height], "device": args.device}
    out["digest_ok"] = pr.upstream_digest(pr.upstream_modules(nlf_render)) == pr.UPSTREAM_SHA256
    if args.host_only:
        out["host_only"] = True
        ti.init(arch=getattr(ti, args.device))
        stand_in_kernel(pr, ti, height, width)
    upstream = {job: [] if args.host_only else [run(job), run(job)] for job in jobs}
    out["taichi_arch"] = str(ti.lang.impl.current_cfg().arch)
    if args.checks:
        random.seed(5)
        specs = cylinders.generate_specs_list(num_frames=3, min_cyl=5, max_cyl=30)
        camera = {
            "H": height,
            "W": width,
            "fx": 60.0,
            "fy": 60.0,
            "cx": width / 2,
            "cy": height / 2,
        }
        plain = cylinders.render_whole(specs, **camera)
    # the extension with upstream's tail (XICON_POSE_RENDER_STREAM off), then as the image runs it
    out["patch"] = pr.patch(nlf_render, env={pr.STREAM_ENV: "off"}, taichi_module=ti)
    renderer = nlf_render.render_whole_taichi
    batched = {job: [run(job), run(job)] for job in jobs}
    node_class = type(node)
    node_class.predict = pr.streamed(node_class.predict)
    ours = {job: [run(job), run(job)] for job in jobs}
    out["jobs"] = {}
    for job in jobs:
        a, b, c = upstream[job] or batched[job][:1], batched[job], ours[job]
        out["jobs"][job] = {
            "upstream_s": [r["s"] for r in upstream[job]],
            "batched_s": [r["s"] for r in b],
            "ours_s": [r["s"] for r in c],
            "equal": all(
                r["image"] == a[0]["image"] and r["mask"] == a[0]["mask"] for r in a + b + c
            ),
            "random_equal": all(r["random"] == a[0]["random"] for r in a + b + c),
            # the output made batch by batch against the extension's with upstream's tail
            "equal_to_tail": all(
                r["image"] == b[0]["image"] and r["mask"] == b[0]["mask"] for r in b + c
            ),
            "contiguous": [a[0]["contiguous"], b[0]["contiguous"], c[0]["contiguous"]],
            "rss_growth_mib": [[r["rss_growth_mib"] for r in x] for x in (a, b, c)],
            "dtypes": sorted({str(r["dtypes"]) for r in a + b + c}),
            "lit": a[0]["lit"],
            "drawn": a[0]["drawn"],
            "shape": a[0]["shape"],
        }
    if args.checks:
        mine = renderer(specs, **camera)
        out["render_whole_equal"] = len(plain) == len(mine) and all(
            np.array_equal(x, y) for x, y in zip(plain, mine, strict=True)
        )
        # where not equal: the largest difference (levels of 255) and the share of values apart
        gaps = [
            np.abs(x.astype(np.int16) - y.astype(np.int16))
            for x, y in zip(plain, mine, strict=True)
        ]
        out["render_whole_max_diff"] = max(int(g.max()) for g in gaps)
        out["render_whole_share_apart"] = sum(int((g > 0).sum()) for g in gaps) / sum(
            g.size for g in gaps
        )
        out["render_whole_lit"] = int(sum((f[..., 3] > 0).sum() for f in plain))
    out["initialised"] = getattr(ti.init, "initialised", None)
    out["compiled"] = getattr(renderer, "compiled", None)
    out["torch"] = torch.__version__
    for job, figures in out["jobs"].items():
        up, kept, ours_s = figures["upstream_s"], figures["batched_s"], figures["ours_s"]
        up = up or [float("nan")] * 2
        print(
            f"{job:>16}: upstream {up[0]:7.2f} / {up[1]:7.2f} s, upstream's tail "
            f"{kept[0]:7.2f} / {kept[1]:7.2f} s, extension {ours_s[0]:7.2f} / "
            f"{ours_s[1]:7.2f} s, equal {figures['equal']}",
            file=sys.stderr,
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
