"""Fuzzing (issue 10): every parser that takes bytes or text from outside, and the running server.

Each parser may only answer with a value or its own named error; anything else is a bug. The
number of examples comes from the hypothesis profile (tests/conftest.py): bounded in `make test`,
thousands per test in `make fuzz` (HYPOTHESIS_PROFILE=fuzz). Examples found by fuzzing are kept
below as ``@example`` regressions.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import itertools
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import dns.message
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import Proxy, RFBClient, connect_echo, echo_backend, running_proxy, tcp_server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_certstore import parsers_raise_only_certificate_error

from consoleproxy.errors import ConsoleError, HostnameError, ResumeRefused, TokenInvalid
from consoleproxy.net.dns import DnsSettings, Responder
from consoleproxy.policy.cloudstack import CloudStackKeys, decrypt, encrypt_cbc_hmac, encrypt_gcm, to_claims
from consoleproxy.policy.gates import HeadScanner, HeadTooLarge
from consoleproxy.policy.resume import TicketBody, issue_ticket, open_ticket, seal_body
from consoleproxy.policy.tokens import Keyring, b64url_encode, decode, issue
from consoleproxy.protocol import rfb, rfb_client, rfb_messages, rfb_server
from consoleproxy.protocol.forwarded import BadForwardedFor, client_address, parse_networks
from consoleproxy.protocol.hostnames import hostname_for_ip, ip_for_hostname, normalize_suffix
from consoleproxy.protocol.proxyproto import V2_SIGNATURE, ProxyProtocolError
from consoleproxy.protocol.proxyproto import parse as parse_proxy
from consoleproxy.protocol.query import raw_query_param

# --- token codecs ----------------------------------------------------------------------------

RING = Keyring.generate(2)
GOOD = issue(RING, host="10.0.0.1", port=5900, vm="vm", password="pw", client_ip="192.0.2.1")
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _only_token_invalid(token: str) -> None:
    try:
        decode(RING, token)
    except TokenInvalid as exc:
        assert token not in str(exc) or len(token) < 8, "an error message quoted the token"


def mutate(data: st.DataObject, text: str) -> str:
    """1-4 splices of up to 8 base64url characters, each over up to 8 of ``text``'s."""
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(0, 8))
        text = text[:i] + data.draw(st.text(alphabet=B64URL + ".=", max_size=8)) + text[i + j :]
    return text


@given(st.text(max_size=400))
@example("....")
@example("a.b.c.d.e")
def test_native_token_random_text(text: str) -> None:
    _only_token_invalid(text)


@given(st.data())
def test_native_token_mutated(data: st.DataObject) -> None:
    _only_token_invalid(mutate(data, GOOD))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),  # Java's JSON has no NaN/Infinity
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@given(header=st.dictionaries(st.sampled_from(["alg", "enc", "kid", "zip", "cty"]) | st.text(max_size=5),
                              json_values, max_size=5),
       rest=st.lists(st.text(alphabet=B64URL, max_size=40), min_size=4, max_size=4))
def test_native_token_random_header(header: dict[str, Any], rest: list[str]) -> None:
    head = b64url_encode(json.dumps(header).encode())
    _only_token_invalid(".".join([head, *rest]))


# --- resume tickets ----------------------------------------------------------------------------

BODY = TicketBody(sid="s1", gen=0, host="10.0.0.1", port=5900, vm="vm", started=1_700_000_000,
                  password="pw", client_ip="192.0.2.1")
TICKET = issue_ticket(RING, seal_body(RING, BODY), exp=2**40)


def _only_resume_refused(text: str) -> None:
    try:
        body = open_ticket(RING, text, now=1_800_000_000, client_ip="192.0.2.1")
    except ResumeRefused as exc:
        assert exc.close_code == 4005
        assert text not in str(exc) or len(text) < 8, "an error message quoted the ticket"
    else:
        assert text == TICKET and body.sid == "s1"  # only the genuine ticket opens


@given(st.text(max_size=400))
@example("cpr1...")
@example("cpr1.a.b.c")
def test_ticket_random_text(text: str) -> None:
    _only_resume_refused(text)


@given(st.data())
def test_ticket_mutated(data: st.DataObject) -> None:
    _only_resume_refused(mutate(data, TICKET))


@given(st.dictionaries(st.sampled_from(["sid", "gen", "host", "port", "vm", "started", "password",
                                        "client_ip", "view_only", "max_duration"]) | st.text(max_size=5),
                       json_values, max_size=10))
def test_ticket_body_random_fields(fields: dict[str, Any]) -> None:
    try:
        TicketBody.from_dict(fields)
    except ResumeRefused as exc:
        assert exc.close_code == 4005


