"""An ended console is freed by reference counting alone (issue 24).

In a proxy holding thousands of idle consoles a full collection of the cycle collector is rare, so
whatever an ended console leaves in a reference cycle stays in memory long after it ended (about
26 KiB per TLS console was seen piling up). These tests switch the collector off, open consoles,
end them each way a console can end, and count the relay's objects still alive: none may be. A
positive control leaves one link in place and shows the count then is not zero.

Runs on both loops (conftest.BOTH_LOOPS), over plain WebSocket and TLS; a few ways also with a
VeNCrypt VNC server (with ``loop.start_tls`` there, asyncio's TLS objects held whole consoles in a
cycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import harness
import pytest
from certutil_helpers import make_cert
from harness import SERVER_INIT, Proxy, RFBClient, connect_echo, make_config, rfb38_none_handshake, tcp_server

from consoleproxy.net import relay
from consoleproxy.net.browser import BrowserConnection
from consoleproxy.net.console import Consoles
from consoleproxy.net.relay import Relay, _Backend
from consoleproxy.net.tlstransport import TLSTransport
from consoleproxy.net.vncconn import VNCConnection
from consoleproxy.policy.sessions import Session
from consoleproxy.policy.tokens import Keyring
from consoleproxy.recordings.recording import Recorder
from consoleproxy.server import ProxyServer
from consoleproxy.tls.certsni import make_ssl_context

N = 3
WAYS = [
    "browser close", "tcp drop", "vnc close", "admin kill", "idle", "lifetime", "drain", "shutdown",
    "relay fails to start", "refused",
]
# Limits long enough never to fire while consoles open; the test moves a session's clock instead.
SECTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "idle": {"limits": {"idle_timeout_seconds": 5}},
    "lifetime": {"limits": {"max_lifetime_seconds": 5}},
    "drain": {"drain": {"grace_seconds": 0, "deadline_seconds": 0.05}},
}


@pytest.fixture(autouse=True, params=["plain", "tls"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(harness, "TLS_BY_DEFAULT", request.param == "tls")
    return str(request.param)


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()  # what earlier tests left in cycles is not counted
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def count_live() -> dict[str, int]:
    """Live objects of one console, found without a collection (gc.get_objects() only lists)."""
    names = (
        "Relay", "BrowserConnection", "_Backend", "VNCConnection", "Session", "TLSTransport", "SSLObject",
        "Recorder",
    )
    counts = dict.fromkeys(names, 0)
    for o in gc.get_objects():
        t = type(o)
        if t in (Relay, BrowserConnection, _Backend, VNCConnection, Session, Recorder, TLSTransport):
            # TLSTransport: the proxy's side of a TLS console (tlstransport.py).
            counts[t.__name__] += 1
        elif issubclass(t, ssl.SSLObject) and o.server_side:  # the proxy's side of a TLS console
            counts["SSLObject"] += 1
    return counts


async def _wait(cond: Any, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def proxy(
    tmp_path: Path, way: str, record: bool = False, vnc_ca: Path | None = None
) -> AsyncIterator[Proxy]:
    limits = {"max_sessions_per_client_ip": 0, "max_handshakes_per_ip": 0, "connections_per_ip_per_second": 0}
    sections = dict(SECTIONS.get(way, {}))
    if vnc_ca is not None:
        sections["targets"] = {"vnc_ca_file": str(vnc_ca)}
    if record:
        sections["recording"] = {"enabled": True, "store": f"file://{tmp_path / 'rec'}"}
    sections = {**sections, "limits": {**limits, **sections.get("limits", {})}}
    keyring = Keyring.generate()
    server = ProxyServer(make_config(tmp_path, **sections), keyring=keyring)
    await server.start()
    p = Proxy(server, keyring)
    harness._client_ssl = p.client_ssl
    try:
        yield p
    finally:
        if way != "shutdown":
            await server.close()


async def open_and_end(tmp_path: Path, way: str, record: bool = False, vencrypt: bool = False) -> Proxy:
    """N consoles relay (an echo each way), then all end ``way``; returns once all are gone.
    ``vencrypt``: the VNC servers ask for VeNCrypt's TLS (``vencrypt_server``)."""
    quit_vnc = asyncio.Event()

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await rfb38_none_handshake(r, w)
        w.write(SERVER_INIT)
        while data := await r.read(65536):
            w.write(data)
            if way == "vnc close":
                await quit_vnc.wait()
                return  # tcp_server closes the connection

    servers = vencrypt_server(tmp_path, quit_vnc if way == "vnc close" else None) if vencrypt else None
    async with contextlib.AsyncExitStack() as stack:
        if servers is None:
            port = await stack.enter_async_context(tcp_server(backend))
            ca = None
        else:
            port, ca = await stack.enter_async_context(servers)
        p = await stack.enter_async_context(proxy(tmp_path, way, record, vnc_ca=ca))
        await _open_and_end(p, port, way, quit_vnc)
    return p


