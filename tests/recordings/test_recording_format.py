"""The recording format, the keys policy and the filter's observer, without sockets."""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consoleproxy.protocol.rfb import RFBError
from consoleproxy.protocol.rfb_messages import ClientMessageFilter, seekable_encodings
from consoleproxy.recordings import recording, recording_writer
from consoleproxy.recordings import recording_format as fmt
from consoleproxy.recordings.recording_policy import input_record, should_record
from consoleproxy.recordings.recording_store import (
    BadRecordingId,
    BadStoreURL,
    FileStore,
    check_id,
    matches,
    new_id,
    parse_store,
)


def build(chunks: list[list[bytes]], *, keyframes: list[int] | None = None, end_ms: int = 0) -> bytes:
    """A recording whose chunks hold the given records (as fmt.record makes them)."""
    out = bytearray(fmt.header({"id": "x", "vm": "vm-1"}))
    index = fmt.Index(header={})
    for recs in chunks:
        first = struct.unpack_from(">BII", recs[0])[1]
        index.chunks.append((len(out), first))
        out += fmt.chunk(b"".join(recs), first)
    index.keyframes = keyframes or []
    index.end_ms = end_ms
    index.complete = True
    out += fmt.end(index)
    return bytes(out)


def test_round_trip_and_index() -> None:
    data = build(
        [
            [fmt.record(fmt.DOWN, 0, b"init"), fmt.record(fmt.KEY_REDACTED, 5, b"\x01")],
            [fmt.record(fmt.KEYFRAME, 60_000), fmt.record(fmt.DOWN, 60_001, b"full")],
        ],
        end_ms=61_000,
    )
    recs = list(fmt.records(data))
    assert [(r.kind, r.ms, r.data) for r in recs] == [
        (fmt.DOWN, 0, b"init"), (fmt.KEY_REDACTED, 5, b"\x01"),
        (fmt.KEYFRAME, 60_000, b""), (fmt.DOWN, 60_001, b"full"),
    ]
    idx = fmt.scan(data)
    assert idx.header == {"id": "x", "vm": "vm-1"}
    assert idx.closed and idx.complete and idx.end_ms == 61_000
    assert idx.keyframes == [60_000]  # rebuilt from the records, not trusted from the trailer
    assert [ms for _, ms in idx.chunks] == [0, 60_000]
    assert idx.chunk_before(30_000) == idx.chunks[0][0]
    assert idx.chunk_before(60_500) == idx.chunks[1][0]
    assert idx.keyframe_before(59_999) is None and idx.keyframe_before(90_000) == 60_000


@given(st.lists(st.tuples(st.sampled_from(sorted(fmt.KINDS)), st.binary(max_size=40)), min_size=1,
                max_size=20))
def test_any_records_round_trip(items: list[tuple[int, bytes]]) -> None:
    recs = [fmt.record(k, i, d) for i, (k, d) in enumerate(items)]
    data = build([recs[:3], recs[3:]] if len(recs) > 3 else [recs])
    assert [(r.kind, r.data) for r in fmt.records(data)] == items


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:-5], "truncated at offset"),
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: b"XXXX" + d[4:], "not a consoleproxy recording"),
        (lambda d: d[:6], "shorter than the file header"),
        (lambda d: d[:40] + bytes([d[40] ^ 0xFF]) + d[41:], "checksum mismatch"),
        (lambda d: d + b"junk", "after the end block"),
    ],
)
def test_damaged_recordings_are_named_errors(damage, message: str) -> None:  # type: ignore[no-untyped-def]
    data = build([[fmt.record(fmt.DOWN, 0, b"x" * 100)], [fmt.record(fmt.DOWN, 9, b"y" * 50)]])
    with pytest.raises(fmt.RecordingCorrupt, match=message):
        fmt.scan(damage(data))
    with pytest.raises(fmt.RecordingCorrupt):
        list(fmt.records(damage(data)))


