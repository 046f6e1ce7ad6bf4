import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consoleproxy.protocol.proxyproto import V2_SIGNATURE, ProxyHeader, ProxyProtocolError, parse


def v2(cmd: int = 1, fam: int = 0x11, body: bytes | None = None) -> bytes:
    if body is None:
        body = bytes([192, 0, 2, 1, 10, 0, 0, 5]) + struct.pack(">HH", 51234, 443)
    return V2_SIGNATURE + bytes([0x20 | cmd, fam]) + struct.pack(">H", len(body)) + body


def test_v2_ipv4() -> None:
    data = v2() + b"\x16\x03\x01"  # TLS ClientHello follows
    h = parse(data)
    assert h == ProxyHeader(28, ("192.0.2.1", 51234), ("10.0.0.5", 443))
    assert data[h.length :] == b"\x16\x03\x01"


def test_v2_ipv6_with_tlvs_and_local() -> None:
    src = bytes(15) + b"\x01"
    body = src + bytes(16) + struct.pack(">HH", 1, 2) + b"\x01\x00\x02h2"  # ALPN TLV
    h = parse(v2(fam=0x21, body=body))
    assert h is not None and h.source == ("::1", 1) and h.length == 16 + len(body)
    local = parse(v2(cmd=0, fam=0, body=b""))
    assert local == ProxyHeader(16, None, None)


def test_v1() -> None:
    line = b"PROXY TCP4 192.0.2.1 10.0.0.5 51234 443\r\nGET /"
    h = parse(line)
    assert h == ProxyHeader(len(line) - 5, ("192.0.2.1", 51234), ("10.0.0.5", 443))
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(15, None, None)


@pytest.mark.parametrize("cut", [1, 5, 12, 15, 20])
def test_incomplete_needs_more(cut: int) -> None:
    assert parse(v2()[:cut]) is None
    assert parse(b"PROXY TCP4 192.0.2.1 10.0.0.5 1 2\r\n"[:cut]) is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "did not start with a PROXY"),
        (b"\x16\x03\x01\x02\x00", "did not start with a PROXY"),
        (V2_SIGNATURE + b"\x11\x11\x00\x00", "version 1 is not 2"),
        (V2_SIGNATURE + b"\x22\x11\x00\x00", "command 2"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04abcd", "IPv4 address block is short"),
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "not STREAM"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "too long"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port malformed"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "do not match TCP4"),
        (b"PROXY TCP4 nope 5.6.7.8 1 2\r\n", "address malformed"),
        (b"PROXY " + b"x" * 120, "longer than 107"),
    ],
)
def test_rejects(data: bytes, why: str) -> None:
    with pytest.raises(ProxyProtocolError, match=why):
        parse(data)


@given(st.binary(max_size=300))
def test_random_bytes_only_named_error(data: bytes) -> None:
    try:
        h = parse(data)
    except ProxyProtocolError:
        return
    assert h is None or 0 < h.length <= len(data)
