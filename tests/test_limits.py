"""The accept layer's limits (consoleproxy/listener.py) and the rest of issue 10's hardening.

The pure parts (handshake gate, token bucket, head scanner) are tested without sockets; the
rest runs a real proxy on loopback and real TCP/TLS clients from 127.0.0.1 and 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import resource
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI
from harness import Proxy, RFBClient, connect_echo, echo_backend, make_config, running_proxy, tcp_server

from consoleproxy.config import ConfigError
from consoleproxy.errors import Forbidden
from consoleproxy.policy.gates import HandshakeGate, HeadScanner, HeadTooLarge, RateLimiter, source_key
from consoleproxy.policy.targets import TargetPolicy
from consoleproxy.policy.tokens import Keyring
from consoleproxy.server import ProxyServer
from consoleproxy.web.admin import startup_admin_key

OTHER = "127.0.0.2"  # the well-behaved client's address; the flood comes from 127.0.0.1
# The scheduled self-checks (health.py) connect to the listener from 127.0.0.1 at start; they would
# take slots and tokens these tests count.
QUIET = {"basic_interval_minutes": 0, "advanced_interval_minutes": 0}


# --- pure parts ------------------------------------------------------------------------------


def test_gate_total_and_per_source() -> None:
    g = HandshakeGate(total=3, per_source=2)
    assert g.enter() and g.enter_source("a")
    assert g.enter() and g.enter_source("a")
    assert g.enter() and not g.enter_source("a")  # per-source cap
    assert g.enter_source("b")  # another source is not affected
    assert not g.enter()  # total cap
    g.leave_source("a")
    g.leave()
    assert g.enter() and g.enter_source("a")  # accepted again after one ended
    assert g.count("a") == 2 and g.count("b") == 1


def test_gate_without_per_source_cap() -> None:
    g = HandshakeGate(total=10, per_source=0)
    assert all(g.enter_source("a") for _ in range(50))
    for _ in range(50):
        g.leave_source("a")
    assert g.count("a") == 0


def test_rate_limit_per_source() -> None:
    r = RateLimiter(rate=2, burst=3)
    assert [r.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert r.allow("b", 0.0), "another source has its own bucket"
    assert not r.allow("a", 0.4)  # 0.8 tokens refilled: not yet
    assert r.allow("a", 0.6)  # 1.2 tokens
    assert [r.allow("a", 100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_rate_limit_off_and_bounded_memory() -> None:
    off = RateLimiter(rate=0, burst=1)
    assert all(off.allow("a", 0.0) for _ in range(1000)) and len(off) == 0
    r = RateLimiter(rate=1, burst=1, max_sources=100)
    for i in range(1000):
        r.allow(f"10.0.{i // 256}.{i % 256}", float(i) / 1000)
    assert len(r) <= 100


def test_source_key() -> None:
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_key("2001:db8:1:2:3:4:5:6") == source_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1000])
def test_head_scanner_any_chunking(chunk: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    s = HeadScanner(limit=len(head))
    data = head + b"body"
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    done = [s.feed(c) for c in chunks[: (len(head) - 1) // chunk + 1]]  # up to the chunk ending the head
    assert done[-1] and not any(done[:-1]) and s.seen == len(head)
    with pytest.raises(HeadTooLarge):
        HeadScanner(limit=len(head) - 1).feed(head)
    s = HeadScanner(limit=100)
    assert not s.feed(b"x" * 100)
    with pytest.raises(HeadTooLarge):
        s.feed(b"x")


def test_proxy_own_addresses_refused_unless_listed() -> None:
    own = [ipaddress.ip_address("10.0.0.9")]
    policy = TargetPolicy.from_config(["10.0.0.0/8"], "5900-6999", own=own)
    assert str(policy.check("10.0.0.8", 5900)) == "10.0.0.8"
    with pytest.raises(Forbidden, match="this proxy's own addresses"):
        policy.check("10.0.0.9", 5900)
    listed = TargetPolicy.from_config(["10.0.0.0/8", "10.0.0.9/32"], "5900-6999", own=own)
    assert str(listed.check("10.0.0.9", 5900)) == "10.0.0.9"


def test_policy_checks_addresses_not_names() -> None:
    """Names are resolved once by the server (tests/policy/test_target_names.py); the policy sees
    addresses."""
    policy = TargetPolicy.from_config(["127.0.0.1/32"], "1-65535")
    with pytest.raises(Forbidden, match="not an IP address"):
        policy.check("localhost", 5900)


# --- admin key on a public address ------------------------------------------------------------


def test_admin_public_address_needs_existing_key(tmp_path: Path) -> None:
    key = tmp_path / "admin.key"
    with pytest.raises(ConfigError, match=r"\[admin\] key_file .*admin.key.* does not exist.*not loopback"):
        startup_admin_key("0.0.0.0", key)
    assert not key.exists(), "nothing may be created for a public address"
    key.write_text("k" * 40 + "\n")
    assert startup_admin_key("0.0.0.0", key) == "k" * 40
    # loopback keeps creating the key on first start
    assert len(startup_admin_key("127.0.0.1", tmp_path / "new.key")) >= 32
    assert len(startup_admin_key("::1", tmp_path / "new6.key")) >= 32
    (tmp_path / "short.key").write_text("short\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        startup_admin_key("127.0.0.1", tmp_path / "short.key")


async def test_server_refuses_to_start_admin_on_public_address(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, admin={"address": "0.0.0.0", "key_file": str(tmp_path / "none.key")})
    server = ProxyServer(cfg, keyring=Keyring.generate())
    with pytest.raises(ConfigError, match="does not exist"):
        await server.start()
    assert server.public_ports == [], "checked before any listener binds"
    await server.close()


# --- helpers for the socket tests -------------------------------------------------------------


async def until(cond: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def refused(p: Proxy, reason: str) -> float:
    value = p.server.metrics.registry.get_sample_value(
        "consoleproxy_connections_refused_total", {"reason": reason}
    )
    return value or 0.0


def in_progress(p: Proxy) -> int:
    return sum(s.gate.in_progress for s in p.server._sites)


async def tcp(p: Proxy, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.port, local_addr=(source, 0))


async def reset_at_once(p: Proxy, source: str = "127.0.0.1", data: bytes = b"") -> bool:
    """Connect, send ``data``, and expect a close without a byte (the RST may beat connect())."""
    try:
        r, w = await tcp(p, source)
    except ConnectionResetError:
        return True
    w.write(data)
    try:
        return await closed_by_peer(r)
    finally:
        w.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True when the proxy closes (FIN or RST) within ``timeout`` without sending anything."""
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True


