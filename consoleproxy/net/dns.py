"""Authoritative DNS responder for the wildcard console host names (DESIGN.md 1, 3, 4, 9).

``a-b-c-d.<zone>`` A queries are answered with ``a.b.c.d`` straight from the name, so the wildcard
mode needs no zone file and no per-host records. The zone apex carries SOA, NS and, in FQDN mode,
A/AAAA records from the settings. ``_acme-challenge.<name>.<zone>`` TXT queries are answered from
the ACME orderer's records in flight (``acme_policy.ChallengeRecords``), with TTL 0 so no resolver
keeps a stale challenge value.

Standards followed:

* RFC 1034 / RFC 1035 - message format, authoritative answers, REFUSED for names outside the zone,
  FORMERR / NOTIMP;
* RFC 2181 - TC semantics (a truncated answer carries no partial RRsets);
* RFC 2308 - negative answers: NXDOMAIN and NODATA with the SOA in the authority section, its TTL
  being min(SOA TTL, SOA MINIMUM);
* RFC 4343 - case-insensitive matching, the question echoed with its case intact;
* RFC 6891 - EDNS(0): OPT echoed with our payload size (1232, as DNS Flag Day 2020 recommends),
  BADVERS for EDNS versions above 0;
* RFC 7766 - DNS over TCP: 2-byte length framing, several queries per connection, idle timeout;
* RFC 8482 - minimal answers to ANY queries.

``Responder`` is the pure core (bytes in, bytes or None out); ``DnsServer`` is the asyncio glue.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

from consoleproxy.errors import HostnameError
from consoleproxy.metrics import Metrics
from consoleproxy.policy.acme_policy import ChallengeRecords
from consoleproxy.protocol.hostnames import ip_for_hostname, normalize_suffix

__all__ = [
    "OUR_PAYLOAD",
    "TCP_IDLE_TIMEOUT",
    "DnsServer",
    "DnsSettings",
    "Responder",
    "parse_listen",
    "serve_forever",
]

log = logging.getLogger("consoleproxy.dns")

# DNS Flag Day 2020: 1232 bytes avoids IP fragmentation on practically every path.
OUR_PAYLOAD = 1232
# RFC 1035 4.2.1: without EDNS a UDP message is at most 512 bytes.
_CLASSIC_UDP = 512
TCP_IDLE_TIMEOUT = 10.0
# RFC 2181 8: TTLs are unsigned 31-bit values.
_MAX_TTL = 2**31 - 1
# Bounds the rate limiter's memory when a flood comes from many (possibly spoofed) sources.
_MAX_BUCKETS = 65536
# dnspython's rdata constructors are untyped; these aliases give mypy --strict a signature.
_A: Callable[..., dns.rdata.Rdata] = dns.rdtypes.IN.A.A
_AAAA: Callable[..., dns.rdata.Rdata] = dns.rdtypes.IN.AAAA.AAAA
_TXT: Callable[..., dns.rdata.Rdata] = dns.rdtypes.ANY.TXT.TXT
_ACME_LABEL = b"_acme-challenge"
_NS: Callable[..., dns.rdata.Rdata] = dns.rdtypes.ANY.NS.NS
_SOA: Callable[..., dns.rdata.Rdata] = dns.rdtypes.ANY.SOA.SOA
# Metric label for packets we answer with nothing.
DROPPED = "DROPPED"

_QR = 0x8000
_RD = 0x0100


def parse_listen(text: str) -> tuple[str, int]:
    """``"0.0.0.0:53"`` -> ``("0.0.0.0", 53)``; ``"[::1]:5353"`` -> ``("::1", 5353)``.

    The host must be an IP literal: binding to a name that resolves to several addresses would
    leave UDP and TCP on different ones. Raises ValueError with a message fit for the command line.
    """
    t = text.strip()
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or t[end + 1 : end + 2] != ":":
            raise ValueError(f"listen address {text!r}: expected [IPV6]:PORT, e.g. [::1]:53")
        host, port_text = t[1:end], t[end + 2 :]
    else:
        host, sep, port_text = t.rpartition(":")
        if not sep or not host:
            raise ValueError(f"listen address {text!r}: expected HOST:PORT, e.g. 0.0.0.0:53 or [::1]:53")
        if ":" in host:
            raise ValueError(f"listen address {text!r}: put an IPv6 address in brackets, e.g. [::1]:53")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"listen address {text!r}: {host!r} is not an IP address") from None
    if t.startswith("[") and addr.version != 6:
        raise ValueError(f"listen address {text!r}: brackets are for IPv6 addresses only")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"listen address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def _check_ttl(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TTL:
        raise ValueError(f"dns {name} must be an integer from 0 to {_MAX_TTL}, got {value!r}")


def _dns_name(text: str, what: str) -> dns.name.Name:
    try:
        name = dns.name.from_text(text.strip().rstrip(".") + ".")
    except dns.exception.DNSException as exc:
        raise ValueError(f"dns {what} {text!r} is not a valid domain name: {exc}") from None
    if name == dns.name.root:
        raise ValueError(f"dns {what} is empty")
    return name


def _mailbox_name(email: str) -> dns.name.Name:
    """``john.doe@example.com`` -> ``john\\.doe.example.com.`` (RFC 1035 8: the local part is one label)."""
    if "@" not in email:
        return _dns_name(email, "soa_email")
    local, _, domain = email.rpartition("@")
    if not local or len(local.encode()) > 63:
        raise ValueError(f"dns soa_email {email!r}: bad local part")
    return dns.name.Name((local.encode(), *_dns_name(domain, "soa_email").labels))


@dataclass(frozen=True)
class DnsSettings:
    """What the responder serves; values are checked and normalized at construction (ValueError)."""

    zone: str
    listen: str = "0.0.0.0:53"
    ttl: int = 300
    # NS names for the apex; ``("ns1.<zone>",)`` when empty.
    nameservers: tuple[str, ...] = ()
    # A/AAAA answered for the apex itself (FQDN / load-balanced mode).
    apex_addresses: tuple[str, ...] = ()
    # CIDRs; when non-empty, a-b-c-d names outside them are NXDOMAIN.
    public_ranges: tuple[str, ...] = ()
    # SOA RNAME as an address or a domain name; ``hostmaster.<zone>`` when empty.
    soa_email: str = ""
    # Per source IP, UDP only (TCP sources cannot be spoofed and are bounded by max_tcp_clients).
    rate_limit_qps: float = 0
    max_tcp_clients: int = 128
    # A/AAAA for nameserver names inside the zone (and glue in NS answers); NODATA when empty.
    nameserver_addresses: tuple[str, ...] = ()
    # SOA MINIMUM: how long resolvers may cache NXDOMAIN/NODATA (RFC 2308 5).
    negative_ttl: int = 60

    def __post_init__(self) -> None:
        try:
            zone = normalize_suffix(self.zone)
        except HostnameError as exc:
            raise ValueError(f"dns zone: {exc}") from exc
        # Frozen dataclass: normalization has to go through object.__setattr__.
        object.__setattr__(self, "zone", zone)
        parse_listen(self.listen)
        _check_ttl("ttl", self.ttl)
        _check_ttl("negative_ttl", self.negative_ttl)
        nameservers = tuple(self.nameservers) or (f"ns1.{zone}",)
        names = tuple(_dns_name(n, "nameserver").to_text(omit_final_dot=True).lower() for n in nameservers)
        object.__setattr__(self, "nameservers", names)
        for field in ("apex_addresses", "nameserver_addresses"):
            values = []
            for a in getattr(self, field):
                try:
                    values.append(str(ipaddress.ip_address(str(a).strip())))
                except ValueError:
                    raise ValueError(f"dns {field}: {a!r} is not an IP address") from None
            object.__setattr__(self, field, tuple(values))
        ranges = []
        for r in self.public_ranges:
            try:
                ranges.append(str(ipaddress.ip_network(str(r).strip(), strict=False)))
            except ValueError:
                raise ValueError(f"dns public_ranges: {r!r} is not a CIDR") from None
        object.__setattr__(self, "public_ranges", tuple(ranges))
        email = self.soa_email.strip() or f"hostmaster.{zone}"
        _mailbox_name(email)
        object.__setattr__(self, "soa_email", email)
        qps = float(self.rate_limit_qps)
        if not math.isfinite(qps) or qps < 0:
            raise ValueError(f"dns rate_limit_qps must be >= 0 (0 = off), got {self.rate_limit_qps!r}")
        object.__setattr__(self, "rate_limit_qps", qps)
        if isinstance(self.max_tcp_clients, bool) or not isinstance(self.max_tcp_clients, int):
            raise ValueError("dns max_tcp_clients must be an integer")
        if self.max_tcp_clients < 1:
            raise ValueError(f"dns max_tcp_clients must be >= 1, got {self.max_tcp_clients}")


def _address_rrsets(
    owner: dns.name.Name, ttl: int, addresses: tuple[str, ...], qtype: int
) -> list[dns.rrset.RRset]:
    out: list[dns.rrset.RRset] = []
    for rdtype, cls, version in (
        (dns.rdatatype.A, _A, 4),
        (dns.rdatatype.AAAA, _AAAA, 6),
    ):
        if qtype != rdtype:
            continue
        rdatas = [
            cls(dns.rdataclass.IN, rdtype, a) for a in addresses if ipaddress.ip_address(a).version == version
        ]
        if rdatas:
            out.append(dns.rrset.from_rdata_list(owner, ttl, rdatas))
    return out


class Responder:
    """Pure DNS logic: ``handle(query bytes) -> response bytes | None`` (None = drop).

    ``clock`` (seconds, monotonic) is only used by the rate limiter and may be replaced by tests.
    ``internal_errors`` counts unexpected exceptions, each logged and turned into a drop.
    """

    def __init__(
        self,
        settings: DnsSettings,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        challenges: ChallengeRecords | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        # ACME DNS-01 answers in flight; None: no _acme-challenge name exists.
        self.challenges = challenges
        self.internal_errors = 0
        s = settings
        self._zone = dns.name.from_text(s.zone + ".")
        self._zone_depth = len(self._zone)
        self._ns_names = [dns.name.from_text(n + ".") for n in s.nameservers]
        self._networks = [ipaddress.ip_network(r) for r in s.public_ranges]
        self._neg_ttl = min(s.ttl, s.negative_ttl)
        # Serial 1 for good: the zone is synthesized from settings and never transferred, and a
        # fixed value keeps every instance behind one name in agreement.
        self._soa = _SOA(
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            self._ns_names[0],
            _mailbox_name(s.soa_email),
            1,
            3600,
            600,
            1209600,
            s.negative_ttl,
        )
        self._ns_rdatas = [_NS(dns.rdataclass.IN, dns.rdatatype.NS, n) for n in self._ns_names]
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    # -- entry point -------------------------------------------------------------------------

    def handle(self, wire: bytes, *, tcp: bool = False, source: str | None = None) -> bytes | None:
        """Answer one DNS message; ``source`` is the client IP (rate limiting, UDP only)."""
        try:
            if source is not None and not tcp and not self._allow(source):
                reply, label = None, DROPPED
            else:
                reply, label = self._handle(wire, tcp)
        except Exception:
            # A bug must cost one answer, never the server.
            self.internal_errors += 1
            log.exception("dns: unexpected error on a %d-byte message; dropped", len(wire))
            reply, label = None, DROPPED
        if self.metrics is not None:
            self.metrics.dns_queries_total.labels(rcode=label).inc()
        return reply

    # -- rate limiting -----------------------------------------------------------------------

    def _allow(self, source: str) -> bool:
        """Token bucket per source IP: ``rate_limit_qps`` tokens a second, burst twice that."""
        qps = self.settings.rate_limit_qps
        if qps <= 0:
            return True
        burst = max(1.0, 2 * qps)
        now = self.clock()
        entry = self._buckets.get(source)
        if entry is None:
            tokens = burst
        else:
            # max(0, ...): a clock that steps back must not drain the bucket.
            tokens = min(burst, entry[0] + max(0.0, now - entry[1]) * qps)
            self._buckets.move_to_end(source)
        allowed = tokens >= 1
        self._buckets[source] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > _MAX_BUCKETS:
            # Forget the least recently seen source; at worst it gets a fresh (full) bucket.
            self._buckets.popitem(last=False)
        return allowed

    # -- message level -----------------------------------------------------------------------

    @staticmethod
    def _header_only(msg_id: int, flags: int, rcode: dns.rcode.Rcode) -> tuple[bytes, str]:
        # Used when the question cannot be trusted (or the opcode has other section rules):
        # echo ID, opcode and RD, no sections (RFC 1035 4.1.1).
        out_flags = _QR | (flags & 0x7800) | (flags & _RD) | (rcode & 0xF)
        return struct.pack("!HHHHHH", msg_id, out_flags, 0, 0, 0, 0), dns.rcode.to_text(rcode)

    def _handle(self, wire: bytes, tcp: bool) -> tuple[bytes | None, str]:
        if len(wire) < 12:
            return None, DROPPED  # not even a header: nothing to address a reply to
        msg_id, flags = struct.unpack_from("!HH", wire)
        if flags & _QR:
            return None, DROPPED  # a response: answering could start a loop between servers
        if (flags >> 11) & 0xF != dns.opcode.QUERY:
            return self._header_only(msg_id, flags, dns.rcode.NOTIMP)
        try:
            query = dns.message.from_wire(wire)
        except dns.message.UnknownTSIGKey:
            # We hold no TSIG keys (RFC 8945 5.2.2 answers NOTAUTH for an unknown key).
            return self._header_only(msg_id, flags, dns.rcode.NOTAUTH)
        except Exception:
            # The header was readable, so the client can be told its message was malformed.
            return self._header_only(msg_id, flags, dns.rcode.FORMERR)
        if len(query.question) != 1:
            return self._header_only(msg_id, flags, dns.rcode.FORMERR)

        response = dns.message.make_response(query, our_payload=OUR_PAYLOAD)
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)  # RFC 6891 6.1.3; the OPT we send is version 0
        else:
            q = query.question[0]
            response.set_rcode(self._answer(q.name, q.rdtype, q.rdclass, response))

        if tcp:
            limit = 65535
        elif query.edns >= 0:
            limit = max(_CLASSIC_UDP, min(query.payload, OUR_PAYLOAD))
        else:
            limit = _CLASSIC_UDP
        try:
            out = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 2181 9: drop whole sections and set TC so the client retries over TCP.
            response.answer = []
            response.authority = []
            response.additional = []
            response.flags |= dns.flags.TC
            out = response.to_wire(max_size=limit)
        return out, dns.rcode.to_text(response.rcode())

    # -- zone logic --------------------------------------------------------------------------

    def _negative(self, response: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.rcode.Rcode:
        # RFC 2308 3 and 5: SOA in authority, TTL = min(SOA TTL, SOA MINIMUM).
        response.authority.append(dns.rrset.from_rdata_list(self._zone, self._neg_ttl, [self._soa]))
        return rcode

    def _synthesized(self, qname: dns.name.Name) -> ipaddress.IPv4Address | None:
        if len(qname) != self._zone_depth + 1:
            return None
        try:
            label = qname.labels[0].decode("ascii")
            addr = ip_for_hostname(f"{label}.{self.settings.zone}", self.settings.zone)
        except (UnicodeDecodeError, HostnameError):
            return None
        if self._networks and not any(addr in net for net in self._networks):
            return None
        return addr

    def _answer(
        self, qname: dns.name.Name, qtype: int, qclass: int, response: dns.message.Message
    ) -> dns.rcode.Rcode:
        if qclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            return dns.rcode.REFUSED
        if not qname.is_subdomain(self._zone):
            return dns.rcode.REFUSED
        if qtype in (dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY):
            return dns.rcode.FORMERR  # pseudo-types are not questions
        if qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            return dns.rcode.REFUSED  # the zone is synthesized; there is nothing to transfer
        response.flags |= dns.flags.AA
        s = self.settings
        answer = response.answer
        if qname == self._zone:
            if qtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
                # ANY gets the SOA alone (RFC 8482 4.2: one RRset is a complete answer).
                answer.append(dns.rrset.from_rdata_list(qname, s.ttl, [self._soa]))
            elif qtype == dns.rdatatype.NS:
                answer.append(dns.rrset.from_rdata_list(qname, s.ttl, self._ns_rdatas))
                for ns in self._ns_names:
                    if ns.is_subdomain(self._zone):
                        for t in (dns.rdatatype.A, dns.rdatatype.AAAA):
                            response.additional.extend(_address_rrsets(ns, s.ttl, s.nameserver_addresses, t))
            else:
                answer.extend(_address_rrsets(qname, s.ttl, s.apex_addresses, qtype))
            return dns.rcode.NOERROR if answer else self._negative(response, dns.rcode.NOERROR)
        if any(qname == ns for ns in self._ns_names):
            wanted = dns.rdatatype.A if qtype == dns.rdatatype.ANY else qtype
            answer.extend(_address_rrsets(qname, s.ttl, s.nameserver_addresses, wanted))
            return dns.rcode.NOERROR if answer else self._negative(response, dns.rcode.NOERROR)
        if self.challenges is not None and qname.labels[0].lower() == _ACME_LABEL:
            values = self.challenges.txt(qname.to_text(omit_final_dot=True))
            if not values:
                return self._negative(response, dns.rcode.NXDOMAIN)
            if qtype in (dns.rdatatype.TXT, dns.rdatatype.ANY):
                rds = [_TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [v.encode("ascii")]) for v in values]
                answer.append(dns.rrset.from_rdata_list(qname, 0, rds))
                return dns.rcode.NOERROR
            return self._negative(response, dns.rcode.NOERROR)
        addr = self._synthesized(qname)
        if addr is None:
            if any(ns.is_subdomain(qname) for ns in self._ns_names):
                # Empty non-terminal above an in-zone nameserver name: exists, holds no data.
                return self._negative(response, dns.rcode.NOERROR)
            return self._negative(response, dns.rcode.NXDOMAIN)
        if qtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            rd = _A(dns.rdataclass.IN, dns.rdatatype.A, str(addr))
            answer.append(dns.rrset.from_rdata_list(qname, s.ttl, [rd]))
            return dns.rcode.NOERROR
        return self._negative(response, dns.rcode.NOERROR)  # NODATA (e.g. AAAA)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            reply = self.responder.handle(data, source=str(addr[0]))
            if reply is not None and self.transport is not None:
                self.transport.sendto(reply, addr)
        except Exception:
            log.exception("dns: UDP reply to %s failed", addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (client went away); nothing to do but note it.
        log.debug("dns: UDP error: %s", exc)


class DnsServer:
    """UDP and TCP listeners on ``settings.listen`` (same port for both) around one ``Responder``."""

    def __init__(
        self,
        settings: DnsSettings,
        metrics: Metrics | None = None,
        *,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        challenges: ChallengeRecords | None = None,
    ) -> None:
        self.settings = settings
        self.responder = Responder(settings, metrics, challenges=challenges)
        self.tcp_idle_timeout = tcp_idle_timeout
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        host, port = parse_listen(self.settings.listen)
        loop = asyncio.get_running_loop()
        # With port 0 the kernel picks the UDP port and TCP must follow; another process may own
        # that TCP port already, so try again with a fresh UDP port a few times.
        attempts = 5 if port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self.responder), local_addr=(host, port)
            )
            bound = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:
                udp.close()
                if attempt == attempts - 1:
                    raise
                continue
            self._udp = udp
            break
        log.info("dns: serving zone %s on %s port %d (UDP and TCP)", self.settings.zone, host, self.port)

    @property
    def sockets(self) -> list[socket.socket]:
        out: list[socket.socket] = []
        if self._udp is not None:
            out.append(self._udp.get_extra_info("socket"))
        if self._tcp is not None:
            out.extend(self._tcp.sockets)
        return out

    @property
    def port(self) -> int:
        if self._udp is None:
            raise RuntimeError("DnsServer is not started")
        return int(self._udp.get_extra_info("sockname")[1])

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_writers) >= self.settings.max_tcp_clients:
            # Bounded: a connection flood must not exhaust file descriptors or memory.
            log.debug("dns: TCP client limit %d reached; closing", self.settings.max_tcp_clients)
            writer.close()
            return
        self._tcp_writers.add(writer)
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else None
        try:
            while True:
                try:
                    # One budget for read + answer + write: covers idle clients, slow senders
                    # (slowloris) and clients that never read their answers.
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        wire = await reader.readexactly(length)
                        reply = self.responder.handle(wire, tcp=True, source=source)
                        if reply is None:
                            return  # unanswerable: the stream may be garbage from here on
                        writer.write(struct.pack("!H", len(reply)) + reply)
                        await writer.drain()
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
        except Exception:
            log.exception("dns: TCP connection from %s failed", source)
        finally:
            self._tcp_writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve_forever(settings: DnsSettings, metrics: Metrics | None = None) -> None:
    """Run the responder until cancelled (``consoleproxy dns serve``)."""
    server = DnsServer(settings, metrics)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
