"""The project's ComfyUI extension ``xicon_memory_limit`` on cgroup trees built in a folder: which
level's limit counts, the memory in use beyond page cache, psutil's figures held to the limit,
and the start-up decision (no limit, a limit, upstream already cgroup-aware). The same code in
the real ComfyUI inside a real memory-limited cgroup: ``tests/realstack/test_memory_limit.py``."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tests.plugins.modules import load_file as load

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "stack" / "comfy_extension" / "xicon_memory_limit"
GIB = 1024**3
HOST_TOTAL = 64 * GIB


cgm = load(EXT / "cgroup_memory.py", "xicon_memory_limit_cgroup_under_test")
pre = load(EXT / "prestartup_script.py", "xicon_memory_limit_under_test")

# psutil's Linux ``svmem`` fields, so ``_replace`` behaves as on the real one.
Svmem = collections.namedtuple(
    "Svmem",
    "total available percent used free active inactive buffers cached shared slab",
)


def host_vm(available: int = 60 * GIB, free: int = 50 * GIB) -> Svmem:
    used = HOST_TOTAL - available
    return Svmem(HOST_TOTAL, available, 6.2, used, free, 1, 2, 3, 4, 5, 6)


class FakePsutil:
    """The one psutil function the extension replaces, answering a fixed host figure."""

    def __init__(self) -> None:
        self.calls = 0

        def virtual_memory() -> Svmem:
            self.calls += 1
            return host_vm()

        self.virtual_memory = virtual_memory


def tree(
    tmp: Path,
    *,
    cgroup: str,
    mounts: list[str],
    files: dict[str, str],
) -> Path:
    """A ``/proc/self`` (``cgroup``, ``mountinfo``) and cgroup files under ``tmp``; mount points
    and file paths are written relative to ``tmp``. Returns the proc folder."""
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [
        "22 1 0:21 / /proc rw,nosuid - proc proc rw",
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755",
    ]
    for i, mount in enumerate(mounts):
        root, point, fstype, options = mount.split(" ")
        lines.append(
            f"{40 + i} 31 0:{40 + i} {root} {tmp}{point} rw,relatime - {fstype} {fstype} {options}"
        )
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    for rel, text in files.items():
        path = tmp / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc


def v2_container(tmp: Path, **files: str) -> Path:
    """Docker with a private cgroup namespace on cgroup v2: the container is the mount's root."""
    base = {"/sys/fs/cgroup/cgroup.procs": "1\n"}
    base.update({f"/sys/fs/cgroup/{k.replace('_', '.', 1)}": v for k, v in files.items()})
    return tree(tmp, cgroup="0::/\n", mounts=["/ /sys/fs/cgroup cgroup2 rw"], files=base)


STAT_V2 = "anon 2147483648\nfile 1610612736\ninactive_file 1073741824\nactive_file 536870912\n"


