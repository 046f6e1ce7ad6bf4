"""The console recording file format (version 1): encode, decode, index. Pure: bytes in, values out.

A recording is what one browser got from the proxy after the RFB handshake (every server-to-
browser byte, ServerInit first, with its time) and what its user did (input events, as the keys
policy allows: recording_policy.py). Layout, all integers big-endian::

    file    = MAGIC | u32 header_length | header (UTF-8 JSON object) | chunk* | end
    chunk   = b"C" | u32 payload_length | u32 crc32(payload[:4096]) | u32 first_ms | payload
    end     = b"E" | u32 trailer_length | u32 crc32(trailer[:4096]) | u32 end_ms | trailer (JSON object)
    payload = record*
    record  = u8 kind | u32 ms | u32 length | data

``ms`` counts milliseconds from the recording's start. The checksum covers a block's first
``CHECKED_BYTES`` (its first records' headers; and with the lengths, which must add up, a cut or
shifted file): a CRC of every byte would cost about as much CPU as relaying it (0.45 s per GiB
here), and a flipped bit inside pixel data only changes pixels. A chunk is what the recorder wrote at once
(it is appended whole, so a crash loses at most the chunk being written). The trailer is the
index: ``chunks`` ([file offset, first_ms] of each chunk), ``keyframes`` (the ms of each full
update the proxy asked for: a player seeking near one gets a whole, fresh screen there),
``end_ms``, ``complete`` (false when the recorder had to stop: ``incomplete_reason`` says why).
A reader without the trailer (a recording still being written, or cut off) can rebuild the index
by walking the chunk headers: ``scan`` does, and names the first byte that does not fit.

Record kinds and their data:

- DOWN: server-to-browser bytes, as relayed.
- KEY: u8 down | u32 keysym | u32 keycode (0 unless a QEMU extended key event).
- KEY_REDACTED: u8 down (a key was pressed or released; not which).
- POINTER: u8 button mask | u16 x | u16 y.
- CLIPBOARD: the clipboard text sent into the VM (Latin-1, as RFB carries it).
- CLIPBOARD_REDACTED: u32 length of the text that was sent.
- KEYFRAME: u64 offset | u16 width | u16 height | 16-byte pixel format: the proxy asked for a
  full update at this time (it made the browser's next FramebufferUpdateRequest non-incremental).
  ``offset`` counts the DOWN bytes before the reply (ServerInit's first byte is 0): the player
  starts a fresh decoder there, with a ServerInit of ``width`` x ``height`` (the size the browser
  asked for) and the pixel format the browser set (all zero: none set, the server's). A header
  field ``seekable`` true says the browser's encodings were cut down to ones without state carried
  from update to update (rfb_messages.seekable_encodings), so decoding can start at ``offset``; without it
  a player decodes from the start. Format 1 writers before seeking wrote KEYFRAME empty.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from consoleproxy.errors import ConsoleProxyError

__all__ = [
    "CLIPBOARD", "CLIPBOARD_REDACTED", "DOWN", "KEY", "KEYFRAME", "KEY_REDACTED", "MAGIC", "POINTER",
    "Index", "Keyframe", "Record", "RecordingCorrupt", "checksum", "chunk", "chunk_header", "end",
    "header", "keyframe", "parse_keyframe", "read_header", "records", "scan",
]

MAGIC = b"CPREC01\n"
DOWN, KEY, KEY_REDACTED, POINTER, CLIPBOARD, CLIPBOARD_REDACTED, KEYFRAME = 1, 2, 3, 4, 5, 6, 7
KINDS = frozenset((DOWN, KEY, KEY_REDACTED, POINTER, CLIPBOARD, CLIPBOARD_REDACTED, KEYFRAME))
_U32 = struct.Struct(">I")
_BLOCK = struct.Struct(">cIII")  # tag, length, crc32, ms
_RECORD = struct.Struct(">BII")
_KEYFRAME = struct.Struct(">QHH16s")
RECORD_HEADER = _RECORD.size
CHUNK_HEADER = _BLOCK.size
MAX_HEADER = 64 * 1024  # header and trailer JSON are small; a bigger one means a damaged file
MAX_CHUNK = 64 * 1024 * 1024
CHECKED_BYTES = 4096  # of each block's payload, covered by its CRC-32 (see the module docstring)


class RecordingCorrupt(ConsoleProxyError):
    """A recording's bytes do not follow the format; the message names the offset and the rule."""


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    ms: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Keyframe:
    """Where a player can start decoding (see KEYFRAME in the module docstring)."""

    ms: int
    offset: int
    width: int
    height: int
    pixel_format: bytes

    def to_list(self) -> list[Any]:
        return [self.ms, self.offset, self.width, self.height, self.pixel_format.hex()]


