"""``file_pages.py`` of the project's extension ``xicon_resident_weights`` on a real file mapping
of this process (Linux): the pages of a privately mapped file leave the resident set and come back
with the same bytes when read again; a page the process wrote shows as written, so a caller can
leave its mapping alone; ranges outside the mappings are not touched. The parsers on the kernel's
own text. The extension's use of it with upstream's loader:
``tests/realstack/test_resident_weights.py``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

from tests.plugins.modules import load_file

ROOT = Path(__file__).resolve().parent.parent
fp = load_file(
    ROOT / "stack" / "comfy_extension" / "xicon_resident_weights" / "file_pages.py",
    "xicon_file_pages_under_test",
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc only")

PAGES = 64


@pytest.fixture
def mapped(tmp_path: Path):
    """A 64-page file mapped privately (as safetensors maps a model file), every page read."""
    path = tmp_path / "weights.bin"
    data = os.urandom(PAGES * fp.PAGE)
    path.write_bytes(data)
    with path.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    anchor = ctypes.c_char.from_buffer(mm)
    start = ctypes.addressof(anchor)
    assert bytes(mm[:]) == data  # every page read: all resident
    yield path, mm, start, data
    del anchor
    mm.close()


def resident_kib(path: Path) -> int:
    listed = [m for m in fp.parse_maps(Path("/proc/self/maps").read_text()) if m.path == str(path)]
    fields = fp.parse_smaps(Path("/proc/self/smaps").read_text(), listed)
    return sum(f["Rss"] for f in fields.values())


def test_pages_leave_the_resident_set_and_come_back_unchanged(mapped) -> None:
    path, mm, start, data = mapped
    size_kib = PAGES * fp.PAGE // 1024
    mappings = fp.Mappings.holding([(start + 10, start + 3 * fp.PAGE)])
    assert [m.path for m in mappings.mappings] == [str(path)]
    assert mappings.resident_kib() == resident_kib(path) == size_kib
    assert mappings.written_kib() == 0

    # a range that is not page-aligned: only its whole pages go
    assert mappings.release(start + 10, start + 3 * fp.PAGE + 5) == 2 * fp.PAGE
    assert resident_kib(path) == size_kib - 2 * fp.PAGE // 1024
    assert mappings.release(start + 1, start + fp.PAGE) == 0  # no whole page inside

    rss_before = fp.rss_file_kib()
    assert mappings.release_all() == PAGES * fp.PAGE
    assert resident_kib(path) == 0
    assert fp.rss_file_kib() <= rss_before - (PAGES - 2) * fp.PAGE // 1024

    assert bytes(mm[:]) == data  # read again: mapped in from the file, the same bytes
    assert resident_kib(path) == size_kib


def test_a_written_page_shows_and_ranges_elsewhere_are_left_alone(mapped) -> None:
    path, mm, start, data = mapped
    mappings = fp.Mappings.holding([(start, start + PAGES * fp.PAGE)])
    mm[5 * fp.PAGE] = (data[5 * fp.PAGE] + 1) % 256  # the process's own copy of that page
    assert mappings.written_kib() == fp.PAGE // 1024

    outside = ctypes.create_string_buffer(4 * fp.PAGE)  # anonymous memory, not a mapped file
    address = ctypes.addressof(outside)
    assert not fp.Mappings.holding([(address, address + len(outside))])
    assert mappings.release(address, address + len(outside)) == 0
    # a range running past the mapping's end is not one it holds
    assert mappings.release(start, start + (PAGES + 1) * fp.PAGE) == 0
    assert resident_kib(path) == PAGES * fp.PAGE // 1024


def test_the_parsers_read_the_kernels_text() -> None:
    maps = (
        "55d1c000-55d1e000 r--p 00000000 fd:01 131 /usr/bin/python3.12\n"
        "7f00a000-7f10a000 rw-p 00001000 fe:00 3252290                    /models/a b.safetensors\n"
        "7f20a000-7f20b000 rw-p 00000000 00:00 0 \n"
        "7ffc1000-7ffc2000 rw-p 00000000 00:00 0                          [stack]\n"
    )
    listed = fp.parse_maps(maps)
    assert [(hex(m.start), m.path) for m in listed] == [
        ("0x55d1c000", "/usr/bin/python3.12"),
        ("0x7f00a000", "/models/a b.safetensors"),
    ]
    smaps = (
        maps.splitlines()[0] + "\nSize:                  8 kB\nRss:                   8 kB\n"
        "Anonymous:             0 kB\nVmFlags: rd mr mw me\n"
        + maps.splitlines()[1]
        + "\nSize:            1048576 kB\nRss:              524288 kB\n"
        "Anonymous:             4 kB\nTHPeligible:    0\nVmFlags: rd wr mr mw me ac\n"
    )
    fields = fp.parse_smaps(smaps, listed[1:])
    assert fields == {listed[1]: {"Size": 1048576, "Rss": 524288, "Anonymous": 4, "THPeligible": 0}}
