"""The browser's connection of a console, from its upgrade request on: thin asyncio glue.

The accept layer (``listener.py``) hands over a connection whose first request head is a GET
for the console path (``is_console_request``), with the head and any bytes behind it, before
aiohttp has seen a byte. ``BrowserConnection.start`` runs the opening handshake with websockets'
sans-I/O ``ServerProtocol`` (RFC 6455 4.2: method, Upgrade, Connection, key and version; the
101, or a 400/426 answer and a close), and from the 101 on every byte the browser sends goes
through ``wsframes.Connection``, which holds the WebSocket rules (parsing and its caps, pongs,
the heartbeat's decisions, the close handshake). This module only moves bytes and wakes waiters.

Two stages:

- the RFB handshake (``net/console.py``): a small awaitable message API, ``receive()`` (the next
  binary message), ``send_bytes``/``send_str`` (write, then wait while the transport is over
  its high-water mark) and ``close`` (refuse with a close code). Reading pauses while more than
  ``HANDSHAKE_QUEUE`` bytes of messages wait to be received.
- the relay (``start_relay``): message pieces go straight to ``relay.Relay.up`` in the read
  callback, with no task and no per-message object; the write flow control goes to the relay.

Only public transport and protocol APIs: ``write``, ``close``, ``abort``, ``pause_reading``,
``resume_reading``, ``is_closing``, ``get_write_buffer_size``, ``get_extra_info`` and
``set_protocol``; this is a ``BufferedProtocol`` that also takes ``data_received``, so a
transport of either kind can drive it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from consoleproxy.net.relay import CLIENT_READ_SIZE, read_buffer
from consoleproxy.protocol.wsframes import (
    CLOSED,
    END_OF_MESSAGE,
    PING_FRAME,
    Beat,
    Close,
    Connection,
    Event,
    FrameError,
    close_reason,
)

if TYPE_CHECKING:
    from consoleproxy.net.relay import Relay

__all__ = [
    "CONSOLE_PATHS", "HANDSHAKE_QUEUE", "NOTICE_PROTOCOL", "BrowserClosed", "BrowserConnection",
    "ConsoleHandshake", "ConsoleRequest", "is_console_request", "select_subprotocol",
]

# The console's WebSocket (DESIGN.md 6: ``GET /websockify?token=T``).
CONSOLE_PATHS = frozenset({"/websockify"})
# Our console page offers this subprotocol beside "binary": the proxy may then tell it, in a text
# message before RFB starts, that its session is recorded (net/console.py, docs/recording.md).
NOTICE_PROTOCOL = "consoleproxy.notice"
# Bytes of whole messages (and one begun) held for ``receive()`` before reading pauses: a browser
# sends a few dozen bytes during the RFB handshake; this bounds one that sends more.
HANDSHAKE_QUEUE = 64 * 1024

# websockets' ServerProtocol logs every accepted or refused handshake at INFO, and at DEBUG the
# request line, whose query carries the token (secrets are never logged): WARNING and up only,
# whatever the root logger's level. The proxy counts and logs its consoles itself.
_handshake_log = logging.getLogger("consoleproxy.net.browser.handshake")
_handshake_log.setLevel(logging.WARNING)

# BrowserConnection's stages.
HANDSHAKE, RELAYING, CLOSING = 0, 1, 2


def is_console_request(head: bytes) -> bool:
    """True when a request head (from its first byte) is a GET for the console path; its query
    is not looked at. Anything else (the page, static files, health) is aiohttp's."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    path = parts[1].split(b"?", 1)[0]
    return path.decode("latin-1") in CONSOLE_PATHS


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """"binary" when offered (noVNC before 1.2, our page); else our notice protocol when that is
    all a client offers (a browser fails a connection whose offer got no answer); else none
    (noVNC 1.2 and later offer nothing)."""
    for name in ("binary", NOTICE_PROTOCOL):
        if name in offered:
            return name
    return None


