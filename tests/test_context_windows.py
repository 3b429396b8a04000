"""Context windows per sampler step, as WanVideoWrapper's sampler schedules them (checked against
the pinned pack's own code in tests/realstack/test_context_windows.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xicon_dance.context_windows import (
    ContextOptions,
    SamplingPlan,
    latent_frames,
    loaded_frames,
    windows,
)

GRAPH = Path(__file__).resolve().parent.parent / "XiCON_Dance_SCAIL_vFinal.json"
STEPS = 6  # the graph's scheduler


@pytest.mark.parametrize(
    ("frames", "overlap", "counts"),
    [
        (241, 48, (6, 7)),
        (961, 48, (26, 27)),
        (1441, 48, (39, 40)),
        (241, 16, (4, 5)),
        (961, 16, (14, 16)),
        (1441, 16, (21, 23)),
    ],
)
def test_windows_per_step_of_long_clips(frames: int, overlap: int, counts: tuple[int, int]) -> None:
    """81-frame windows, stride 4, uniform_standard: the windows shift from step to step, so
    their number varies by one or two (fewest and most over the graph's six steps)."""
    options = ContextOptions(frames=81, stride=4, overlap=overlap, schedule="uniform_standard")
    got = [len(windows(step, frames, options)) for step in range(STEPS)]
    assert (min(got), max(got)) == counts


@pytest.mark.parametrize("frames", [241, 961, 1441])
@pytest.mark.parametrize("overlap", [16, 48])
def test_every_latent_frame_is_in_a_window_of_the_right_size(frames: int, overlap: int) -> None:
    options = ContextOptions(frames=81, stride=4, overlap=overlap)
    for step in range(STEPS):
        got = windows(step, frames, options)
        assert {i for w in got for i in w} == set(range(latent_frames(frames)))
        assert all(len(w) == 21 and w == sorted(w) for w in got)
        assert len({tuple(w) for w in got}) == len(got)


def test_short_clips_run_one_window() -> None:
    options = ContextOptions()
    assert windows(0, 9, options) == [list(range(3))]  # shorter than a window: context off
    assert windows(3, 81, options) == [list(range(21))]  # exactly one window
    assert len(windows(0, 85, options)) == 2
    assert windows(0, 241, None) == [list(range(61))]


def test_static_and_looped_schedules() -> None:
    static = ContextOptions(overlap=48, schedule="static_standard")
    assert [w[0] for w in windows(0, 241, static)] == [0, 9, 18, 27, 36, 40]
    assert windows(0, 241, static) == windows(5, 241, static)  # the same every step
    looped = ContextOptions(overlap=48, schedule="uniform_looped")
    assert any(w != sorted(w) for w in windows(1, 241, looped))  # wraps around the clip
    assert windows(0, 241, ContextOptions(schedule="no_such_schedule")) == []


def test_options_from_the_graph_and_the_loaded_frames() -> None:
    graph = json.loads(GRAPH.read_text())
    assert ContextOptions.from_graph(graph) == ContextOptions(81, 4, 48, "uniform_standard")
    assert ContextOptions.from_graph({"1": {"class_type": "LoadImage", "inputs": {}}}) is None
    linked = {
        "355": {"class_type": "WanVideoContextOptions", "inputs": {"context_frames": ["1", 0]}}
    }
    assert ContextOptions.from_graph(linked) is None
    # 12 frames at 8 fps resampled to 10 fps: 15, then 4n+1 (the job test's clip)
    assert loaded_frames(12, 8.0, 10.0, 81) == 13
    assert loaded_frames(3000, 30.0, 16.0, 961) == 961
    assert loaded_frames(100, 25.0, 0.0, 0) == 97


def test_plan_counts_windows_before_a_step() -> None:
    plan = SamplingPlan(961, ContextOptions(overlap=48))
    per_step = [plan.windows_at(i) for i in range(STEPS)]
    assert plan.windows_before(0) == 0
    assert plan.windows_before(STEPS) == sum(per_step)
    assert plan.windows_before(2) == per_step[0] + per_step[1]
