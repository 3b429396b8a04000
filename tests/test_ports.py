"""The test servers' port choice (tests/plugins/ports.py): below the ephemeral range, free now."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.plugins.ports import LOWEST, ephemeral_low, server_port


def _range(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    return path


def test_ports_come_from_below_the_ephemeral_range(tmp_path: Path) -> None:
    rng = _range(tmp_path, "32768\t60999\n")
    assert ephemeral_low(rng) == 32_768
    for _ in range(50):
        port = server_port(range_file=rng)
        assert LOWEST <= port < 32_768
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when returned


def test_an_offset_port_is_below_the_range_and_free_too(tmp_path: Path) -> None:
    rng = _range(tmp_path, "32768 60999")
    for _ in range(20):
        port = server_port(offset=10_000, range_file=rng)
        assert port >= LOWEST and port + 10_000 < 32_768


def test_a_taken_port_is_never_returned(tmp_path: Path) -> None:
    rng = _range(tmp_path, f"{LOWEST + 3} 60999")  # room for three ports only: LOWEST .. +2
    held = []
    for port in (LOWEST, LOWEST + 1):
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        held.append(s)
    try:
        assert {server_port(range_file=rng) for _ in range(20)} == {LOWEST + 2}
    finally:
        for s in held:
            s.close()


def test_without_room_below_the_range_the_kernel_chooses(tmp_path: Path) -> None:
    rng = _range(tmp_path, "1024 65535")
    port = server_port(range_file=rng)
    assert 1024 <= port <= 65_535
    assert ephemeral_low(tmp_path / "missing") == 32_768
