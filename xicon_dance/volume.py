"""Job inputs from the endpoint's network volume (``image_path`` / ``video_path``).

RunPod mounts an endpoint's network volume at ``/runpod-volume``; a caller whose files are too
large to send puts them there and passes their path. This module reads such a file safely.

Contract:
- ``copy_from_volume(settings, value, dest, max_bytes, field, stop=None) -> int`` copies the
  file ``value`` names into ``dest`` (a file in the job folder) and returns its byte count. It
  blocks: run it in the job folder's thread (``JobFolder.run``). Every refusal is an
  ``InputError`` naming ``field`` and the reason.
- ``value`` is relative to ``settings.volume_root`` (``VOLUME_ROOT``, default
  ``/runpod-volume``) or absolute under it. ``volume_root`` None (``VOLUME_ROOT=off``): path
  inputs are refused (``path_forbidden``).

Rules, in order:
1. A ``..`` component is refused outright (``path_forbidden``), whatever it resolves to.
2. The real path (every symlink resolved, the root's own included) must lie inside the root's
   real path: an absolute path elsewhere or a symlink leading out is ``path_forbidden``.
3. Missing -> ``path_not_found``. A directory, FIFO, socket, character or block device (anything
   but a regular file) -> ``path_not_file``, checked with ``lstat`` before opening (a FIFO is
   never opened, so nothing blocks on it).
4. The file is opened by its real path with ``O_NOFOLLOW | O_NONBLOCK``; the opened descriptor's
   ``fstat`` must be the regular file checked in 3 (same device and inode), and its path as the
   kernel reports it (``/proc/self/fd``, where present) must still lie inside the root. A swap
   of the file, or of a folder above it, between the check and the open is thereby refused.
5. Size over ``max_bytes`` (``MAX_IMAGE_BYTES`` / ``MAX_VIDEO_BYTES``) -> ``too_large``, checked
   on ``fstat`` and again while copying (a file growing meanwhile is cut off, not trusted).
6. The bytes are copied (never linked: the checked content is the content used, even if the
   caller rewrites the file during the job). ``stop`` set (the job ended) abandons the copy.
The content checks (image decode, video probe) follow in ``media`` as for URLs.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from pathlib import Path, PurePosixPath

from .download import too_large
from .errors import InputError
from .settings import Settings

log = logging.getLogger(__name__)

COPY_CHUNK = 4 * 1024 * 1024
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


class CopyStopped(Exception):
    """The copy gave up because its job ended (``stop`` was set); nobody reads its result."""


def copy_from_volume(
    settings: Settings,
    value: str,
    dest: Path,
    max_bytes: int,
    field: str,
    stop: threading.Event | None = None,
) -> int:
    """Copy the volume file ``value`` into ``dest`` under the rules of the module doc."""
    root = settings.volume_root
    if root is None:
        raise _forbidden(field, "path inputs are turned off on this worker (VOLUME_ROOT=off)")
    real_root = os.path.realpath(root)
    if not os.path.isdir(real_root):
        raise InputError(
            f"{field}: no network volume is mounted at {root} on this worker (VOLUME_ROOT).",
            field=field,
            code="path_not_found",
        )
    real = _resolve(value, Path(root), real_root, field)
    before = _lstat(real, value, field)
    fd = _open(real, value, field)
    try:
        _check_opened(fd, before, real_root, value, field)
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise too_large(field, max_bytes, f"the file has {size} bytes")
        copied = _copy(fd, dest, max_bytes, field, stop)
    finally:
        os.close(fd)
    log.info("%s: copied %d bytes from the network volume", field, copied)
    return copied


def _resolve(value: str, root: Path, real_root: str, field: str) -> str:
    given = PurePosixPath(value)
    if ".." in given.parts:
        raise _forbidden(field, "the path must not contain '..'")
    candidate = given if given.is_absolute() else PurePosixPath(root) / given
    real = os.path.realpath(candidate)
    if not _inside(real, real_root):
        where = "leads outside" if _has_link(candidate) else "is not on"
        raise _forbidden(field, f"{_shown(value)} {where} the network volume ({root})")
    return real


def _has_link(path: PurePosixPath) -> bool:
    """Whether any existing component of ``path`` is a symbolic link (for the message only)."""
    current = PurePosixPath(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        if os.path.islink(current):
            return True
    return False


def _inside(real: str, real_root: str) -> bool:
    return os.path.commonpath([real, real_root]) == real_root


def _not_found(field: str, value: str) -> InputError:
    return InputError(
        f"{field}: {_shown(value)} does not exist on the network volume.",
        field=field,
        code="path_not_found",
    )


def _lstat(real: str, value: str, field: str) -> os.stat_result:
    try:
        info = os.lstat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise _not_found(field, value) from None
    except OSError as exc:
        raise _unreadable(field, value, exc) from None
    _require_regular(info, value, field)
    return info


def _open(real: str, value: str, field: str) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(real, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise _not_found(field, value) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the file became a symlink after the check
            raise _forbidden(field, f"{_shown(value)} changed into a symbolic link") from None
        raise _unreadable(field, value, exc) from None


def _check_opened(fd: int, before: os.stat_result, real_root: str, value: str, field: str) -> None:
    info = os.fstat(fd)
    _require_regular(info, value, field)
    if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
        raise _forbidden(field, f"{_shown(value)} was replaced while it was being opened")
    proc = f"/proc/self/fd/{fd}"
    if os.path.islink(proc) and not _inside(os.readlink(proc), real_root):
        raise _forbidden(field, f"{_shown(value)} leads outside the network volume")


def _require_regular(info: os.stat_result, value: str, field: str) -> None:
    if stat.S_ISREG(info.st_mode):
        return
    kind = next((label for test, label in _KINDS if test(info.st_mode)), "not a regular file")
    raise InputError(
        f"{field}: {_shown(value)} is {kind}, not a regular file.",
        field=field,
        code="path_not_file",
    )


def _copy(fd: int, dest: Path, max_bytes: int, field: str, stop: threading.Event | None) -> int:
    total = 0
    with dest.open("wb") as out:
        while True:
            if stop is not None and stop.is_set():
                raise CopyStopped("the job ended; copy abandoned")
            chunk = os.read(fd, COPY_CHUNK)
            if not chunk:
                return total
            total += len(chunk)
            if total > max_bytes:
                raise too_large(field, max_bytes, "the file grew past it while it was copied")
            out.write(chunk)


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _forbidden(field: str, why: str) -> InputError:
    return InputError(f"{field}: refused: {why}.", field=field, code="path_forbidden")


def _unreadable(field: str, value: str, exc: OSError) -> InputError:
    reason = exc.strerror or type(exc).__name__
    return InputError(
        f"{field}: {_shown(value)} cannot be read on the network volume ({reason.lower()}).",
        field=field,
        code="path_forbidden",
    )
