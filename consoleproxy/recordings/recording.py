"""Recording consoles: the relay's hook (``Recorder``) and the proxy's manager (the writer thread is
recording_writer.py).

Cost on the relay's hot path: with recording off, one ``is None`` check per read (relay.py). With
it on, each read is copied into a pooled buffer behind a 9-byte record header (the relay's read
buffer is shared and reused at once); a full buffer (``FLUSH_BYTES``), or one older than
``FLUSH_SECONDS`` (the manager's tick), is handed whole to one writer thread per proxy, which adds
the chunk header and checksum and appends it to the file (O_DIRECT where possible, see ``_Open``).
Nothing on the event loop waits for the disk: when a recording's bytes not yet written exceed
``MAX_BACKLOG`` (a slow or stuck disk), that recording stops ("incomplete", counted and logged)
and its console goes on unrecorded.

Memory per recorded console: the ``Recorder`` (slots), an empty buffer while idle, and its input
observer, the client-message filter (rfb_messages.ClientMessageFilter). No task, no timer, no open file
object: the writer thread keeps each recording's file descriptor.

No reference cycle with the relay or the session: the relay holds its recorder; the recorder holds
neither (the filter it observes through points back to it until ``close``, which breaks that link).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from consoleproxy.recordings import recording_format as fmt
from consoleproxy.recordings.recording_policy import input_record
from consoleproxy.recordings.recording_store import FileStore, new_id
from consoleproxy.recordings.recording_writer import ALIGN, RecordingWriter, page_buffer

if TYPE_CHECKING:
    from consoleproxy.metrics import Metrics
    from consoleproxy.net.relay import Relay
    from consoleproxy.policy.sessions import Session
    from consoleproxy.protocol.rfb_messages import ClientMessageFilter
    from consoleproxy.recordings.recording_s3 import S3Store

__all__ = [
    "BUFFER_BYTES", "FLUSH_BYTES", "FLUSH_SECONDS", "LARGE_BUFFER_BYTES", "MAX_BACKLOG",
    "MEDIUM_BUFFER_BYTES", "BufferPool", "Recorder", "RecordingWriter", "Recordings",
]

log = logging.getLogger("consoleproxy.recording")

# The relay reads straight into a console's buffer (no copy) once a read is this big: it streams.
STREAMING_READ = 64 * 1024
# Room lent for one such read: the relay's read size (relay.READ_SIZE).
READ_BYTES = 1024 * 1024
# Size of the pooled big buffers, a streaming console's: a whole number of 2 MiB pages
# (recording_writer.page_buffer). Each chunk costs the writer thread the same, whatever its size
# (a queue hand-off, system calls, the GIL taken back): per GiB recorded, 4 MiB chunks cost it
# 0.08-0.10 CPU s, 8 MiB 0.05-0.06, 16 MiB 0.013-0.03 (a console paced at 200 MiB/s, as in
# bench/recording_bench.py, the writer thread's CPU from /proc).
BUFFER_BYTES = 16 * 1024 * 1024
# A console's buffer is handed to the writer at this size (or sooner: the next record would not
# fit). Below it there is room for one more of the relay's reads, its record header, and the
# offset of up to a block where a big buffer's records start (Recorder._room).
FLUSH_BYTES = BUFFER_BYTES - READ_BYTES - 64 * 1024
SMALL_BUFFER_BYTES = 4 * 1024
MEDIUM_BUFFER_BYTES = 64 * 1024
# A busy console's (more than a medium buffer in a tick): 4 KiB pages, touched only as written,
# so a console sending 100 KB a second holds about that, not a 2 MiB page.
LARGE_BUFFER_BYTES = 2 * 1024 * 1024
# A buffer is also handed over when its oldest byte is this old: a crash loses at most about this
# much of a console.
FLUSH_SECONDS = 1.0
# Bytes of one recording handed to the writer and not yet written; past it the recording stops.
# Four big chunks: a console streaming 200 MB/s rides out a 300 ms stall of the disk (a journal
# commit); with two, 2 of 9 such recordings here ended incomplete on a disk that takes 0.4 GiB/s.
MAX_BACKLOG = 64 * 1024 * 1024
# Free pooled buffers not needed for this long are given back (BufferPool.trim).
TRIM_SECONDS = 30.0

_FBUR = struct.Struct(">BBHHHH")
# A console's record buffer: big ones are page-aligned anonymous maps (BufferPool.get).
Buffer = bytearray | mmap.mmap
_DOWN_HEADER = struct.Struct(">BII")
RECORD_HEADER = _DOWN_HEADER.size


class BufferPool:
    """Buffers in four sizes shared by every recorder of the proxy, reused once written.

    A console's records go into one of these (no growing, no fresh pages per read); the writer
    hands it back when written. Fresh pages are what recording costs most: faulting in and
    zeroing a new buffer for each chunk cost 0.5 CPU s per GiB here, reusing one nothing (the
    kernel reads into it). So up to ``keep`` free big buffers are kept: as many as one streaming
    console has in flight when the disk is behind (``MAX_BACKLOG``). Those the last ``trim``
    interval did not need are given back (``trim``, every ``TRIM_SECONDS``).

    The sizes follow what a console sends in a tick (Recorder._grow): small and medium
    bytearrays for an idle console's few records; large page-aligned maps (4 KiB pages, touched
    as written) for a busy one; big ones in 2 MiB pages (``page_buffer``) for a stream, whose
    reads go straight into them and from there to the disk with O_DIRECT.
    """

    def __init__(
        self,
        size: int = BUFFER_BYTES,
        keep: int = 0,
        small: int = SMALL_BUFFER_BYTES,
        medium: int = MEDIUM_BUFFER_BYTES,
        large: int = LARGE_BUFFER_BYTES,
    ) -> None:
        self.size = size
        self.small = small
        self.medium = medium
        self.large = large
        self.keep = keep or MAX_BACKLOG // FLUSH_BYTES + 2
        self._free: list[Buffer] = []  # big
        self._free_large: list[Buffer] = []
        self._free_small: list[Buffer] = []
        self._free_medium: list[Buffer] = []
        self._held: list[Buffer] = []  # maps a transport still had a view of (put)
        self._unused = self._unused_large = 0  # fewest free since the last trim: not needed

    def trim(self) -> None:
        """Give back the large and big buffers no console needed since the last call."""
        del self._free[: self._unused]
        del self._free_large[: self._unused_large]
        self._unused, self._unused_large = len(self._free), len(self._free_large)
        self._held.clear()  # those still viewed are the transports' (freed with the last view)

    def get(self, need: int) -> Buffer:
        """The smallest buffer that holds ``need`` bytes (the big one if none does)."""
        if need <= self.small:
            return self._free_small.pop() if self._free_small else bytearray(self.small)
        if need <= self.medium:
            return self._free_medium.pop() if self._free_medium else bytearray(self.medium)
        # Large and big ones are page-aligned: the writer sends their whole blocks to the disk
        # from where they lie (O_DIRECT, _Open.emit).
        large = need <= self.large
        free = self._free_large if large else self._free
        if not free and self._held:
            held, self._held = self._held, []
            for buf in held:
                self.put(buf)
        if not free:
            return page_buffer(self.large, huge=False) if large else page_buffer(self.size)
        buf = free.pop()
        if large:
            self._unused_large = min(self._unused_large, len(free))
        else:
            self._unused = min(self._unused, len(free))
        return buf

    def put(self, buf: Buffer) -> None:
        try:
            # Neither grows while a view of it lives: a transport that kept unsent bytes read into
            # it (Recorder.read_buffer) still has one. Such a buffer is not reused now.
            if isinstance(buf, mmap.mmap):
                buf.resize(len(buf))
            else:
                buf.append(0)
                del buf[-1]
        except BufferError:
            # A browser's transport still holds unsent bytes read into it: a map is tried again
            # when one is needed (a fresh big one costs its pages: 2% of a stream's CPU).
            if isinstance(buf, mmap.mmap) and len(self._held) < self.keep:
                self._held.append(buf)
            return
        n = len(buf)
        if isinstance(buf, mmap.mmap):
            if n == self.size and len(self._free) < self.keep:
                self._free.append(buf)
            elif n == self.large and len(self._free_large) < 16:
                self._free_large.append(buf)
        elif n == self.small and len(self._free_small) < 64:
            self._free_small.append(buf)
        elif n == self.medium and len(self._free_medium) < 64:
            self._free_medium.append(buf)


class Recorder:
    """One console's recording: ``down`` (relay.py) and ``input`` (the filter's observer) append
    records to a pooled buffer; ``flush`` hands it to the writer."""

    __slots__ = (
        "_buf", "_first_ms", "_grow", "_lent", "_pool", "_pos", "_start", "_tick_mark", "_writer",
        "backlog", "bytes",
        "closed", "down_total", "file_pos", "filter", "height", "incomplete_reason", "keyframe_due",
        "keyframe_pending", "keyframes", "keys", "last_read", "rid", "seek_points", "t0", "width",
    )

    def __init__(
        self, rid: str, writer: RecordingWriter, keys: str, keyframe_due: float, pool: BufferPool
    ) -> None:
        self.rid = rid
        self._writer = writer
        self._pool = pool
        self.keys = keys
        self.t0 = time.monotonic()
        self._buf: Buffer | None = None  # taken from the pool while records wait in it
        self._pos = 0
        self._start = 0  # where in _buf its records start (see _room)
        # The least size of the next buffer: what the console sent down in the last tick, or one
        # more than the last buffer when that filled before a tick flushed it.
        self._grow = 0
        self._tick_mark = 0  # down_total at the last tick
        self.file_pos = 0  # the file's size once everything handed to the writer is written
        self._lent = False  # read_buffer lent the relay the room behind _pos
        self.last_read = 0  # bytes of the last read down (read_buffer: does the console stream?)
        self._first_ms = 0
        self.backlog = 0  # bytes handed to the writer, not yet written
        self.bytes = 0  # bytes handed to the writer in all
        self.closed = False
        self.incomplete_reason: str | None = None
        self.filter: ClientMessageFilter | None = None
        self.keyframe_due = keyframe_due
        self.keyframe_pending = False  # the browser's next incremental request becomes a full one
        self.keyframes: list[int] = []
        self.seek_points: list[fmt.Keyframe] = []
        self.down_total = 0  # DOWN bytes so far: a keyframe's offset
        self.width = self.height = 0

    def _ms(self) -> int:
        return int((time.monotonic() - self.t0) * 1000)

    def _room(self, need: int, ms: int) -> Buffer | None:
        """A buffer with ``need`` bytes free (None: the record does not fit any buffer)."""
        buf = self._buf
        if buf is not None and self._pos + need > len(buf):
            self._filled()
            buf = None
        if need > self._pool.size:
            return None
        if buf is None:
            buf = self._buf = self._pool.get(max(need, self._grow))
            # In a big (page-aligned) buffer the records start where the chunk's payload will be
            # in the file, modulo a block: its blocks can go to the disk without a copy (_Open).
            self._pos = self._start = (
                (self.file_pos + fmt.CHUNK_HEADER) % ALIGN if isinstance(buf, mmap.mmap) else 0
            )
            self._first_ms = ms
        return buf

    def read_buffer(self) -> memoryview | None:
        """Room for the relay's next read of the VNC socket, right behind a record header in this
        console's buffer: the bytes are read where they are recorded, and ``down`` copies nothing.

        Only while the console streams (its last read was big, ``STREAMING_READ``, or its records
        already fill big buffers): an idle console's few small reads go on being copied into
        small buffers (a big buffer for every console's read would cost megabytes each). None:
        read elsewhere.
        """
        self._lent = False
        if self.incomplete_reason is not None or self.closed:
            return None
        if (
            self.last_read < STREAMING_READ
            and self._grow <= self._pool.medium
            and not isinstance(self._buf, mmap.mmap)
        ):
            return None
        buf = self._room(RECORD_HEADER + READ_BYTES, self._ms())
        if buf is None:
            return None
        self._lent = True
        start = self._pos + RECORD_HEADER
        return memoryview(buf)[start : start + READ_BYTES]

    def down(self, data: bytes | memoryview) -> None:
        """Server-to-browser bytes, from the relay's read callback: copied (the relay's buffer is
        shared), or, read into this recorder's buffer (``read_buffer``), only given a header."""
        buf = self._buf
        if self._lent:
            self._lent = False
            if isinstance(data, memoryview) and buf is not None and data.obj is buf:
                n = self.last_read = len(data)
                self.down_total += n
                _DOWN_HEADER.pack_into(buf, self._pos, fmt.DOWN, self._ms(), n)
                self._pos += RECORD_HEADER + n
                if self._pos >= FLUSH_BYTES:
                    self._filled()
                return
        if self.incomplete_reason is not None:
            return
        ms = self._ms()
        n = self.last_read = len(data)
        self.down_total += n
        buf = self._room(RECORD_HEADER + n, ms)
        if buf is None:  # bigger than a pooled buffer (not from the relay's reads): a chunk alone
            self._flush()
            self._hand(bytearray(fmt.record(fmt.DOWN, ms, data)), ms)
            return
        pos = self._pos
        _DOWN_HEADER.pack_into(buf, pos, fmt.DOWN, ms, n)
        pos += RECORD_HEADER
        buf[pos : pos + n] = data
        self._pos = pos + n
        if self._pos >= FLUSH_BYTES:
            self._filled()

    def _append(self, rec: bytes) -> None:
        ms = self._ms()
        buf = self._room(len(rec), ms)
        if buf is None:
            self._flush()
            self._hand(bytearray(rec), ms)
            return
        buf[self._pos : self._pos + len(rec)] = rec
        self._pos += len(rec)

    def server_init(self, init: bytes) -> None:
        """The ServerInit the browser got (the recording's first bytes): its size, for keyframes."""
        if len(init) >= 4:
            self.width, self.height = struct.unpack_from(">HH", init)
        self.down(init)

    def input(self, message: bytes) -> None:
        """A whole input message from the browser (rfb_messages.ClientMessageFilter's observer)."""
        if self.incomplete_reason is not None:
            return
        rec = input_record(self.keys, self._ms(), message)
        if rec is not None:
            self._append(rec)

    def request(self, message: bytes) -> bytes:
        """The filter's ``on_request``: a whole FramebufferUpdateRequest of the browser, and what
        to send the VNC server instead. When a keyframe is due it is made a full one.

        Why the browser's own request: noVNC asks for the next update only when the last one is
        whole, so while its request passes, the bytes down so far end on a message boundary and
        the reply starts at ``down_total`` -- the keyframe's offset needs no parsing of what the
        server sends. (A request of our own could cross an update in flight.) A browser's own
        full-screen, non-incremental request (noVNC's first) is a keyframe too.
        """
        _, incremental, x, y, w, h = _FBUR.unpack(message)
        if (incremental and not self.keyframe_pending) or x or y:
            return message
        self.keyframe_pending = False
        if self.incomplete_reason is None and not self.closed:
            ms = self._ms()
            pf = self.filter.pixel_format if self.filter is not None else None
            point = fmt.Keyframe(ms, self.down_total, w, h, pf or bytes(16))
            self._append(fmt.keyframe(ms, point.offset, w, h, point.pixel_format))
            self.keyframes.append(ms)
            self.seek_points.append(point)
        return _FBUR.pack(3, 0, 0, 0, w, h)

    def _filled(self) -> None:
        """Hand over a buffer that filled before a tick: the next one is a size bigger."""
        if self._buf is not None:
            self._grow = max(self._grow, len(self._buf) + 1)
        self._flush()

    def flush(self) -> None:
        """Hand over what the buffer holds (the manager's tick, the end). The next buffer holds
        what the console sent in this tick: a stream keeps its big one, an idle console goes
        back to small ones."""
        self._grow, self._tick_mark = self.down_total - self._tick_mark, self.down_total
        if self._grow <= self._pool.medium:
            self.last_read = 0  # quiet: its next read is not lent a large buffer
        self._flush()

    def _flush(self) -> None:
        buf, self._buf = self._buf, None
        if buf is None:
            return
        if self._pos > self._start and self.incomplete_reason is None:
            self._hand(buf, self._first_ms, self._pos - self._start, self._start)
        else:
            self._pool.put(buf)
        self._pos = self._start = 0

    def _hand(self, buf: Buffer, first_ms: int, length: int | None = None, start: int = 0) -> None:
        n = len(buf) if length is None else length
        if self.backlog + n > MAX_BACKLOG:
            self._pool.put(buf)
            self.stop(f"the store fell {self.backlog} bytes behind (slow disk)")
            return
        self.backlog += n
        self.bytes += n
        self.file_pos += fmt.CHUNK_HEADER + n
        self._writer.append(self, buf, n, first_ms, start)

    def stop(self, reason: str) -> None:
        """Record nothing more (the console goes on): the recording is incomplete."""
        if self.incomplete_reason is None:
            self.incomplete_reason = reason
            buf, self._buf = self._buf, None
            if buf is not None:
                self._pool.put(buf)
            self._writer.incomplete(self, reason)

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        flt, self.filter = self.filter, None
        if flt is not None:
            flt.observer = flt.on_request = None  # the filter pointed back here: no cycle is left
        self._writer.close(self, self._ms())