async def _open_and_end(p: Proxy, port: int, way: str, quit_vnc: asyncio.Event) -> None:
    go = asyncio.Event()
    ready = [asyncio.Event() for _ in range(N)]

    async def console(i: int) -> None:
        token = "not-a-token" if way == "refused" else p.token(port=port, vm=f"vm-{i}")
        async with RFBClient.connect(p.url(token)) as c:
            if way == "refused":
                assert await c.close_code() == 4001
                ready[i].set()
                return
            await connect_echo(c)
            if way == "relay fails to start":
                ready[i].set()
                assert await c.close_code() == 1011
                return
            await c.send(b"x%d" % i)
            assert await c.read_exact(2) == b"x%d" % i  # relaying, both ways
            ready[i].set()
            await go.wait()
            if way == "browser close":
                return  # leaving the block closes: our close frame, the proxy's reply
            if way == "tcp drop":
                c.ws.transport.abort()
                return
            await c.close_code(timeout=20)  # the proxy closes; websockets answers

    async with asyncio.TaskGroup() as tg:
        for i in range(N):
            tg.create_task(console(i))
        async with asyncio.timeout(20):
            for ev in ready:
                await ev.wait()
        if way not in ("refused", "relay fails to start"):
            assert len(p.server.consoles.relays) == N
            assert count_live()["Relay"] >= N  # the count sees them while they live
        sessions = list(p.server.registry)
        if way == "vnc close":
            quit_vnc.set()
        elif way == "admin kill":
            for s in sessions:
                assert p.server.kill(s.id)
        elif way == "idle":
            for s in sessions:
                s.last_activity -= 1000  # the sweeper finds them idle on its next pass
        elif way == "lifetime":
            for s in sessions:
                s.started_mono -= 1000
        elif way == "drain":
            p.server.start_drain()
        elif way == "shutdown":
            await p.server.close()
        go.set()
    await _wait(lambda: not p.server.consoles.relays and not len(p.server.registry))


