"""The VNC side on public asyncio APIs (vncconn.py) against scripted VNC servers on loopback.

Each scripted server sends its SecurityResult, ServerInit and half a MiB of framebuffer bytes in
one write, before the proxy's ClientInit: all of it is in flight while the proxy handshakes, so
the hand-over to the relay must lose none of it, read none twice and keep the order. Plain and
VeNCrypt (X509None over TLS, ``tlstransport.start_tls``); runs on both loops (conftest.BOTH_LOOPS).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from harness import SERVER_INIT, Handler, RFBClient, running_proxy, tcp_server
from test_vencrypt import make_qemu_tls_dir

from consoleproxy.errors import BackendAuthFailed, BackendUnreachable
from consoleproxy.net import vncconn
from consoleproxy.net.tlstransport import TLSTransport
from consoleproxy.net.vncconn import PENDING_LIMIT, READ_SIZE, VNCConnection

# More than PENDING_LIMIT: reading must pause during the handshake, and resume after.
TAIL = bytes(range(256)) * 4096  # 1 MiB
assert len(TAIL) > 2 * PENDING_LIMIT
X509_NONE = 260


def scripted(
    server_tls: ssl.SSLContext | None = None,
    *,
    close: bool = False,
    stop_after_version: bool = False,
    not_tls: bool = False,
    release: asyncio.Event | None = None,
    tail: Callable[[], bytes] = lambda: TAIL,
    instead_of_tls: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None,
) -> Handler:
    """RFB 3.8 with None (plain) or VeNCrypt X509None (``server_tls``), then SecurityResult,
    ServerInit and TAIL (or ``tail()``, once per connection) at once. ``close``: the server
    closes right behind TAIL. ``release``: the server reads nothing after the handshake until
    it is set."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"RFB 003.008\n")
        if stop_after_version:
            await w.drain()
            return  # tcp_server closes the connection
        assert await r.readexactly(12) == b"RFB 003.008\n"
        if server_tls is None:
            w.write(b"\x01\x01")
            assert await r.readexactly(1) == b"\x01"
        else:
            w.write(b"\x01\x13")
            assert await r.readexactly(1) == b"\x13"
            w.write(b"\x00\x02")
            assert await r.readexactly(2) == b"\x00\x02"
            w.write(b"\x00\x01" + struct.pack(">I", X509_NONE))
            assert struct.unpack(">I", await r.readexactly(4)) == (X509_NONE,)
            w.write(b"\x01")
            await w.drain()
            if instead_of_tls is not None:
                await instead_of_tls(r, w)
                return
            if not_tls:
                await r.read(1)  # the ClientHello has begun: answer it with no TLS at all
                w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                await w.drain()
                return
            await w.start_tls(server_tls)
        w.write(b"\x00\x00\x00\x00" + SERVER_INIT + tail())
        if close:
            await w.drain()
            await r.readexactly(1)  # ClientInit: closing with it unread would be a reset
            return
        if release is not None:
            await release.wait()
        await r.read()  # ClientInit and what follows, until the proxy closes

    return handler


@contextlib.asynccontextmanager
async def tls_pair(tmp_path: Path, *, trusted: bool = True) -> AsyncIterator[tuple[ssl.SSLContext, Path]]:
    """The scripted server's TLS context, and the CA file a client should trust."""
    ca = make_qemu_tls_dir(tmp_path / "vnc-tls")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "vnc-tls" / "server-cert.pem", tmp_path / "vnc-tls" / "server-key.pem")
    if not trusted:
        ca = make_qemu_tls_dir(tmp_path / "other-ca" / "tls")  # signed nothing the server shows
    yield server, ca


