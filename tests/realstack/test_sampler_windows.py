"""The real WanVideoSamplerv2 with context windows on, on the CPU: its progress reports a fraction
of a step per window, as many per step as our schedule counts, and the reporter follows them.

This module sorts after test_real_stack.py on purpose: that module's order (the corrupt-model job
before any prompt has loaded the VAE) must not be disturbed by a prompt from here.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.plugins.realstack import GRAPH, Server
from tests.realstack.cpu_profile import cpu_graph
from xicon_dance.comfy import ComfyClient, Progress
from xicon_dance.context_windows import ContextOptions, windows
from xicon_dance.progress import ProgressReporter

STEPS = 2
SOURCE_FRAMES, SOURCE_FPS = 24, 24.0  # realstack_media's driving clip, placed as the graph's input
FRAMES = 21  # loaded: 24 frames at 24 fps, cap 21 (4n+1)
# A window smaller than the clip (13 pixel frames = 4 latents, overlap 2 latents): the sampler's
# context-window branch on a clip the CPU samples quickly; 2, then 3 windows in the two steps.
CONTEXT = {"context_frames": 13, "context_overlap": 8, "context_stride": 4}


def windowed_graph() -> dict[str, Any]:
    graph = cpu_graph(json.loads(GRAPH.read_text(encoding="utf-8")))
    patch = {
        ("22", "attention_mode"): "sdpa",
        ("362", "render_device"): "cpu",
        ("203", "value"): 256,
        ("204", "value"): 256,
        ("205", "value"): 128,
        ("206", "value"): 128,
        ("349", "steps"): STEPS,
        ("130", "force_rate"): 24,
        ("130", "frame_load_cap"): FRAMES,
        ("139", "frame_rate"): 24,
        ("139", "filename_prefix"): f"windows_{uuid.uuid4().hex[:8]}",
        **{("355", name): value for name, value in CONTEXT.items()},
    }
    for (node, name), value in patch.items():
        graph[node]["inputs"][name] = value
    return graph


async def test_the_samplers_window_reports_match_our_schedule(real_worker: Server) -> None:
    graph = windowed_graph()
    options = ContextOptions.from_graph(graph)
    expected = [len(windows(step, FRAMES, options)) for step in range(STEPS)]
    assert expected == [2, 3]
    seen: list[Progress] = []
    sent: list[dict[str, Any]] = []
    reporter = ProgressReporter({"id": "windows"}, 0.0, sender=lambda j, p: sent.append(p))
    reporter.plan(graph, SOURCE_FRAMES, SOURCE_FPS)

    def on_progress(progress: Progress) -> None:
        seen.append(progress)
        reporter.on_comfy(progress)

    async with ComfyClient(real_worker.comfy_url) as client:
        await client.run(
            graph,
            prompt_id=str(uuid.uuid4()),
            client_id=uuid.uuid4().hex,
            timeout_s=900,
            on_progress=on_progress,
        )
    await reporter.close()
    values = [p.value for p in seen if p.node == "348" and p.total == STEPS]
    print(f"sampler step reports: {values}")
    fractions = [v for v in values if v is not None and v != int(v)]
    assert fractions, f"no window reports: {values}"
    for step, count in enumerate(expected):
        # ComfyUI drops a report within 0.1 s of the last, never a bar's first: each step's
        # first window report is there and names the step's window count
        in_step = sorted({round(v - step, 6) for v in values if step < v < step + 1})
        want = [round(k / count, 6) for k in range(1, count)]
        assert in_step and in_step[0] == want[0] and set(in_step) <= set(want), (step, values)
    other = {p.total for p in seen if p.node == "348" and p.total and p.total != STEPS}
    print(f"other bars of the sampler node count to: {sorted(other)}")
    followed = [
        (s["step"], s["windows"], s["window"])
        for s in sent
        if s["stage"] == "sampling" and s["step"] is not None
    ]
    assert (1, 2, 1) in followed and (2, 3, 1) in followed, followed
    assert followed[-1] == (2, 3, 3), followed
    assert all(s["total"] == STEPS for s in sent if s["step"] is not None), sent
