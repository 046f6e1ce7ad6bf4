"""Memory per idle console: what the relay no longer needs is not kept (issue 8).

Once ``ClientReader`` owns the browser's socket and ``_Backend`` the VNC server's, aiohttp's
WebSocket frame reader and HTTP request parser and the VNC socket's StreamReaderProtocol are never
used again; each console keeping them cost ~3.5 KiB. These tests count live instances while
consoles relay, so a change that holds them again fails here (no sizes, no timing).
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from aiohttp import base_protocol, http_parser, web_protocol
from aiohttp._websocket import reader as ws_reader
from aiohttp._websocket import reader_py
from harness import RFBClient, connect_echo, echo_backend, rfb38_none_handshake, running_proxy, tcp_server

from consoleproxy.sessions import Session
from consoleproxy.tokens import Claims

N = 5


def _live(types: tuple[type, ...]) -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) in types]


def _reader_types() -> tuple[type, ...]:
    # The compiled reader when aiohttp has it, and the pure-Python one (AIOHTTP_NO_EXTENSIONS).
    return tuple({ws_reader.WebSocketReader, reader_py.WebSocketReader})


def _parser_types() -> tuple[type, ...]:
    return tuple({http_parser.HttpRequestParser, http_parser.HttpRequestParserPy})


def _proxy_stream_protocols() -> list[asyncio.StreamReaderProtocol]:
    # The proxy's VNC connections are client side (no connected callback); the echo backend's
    # server-side protocols in this same process are not counted.
    return [
        p for p in _live((asyncio.StreamReaderProtocol,))
        if isinstance(p, asyncio.StreamReaderProtocol) and p._client_connected_cb is None  # type: ignore[attr-defined]
    ]


def test_the_counted_types_are_seen_by_the_garbage_collector() -> None:
    # Without this, a count of 0 below could mean "invisible to gc.get_objects", not "freed".
    loop = asyncio.new_event_loop()
    queue = ws_reader.WebSocketDataQueue(base_protocol.BaseProtocol(loop), 2**16, loop=loop)
    for cls in _reader_types():
        reader = cls(queue, 1024, compress=False, decode_text=True)
        assert reader in _live(_reader_types())
        del reader
    loop.close()


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
                assert len(px.server._relays) == N
                # Positive control: the per-connection objects that do stay are found.
                assert len(_live((web_protocol.RequestHandler,))) >= N
                assert len(_live((Session,))) >= N
                assert _live(_reader_types()) == [], "aiohttp's WebSocketReader is kept per console"
                assert _live(_parser_types()) == [], "aiohttp's HttpRequestParser is kept per console"
                assert _proxy_stream_protocols() == [], "the VNC StreamReaderProtocol is kept per console"
                # The token's claims carry the VNC password: done with after the handshake.
                assert _live((Claims,)) == [], "a console keeps its token's claims (and password)"
            finally:
                done.set()


async def test_a_browser_gone_mid_handshake_ends_its_console(tmp_path: Path) -> None:
    """aiohttp's dropped WebSocketReader used to wake ws.receive() at EOF; ClientReader does now.

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
