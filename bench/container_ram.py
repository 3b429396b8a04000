"""ComfyUI in a container's RAM, with and without the project's extension ``xicon_memory_limit``.

Starts the real ComfyUI v0.33.0 on the CPU inside a real memory cgroup (``--limit-gib``, default
4) and runs one prompt of core nodes whose cached results add up to 2 GiB more than that
(``tests/plugins/pressure.py``), once with the extension and once without. Prints per run: the RAM
ComfyUI reports, what became of the prompt, the kernel's peak charge for the cgroup, the most
memory the cgroup held beyond page cache (``memory.stat`` sampled every 20 ms: usage minus the
file LRU lists, what the extension calls "in use") and the kernel's ``oom_kill`` count.

Needs the stack (``XICON_STACK_HOME``, as for the real-stack tests) and permission to create a
memory cgroup (root on a writable cgroup hierarchy)::

    python bench/container_ram.py [--limit-gib 4]

Say on what machine it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.plugins import pressure  # noqa: E402
from tests.plugins.cgroups import CGROUP_MEMORY as CGROUP_MEMORY_FILE  # noqa: E402
from tests.plugins.cgroups import MemoryCgroup, memory_cgroup  # noqa: E402
from tests.plugins.comfy import stop_process  # noqa: E402
from tests.plugins.modules import load_file  # noqa: E402
from tests.plugins.realstack import Stack, get, make_base  # noqa: E402

GIB = 1024**3
EXTENSION = "xicon_memory_limit"
CGROUP_MEMORY = load_file(CGROUP_MEMORY_FILE, "xicon_memory_limit_cgroup_bench")


def in_use(group: MemoryCgroup) -> int:
    """Usage minus page cache on the file LRU lists: the extension's own reading."""
    return CGROUP_MEMORY.Level(group.path, group.version).in_use()


def run(stack: Stack, tmp: Path, limit: int, with_extension: bool) -> str:
    base = make_base(stack, tmp / "comfy", packs={EXTENSION} if with_extension else set())
    (base / "custom_nodes").mkdir(exist_ok=True)
    with memory_cgroup(limit, prefix="xicon-bench") as group:
        proc, url = pressure.start_in(group, stack, base, tmp / "comfyui.log")
        most = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                with contextlib.suppress(OSError, ValueError):  # the cgroup going away
                    most[0] = max(most[0], in_use(group))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            total = json.loads(get(f"{url}/system_stats"))["system"]["ram_total"]
            result = pressure.outcome(url, proc, pressure.submit(url))
        finally:
            done.set()
            sampler.join()
            stop_process(proc)
        peak, kills = group.peak(), group.oom_kills()
    label = "with xicon_memory_limit" if with_extension else "without"
    peak_text = "n/a" if peak is None else f"{peak / GIB:.2f} GiB"
    return (
        f"{label:24s} ComfyUI reports {total / GIB:5.1f} GiB  prompt: {result:8s} "
        f"cgroup peak {peak_text}  most in use {most[0] / GIB:.2f} GiB  oom_kill {kills}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit-gib", type=float, default=pressure.LIMIT / GIB)
    args = p.parse_args(argv)
    home = os.environ.get("XICON_STACK_HOME")
    if not home:
        print("XICON_STACK_HOME is not set: install the stack (stack/install.py) first")
        return 2
    limit = int(args.limit_gib * GIB)
    results = (pressure.INVERSIONS + 1) * pressure.IMAGE_BYTES
    print(f"cgroup limit {limit / GIB:.2f} GiB; the prompt's results {results / GIB:.2f} GiB")
    stack = Stack(Path(home))
    for with_extension in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            print(run(stack, Path(tmp), limit, with_extension), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