def test_missing_end_block_is_truncated_unless_still_written() -> None:
    data = build([[fmt.record(fmt.DOWN, 0, b"abc")]])
    cut = data[: data.rindex(b"E")]
    with pytest.raises(fmt.RecordingCorrupt, match="no end block"):
        fmt.scan(cut)
    assert len(fmt.scan(cut, require_end=False).chunks) == 1


# --- keys policy -------------------------------------------------------------------------------

KEY_DOWN_P = struct.pack(">BBxxI", 4, 1, ord("p"))
QEMU_KEY = struct.pack(">BBHII", 255, 0, 1, ord("q"), 0x10)
POINTER = struct.pack(">BBHH", 5, 1, 100, 200)
CUT = struct.pack(">BxxxI", 6, 6) + b"secret"


def test_redact_keeps_that_a_key_was_pressed_not_which() -> None:
    for msg in (KEY_DOWN_P, QEMU_KEY):
        rec = input_record("redact", 7, msg)
        assert rec is not None
        (r,) = list(fmt.records(build([[rec]])))
        assert (r.kind, r.data) == (fmt.KEY_REDACTED, b"\x01")
    assert input_record("redact", 7, POINTER) == fmt.record(fmt.POINTER, 7, POINTER[1:])
    cut = input_record("redact", 7, CUT)
    assert cut == fmt.record(fmt.CLIPBOARD_REDACTED, 7, struct.pack(">I", 6))
    assert b"secret" not in cut


def test_full_keeps_keysyms_and_clipboard_none_keeps_nothing() -> None:
    assert input_record("full", 1, KEY_DOWN_P) == fmt.record(fmt.KEY, 1, struct.pack(">BII", 1, ord("p"), 0))
    assert input_record("full", 1, QEMU_KEY) == fmt.record(fmt.KEY, 1, struct.pack(">BII", 1, ord("q"), 0x10))
    assert input_record("full", 1, CUT) == fmt.record(fmt.CLIPBOARD, 1, b"secret")
    assert all(input_record("none", 1, m) is None for m in (KEY_DOWN_P, QEMU_KEY, POINTER, CUT))


def test_should_record() -> None:
    assert should_record(False, True, "vm", []) and not should_record(True, False, "vm", [])
    assert should_record(False, None, "vm-9", ["vm-9"]) and not should_record(False, None, "vm-1", ["vm-9"])
    assert should_record(True, None, "", [])


def test_list_filter_finds_a_consoles_recordings_across_its_resumes() -> None:
    a = {"vm": "v", "started": 10, "resume_id": "chain-1", "resume_gen": 0}
    b = {"vm": "v", "started": 20, "resume_id": "chain-1", "resume_gen": 1}
    other = {"vm": "v", "started": 15, "resume_id": "chain-2", "resume_gen": 0}
    plain = {"vm": "v", "started": 5}  # resume off
    got = [m for m in (a, b, other, plain) if matches(m, {"resume_id": "chain-1"})]
    assert got == [a, b]
    assert [m for m in (a, plain) if matches(m, {"vm": "v"})] == [a, plain]


@pytest.mark.parametrize("split", [1, 3, 5, 7, 100])
def test_filter_observer_sees_whole_input_messages_however_split(split: int) -> None:
    seen: list[bytes] = []
    flt = ClientMessageFilter(view_only=False, expect_client_init=False, observer=seen.append)
    fbur = b"\x03\x01" + b"\x00" * 8
    long_cut = struct.pack(">BxxxI", 6, 40) + b"c" * 40
    stream = KEY_DOWN_P + fbur + QEMU_KEY + POINTER + CUT + long_cut + KEY_DOWN_P
    out = b""
    for i in range(0, len(stream), split):
        out += flt.feed(stream[i : i + split])
    assert out == stream  # forwarded unchanged
    assert seen == [KEY_DOWN_P, QEMU_KEY, POINTER, CUT, long_cut, KEY_DOWN_P]
    assert flt.at_message_boundary


