"""Our window count against the pinned WanVideoWrapper's own schedule (context_windows/context.py,
imported unchanged in the stack's interpreter): the same windows, step by step, for clips of
several lengths, overlaps and schedules."""

from __future__ import annotations

import json
import textwrap

from tests.plugins.realstack import Stack, stack_json
from xicon_dance.context_windows import ContextOptions, latent_frames, windows

FRAMES = (81, 85, 121, 241, 481, 961, 1441)
OVERLAPS = (16, 48)
SCHEDULES = ("uniform_standard", "static_standard", "uniform_looped")
STEPS = 8

# The pack's ``context_windows/context.py`` by itself: its package is registered without running
# the pack's ``__init__`` (that loads every node); ``..utils`` only lends it a logger.
UPSTREAM = textwrap.dedent(
    """
    import importlib, json, logging, sys, types
    from pathlib import Path

    pack = Path(sys.argv[1])
    package = types.ModuleType("wvw")
    package.__path__ = [str(pack)]
    sys.modules["wvw"] = package
    utils = types.ModuleType("wvw.utils")
    utils.log = logging.getLogger("wvw")
    sys.modules["wvw.utils"] = utils
    context = importlib.import_module("wvw.context_windows.context")
    assert Path(context.__file__).resolve() == (pack / "context_windows/context.py").resolve()
    out = []
    for case in json.loads(sys.argv[2]):
        scheduler = context.get_context_scheduler(case["schedule"])
        got = [
            [list(map(int, w)) for w in scheduler(step, case["steps"], case["latents"],
                                                  case["size"], case["stride"], case["overlap"])]
            for step in range(case["steps"])
        ]
        out.append(got)
    print(json.dumps(out))
    """
)


def test_our_windows_are_the_pinned_samplers(stack: Stack) -> None:
    """The sampler calls the schedule with latent counts (pixel frames // 4) and only when the
    clip is at least ``context_frames`` long; both sides get the same latent arguments."""
    cases, ours = [], []
    for schedule in SCHEDULES:
        for overlap in OVERLAPS:
            options = ContextOptions(frames=81, stride=4, overlap=overlap, schedule=schedule)
            for frames in FRAMES:
                cases.append(
                    {
                        "schedule": schedule,
                        "steps": STEPS,
                        "latents": latent_frames(frames),
                        "size": latent_frames(options.frames),
                        "stride": options.stride // 4,
                        "overlap": options.overlap // 4,
                    }
                )
                ours.append([windows(step, frames, options) for step in range(STEPS)])
    pack = stack.comfy_dir / "custom_nodes" / "ComfyUI-WanVideoWrapper"
    upstream = stack_json(stack, UPSTREAM, pack, json.dumps(cases), timeout_s=300)
    assert len(upstream) == len(cases)
    mismatches = [
        (case, step, len(mine[step]), len(theirs[step]))
        for case, mine, theirs in zip(cases, ours, upstream, strict=True)
        for step in range(STEPS)
        if mine[step] != theirs[step]
    ]
    assert not mismatches, mismatches[:5]
    counts = {len(w) for case, got in zip(cases, upstream, strict=True) for w in got}
    assert max(counts) >= 39, "the long clips ran many windows per step"
