"""tlstransport.TLSTransport: TLS on a plain TCP transport with ssl.SSLObject and one read buffer
per thread. Runs on both loops (conftest.BOTH_LOOPS); the peers are asyncio's (or uvloop's) own
TLS, or a blocking ssl socket in a thread where a test must see exactly what came on the wire
(close_notify or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import random
import socket
import ssl
import struct
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from certutil_helpers import Cert, make_cert, make_chain

from consoleproxy.net import relay
from consoleproxy.net.tlstransport import TLSTransport, accept_tls, start_tls
from consoleproxy.tls.certstore import CertStore, Item, SNIContexts, make_ssl_context

HOST = "localhost"


@pytest.fixture(scope="module")
def cert() -> Cert:
    return make_cert(HOST, sans=[HOST])


@pytest.fixture
def server_ctx(cert: Cert, tmp_path: Path) -> ssl.SSLContext:
    (tmp_path / "c.pem").write_text(cert.pem)
    (tmp_path / "k.pem").write_text(cert.key_pem())
    return make_ssl_context(tmp_path / "c.pem", tmp_path / "k.pem")


@pytest.fixture
def client_ctx(cert: Cert) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=cert.pem)


async def until(cond: Callable[[], bool], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


class App(asyncio.Protocol):
    """Records what the TLS transport hands it; echoes when ``echo``."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.transport: TLSTransport | None = None
        self.data = bytearray()
        self.calls = 0
        self.eof = False
        self.lost: list[Exception | None] = []
        self.paused = 0
        self.resumed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got(data)

    def got(self, data: bytes) -> None:
        self.calls += 1
        self.data += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


# One buffer for every BufferedApp, as the relay's ClientReader shares one: bytes of two
# connections could only mix if the transport held on to a buffer past a callback.
_SHARED = memoryview(bytearray(64 * 1024))


class BufferedApp(App, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> memoryview:
        return _SHARED

    def buffer_updated(self, nbytes: int) -> None:
        self.got(bytes(_SHARED[:nbytes]))


@contextlib.asynccontextmanager
async def tls_server(
    ctx: ssl.SSLContext, app: Callable[[], App] = App
) -> AsyncIterator[tuple[int, list[App]]]:
    """A loopback server: TLSTransport on each accepted connection (accept_tls), ``app`` on top."""
    apps: list[App] = []
    tasks: set[asyncio.Task[Any]] = set()
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    listening.setblocking(False)
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        while True:
            conn, _ = await loop.sock_accept(listening)
            a = app()
            apps.append(a)
            t = loop.create_task(accept_tls(conn, ctx, a))
            tasks.add(t)
            t.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures: tests look at apps

    acceptor = loop.create_task(serve())
    try:
        yield listening.getsockname()[1], apps
    finally:
        acceptor.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        for a in apps:
            if a.transport is not None:
                a.transport.abort()
        listening.close()


async def open_client(port: int, ctx: ssl.SSLContext, name: str = HOST) -> tuple[Any, Any]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)


@pytest.mark.parametrize("kind", [App, BufferedApp], ids=["protocol", "buffered"])
async def test_interleaved_streams_never_mix(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, kind: Callable[[], App]
) -> None:
    """Many connections stream at once through the shared read buffer; each echo is byte-exact."""
    n, size = 16, 512 * 1024
    async with tls_server(server_ctx, kind) as (port, apps):

        async def one(i: int) -> None:
            rnd = random.Random(i)
            data = rnd.randbytes(size)
            r, w = await open_client(port, client_ctx)

            async def send() -> None:
                off = 0
                while off < size:
                    step = rnd.randrange(1, 40000)
                    w.write(data[off : off + step])
                    off += step
                    if rnd.random() < 0.3:
                        await w.drain()
                await w.drain()

            sender = asyncio.create_task(send())
            got = await r.readexactly(size)
            await sender
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), f"stream {i} differs"
            w.close()

        async with asyncio.timeout(120):
            await asyncio.gather(*(one(i) for i in range(n)))
        assert len(apps) == n and all(len(a.data) == size for a in apps)
        assert sum(a.calls for a in apps) > n  # many reads each: the buffer was reused across connections


async def test_handshake_failure_raises_and_never_reaches_the_app(server_ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    with listening:
        port = listening.getsockname()[1]
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to a TLS port
        conn, _ = await loop.sock_accept(listening)
        app = App()
        with pytest.raises(ssl.SSLError):
            await accept_tls(conn, server_ctx, app)
        assert app.transport is None and not app.lost
        w.close()

        # a peer gone during the handshake: a ConnectionError, not an SSLError (not counted as "tls")
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        conn, _ = await loop.sock_accept(listening)
        with pytest.raises(ConnectionError):
            await accept_tls(conn, server_ctx, App())


def _blocking_client(port: int, cert_pem: str, then: Callable[[ssl.SSLSocket], Any]) -> Any:
    ctx = ssl.create_default_context(cadata=cert_pem)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname=HOST, suppress_ragged_eofs=False) as s:
            return then(s)


