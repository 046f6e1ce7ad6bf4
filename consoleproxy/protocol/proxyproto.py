"""PROXY protocol header parsing (HAProxy's "PROXY protocol" specification, versions 1 and 2).

Behind a TCP load balancer every connection seems to come from the balancer; the PROXY header
that the balancer sends first carries the browser's address, which the token's client-IP binding
and the per-client limits need. Pure code: ``parse(data)`` takes the bytes received so far and
returns ``None`` (need more), or a ``ProxyHeader`` with the header's length, or raises
``ProxyProtocolError`` naming the rule broken. A listener that expects the header must refuse a
connection without one: anyone could otherwise claim any address.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from consoleproxy.errors import ConsoleProxyError

__all__ = ["V2_SIGNATURE", "ProxyHeader", "ProxyProtocolError", "parse"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the longest v1 line, CRLF included
_V2_MAX_BODY = 4096  # TLVs can follow the addresses; more than this is not a real balancer


class ProxyProtocolError(ConsoleProxyError):
    """The connection did not start with a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    length: int  # bytes the header took; the application's data starts after them
    source: tuple[str, int] | None  # None for LOCAL (health checks) and UNKNOWN
    destination: tuple[str, int] | None


def parse(data: bytes) -> ProxyHeader | None:
    """Parse a PROXY header at the start of ``data``; None when more bytes are needed."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    if data:
        raise ProxyProtocolError("connection did not start with a PROXY protocol header")
    return None


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not b"PROXY "[: len(data)].startswith(data[:6]):
        raise ProxyProtocolError("connection did not start with a PROXY protocol header")
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ProxyProtocolError("PROXY v1 line longer than 107 bytes")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(end + 2, None, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1 line malformed: {line[:60]!r}")
    _, family, src, dst, sport, dport = parts
    version = 4 if family == "TCP4" else 6
    try:
        s = ipaddress.ip_address(src)
        d = ipaddress.ip_address(dst)
    except ValueError:
        raise ProxyProtocolError("PROXY v1 address malformed") from None
    if s.version != version or d.version != version:
        raise ProxyProtocolError(f"PROXY v1 addresses do not match {family}")
    ports = []
    for p in (sport, dport):
        if not p.isdigit() or (len(p) > 1 and p[0] == "0") or int(p) > 65535:
            raise ProxyProtocolError(f"PROXY v1 port malformed: {p!r}")
        ports.append(int(p))
    return ProxyHeader(end + 2, (str(s), ports[0]), (str(d), ports[1]))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    n = min(len(data), 12)
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyProtocolError("connection did not start with a PROXY protocol header")
    if len(data) < 16:
        return None
    ver_cmd, fam, length = struct.unpack_from(">BBH", data, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 version {ver_cmd >> 4} is not 2")
    cmd = ver_cmd & 0x0F
    if cmd > 1:
        raise ProxyProtocolError(f"PROXY v2 command {cmd} is neither LOCAL nor PROXY")
    if length > _V2_MAX_BODY:
        raise ProxyProtocolError(f"PROXY v2 header of {length} bytes is too long")
    total = 16 + length
    if len(data) < total:
        return None
    if cmd == 0:  # LOCAL: the balancer's own connection (health check); use the real peer
        return ProxyHeader(total, None, None)
    body = data[16:total]
    family, proto = fam >> 4, fam & 0x0F
    if family == 0 or proto == 0:
        return ProxyHeader(total, None, None)  # UNSPEC: keep the real peer
    if proto != 1:
        raise ProxyProtocolError("PROXY v2 transport is not STREAM (TCP)")
    if family == 1:
        if length < 12:
            raise ProxyProtocolError("PROXY v2 IPv4 address block is short")
        src4, dst4, sport, dport = struct.unpack_from(">4s4sHH", body)
        return ProxyHeader(
            total,
            (str(ipaddress.IPv4Address(src4)), sport),
            (str(ipaddress.IPv4Address(dst4)), dport),
        )
    if family == 2:
        if length < 36:
            raise ProxyProtocolError("PROXY v2 IPv6 address block is short")
        src6, dst6, sport, dport = struct.unpack_from(">16s16sHH", body)
        return ProxyHeader(
            total,
            (str(ipaddress.IPv6Address(src6)), sport),
            (str(ipaddress.IPv6Address(dst6)), dport),
        )
    if family == 3:
        return ProxyHeader(total, None, None)  # AF_UNIX: no IP to learn
    raise ProxyProtocolError(f"PROXY v2 address family {family} unknown")
