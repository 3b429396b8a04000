"""Pages of a memory-mapped file that the process no longer reads, taken out of its resident set.

Why: ComfyUI's ``load_torch_file`` (v0.33.0 ``comfy/utils.py`` ~L133-139) opens a ``.safetensors``
file with ``safetensors.safe_open``, which maps the whole file into the process (one private,
file-backed mapping) and gives out tensors that are views of that mapping. Every page a reader
touches then counts in the process's resident set (``RssFile``) for as long as the mapping lives,
read once or read every job alike.

What: ``Mappings.holding(ranges)`` finds the file-backed mappings (``/proc/self/maps``) that hold
the given address ranges; ``release(start, end)`` calls ``madvise(MADV_DONTNEED)`` on the whole
pages inside a range. Those pages leave the resident set and stay in the page cache; a later read of
the same addresses maps them in again from the file, with the same bytes. That holds only for pages
nobody wrote: in a private mapping a written page is the process's own copy (``Anonymous`` in
``/proc/self/smaps``), which ``MADV_DONTNEED`` would throw away, so ``Mappings.written_kib`` is
read first and a caller leaves a mapping with any such page alone. Linux only; elsewhere
``supported()`` is False and nothing is released.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MADV_DONTNEED = 4  # linux/mman.h
PAGE = mmap.PAGESIZE
PROC = Path("/proc/self")


@dataclass(frozen=True)
class Mapping:
    """One file-backed mapping: ``[start, end)`` of the address space, the file's path."""

    start: int
    end: int
    path: str

    def holds(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end


def supported() -> bool:
    return sys.platform.startswith("linux") and (PROC / "maps").exists()


def parse_maps(text: str) -> list[Mapping]:
    """The file-backed mappings listed in ``/proc/<pid>/maps`` text (anonymous, ``[heap]``,
    ``[stack]`` and the like left out)."""
    out = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(v, 16) for v in fields[0].split("-"))
            out.append(Mapping(start, end, fields[5]))
    return out


def parse_smaps(text: str, wanted: Iterable[Mapping]) -> dict[Mapping, dict[str, int]]:
    """For each of ``wanted``, its ``/proc/<pid>/smaps`` fields in KiB (``Rss``, ``Anonymous``)."""
    by_start = {m.start: m for m in wanted}
    out: dict[Mapping, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            start = int(head.split("-")[0], 16)
            mapping = by_start.get(start)
            current = out.setdefault(mapping, {}) if mapping is not None else None
        elif current is not None and head.endswith(":"):
            value = line.split()[1:2]
            if value and value[0].isdigit():
                current[head[:-1]] = int(value[0])
    return out


class Mappings:
    """The file-backed mappings that hold some address ranges (e.g. a state dict's tensors)."""

    def __init__(self, mappings: Iterable[Mapping]) -> None:
        self.mappings = tuple(sorted(set(mappings), key=lambda m: m.start))

    @classmethod
    def holding(cls, ranges: Iterable[tuple[int, int]]) -> Mappings:
        listed = sorted(parse_maps((PROC / "maps").read_text()), key=lambda m: m.start)
        starts = [m.start for m in listed]
        found = set()
        for start, end in ranges:
            i = bisect.bisect_right(starts, start) - 1  # mappings do not overlap
            if i >= 0 and listed[i].holds(start, end):
                found.add(listed[i])
        return cls(found)

    def __bool__(self) -> bool:
        return bool(self.mappings)

    def holds(self, start: int, end: int) -> bool:
        return any(m.holds(start, end) for m in self.mappings)

    def fields(self) -> dict[Mapping, dict[str, int]]:
        return parse_smaps((PROC / "smaps").read_text(), self.mappings)

    def written_kib(self) -> int:
        """KiB of these mappings that the process has written (its own copies, not the file's)."""
        return sum(f.get("Anonymous", 0) for f in self.fields().values())

    def resident_kib(self) -> int:
        return sum(f.get("Rss", 0) for f in self.fields().values())

    def paths(self) -> list[str]:
        return sorted({m.path for m in self.mappings})

    def mapped_bytes(self) -> int:
        return sum(m.end - m.start for m in self.mappings)

    def release(self, start: int, end: int) -> int:
        """Release the whole pages of ``[start, end)`` when one of these mappings holds it; the
        bytes advised (0 when none is a whole page or no mapping here holds the range)."""
        if not self.holds(start, end):
            return 0
        return release(start, end)

    def release_all(self) -> int:
        return sum(release(m.start, m.end) for m in self.mappings)


_madvise = None


def release(start: int, end: int) -> int:
    """``madvise(MADV_DONTNEED)`` on the whole pages inside ``[start, end)``; the bytes advised.
    Raises ``OSError`` when the kernel refuses."""
    global _madvise
    first = -(-start // PAGE) * PAGE
    last = end // PAGE * PAGE
    if last <= first:
        return 0
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        _madvise = libc.madvise
    if _madvise(first, last - first, MADV_DONTNEED) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"madvise(MADV_DONTNEED) failed: errno {errno}")
    return last - first


def rss_file_kib() -> int:
    """The process's ``RssFile`` (``/proc/self/status``), KiB; 0 where it cannot be read."""
    try:
        for line in (PROC / "status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
