"""write_atomic: the one file writer (keyrings, secret keys, certificate bundles, records, metadata)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from consoleproxy.atomicfile import write_atomic


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_the_bytes_with_the_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    write_atomic(target, b"secret")
    assert target.read_bytes() == b"secret"
    assert mode_of(target) == 0o600
    public = tmp_path / "chain.pem"
    write_atomic(public, b"cert", mode=0o644)
    assert mode_of(public) == 0o644 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.pem", "key.pem"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_replaces_an_existing_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "keyring.json"
    target.write_bytes(b"old contents, longer than the new")
    target.chmod(0o644)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o600  # the new file's mode, not the old one's


def test_the_temporary_is_in_the_same_directory_and_created_with_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[Path, int]] = []
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append((Path(src), mode_of(Path(src))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "f", b"x")
    [(tmp, mode)] = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".f.") and tmp.name.endswith(".tmp")
    assert mode == 0o600


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[:3])  # a write(2) may take less than it was given

    monkeypatch.setattr(os, "write", write)
    write_atomic(tmp_path / "f", b"0123456789")
    assert (tmp_path / "f").read_bytes() == b"0123456789"


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_before_the_rename_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_atomic(tmp_path / "f", b"x", fsync=fsync)
    assert events == (["fsync", "replace"] if fsync else ["replace"])


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_an_error_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def fail(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_missing_directory_is_an_error_not_a_silent_creation(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "f", b"x")