@given(st.text(max_size=200))
def test_ticket_with_random_sealed_body(inner: str) -> None:
    # A genuine outer layer around anything: the inner one must still authenticate.
    _only_resume_refused(issue_ticket(RING, inner, exp=2**40))


CS_KEYS = CloudStackKeys(bytes(range(16)), bytes(range(100, 116)), auth_key=bytes(range(200, 232)))


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())))
def test_cloudstack_random_tokens(text: str) -> None:
    try:
        decrypt(CS_KEYS, text)
    except TokenInvalid:
        pass


cs_fields = st.dictionaries(
    st.sampled_from(["clientHostAddress", "clientHostPort", "clientHostPassword", "clientTag",
                     "sessionUuid", "sourceIP", "extraSecurityToken", "ticket", "vmId"])
    | st.text(max_size=6),
    json_values,
    max_size=9,
)


@given(fields=cs_fields, gcm=st.booleans(), check_ip=st.booleans())
def test_cloudstack_random_fields_only_console_errors(
    fields: dict[str, Any], gcm: bool, check_ip: bool
) -> None:
    """Well-encrypted but arbitrary fields: decrypt works, mapping to claims fails only by name."""
    token = encrypt_gcm(CS_KEYS, fields) if gcm else encrypt_cbc_hmac(CS_KEYS, fields)
    assert decrypt(CS_KEYS, token) == fields
    try:
        to_claims(fields, now=0, token=token, check_source_ip=check_ip)
    except ConsoleError:
        pass


# --- host names, query strings, balancer headers -----------------------------------------------

SUFFIX = "consoleproxy.company.com"


@given(st.text(max_size=80))
@example("1-2-3-4." + SUFFIX)
@example("01-2-3-4." + SUFFIX)
def test_hostname_random(name: str) -> None:
    try:
        ip = ip_for_hostname(name, SUFFIX)
    except HostnameError:
        return
    assert ip_for_hostname(hostname_for_ip(ip, SUFFIX), SUFFIX) == ip


@given(st.text(max_size=80))
def test_suffix_random(suffix: str) -> None:
    try:
        zone = normalize_suffix(suffix)
    except HostnameError:
        return
    assert normalize_suffix(zone) == zone
    ip = ipaddress.IPv4Address("203.0.113.7")
    assert ip_for_hostname(hostname_for_ip(ip, zone), zone) == ip


@given(st.text(max_size=200), st.text(min_size=1, max_size=10))
def test_query_random(query: str, name: str) -> None:
    try:
        value = raw_query_param(query, name)
    except UnicodeDecodeError:
        return  # the server maps it to 4001 / 4004
    assert value is None or isinstance(value, str)


@given(st.text(alphabet=st.characters(blacklist_characters="&%"), max_size=60),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8))
def test_query_value_survives(value: str, name: str) -> None:
    assert raw_query_param(f"0=1&{name}={value}&9=2", name) == value  # digits: never a drawn name


@given(peer=st.sampled_from(["10.0.0.1", "192.0.2.9", "::1"]),
       headers=st.lists(st.text(max_size=60), max_size=3))
def test_forwarded_for_random(peer: str, headers: list[str]) -> None:
    trusted = parse_networks(["10.0.0.0/8"])
    try:
        addr = client_address(peer, headers, trusted)
    except BadForwardedFor:
        return
    ipaddress.ip_address(addr)


def _v2(body: bytes, ver_cmd: int = 0x21, fam: int = 0x11) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack(">H", len(body)) + body


@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, v, f: _v2(b, v, f), st.binary(max_size=60), st.integers(0, 255), st.integers(0, 255)),
    st.text(max_size=120).map(lambda t: ("PROXY " + t).encode("utf-8", "replace")),
))
def test_proxy_header_random(data: bytes) -> None:
    try:
        h = parse_proxy(data)
    except ProxyProtocolError:
        return
    assert h is None or 0 < h.length <= len(data)


@given(st.binary(max_size=3000), st.lists(st.integers(1, 50), min_size=1, max_size=40))
def test_head_scanner_chunking(data: bytes, sizes: list[int]) -> None:
    """Whatever the chunking, the head ends where CRLF CRLF first appears (or is too large)."""
    limit = 1000
    end = data.find(b"\r\n\r\n")
    s = HeadScanner(limit)
    pos, i = 0, 0
    try:
        while pos < len(data):
            n = sizes[i % len(sizes)]
            i += 1
            if s.feed(data[pos : pos + n]):
                assert end >= 0 and s.seen == end + 4 <= limit
                return
            pos += n
    except HeadTooLarge:
        assert end < 0 or end + 4 > limit
        return
    assert (end < 0 or end + 4 > limit) and len(data) <= limit


# --- the RFB handshake, both sides ----------------------------------------------------------

