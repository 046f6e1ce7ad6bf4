"""The end of a console, now that the relay outlives aiohttp's handler (issue 8): the relay sends
the close frame itself, waits for the browser's reply (or CLOSE_TIMEOUT) and closes both sockets;
shutdown closes every console with 1001 and does not wait past that timeout. Runs on both loops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from harness import (
    SERVER_INIT,
    Proxy,
    RFBClient,
    aiohttp_console,
    connect_echo,
    echo_backend,
    make_config,
    rfb38_none_handshake,
    running_proxy,
    tcp_server,
)
from websockets.exceptions import ConnectionClosed

from consoleproxy.errors import SessionKilled
from consoleproxy.net import relay
from consoleproxy.net.console import Consoles
from consoleproxy.policy.tokens import Keyring
from consoleproxy.protocol import wsframes
from consoleproxy.server import ProxyServer


async def _wait(cond: object, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def _connection_ended(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """The proxy closed the TCP connection (seen without receive(), which would send a reply)."""
    return bool(ws._reader.is_eof())


async def _console(http: aiohttp.ClientSession, p: Proxy, port: int) -> aiohttp.ClientWebSocketResponse:
    """A relaying console whose client does not answer a close by itself (autoclose=False)."""
    ws = await http.ws_connect(p.url(p.token(port=port)), autoclose=False, ssl=p.client_ssl or False)
    await aiohttp_console(ws)
    await _wait(lambda: len(p.server.consoles.relays) == 1)
    return ws


async def test_a_browser_close_is_answered_and_ends_the_vnc_connection(tmp_path: Path) -> None:
    vnc_ended = asyncio.Event()

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await echo_backend(r, w)  # returns at EOF from the proxy
        vnc_ended.set()

    async with (
        running_proxy(tmp_path) as p, tcp_server(backend) as port, aiohttp.ClientSession() as http,
    ):
        ws = await _console(http, p, port)
        await ws.send_bytes(b"x")
        assert (await ws.receive()).data == b"x"
        async with asyncio.timeout(10):
            await ws.close(code=1000, message=b"bye")  # waits for the proxy's reply
        assert ws.close_code == 1000
        async with asyncio.timeout(10):
            await vnc_ended.wait()
        await _wait(lambda: not p.server.consoles.relays and not len(p.server.registry))
        text = p.server.metrics.render().decode()
        assert 'consoleproxy_sessions_total{result="client_closed"} 1.0' in text


async def test_the_proxy_waits_for_the_browsers_close_reply(tmp_path: Path) -> None:
    async with (
        running_proxy(tmp_path) as p, tcp_server(echo_backend) as port, aiohttp.ClientSession() as http,
    ):
        ws = await _console(http, p, port)
        session = next(iter(p.server.registry))
        assert p.server.kill(session.id, "ended by an administrator")
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (SessionKilled.close_code, "ended by an administrator")
        # The console has ended (registry, metrics) but the connection waits for our reply.
        await _wait(lambda: not len(p.server.registry))
        with pytest.raises(TimeoutError):  # the connection stays open for our reply
            await _wait(lambda: _connection_ended(ws), timeout=0.5)
        assert len(p.server.consoles.relays) == 1
        await ws._writer.close(1000, b"")  # the reply (what aiohttp's client sends on close())
        await _wait(lambda: _connection_ended(ws))  # the proxy closes the connection on it
        await _wait(lambda: not p.server.consoles.relays)


async def test_a_browser_that_never_answers_the_close_is_cut_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wsframes, "CLOSE_TIMEOUT", 0.3)
    async with (
        running_proxy(tmp_path) as p, tcp_server(echo_backend) as port, aiohttp.ClientSession() as http,
    ):
        ws = await _console(http, p, port)
        p.server.kill(next(iter(p.server.registry)).id)
        assert (await ws.receive(timeout=10)).type is aiohttp.WSMsgType.CLOSE
        # No reply (another receive() would send one): the proxy cuts the connection after
        # CLOSE_TIMEOUT instead of waiting forever.
        await _wait(lambda: _connection_ended(ws))
        await _wait(lambda: not p.server.consoles.relays)


async def test_the_vnc_server_closing_sends_1000_with_a_reason(tmp_path: Path) -> None:
    async def last_words(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await rfb38_none_handshake(r, w)
        w.write(SERVER_INIT)
        await r.readexactly(2)
        w.write(b"last")  # then the connection ends (tcp_server closes it)
        await w.drain()

    async with (
        running_proxy(tmp_path) as p, tcp_server(last_words) as port, aiohttp.ClientSession() as http,
    ):
        ws = await http.ws_connect(p.url(p.token(port=port)), ssl=p.client_ssl or False)
        await aiohttp_console(ws)
        await ws.send_bytes(b"go")
        got = bytearray()
        async with asyncio.timeout(10):
            while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
                got += msg.data
        assert got == b"last"  # everything the VNC server sent, then the close frame
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (1000, "the VNC server closed the connection")
        await _wait(lambda: not p.server.consoles.relays and not len(p.server.registry))


async def test_shutdown_sends_1001_and_does_not_wait_past_the_close_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wsframes, "CLOSE_TIMEOUT", 0.5)
    monkeypatch.setattr("consoleproxy.net.console.CLOSE_TIMEOUT", 0.5)
    keyring = Keyring.generate()
    server = ProxyServer(make_config(tmp_path), keyring=keyring)
    await server.start()
    p = Proxy(server, keyring)
    async with tcp_server(echo_backend) as port, aiohttp.ClientSession() as http:
        try:
            ws = await _console(http, p, port)
        except BaseException:
            await server.close()
            raise
        async with asyncio.timeout(10):  # the browser never replies: cut after CLOSE_TIMEOUT
            await server.close()
        await _wait(lambda: _connection_ended(ws))
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (1001, "proxy shutting down")
        assert not server.consoles.relays


async def test_a_relay_that_fails_to_start_still_ends_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in starting the relay (after aiohttp let go of the connection) must not leave a
    console open and uncounted: the browser gets 1011 and the session ends."""
    def broken(self: relay.Relay) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(relay.Relay, "_attach", broken)
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            await connect_echo(c)
            with pytest.raises(ConnectionClosed) as info:
                async with asyncio.timeout(10):
                    await c.ws.recv()
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "internal error")
        await _wait(lambda: not p.server.consoles.relays and not len(p.server.registry))
        assert 'consoleproxy_sessions_total{result="error"} 1.0' in p.server.metrics.render().decode()