def keyframe(ms: int, offset: int, width: int, height: int, pixel_format: bytes | None) -> bytes:
    """A KEYFRAME record."""
    return record(KEYFRAME, ms, _KEYFRAME.pack(offset, width, height, pixel_format or bytes(16)))


def parse_keyframe(ms: int, data: bytes) -> Keyframe | None:
    """The seek point of a KEYFRAME record's data; None for an empty one (an older writer)."""
    if not data:
        return None
    if len(data) != _KEYFRAME.size:
        raise RecordingCorrupt(f"a keyframe record at {ms} ms has {len(data)} bytes, not {_KEYFRAME.size}")
    offset, width, height, pf = _KEYFRAME.unpack(data)
    return Keyframe(ms, offset, width, height, pf)


@dataclass
class Index:
    """Where a recording's chunks start, and its keyframes (see the module docstring)."""

    header: dict[str, Any]
    chunks: list[tuple[int, int]] = field(default_factory=list)
    keyframes: list[int] = field(default_factory=list)
    seek_points: list[Keyframe] = field(default_factory=list)
    end_ms: int = 0
    complete: bool = False
    closed: bool = False  # an end block was found
    incomplete_reason: str | None = None

    def chunk_before(self, ms: int) -> int:
        """Offset of the last chunk starting at or before ``ms`` (the first one when none)."""
        best = self.chunks[0][0] if self.chunks else 0
        for offset, first in self.chunks:
            if first > ms:
                break
            best = offset
        return best

    def keyframe_before(self, ms: int) -> int | None:
        """The last keyframe at or before ``ms``."""
        best = None
        for k in self.keyframes:
            if k > ms:
                break
            best = k
        return best

    def seek_point_before(self, ms: int) -> Keyframe | None:
        """The last seek point at or before ``ms`` (None: decode from the start)."""
        best = None
        for k in self.seek_points:
            if k.ms > ms:
                break
            best = k
        return best

    def to_dict(self) -> dict[str, Any]:
        return {
            "end_ms": self.end_ms,
            "complete": self.complete,
            "closed": self.closed,
            "incomplete_reason": self.incomplete_reason,
            "chunks": self.chunks,
            "keyframes": self.keyframes,
            "seek_points": [k.to_list() for k in self.seek_points],
        }


def header(fields: dict[str, Any]) -> bytes:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_HEADER:
        raise ValueError(f"recording header is {len(body)} bytes (at most {MAX_HEADER})")
    return MAGIC + _U32.pack(len(body)) + body


def record(kind: int, ms: int, data: bytes | bytearray | memoryview = b"") -> bytes:
    """One record's header followed by ``data`` (callers appending to a buffer add data apart)."""
    return _RECORD.pack(kind, ms, len(data)) + bytes(data)


def record_header(kind: int, ms: int, length: int) -> bytes:
    return _RECORD.pack(kind, ms, length)


