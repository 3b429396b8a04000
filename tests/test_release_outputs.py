"""The project's extension ``xicon_release_outputs`` without ComfyUI: its threshold setting and
when it declines to install. What it does inside the real ComfyUI:
``tests/realstack/test_release_outputs.py``."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.modules import load_file

ROOT = Path(__file__).resolve().parent.parent
ro = load_file(
    ROOT / "stack" / "comfy_extension" / "xicon_release_outputs" / "release_outputs.py",
    "xicon_release_outputs_under_test",
)
MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, 64 * MIB),
        ("", 64 * MIB),
        ("  ", 64 * MIB),
        ("100", 100 * MIB),
        ("0.5", MIB // 2),
        ("0", None),
        ("off", None),
        ("OFF", None),
    ],
)
def test_threshold_from_env(raw: str | None, expected: int | None) -> None:
    env = {} if raw is None else {ro.ENV: raw}
    assert ro.threshold_from_env(env) == expected


@pytest.mark.parametrize("raw", ["lots", "-5", "nan", "inf"])
def test_a_bad_threshold_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=ro.ENV):
        ro.threshold_from_env({ro.ENV: raw})


def stand_ins(ram_release: Any) -> tuple[types.ModuleType, types.ModuleType, list[str]]:
    """Modules shaped like ComfyUI's ``comfy_execution.graph`` and ``.caching``."""
    calls: list[str] = []

    class ExecutionList:
        def complete_node_execution(self) -> str:
            calls.append("upstream")
            return "done"

    class RAMPressureCache:
        pass

    RAMPressureCache.ram_release = ram_release  # type: ignore[attr-defined]
    graph = types.ModuleType("graph")
    graph.ExecutionList = ExecutionList  # type: ignore[attr-defined]
    caching = types.ModuleType("caching")
    caching.RAMPressureCache = RAMPressureCache  # type: ignore[attr-defined]
    return graph, caching, calls


def upstream_ram_release(self, target, free_active=False, min_entry_size=0):
    return 0


def test_install_wraps_once_and_upstream_still_runs() -> None:
    graph, caching, calls = stand_ins(upstream_ram_release)
    assert "released once their node has finished" in ro.install(graph, caching, 64 * MIB)
    assert ro.install(graph, caching, 64 * MIB) == "already installed"
    # another cache type (--cache-classic etc.): upstream's method runs, nothing is released
    execution_list = graph.ExecutionList()
    execution_list.output_cache = object()
    assert execution_list.complete_node_execution() == "done"
    assert calls == ["upstream"]


def test_a_changed_upstream_is_left_alone() -> None:
    def ram_release(self, target, free_active=False):
        return 0

    graph, caching, _ = stand_ins(ram_release)
    original = graph.ExecutionList.complete_node_execution
    assert ro.install(graph, caching, 64 * MIB).startswith("not installed: ")
    assert graph.ExecutionList.complete_node_execution is original
    del caching.RAMPressureCache
    assert ro.install(graph, caching, 64 * MIB).startswith("not installed: ")


def test_off_installs_nothing() -> None:
    graph, caching, _ = stand_ins(upstream_ram_release)
    original = graph.ExecutionList.complete_node_execution
    assert ro.install(graph, caching, None).startswith("off (")
    assert graph.ExecutionList.complete_node_execution is original