def test_filter_boundary() -> None:
    flt = ClientMessageFilter(view_only=False, expect_client_init=False)
    flt.feed(b"\x03\x01\x00")
    assert not flt.at_message_boundary
    flt.feed(b"\x00" * 7)
    assert flt.at_message_boundary


# noVNC 1.5's SetEncodings (Tight, TightPNG, ZRLE, JPEG, Hextile, RRE, Raw, CopyRect, zlib, then
# pseudo-encodings: quality, compression, DesktopSize, LastRect, QEMU key, ExtendedDesktopSize,
# fence, continuous updates, cursor, ExtendedMouseButtons) and what a recorded console sends.
NOVNC_ENCODINGS = [7, -260, 16, 21, 5, 2, 0, 1, 6, -26, -250, -223, -224, -258, -308, -312, -313, -239, -316]
SEEKABLE = [5, 2, 0, 1, -26, -250, -223, -224, -258, -308, -312, -313, -239, -316]


def set_encodings(encodings: list[int]) -> bytes:
    return struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings)


@pytest.mark.parametrize("split", [1, 3, 7, 1000])
def test_seekable_filter_rewrites_set_encodings_however_split(split: int) -> None:
    """Tight, ZRLE, zlib, JPEG and TightPNG keep decoder state between updates: a recorded console
    asks the VNC server for none of them, so a player can start decoding at a keyframe."""
    seen: list[bytes] = []
    flt = ClientMessageFilter(view_only=False, expect_client_init=False, observer=seen.append, seekable=True)
    stream = KEY_DOWN_P + set_encodings(NOVNC_ENCODINGS) + POINTER + set_encodings([16, 7]) + KEY_DOWN_P
    out = b""
    for i in range(0, len(stream), split):
        out += flt.feed(stream[i : i + split])
        if 0 < i < len(KEY_DOWN_P) + 4 * len(NOVNC_ENCODINGS) - split:
            assert len(out) <= len(KEY_DOWN_P)  # nothing of a SetEncodings leaves before its end
    assert out == KEY_DOWN_P + set_encodings(SEEKABLE) + POINTER + set_encodings([]) + KEY_DOWN_P
    assert seen == [KEY_DOWN_P, POINTER, KEY_DOWN_P] and flt.at_message_boundary
    plain = ClientMessageFilter(view_only=False, expect_client_init=False)
    assert plain.feed(set_encodings(NOVNC_ENCODINGS)) == set_encodings(NOVNC_ENCODINGS)


def test_seekable_encodings_refuses_a_message_that_is_not_whole() -> None:
    with pytest.raises(RFBError, match="not 12"):
        seekable_encodings(set_encodings([0, 1])[:-1] + b"")
    with pytest.raises(RFBError, match="not a SetEncodings"):
        seekable_encodings(b"\x03\x00\x00\x00")


@pytest.mark.parametrize("split", [1, 4, 1000])
def test_filter_hands_whole_update_requests_to_on_request(split: int) -> None:
    got: list[bytes] = []

    def full(message: bytes) -> bytes:
        got.append(message)
        return b"\x03\x00" + message[2:]

    flt = ClientMessageFilter(view_only=False, expect_client_init=False, on_request=full)
    pf = bytes(range(16))
    fbur = struct.pack(">BBHHHH", 3, 1, 0, 0, 640, 480)
    stream = b"\x00\x00\x00\x00" + pf + fbur + KEY_DOWN_P
    out = b""
    for i in range(0, len(stream), split):
        out += flt.feed(stream[i : i + split])
    assert got == [fbur] and flt.pixel_format == pf
    assert out == b"\x00\x00\x00\x00" + pf + b"\x03\x00" + fbur[2:] + KEY_DOWN_P


class _NoWriter:
    """Recorder.request appends to the recorder's buffer; nothing reaches a writer here."""