V = {k: f"RFB 003.00{k}\n".encode() for k in (3, 7, 8)}
server_prefixes = st.sampled_from([
    b"", V[3], V[7], V[8], V[8] + b"\x01\x02", V[8] + b"\x01\x13\x00\x02\x00", V[3] + b"\x00\x00\x00\x02",
    V[8] + b"\x02\x01\x02", V[7] + b"\x00", V[8] + b"\x01\x01\x00\x00\x00\x01",
])


def _feed_server(hs: rfb_server.ServerHandshake, chunks: list[bytes]) -> None:
    for chunk in chunks:
        hs.receive_data(chunk)
        assert isinstance(hs.data_to_send(), bytes)
        for ev in hs.events():
            assert isinstance(ev, rfb.Authenticated | rfb.AuthFailed | rfb.StartTLS)
            if isinstance(ev, rfb.StartTLS):
                hs.tls_started()


@given(prefix=server_prefixes, chunks=st.lists(st.binary(max_size=64), max_size=8),
       password=st.sampled_from([None, "pw", "longer password"]), tls=st.booleans())
def test_rfb_server_side_random(prefix: bytes, chunks: list[bytes], password: str | None, tls: bool) -> None:
    hs = rfb_server.ServerHandshake(password, allow_tls=tls)
    try:
        _feed_server(hs, [prefix, *chunks])
    except rfb.RFBError:
        pass


@given(prefix=st.sampled_from([b"", V[3], V[7], V[8], b"RFB 003.005\n", V[8] + b"\x01"]),
       chunks=st.lists(st.binary(max_size=64), max_size=8), accept=st.booleans(),
       reason=st.text(max_size=5000))
def test_rfb_client_side_random(prefix: bytes, chunks: list[bytes], accept: bool, reason: str) -> None:
    hs = rfb_client.ClientHandshake()
    try:
        for chunk in [prefix, *chunks]:
            hs.receive_data(chunk)
            out = hs.data_to_send()
            assert len(out) <= 12 + 8 + rfb.MAX_REASON_LENGTH
            if any(isinstance(e, rfb.ClientReady) for e in hs.events()):
                hs.accept() if accept else hs.reject(reason)
    except rfb.RFBError:
        pass


def _filtered(f: rfb_messages.ClientMessageFilter, chunks: list[bytes]) -> bytes | type[Exception]:
    try:
        return b"".join(f.feed(c) for c in chunks)
    except rfb.RFBError as exc:  # LimitExceeded is one
        return type(exc)


