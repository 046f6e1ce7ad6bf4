"""Where recordings are kept: a local directory (``[recording] store = "file:///DIR"``).

Blocking file I/O: called from the recorder's writer thread and, for the admin API, through
``asyncio.to_thread``. Each recording is two files in the directory:

- ``ID.cprec`` (``ID.cprec.part`` while it is written): the recording (recording_format.py),
  written append-only, one chunk per write; fsynced at segment ends and when it is closed.
- ``ID.json``: what the admin API lists and filters on (VM, user, client IP, times, size, state),
  rewritten (atomically, by rename) when the recording starts and when it ends.

An ID is ``YYYYMMDDTHHMMSSZ-`` and 16 hex digits: it sorts by time and is safe as a file name; any
other ID is refused before a path is built (``check_id``).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from consoleproxy.atomicfile import write_atomic
from consoleproxy.errors import ConsoleProxyError
from consoleproxy.recordings import recording_format as fmt

__all__ = [
    "BadRecordingId", "BadStoreURL", "FileStore", "check_file", "check_id", "matches", "new_id",
    "parse_store",
]

_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}$")
SUFFIX, PART = ".cprec", ".cprec.part"


class BadRecordingId(ConsoleProxyError):
    """Not the form of a recording ID (so never a file name)."""


class BadStoreURL(ValueError):
    """``[recording] store`` is not ``file:///DIR`` or ``s3://BUCKET/PREFIX``."""


@dataclass(frozen=True)
class StoreURL:
    scheme: str  # "file" or "s3"
    path: str  # the directory, or the bucket
    prefix: str = ""


def parse_store(url: str) -> StoreURL:
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            raise BadStoreURL(f"file:///DIR with an absolute directory, got {url!r}")
        return StoreURL("file", parts.path)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise BadStoreURL(f"s3://BUCKET/PREFIX names a bucket, got {url!r}")
        return StoreURL("s3", parts.netloc, parts.path.strip("/"))
    raise BadStoreURL(f"file:///DIR or s3://BUCKET/PREFIX, got {url!r}")


def new_id(now: float | None = None) -> str:
    t = time.gmtime(time.time() if now is None else now)
    return time.strftime("%Y%m%dT%H%M%SZ", t) + "-" + secrets.token_hex(8)


def check_id(rid: str) -> str:
    if not isinstance(rid, str) or not _ID.match(rid):
        raise BadRecordingId(f"not a recording ID: {rid[:40]!r} (expected YYYYMMDDTHHMMSSZ-16 hex digits)")
    return rid


class FileStore:
    """Recordings in one directory (created 0700 when missing)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def ensure(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def part_path(self, rid: str) -> Path:
        return self.dir / (check_id(rid) + PART)

    def path(self, rid: str) -> Path:
        """The finished recording's file, else the one being written."""
        done = self.dir / (check_id(rid) + SUFFIX)
        return done if done.exists() else self.part_path(rid)

    def meta_path(self, rid: str) -> Path:
        return self.dir / (check_id(rid) + ".json")

    # -- writing (the writer thread) -----------------------------------------------------------

    def create(self, rid: str, head: bytes, meta: dict[str, Any]) -> int:
        """Create the recording (exclusively, 0600) with its header; returns the open file."""
        fd, _ = self.open_new(rid, meta, direct=False)
        os.write(fd, head)
        return fd

    def open_new(self, rid: str, meta: dict[str, Any], *, direct: bool) -> tuple[int, bool]:
        """Create the recording's file (exclusively, 0600), empty; with ``direct``, with O_DIRECT
        where the file system has it (then the caller writes whole aligned blocks). Returns the
        file and whether it is direct."""
        self.write_meta(rid, meta)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(self.part_path(rid), flags | os.O_DIRECT, 0o600), True
            except OSError:  # EINVAL: tmpfs and others have no O_DIRECT
                pass
        return os.open(self.part_path(rid), flags | os.O_APPEND, 0o600), False

    def finish(self, rid: str, fd: int, meta: dict[str, Any]) -> None:
        os.fsync(fd)
        os.close(fd)
        os.replace(self.part_path(rid), self.dir / (rid + SUFFIX))
        self.write_meta(rid, meta)

    def write_meta(self, rid: str, meta: dict[str, Any]) -> None:
        # 0600 from the first byte, like the recording; not fsynced (the recording is, at finish).
        write_atomic(self.meta_path(rid), json.dumps(meta, sort_keys=True).encode(), fsync=False)

    # -- reading (the admin API, the CLI) ------------------------------------------------------

    def ids(self) -> Iterator[str]:
        for p in sorted(self.dir.glob("*.json")):
            if _ID.match(p.stem):
                yield p.stem

    def meta(self, rid: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.meta_path(rid).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        path = self.path(rid)
        try:
            data["size"] = path.stat().st_size
        except FileNotFoundError:
            return None
        return data

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for rid in self.ids():
            m = self.meta(rid)
            if m is not None:
                out.append(m)
        return out

    def delete(self, rid: str) -> bool:
        found = False
        for p in (self.dir / (check_id(rid) + SUFFIX), self.part_path(rid), self.meta_path(rid)):
            try:
                p.unlink()
                found = True
            except FileNotFoundError:
                pass
        return found

    def expire(self, *, max_age_days: float, max_total_bytes: int, now: float | None = None) -> list[str]:
        """Delete finished recordings older than ``max_age_days`` (0 = keep), then the oldest
        until the rest fit ``max_total_bytes`` (0 = no cap). Returns the IDs deleted."""
        now = time.time() if now is None else now
        done: list[tuple[str, float, int]] = []
        for rid in self.ids():
            m = self.meta(rid)
            if m is None or m.get("state") == "recording":
                continue
            done.append((rid, float(m.get("started", 0)), int(m.get("size", 0))))
        deleted = []
        total = sum(size for _, _, size in done)
        for rid, started, size in sorted(done, key=lambda x: x[1]):
            too_old = max_age_days > 0 and now - started > max_age_days * 86400
            too_big = max_total_bytes > 0 and total > max_total_bytes
            if not (too_old or too_big):
                continue
            self.delete(rid)
            total -= size
            deleted.append(rid)
        return deleted


def check_file(path: Path) -> fmt.Index:
    """Check a finished recording on disk (mapped, not read into memory); RecordingCorrupt."""
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            return fmt.scan(b"")
        with mapped, memoryview(mapped) as view:
            return fmt.scan(view)


def matches(meta: dict[str, Any], filters: dict[str, str]) -> bool:
    """The admin API's filters: vm, user, client_ip, resume_id (exact: a console's recordings
    across its resumes), since / until (Unix times)."""
    for key in ("vm", "user", "client_ip", "resume_id"):
        want = filters.get(key)
        if want and str(meta.get(key) or "") != want:
            return False
    started = float(meta.get("started", 0))
    if "since" in filters and started < float(filters["since"]):
        return False
    return not ("until" in filters and started > float(filters["until"]))
