"""The recordings' writer thread: every recording's chunks appended to the store, in order.

Split from recording.py (the relay's hook and the manager): this is the only code that touches
the disk. Chunks are appended with O_DIRECT where the file system has it (``_Open``), from the
recorders' own page-aligned buffers when they are aligned (no copy) or through one staging
buffer; each recording is fsynced every ``SEGMENT_BYTES`` ("segment end") and when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from consoleproxy.recordings import recording_format as fmt
from consoleproxy.recordings.recording_store import FileStore

if TYPE_CHECKING:
    from consoleproxy.recordings.recording import Buffer, Recorder

__all__ = ["ALIGN", "SEGMENT_BYTES", "STAGE_BYTES", "RecordingWriter", "page_buffer"]

log = logging.getLogger("consoleproxy.recording")

# The writer fsyncs a recording each time this much more of it is written ("segment end").
# Each fsync costs the disk a journal commit: every 16 MiB this disk (ext4) took 0.42 GiB/s of
# O_DIRECT chunks, every 64 MiB 0.53 (the stream fell behind less often). The data blocks are
# already written (O_DIRECT); a crash between fsyncs can lose the file's last size update.
SEGMENT_BYTES = 64 * 1024 * 1024

class RecordingWriter:
    """One thread per proxy writes every recording's chunks to the store, in order."""

    def __init__(
        self,
        store: FileStore,
        *,
        on_written: Callable[[Recorder, int, Buffer], None],
        on_failed: Callable[[Recorder, str], None],
        on_closed: Callable[[Recorder, dict[str, Any]], None],
    ) -> None:
        self.store = store
        self._q: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._loop = asyncio.get_running_loop()
        self._on_written = on_written
        self._on_failed = on_failed
        self._on_closed = on_closed
        self._thread = threading.Thread(target=self._run, name="consoleproxy-recorder", daemon=True)
        self._files: dict[str, _Open] = {}
        self.direct = True  # O_DIRECT where the file system has it (see _Open)
        self.direct_bytes = 0  # of closed recordings, written from recorders' buffers (no copy)
        self._stage = _Stage()
        self._thread.start()

    def open(self, rec: Recorder, meta: dict[str, Any]) -> None:
        self._q.put(("open", rec, meta))

    def append(self, rec: Recorder, buf: Buffer, length: int, first_ms: int, start: int = 0) -> None:
        """Write ``buf[start:start + length]`` as one chunk; ``on_written`` gives ``buf`` back
        afterwards."""
        self._q.put(("append", rec, buf, length, first_ms, start))

    def incomplete(self, rec: Recorder, reason: str) -> None:
        self._q.put(("incomplete", rec, reason))

    def close(self, rec: Recorder, end_ms: int) -> None:
        self._q.put(("close", rec, end_ms, list(rec.keyframes), list(rec.seek_points)))

    def stop(self) -> None:
        """Finish what was queued, then end the thread (blocking)."""
        self._q.put(None)
        self._thread.join()

    # -- the thread ----------------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the proxy is gone
            pass

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            op, rec = job[0], job[1]
            try:
                getattr(self, "_" + op)(rec, *job[2:])
            except OSError as exc:
                f = self._files.get(rec.rid)
                if f is not None:
                    f.failed = f"writing failed: {exc.strerror or exc}"
                log.warning("recording %s: %s: %s", rec.rid, op, exc)
                self._call(self._on_failed, rec, f"writing failed: {exc.strerror or exc}")

    def _open(self, rec: Recorder, meta: dict[str, Any]) -> None:
        self.store.ensure()
        head = fmt.header(meta)
        fd, direct = self.store.open_new(rec.rid, {**meta, "state": "recording"}, direct=self.direct)
        f = self._files[rec.rid] = _Open(fd, 0, meta, direct, self._stage)
        f.emit(head)

    def _append(self, rec: Recorder, buf: Buffer, n: int, first_ms: int, start: int = 0) -> None:
        f = self._files.get(rec.rid)
        try:
            if f is None or f.failed or f.incomplete:
                return
            with memoryview(buf)[start : start + n] as payload:  # released before buf goes back
                head = fmt.chunk_header(payload, first_ms)
                f.index.chunks.append((f.size, first_ms))
                f.emit(head, payload, aligned_at=start if isinstance(buf, mmap.mmap) else None)
            f.unsynced += len(head) + n
            if f.unsynced >= SEGMENT_BYTES:
                os.fsync(f.fd)
                f.unsynced = 0
        finally:
            self._call(self._on_written, rec, n, buf)

    def _incomplete(self, rec: Recorder, reason: str) -> None:
        f = self._files.get(rec.rid)
        if f is not None:
            f.incomplete = reason

    def _close(
        self, rec: Recorder, end_ms: int, keyframes: list[int], seek_points: list[fmt.Keyframe]
    ) -> None:
        f = self._files.pop(rec.rid, None)
        if f is None:
            return
        self.direct_bytes += f.direct_bytes
        idx = f.index
        idx.keyframes = keyframes
        idx.seek_points = seek_points
        idx.end_ms = end_ms
        reason = f.failed or f.incomplete
        idx.complete = reason is None
        idx.incomplete_reason = reason
        meta = {
            **f.meta,
            "state": "complete" if reason is None else "incomplete",
            "ended": time.time(),
            "duration_ms": end_ms,
            "incomplete_reason": reason,
            "keyframes": len(keyframes),
        }
        try:
            if not f.failed:
                f.emit(fmt.end(idx))
                f.drain()
            self.store.finish(rec.rid, f.fd, meta)
        finally:
            self._call(self._on_closed, rec, meta)