def client_context(ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.check_hostname = False  # as the proxy's: tokens carry addresses
    return ctx


class Sink(asyncio.Protocol):
    """What the relay's protocol would be: collects every byte after the hand-over."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.more = asyncio.Event()
        self.eof = False
        self.resumed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.more.set()

    def eof_received(self) -> bool | None:
        self.eof = True
        self.more.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.more.set()

    def resume_writing(self) -> None:
        self.resumed.set()

    async def until(self, n: int) -> None:
        async with asyncio.timeout(20):
            while len(self.data) < n and not self.eof:
                self.more.clear()
                await self.more.wait()


async def wait_paused(conn: VNCConnection) -> None:
    """Until the connection stops reading: PENDING_LIMIT bytes wait for the handshake."""
    assert conn.transport is not None
    async with asyncio.timeout(20):
        while conn.transport.is_reading():
            await asyncio.sleep(0.01)


async def handshake(port: int, tls: ssl.SSLContext) -> VNCConnection:
    conn = await vncconn.connect("127.0.0.1", port, 10)
    async with asyncio.timeout(20):
        await vncconn.authenticate(conn, None, tls)
        conn.write(b"\x01")  # ClientInit
        assert await vncconn.read_server_init(conn) == SERVER_INIT
    return conn


@pytest.mark.parametrize("vencrypt", [False, True], ids=["plain", "vencrypt"])
async def test_bytes_behind_server_init_are_handed_over_in_order_and_reading_is_bounded(
    tmp_path: Path, vencrypt: bool
) -> None:
    async with tls_pair(tmp_path) as (server_tls, ca):
        async with tcp_server(scripted(server_tls if vencrypt else None)) as port:
            conn = await handshake(port, client_context(ca))
            try:
                await wait_paused(conn)  # half a MiB in flight: reading paused at the bound
                h = conn.detach()
                assert (h.transport.get_extra_info("ssl_object") is not None) == vencrypt
                assert PENDING_LIMIT <= len(h.pending) < PENDING_LIMIT + READ_SIZE
                assert not h.transport.is_reading() and not h.eof
                sink = Sink()
                h.transport.set_protocol(sink)
                h.transport.resume_reading()
                await sink.until(len(TAIL) - len(h.pending))
                assert h.pending + bytes(sink.data) == TAIL  # nothing lost, nothing twice, in order
                with pytest.raises(RuntimeError, match="handed to the relay"):
                    await conn.read()
                assert conn.transport is None  # the relay's now, not also ours
                h.transport.close()
            finally:
                conn.close()


async def test_eof_behind_server_init_is_handed_over_after_the_bytes() -> None:
    async with tcp_server(scripted(close=True)) as port:
        conn = await handshake(port, client_context(None))
        try:
            async with asyncio.timeout(20):
                rest = await conn.read_exactly(len(TAIL))
                assert rest == TAIL
                assert await conn.read() == b""  # then the EOF
            h = conn.detach()
            assert h.pending == b"" and h.eof
            h.transport.close()
        finally:
            conn.close()


async def test_eof_during_the_handshake_is_backend_unreachable() -> None:
    async with tcp_server(scripted(stop_after_version=True)) as port:
        conn = await vncconn.connect("127.0.0.1", port, 10)
        try:
            with pytest.raises(BackendUnreachable, match="closed the connection during the handshake"):
                async with asyncio.timeout(20):
                    await vncconn.authenticate(conn, None, client_context(None))
        finally:
            conn.close()


async def test_eof_before_server_init_is_backend_unreachable() -> None:
    async def short(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"RFB 003.008\n")
        await r.readexactly(12)
        w.write(b"\x01\x01")
        await r.readexactly(1)
        w.write(b"\x00\x00\x00\x00" + SERVER_INIT[:10])

    async with tcp_server(short) as port:
        conn = await vncconn.connect("127.0.0.1", port, 10)
        try:
            with pytest.raises(BackendUnreachable, match="before its ServerInit"):
                async with asyncio.timeout(20):
                    await vncconn.authenticate(conn, None, client_context(None))
                    await vncconn.read_server_init(conn)
        finally:
            conn.close()


async def test_a_closed_port_is_backend_unreachable() -> None:
    async with tcp_server(scripted()) as port:
        pass  # closed again: nothing listens there now
    with pytest.raises(BackendUnreachable, match=f"cannot connect to 127.0.0.1:{port}: "):
        await vncconn.connect("127.0.0.1", port, 10)


async def test_untrusted_certificate_is_auth_failed_with_openssl_reason(tmp_path: Path) -> None:
    async with tls_pair(tmp_path, trusted=False) as (server_tls, wrong_ca):
        async with tcp_server(scripted(server_tls)) as port:
            conn = await vncconn.connect("127.0.0.1", port, 10)
            try:
                with pytest.raises(BackendAuthFailed) as info:
                    async with asyncio.timeout(20):
                        await vncconn.authenticate(conn, None, client_context(wrong_ca))
            finally:
                conn.close()
    prefix = "VNC server's TLS certificate is not trusted: "
    assert str(info.value).startswith(prefix) and "issuer" in str(info.value), info.value


async def _close_at_hello(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.read(1)  # the ClientHello has begun; tcp_server closes the connection


@pytest.mark.parametrize(
    "server", [{"not_tls": True}, {"instead_of_tls": _close_at_hello}], ids=["not-tls", "closes-at-hello"]
)
async def test_a_failed_tls_handshake_is_backend_unreachable(tmp_path: Path, server: dict[str, Any]) -> None:
    """A server that answers VeNCrypt's TLS with something else, or closes in its handshake."""
    async with tls_pair(tmp_path) as (server_tls, ca):
        async with tcp_server(scripted(server_tls, **server)) as port:
            conn = await vncconn.connect("127.0.0.1", port, 10)
            try:
                with pytest.raises(BackendUnreachable, match="TLS handshake with the VNC server failed"):
                    async with asyncio.timeout(20):
                        await vncconn.authenticate(conn, None, client_context(ca))
            finally:
                conn.close()


@pytest.mark.parametrize("vencrypt", [False, True], ids=["plain", "vencrypt"])
async def test_write_backpressure_is_handed_over(tmp_path: Path, vencrypt: bool) -> None:
    """The transport paused writing during the handshake: the relay's protocol gets its
    resume_writing, so the relay knows to wait for it (Relay._attach pauses the browser). Over
    VeNCrypt, TLSTransport passes the TCP transport's pause to the handshake's protocol and its
    resume to the relay's."""
    release = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        server_tls, ca = await stack.enter_async_context(tls_pair(tmp_path)) if vencrypt else (None, None)
        port = await stack.enter_async_context(tcp_server(scripted(server_tls, release=release)))
        conn = await handshake(port, client_context(ca))
        try:
            assert conn.transport is not None
            conn.transport.set_write_buffer_limits(high=64 * 1024)
            big = bytes(1024 * 1024)
            async with asyncio.timeout(20):
                while conn.transport.get_write_buffer_size() <= 64 * 1024:
                    conn.write(big)  # the server reads nothing: kernel buffers fill, then ours
                    await asyncio.sleep(0)
            drained = asyncio.ensure_future(conn.drain())
            await asyncio.sleep(0)
            assert not drained.done()  # drain waits while the transport is over its mark
            h = conn.detach()
            assert h.writing_paused
            assert (type(h.transport) is TLSTransport) == vencrypt
            sink = Sink()
            h.transport.set_protocol(sink)
            h.transport.resume_reading()
            release.set()
            async with asyncio.timeout(20):
                await sink.resumed.wait()
            drained.cancel()
            h.transport.close()
        finally:
            conn.close()


@pytest.mark.parametrize("vencrypt", [False, True], ids=["plain", "vencrypt"])
async def test_the_browser_gets_server_init_then_every_pipelined_byte_in_order(
    tmp_path: Path, vencrypt: bool
) -> None:
    async with tls_pair(tmp_path) as (server_tls, ca):
        targets = {"vnc_ca_file": str(ca)}
        async with (
            running_proxy(tmp_path, targets=targets) as p,
            tcp_server(scripted(server_tls if vencrypt else None)) as port,
            RFBClient.connect(p.url(p.token(port=port))) as c,
        ):
            await c.handshake()
            assert (c.width, c.height, c.name) == (64, 32, b"echo")
            assert await c.read_exact(len(TAIL), timeout=20) == TAIL
            # Relaying: the handshake's protocol is not kept, over TLS either, on either loop
            # (uvloop kept it until tlstransport's wire protocol had its own data_received).
            gc.collect()
            assert [o for o in gc.get_objects() if type(o) is VNCConnection] == []


async def test_the_browser_gets_the_pipelined_bytes_then_the_server_close(tmp_path: Path) -> None:
    async with (
        running_proxy(tmp_path) as p,
        tcp_server(scripted(close=True)) as port,
        RFBClient.connect(p.url(p.token(port=port))) as c,
    ):
        await c.handshake()
        assert await c.read_exact(len(TAIL), timeout=20) == TAIL
        assert await c.close_code() == 1000


def client_tls_transports() -> list[TLSTransport]:
    gc.collect()
    return [
        o for o in gc.get_objects()
        if type(o) is TLSTransport and o.sslobj is not None and not o.sslobj.server_side
    ]


async def test_vencrypt_runs_on_tlstransport_on_both_loops(tmp_path: Path) -> None:
    """Not ``loop.start_tls``: on asyncio's loop its SSLProtocol keeps a 256 KiB receive buffer
    per console (bench/vnc_start_tls_memory.py); the relay gets our TLS transport."""
    async with tls_pair(tmp_path) as (server_tls, ca):
        async with tcp_server(scripted(server_tls)) as port:
            conn = await handshake(port, client_context(ca))
            try:
                assert type(conn.transport) is TLSTransport
                h = conn.detach()
                assert type(h.transport) is TLSTransport
                assert h.transport.get_extra_info("ssl_object").getpeercert()  # verified peer
                h.transport.close()
            finally:
                conn.close()


def numbered_tail(seed: int) -> bytes:
    """1 MiB + 1 whose every byte depends on ``seed`` (its first byte): a console that got
    another's bytes, or a reused buffer's stale ones, does not match."""
    return bytes([seed]) + bytes((seed * 37 + j) % 256 for j in range(256)) * 4096


async def test_concurrent_vencrypt_consoles_each_get_their_own_bytes_over_tlstransport(
    tmp_path: Path,
) -> None:
    """Several VeNCrypt consoles stream at once through the relay, whose VNC side now decrypts
    into the relay's shared read buffer (replaced when the browser's plain transport keeps a
    view of it): every console gets exactly its own bytes, in order; the relay's VNC transports
    are tlstransport's, and the handshake's protocol is not kept on either loop."""
    seeds = iter(range(1, 256))
    n = 3
    async with tls_pair(tmp_path) as (server_tls, ca):
        async with (
            running_proxy(tmp_path, targets={"vnc_ca_file": str(ca)}) as p,
            tcp_server(scripted(server_tls, tail=lambda: numbered_tail(next(seeds)))) as port,
            contextlib.AsyncExitStack() as stack,
        ):
            clients = [
                await stack.enter_async_context(RFBClient.connect(p.url(p.token(port=port))))
                for _ in range(n)
            ]
            for c in clients:
                await c.handshake()
            size = len(numbered_tail(0))
            got = await asyncio.gather(*(c.read_exact(size, timeout=30) for c in clients))
            assert sorted(g[0] for g in got) == [1, 2, 3]
            for g in got:
                assert g == numbered_tail(g[0])
            assert len(client_tls_transports()) == n  # the relay's VNC sides: none is loop.start_tls's
            assert [o for o in gc.get_objects() if type(o) is VNCConnection] == []


async def test_a_silent_tls_server_fails_the_handshake_backstop_and_the_caller_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that never answers the ClientHello: the handshake's own limit
    (TLS_HANDSHAKE_TIMEOUT, as loop.start_tls's) is BackendUnreachable; a caller's shorter limit
    (a console's handshake_timeout_seconds) cancels it, and either way the connection is closed."""
    ended: list[asyncio.Event] = []

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ended.append(asyncio.Event())
        while await r.read(65536):
            pass  # the ClientHello, answered with nothing
        ended[-1].set()  # the proxy's side closed the connection

    async with tls_pair(tmp_path) as (server_tls, ca):
        async with tcp_server(scripted(server_tls, instead_of_tls=silent)) as port:
            monkeypatch.setattr(vncconn, "TLS_HANDSHAKE_TIMEOUT", 0.2)
            conn = await vncconn.connect("127.0.0.1", port, 10)
            try:
                with pytest.raises(BackendUnreachable, match="TLS handshake timed out"):
                    async with asyncio.timeout(20):
                        await vncconn.authenticate(conn, None, client_context(ca))
            finally:
                conn.close()
            monkeypatch.setattr(vncconn, "TLS_HANDSHAKE_TIMEOUT", 60.0)
            conn = await vncconn.connect("127.0.0.1", port, 10)
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await vncconn.authenticate(conn, None, client_context(ca))
            finally:
                conn.close()
            async with asyncio.timeout(20):
                for e in ended:
                    await e.wait()
            assert len(ended) == 2