def _read_to_end(s: ssl.SSLSocket) -> tuple[bytes, str]:
    """Everything the server sent, then how it ended: "close_notify" or the error's name."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ssl.SSLError, OSError) as exc:
        return out, type(exc).__name__
    return out, "close_notify"  # recv() returns b"" only on close_notify (suppress_ragged_eofs off)


class SaysBye(App):
    """Writes ``bye`` and then closes, or aborts."""

    def __init__(self, how: str) -> None:
        super().__init__(echo=False)
        self.how = how

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"bye")
        if self.how == "close":
            self.transport.close()
            assert self.transport.is_closing()
            self.transport.write(b"ignored")  # after close(): dropped, not sent
        else:
            self.transport.abort()


async def test_close_sends_close_notify_and_abort_does_not(server_ctx: ssl.SSLContext, cert: Cert) -> None:
    def talk(s: ssl.SSLSocket) -> tuple[bytes, str]:
        s.sendall(b"hi")
        got = _read_to_end(s)
        if got[1] == "close_notify":
            s.unwrap()  # our close_notify back: the server then closes at once
        return got

    async with tls_server(server_ctx, lambda: SaysBye("close")) as (port, apps):
        assert await asyncio.to_thread(_blocking_client, port, cert.pem, talk) == (b"bye", "close_notify")
        await until(lambda: bool(apps[0].lost))
        assert apps[0].lost == [None]
    async with tls_server(server_ctx, lambda: SaysBye("abort")) as (port, apps):
        data, how = await asyncio.to_thread(_blocking_client, port, cert.pem, talk)
        assert how != "close_notify" and data in (b"", b"bye")
        await until(lambda: bool(apps[0].lost))
        assert apps[0].lost == [None]


async def test_peer_eof_and_peer_reset_reach_the_app(server_ctx: ssl.SSLContext, cert: Cert) -> None:
    def ping_then(end: str) -> Callable[[ssl.SSLSocket], None]:
        def talk(s: ssl.SSLSocket) -> None:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            if end == "eof":
                s.shutdown(socket.SHUT_WR)  # TCP FIN, no close_notify (as most browsers end)
                s.settimeout(20)
                with contextlib.suppress(OSError):
                    s.recv(1)  # until the server has closed too
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return talk

    async with tls_server(server_ctx) as (port, apps):
        await asyncio.to_thread(_blocking_client, port, cert.pem, ping_then("eof"))
        await until(lambda: bool(apps[0].lost))
        assert apps[0].eof and apps[0].lost == [None]

        await asyncio.to_thread(_blocking_client, port, cert.pem, ping_then("reset"))
        await until(lambda: bool(apps[1].lost))
        assert isinstance(apps[1].lost[0], ConnectionResetError), apps[1].lost
        t = apps[1].transport
        assert t is not None and t.is_closing() and t.raw is None and t.sslobj is None  # nothing kept


class Flood(App):
    """Writes ``total`` bytes as soon as it is connected, in 64 KiB pieces, regardless."""

    total = 8 * 1024 * 1024

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=256 * 1024)
        self.sent = hashlib.sha256()
        rnd = random.Random(7)
        for _ in range(self.total // 65536):
            chunk = rnd.randbytes(65536)
            self.sent.update(chunk)
            self.transport.write(chunk)


async def test_write_backpressure_pauses_and_resumes_the_app(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with tls_server(server_ctx, Flood) as (port, apps):
        r, w = await open_client(port, client_ctx)
        await until(lambda: bool(apps) and apps[0].transport is not None)
        app = apps[0]
        assert isinstance(app, Flood)
        assert app.paused == 1 and app.resumed == 0  # the client has read nothing yet
        t = app.transport
        assert t is not None and t.get_write_buffer_size() > t.get_write_buffer_limits()[0]
        got = hashlib.sha256()
        n = 0
        while n < Flood.total:
            chunk = await r.read(1 << 20)
            assert chunk
            got.update(chunk)
            n += len(chunk)
        assert n == Flood.total and got.digest() == app.sent.digest()
        await until(lambda: app.resumed == 1)
        w.close()


class Pauses(App):
    """Pauses reading at the first bytes."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        if self.calls == 1:
            self.transport.pause_reading()