def test_due_keyframe_makes_the_browsers_next_request_full_at_the_bytes_so_far() -> None:
    rec = recording.Recorder("r", _NoWriter(), "redact", 0.0, recording.BufferPool())  # type: ignore[arg-type]
    flt = ClientMessageFilter(
        view_only=False, expect_client_init=False, on_request=rec.request, seekable=True
    )
    rec.filter = flt
    rec.server_init(struct.pack(">HH", 640, 480) + bytes(20))
    flt.feed(b"\x00\x00\x00\x00" + bytes(range(16)))  # the browser's SetPixelFormat
    incremental = struct.pack(">BBHHHH", 3, 1, 0, 0, 800, 600)
    assert flt.feed(incremental) == incremental  # no keyframe due: passes
    rec.down(b"x" * 1000)
    rec.keyframe_pending = True
    assert flt.feed(incremental) == struct.pack(">BBHHHH", 3, 0, 0, 0, 800, 600)
    assert flt.feed(incremental) == incremental  # once
    assert not rec.keyframe_pending and len(rec.keyframes) == 1
    (point,) = rec.seek_points
    assert (point.offset, point.width, point.height) == (24 + 1000, 800, 600)
    assert point.pixel_format == bytes(range(16))
    # The browser's own full request is a seek point too.
    flt.feed(struct.pack(">BBHHHH", 3, 0, 0, 0, 800, 600))
    assert [p.offset for p in rec.seek_points] == [1024, 1024]
    # In the file: the KEYFRAME record carries it, and the index reads it back.
    assert rec._buf is not None
    payload = bytes(rec._buf[: rec._pos])
    data = fmt.header({}) + fmt.chunk(payload, 0) + fmt.end(fmt.Index(header={}, end_ms=1))
    idx = fmt.scan(data)
    assert idx.seek_points == rec.seek_points
    assert idx.seek_point_before(10**9) == rec.seek_points[-1]


def test_pool_keeps_a_streams_buffers_and_gives_back_the_unneeded() -> None:
    """Fresh pages per chunk cost more than anything else in recording: the pool keeps as many
    big buffers as a stream has in flight, and gives back those a trim interval did not use."""
    pool = recording.BufferPool(size=4 * 1024 * 1024, small=4096, medium=64 * 1024)
    assert pool.keep == recording.MAX_BACKLOG // recording.FLUSH_BYTES + 2
    bufs = [pool.get(3_000_000) for _ in range(pool.keep + 3)]
    for b in bufs:
        pool.put(b)
    assert len(pool._free) == pool.keep
    pool.trim()  # in this interval every buffer was in use: all are kept
    assert len(pool._free) == pool.keep
    again = pool.get(3_000_000)
    assert any(again is b for b in bufs)  # reused, not fresh
    pool.put(again)
    pool.trim()  # in this one one was needed: the rest go
    assert len(pool._free) == 1
    pool.trim()
    assert pool._free == []
    held = pool.get(3_000_000)
    view = memoryview(held)[:10]
    pool.put(held)  # a transport still has a view of it: not reused
    assert pool._free == []
    view.release()


def test_a_keyframe_record_of_the_wrong_size_is_corrupt() -> None:
    data = build([[fmt.record(fmt.DOWN, 0, b"init"), fmt.record(fmt.KEYFRAME, 5, b"short")]])
    with pytest.raises(fmt.RecordingCorrupt, match="keyframe record at 5 ms has 5 bytes, not 28"):
        fmt.scan(data)


# --- store names -------------------------------------------------------------------------------