async def test_a_bug_in_the_rfb_handshake_closes_the_console_with_1011(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The console pipeline runs in our own task (no aiohttp handler to log a bug and close the
    connection): the browser gets 1011 at once, not a hang until the handshake timeout."""
    async def broken(self: Consoles, *args: object, **kw: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(Consoles, "_rfb_handshake", broken)
    async with running_proxy(tmp_path, limits={"handshake_timeout_seconds": 120}) as p, \
            tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            assert await c.close_code() == 1011
        await _wait(lambda: not len(p.server.registry))
        assert "simulated bug" in caplog.text
        assert 'consoleproxy_sessions_total{result="error"} 1.0' in p.server.metrics.render().decode()


async def test_consoles_ending_every_way_at_once_leave_nothing_behind(tmp_path: Path) -> None:
    """40 consoles end at the same time, ten each way: the browser closes, the browser's TCP
    connection drops, an administrator kills it, the VNC server closes. Afterwards no session,
    relay, active-sessions count or per-console task is left, and every ending was counted."""
    quit_vnc = asyncio.Event()

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await rfb38_none_handshake(r, w)
        w.write(SERVER_INIT)
        if (await r.readexactly(1)) == b"q":  # this console's VNC server will close
            await quit_vnc.wait()
            return
        while await r.read(65536):
            pass

    limits = {"max_sessions_per_client_ip": 0, "max_handshakes_per_ip": 0, "connections_per_ip_per_second": 0}
    async with (
        running_proxy(tmp_path, limits=limits) as p, tcp_server(backend) as port,
        aiohttp.ClientSession() as http,
    ):
        ways = ["browser close", "tcp drop", "kill", "vnc close"] * 10
        consoles = []
        for i, way in enumerate(ways):
            ws = await http.ws_connect(p.url(p.token(port=port, vm=f"vm-{i}")), ssl=p.client_ssl or False)
            await aiohttp_console(ws)
            await ws.send_bytes(b"q" if way == "vnc close" else b"k")
            consoles.append((way, ws))
        await _wait(lambda: len(p.server.consoles.relays) == len(ways))
        by_ws = {}
        for s in p.server.registry:
            by_ws[s.vm] = s.id
        quit_vnc.set()
        closing = []
        for i, (way, ws) in enumerate(consoles):
            if way == "browser close":
                closing.append(asyncio.create_task(ws.close()))  # waits for the proxy's reply
            elif way == "tcp drop":
                ws._response.connection.transport.abort()  # type: ignore[union-attr]
            elif way == "kill":
                assert p.server.kill(by_ws[f"vm-{i}"])
        async with asyncio.timeout(20):
            assert all(await asyncio.gather(*closing))
            for way, ws in consoles:  # the client side sees every other end (answering closes)
                while way != "browser close" and (await ws.receive()).type not in (
                    aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR,
                ):
                    pass
        await _wait(lambda: not p.server.consoles.relays and not len(p.server.registry), timeout=20)
        text = p.server.metrics.render().decode()
        assert "consoleproxy_sessions_active 0.0" in text
        assert 'consoleproxy_sessions_total{result="killed"} 10.0' in text
        assert 'consoleproxy_sessions_total{result="server_closed"} 10.0' in text
        assert 'consoleproxy_sessions_total{result="client_closed"} 20.0' in text
        names = [t.get_coro().__qualname__ for t in asyncio.all_tasks()]  # type: ignore[union-attr]
        assert not [n for n in names if "handle_console" in n or "RequestHandler" in n], names


async def test_no_ping_follows_the_close_of_a_refused_console(tmp_path: Path) -> None:
    """A refused console (here a bad token) gets its close frame and then only waits for the
    reply: the sweeper, which pings consoles in the RFB handshake, leaves it alone."""
    async with (
        running_proxy(tmp_path, limits={"ping_interval_seconds": 0.2}) as p, aiohttp.ClientSession() as http,
    ):
        url = p.url("not-a-token")
        ws = await http.ws_connect(url, autoclose=False, autoping=False, ssl=p.client_ssl or False)
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4001, msg
        await asyncio.sleep(1.0)  # five ping intervals of silence from us; no reply to the close
        later = [m.type for m, _ in ws._reader._buffer]
        assert aiohttp.WSMsgType.PING not in later, later
        await ws._writer.close(1000, b"")
        await _wait(lambda: _connection_ended(ws))
