"""Memory per idle console: what the relay no longer needs is not kept (issue 8).

A console's connection is ours from its upgrade request on (``browser.BrowserConnection``; issue
17): aiohttp's request handler, request, WebSocket response, message queue, frame reader, HTTP
parser and tasks (~13 KiB a console when aiohttp owned it until the relay started) are never
created for a console, and once ``_Backend`` owns the VNC server's socket the VNC connection's
handshake protocol (``vncconn.VNCConnection``) is not kept. These tests count live instances
while consoles relay, so a change that holds them again fails here (no sizes, no timing).
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from aiohttp import base_protocol, http_parser, web_protocol, web_request, web_ws
from aiohttp._websocket import reader as ws_reader
from aiohttp._websocket import reader_py
from harness import RFBClient, connect_echo, echo_backend, rfb38_none_handshake, running_proxy, tcp_server

from consoleproxy.net.vncconn import VNCConnection
from consoleproxy.policy.sessions import Session
from consoleproxy.policy.tokens import Claims

N = 5


def _live(types: tuple[type, ...]) -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) in types]


def _reader_types() -> tuple[type, ...]:
    # The compiled reader when aiohttp has it, and the pure-Python one (AIOHTTP_NO_EXTENSIONS).
    return tuple({ws_reader.WebSocketReader, reader_py.WebSocketReader})


def _parser_types() -> tuple[type, ...]:
    return tuple({http_parser.HttpRequestParser, http_parser.HttpRequestParserPy})


def _aiohttp_per_connection_types() -> tuple[type, ...]:
    return (
        web_protocol.RequestHandler, web_request.BaseRequest, web_request.Request,
        web_ws.WebSocketResponse, ws_reader.WebSocketDataQueue,
        reader_py.WebSocketDataQueue,
    )


def _vnc_handshake_protocols() -> list[object]:
    return _live((VNCConnection,))


def test_the_counted_types_are_seen_by_the_garbage_collector() -> None:
    # Without this, a count of 0 below could mean "invisible to gc.get_objects", not "freed".
    loop = asyncio.new_event_loop()
    queue = ws_reader.WebSocketDataQueue(base_protocol.BaseProtocol(loop), 2**16, loop=loop)
    for cls in _reader_types():
        reader = cls(queue, 1024, compress=False, decode_text=True)
        assert reader in _live(_reader_types())
        del reader
    conn = VNCConnection()
    assert _vnc_handshake_protocols() == [conn]
    del conn
    loop.close()


async def _a_request_handler_is_seen_while_aiohttp_serves(port: int, ssl: Any) -> None:
    """Positive control: a connection aiohttp serves (kept alive after a request) keeps a
    RequestHandler, and it is found; it goes with the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    async with asyncio.timeout(10):
        while not _live((web_protocol.RequestHandler,)):
            await asyncio.sleep(0.01)
    writer.close()
    await writer.wait_closed()
    async with asyncio.timeout(10):
        while _live((web_protocol.RequestHandler,)):
            await asyncio.sleep(0.01)


async def test_relaying_consoles_keep_no_aiohttp_parser_nor_vnc_stream_protocol(tmp_path: Path) -> None:
    async with tcp_server(echo_backend) as port, running_proxy(tmp_path) as px:
        async with asyncio.TaskGroup() as tg:
            ready = [asyncio.Event() for _ in range(N)]
            done = asyncio.Event()

            async def console(i: int) -> None:
                async with RFBClient.connect(px.url(px.token(port=port, vm=f"vm-{i}"))) as c:
                    await connect_echo(c)
                    msg = b"ping %d" % i
                    await c.send(msg)
                    assert await c.read_exact(len(msg)) == msg  # relaying, both ways
                    ready[i].set()
                    await done.wait()

            for i in range(N):
                tg.create_task(console(i))
            async with asyncio.timeout(30):
                for ev in ready:
                    await ev.wait()
            try:
                await _a_request_handler_is_seen_while_aiohttp_serves(px.port, px.client_ssl)
                assert len(px.server.consoles.relays) == N
                assert len(_live((Session,))) >= N
                live = _live(_aiohttp_per_connection_types())
                assert live == [], f"aiohttp's per-connection objects are kept per console: {live[:3]}"
                # No task waits on a relaying console (aiohttp's handler task has ended).
                names = [t.get_coro().__qualname__ for t in asyncio.all_tasks()]  # type: ignore[union-attr]
                assert not [n for n in names if "RequestHandler" in n or "handle_console" in n], names
                assert _live(_reader_types()) == [], "aiohttp's WebSocketReader is kept per console"
                assert _live(_parser_types()) == [], "aiohttp's HttpRequestParser is kept per console"
                assert _vnc_handshake_protocols() == [], "the VNC handshake protocol is kept per console"
                # The token's claims carry the VNC password: done with after the handshake.
                assert _live((Claims,)) == [], "a console keeps its token's claims (and password)"
            finally:
                done.set()


async def test_a_browser_gone_mid_handshake_ends_its_console(tmp_path: Path) -> None:
    """The browser's EOF wakes the RFB handshake's receive() (BrowserConnection).

    The handshake timeout is long: without the wake-up the console would wait for it.
    """
    async def never_ends(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await rfb38_none_handshake(r, w)  # waits for a ClientInit the browser never sends
        await r.read()

    async with tcp_server(never_ends) as port, running_proxy(
        tmp_path, limits={"handshake_timeout_seconds": 120}
    ) as px:
        async with RFBClient.connect(px.url(px.token(port=port))) as c:
            assert await c.read_exact(12) == b"RFB 003.008\n"  # the proxy now waits for ours
            assert len(px.server.registry) == 1
            c.ws.transport.abort()  # no close frame: the TCP connection just ends
        async with asyncio.timeout(10):  # well within the 120 s handshake timeout
            while len(px.server.registry):
                await asyncio.sleep(0.02)


async def test_aiohttp_lets_go_without_the_cycle_collector(tmp_path: Path) -> None:
    """What aiohttp kept for a console is freed by reference counting when its handler ends: a
    cycle among them (the handler's heartbeat callback is a method of the response) would stay
    until a full collection, which in a proxy with 10,000 idle consoles is rare."""
    async with tcp_server(echo_backend) as port, running_proxy(tmp_path) as px:
        gc.collect()
        gc.disable()
        try:
            async with RFBClient.connect(px.url(px.token(port=port))) as c:
                await connect_echo(c)
                await c.send(b"x")
                assert await c.read_exact(1) == b"x"
                async with asyncio.timeout(10):  # the handler task ends right after the relay starts
                    while any("RequestHandler" in t.get_coro().__qualname__  # type: ignore[union-attr]
                              for t in asyncio.all_tasks()):
                        await asyncio.sleep(0.01)
                types = _aiohttp_per_connection_types()
                kept = [o for o in gc.get_objects() if type(o) in types]  # no collection first
                assert kept == [], f"only the cycle collector would free these: {kept[:3]}"
        finally:
            gc.enable()