def test_ids_and_store_urls(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rid = new_id(0)
    assert rid.startswith("19700101T000000Z-") and check_id(rid) == rid
    for bad in ("../etc/passwd", "19700101T000000Z-zz", "", "x" * 100):
        with pytest.raises(BadRecordingId):
            check_id(bad)
    assert parse_store("file:///var/rec").path == "/var/rec"
    s3 = parse_store("s3://bucket/some/prefix/")
    assert (s3.scheme, s3.path, s3.prefix) == ("s3", "bucket", "some/prefix")
    for bad in ("file://host/dir", "file:relative", "http://x/y", "s3:///nobucket", "recordings"):
        with pytest.raises(BadStoreURL):
            parse_store(bad)
    store = FileStore(tmp_path)
    with pytest.raises(BadRecordingId):
        store.path("../../x")


def test_expire_by_age_and_total(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = FileStore(tmp_path)
    now = 1_000_000.0
    ids = []
    for i, age_days in enumerate((10, 5, 1)):
        rid = new_id(now - age_days * 86400)
        ids.append(rid)
        started = now - age_days * 86400
        fd = store.create(rid, b"x" * 1000, {"id": rid, "started": started, "state": "recording"})
        store.finish(rid, fd, {"id": rid, "started": started, "state": "complete", "n": i})
    assert store.expire(max_age_days=7, max_total_bytes=0, now=now) == [ids[0]]
    assert store.expire(max_age_days=0, max_total_bytes=1500, now=now) == [ids[1]]
    assert [m["id"] for m in store.entries()] == [ids[2]]


def test_lenient_filter_passes_what_it_cannot_frame() -> None:
    """A recorded console must not break on a message the filter does not know: it stops framing
    (and observing) and forwards every byte; a strict filter refuses it."""
    seen: list[bytes] = []
    flt = ClientMessageFilter(view_only=False, expect_client_init=False, observer=seen.append, lenient=True)
    assert flt.feed(KEY_DOWN_P + b"\x78junk") == KEY_DOWN_P + b"\x78junk"
    assert flt.feed(KEY_DOWN_P) == KEY_DOWN_P
    assert seen == [KEY_DOWN_P] and flt.unframed and not flt.at_message_boundary
    strict = ClientMessageFilter(view_only=False, expect_client_init=False, observer=seen.append)
    with pytest.raises(RFBError, match="unknown client message type 120"):
        strict.feed(b"\x78junk")


# --- bad input: configuration and token claim ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('store = "ftp://x/y"', "[recording] store"),
        ('store = "file://relative/dir"', "file:///DIR with an absolute directory"),
        ('store = "s3:///nobucket"', "names a bucket"),
        ('keys = "some"', "one of 'redact', 'full', 'none'"),
        ("keyframe_interval_seconds = 0", "a number from 1 to 86400"),
        ("retention_days = -1", "a number >= 0"),
        ("max_total_gib = -2", "a number >= 0"),
        ('enabled = "yes"', "true or false"),
        ("seekable_encodings = 1", "true or false"),
    ],
)
def test_bad_recording_config(tmp_path, text: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    from consoleproxy.config import ConfigError, load_config

    p = tmp_path / "c.toml"
    p.write_text(f"[recording]\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, env={})
    assert needle in str(err.value) and "recording" in str(err.value)


def test_record_claim_is_checked_and_round_trips() -> None:
    from consoleproxy.policy.tokens import Claims, Keyring, TokenInvalid, decode, issue

    ring = Keyring.generate()
    for value in (True, False, None):
        claims = decode(ring, issue(ring, host="h", port=5900, record=value))
        assert claims.record is value and ("record" in claims.to_dict()) is (value is not None)
    base = {"host": "h", "port": 5900, "vm": "v", "exp": 2, "iat": 1, "jti": "j"}
    for bad in ("yes", 1, [True]):
        with pytest.raises(TokenInvalid, match="claim 'record' must be true or false"):
            Claims.from_dict({**base, "record": bad})


@pytest.mark.parametrize("direct", [True, False])
def test_writer_file_gets_every_byte_in_order_direct_or_not(tmp_path, direct: bool) -> None:  # type: ignore[no-untyped-def]
    """O_DIRECT writes whole aligned blocks from a staging buffer and the tail at the end: the
    file must still be exactly the bytes emitted, whatever their sizes (tmp_path is ext4 here)."""
    import random


    store = FileStore(tmp_path)
    rid = new_id()
    fd, is_direct = store.open_new(rid, {"id": rid}, direct=direct)
    f = recording_writer._Open(fd, 0, {}, is_direct)
    rng = random.Random(7)
    expected = bytearray()
    for size in [1, 4095, 4096, 4097, 10, recording_writer.STAGE_BYTES + 123, 3, 70_000, 0, 5000]:
        part = rng.randbytes(size)
        f.emit(part[: size // 3], bytearray(part[size // 3 :]))
        expected += part
    f.drain()
    store.finish(rid, fd, {"id": rid, "state": "complete"})
    assert store.path(rid).read_bytes() == bytes(expected)
    assert f.size == len(expected)


@pytest.mark.parametrize("direct", [True, False])
def test_writer_sends_aligned_blocks_of_a_chunk_from_where_they_lie(tmp_path, direct: bool) -> None:  # type: ignore[no-untyped-def]
    """A chunk in a page-aligned buffer placed as the recorder places it (its payload at the
    file's position modulo 4 KiB) goes to the disk without the stage; one placed otherwise,
    through it. Either way the file is exactly the bytes emitted."""
    import mmap
    import random


    store = FileStore(tmp_path)
    rid = new_id()
    fd, is_direct = store.open_new(rid, {"id": rid}, direct=direct)
    f = recording_writer._Open(fd, 0, {}, is_direct)
    rng = random.Random(11)
    expected = bytearray()
    buf = mmap.mmap(-1, 4 * 1024 * 1024)
    f.emit(b"H" * 77)
    expected += b"H" * 77
    for n, misplaced in [(100_000, False), (5, False), (3 * 1024 * 1024, False), (9000, True), (4096, False)]:
        start = (f.size + fmt.CHUNK_HEADER + (1 if misplaced else 0)) % recording_writer.ALIGN
        payload = rng.randbytes(n)
        buf[start : start + n] = payload
        head = b"C" * fmt.CHUNK_HEADER
        with memoryview(buf)[start : start + n] as view:
            f.emit(head, view, aligned_at=start)
        expected += head + payload
    f.drain()
    store.finish(rid, fd, {"id": rid, "state": "complete"})
    assert store.path(rid).read_bytes() == bytes(expected)
    if is_direct:
        assert f.direct_bytes >= 3 * 1024 * 1024  # the big chunks' blocks were not copied
    else:
        assert f.direct_bytes == 0


def test_each_buffer_size_is_its_own_kind_and_reused() -> None:
    """A big buffer is in 2 MiB pages: an idle console's occasional 5 KiB update must not take
    (and touch) one; a busy console's 100 KB takes a large one in 4 KiB pages."""
    pool = recording.BufferPool()
    small, medium = pool.get(100), pool.get(5000)
    large, big = pool.get(recording.MEDIUM_BUFFER_BYTES + 1), pool.get(recording.LARGE_BUFFER_BYTES + 1)
    assert isinstance(small, bytearray) and len(small) == recording.SMALL_BUFFER_BYTES
    assert isinstance(medium, bytearray) and len(medium) == recording.MEDIUM_BUFFER_BYTES
    assert isinstance(large, mmap.mmap) and len(large) == recording.LARGE_BUFFER_BYTES
    assert isinstance(big, mmap.mmap) and len(big) == recording.BUFFER_BYTES
    assert "hg" not in _vm_flags(large) and "hg" in _vm_flags(big)
    for b in (small, medium, large, big):
        pool.put(b)
    assert pool.get(5000) is medium and pool.get(100) is small
    assert pool.get(recording.LARGE_BUFFER_BYTES + 1) is big
    assert pool.get(recording.MEDIUM_BUFFER_BYTES + 1) is large


def test_a_buffer_a_transport_still_views_is_reused_once_it_is_let_go() -> None:
    """The browser's transport may keep unsent bytes read into a big buffer: once it has sent
    them, the buffer is reused rather than a fresh one faulted in."""
    pool = recording.BufferPool()
    big = pool.get(recording.BUFFER_BYTES)
    view = memoryview(big)[:10]
    pool.put(big)  # still viewed: held aside
    assert pool._free == []
    view.release()
    assert pool.get(recording.BUFFER_BYTES) is big


class _ListWriter:
    """Collects what a recorder hands over, (buffer size, bytes), and writes it at once."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, int]] = []

    def append(
        self, rec: recording.Recorder, buf: recording.Buffer, n: int, first_ms: int, start: int = 0
    ) -> None:
        self.chunks.append((len(buf), n))
        rec.backlog -= n

    def incomplete(self, rec: object, reason: str) -> None:
        pass


def test_a_consoles_buffers_follow_what_it_sent_in_a_tick() -> None:
    """Small buffers while idle, a large one for a busy tick's 100 KB, big ones for a stream
    (read straight into them), and small again once it goes quiet."""
    writer = _ListWriter()
    rec = recording.Recorder("r", writer, "redact", 0.0, recording.BufferPool())  # type: ignore[arg-type]
    rec.down(b"x" * 100)
    rec.flush()  # a tick
    for _ in range(25):
        rec.down(b"y" * 4000)  # 100 KB in this tick: each buffer it fills, the next is bigger
    rec.flush()
    small, medium = recording.SMALL_BUFFER_BYTES, recording.MEDIUM_BUFFER_BYTES
    large = recording.LARGE_BUFFER_BYTES
    assert writer.chunks == [(small, 109), (small, 4009), (medium, 16 * 4009), (large, 8 * 4009)]
    writer.chunks.clear()
    assert rec.read_buffer() is not None  # busy: its reads go straight into its (large) buffer
    rec._lent = False
    rec.down(b"z" * 4000)
    rec.flush()
    assert writer.chunks == [(large, 4009)]
    writer.chunks.clear()
    lent = []
    for _ in range(40):  # a stream after a quiet tick: 40 MiB read as the relay reads
        room = rec.read_buffer()
        lent.append(room is not None)
        if room is None:
            rec.down(bytes(recording.READ_BYTES))  # read into the relay's buffer, then copied
        else:
            assert len(room) == recording.READ_BYTES
            room[:] = bytes(len(room))
            rec.down(room)
    assert lent == [False] + [True] * 39
    assert [size for size, _ in writer.chunks] == [large] + [recording.BUFFER_BYTES] * 2
    rec.flush()
    rec.flush()  # a quiet tick
    writer.chunks.clear()
    assert rec.read_buffer() is None  # idle again: its few bytes are copied into small buffers
    rec.down(b"k" * 10)
    rec.flush()
    assert writer.chunks == [(recording.SMALL_BUFFER_BYTES, 19)]


def _vm_flags(buf: mmap.mmap) -> list[str]:
    entry = _mapping_of(buf)
    return next(line for line in entry if line.startswith("VmFlags:")).split()[1:]


def _mapping_of(buf: mmap.mmap) -> list[str]:
    """The /proc/self/smaps entry of the map holding ``buf``: its header line and fields."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    entry: list[str] = []
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                if found:
                    break
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= addr < hi
                entry = [line]
            elif found:
                entry.append(line)
    assert found, "the buffer's map is not in /proc/self/smaps"
    return entry


def test_write_buffers_are_private_maps_advised_for_huge_pages() -> None:
    """O_DIRECT pins every page a write covers: 2 MiB pages cost a quarter of 4 KiB ones
    (bench/recording_writes.py). Python's default map is shared memory, never huge here."""
    buf = recording_writer.page_buffer(recording.BUFFER_BYTES)
    entry = _mapping_of(buf)
    perms = entry[0].split()[1]
    assert perms.endswith("p"), f"a shared map: {entry[0]}"
    flags = _vm_flags(buf)
    assert "hg" in flags, f"not advised for huge pages: {flags}"
    assert recording.BUFFER_BYTES % (2 * 1024 * 1024) == 0  # so Linux aligns it to 2 MiB