@pytest.mark.parametrize("way", WAYS)
async def test_an_ended_console_is_freed_without_the_cycle_collector(
    tmp_path: Path, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await check_freed(tmp_path, way, monkeypatch)


RECORDED_WAYS = ["browser close", "vnc close", "admin kill", "shutdown", "relay fails to start"]


@pytest.mark.parametrize("way", RECORDED_WAYS)
async def test_an_ended_recorded_console_is_freed_too(
    tmp_path: Path, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorder (and the filter it observes input through) leaves no cycle either."""
    await check_freed(tmp_path, way, monkeypatch, record=True)
    assert list((tmp_path / "rec").glob("*.cprec")), "the consoles were recorded"


VENCRYPT_WAYS = ["browser close", "vnc close", "admin kill"]


@pytest.mark.parametrize("way", VENCRYPT_WAYS)
async def test_an_ended_vencrypt_console_is_freed_too(
    tmp_path: Path, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VNC side's TLS (tlstransport, client side) and the handshake's protocol it replaced
    (uvloop kept that one's data_received) leave nothing behind either."""
    await check_freed(tmp_path, way, monkeypatch, vencrypt=True)


@contextlib.asynccontextmanager
async def vencrypt_server(tmp_path: Path, quit_vnc: asyncio.Event | None) -> AsyncIterator[tuple[int, Path]]:
    """VNC servers asking for VeNCrypt X509None, then echoing; yields the port and the CA file.

    Their TLS is tlstransport's server side, freed by reference counting like the proxy's
    (asyncio's own TLS objects would wait for a collection and be counted here). ``quit_vnc``:
    each closes its connection after its first echo once the event is set.
    """
    cert = make_cert("vnc.example", sans=["vnc.example"])
    (tmp_path / "vnc-cert.pem").write_text(cert.pem)
    (tmp_path / "vnc-key.pem").write_text(cert.key_pem())
    ctx = make_ssl_context(tmp_path / "vnc-cert.pem", tmp_path / "vnc-key.pem")
    steps = [(12, b"\x01\x13"), (1, b"\x00\x02"), (2, b"\x00\x01" + struct.pack(">I", 260)), (4, b"\x01")]
    closers: set[asyncio.Task[None]] = set()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = cast(asyncio.Transport, transport)
            self.t.write(b"\x00\x00\x00\x00" + SERVER_INIT)  # SecurityResult OK, ServerInit
            self.client_init = True

        def data_received(self, data: bytes) -> None:
            if self.client_init:
                self.client_init, data = False, data[1:]
            if data:
                self.t.write(data)
                if quit_vnc is not None:
                    task = asyncio.ensure_future(quit_vnc.wait())
                    closers.add(task)
                    task.add_done_callback(lambda task: (closers.discard(task), self.t.close()))

    class VeNCrypt(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = cast(asyncio.Transport, transport)
            self.buf = b""
            self.step = 0
            self.t.write(b"RFB 003.008\n")

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while self.step < len(steps) and len(self.buf) >= steps[self.step][0]:
                n, reply = steps[self.step]
                self.buf = self.buf[n:]
                self.step += 1
                self.t.write(reply)
            if self.step == len(steps):
                self.step += 1
                # In this callback, not a task: nothing the client sends next can miss the TLS layer.
                tls = TLSTransport(ctx, Echo(), server_side=True, handshake_timeout=20)
                tls.incoming.write(self.buf)
                tls.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
                assert tls.wire is not None
                self.t.set_protocol(tls.wire)
                tls.wire.connection_made(self.t)
                del self.t

    server = await asyncio.get_running_loop().create_server(VeNCrypt, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], tmp_path / "vnc-cert.pem"
    finally:
        server.close()
        for task in closers:
            task.cancel()


async def check_freed(
    tmp_path: Path, way: str, monkeypatch: pytest.MonkeyPatch, record: bool = False,
    vencrypt: bool = False,
) -> None:
    if way == "relay fails to start":
        def broken(self: Relay) -> None:
            raise RuntimeError("simulated bug")

        monkeypatch.setattr(relay.Relay, "_attach", broken)
        # pytest's log capture keeps each record, and the logged traceback's frames hold the
        # relay: written out and dropped instead, as a server's log handler does.
        monkeypatch.setattr(logging.getLogger("consoleproxy"), "propagate", False)
    with collector_off():
        base = count_live()
        await open_and_end(tmp_path, way, record, vencrypt)
        # Sockets close in the loop's next turns (connection_lost): wait for that, bounded.
        left: dict[str, int] = {}

        def freed() -> bool:
            nonlocal left
            now = count_live()
            left = {k: now[k] - base[k] for k in now if now[k] > base[k]}
            return not left

        with contextlib.suppress(TimeoutError):
            await _wait(freed, timeout=10)
        assert not left, f"ended consoles ({way}) still alive without a full collection: {left}"


async def test_positive_control_a_link_left_in_place_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without breaking the session -> relay link (the relay's ``stop`` as the session's closer)
    every ended console stays, with its reader and, over TLS, its TLS transport: the count above
    would not be zero. A full collection then frees them: a cycle, not a leak."""
    ended = Consoles._relay_ended

    def keep_link(self: Consoles, r: Relay, result: str) -> None:
        ended(self, r, result)
        r.session.closer = r.stop

    monkeypatch.setattr(Consoles, "_relay_ended", keep_link)
    with collector_off():
        base = count_live()
        p = await open_and_end(tmp_path, "admin kill")
        tls = p.server.cfg.listen.tls
        # The relay no longer holds its _Backend: it goes once the VNC socket's connection_lost
        # has run, so by then every socket of these consoles is closed.
        await _wait(lambda: count_live()["_Backend"] == base["_Backend"])
        now = count_live()
        for name in ("Relay", "BrowserConnection", "Session") + (("TLSTransport",) if tls else ()):
            assert now[name] - base[name] >= N, (name, now, base)
        gc.collect()
        after = count_live()
        assert after["Relay"] - base["Relay"] == 0, after


async def test_a_browser_gone_before_the_relay_starts_ends_as_client_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The browser's connection is lost between its ClientInit and the relay's start: the console
    ends ("client closed"), its VNC connection is closed and nothing of it stays registered."""
    start = Consoles._start_relay
    vnc_closed = asyncio.Event()

    def gone_first(self: Consoles, ws: Any, *args: Any, **kw: Any) -> None:
        ws.connection_lost(None)  # what the loop runs when the browser's socket breaks
        start(self, ws, *args, **kw)

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await rfb38_none_handshake(r, w)
        w.write(SERVER_INIT)
        await r.read()  # EOF: the proxy closed the VNC connection
        vnc_closed.set()

    monkeypatch.setattr(Consoles, "_start_relay", gone_first)
    with collector_off():
        base = count_live()
        async with tcp_server(backend) as port, proxy(tmp_path, "browser close") as p:
            async with RFBClient.connect(p.url(p.token(port=port))) as c:
                await connect_echo(c)
                await c.close_code()
            async with asyncio.timeout(10):
                await vnc_closed.wait()
            await _wait(lambda: not len(p.server.registry))
            assert not p.server.consoles.relays
            text = p.server.metrics.render().decode()
            assert 'consoleproxy_sessions_total{result="client_closed"} 1.0' in text
            assert "consoleproxy_sessions_active 0.0" in text
        # Ours are freed, the browser's connection too (aiohttp's WebSocketResponse, which owned a
        # console until the relay started, kept it in a cycle until issue 17).
        ours = ("Relay", "Session", "BrowserConnection")
        await _wait(lambda: all(count_live()[k] <= base[k] for k in ours))