class Recordings:
    """The proxy's recordings: starts a console's recorder, ticks (flush, keyframes, retention)."""

    def __init__(self, cfg: Any, store: FileStore, metrics: Metrics, remote: S3Store | None = None) -> None:
        self.cfg = cfg  # config.Recording
        self.store = store  # the local directory (in S3 mode, the spool uploads start from)
        self.remote = remote
        self._uploader: asyncio.Task[None] | None = None
        self.metrics = metrics
        self.writer: RecordingWriter | None = None
        self.active: dict[str, Recorder] = {}
        self.pool = BufferPool()
        self._next_trim = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._closed.set()

    def start(self, relays: Callable[[], Iterable[Relay]]) -> None:
        self.writer = RecordingWriter(
            self.store, on_written=self._written, on_failed=self._failed, on_closed=self._done
        )
        self._task = asyncio.create_task(self._tick_forever(relays))
        if self.remote is not None:
            self._uploader = asyncio.create_task(self.remote.upload_forever())

    async def close(self) -> None:
        for task in (self._task, self._uploader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._uploader = None
        for rec in list(self.active.values()):
            rec.close()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.stop)
            self.writer = None

    def begin(self, session: Session) -> Recorder:
        """A recorder for ``session``; its ID goes into the session (and so its audit record)."""
        assert self.writer is not None, "Recordings.start() first"
        # A resumed console (resume.py) starts a recording of its own: a new VNC connection with
        # its own ServerInit, so the file plays alone. Its start is now (session.started is the
        # console's first start); resume_id and resume_gen link the console's recordings.
        started = time.time() if session.resume_gen else session.started
        rid = new_id(started)
        due = time.monotonic() + self.cfg.keyframe_interval_seconds
        rec = Recorder(rid, self.writer, self.cfg.keys, due, self.pool)
        meta: dict[str, Any] = {
            "format": 1,
            "id": rid,
            "vm": session.vm,
            "name": session.name,
            "user": session.client_ip,
            "client_ip": session.client_ip,
            "session": session.id,
            "started": started,
            "keys": self.cfg.keys,
            "keyframe_interval_seconds": self.cfg.keyframe_interval_seconds,
            "seekable": self.cfg.seekable_encodings,
        }
        if session.resume_id is not None:
            meta["resume_id"] = session.resume_id
            meta["resume_gen"] = session.resume_gen
        rec.file_pos = len(fmt.header(meta))  # what the writer writes first
        self.writer.open(rec, meta)
        self.active[rid] = rec
        session.recording = rid
        self.metrics.recordings_active.inc()
        return rec

    def finish(self, rec: Recorder) -> None:
        rec.close()

    def _written(self, rec: Recorder, n: int, buf: Buffer) -> None:
        rec.backlog -= n
        self.pool.put(buf)
        self.metrics.recording_bytes_total.inc(n)

    def _failed(self, rec: Recorder, reason: str) -> None:
        if not rec.closed:
            rec.stop(reason)

    def _done(self, rec: Recorder, meta: dict[str, Any]) -> None:
        if self.active.pop(rec.rid, None) is not None:
            self.metrics.recordings_active.dec()
        if meta.get("state") != "complete":
            self.metrics.recordings_incomplete_total.inc()
            log.warning("recording %s is incomplete: %s", rec.rid, meta.get("incomplete_reason"))
        if self.remote is not None:
            self.remote.wake()

    def tick(self, relays: Iterable[Relay], now: float) -> None:
        """Flush buffers older than FLUSH_SECONDS (every tick is); mark due keyframes (the
        browser's next request becomes a full one: Recorder.request)."""
        interval = self.cfg.keyframe_interval_seconds
        for relay in relays:
            rec = relay.recorder
            if rec is None or rec.closed:
                continue
            if now >= rec.keyframe_due:
                rec.keyframe_pending = True
                rec.keyframe_due = now + interval
            rec.flush()
        if now >= self._next_trim:
            self.pool.trim()
            self._next_trim = now + TRIM_SECONDS

    async def _tick_forever(self, relays: Callable[[], Iterable[Relay]]) -> None:
        next_expiry = 0.0
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            now = time.monotonic()
            self.tick(list(relays()), now)
            if now >= next_expiry and (self.cfg.retention_days or self.cfg.max_total_gib):
                next_expiry = now + 600
                await asyncio.to_thread(
                    self.store.expire,
                    max_age_days=self.cfg.retention_days,
                    max_total_bytes=int(self.cfg.max_total_gib * 2**30),
                )
