"""What a worker process holds, read from /proc: for the fault matrix (tests/realstack) and the
soak benchmark (bench/soak.py), which compare it before and after jobs.

- ``usage(pid, comfy_port) -> Usage``: non-socket fds, sockets, TCP connections to ComfyUI,
  threads, resident memory and the remote ports of the established TCP connections;
  ``drained_usage`` the same once no connection to ComfyUI is left (idle keep-alives close
  after 15 s); ``own_sockets`` leaves out the SDK's connections to the platform.
- Python threads by name: a process started with ``thread_dump_env(folder)`` dumps them on
  SIGUSR1 (``python_threads``); ``thread_growth`` lists threads that grew, allowing asyncio's
  default executor up to its bound (``EXECUTOR_MAX``).
- ``leftovers(base)``: job folders and files left in a ComfyUI base's input, output and temp.
- ``children(pid)``, ``alive(pid)``; ``wait_until(what, check, timeout_s)`` polls a condition.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.plugins.runpod_worker_api import FakePlatform

DRAIN_S = 60.0  # idle keep-alive connections to ComfyUI close after aiohttp's 15 s
POLL_S = 0.2
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Usage:
    """What the handler process holds: non-socket fds, sockets, TCP connections to ComfyUI,
    threads, resident memory, the remote port of each established TCP connection (``peers``)
    and of each TCP socket in any state but listening (``remotes``: a connection being opened
    or closed has one too)."""

    fds: int
    sockets: int
    comfy_connections: int
    threads: int
    rss_kb: int
    peers: tuple[int, ...] = ()
    remotes: tuple[int, ...] = ()


def _socket_inodes(pid: int) -> tuple[int, set[str]]:
    other, inodes = 0, set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listing
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
        else:
            other += 1
    return other, inodes


def _remote_ports(inodes: set[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Remote ports among these socket inodes' TCP sockets: of the established connections, and
    of every socket that is not listening (one being opened or closed included)."""
    established, remotes = [], []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[9] not in inodes or cols[3] == TCP_LISTEN:
                    continue
                port = int(cols[2].rsplit(":", 1)[1], 16)
                remotes.append(port)
                if cols[3] == TCP_ESTABLISHED:
                    established.append(port)
    return tuple(sorted(established)), tuple(sorted(remotes))


def usage(pid: int, comfy_port: int) -> Usage:
    other, inodes = _socket_inodes(pid)
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    peers, remotes = _remote_ports(inodes)
    return Usage(other, len(inodes), peers.count(comfy_port), threads, rss, peers, remotes)


def drained_usage(pid: int, comfy_port: int) -> Usage:
    """Usage once the handler holds no connection to ComfyUI: a websocket left open (ComfyUI
    never closes one, the client pings it every 30 s) would hold it forever, pooled HTTP
    connections close after 15 s idle."""
    deadline = time.monotonic() + DRAIN_S
    while (now := usage(pid, comfy_port)).comfy_connections and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return now


# A sitecustomize for the handler under test (PYTHONPATH): on SIGUSR1 it writes the names of the
# process's Python threads to $XICON_THREAD_DUMP. Python 3.11 does not name OS threads, so /proc
# alone cannot tell a pool thread from a leaked one.
THREAD_DUMP_HOOK = """
import json, os, signal, threading
def _dump(signum, frame):
    path = os.environ["XICON_THREAD_DUMP"]
    with open(path + ".part", "w") as fh:
        json.dump(sorted(t.name for t in threading.enumerate()), fh)
    os.replace(path + ".part", path)
if os.environ.get("XICON_THREAD_DUMP"):
    signal.signal(signal.SIGUSR1, _dump)
"""
# asyncio's default executor (``asyncio.to_thread``, DNS lookups) starts threads named
# ``asyncio_<n>`` lazily, one more whenever all are busy, up to this many; idle ones stay.
EXECUTOR_MAX = min(32, (os.cpu_count() or 1) + 4)


def thread_dump_env(folder: Path) -> dict[str, str]:
    """Environment that loads ``THREAD_DUMP_HOOK`` into a Python process started with it."""
    hook = folder / "thread-dump-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(THREAD_DUMP_HOOK, "utf-8")
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "XICON_THREAD_DUMP": str(folder / "threads.json")}


def python_threads(pid: int, folder: Path) -> dict[str, int]:
    """The Python threads of ``pid`` (started with ``thread_dump_env(folder)``) by name, digits
    folded: ``{"MainThread": 1, "asyncio_N": 3, ...}``."""
    dump = folder / "threads.json"
    dump.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    wait_until("the handler's thread list", dump.is_file, 30)
    names = json.loads(dump.read_text("utf-8"))
    return dict(sorted(Counter(re.sub(r"\d+", "N", name) for name in names).items()))


def thread_growth(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Threads that are more than ``before`` had, except the default executor's bounded pool."""
    grown = [
        f"{name}: {before.get(name, 0)} -> {count}"
        for name, count in after.items()
        if name != "asyncio_N" and count > before.get(name, 0)
    ]
    if after.get("asyncio_N", 0) > EXECUTOR_MAX:
        grown.append(f"asyncio_N: {after['asyncio_N']} > the pool's {EXECUTOR_MAX}")
    return grown


def leftovers(base: Path) -> list[str]:
    """Job folders and files the worker or ComfyUI left in the input, output and temp folders."""
    found = []
    jobs = base / "input" / "jobs"
    if jobs.is_dir():
        found += [f"input/jobs/{p.name}" for p in jobs.iterdir()]
    for sub in ("output", "temp"):
        root = base / sub
        if root.is_dir():
            found += [str(p.relative_to(base)) for p in root.rglob("*") if p.is_file()]
    return sorted(found)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def platform_port(platform: FakePlatform) -> int:
    return int(platform.url.rsplit(":", 1)[1])


def own_sockets(used: Usage, platform_port: int) -> int:
    """Sockets other than the SDK's connections to the platform (its job-take and job-stop
    long polls and result posts come and go on their own schedule, so one may be opening or
    closing when the process is read)."""
    return used.sockets - used.remotes.count(platform_port)


def wait_until(
    what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = POLL_S
) -> Any:
    """``check()``'s first true answer, polled every ``poll_s``; AssertionError past the limit."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(poll_s)
    return found
