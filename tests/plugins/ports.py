"""Loopback ports for test servers that start in another process a moment after the port is
chosen.

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, the same range
every outgoing connection takes its local port from; between choosing it and the server's bind,
any connection (a download, a poll, another test's client) may take it, and the server then fails
with "Address already in use" (seen once in CI: a worker started by the entrypoint while the
entrypoint's model download was opening connections). ``server_port`` chooses below the
ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``), where no connection takes its local
port, and checks the port is free now; ``offset`` asks for ``port + offset`` free and below the
range too (SeaweedFS listens on its port + 10000 for gRPC).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000


def ephemeral_low(range_file: Path = RANGE_FILE) -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def server_port(offset: int = 0, *, range_file: Path = RANGE_FILE, tries: int = 200) -> int:
    """A free loopback port (and ``port + offset``) below the ephemeral range; where that range
    leaves no room, a kernel-chosen one (the old behaviour)."""
    top = ephemeral_low(range_file) - 1 - offset
    if top > LOWEST:
        for _ in range(tries):
            port = random.randint(LOWEST, top)
            if _free(port) and (offset == 0 or _free(port + offset)):
                return port
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + offset <= 65_535 and (offset == 0 or _free(port + offset)):
            return port
    raise RuntimeError("no free loopback port found")
