"""DNS responder (consoleproxy.net.dns): pure Responder tests, real dig, dnspython resolver, fuzzing.

Live tests run the DnsServer on its own event loop in a thread, so blocking clients (dig via
subprocess, plain sockets, hypothesis) can talk to it from the test thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsigkeyring
import pytest
from conftest import require_tool
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from consoleproxy.metrics import Metrics
from consoleproxy.net.dns import OUR_PAYLOAD, DnsServer, DnsSettings, Responder, parse_listen, serve_forever

ZONE = "consoleproxy.company.com"
ROOT = Path(__file__).resolve().parents[2]


def make(**kw: Any) -> DnsSettings:
    kw.setdefault("zone", "*." + ZONE)
    return DnsSettings(**kw)


def ask(
    responder: Responder,
    name: str | dns.name.Name,
    rdtype: str = "A",
    *,
    tcp: bool = False,
    source: str | None = None,
    **query_kw: Any,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **query_kw)
    wire = responder.handle(query.to_wire(), tcp=tcp, source=source)
    assert wire is not None, "query was dropped"
    response = dns.message.from_wire(wire)
    assert response.id == query.id
    assert response.flags & dns.flags.QR
    return response


def rcode_of(r: dns.message.Message) -> str:
    return dns.rcode.to_text(r.rcode())


def answer_texts(r: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in r.answer for rd in rrset]


def assert_negative(r: dns.message.Message, rcode: str, settings: DnsSettings) -> None:
    assert rcode_of(r) == rcode
    assert r.answer == []
    assert r.flags & dns.flags.AA
    (soa,) = r.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text(settings.zone)
    # RFC 2308 5: the negative TTL is min(SOA TTL, SOA MINIMUM).
    assert soa.ttl == min(settings.ttl, soa[0].minimum)


def counted(metrics: Metrics, rcode: str) -> float:
    value = metrics.registry.get_sample_value("consoleproxy_dns_queries_total", {"rcode": rcode})
    return value or 0.0


# --------------------------------------------------------------------------------------------
# Settings and parse_listen


def test_settings_normalize_and_default() -> None:
    s = DnsSettings(zone="*.ConsoleProxy.Company.com.", public_ranges=["10.1.2.3/8"])  # type: ignore[arg-type]
    assert s.zone == ZONE
    assert s.nameservers == (f"ns1.{ZONE}",)
    assert s.soa_email == f"hostmaster.{ZONE}"
    assert s.public_ranges == ("10.0.0.0/8",)


@pytest.mark.parametrize(
    "kw",
    [
        {"zone": "*."},
        {"zone": "a..b"},
        {"listen": "nope"},
        {"ttl": -1},
        {"ttl": 2**31},
        {"apex_addresses": ("1.2.3",)},
        {"public_ranges": ("10.0.0.0/33",)},
        {"rate_limit_qps": -1},
        {"rate_limit_qps": float("nan")},
        {"max_tcp_clients": 0},
        {"nameservers": ("bad..name",)},
    ],
)
def test_settings_reject(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make(**kw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.0.0.0:53", ("0.0.0.0", 53)), ("[::1]:5353", ("::1", 5353)), ("127.0.0.1:0", ("127.0.0.1", 0))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("53", "HOST:PORT"),
        ("::1:53", "brackets"),
        ("[::1]53", r"\[IPV6\]:PORT"),
        ("[127.0.0.1]:53", "IPv6 addresses only"),
        ("localhost:53", "not an IP address"),
        ("127.0.0.1:65536", "port"),
        ("127.0.0.1:x", "port"),
        ("127.0.0.1:", "port"),
    ],
)
def test_parse_listen_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


# --------------------------------------------------------------------------------------------
# Responder: answers


def test_a_record_for_wildcard_name() -> None:
    r = ask(Responder(make()), f"10-1-2-3.{ZONE}")
    assert rcode_of(r) == "NOERROR"
    assert r.flags & dns.flags.AA
    assert not r.flags & dns.flags.RA
    assert answer_texts(r) == ["10.1.2.3"]
    assert r.answer[0].ttl == 300
    assert r.authority == []


def test_ttl_setting_is_used() -> None:
    r = ask(Responder(make(ttl=42)), f"203-0-113-7.{ZONE}")
    assert answer_texts(r) == ["203.0.113.7"]
    assert r.answer[0].ttl == 42


def test_question_case_echoed_exactly() -> None:
    name = "10-1-2-3.CONSOLEPROXY.company.COM."
    query = dns.message.make_query(name, "A")
    wire = Responder(make()).handle(query.to_wire())
    assert wire is not None
    # Raw bytes: the question section starts right after the 12-byte header.
    qname_wire = dns.name.from_text(name).to_wire()
    assert qname_wire is not None
    assert wire[12 : 12 + len(qname_wire)] == qname_wire
    r = dns.message.from_wire(wire)
    assert r.question[0].name.to_text() == name
    assert r.answer[0].name.to_text() == name
    assert answer_texts(r) == ["10.1.2.3"]


def test_apex_soa() -> None:
    s = make(soa_email="dns.admin@company.com", negative_ttl=120)
    r = ask(Responder(s), ZONE, "SOA")
    assert rcode_of(r) == "NOERROR"
    assert r.flags & dns.flags.AA
    (soa,) = r.answer[0]
    assert soa.mname == dns.name.from_text(f"ns1.{ZONE}")
    assert soa.rname.labels[0] == b"dns.admin"  # local part is one label (RFC 1035 8)
    assert soa.rname.parent() == dns.name.from_text("company.com")
    assert soa.minimum == 120


def test_apex_ns_default_and_custom_with_glue() -> None:
    r = ask(Responder(make()), ZONE, "NS")
    assert answer_texts(r) == [f"ns1.{ZONE}."]
    s = make(nameservers=(f"a.{ZONE}", "ns.example.net"), nameserver_addresses=("192.0.2.53", "2001:db8::53"))
    r = ask(Responder(s), ZONE, "NS")
    assert sorted(answer_texts(r)) == [f"a.{ZONE}.", "ns.example.net."]
    glue = {(rrset.name.to_text(), rd.to_text()) for rrset in r.additional for rd in rrset}
    # Glue only for the in-zone name; the out-of-zone one is not ours to answer.
    assert glue == {(f"a.{ZONE}.", "192.0.2.53"), (f"a.{ZONE}.", "2001:db8::53")}
    # The in-zone nameserver name resolves (it must not be NXDOMAIN while the NS points at it).
    assert answer_texts(ask(Responder(s), f"a.{ZONE}", "A")) == ["192.0.2.53"]


def test_default_nameserver_name_exists_without_addresses() -> None:
    s = make()
    r = ask(Responder(s), f"ns1.{ZONE}", "A")
    assert_negative(r, "NOERROR", s)


def test_apex_addresses_fqdn_mode() -> None:
    s = make(apex_addresses=("198.51.100.10", "2001:db8::10", "198.51.100.11"))
    resp = Responder(s)
    assert sorted(answer_texts(ask(resp, ZONE, "A"))) == ["198.51.100.10", "198.51.100.11"]
    assert answer_texts(ask(resp, ZONE, "AAAA")) == ["2001:db8::10"]
    assert_negative(ask(resp, ZONE, "MX"), "NOERROR", s)


def test_apex_without_addresses_is_nodata() -> None:
    s = make()
    assert_negative(ask(Responder(s), ZONE, "A"), "NOERROR", s)


@pytest.mark.parametrize(
    "label",
    [
        "010-1-2-3",  # leading zero
        "256-1-2-3",  # above 255
        "1-2-3",  # three octets
        "1-2-3-4-5",
        "x.1-2-3-4",  # extra label
        "a.b.1-2-3-4",
        "www",
        "1--2-3",
        "-1-2-3-4",
    ],
)
def test_nxdomain_for_malformed_names(label: str) -> None:
    s = make()
    assert_negative(ask(Responder(s), f"{label}.{ZONE}"), "NXDOMAIN", s)


@pytest.mark.parametrize(("ttl", "negative_ttl"), [(300, 60), (30, 60)])
def test_negative_ttl_is_min_of_ttl_and_soa_minimum(ttl: int, negative_ttl: int) -> None:
    s = make(ttl=ttl, negative_ttl=negative_ttl)
    r = ask(Responder(s), f"nope.{ZONE}")
    assert r.authority[0].ttl == min(ttl, negative_ttl)
    assert r.authority[0][0].minimum == negative_ttl


def test_non_ascii_label_is_nxdomain() -> None:
    s = make()
    name = dns.name.Name((b"10-1-2-\xd9\xa3", *dns.name.from_text(ZONE).labels))
    assert_negative(ask(Responder(s), name), "NXDOMAIN", s)


@pytest.mark.parametrize("name", ["example.com", "company.com", f"1-2-3-4.x{ZONE}", "com", "."])
def test_refused_outside_zone(name: str) -> None:
    r = ask(Responder(make()), name)
    assert rcode_of(r) == "REFUSED"
    assert not r.flags & dns.flags.AA
    assert r.answer == [] and r.authority == []


def test_refused_for_other_class() -> None:
    r = ask(Responder(make()), f"10-1-2-3.{ZONE}", "TXT", rdclass=dns.rdataclass.CH)
    assert rcode_of(r) == "REFUSED"


def test_zone_transfer_refused() -> None:
    assert rcode_of(ask(Responder(make()), ZONE, "AXFR")) == "REFUSED"


@pytest.mark.parametrize("rdtype", ["AAAA", "MX", "TXT", "NS", "SOA"])
def test_nodata_for_other_types_of_valid_name(rdtype: str) -> None:
    s = make()
    assert_negative(ask(Responder(s), f"10-1-2-3.{ZONE}", rdtype), "NOERROR", s)


def test_any_answers_the_a_record() -> None:
    r = ask(Responder(make()), f"10-1-2-3.{ZONE}", "ANY")
    assert rcode_of(r) == "NOERROR"
    assert [(rrset.rdtype, rd.to_text()) for rrset in r.answer for rd in rrset] == [
        (dns.rdatatype.A, "10.1.2.3")
    ]


def test_any_at_apex_is_minimal() -> None:
    r = ask(Responder(make()), ZONE, "ANY")
    assert rcode_of(r) == "NOERROR"
    assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.SOA]


def test_public_ranges() -> None:
    s = make(public_ranges=("203.0.113.0/24", "10.0.0.0/8"))
    resp = Responder(s)
    assert answer_texts(ask(resp, f"203-0-113-7.{ZONE}")) == ["203.0.113.7"]
    assert answer_texts(ask(resp, f"10-200-0-1.{ZONE}")) == ["10.200.0.1"]
    assert_negative(ask(resp, f"192-168-1-1.{ZONE}"), "NXDOMAIN", s)
    assert_negative(ask(resp, f"192-168-1-1.{ZONE}", "AAAA"), "NXDOMAIN", s)


# --------------------------------------------------------------------------------------------
# Responder: EDNS and truncation


def test_edns_opt_echoed_with_our_payload() -> None:
    r = ask(Responder(make()), f"10-1-2-3.{ZONE}", use_edns=0, payload=4096)
    assert r.edns == 0
    assert r.payload == OUR_PAYLOAD == 1232
    assert answer_texts(r) == ["10.1.2.3"]


def test_no_opt_without_edns() -> None:
    r = ask(Responder(make()), f"10-1-2-3.{ZONE}", use_edns=False)
    assert r.edns == -1


def test_edns_version_above_zero_gets_badvers() -> None:
    r = ask(Responder(make()), f"10-1-2-3.{ZONE}", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS
    assert r.edns == 0
    assert r.answer == []


def _many(n: int, v6: bool = False) -> tuple[str, ...]:
    return tuple(f"2001:db8::{i:x}" if v6 else f"198.51.{i // 256}.{i % 256}" for i in range(n))


def test_truncation_without_edns_at_512() -> None:
    resp = Responder(make(apex_addresses=_many(40)))  # 40 * 16 bytes > 512
    r = ask(resp, ZONE, "A", use_edns=False)
    assert r.flags & dns.flags.TC
    assert r.answer == []
    assert r.question[0].name == dns.name.from_text(ZONE)
    r = ask(resp, ZONE, "A", use_edns=0, payload=1232)
    assert not r.flags & dns.flags.TC
    assert len(answer_texts(r)) == 40


def test_truncation_at_client_payload_and_our_cap() -> None:
    resp = Responder(make(apex_addresses=_many(60, v6=True)))  # 60 * 28 bytes > 1232
    small = ask(resp, ZONE, "AAAA", use_edns=0, payload=1232)
    assert small.flags & dns.flags.TC and small.answer == [] and small.edns == 0
    # The client may accept 4096, but we cap at 1232 to stay clear of fragmentation.
    big = ask(resp, ZONE, "AAAA", use_edns=0, payload=4096)
    assert big.flags & dns.flags.TC
    # TCP has no such limit.
    full = ask(resp, ZONE, "AAAA", use_edns=0, payload=512, tcp=True)
    assert not full.flags & dns.flags.TC
    assert len(answer_texts(full)) == 60


# --------------------------------------------------------------------------------------------
# Responder: malformed and unusual messages


def _query_wire(name: str = f"10-1-2-3.{ZONE}", rdtype: str = "A") -> bytes:
    return dns.message.make_query(name, rdtype).to_wire()


def _header(wire: bytes) -> tuple[int, int, int, int, int, int]:
    a, b, c, d, e, f = struct.unpack_from("!HHHHHH", wire)
    return a, b, c, d, e, f


def test_multiple_questions_formerr() -> None:
    q = dns.message.make_query(f"10-1-2-3.{ZONE}", "A")
    q.question.append(dns.message.make_query(f"10-1-2-4.{ZONE}", "A").question[0])
    wire = Responder(make()).handle(q.to_wire())
    assert wire is not None
    msg_id, flags, _qd, an, _ns, _ar = _header(wire)
    assert msg_id == q.id
    assert flags & 0x8000 and flags & 0xF == dns.rcode.FORMERR
    assert an == 0


def test_no_question_formerr() -> None:
    wire = struct.pack("!HHHHHH", 0x1234, 0x0100, 0, 0, 0, 0)
    out = Responder(make()).handle(wire)
    assert out is not None
    assert _header(out)[0] == 0x1234
    assert _header(out)[1] & 0xF == dns.rcode.FORMERR


def test_unparsable_body_formerr_with_same_id() -> None:
    wire = _query_wire()
    broken = wire[:12] + b"\xff" * 5  # header says one question; the name is garbage
    out = Responder(make()).handle(broken)
    assert out is not None
    msg_id, flags, *_ = _header(out)
    assert msg_id == _header(wire)[0]
    assert flags & 0x8000
    assert flags & 0xF == dns.rcode.FORMERR
    assert flags & 0x0100  # RD copied


def test_short_packet_dropped() -> None:
    assert Responder(make()).handle(b"\x12\x34\x01") is None
    assert Responder(make()).handle(b"") is None


def test_response_packets_dropped() -> None:
    wire = bytearray(_query_wire())
    wire[2] |= 0x80  # QR
    metrics = Metrics()
    resp = Responder(make(), metrics)
    assert resp.handle(bytes(wire)) is None
    # Dropped on purpose (no reply loops), not by tripping over an error on the way.
    assert resp.internal_errors == 0
    assert counted(metrics, "DROPPED") == 1


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.STATUS, 3])
def test_other_opcodes_notimp(opcode: int) -> None:
    wire = bytearray(_query_wire())
    wire[2] = (wire[2] & 0x87) | (opcode << 3)
    out = Responder(make()).handle(bytes(wire))
    assert out is not None
    _id, flags, *_ = _header(out)
    assert flags & 0xF == dns.rcode.NOTIMP
    assert (flags >> 11) & 0xF == opcode


def test_tsig_signed_query_notauth() -> None:
    q = dns.message.make_query(f"10-1-2-3.{ZONE}", "A")
    q.use_tsig(dns.tsigkeyring.from_text({"key.": "aGVsbG8gd29ybGQ="}), keyname="key.")
    out = Responder(make()).handle(q.to_wire())
    assert out is not None
    assert _header(out)[1] & 0xF == dns.rcode.NOTAUTH


def test_internal_error_is_logged_and_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    resp = Responder(make(), metrics)

    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(resp, "_answer", boom)
    assert resp.handle(_query_wire()) is None
    assert resp.internal_errors == 1
    assert counted(metrics, "DROPPED") == 1
    monkeypatch.undo()
    assert ask(resp, f"10-1-2-3.{ZONE}").answer  # still answers afterwards


# --------------------------------------------------------------------------------------------
# Responder: rate limiting and metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_per_source() -> None:
    clock = FakeClock()
    metrics = Metrics()
    resp = Responder(make(rate_limit_qps=5), metrics, clock=clock)
    wire = _query_wire()
    burst = [resp.handle(wire, source="192.0.2.1") for _ in range(30)]
    answered = sum(r is not None for r in burst)
    assert answered == 10  # burst = 2 * qps
    assert counted(metrics, "DROPPED") == 20
    # Another source has its own bucket.
    assert resp.handle(wire, source="192.0.2.2") is not None
    # Tokens come back with time: one second refills qps tokens.
    clock.now += 1.0
    assert sum(resp.handle(wire, source="192.0.2.1") is not None for _ in range(10)) == 5
    # TCP is not rate limited (its sources are not spoofable; bounded by max_tcp_clients).
    assert resp.handle(wire, tcp=True, source="192.0.2.1") is not None
    # A clock stepping back never drains or overfills the bucket.
    clock.now -= 100
    assert resp.handle(wire, source="192.0.2.1") is None


def test_rate_limit_off_by_default() -> None:
    resp = Responder(make(), clock=FakeClock())
    wire = _query_wire()
    assert all(resp.handle(wire, source="192.0.2.1") is not None for _ in range(200))


def test_rate_limit_below_one_qps_still_allows_one() -> None:
    clock = FakeClock()
    resp = Responder(make(rate_limit_qps=0.1), clock=clock)
    wire = _query_wire()
    assert resp.handle(wire, source="192.0.2.1") is not None
    assert resp.handle(wire, source="192.0.2.1") is None
    clock.now += 10
    assert resp.handle(wire, source="192.0.2.1") is not None


def test_metrics_by_rcode() -> None:
    metrics = Metrics()
    resp = Responder(make(), metrics)
    ask(resp, f"10-1-2-3.{ZONE}")
    ask(resp, f"10-1-2-3.{ZONE}", "AAAA")
    ask(resp, f"bad.{ZONE}")
    ask(resp, "example.com")
    resp.handle(_query_wire()[:12] + b"\xff")
    wire = bytearray(_query_wire())
    wire[2] = (wire[2] & 0x87) | (dns.opcode.NOTIFY << 3)
    resp.handle(bytes(wire))
    resp.handle(b"x")
    assert counted(metrics, "NOERROR") == 2
    assert counted(metrics, "NXDOMAIN") == 1
    assert counted(metrics, "REFUSED") == 1
    assert counted(metrics, "FORMERR") == 1
    assert counted(metrics, "NOTIMP") == 1
    assert counted(metrics, "DROPPED") == 1
    assert b'consoleproxy_dns_queries_total{rcode="NOERROR"} 2.0' in metrics.render()


# --------------------------------------------------------------------------------------------
# Responder: fuzzing

_VALID = [
    _query_wire(f"10-1-2-3.{ZONE}"),
    _query_wire(ZONE, "SOA"),
    _query_wire(ZONE, "NS"),
    _query_wire("example.com"),
    dns.message.make_query(f"10-1-2-3.{ZONE}", "A", use_edns=0, payload=4096).to_wire(),
    dns.message.make_query(
        f"1-2-3-4.{ZONE}",
        "A",
        use_edns=0,
        options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")],
    ).to_wire(),
]


def _check_reply(wire: bytes, out: bytes | None) -> None:
    if out is None:
        return
    response = dns.message.from_wire(out)  # whatever we send must be a well-formed message
    assert response.flags & dns.flags.QR
    assert out[:2] == wire[:2]  # always addressed to the query's ID


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(wire: bytes) -> None:
    resp = Responder(make(rate_limit_qps=0))
    _check_reply(wire, resp.handle(wire))
    _check_reply(wire, resp.handle(wire, tcp=True))
    assert resp.internal_errors == 0


@hsettings(max_examples=200, deadline=None)
@given(st.sampled_from(_VALID), st.data())
def test_fuzz_truncated_and_mutated_queries(valid: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(valid)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=4))
    mutated = bytearray(valid)
    for pos, value in flips:
        mutated[pos] = value
    resp = Responder(make(public_ranges=("10.0.0.0/8",)))
    for wire in (valid[:cut], bytes(mutated), bytes(mutated[:cut])):
        _check_reply(wire, resp.handle(wire))
    assert resp.internal_errors == 0


# --------------------------------------------------------------------------------------------
# Live server (own event loop in a thread)


class LiveServer:
    def __init__(self, settings: DnsSettings, *, tcp_idle_timeout: float = 10.0) -> None:
        self.metrics = Metrics()
        self.server = DnsServer(settings, self.metrics, tcp_idle_timeout=tcp_idle_timeout)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def port(self) -> int:
        return self.server.port


LIVE_SETTINGS = DnsSettings(
    zone="*." + ZONE, listen="127.0.0.1:0", public_ranges=("10.0.0.0/8", "203.0.113.0/24")
)


@pytest.fixture
def live() -> Iterator[LiveServer]:
    with LiveServer(LIVE_SETTINGS) as srv:
        yield srv


def udp_ask(port: int, wire: bytes, timeout: float = 2.0) -> bytes:
    """Send one query and return the reply with the same ID (ignores stray replies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(wire, ("127.0.0.1", port))
        while True:
            data, _ = s.recvfrom(65535)
            if data[:2] == wire[:2]:
                return data


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def test_server_binds_same_port_for_udp_and_tcp(live: LiveServer) -> None:
    socks = live.server.sockets
    kinds = {(s.type, s.getsockname()[1]) for s in socks}
    assert kinds == {(socket.SOCK_DGRAM, live.port), (socket.SOCK_STREAM, live.port)}
    assert live.port != 0


def test_server_udp_answer(live: LiveServer) -> None:
    r = dns.message.from_wire(udp_ask(live.port, _query_wire(f"10-9-8-7.{ZONE}")))
    assert answer_texts(r) == ["10.9.8.7"]


def test_server_tcp_several_queries_per_connection(live: LiveServer) -> None:
    names = [f"10-0-0-{i}.{ZONE}" for i in range(1, 4)]
    wires = [dns.message.make_query(n, "A").to_wire() for n in names]
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
        # Pipelined in one write (RFC 7766 6.2.1.1), answered in order.
        s.sendall(b"".join(struct.pack("!H", len(w)) + w for w in wires))
        for i, w in enumerate(wires):
            (length,) = struct.unpack("!H", recv_exact(s, 2))
            r = dns.message.from_wire(recv_exact(s, length))
            assert r.id == dns.message.from_wire(w).id
            assert answer_texts(r) == [f"10.0.0.{i + 1}"]


def test_server_tcp_idle_timeout_closes() -> None:
    with (
        LiveServer(LIVE_SETTINGS, tcp_idle_timeout=0.3) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s,
    ):
        # Blocks until the server closes; a missing idle timeout shows as socket.timeout here.
        assert s.recv(1) == b""


def tcp_answer(port: int, wire: bytes) -> bytes | None:
    """One framed query on a new connection: the reply, or None if the server closed on us."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("!H", len(wire)) + wire)
        try:
            return recv_exact(s, struct.unpack("!H", recv_exact(s, 2))[0])
        except ConnectionError:  # EOF or RST (we had unread data in flight)
            return None


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.02)
    return True


def test_server_tcp_client_limit() -> None:
    settings = dataclasses.replace(LIVE_SETTINGS, max_tcp_clients=2)
    wire = _query_wire()
    framed = struct.pack("!H", len(wire)) + wire
    with LiveServer(settings) as srv:
        held = []
        try:
            for _ in range(2):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                held.append(s)
                s.sendall(framed)  # an answer proves the server has registered this client
                recv_exact(s, struct.unpack("!H", recv_exact(s, 2))[0])
            assert tcp_answer(srv.port, wire) is None  # third client: closed without an answer
            held.pop().close()
            # The freed slot becomes usable once the server has seen the close.
            assert wait_until(lambda: tcp_answer(srv.port, wire) is not None), "slot never released"
        finally:
            for s in held:
                s.close()


def test_server_survives_handler_exception(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = live.server.responder._answer

    def flaky(qname: dns.name.Name, *args: Any) -> Any:
        if qname.labels[0] == b"boom":
            raise RuntimeError("bug")
        return real(qname, *args)

    monkeypatch.setattr(live.server.responder, "_answer", flaky)
    with pytest.raises(TimeoutError):
        udp_ask(live.port, _query_wire(f"boom.{ZONE}"), timeout=0.5)
    r = dns.message.from_wire(udp_ask(live.port, _query_wire(f"10-1-1-1.{ZONE}")))
    assert answer_texts(r) == ["10.1.1.1"]
    assert live.server.responder.internal_errors == 1


def test_server_survives_garbage_datagrams() -> None:
    with LiveServer(LIVE_SETTINGS) as srv:

        @hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(st.binary(max_size=700), min_size=1, max_size=3))
        def check(garbage: list[bytes]) -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for g in garbage:
                    s.sendto(g, ("127.0.0.1", srv.port))
            r = dns.message.from_wire(udp_ask(srv.port, _query_wire(f"10-4-4-4.{ZONE}")))
            assert answer_texts(r) == ["10.4.4.4"]

        check()
        assert srv.server.responder.internal_errors == 0


def test_server_metrics(live: LiveServer) -> None:
    udp_ask(live.port, _query_wire(f"10-1-2-3.{ZONE}"))
    udp_ask(live.port, _query_wire("example.com"))
    assert counted(live.metrics, "NOERROR") == 1
    assert counted(live.metrics, "REFUSED") == 1


async def test_dnspython_async_resolver() -> None:
    server = DnsServer(LIVE_SETTINGS)
    async with server:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = server.port
        resolver.lifetime = 5
        answer = await resolver.resolve(f"203-0-113-9.{ZONE}", "A")
        assert [rd.to_text() for rd in answer] == ["203.0.113.9"]
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve(f"192-168-0-1.{ZONE}", "A")  # outside public_ranges
        tcp = await resolver.resolve(f"10-2-2-2.{ZONE}", "A", tcp=True)
        assert [rd.to_text() for rd in tcp] == ["10.2.2.2"]


async def test_serve_forever_answers_until_cancelled() -> None:
    # Find a port where both UDP and TCP are free, then hand it to serve_forever.
    probe = DnsServer(LIVE_SETTINGS)
    async with probe:
        port = probe.port
    settings = dataclasses.replace(LIVE_SETTINGS, listen=f"127.0.0.1:{port}")
    task = asyncio.create_task(serve_forever(settings))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.lifetime = 2
    try:
        # The task needs a moment to bind: wait for the first answer, bounded.
        deadline = time.monotonic() + 10
        while True:
            try:
                answer = await resolver.resolve(f"10-3-3-3.{ZONE}", "A", tcp=True)
                break
            except (dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout):
                assert not task.done(), task
                assert time.monotonic() < deadline, "serve_forever never answered"
                await asyncio.sleep(0.02)
        assert [rd.to_text() for rd in answer] == ["10.3.3.3"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Cancelled means closed: the port can be bound again at once.
    again = DnsServer(settings)
    async with again:
        assert again.port == port


async def test_ipv6_listen() -> None:
    if not socket.has_ipv6:
        # a kernel property, not a missing tool, so this may skip under CI too
        pytest.skip("no IPv6 in this environment (not a tool; allowed under CI)")
    server = DnsServer(DnsSettings(zone=ZONE, listen="[::1]:0"))
    try:
        await server.start()
    except OSError as exc:
        pytest.skip(f"cannot bind ::1 here (no IPv6 loopback; allowed under CI): {exc}")
    try:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["::1"]
        resolver.port = server.port
        resolver.lifetime = 5
        answer = await resolver.resolve(f"10-6-6-6.{ZONE}", "A")
        assert [rd.to_text() for rd in answer] == ["10.6.6.6"]
    finally:
        await server.close()


# --------------------------------------------------------------------------------------------
# Real dig


def dig(port: int, *args: str) -> str:
    binary = require_tool("dig", "dnsutils")
    proc = subprocess.run(
        [binary, "@127.0.0.1", "-p", str(port), "+tries=1", "+time=2", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"dig failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    return proc.stdout


def dig_full(port: int, *args: str) -> tuple[str, set[str], list[list[str]], str]:
    """(status, header flags, answer records split into fields, raw output)."""
    out = dig(port, "+noall", "+answer", "+comments", *args)
    status = ""
    flags: set[str] = set()
    answers: list[list[str]] = []
    for line in out.splitlines():
        if "->>HEADER<<-" in line:
            status = line.split("status:")[1].split(",")[0].strip()
        elif line.startswith(";; flags:"):
            flags = set(line.split(":")[1].split(";")[0].split())
        elif line and not line.startswith(";"):
            answers.append(line.split())
    return status, flags, answers, out


@pytest.mark.integration
def test_dig_a(live: LiveServer) -> None:
    assert dig(live.port, f"10-1-2-3.{ZONE}", "A", "+short").split() == ["10.1.2.3"]
    status, flags, answers, _ = dig_full(live.port, f"10-1-2-3.{ZONE}", "A")
    assert status == "NOERROR"
    assert "aa" in flags and "qr" in flags
    assert answers == [[f"10-1-2-3.{ZONE}.", "300", "IN", "A", "10.1.2.3"]]


@pytest.mark.integration
def test_dig_soa_and_ns(live: LiveServer) -> None:
    soa = dig(live.port, ZONE, "SOA", "+short").split()
    assert soa[:3] == [f"ns1.{ZONE}.", f"hostmaster.{ZONE}.", "1"]
    assert dig(live.port, ZONE, "NS", "+short").split() == [f"ns1.{ZONE}."]


@pytest.mark.integration
def test_dig_nxdomain(live: LiveServer) -> None:
    status, flags, answers, out = dig_full(live.port, f"010-1-2-3.{ZONE}", "A", "+authority")
    assert status == "NXDOMAIN"
    assert "aa" in flags
    assert answers and answers[0][3] == "SOA", out  # the SOA in the authority section


@pytest.mark.integration
def test_dig_refused(live: LiveServer) -> None:
    status, flags, answers, _ = dig_full(live.port, "www.example.com", "A")
    assert status == "REFUSED"
    assert "aa" not in flags
    assert answers == []


@pytest.mark.integration
def test_dig_tcp(live: LiveServer) -> None:
    out = dig(live.port, f"10-7-7-7.{ZONE}", "A", "+tcp", "+noall", "+answer", "+stats")
    assert "10.7.7.7" in out
    assert "(TCP)" in out, out  # dig reports the transport it used


@pytest.mark.integration
def test_dig_mixed_case_echoed(live: LiveServer) -> None:
    status, _flags, answers, out = dig_full(live.port, "10-1-2-3.CONSOLEPROXY.company.com", "A", "+question")
    assert status == "NOERROR"
    questions = [line.split() for line in out.splitlines() if line.startswith(";10-")]
    assert questions == [[";10-1-2-3.CONSOLEPROXY.company.com.", "IN", "A"]], out
    rows = [a for a in answers if not a[0].startswith(";")]
    assert rows == [["10-1-2-3.CONSOLEPROXY.company.com.", "300", "IN", "A", "10.1.2.3"]]


@pytest.mark.integration
def test_dig_outside_public_ranges_nxdomain(live: LiveServer) -> None:
    status, _flags, answers, _ = dig_full(live.port, f"192-168-1-1.{ZONE}", "A")
    assert status == "NXDOMAIN"
    assert answers == []


# --------------------------------------------------------------------------------------------
# Benchmark smoke test


@pytest.mark.integration
def test_bench_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("dns_bench", ROOT / "bench" / "dns_bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dns.json"
    assert bench.main(["--count", "200", "--window", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["queries"] == 200
    assert result["answered"] + result["lost"] == 200
    assert result["answered"] >= 190 and result["errors"] == 0
    assert result["qps"] > 0