def test_v2_container_limit_and_memory_in_use(tmp_path: Path) -> None:
    proc = v2_container(
        tmp_path, memory_max=f"{8 * GIB}\n", memory_current=f"{3 * GIB}\n", memory_stat=STAT_V2
    )
    limit = cgm.find_limit(proc)
    assert limit is not None and limit.describe() == "cgroup v2"
    # 3 GiB charged, 1.5 GiB of it page cache on the file LRUs (inactive 1 GiB, active 0.5 GiB)
    assert limit.read() == (8 * GIB, 3 * GIB // 2)


def test_v2_without_a_limit_is_none(tmp_path: Path) -> None:
    proc = v2_container(tmp_path, memory_max="max\n", memory_current=f"{GIB}\n")
    assert cgm.find_limit(proc) is None


def test_v2_nested_the_tightest_level_counts_with_its_own_usage(tmp_path: Path) -> None:
    cg = "/sys/fs/cgroup"
    files = {
        f"{cg}/memory.max": "max\n",
        f"{cg}/pod/memory.max": f"{12 * GIB}\n",
        f"{cg}/pod/memory.current": f"{9 * GIB}\n",
        f"{cg}/pod/memory.stat": "inactive_file 0\n",
        f"{cg}/pod/worker/memory.max": "max\n",
        f"{cg}/pod/worker/memory.current": f"{GIB}\n",
    }
    proc = tree(tmp_path, cgroup="0::/pod/worker\n", mounts=[f"/ {cg} cgroup2 rw"], files=files)
    limit = cgm.find_limit(proc)
    assert limit is not None
    assert limit.read() == (12 * GIB, 9 * GIB)  # the pod's limit, what the pod holds
    # A tighter limit set later on the worker's own level wins, read anew.
    (tmp_path / "sys/fs/cgroup/pod/worker/memory.max").write_text(f"{4 * GIB}\n")
    assert limit.read() == (4 * GIB, GIB)


def test_limit_changes_are_read_on_every_call(tmp_path: Path) -> None:
    proc = v2_container(tmp_path, memory_max=f"{8 * GIB}\n", memory_current="0\n")
    limit = cgm.find_limit(proc)
    (tmp_path / "sys/fs/cgroup/memory.max").write_text(f"{6 * GIB}\n")
    (tmp_path / "sys/fs/cgroup/memory.current").write_text(f"{GIB}\n")
    assert limit.read() == (6 * GIB, GIB)
    (tmp_path / "sys/fs/cgroup/memory.max").write_text("max\n")
    assert limit.read() is None


def test_v1_hybrid_host_as_docker_without_a_cgroup_namespace(tmp_path: Path) -> None:
    """cgroup v1 memory controller beside an empty v2 hierarchy (this layout is common on older
    hosts): /proc/self/cgroup names the path from the hierarchy's root; the level with the
    limit is a parent; 'unlimited' is PAGE_COUNTER_MAX pages."""
    mem = "/sys/fs/cgroup/memory"
    files = {
        f"{mem}/memory.limit_in_bytes": "9223372036854771712\n",
        f"{mem}/docker/memory.limit_in_bytes": f"{16 * GIB}\n",
        f"{mem}/docker/memory.usage_in_bytes": f"{5 * GIB}\n",
        f"{mem}/docker/memory.stat": (
            "cache 1\ninactive_file 7\nactive_file 9\n"
            "total_inactive_file 805306368\ntotal_active_file 268435456\n"
        ),
        f"{mem}/docker/abc/memory.limit_in_bytes": "9223372036854771712\n",
        f"{mem}/docker/abc/memory.usage_in_bytes": f"{GIB}\n",
        "/sys/fs/cgroup/unified/cgroup.procs": "",
    }
    proc = tree(
        tmp_path,
        cgroup="12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n",
        mounts=[
            f"/ {mem} cgroup rw,memory",
            "/ /sys/fs/cgroup/cpu cgroup rw,cpu,cpuacct",
            "/ /sys/fs/cgroup/unified cgroup2 rw",
        ],
        files=files,
    )
    limit = cgm.find_limit(proc)
    assert limit is not None and limit.describe() == "cgroup v1"
    assert limit.read() == (16 * GIB, 4 * GIB)  # the hierarchical total_*_file counts


@pytest.mark.parametrize("mount_root", ["/docker/abc", "/"])
def test_v1_path_not_visible_starts_at_the_mount_point(tmp_path: Path, mount_root: str) -> None:
    """The container sees only its own cgroup at the mount point, while /proc/self/cgroup still
    names the host's path (or the mount's root is that path)."""
    mem = "/sys/fs/cgroup/memory"
    files = {
        f"{mem}/memory.limit_in_bytes": f"{10 * GIB}\n",
        f"{mem}/memory.usage_in_bytes": f"{2 * GIB}\n",
    }
    proc = tree(
        tmp_path,
        cgroup="4:memory:/docker/abc\n",
        mounts=[f"{mount_root} {mem} cgroup rw,memory"],
        files=files,
    )
    assert cgm.find_limit(proc).read() == (10 * GIB, 2 * GIB)


def test_mountinfo_escapes_and_unrelated_mounts(tmp_path: Path) -> None:
    files = {
        "/sys/fs/cg roup/memory.max": f"{GIB}\n",
        "/sys/fs/cg roup/memory.current": "0\n",
        "/sys/fs/other/memory.max": "1\n",
    }
    proc = tree(
        tmp_path,
        cgroup="0::/\n",
        mounts=["/ /sys/fs/cg\\040roup cgroup2 rw", "/ /sys/fs/other cgroup rw,cpu"],
        files=files,
    )
    assert cgm.find_limit(proc).read() == (GIB, 0)


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    assert cgm.find_limit(proc) is None


def test_clamp_holds_total_and_available_to_the_limit() -> None:  # limit 8, in use 3
    vm = cgm.clamp(host_vm(), 8 * GIB, 3 * GIB)
    assert (vm.total, vm.available, vm.used, vm.free) == (8 * GIB, 5 * GIB, 3 * GIB, 5 * GIB)
    assert vm.percent == 37.5 and vm.cached == 4  # the other fields are psutil's own


def test_clamp_keeps_the_smaller_host_figures() -> None:
    vm = cgm.clamp(host_vm(available=2 * GIB, free=GIB), 8 * GIB, 3 * GIB)
    assert (vm.total, vm.available, vm.free) == (8 * GIB, 2 * GIB, GIB)
    over = cgm.clamp(host_vm(), 8 * GIB, 9 * GIB)  # over the limit: nothing left, never negative
    assert (over.available, over.used, over.percent) == (0, 8 * GIB, 100.0)


def test_install_wraps_once_and_follows_the_limit(tmp_path: Path) -> None:
    proc = v2_container(tmp_path, memory_max=f"{8 * GIB}\n", memory_current=f"{GIB}\n")
    ps = FakePsutil()
    limit = cgm.find_limit(proc)
    assert cgm.install(ps, limit) is True
    assert cgm.install(ps, limit) is False  # a second install does not wrap twice
    assert (ps.virtual_memory().total, ps.virtual_memory().available) == (8 * GIB, 7 * GIB)
    (tmp_path / "sys/fs/cgroup/memory.max").write_text("max\n")  # limit lifted: psutil's own
    assert ps.virtual_memory() == host_vm()
    assert ps.calls == 3


def test_start_up_holds_psutil_to_the_limit(tmp_path: Path) -> None:
    proc = v2_container(tmp_path, memory_max=f"{8 * GIB}\n", memory_current=f"{GIB}\n")
    ps = FakePsutil()
    line = pre.main(tmp_path / "ComfyUI", proc, ps)
    assert line.startswith("RAM held to the cgroup v2 limit: 8.0 GiB of the host's 64.0 GiB")
    assert ps.virtual_memory().total == 8 * GIB


def test_start_up_without_a_limit_changes_nothing(tmp_path: Path) -> None:
    proc = v2_container(tmp_path, memory_max="max\n")
    ps = FakePsutil()
    original = ps.virtual_memory
    assert pre.main(tmp_path / "ComfyUI", proc, ps).startswith("no cgroup memory limit")
    assert ps.virtual_memory is original


def test_start_up_with_a_limit_above_the_host_changes_nothing(tmp_path: Path) -> None:
    proc = v2_container(tmp_path, memory_max=f"{128 * GIB}\n")
    ps = FakePsutil()
    original = ps.virtual_memory
    assert "is not below the host's 64.0 GiB" in pre.main(tmp_path / "ComfyUI", proc, ps)
    assert ps.virtual_memory is original


def test_start_up_is_a_no_op_once_comfyui_reads_cgroups_itself(tmp_path: Path) -> None:
    """Upstream's fix (after v0.33.0) adds comfy/system_memory.py; then this does nothing."""
    proc = v2_container(tmp_path, memory_max=f"{8 * GIB}\n")
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "comfy" / "system_memory.py").write_text("")
    ps = FakePsutil()
    original = ps.virtual_memory
    assert "reads cgroup memory limits itself" in pre.main(comfy, proc, ps)
    assert ps.virtual_memory is original