# O_DIRECT writes go in whole blocks of this size, from the writer's one page-aligned stage.
ALIGN = 4096
STAGE_BYTES = 4 * 1024 * 1024


def page_buffer(size: int, *, huge: bool = True) -> mmap.mmap:
    """A page-aligned buffer for O_DIRECT writes: a private anonymous map, in 2 MiB pages where
    the kernel has them (Linux puts a map whose size is a whole number of 2 MiB on a 2 MiB
    boundary, so callers use such sizes).

    Why: each O_DIRECT write pins every page it covers. Writing 1 GiB from 4 KiB pages cost this
    machine's kernel 0.066-0.115 CPU s (262,144 pages pinned), from 2 MiB pages 0.019-0.023, and
    the disk took 0.48-0.58 GiB/s instead of 0.25-0.42 (``bench/recording_writes.py``, three
    runs). Python's default map is shared (shmem), slower to fault in and not in huge pages.
    """
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Without huge: 4 KiB pages even where THP is "always" (a byte touched costs 4 KiB, not 2 MiB).
    advice = "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE"
    with contextlib.suppress(AttributeError, OSError):  # no THP here: 4 KiB pages, still right
        buf.madvise(getattr(mmap, advice))
    return buf


class _Stage:
    """The writer thread's page-aligned staging buffer, shared by every file it writes."""

    def __init__(self) -> None:
        self.buf: mmap.mmap | None = None

    def view(self) -> memoryview:
        if self.buf is None:
            # 4 KiB pages: it carries few bytes (small chunks, the edges of big ones), and a
            # huge page is all faulted in at once (4 MiB held by an idle proxy).
            self.buf = page_buffer(STAGE_BYTES, huge=False)
        return memoryview(self.buf)


class _Open:
    """A recording's file in the writer thread.

    With O_DIRECT (``direct``) the bytes go from the page-aligned stage straight to the device in
    whole blocks; a file's last partial block (under 4 KiB) waits, as bytes, for its next chunk or
    its end. Appending through the page cache cost this machine's kernel 0.9-1.3 CPU s per GiB
    (new pages allocated, zeroed and copied); O_DIRECT about 0.07. Without O_DIRECT (tmpfs), one
    writev(2) per chunk.
    """

    __slots__ = (
        "direct", "direct_bytes", "failed", "fd", "incomplete", "index", "meta", "size", "stage", "tail",
        "unsynced",
    )

    def __init__(
        self, fd: int, size: int, meta: dict[str, Any], direct: bool = False, stage: _Stage | None = None
    ) -> None:
        self.fd = fd
        self.size = size  # bytes of the recording so far (written or waiting in ``tail``)
        self.unsynced = 0
        self.meta = meta
        self.index = fmt.Index(header=meta)
        self.failed: str | None = None
        self.incomplete: str | None = None
        self.direct = direct
        self.stage = stage if stage is not None else _Stage()
        self.tail = b""  # direct: bytes after the last whole block, not written yet
        self.direct_bytes = 0  # written straight from a recorder's buffer (no stage copy)

    def emit(self, *parts: bytes | bytearray | memoryview, aligned_at: int | None = None) -> None:
        """Append ``parts``. With ``aligned_at`` the last part lies in page-aligned memory (an
        mmap) from that offset of it: with O_DIRECT its whole blocks are written from there,
        only the bytes before the first (and the last partial one) pass through the stage."""
        self.size += sum(len(p) for p in parts)
        if not self.direct:
            _write_all(self.fd, *parts)  # one writev(2), the buffer not copied
            return
        if aligned_at is not None:
            last = memoryview(parts[-1])
            k = -aligned_at % ALIGN  # bytes of ``last`` before an aligned address
            if (self.size - len(last) + k) % ALIGN == 0 and len(last) - k >= ALIGN:
                self._staged(*parts[:-1], last[:k])  # ends on a block: leaves no tail
                whole = (len(last) - k) // ALIGN * ALIGN
                self._write(last[k : k + whole])
                self.direct_bytes += whole
                self.tail = bytes(last[k + whole :])
                return
        self._staged(*parts)

    def _staged(self, *parts: bytes | bytearray | memoryview) -> None:
        """Write the tail and ``parts`` in whole blocks through the stage; keep the rest as tail."""
        view = self.stage.view()
        try:
            used = len(self.tail)
            view[:used] = self.tail
            for part in parts:
                data = memoryview(part)
                while data:
                    k = min(len(data), STAGE_BYTES - used)
                    view[used : used + k] = data[:k]
                    used += k
                    data = data[k:]
                    if used == STAGE_BYTES:
                        self._write(view[:used])
                        used = 0
            whole = used // ALIGN * ALIGN
            if whole:
                self._write(view[:whole])
            self.tail = bytes(view[whole:used])
        finally:
            view.release()

    def _write(self, block: memoryview) -> None:
        try:
            _write_all(self.fd, block)
        except OSError:
            self._buffered()  # O_DIRECT refused (the device's alignment rules): as usual
            _write_all(self.fd, block)

    def _buffered(self) -> None:
        self.direct = False
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)

    def drain(self) -> None:
        """Write the last partial block (through the page cache: O_DIRECT needs whole blocks)."""
        if self.direct:
            self._buffered()
        tail, self.tail = self.tail, b""
        if tail:
            _write_all(self.fd, tail)


def _write_all(fd: int, *parts: bytes | bytearray | memoryview) -> None:
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
