"""The benchmark's step profiler (bench/comfy_nodes/xicon_bench_profile) with the stack's torch.

It runs in the stack's Python (torch 2.11, CPU here): a module named like the pinned
WanVideoWrapper transformer is called five times, with a nested call inside one of them; only the
chosen calls are profiled, each to a table and a JSON of figures. The class name the profiler
waits for is checked against the pinned pack's source.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from tests.plugins.realstack import Stack

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "bench" / "comfy_nodes" / "xicon_bench_profile" / "__init__.py"

# Every script starts by loading the file given as its argument as the module ``mod``.
PREAMBLE = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("under_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
"""

SCRIPT = """
class WanModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)
        self.inner = None

    def forward(self, x):
        q = self.proj(x)
        x = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        if self.inner is not None:
            x = self.inner(x)
        return torch.nn.functional.layer_norm(x, (64,))

outer, inner = WanModel(), WanModel()
x = torch.randn(1, 4, 256, 64)
for k in range(5):
    outer.inner = inner if k == 1 else None
    outer(x)
print(mod.PROFILER.count)
"""


def run_script(
    stack: Stack, body: str, module: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``body`` in the stack's Python (CPU only) after ``PREAMBLE`` has loaded ``module``."""
    done = subprocess.run(
        [str(stack.python), "-c", PREAMBLE + body, str(module)],
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_chosen_forwards_are_profiled_and_summarised(stack: Stack, tmp_path: Path) -> None:
    source = (
        stack.comfy_dir / "custom_nodes" / "ComfyUI-WanVideoWrapper" / "wanvideo" / "modules"
    ) / "model.py"
    target = re.search(r'^TARGET = "(\w+)"', NODE.read_text(encoding="utf-8"), re.M)
    assert target is not None
    assert re.search(rf"^class {target.group(1)}\(", source.read_text(encoding="utf-8"), re.M)

    out = tmp_path / "profile"
    env = {**os.environ, "XICON_BENCH_PROFILE_DIR": str(out), "XICON_BENCH_PROFILE_CALLS": "2,4"}
    done = run_script(stack, SCRIPT, NODE, env)
    assert done.stdout.strip().splitlines()[-1] == "5"  # the nested call was not counted
    assert sorted(p.name for p in out.iterdir()) == [
        "call2.json",
        "call2.txt",
        "call4.json",
        "call4.txt",
    ]
    for call in (2, 4):
        figures = json.loads((out / f"call{call}.json").read_text())
        assert figures["call"] == call
        assert figures["device"] == "cpu"
        assert figures["wall_ms"] > 0 and figures["busy_ms"] > 0
        names = [row["name"] for row in figures["top"]]
        assert any("linear" in n or "addmm" in n for n in names), names
        classes = {row["class"] for row in figures["top"]}
        assert "gemm" in classes
        assert abs(sum(figures["by_class_ms"].values()) - figures["busy_ms"]) < 0.05
        assert "Self CPU" in (out / f"call{call}.txt").read_text()
    # the nested call of call 2 ran inside the profiled forward: its linear shows twice
    two = json.loads((out / "call2.json").read_text())
    four = json.loads((out / "call4.json").read_text())
    assert max(r["calls"] for r in two["top"] if r["class"] == "gemm") > max(
        r["calls"] for r in four["top"] if r["class"] == "gemm"
    )


def test_without_its_variables_the_profiler_does_nothing(stack: Stack) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XICON_BENCH_PROFILE_DIR", "XICON_BENCH_PROFILE_CALLS")
    }
    done = run_script(stack, "print(mod.PROFILER)", NODE, env)
    assert done.stdout.strip() == "None"


CENSUS_SCRIPT = """
class Big(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(1024, 1024)  # 4 MiB + bias
        self.register_buffer("table", torch.zeros(256, 1024))  # 1 MiB

model = Big()
loose = torch.zeros(512, 1024)  # 2 MiB that no module owns
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode() as fake_mode:
    fake = torch.empty(4096, 4096)  # what torch.compile traces with: 64 MiB it does not hold
assert fake.fake_mode is fake_mode
print(json.dumps(mod.census("cpu")))
print(mod.add_route())
"""


def test_the_census_names_modules_and_loose_tensors(stack: Stack) -> None:
    done = run_script(stack, CENSUS_SCRIPT, NODE.parent / "census.py", dict(os.environ))
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-2])
    assert lines[-1] == "False"  # outside ComfyUI there is no server to add a route to
    big = [row for row in figures["modules"] if row["class"] == "Big"]
    assert big == [{"class": "Big", "mib": 5.0}]  # its child Linear is not counted again
    assert not any(row["class"] == "Linear" for row in figures["modules"])
    assert {"shape": [512, 1024], "dtype": "float32", "mib": 2.0} in figures["loose"]
    assert figures["loose_total_mib"] >= 2.0
    assert [4096, 4096] not in [row["shape"] for row in figures["loose"]]  # the fake tensor
    assert figures["loose_total_mib"] < 64
    assert (figures["allocated_mib"], figures["device"]) == (0.0, "cpu")
