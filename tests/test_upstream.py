"""The up direction's own WebSocket reader (browser.BrowserConnection, wsframes.Connection) end to
end, plain and TLS."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import aiohttp
import harness
import pytest
from harness import RFBClient, aiohttp_console, connect_echo, echo_backend, running_proxy, tcp_server
from websockets.exceptions import ConnectionClosed


@pytest.fixture(autouse=True, params=["plain", "tls"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(harness, "TLS_BY_DEFAULT", request.param == "tls")
    return str(request.param)


async def test_bytes_pipelined_before_the_relay_arrive_once_and_in_order(tmp_path: Path) -> None:
    """Messages sent right behind ClientInit wait in aiohttp's queue, a fragmented one is split
    across the hand-over: all reach the VNC server exactly once, in order."""
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            version = await c.read_exact(12)
            await c.send(version)
            (count,) = await c.read_exact(1)
            await c.read_exact(count)
            await c.send(b"\x01")
            assert await c.read_exact(4) == bytes(4)
            parts = [os.urandom(n) for n in (1, 100, 70_000, 3, 200_000)]
            # ClientInit and the first message in one WebSocket message, then more without
            # waiting for ServerInit, then a fragmented message and a ping.
            await c.send(b"\x01" + parts[0])
            for part in parts[1:3]:
                await c.send(part)
            await c.ws.send([parts[3], parts[4][:5], parts[4][5:]])  # one message, 3 frames
            pong = await c.ws.ping(b"up")
            (name_len,) = struct.unpack(">I", (await c.read_exact(24))[20:])  # ServerInit
            assert await c.read_exact(name_len) == b"echo"
            expected = b"".join(parts)
            assert await c.read_exact(len(expected), timeout=20) == expected
            async with asyncio.timeout(10):
                await pong
            await c.send(b"after")
            assert await c.read_exact(5) == b"after"


async def test_client_ping_and_close_during_the_relay(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            await connect_echo(c)
            await c.send(b"x")
            assert await c.read_exact(1) == b"x"
            async with asyncio.timeout(10):
                await (await c.ws.ping(b"hb"))
            async with asyncio.timeout(10):
                await c.ws.close(code=1000, reason="bye")
            assert c.ws.close_code == 1000  # the proxy answered our close
        async with asyncio.timeout(10):
            while len(p.server.registry):
                await asyncio.sleep(0.01)


async def test_text_frame_in_the_relay_is_1003(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            await connect_echo(c)
            await c.ws.send("text")
            with pytest.raises(ConnectionClosed) as info:
                async with asyncio.timeout(10):
                    while True:
                        await c.ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1003


async def test_a_busy_client_is_not_pinged_out(tmp_path: Path) -> None:
    """Data from the browser counts as life (the relay's heartbeat times the last read, of any
    kind): a client that keeps typing but never answers a ping stays connected."""
    async with (
        running_proxy(tmp_path, limits={"ping_interval_seconds": 0.4}) as p,
        tcp_server(echo_backend) as port,
        aiohttp.ClientSession() as http,
    ):
        url = p.url(p.token(port=port))
        async with http.ws_connect(url, autoping=False, ssl=p.client_ssl or False) as ws:
            await aiohttp_console(ws)
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.0  # five ping intervals
            echoed = 0
            while loop.time() < end:
                await ws.send_bytes(b"k")
                async with asyncio.timeout(5):
                    msg = await ws.receive()
                    while msg.type is aiohttp.WSMsgType.PING:  # not answered, on purpose
                        msg = await ws.receive()
                assert msg.type is aiohttp.WSMsgType.BINARY, f"closed after {echoed} echoes: {msg}"
                assert msg.data == b"k"
                echoed += 1
                await asyncio.sleep(0.05)
            assert echoed >= 20
            assert not ws.closed


async def test_heartbeat_pings_during_the_relay_and_a_silent_client_is_closed(tmp_path: Path) -> None:
    """The proxy's pings (every ping_interval_seconds) still go out while BrowserConnection owns the
    connection; a client that answers stays, one that does not is cut (the sweeper's pong timeout)."""
    async with (
        running_proxy(tmp_path, limits={"ping_interval_seconds": 0.4}) as p,
        tcp_server(echo_backend) as port,
        aiohttp.ClientSession() as http,
    ):
        url = p.url(p.token(port=port))
        ssl = p.client_ssl or False
        # autoping=False: pings reach us; we answer the first two, then stop answering.
        async with http.ws_connect(url, autoping=False, ssl=ssl) as ws:
            await aiohttp_console(ws)
            pings = 0
            async with asyncio.timeout(20):
                while True:
                    msg = await ws.receive()
                    if msg.type is aiohttp.WSMsgType.PING:
                        pings += 1
                        if pings <= 2:
                            await ws.pong(msg.data)
                            await ws.send_bytes(b"k")  # the relay still works between pings
                    elif msg.type is aiohttp.WSMsgType.BINARY:
                        assert msg.data == b"k"
                    else:
                        break  # closed by the proxy
            assert pings >= 3
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        async with asyncio.timeout(10):
            while len(p.server.registry):
                await asyncio.sleep(0.01)


async def test_a_silent_client_in_the_rfb_handshake_is_pinged_and_cut(tmp_path: Path) -> None:
    """The sweeper's heartbeat covers the RFB handshake too (aiohttp's own is off): a client that
    goes silent after the 101 is pinged and, not answering, cut long before the handshake timeout."""
    limits = {"ping_interval_seconds": 0.4, "handshake_timeout_seconds": 120}
    async with (
        running_proxy(tmp_path, limits=limits) as p,
        tcp_server(echo_backend) as port,
        aiohttp.ClientSession() as http,
    ):
        url = p.url(p.token(port=port))
        async with http.ws_connect(url, autoping=False, ssl=p.client_ssl or False) as ws:
            pings = 0
            async with asyncio.timeout(20):  # far less than the 120 s handshake timeout
                while (msg := await ws.receive()).type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.PING):
                    pings += msg.type is aiohttp.WSMsgType.PING  # never answered
            assert pings >= 1
            assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR)
        async with asyncio.timeout(10):
            while len(p.server.registry) or p.server.consoles.handshaking:
                await asyncio.sleep(0.01)
