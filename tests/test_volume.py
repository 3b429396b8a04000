"""Inputs from the network volume (``xicon_dance.volume``): what may be read, and the swaps
between the check and the open that must be refused. The hostile corpus (tests/hostile_cases.py)
has the plain refusals; here are the good paths and the races, made deterministic by doing the
swap inside the check-then-open sequence."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from xicon_dance import volume
from xicon_dance.errors import InputError
from xicon_dance.settings import Settings

DATA = b"\x89PNG pretend image bytes " * 100


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "volume"
    (path / "inputs").mkdir(parents=True)
    (path / "inputs" / "ref.png").write_bytes(DATA)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "ref.png").write_bytes(b"outside bytes")
    return path


def settings_for(root: Path | None) -> Settings:
    return dataclasses.replace(Settings(), volume_root=root)


def copy(root: Path | None, value: str, dest: Path, cap: int = 10**6) -> int:
    return volume.copy_from_volume(settings_for(root), value, dest, cap, "image_path")


def refused(root: Path | None, value: str, dest: Path) -> InputError:
    with pytest.raises(InputError) as info:
        copy(root, value, dest)
    assert info.value.field == "image_path" and info.value.message.startswith("image_path: ")
    return info.value


@pytest.mark.parametrize("form", ["relative", "absolute", "through_root_link", "inner_link"])
def test_good_paths_are_copied(form: str, root: Path, tmp_path: Path) -> None:
    value, used_root = "inputs/ref.png", root
    if form == "absolute":
        value = str(root / "inputs" / "ref.png")
    elif form == "through_root_link":  # the mount point itself is a symlink
        used_root = tmp_path / "mnt"
        used_root.symlink_to(root, target_is_directory=True)
        value = str(used_root / "inputs" / "ref.png")
    elif form == "inner_link":  # a link that stays inside the volume is fine
        (root / "latest.png").symlink_to(root / "inputs" / "ref.png")
        value = "latest.png"
    dest = tmp_path / "job" / "reference.part"
    dest.parent.mkdir()
    assert copy(used_root, value, dest) == len(DATA)
    assert dest.read_bytes() == DATA
    assert not dest.is_symlink() and os.stat(dest).st_nlink == 1, "a copy, never a link"


def test_no_mounted_volume_and_paths_off(tmp_path: Path) -> None:
    err = refused(tmp_path / "not-mounted", "a.png", tmp_path / "d")
    assert err.code == "path_not_found" and "no network volume is mounted" in err.message
    err = refused(None, "a.png", tmp_path / "d")
    assert err.code == "path_forbidden" and "VOLUME_ROOT=off" in err.message


def test_a_file_used_as_a_folder_is_not_found(root: Path, tmp_path: Path) -> None:
    err = refused(root, "inputs/ref.png/more.png", tmp_path / "d")
    assert err.code == "path_not_found" and "does not exist" in err.message


def test_the_root_itself_is_not_a_file(root: Path, tmp_path: Path) -> None:
    assert refused(root, str(root), tmp_path / "d").code == "path_not_file"
    assert refused(root, "inputs", tmp_path / "d").code == "path_not_file"


def test_a_device_node_is_refused(root: Path, tmp_path: Path) -> None:
    try:
        os.mknod(root / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    err = refused(root, "null.png", tmp_path / "d")
    assert err.code == "path_not_file" and "character device" in err.message
    assert not (tmp_path / "d").exists()


def test_file_swapped_for_a_link_after_the_check_is_refused(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked as a regular file, then replaced by a symlink leading out before the open:
    O_NOFOLLOW makes the open fail instead of following it."""
    real_lstat = volume._lstat

    def lstat_then_swap(real: str, value: str, field: str) -> os.stat_result:
        info = real_lstat(real, value, field)
        os.unlink(real)
        os.symlink(tmp_path / "outside" / "ref.png", real)
        return info

    monkeypatch.setattr(volume, "_lstat", lstat_then_swap)
    err = refused(root, "inputs/ref.png", tmp_path / "d")
    assert err.code == "path_forbidden" and "symbolic link" in err.message
    assert not (tmp_path / "d").exists()


def test_folder_swapped_for_a_link_after_the_check_is_refused(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder above the file becomes a link to a folder outside that holds a file of the
    same name: the opened file is not the checked one, and lies outside the volume."""
    real_lstat = volume._lstat

    def lstat_then_swap(real: str, value: str, field: str) -> os.stat_result:
        info = real_lstat(real, value, field)
        os.rename(root / "inputs", root / "moved")
        (root / "inputs").symlink_to(tmp_path / "outside", target_is_directory=True)
        return info

    monkeypatch.setattr(volume, "_lstat", lstat_then_swap)
    err = refused(root, "inputs/ref.png", tmp_path / "d")
    assert err.code == "path_forbidden" and "replaced" in err.message
    assert not (tmp_path / "d").exists()


def test_a_file_growing_past_the_cap_while_copied_is_cut_off(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = volume._copy
    cap = len(DATA) + 10

    def grow_then_copy(fd: int, *args: object) -> int:
        with (root / "inputs" / "ref.png").open("ab") as fh:
            fh.write(b"x" * 100)
        return real_copy(fd, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(volume, "_copy", grow_then_copy)
    with pytest.raises(InputError) as info:
        copy(root, "inputs/ref.png", tmp_path / "d", cap=cap)
    assert info.value.code == "too_large" and "grew" in info.value.message


def test_a_stopped_job_abandons_the_copy(root: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(volume.CopyStopped):
        volume.copy_from_volume(
            settings_for(root), "inputs/ref.png", tmp_path / "d", 10**6, "image_path", stop
        )


def test_an_unreadable_file_is_refused(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker runs as root, so permissions never refuse it: the open's EACCES is injected."""

    real_open = os.open
    target = str(root / "inputs" / "ref.png")

    def denied(path: str, flags: int, *args: int) -> int:
        if path == target:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(volume.os, "open", denied)
    err = refused(root, "inputs/ref.png", tmp_path / "d")
    assert err.code == "path_forbidden" and "permission denied" in err.message