def checksum(payload: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(memoryview(payload)[:CHECKED_BYTES])


def chunk_header(payload: bytes | bytearray | memoryview, first_ms: int) -> bytes:
    """The header of a chunk holding ``payload`` (written before it, without joining them)."""
    return _BLOCK.pack(b"C", len(payload), checksum(payload), first_ms)


def chunk(payload: bytes | bytearray, first_ms: int) -> bytes:
    return chunk_header(payload, first_ms) + bytes(payload)


def end(index: Index) -> bytes:
    """The end block: the trailer (index) of a recording whose chunks are in ``index``."""
    trailer = json.dumps(
        {
            "chunks": index.chunks,
            "keyframes": index.keyframes,
            "seek_points": [k.to_list() for k in index.seek_points],
            "end_ms": index.end_ms,
            "complete": index.complete,
            "incomplete_reason": index.incomplete_reason,
        },
        separators=(",", ":"),
    ).encode()
    return _BLOCK.pack(b"E", len(trailer), checksum(trailer), index.end_ms) + trailer


def read_header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """The header of a recording starting with ``data``, and the offset of its first chunk."""
    if len(data) < len(MAGIC) + 4:
        raise RecordingCorrupt(f"truncated: {len(data)} bytes, shorter than the file header")
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise RecordingCorrupt("not a consoleproxy recording (bad magic at offset 0)")
    (n,) = _U32.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + 4
    if n > MAX_HEADER:
        raise RecordingCorrupt(f"header length {n} at offset {len(MAGIC)} exceeds {MAX_HEADER}")
    if len(data) < start + n:
        raise RecordingCorrupt(f"truncated in the header: {len(data)} of {start + n} bytes")
    try:
        fields = json.loads(bytes(data[start : start + n]))
    except ValueError:
        raise RecordingCorrupt(f"the header at offset {start} is not JSON") from None
    if not isinstance(fields, dict):
        raise RecordingCorrupt(f"the header at offset {start} is not a JSON object")
    return fields, start + n


def _blocks(data: bytes | memoryview, offset: int) -> Iterator[tuple[bytes, int, int, int]]:
    """(tag, offset of the block, payload offset, first ms) of each block; checks lengths, CRCs."""
    total = len(data)
    while offset < total:
        if total - offset < _BLOCK.size:
            raise RecordingCorrupt(
                f"truncated at offset {offset}: {total - offset} bytes, shorter than a block header"
            )
        tag, length, crc, ms = _BLOCK.unpack_from(data, offset)
        if tag not in (b"C", b"E"):
            raise RecordingCorrupt(f"bad block tag {tag!r} at offset {offset}")
        if length > (MAX_CHUNK if tag == b"C" else MAX_HEADER):
            raise RecordingCorrupt(f"block at offset {offset} claims {length} bytes: too long")
        start = offset + _BLOCK.size
        if start + length > total:
            raise RecordingCorrupt(
                f"truncated at offset {offset}: the block needs {length} bytes, "
                f"{total - start} remain"
            )
        if checksum(data[start : start + min(length, CHECKED_BYTES)]) != crc:
            raise RecordingCorrupt(f"checksum mismatch in the block at offset {offset}")
        if tag == b"E" and start + length != total:
            raise RecordingCorrupt(
                f"{total - start - length} bytes after the end block at offset {offset}"
            )
        yield tag, offset, start, ms
        offset = start + length
        if tag == b"E":
            return


def scan(data: bytes | memoryview, *, require_end: bool = True) -> Index:
    """Check a whole recording and build its index; RecordingCorrupt names the first problem.

    With ``require_end`` (finished recordings) a missing end block is an error ("truncated");
    without it (one being written), the chunks so far are indexed.
    """
    fields, offset = read_header(data)
    index = Index(header=fields)
    last_ms = 0
    for tag, at, start, ms in _blocks(data, offset):
        (length,) = _U32.unpack_from(data, at + 1)
        if tag == b"C":
            index.chunks.append((at, ms))
            for rec in _records(data, start, start + length, at):
                last_ms = max(last_ms, rec.ms)
                if rec.kind == KEYFRAME:
                    index.keyframes.append(rec.ms)
                    point = parse_keyframe(rec.ms, rec.data)
                    if point is not None:
                        index.seek_points.append(point)
            continue
        try:
            trailer = json.loads(bytes(data[start : start + length]))
        except ValueError:
            raise RecordingCorrupt(f"the trailer at offset {start} is not JSON") from None
        if not isinstance(trailer, dict):
            raise RecordingCorrupt(f"the trailer at offset {start} is not a JSON object")
        index.closed = True
        index.complete = trailer.get("complete") is True
        reason = trailer.get("incomplete_reason")
        index.incomplete_reason = reason if isinstance(reason, str) else None
        index.end_ms = max(ms, last_ms)
        return index
    if require_end:
        raise RecordingCorrupt(
            f"truncated: no end block after offset {len(data)} (the recording was cut off)"
        )
    index.end_ms = last_ms
    return index


def _records(data: bytes | memoryview, start: int, stop: int, chunk_at: int) -> Iterator[Record]:
    i = start
    while i < stop:
        if stop - i < RECORD_HEADER:
            raise RecordingCorrupt(f"a record at offset {i} (chunk at {chunk_at}) is cut short")
        kind, ms, length = _RECORD.unpack_from(data, i)
        if kind not in KINDS:
            raise RecordingCorrupt(f"unknown record kind {kind} at offset {i}")
        i += RECORD_HEADER
        if i + length > stop:
            raise RecordingCorrupt(f"record at offset {i - RECORD_HEADER} overruns its chunk")
        yield Record(kind, ms, bytes(data[i : i + length]))
        i += length


def records(data: bytes | memoryview, *, require_end: bool = True) -> Iterator[Record]:
    """Every record of a recording, in order (checked as ``scan`` checks)."""
    _, offset = read_header(data)
    seen_end = False
    for tag, at, start, _ms in _blocks(data, offset):
        if tag == b"E":
            seen_end = True
            break
        (length,) = _U32.unpack_from(data, at + 1)
        yield from _records(data, start, start + length, at)
    if require_end and not seen_end:
        raise RecordingCorrupt("truncated: no end block (the recording was cut off)")
