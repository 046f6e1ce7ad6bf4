"""The byte relay between a browser's WebSocket and the VNC server's TCP connection.

After the RFB security handshake every byte passes unchanged, in both directions at once.

Down (VNC -> browser) runs in the event loop's read callback, with no task and no stream buffer:
the VNC socket's transport gets a small buffered protocol (``_Backend``) that reads up to
``READ_SIZE`` bytes into a buffer shared by all consoles of the thread and writes them, in the same
callback, as one binary WebSocket frame (a 2-10 byte header, then a view of the buffer) to the
browser: over plain TCP header and view go to the socket in one writev(2) (``write_buffers``).
No allocation and no copy in Python per read.

Up (browser -> VNC) also runs in a read callback: from the WebSocket's 101 on, the browser's
transport belongs to ``ClientReader``, whose sans-I/O parser (``wsframes``) unmasks and caps the
client's frames (1009 past ``max_client_message_bytes``). During the RFB handshake it hands whole
messages to aiohttp's queue (``ws.receive()`` works as usual); in the relay the unmasked pieces of
one read go to the VNC server in one writev(2), not joined, with no task wake-up and no
per-message object.

The relay outlives aiohttp's request handler: when it starts, aiohttp lets go of the connection
(``ClientReader.start_relay``) and its handler, request, response and tasks are freed. The relay
then does what they did: it answers pings, pings a silent browser (``ClientReader.heartbeat``,
from the server's sweeper), and at the end sends the close frame and waits for the reply.

Backpressure, both ways, without polling:
- down: when the browser's transport is over its high-water mark (``pause_writing``) we pause
  reading the VNC socket, and resume on its ``resume_writing``; the hypervisor's TCP window then
  shrinks. Memory per console stays bounded by one read plus the transport's high-water mark.
- up: while the VNC transport is over its high-water mark (``pause_writing``) we pause reading
  the browser's socket, and resume on ``resume_writing``.

Per console: this object, the two protocols, the session and the two transports. No task.

An ended console is freed by reference counting, at once: in a process holding thousands of idle
consoles a full collection is rare, and every console left in a cycle until then kept ~26 KiB
(TLS). So no link is left pointing back: the relay lets go of ``_Backend`` when it ends, the
reader of its transport (over TLS the transport's protocol holds the reader's bound methods) and
of the relay when the browser's connection is lost, and the server of the session's closer
(tests/test_relay_freed.py, with the collector off, for every way a console ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WebSocketError, WSMessage, WSMsgType, web

from .rfb import RFBError
from .sessions import Session
from .wsframes import (
    END_OF_MESSAGE,
    Close,
    Event,
    FrameError,
    FrameParser,
    Ping,
    Pong,
    close_frame,
    close_reason,
    frame,
)

if TYPE_CHECKING:
    from .recording import Recorder

__all__ = [
    "CLOSE_TIMEOUT", "MAX_IOV", "READ_SIZE", "STREAM_LIMIT", "ClientReader", "ConsoleWebSocket", "Relay",
    "frame_header", "socket_fd", "write_buffers",
]

# Bytes asked of a socket per read. Large reads mean few WebSocket frames and little Python work
# per byte; a full-screen update is often several hundred KiB. Only a plain (selector) transport
# takes a per-transport size; the buffer is freed as soon as the frame is written.
READ_SIZE = 1024 * 1024
# Bytes asked of the browser's socket per read. Smaller than READ_SIZE: one read goes to the VNC
# server as one write (over that transport's high-water mark reading pauses), so this bounds
# that buffer; measured, 1 MiB reads cost more CPU per GiB than 128-256 KiB ones.
CLIENT_READ_SIZE = 256 * 1024
# Frames up to this size are written as one joined bytes object (header + payload).
SMALL_FRAME = 16 * 1024
# StreamReader buffer limit during the handshake (it pauses the socket at 2 x this).
STREAM_LIMIT = 256 * 1024

_H2 = struct.Struct(">BB").pack
_H4 = struct.Struct(">BBH").pack
_H10 = struct.Struct(">BBQ").pack


def frame_header(length: int) -> bytes:
    """Header of one final, unmasked binary WebSocket frame of ``length`` bytes (RFC 6455 5.2)."""
    if length < 126:
        return _H2(0x82, length)
    if length < 65536:
        return _H4(0x82, 126, length)
    return _H10(0x82, 127, length)


# At most this many buffers go to one writev(2) (Linux's IOV_MAX is 1024); more are joined first.
MAX_IOV = 64


def socket_fd(transport: asyncio.BaseTransport) -> int:
    """The socket of a plain TCP transport, which ``write_buffers`` may write to; -1 for TLS."""
    if transport.get_extra_info("ssl_object") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (AttributeError, OSError, ValueError):
        return -1


def write_buffers(transport: asyncio.WriteTransport, fd: int, bufs: list[Any]) -> None:
    """Write ``bufs`` in order: with one writev(2) when ``fd`` (``socket_fd``) is the transport's
    socket and the transport holds nothing unsent, else through the transport.

    One system call and one wake-up of the reader for a frame's header and payload, or for all
    the pieces of one read, without joining them (a copy). What the socket does not take goes to
    the transport, which buffers it and applies its flow control as usual; an error is left to
    the transport too (its own write meets it and closes the connection as it always does).
    """
    if transport.is_closing():
        return  # the connection is going away and the relay with it (uvloop raises on a write)
    if fd >= 0 and not transport.get_write_buffer_size():
        if len(bufs) > MAX_IOV:
            bufs = [b"".join(bufs)]
        try:
            sent = os.writev(fd, bufs)
        except OSError:  # EAGAIN included: nothing was written
            sent = 0
        for b in bufs:
            n = len(b)
            if sent >= n:
                sent -= n
                continue
            transport.write(memoryview(b)[sent:] if sent else b)
            sent = 0
        return
    for b in bufs:
        transport.write(b)


# The down direction reads into one buffer per event-loop thread, shared by every console: reads
# and frame writes happen in one callback, so the buffer is free again before the next read unless
# a transport kept a reference to unsent bytes (then it is left to that transport and a new one is
# made). No per-read allocation, no page faults for fresh memory, nothing per idle console.
_read_buffers: dict[int, memoryview] = {}


def _read_buffer() -> memoryview:
    key = threading.get_ident()
    view = _read_buffers.get(key)
    if view is None:
        view = _read_buffers[key] = memoryview(bytearray(READ_SIZE))
    return view


# How long a browser has to answer our close frame before its connection is cut (aiohttp's
# WebSocketResponse default, which the relay kept while aiohttp's handler closed its consoles).
CLOSE_TIMEOUT = 10.0
_PING = frame(0x9)

# ClientReader's stages (see its docstring).
HANDSHAKE, RELAYING, CLOSING = 0, 1, 2


class _Backend(asyncio.BufferedProtocol):
    """The VNC socket's protocol during the relay: bytes in -> one WebSocket frame out."""

    __slots__ = (
        "_buf", "_lost", "_relay", "_turns", "_yielding", "browser_wait", "transport", "writing_paused",
    )

    def __init__(self, relay: Relay, transport: asyncio.Transport) -> None:
        self._relay = relay
        self.transport = transport
        self._lost = False
        self._buf: memoryview | None = None
        self._yielding = False  # reading paused until the loop's next turn (see buffer_updated)
        self._turns = not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)
        self.browser_wait = False  # reading paused until the browser's transport drains
        self.writing_paused = False

    def get_buffer(self, sizehint: int) -> memoryview:
        self._buf = buf = _read_buffer()
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        buf, self._buf = self._buf, None
        assert buf is not None
        self._send(buf[:nbytes])
        if self._relay.ws_transport.get_write_buffer_size():
            # The browser's transport may hold a view of the shared buffer: leave it that one.
            _read_buffers.pop(threading.get_ident(), None)
        if (
            self._turns and nbytes == len(buf) and not self.browser_wait
            and not self._yielding and not self._relay.ended
        ):
            # A full read: more is waiting. Every other busy console reads once before this one
            # reads again: libuv (uvloop) reads a socket up to 32 times in one callback, and
            # measured, a few of 100 streaming consoles then got 2-3x the bandwidth of the rest.
            # asyncio's own loops read each ready socket once per turn and need no help.
            self._yielding = True
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._take_turn)

    def _take_turn(self) -> None:
        self._yielding = False
        if not self.browser_wait and not self._relay.ended and not self._lost:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._send(data)

    def _send(self, data: bytes | memoryview) -> None:
        r = self._relay
        if r.ended:
            return
        n = len(data)
        s = r.session
        s.bytes_down += n
        s.last_activity = time.monotonic()
        if r.recorder is not None:
            r.recorder.down(data)  # copies: ``data`` may be a view of the shared read buffer
        out = r.ws_transport
        if out.is_closing():
            r.end("client closed")
            return
        if r.ws_fd >= 0:
            # Header and payload in one writev(2): one TCP segment train and one wake-up in the
            # browser, and the payload is not copied.
            write_buffers(out, r.ws_fd, [frame_header(n), data])
        elif n <= SMALL_FRAME:
            out.write(frame_header(n) + data)  # TLS: one pass through the TLS layer
        else:
            out.writelines((frame_header(n), data))  # TLS: joins before 3.12; one TLS write
        if r.client.writing_paused and not self.browser_wait:
            # The browser is slower than the VNC server: stop reading until it catches up
            # (``browser_drained``, from the browser transport's resume_writing; no task waits).
            self.browser_wait = True
            self.transport.pause_reading()

    def browser_drained(self) -> None:
        if self.browser_wait:
            self.browser_wait = False
            if not self._yielding and not self._relay.ended and not self._lost:
                self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._relay.end("server closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._relay.end("server closed" if exc is None else f"error: {exc.__class__.__name__}: {exc}")

    # Up direction flow control: the VNC server is slower than the browser -> stop reading it.
    def pause_writing(self) -> None:
        self.writing_paused = True
        if not self._relay.ended:
            self._relay.client.pause_for_backend()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._relay.client.resume_for_backend()


class ConsoleWebSocket(web.WebSocketResponse):
    """aiohttp's WebSocket response whose incoming frames ``ClientReader`` parses from the 101 on.

    Taking the transport in ``_post_start`` (before aiohttp's parser has seen a byte, bytes the
    browser sent right behind its upgrade request included) means no frame is ever split between
    two parsers: nothing can be lost or read twice when the relay starts.
    """

    # Our attributes in slots: aiohttp's own fill this response's __dict__ to a resize.
    __slots__ = ("_max_message", "client")

    def __init__(self, *, max_message: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client: ClientReader | None = None
        self._max_message = max_message

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        handler: Any = request.protocol
        tail: bytes = handler._message_tail  # bytes after the upgrade request, not parsed yet
        handler._message_tail = b""
        super()._post_start(request, protocol, writer)
        self.client = ClientReader(self, request, self._max_message)
        # From here on ClientReader parses every byte: aiohttp's WebSocketReader (2 KiB) and
        # HTTP request parser are never fed again. Dropped so they are not kept while the RFB
        # handshake runs (ClientReader.connection_lost does the reader's one remaining job, the
        # queue's EOF; aiohttp checks both for None: it sets them so itself in connection_lost).
        # Private attributes of aiohttp 3.x: each is set only when it is there (tests/
        # test_relay_memory.py fails if aiohttp renames them and the objects are kept again).
        self._parser = None
        for name in ("_payload_parser", "_parser"):
            if getattr(handler, name, None) is not None:
                setattr(handler, name, None)
        if tail:
            self.client.data_received(tail)


class ClientReader(asyncio.BufferedProtocol):
    """The browser connection's protocol from the 101 on, in three stages:

    - ``HANDSHAKE``: aiohttp's handler runs the RFB handshake with ``ws.receive()``. Whole
      messages, pings, pongs and closes go to aiohttp's queue as its own parser would put them
      there; write flow control and the connection's end are passed on to aiohttp.
    - ``RELAYING`` (``start_relay``): aiohttp has let go of the connection; its handler, request
      and response are gone. Message pieces go straight to the VNC server and pings are answered
      here; ``heartbeat`` (from the server's sweeper) pings a silent browser.
    - ``CLOSING`` (``close``): our close frame is out; the browser's reply, or CLOSE_TIMEOUT,
      ends the connection.
    """

    __slots__ = (
        "_backend_paused", "_buf", "_failed", "_message", "_parser", "_stage",
        "_timer", "handler", "heard", "ping_sent", "queue", "relay", "transport", "writing_paused",
    )

    def __init__(self, ws: web.WebSocketResponse, request: web.BaseRequest, max_message: int) -> None:
        transport = request.transport
        assert transport is not None
        # Dropped once the connection is lost: over TLS the transport's protocol holds this
        # reader's bound methods, a cycle only the cycle collector would free.
        self.transport: asyncio.Transport | None = transport
        self.handler: Any = request.protocol
        self.queue: Any = ws._reader  # aiohttp's WebSocketDataQueue (what ws.receive() reads)
        self._parser = FrameParser(max_message)
        self._message = bytearray()  # during the handshake: the message being assembled
        self._stage = HANDSHAKE
        self._failed = False
        self._backend_paused = False
        self._buf: memoryview | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.relay: Relay | None = None
        self.heard = time.monotonic()  # the last read from the browser (the heartbeat's clock)
        self.ping_sent = 0.0
        self.writing_paused = bool(self.handler.writing_paused)
        transport.set_protocol(self)

    def start_relay(self, relay: Relay, ws: web.WebSocketResponse) -> tuple[list[WSMessage], bytes]:
        """Take the connection from aiohttp for ``relay``.

        Returns what the browser sent that aiohttp's queue holds (in order) and the start of a
        message not yet queued; both go to the VNC server before anything read later.

        aiohttp's handler task then ends as soon as the request handler returns, and with it the
        request, the response, the queue and the handler (~10 KiB a console): the response is
        marked closed (its heartbeat stops, and aiohttp's finish sends no close frame), the
        handler no longer holds the transport (its end does not close it) and the server no
        longer counts it among its connections. Private aiohttp 3.x attributes: tests/
        test_relay_memory.py fails if one changes and the objects are kept again.
        """
        queued = [msg for msg, _size in self.queue._buffer]
        partial = bytes(self._message)
        ws_: Any = ws
        ws_._closed = True  # aiohttp's close() and write_eof() now send nothing
        ws_._cancel_heartbeat()  # the sweeper's heartbeat takes over (see heartbeat)
        h = self.handler
        paused_by_queue = bool(h._reading_paused)
        h.transport = None
        # A heartbeat callback (aiohttp's heartbeat is off, so none is set) would be a method of the
        # response: a cycle (handler -> response -> request -> handler) only the cyclic GC frees.
        h._data_received_cb = None
        if h._keepalive_handle is not None:
            h._keepalive_handle.cancel()
            h._keepalive_handle = None
        if h._manager is not None:
            h._manager.connection_lost(h, None)  # forgotten once the handler task is done
        self.handler = self.queue = None
        self._message = bytearray()
        self.relay = relay
        self._stage = RELAYING
        if paused_by_queue and not self._backend_paused:
            self._resume()  # aiohttp's full queue had paused reading; it is empty now
        return queued, partial

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
        """Ping a browser silent for ``interval`` s; cut one that sends nothing within
        ``interval / 2`` s of a ping (aiohttp's heartbeat rule). One sweeper calls this for every
        console, in the RFB handshake and in the relay: no timer each. During the handshake
        aiohttp writes whole frames in one callback, so a ping never lands inside one."""
        t = self.transport
        if self._stage == CLOSING or t is None:
            return
        sent = self.ping_sent
        if sent > self.heard:  # our ping is unanswered: nothing read since it went out
            if now - sent >= interval / 2:
                t.abort()  # connection_lost ends the relay
        elif now - self.heard >= interval:
            self.ping_sent = now
            t.write(_PING)

    def send_text(self, text: bytes) -> None:
        """One text message to the browser (a resume ticket) between the relay's whole frames,
        as the heartbeat's pings are; nothing once closing."""
        t = self.transport
        if self._stage == CLOSING or t is None or t.is_closing():
            return
        t.write(frame(0x1, text))

    def close(self, code: int, reason: bytes, *, reply: bool = False) -> None:
        """Send our close frame (the relay has ended) and end the connection when the browser
        answers, at once when ``reply`` (the browser closed first) or its bytes can no longer be
        parsed, or after CLOSE_TIMEOUT."""
        if self._stage == CLOSING:
            return
        self._stage = CLOSING
        self.resume_for_backend()  # the browser's reply must be read
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(close_frame(code, reason))
        if reply or self._failed:
            t.close()
        else:
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, t.abort)

    # -- asyncio.BufferedProtocol ------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        # The thread's shared read buffer (see _read_buffer): the parser copies what it keeps,
        # so the buffer is free again when buffer_updated returns. No allocation per read.
        self._buf = buf = _read_buffer()[:CLIENT_READ_SIZE]
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        buf, self._buf = self._buf, None
        assert buf is not None
        self.data_received(buf[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self.heard = time.monotonic()
        if self._failed:
            return
        try:
            events = self._parser.feed(data)
        except FrameError as exc:
            self._failed = True
            if self._stage == HANDSHAKE:
                # ws.receive() (or ws.close() waiting for a reply) answers with this code.
                self.queue.set_exception(WebSocketError(exc.code, str(exc)))
            elif self._stage == RELAYING:
                assert self.relay is not None
                self.relay.stop(exc.code, str(exc))  # its close frame, then the connection ends
            elif self.transport is not None:
                self.transport.close()
            return
        stage = self._stage
        if stage == RELAYING:
            assert self.relay is not None
            self.relay.up(events)
        elif stage == HANDSHAKE:
            self._to_queue(events)
        elif self.transport is not None and any(type(ev) is Close for ev in events):
            self.transport.close()  # the browser's reply to our close frame

    def _to_queue(self, events: list[Event]) -> None:
        feed = self.queue.feed_data
        for ev in events:
            if type(ev) is bytearray:
                self._message += ev
            elif ev is END_OF_MESSAGE:
                data = bytes(self._message)
                self._message.clear()
                feed(WSMessage(WSMsgType.BINARY, data, None), len(data))
            elif isinstance(ev, Ping):
                feed(WSMessage(WSMsgType.PING, ev.payload, None), len(ev.payload))
            elif isinstance(ev, Close):
                # aiohttp's own parser reports a close without a status code as 0.
                feed(WSMessage(WSMsgType.CLOSE, ev.code or 0, ev.reason), 0)
            elif isinstance(ev, Pong):
                feed(WSMessage(WSMsgType.PONG, ev.payload, None), len(ev.payload))

    def eof_received(self) -> bool | None:
        if self._stage == RELAYING:
            self._stage = CLOSING  # nothing to send a close frame to; the transport closes
            assert self.relay is not None
            self.relay.end("client closed")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        stage, self._stage = self._stage, CLOSING
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if stage == HANDSHAKE:
            self.handler.connection_lost(exc)  # wakes the drain waiters, cancels the handler
            self.queue.feed_eof()  # wakes ws.receive(), as aiohttp's (dropped) WebSocketReader did
        # The connection is over: let go of everything that points back here, so this console
        # is freed by reference counting, not left for a full collection (module docstring).
        self.transport = None
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.browser_gone()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.handler is not None:
            self.handler.resume_writing()
        elif self.relay is not None:
            self.relay.browser_drained()


class Relay:
    """One console's relay, from ``start`` until either side closes or ``stop(code, reason)``.

    It outlives aiohttp's handler (see ``ClientReader.start_relay``): ``on_end(relay, result)``
    runs once when the console ends (both directions stop, the VNC socket closes and the close
    frame goes to the browser), ``on_closed(relay)`` when the browser's connection is gone too.
    """

    __slots__ = (
        "_backend",
        "_client_closed",
        "_on_closed",
        "_on_end",
        "_pending",
        "_vnc",
        "_why",
        "_writer",
        "client",
        "client_filter",
        "close_code",
        "close_reason",
        "ended",
        "reader",
        "recorder",
        "session",
        "vnc_fd",
        "ws",
        "ws_fd",
        "ws_transport",
    )

    def __init__(
        self,
        ws: ConsoleWebSocket,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        *,
        client_filter: Callable[[bytes], bytes] | None = None,
        client_leftover: bytes = b"",
        on_end: Callable[[Relay, str], None] | None = None,
        on_closed: Callable[[Relay], None] | None = None,
    ) -> None:
        self.ws: ConsoleWebSocket | None = ws
        self.reader: asyncio.StreamReader | None = reader
        self._vnc: Any = writer.transport
        # Kept only because a StreamWriter closes its transport when collected (3.11.5+).
        self._writer = writer
        self.session = session
        self.client_filter = client_filter
        # recording.Recorder of a recorded console (its ``down`` sees every VNC -> browser byte);
        # None costs the down path one check per read.
        self.recorder: Recorder | None = None
        assert ws.client is not None, "the WebSocket is prepared"
        if ws.client.transport is None:  # lost right after the handshake's last read
            raise ConnectionResetError("the browser closed its connection")
        self.client: ClientReader = ws.client
        self.ws_transport: asyncio.Transport = ws.client.transport
        self.ws_fd = socket_fd(self.ws_transport)
        self.vnc_fd = -1  # set when the VNC socket is attached
        self.close_code: int | None = None
        self.close_reason = ""
        self.ended = False
        self._why = ""
        self._client_closed = False
        self._pending = client_leftover  # what the browser sent behind its ClientInit
        self._backend: _Backend | None = None
        self._on_end = on_end
        self._on_closed = on_closed

    def start(self) -> None:
        """Relay from now on, in the two sockets' callbacks: no task waits on a console.

        First what the browser sent during the handshake that the VNC server has not had:
        bytes behind its ClientInit, messages aiohttp queued, a message begun.
        """
        ws, self.ws = self.ws, None
        assert ws is not None
        queued, partial = self.client.start_relay(self, ws)
        self._attach()
        if self._pending:
            pending, self._pending = self._pending, b""
            self.up([bytearray(pending)])
        for msg in queued:
            self._take(msg)
        if partial:
            self.up([bytearray(partial)])

    def stop(self, code: int, reason: str) -> None:
        """End the relay; the browser gets ``code`` and ``reason`` in its close frame."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.end("stopped")

    def end(self, why: str) -> None:
        """End the console (first reason wins): both directions stop, the VNC socket closes, the
        browser gets a close frame, then ``on_end``."""
        if self.ended:
            return
        self.ended = True
        self._why = why
        # _Backend keeps pointing here until the VNC socket's connection_lost; the relay lets go
        # of it now, so the two are no cycle (freed by reference counting, not a full collection).
        self._backend = None
        self._vnc.close()
        if self.close_code is not None:
            code, reason = self.close_code, close_reason(self.close_reason or why)
        elif why == "server closed":
            code, reason = 1000, b"the VNC server closed the connection"
        else:
            code, reason = 1000, b""
        self.client.close(code, reason, reply=self._client_closed)
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self, self.result)

    @property
    def result(self) -> str:
        """Why the console ended ('client closed', 'server closed', a stop's reason, ...)."""
        return self.close_reason or self._why

    def browser_gone(self) -> None:
        """The browser's connection is closed (after our close frame, or unannounced)."""
        self.end("client closed")
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed(self)

    def abort(self) -> None:
        """Cut the browser's connection now (shutdown: its close handshake took too long)."""
        self.ws_transport.abort()

    def inject(self, message: bytes) -> None:
        """Send the VNC server a message of our own (a recording's keyframe request), between
        the browser's messages (the caller checks the filter is at a message boundary)."""
        if not self.ended:
            write_buffers(self._vnc, self.vnc_fd, [message])

    def browser_drained(self) -> None:
        """The browser's transport is below its low-water mark again: read the VNC server."""
        if self._backend is not None:
            self._backend.browser_drained()

    def _take(self, msg: WSMessage) -> None:
        if msg.type is WSMsgType.BINARY:
            self.up([bytearray(msg.data)])
        elif msg.type is WSMsgType.PING:
            self.up([Ping(msg.data)])
        elif msg.type is WSMsgType.CLOSE:
            self.up([Close(msg.data or None, msg.extra or "")])

    def up(self, events: list[Event]) -> None:
        """Browser -> VNC server, in the browser transport's read callback.

        The pieces of one read (at most CLIENT_READ_SIZE bytes) go out in one write: one send
        instead of one per frame or part of one. The VNC transport's buffer stays bounded: over
        its high-water mark, reading the browser's socket pauses until it drains.
        """
        if self.ended:
            return
        flt = self.client_filter
        pieces: list[bytes | bytearray] = []
        n = 0  # bytes from the browser, counted before the view-only filter (as aiohttp's were)
        for ev in events:
            if type(ev) is bytearray:
                n += len(ev)
                if flt is not None:
                    try:
                        ev = flt(ev)  # type: ignore[arg-type,assignment]  # feed() only slices it
                    except RFBError as exc:
                        self.stop(1008, f"RFB error: {exc}")
                        return
                pieces.append(ev)
            elif isinstance(ev, Ping):
                self.ws_transport.write(frame(0xA, ev.payload))
            elif isinstance(ev, Close):
                self._write(pieces, n)
                self._client_closed = True  # our close frame is the reply
                self.end("client closed")
                return
        self._write(pieces, n)

    def _write(self, pieces: list[bytes | bytearray], n: int) -> None:
        if not n:
            return  # pings, pongs: not activity (our heartbeat's pongs would keep it alive)
        s = self.session
        s.bytes_up += n
        s.last_activity = time.monotonic()
        write_buffers(self._vnc, self.vnc_fd, pieces)

    def _attach(self) -> None:
        """Move the VNC socket from its StreamReader to ``_Backend`` (bytes it buffered go first)."""
        transport: Any = self._vnc
        backend = _Backend(self, transport)
        self._backend = backend
        # Bytes the StreamReader holds from the handshake's last read belong to the browser.
        reader, self.reader = self.reader, None  # with its StreamReaderProtocol: done with
        assert reader is not None
        buffered: bytearray = getattr(reader, "_buffer", bytearray())
        pending = bytes(buffered)
        buffered.clear()
        eof = reader.at_eof()
        transport.set_protocol(backend)
        # The StreamReader and its protocol (~1 KiB) are done; the StreamWriter, kept only for its
        # transport, was their last holder (and of a finished future).
        w: Any = self._writer
        for name in ("_protocol", "_reader", "_complete_fut"):
            if getattr(w, name, None) is not None:
                setattr(w, name, None)
        self.vnc_fd = socket_fd(transport)
        if hasattr(transport, "max_size"):  # selector transports read this many bytes per recv
            transport.max_size = READ_SIZE
        if hasattr(self.ws_transport, "max_size"):
            self.ws_transport.max_size = READ_SIZE
        if self.client.writing_paused:
            backend.browser_wait = True  # the handshake's last write is still draining
            with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                transport.pause_reading()
        if pending:
            backend.data_received(pending)
        if transport.is_closing() or eof:
            self.end("server closed")
            return
        with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
            if not backend.browser_wait:
                transport.resume_reading()  # the StreamReader may have paused it at its limit
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            backend.pause_writing()