@example(data=b"\x04\x00", cuts=[])  # a KeyEvent's start: held until its keysym is known
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=12))
def test_client_filter_lang_release_random(data: bytes, cuts: list[int]) -> None:
    """Random client bytes: dropping the Lang releases frames exactly as relaying everything
    does (the same named error, or none), and drops only whole 12- or 8-byte key messages."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [data[i:j] for i, j in itertools.pairwise(bounds)]
    plain = rfb_messages.ClientMessageFilter(view_only=False, expect_client_init=False)
    lang = rfb_messages.ClientMessageFilter(view_only=False, drop_lang_release=True, expect_client_init=False)
    a, b = _filtered(plain, chunks), _filtered(lang, chunks)
    if isinstance(a, bytes) and isinstance(b, bytes):
        assert lang.dropped == lang.lang_releases_dropped
        held = len(lang._header) - len(plain._header)  # the start of a key message, undecided
        assert 0 <= held < 12
        gone = len(a) - len(b) - held  # bytes of dropped messages
        assert 8 * lang.dropped <= gone <= 12 * lang.dropped
        if lang.dropped == 0:
            assert b == a[: len(b)]
    else:
        assert a == b, (a, b)


@given(length=st.integers(rfb.MAX_REASON_LENGTH + 1, 2**32 - 1), where=st.sampled_from(["33", "37", "38"]))
def test_rfb_reason_length_capped(length: int, where: str) -> None:
    """A server announcing a huge reason string is refused at once, never buffered."""
    data = {"33": V[3] + b"\x00\x00\x00\x00", "37": V[7] + b"\x00", "38": V[8] + b"\x00"}[where]
    hs = rfb_server.ServerHandshake(None)
    with pytest.raises(rfb.LimitExceeded):
        _feed_server(hs, [data + struct.pack(">I", length) + b"x" * 100])


# --- PEM / certificate import ---------------------------------------------------------------


def _pem_pair() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz.example")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


CERT_PEM, KEY_PEM = _pem_pair()
pem_texts = st.one_of(
    st.text(max_size=400),
    st.builds(lambda s, i, j, t: s[:i] + t + s[i + j:],
              st.sampled_from([CERT_PEM, KEY_PEM, CERT_PEM + KEY_PEM]),
              st.integers(0, 800), st.integers(0, 60), st.text(alphabet="ABCxyz019+/= \n-%", max_size=30)),
    st.builds(lambda label, body: f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n",
              st.sampled_from(["CERTIFICATE", "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY",
                               "ENCRYPTED PRIVATE KEY", "X509 CRL", "CERTIFICATE REQUEST"]),
              st.binary(max_size=300).map(lambda b: base64.encodebytes(b).decode())),
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(text=pem_texts, passphrase=st.one_of(st.none(), st.binary(max_size=8)))
def test_pem_import_random(text: str, passphrase: bytes | None) -> None:
    parsers_raise_only_certificate_error(text, passphrase)


# --- DNS packets ----------------------------------------------------------------------------

RESPONDER = Responder(DnsSettings(zone="*." + SUFFIX, public_ranges=("10.0.0.0/8",)))
QUERY = dns.message.make_query("10-1-2-3." + SUFFIX, "A").to_wire()


@given(st.one_of(
    st.binary(max_size=600),
    st.builds(lambda i, b: QUERY[:i] + b + QUERY[i + len(b):],
              st.integers(0, len(QUERY)), st.binary(max_size=12)),
), st.booleans())
def test_dns_random_wire(wire: bytes, tcp: bool) -> None:
    out = RESPONDER.handle(wire, tcp=tcp)
    if out is not None:
        reply = dns.message.from_wire(out)
        assert reply.flags & dns.flags.QR and out[:2] == wire[:2]
    assert RESPONDER.internal_errors == 0


# --- the running server: random bytes and random WebSocket frames -----------------------------


class ThreadProxy:
    """A proxy (plain HTTP) and an echo VNC server on an event loop of their own thread."""

    def __init__(self, tmp: Any) -> None:
        self.tmp = tmp
        self.ready = threading.Event()
        self.proxy: Proxy | None = None
        self.vnc_port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # thousands of connections from 127.0.0.1 in `make fuzz`: the rate limit is not under test here
        lim = {"connections_per_ip_per_second": 0}
        async with running_proxy(self.tmp, limits=lim) as p, tcp_server(echo_backend) as port:
            self.proxy, self.vnc_port = p, port
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadProxy:
        self.thread.start()
        assert self.ready.wait(30), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadProxy, ErrorLog]]:
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        with ThreadProxy(tmp_path_factory.mktemp("fuzzproxy")) as tp:
            yield tp, errors
    finally:
        logging.getLogger().removeHandler(errors)


def _frame(opcode: int, payload: bytes, fin: bool, rsv: int, mask: bytes) -> bytes:
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


frames = st.lists(
    st.one_of(
        st.builds(_frame, st.sampled_from([0, 1, 2, 8, 9, 10]) | st.integers(0, 15), st.binary(max_size=300),
                  st.booleans(), st.integers(0, 7) | st.just(0), st.binary(min_size=4, max_size=4)),
        st.binary(max_size=40),  # raw garbage in the frame stream
    ),
    max_size=6,
)


def _connect(tp: ThreadProxy) -> socket.socket:
    assert tp.proxy is not None
    return socket.create_connection(("127.0.0.1", tp.proxy.port), timeout=5)


def _drain(s: socket.socket) -> None:
    """Read until the proxy closes: each example ends only when the proxy is done with it."""
    try:
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    except OSError:
        pass
    finally:
        s.close()


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(upgrade=st.booleans(), data=frames, junk=st.binary(max_size=400))
def test_server_random_bytes_and_frames(
    fuzz_target: tuple[ThreadProxy, ErrorLog], upgrade: bool, data: list[bytes], junk: bytes
) -> None:
    tp, _ = fuzz_target
    assert tp.proxy is not None
    s = _connect(tp)
    try:
        if not upgrade:
            s.sendall(junk)  # not even HTTP
        else:
            token = tp.proxy.token(port=tp.vnc_port)
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(
                f"GET /websockify?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: binary\r\n\r\n".encode()
            )
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 101"), reply[:80]
            for chunk in data:
                s.sendall(chunk)
    except OSError:
        pass  # the proxy may close on the first bad byte; that is a fine answer
    finally:
        _drain(s)


def test_server_still_serves_after_fuzzing(fuzz_target: tuple[ThreadProxy, ErrorLog]) -> None:
    """Runs after the fuzzer above (same module proxy): a real console still works, no errors logged."""
    tp, errors = fuzz_target
    assert tp.proxy is not None
    proxy = tp.proxy

    async def console() -> None:
        async with RFBClient.connect(proxy.url(proxy.token(port=tp.vnc_port))) as c:
            await connect_echo(c)

    asyncio.run(console())
    assert not [r for r in errors.records if r.name.startswith(("consoleproxy", "aiohttp"))], [
        r.getMessage() for r in errors.records
    ]