async def http_status(p: Proxy, request: bytes, source: str = "127.0.0.1") -> int:
    r, w = await tcp(p, source)
    try:
        w.write(request)
        async with asyncio.timeout(10):
            line = await r.readline()
        return int(line.split()[1])
    finally:
        w.close()


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def console_from(p: Proxy, port: int, source: str) -> None:
    """A real console from ``source``: upgrade, RFB handshake, ServerInit."""
    async with RFBClient.connect(p.url(p.token(port=port)), local_addr=(source, 0)) as c:
        await connect_echo(c)
        assert [s.client_ip for s in p.server.registry] == [source]


def client_hello() -> bytes:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="x.consoleproxy.local")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@pytest.fixture
def many_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2000:
        why = f"RLIMIT_NOFILE hard limit {hard} is too low for 1200 sockets"
        if IN_CI:
            pytest.fail(f"{why} under CI=true (raise the runner's open-files limit)")
        pytest.skip(why)


@contextlib.asynccontextmanager
async def flood(p: Proxy, n_tcp: int = 300, n_tls: int = 300) -> AsyncIterator[list[Any]]:
    """Half-open TCP and TLS connections plus one slow-headers client, all from 127.0.0.1."""
    conns: list[Any] = []
    hello = client_hello()
    stop = asyncio.Event()

    async def slow_headers() -> None:
        _, w = await asyncio.open_connection("127.0.0.1", p.port, ssl=p.client_ssl)
        conns.append(w)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while not stop.is_set() and not w.is_closing():
            w.write(b"X")  # one byte of a never-ending header
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stop.wait()

    slow = asyncio.create_task(slow_headers())
    await until(lambda: in_progress(p) >= 1, what="slow client accepted")
    for i in range(n_tcp + n_tls):
        s = socket.socket()
        s.setblocking(False)
        conns.append(s)
        with contextlib.suppress(OSError):  # a connection the proxy already reset
            await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", p.port))
            if i >= n_tcp:
                s.send(hello[: len(hello) // 2])  # a partial ClientHello, never finished
    try:
        yield conns
    finally:
        stop.set()
        slow.cancel()
        with contextlib.suppress(BaseException):
            await slow
        for c in conns:
            c.close()


@pytest.mark.parametrize(
    "limits",
    [
        {},  # the defaults: per-source caps reset most of the flood at accept
        {"max_handshakes_per_ip": 0, "connections_per_ip_per_second": 0},  # all 601 held open
    ],
    ids=["defaults", "no-per-source-limits"],
)
async def test_flood_from_one_address_does_not_stop_another(
    tmp_path: Path, many_files: None, limits: dict[str, Any]
) -> None:
    async with (
        running_proxy(tmp_path, health=QUIET, listen={"tls": True}, limits=limits) as p,
        tcp_server(echo_backend) as port,
    ):
        async with flood(p):
            # every flood connection has been accepted and is either held or refused
            total = 601

            def settled() -> bool:
                held = in_progress(p)
                gone = sum(refused(p, r) for r in ("rate", "handshakes_per_ip", "handshakes"))
                return held + gone >= total

            await until(settled, timeout=30, what="flood accepted")
            held = in_progress(p)
            if limits:
                assert held == total, "without per-source limits every half-open handshake is held"
            else:
                assert held <= 100 and refused(p, "handshakes_per_ip") + refused(p, "rate") > 0
            async with asyncio.timeout(2):  # the requirement: within 2 s
                await console_from(p, port, OTHER)


# --- each limit --------------------------------------------------------------------------------


async def test_concurrent_handshakes_cap(tmp_path: Path) -> None:
    lim = {"max_concurrent_handshakes": 5, "max_handshakes_per_ip": 0, "connections_per_ip_per_second": 0}
    async with running_proxy(tmp_path, health=QUIET, limits=lim) as p:
        idle = [await tcp(p) for _ in range(5)]
        await until(lambda: in_progress(p) == 5)
        assert await reset_at_once(p, OTHER), "over the cap a new connection is closed at once"
        assert refused(p, "handshakes") == 1
        for _, iw in idle:
            iw.close()
        await until(lambda: in_progress(p) == 0)
        assert await http_status(p, HEALTHZ, OTHER) == 200, "accepted again once slots are free"


async def test_handshakes_per_ip_cap_spares_other_sources(tmp_path: Path) -> None:
    lim = {"max_handshakes_per_ip": 3, "connections_per_ip_per_second": 0}
    async with running_proxy(tmp_path, health=QUIET, limits=lim) as p:
        idle = [await tcp(p) for _ in range(3)]
        await until(lambda: in_progress(p) == 3)
        assert await reset_at_once(p)
        assert refused(p, "handshakes_per_ip") == 1
        assert await http_status(p, HEALTHZ, OTHER) == 200
        for _, iw in idle:
            iw.close()


async def test_connection_rate_per_source(tmp_path: Path) -> None:
    # 0.01/s: no token comes back during the test, so the count is exact
    lim = {"connections_per_ip_per_second": 0.01, "connection_burst": 3}
    async with running_proxy(tmp_path, health=QUIET, limits=lim) as p:
        for _ in range(3):
            assert await http_status(p, HEALTHZ) == 200
        assert await reset_at_once(p), "the fourth connection in a burst of three is refused"
        assert refused(p, "rate") == 1
        for _ in range(3):
            assert await http_status(p, HEALTHZ, OTHER) == 200, "another source is not limited"


async def test_header_size_limits(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, health=QUIET, limits={"max_request_head_bytes": 16384}) as p:
        long_line = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"
        assert await http_status(p, long_line) == 400  # aiohttp: one line over max_header_line_bytes
        many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"b" * 200 + b"\r\n"
        many = many[:33] + many[33:] * 100 + b"\r\n"  # each line short, 100 of them: 20 KiB
        assert len(many) > 16384
        assert await http_status(p, many) == 431
        assert refused(p, "head_too_large") == 1
        assert await http_status(p, HEALTHZ) == 200


async def test_head_timeout_closes_slow_clients(tmp_path: Path) -> None:
    lim = {"request_head_timeout_seconds": 0.5}
    async with running_proxy(tmp_path, health=QUIET, listen={"tls": True}, limits=lim) as p:
        # slowloris over TLS: a complete TLS handshake, then a head that never ends
        r, w = await asyncio.open_connection("127.0.0.1", p.port, ssl=p.client_ssl)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        assert await closed_by_peer(r, timeout=5)
        w.close()
        # half-open: TCP only, and a partial ClientHello
        r1, w1 = await tcp(p)
        r2, w2 = await tcp(p)
        w2.write(client_hello()[:20])
        assert await closed_by_peer(r1, timeout=5) and await closed_by_peer(r2, timeout=5)
        w1.close()
        w2.close()
        assert refused(p, "head_timeout") == 3
        await until(lambda: in_progress(p) == 0)
        # a request in time is served
        async with tcp_server(echo_backend) as port:
            await console_from(p, port, OTHER)


async def test_redirect_port_has_the_same_accept_limits(tmp_path: Path) -> None:
    """The plain-HTTP redirect port is public too: slow heads and bursts are cut there as well."""
    from harness import free_port

    http_port = free_port(20000, 30000)
    lim = {"request_head_timeout_seconds": 0.5, "connections_per_ip_per_second": 0.01, "connection_burst": 3}
    listen = {"tls": True, "redirect_http_port": http_port}
    async with running_proxy(tmp_path, health=QUIET, listen=listen, limits=lim) as p:
        # a redirect in time is served (1 of the burst of 3)
        r, w = await asyncio.open_connection("127.0.0.1", http_port)
        w.write(b"GET /console HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await r.readline()).split()[1] == b"301"
        w.close()
        # slowloris: a head that never ends is closed at the deadline (2 of 3)
        r, w = await asyncio.open_connection("127.0.0.1", http_port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        assert await closed_by_peer(r, timeout=5)
        w.close()
        assert refused(p, "head_timeout") == 1
        # the burst: the third is accepted, the fourth is reset before a byte is read
        _r3, w3 = await asyncio.open_connection("127.0.0.1", http_port)
        try:
            r4, w4 = await asyncio.open_connection("127.0.0.1", http_port)
            assert await closed_by_peer(r4)
            w4.close()
        except ConnectionResetError:
            pass
        assert refused(p, "rate") == 1
        w3.close()
        # another source is not limited
        r, w = await asyncio.open_connection("127.0.0.1", http_port, local_addr=(OTHER, 0))
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await r.readline()).split()[1] == b"301"
        w.close()


async def test_a_slow_second_head_on_a_kept_alive_connection_is_closed(tmp_path: Path) -> None:
    """Only the first head passes the accept layer's deadline; a later one on the same connection
    must arrive within keepalive_timeout_seconds of the previous response (aiohttp's keep-alive
    timer is not reset by a partial head)."""
    lim = {"keepalive_timeout_seconds": 1, "request_head_timeout_seconds": 30}
    async with running_proxy(tmp_path, health=QUIET, limits=lim) as p:
        r, w = await tcp(p)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive (HTTP/1.1 default)
        async with asyncio.timeout(10):
            assert (await r.readline()).split()[1] == b"200"
            while await r.readline() not in (b"\r\n", b""):
                pass  # the rest of the head
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1")  # never finished
        async with asyncio.timeout(10):
            rest = await r.read()  # the body of the first answer, then the close
        assert not rest.startswith(b"HTTP/"), "the slow second request got an answer"
        w.close()


async def test_console_path_requests_that_are_not_a_first_upgrade(tmp_path: Path) -> None:
    """The accept layer gives a connection whose first request is a GET for /websockify to the
    proxy's own WebSocket: no upgrade there is websockets' 426. A console upgrade behind another
    request on a kept-alive connection reaches aiohttp, which answers 400 (browsers open every
    WebSocket on a connection of its own)."""
    async with running_proxy(tmp_path, health=QUIET) as p:
        assert await http_status(p, b"GET /websockify?token=x HTTP/1.1\r\nHost: x\r\n\r\n") == 426
        r, w = await tcp(p, "127.0.0.1")
        try:
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                assert (await r.readline()).startswith(b"HTTP/1.1 200")
                length = 0
                while (line := await r.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await r.readexactly(length)
                w.write(
                    b"GET /websockify?token=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                assert (await r.readline()).startswith(b"HTTP/1.1 400")
        finally:
            w.close()