async def test_pause_reading_holds_bytes_until_resumed(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    made: list[App] = []

    def first_pauses() -> App:
        made.append(Pauses(echo=False) if not made else App())  # the second one echoes
        return made[-1]

    async with tls_server(server_ctx, first_pauses) as (port, apps):
        _r, w = await open_client(port, client_ctx)
        w.write(b"a")
        await until(lambda: bool(apps) and apps[0].calls == 1)
        app = apps[0]
        assert app.transport is not None and not app.transport.is_reading()
        data = random.Random(3).randbytes(256 * 1024)
        w.write(data)
        async with asyncio.timeout(20):
            await w.drain()  # in the server's socket buffer by now (256 KiB: far below its size)
        # Echo round trips on a second connection: the loop reads sockets meanwhile, yet the
        # paused connection's app gets nothing.
        r2, w2 = await open_client(port, client_ctx)
        async with asyncio.timeout(20):
            for _ in range(5):
                w2.write(b"ping")
                assert await r2.readexactly(4) == b"ping"
        assert app.calls == 1
        app.transport.resume_reading()
        assert app.calls == 1  # not from inside the caller: in a later callback
        await until(lambda: len(app.data) == 1 + len(data))
        assert bytes(app.data) == b"a" + data
        w.close()
        w2.close()


async def test_extra_info_and_relay_never_writes_around_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with tls_server(server_ctx) as (port, apps):
        r, w = await open_client(port, client_ctx)
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        t = apps[0].transport
        assert t is not None
        assert isinstance(t.get_extra_info("ssl_object"), ssl.SSLObject)
        assert t.get_extra_info("sslcontext") is server_ctx
        assert t.get_extra_info("cipher")[1] in ("TLSv1.2", "TLSv1.3")
        assert t.get_extra_info("peercert", "none") == "none"  # no client certificate asked for
        assert t.get_extra_info("peername")[0] == "127.0.0.1"
        assert t.get_extra_info("socket") is not None
        assert relay.socket_fd(t) == -1  # a writev to the socket would bypass TLS
        assert not t.can_write_eof()
        with pytest.raises(NotImplementedError):
            t.write_eof()
        buf = bytearray(b"bc")
        t.writelines([b"a", b"", memoryview(buf)])
        buf[:] = b"XX"  # encrypted already: reusing the buffer changes nothing sent
        assert await r.readexactly(3) == b"abc"
        w.close()


async def test_sni_picks_the_certificate_and_a_reload_applies_to_new_handshakes(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    chain = make_chain()
    for item in chain.items():
        store.import_item(item)
    fqdn = make_cert("console.example.net", issuer=chain.inter)
    store.import_item(Item("server-fqdn", 4, fqdn.pem, fqdn.key_pem(), "console.example.net"))
    sni = SNIContexts(store)
    assert sni.context is not None
    client = ssl.create_default_context(cadata=chain.root.pem)

    async def presented(name: str) -> tuple[bytes, Any, Any]:
        r, w = await open_client(port, client, name)
        der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return hashlib.sha256(der).digest(), r, w

    async with tls_server(sni.context) as (port, apps):
        assert (await presented("10-1-2-3.consoleproxy.company.com"))[0] == chain.leaf.fingerprint
        before, r, w = await presented("console.example.net")
        assert before == fqdn.fingerprint
        await until(lambda: apps[-1].transport is not None)  # the server's side ends its handshake last
        t = apps[-1].transport
        assert t is not None and t.get_extra_info("sslcontext") is sni.contexts["console.example.net"]

        renewed = make_cert("console.example.net", issuer=chain.inter)
        store.import_item(Item("server-fqdn", 5, renewed.pem, renewed.key_pem(), "console.example.net"))
        sni.reload()
        assert (await presented("console.example.net"))[0] == renewed.fingerprint
        w.write(b"still here")  # the connection made before the swap keeps its certificate
        assert await r.readexactly(10) == b"still here"


async def test_client_side_with_start_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """server_side=False on an open connection (as VeNCrypt will): against asyncio's TLS server."""
    got = asyncio.Queue[bytes]()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            await got.put(data)
            w.write(data.upper())
        await got.put(b"")  # EOF seen
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    async with server:
        port = server.sockets[0].getsockname()[1]
        raw, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", port)
        app = App(echo=False)
        t = await start_tls(raw, client_ctx, app, server_hostname=HOST, handshake_timeout=20)
        assert app.transport is t
        assert dict(x[0] for x in t.get_extra_info("peercert")["subject"])["commonName"] == HOST
        t.write(b"hello")
        await until(lambda: bytes(app.data) == b"HELLO")
        t.close()
        async with asyncio.timeout(20):
            assert await got.get() == b"hello"
            assert await got.get() == b""
        await until(lambda: bool(app.lost))

        # the wrong name: the client's verification fails the handshake
        raw, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", port)
        with pytest.raises(ssl.SSLCertVerificationError):
            await start_tls(raw, client_ctx, App(), server_hostname="other.example")


async def test_a_peer_that_never_answers_close_notify_is_cut_after_the_shutdown_timeout(
    server_ctx: ssl.SSLContext, cert: Cert
) -> None:
    """close() waits for the peer's close_notify only up to shutdown_timeout: a peer that reads
    ours and then says nothing would otherwise hold the connection for ever."""
    made: list[App] = []

    def closer() -> App:
        made.append(SaysBye("close"))
        return made[-1]

    def silent(s: ssl.SSLSocket) -> str:
        s.sendall(b"hi")
        assert _read_to_end(s) == (b"bye", "close_notify")
        # No close_notify back: wait on a plain duplicate of the socket for the server's TCP end.
        with socket.socket(fileno=os.dup(s.fileno())) as plain:
            plain.settimeout(20)
            try:
                return "closed" if plain.recv(1) == b"" else "data"
            except ConnectionResetError:
                return "closed"

    loop = asyncio.get_running_loop()
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    with listening:
        port = listening.getsockname()[1]
        peer = asyncio.create_task(asyncio.to_thread(_blocking_client, port, cert.pem, silent))
        conn, _ = await loop.sock_accept(listening)
        app = closer()
        t = TLSTransport(server_ctx, app, shutdown_timeout=0.2)
        wire = t.wire
        assert wire is not None
        await loop.connect_accepted_socket(lambda: wire, conn)
        await t.handshake
        async with asyncio.timeout(20):
            assert await peer == "closed"
        await until(lambda: bool(app.lost))
        assert app.lost == [None]


async def test_a_silent_peer_fails_the_handshake_timeout(server_ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    with listening:
        _, w = await asyncio.open_connection("127.0.0.1", listening.getsockname()[1])
        conn, _ = await loop.sock_accept(listening)
        app = App()
        with pytest.raises(ConnectionAbortedError, match="timed out"):
            await accept_tls(conn, server_ctx, app, handshake_timeout=0.1)
        assert app.transport is None
        w.close()


async def test_start_tls_takes_the_bytes_the_old_protocol_already_read(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """A plain protocol reads ``STARTTLS\\n`` and the ClientHello in one read: TLS begins with
    those bytes (already_read), the handshake completes and the stream is TLS from then on."""
    apps: list[App] = []

    class Plain(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.seen = getattr(self, "seen", b"") + data
            if len(self.seen) <= 9:
                return  # the line alone: the TLS bytes come in a later read (not the case tested)
            assert self.seen.startswith(b"STARTTLS\n")
            apps.append(App())
            t = asyncio.ensure_future(
                start_tls(self.transport, server_ctx, apps[-1], server_side=True, already_read=self.seen[9:])
            )
            t.add_done_callback(lambda t: t.exception())

    server = await asyncio.get_running_loop().create_server(Plain, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        hello = ssl.MemoryBIO()
        out = ssl.MemoryBIO()
        obj = client_ctx.wrap_bio(hello, out, server_hostname=HOST)
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"STARTTLS\n" + out.read())  # one segment: the protocol reads both at once
        async with asyncio.timeout(20):
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    w.write(out.read())
                    data = await r.read(65536)
                    assert data, "closed during the handshake"
                    hello.write(data)
            w.write(out.read())
            obj.write(b"after")
            w.write(out.read())
            while True:
                with contextlib.suppress(ssl.SSLWantReadError):
                    assert obj.read(5) == b"after"  # echoed through the upgraded connection
                    break
                hello.write(await r.read(65536))
        w.close()


async def test_start_tls_lets_go_of_the_protocol_it_replaces(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """The plain protocol before the upgrade (one with ``data_received``, as VeNCrypt's
    handshake protocol) is freed once the application's protocol changes: on uvloop the TCP
    transport keeps the last ``data_received`` it was given until the new protocol has one."""

    class Before(asyncio.BufferedProtocol):
        def get_buffer(self, sizehint: int) -> bytearray:
            return bytearray(1024)

        def buffer_updated(self, nbytes: int) -> None:
            pass

        def data_received(self, data: bytes) -> None:
            pass

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    async with server:
        port = server.sockets[0].getsockname()[1]
        raw, before = await asyncio.get_running_loop().create_connection(Before, "127.0.0.1", port)
        gone = weakref.ref(before)
        del before
        t = await start_tls(raw, client_ctx, App(echo=False), server_hostname=HOST, handshake_timeout=20)
        gc.collect()
        assert gone() is None
        t.close()