class ConsoleHandshake(ServerProtocol):
    """websockets' ServerProtocol with our subprotocol choice (its documented override point; a
    subclass, not the ``select_subprotocol`` argument, which it keeps as a method bound to the
    protocol: a cycle)."""

    def select_subprotocol(self, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        chosen = select_subprotocol(subprotocols)
        return None if chosen is None else Subprotocol(chosen)


@dataclass(frozen=True, slots=True)
class ConsoleRequest:
    """What the console pipeline reads of the upgrade request."""

    path: str  # without the query
    query_string: str  # raw, not decoded (query.py reads it)
    headers: Headers
    transport: asyncio.BaseTransport  # get_extra_info("peername"): the browser, or the PROXY header's source
    subprotocol: str | None

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")

    def offered_subprotocols(self) -> list[str]:
        return [p.strip() for v in self.headers.get_all("Sec-WebSocket-Protocol") for p in v.split(",")]


def _release(ws: ServerProtocol) -> None:
    """Let the handshake's ServerProtocol go by reference counting: its ``parser`` is a generator
    suspended in a method of the protocol (a cycle, ~5 KiB with the request, which only the cycle
    collector would free; bench/idle_memory.py --no-gc showed it per console). Closing the
    generator (Python's own generator API) ends its frame, and with it the cycle."""
    parser = getattr(ws, "parser", None)
    close = getattr(parser, "close", None)
    if callable(close):
        close()
    # A refused handshake keeps its reason (``handshake_exc``), whose traceback holds the
    # protocol's frames: another cycle. The reason stays; its tracebacks go.
    exc: BaseException | None = ws.handshake_exc
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


class BrowserClosed(ConnectionError):
    """The browser closed, broke the protocol or went away before the message asked for."""


class BrowserConnection(asyncio.BufferedProtocol):
    """One console's browser connection from the 101 on (module docstring).

    Longer than 300 lines because its three stages (RFB handshake, relay, closing) are the
    callbacks of one asyncio protocol sharing one state; a class per stage would put a call
    through another object on the relay's path of every read.
    """

    __slots__ = (
        "_backend_paused",
        "_buf",
        "_drain",
        "_ended",
        "_message",
        "_messages",
        "_queue_paused",
        "_queued",
        "_stage",
        "_timer",
        "_waiter",
        "conn",
        "relay",
        "transport",
        "writing_paused",
    )

    def __init__(self, transport: asyncio.Transport, max_message: int) -> None:
        # Dropped once the connection is lost: a transport's protocol holding this object's
        # bound methods would be a cycle only the cycle collector frees.
        self.transport: asyncio.Transport | None = transport
        self.conn = Connection(max_message, now=time.monotonic())
        self._stage = HANDSHAKE
        # None once the relay has the connection (an empty deque is ~600 bytes an idle console).
        self._messages: collections.deque[bytes] | None = collections.deque()
        self._message = bytearray()  # during the handshake: the message being assembled
        self._queued = 0
        self._queue_paused = False
        self._ended: str | None = None  # why receive() now raises BrowserClosed
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._backend_paused = False
        self._buf: memoryview | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.relay: Relay | None = None
        self.writing_paused = False

    # -- the opening handshake ---------------------------------------------------------------

    def start(self, head: bytes, rest: bytes) -> ConsoleRequest | None:
        """Answer the upgrade request ``head``; ``rest`` is what the browser sent behind it.

        Returns the request once the 101 is out (this object is then the transport's protocol),
        or None after an error response (the transport closes)."""
        t = self.transport
        assert t is not None
        # Only the request goes to it (frames are ours), so its own frame size cap never applies.
        ws = ConsoleHandshake(max_size=None, logger=_handshake_log)
        ws.receive_data(head)
        request = next((ev for ev in ws.events_received() if isinstance(ev, Request)), None)
        if request is None:  # not HTTP: websockets answered (414, 431) or has nothing to say
            for data in ws.data_to_send():
                if data:
                    t.write(data)
            _release(ws)
            t.close()
            return None
        response = ws.accept(request)
        ws.send_response(response)
        for data in ws.data_to_send():
            if data:
                t.write(data)
        _release(ws)
        if response.status_code != 101:
            t.close()
            return None
        path, _, query = request.path.partition("?")
        req = ConsoleRequest(path, query, request.headers, t, ws.subprotocol)
        t.set_protocol(self)
        if rest:
            self.data_received(rest)
        return req

    # -- the message API (the RFB handshake) -------------------------------------------------

    async def receive(self) -> bytes:
        """The browser's next binary message; ``BrowserClosed`` once none can come."""
        while not self._messages:
            if self._ended is not None or self._messages is None:
                raise BrowserClosed(self._ended or "the relay has the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        msg = self._messages.popleft()
        self._queued -= len(msg)
        if self._queue_paused and self._queued + len(self._message) <= HANDSHAKE_QUEUE:
            self._queue_paused = False
            self._resume()
        return msg

    async def send_bytes(self, data: bytes) -> None:
        await self._send(self.conn.send_binary(data))

    async def send_str(self, text: str) -> None:
        await self._send(self.conn.send_text(text.encode()))

    async def _send(self, frame: bytes) -> None:
        t = self.transport
        if not frame or t is None or t.is_closing():
            raise BrowserClosed("the browser's connection is closed")
        t.write(frame)
        if self.writing_paused:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    # -- the relay ---------------------------------------------------------------------------

    def start_relay(self, relay: Relay) -> list[bytes]:
        """Hand the connection to ``relay``; returns what the browser sent that no ``receive()``
        took, in order (whole messages, then the start of one), for the VNC server."""
        pending = list(self._messages or ())
        if self._message:
            pending.append(bytes(self._message))
        self._messages = None
        self._message = bytearray()
        self._queued = 0
        self.relay = relay
        if self._stage == HANDSHAKE:
            self._stage = RELAYING
        if self._queue_paused:
            self._queue_paused = False
            self._resume()
        return pending

    def pause_for_backend(self) -> None:
        t = self.transport
        if not self._backend_paused and self._stage == RELAYING and t is not None:
            self._backend_paused = True
            with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                t.pause_reading()

    def resume_for_backend(self) -> None:
        if self._backend_paused:
            self._backend_paused = False
            self._resume()

    def _resume(self) -> None:
        t = self.transport
        if t is not None:
            with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                t.resume_reading()

    def heartbeat(self, now: float, interval: float) -> None:
        """The sweeper's call for every console, in the RFB handshake and in the relay (no timer
        each); ``wsframes.Connection.heartbeat`` decides. Frames are written whole in one call,
        so a ping never lands inside one."""
        t = self.transport
        if t is None:
            return
        beat = self.conn.heartbeat(now, interval)
        if beat is Beat.PING:
            t.write(PING_FRAME)
        elif beat is Beat.DEAD:
            t.abort()  # connection_lost ends the console

    def send_text(self, text: bytes) -> None:
        """One text message (a resume ticket) between the relay's whole frames; nothing once
        closing."""
        t = self.transport
        if t is None or t.is_closing():
            return
        frame = self.conn.send_text(text)
        if frame:
            t.write(frame)

    def close(self, code: int, reason: bytes) -> None:
        """Our close frame (once); the connection ends when the browser answers, at once when it
        closed first or broke the protocol, or when the close timeout says so."""
        self._stage = CLOSING
        self.resume_for_backend()  # the browser's reply must be read
        if self._queue_paused:
            self._queue_paused = False
            self._resume()
        self._end_messages("the console was closed")
        t = self.transport
        if t is None or t.is_closing():
            return
        wait = self.conn.send_close(code, reason)
        self._flush(t)
        if self.conn.state is CLOSED:
            t.close()
        elif wait is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._timer = None
        if self.conn.close_timed_out() and self.transport is not None:
            self.transport.abort()

    def _flush(self, t: asyncio.Transport) -> None:
        out = self.conn.outgoing
        if out:
            t.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    # -- asyncio.BufferedProtocol ------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        # The thread's shared read buffer (relay.read_buffer): the parser copies what it keeps,
        # so the buffer is free again when buffer_updated returns. No allocation per read.
        self._buf = buf = read_buffer()[:CLIENT_READ_SIZE]
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        buf, self._buf = self._buf, None
        assert buf is not None
        self.data_received(buf[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        t = self.transport
        if t is None:
            return
        conn = self.conn
        try:
            events = conn.receive_data(data, time.monotonic())
        except FrameError as exc:
            self._broken(exc)
            return
        if conn.outgoing:
            self._flush(t)  # pongs
        stage = self._stage
        if stage == RELAYING:
            assert self.relay is not None
            self.relay.up(events)
        elif stage == HANDSHAKE:
            self._to_queue(events)
        if conn.state is CLOSED:
            self._close_transport()

    def _broken(self, exc: FrameError) -> None:
        if self._stage == RELAYING:
            assert self.relay is not None
            self.relay.stop(exc.code, str(exc))  # its close frame, then the connection ends
        else:
            self._end_messages(f"WebSocket protocol error: {exc}")
            self.close(exc.code, close_reason(str(exc)))
        if self.conn.state is CLOSED:
            self._close_transport()

    def _close_transport(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _to_queue(self, events: list[Event]) -> None:
        for ev in events:
            if type(ev) is bytes:
                self._message += ev
            elif ev is END_OF_MESSAGE and self._messages is not None:
                msg = bytes(self._message)
                self._message.clear()
                self._messages.append(msg)
                self._queued += len(msg)
            elif isinstance(ev, Close):
                # The browser closed during the RFB handshake: answer it (1000, as aiohttp did);
                # receive() raises once the messages before the close are taken.
                self._end_messages("the browser closed the WebSocket")
                self.close(1000, b"")
                break
        if self._waiter is not None and not self._waiter.done() and self._messages:
            self._waiter.set_result(None)
        if not self._queue_paused and self._queued + len(self._message) > HANDSHAKE_QUEUE:
            t = self.transport
            if t is not None and self._stage == HANDSHAKE:
                self._queue_paused = True
                with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                    t.pause_reading()

    def _end_messages(self, why: str) -> None:
        if self._ended is None:
            self._ended = why
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        if self._stage == RELAYING:
            self._stage = CLOSING  # nothing to send a close frame to; the transport closes
            assert self.relay is not None
            self.relay.end("client closed")
        else:
            self._end_messages("the browser closed its connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stage = CLOSING
        self.conn.lost()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._end_messages("the browser's connection was lost")
        # The connection is over: let go of everything that points back here, so this console
        # is freed by reference counting, not left for a full collection (relay.py's docstring).
        self.transport = None
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.browser_gone()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)
        if self.relay is not None:
            self.relay.browser_drained()

