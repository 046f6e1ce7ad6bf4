"""The client WebSocket frame parser (consoleproxy.protocol.wsframes), without sockets."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consoleproxy.protocol.wsframes import (
    END_OF_MESSAGE,
    Close,
    Event,
    FrameError,
    FrameParser,
    Ping,
    Pong,
    frame,
)

BIN, TEXT, CONT, CLOSE, PING, PONG = 0x2, 0x1, 0x0, 0x8, 0x9, 0xA


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = b"\x11\x22\x33\x44", rsv: int = 0
) -> bytes:
    """A frame as a browser sends it (masked unless ``mask`` is None)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + struct.pack(">H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def joined(events: list[Event]) -> list[object]:
    """Pieces of one message joined into one bytes, the other events as they are."""
    out: list[object] = []
    for ev in events:
        if isinstance(ev, bytes):
            if out and isinstance(out[-1], bytes):
                out[-1] += bytes(ev)
            else:
                out.append(bytes(ev))
        else:
            out.append(ev)
    return out


def parse(data: bytes, max_message: int = 1 << 20, cuts: list[int] | None = None) -> list[object]:
    p = FrameParser(max_message)
    events: list[Event] = []
    prev = 0
    for cut in [*(cuts or []), len(data)]:
        events += p.feed(data[prev:cut])
        prev = cut
    return joined(events)


def error_code(data: bytes, max_message: int = 1 << 20) -> int:
    with pytest.raises(FrameError) as info:
        parse(data, max_message)
    return info.value.code


def test_binary_frame_is_unmasked() -> None:
    payload = os.urandom(1000)
    assert parse(client_frame(BIN, payload)) == [payload, END_OF_MESSAGE]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_001])
def test_payload_lengths_7_16_and_64_bit(size: int) -> None:
    payload = os.urandom(size)
    expected: list[object] = [payload, END_OF_MESSAGE] if size else [END_OF_MESSAGE]
    assert parse(client_frame(BIN, payload)) == expected


def test_unmasked_client_frame_is_1002() -> None:
    assert error_code(client_frame(BIN, b"abc", mask=None)) == 1002


def test_text_frame_is_1003() -> None:
    assert error_code(client_frame(TEXT, b"hello")) == 1003


def test_reserved_bits_and_unknown_opcodes_are_1002() -> None:
    assert error_code(client_frame(BIN, b"x", rsv=0x40)) == 1002
    assert error_code(client_frame(0x3, b"x")) == 1002
    assert error_code(client_frame(0xB, b"x")) == 1002


def test_fragmented_message_with_a_ping_in_between() -> None:
    data = (
        client_frame(BIN, b"abc", fin=False)
        + client_frame(PING, b"p")
        + client_frame(CONT, b"def", fin=False)
        + client_frame(CONT, b"g")
    )
    assert parse(data) == [b"abc", Ping(b"p"), b"defg", END_OF_MESSAGE]


def test_continuation_without_a_message_is_1002() -> None:
    assert error_code(client_frame(CONT, b"x")) == 1002


def test_new_message_inside_a_fragmented_one_is_1002() -> None:
    assert error_code(client_frame(BIN, b"a", fin=False) + client_frame(BIN, b"b")) == 1002


def test_control_frames_are_short_and_not_fragmented() -> None:
    assert parse(client_frame(PING, bytes(125))) == [Ping(bytes(125))]
    assert error_code(client_frame(PING, bytes(126))) == 1002
    assert error_code(client_frame(PONG, b"x", fin=False)) == 1002


def test_message_over_the_cap_is_1009_single_and_fragmented() -> None:
    assert parse(client_frame(BIN, bytes(100)), max_message=100) == [bytes(100), END_OF_MESSAGE]
    assert error_code(client_frame(BIN, bytes(101)), max_message=100) == 1009
    fragments = client_frame(BIN, bytes(60), fin=False) + client_frame(CONT, bytes(41))
    assert error_code(fragments, max_message=100) == 1009
    # The cap is per message: two messages of 100 bytes each are fine.
    two = client_frame(BIN, bytes(100)) * 2
    assert parse(two, max_message=100) == [bytes(100), END_OF_MESSAGE, bytes(100), END_OF_MESSAGE]


def test_cap_is_checked_from_the_header_before_the_payload_arrives() -> None:
    p = FrameParser(100)
    with pytest.raises(FrameError) as info:
        p.feed(client_frame(BIN, bytes(5000))[:20])
    assert info.value.code == 1009


def test_close_frames() -> None:
    assert parse(client_frame(CLOSE, struct.pack(">H", 1000) + "bye ✓".encode())) == [Close(1000, "bye ✓")]
    assert parse(client_frame(CLOSE, b"")) == [Close(None, "")]
    assert parse(client_frame(CLOSE, struct.pack(">H", 4000))) == [Close(4000, "")]
    assert error_code(client_frame(CLOSE, b"\x03")) == 1002
    assert error_code(client_frame(CLOSE, struct.pack(">H", 1005))) == 1002
    assert error_code(client_frame(CLOSE, struct.pack(">H", 999))) == 1002
    assert error_code(client_frame(CLOSE, struct.pack(">H", 1000) + b"\xff")) == 1007


def test_pong() -> None:
    assert parse(client_frame(PONG, b"hb")) == [Pong(b"hb")]


def test_64_bit_length_with_top_bit_is_1002() -> None:
    head = bytes((0x82, 0xFF)) + struct.pack(">Q", 1 << 63) + b"\0\0\0\0"
    assert error_code(head) == 1002


STREAM = (
    client_frame(BIN, os.urandom(300), fin=False)  # 16-bit length
    + client_frame(PING, b"ping!")
    + client_frame(CONT, os.urandom(7))
    + client_frame(BIN, b"")
    + client_frame(BIN, os.urandom(70_000))  # 64-bit length
    + client_frame(PONG, b"")
    + client_frame(CLOSE, struct.pack(">H", 1001) + b"away")
)


def test_split_at_every_point_gives_the_same_events() -> None:
    whole = parse(STREAM)
    assert whole[-1] == Close(1001, "away")
    for cut in list(range(0, 400)) + list(range(len(STREAM) - 200, len(STREAM) + 1)):
        assert parse(STREAM, cuts=[cut]) == whole, cut


def test_fed_one_byte_at_a_time() -> None:
    data = client_frame(BIN, os.urandom(1000)) + client_frame(PING, b"x") + client_frame(BIN, b"end")
    assert parse(data, cuts=list(range(1, len(data)))) == parse(data)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=70_000), min_size=1, max_size=6),
    fragments=st.integers(min_value=1, max_value=4),
    mask=st.binary(min_size=4, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=12),
)
def test_random_messages_and_chunking(sizes: list[int], fragments: int, mask: bytes, cuts: list[int]) -> None:
    data = b""
    expected: list[object] = []
    for size in sizes:
        payload = bytes(i * 7 % 251 for i in range(size))
        step = max(1, -(-size // fragments))
        parts = [payload[i : i + step] for i in range(0, size, step)] or [b""]
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            data += client_frame(BIN if j == 0 else CONT, part, fin=last, mask=mask)
        if size:
            expected.append(payload)
        expected.append(END_OF_MESSAGE)
    points = sorted(c for c in cuts if c <= len(data))
    assert parse(data, cuts=points) == expected


def test_server_frames() -> None:
    assert frame(PONG, b"hb") == b"\x8a\x02hb"
    assert frame(BIN, bytes(200))[:4] == b"\x82\x7e\x00\xc8"
    assert frame(BIN, bytes(70_000))[:2] == b"\x82\x7f"
