"""The byte relay between a browser's WebSocket and the VNC server's TCP connection.

After the RFB security handshake every byte passes unchanged, in both directions at once.

Down (VNC -> browser) runs in the event loop's read callback, with no task and no stream buffer:
the VNC socket's transport gets a small buffered protocol (``_Backend``) that reads up to
``READ_SIZE`` bytes into a buffer shared by all consoles of the thread and writes them, in the same
callback, as one binary WebSocket frame (a 2-10 byte header, then a view of the buffer) to the
browser's transport. No allocation and no copy in Python per read.

Up (browser -> VNC) runs in the console's own handler task: aiohttp parses, unmasks and caps the
client's messages (1009 past ``max_client_message_bytes``); each is written to the VNC transport.

Backpressure, both ways, without polling:
- down: when the browser's transport is over its high-water mark (aiohttp's protocol is paused)
  we pause reading the VNC socket and resume when aiohttp's drain waiter fires; the hypervisor's
  TCP window then shrinks. Memory per console stays bounded by one read plus the transport's
  high-water mark.
- up: after a write that leaves the VNC transport over its high-water mark we wait for
  ``resume_writing`` before reading the next WebSocket message (aiohttp then stops reading the
  browser's socket once its own queue is full).

Per session: this object, the protocol, and one task (aiohttp's handler), plus a short-lived
task only while the down direction waits for the browser to drain.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from .sessions import Session

__all__ = ["READ_SIZE", "STREAM_LIMIT", "Relay", "frame_header"]

# Bytes asked of a socket per read. Large reads mean few WebSocket frames and little Python work
# per byte; a full-screen update is often several hundred KiB. Only a plain (selector) transport
# takes a per-transport size; the buffer is freed as soon as the frame is written.
READ_SIZE = 1024 * 1024
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


# asyncio's SSLProtocol (3.11+) gives every TLS connection its own 256 KiB receive buffer, zeroed
# and so resident: 300 KiB per idle TLS console. Its buffer_updated() copies the bytes into the
# SSL object's BIO before returning, so one buffer per event loop thread can serve every relayed
# connection. Swapped in only for asyncio's own SSLProtocol (uvloop's keeps its own buffers).
_shared_ssl_buffers: dict[tuple[int, int], tuple[bytearray, memoryview]] = {}


def _share_ssl_buffer(transport: object) -> None:
    proto = getattr(transport, "_ssl_protocol", None)
    if not isinstance(proto, asyncio.sslproto.SSLProtocol):
        return
    own = getattr(proto, "_ssl_buffer", None)
    if not isinstance(own, bytearray):
        return
    key = (threading.get_ident(), len(own))
    shared = _shared_ssl_buffers.get(key)
    if shared is None:
        buf = bytearray(len(own))
        shared = _shared_ssl_buffers[key] = (buf, memoryview(buf))
    proto._ssl_buffer, proto._ssl_buffer_view = shared  # type: ignore[attr-defined]


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


class _Backend(asyncio.BufferedProtocol):
    """The VNC socket's protocol during the relay: bytes in -> one WebSocket frame out."""

    __slots__ = ("_buf", "_drain_task", "_lost", "_relay", "_write_waiter", "transport")

    def __init__(self, relay: Relay, transport: asyncio.Transport) -> None:
        self._relay = relay
        self.transport = transport
        self._write_waiter: asyncio.Future[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._lost = False
        self._buf: memoryview | None = None

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
        out = r.ws_transport
        if out.is_closing():
            r.end("client closed")
            return
        if n <= SMALL_FRAME:
            # Keystrokes' echoes, cursor moves: one write, one TCP segment, one wake-up in the
            # browser (a separate header would reach it first, alone). Copying a few KiB is cheap.
            out.write(frame_header(n) + data)
        elif r.ws_tls:
            # One pass through the TLS layer: one socket write for header and payload.
            out.writelines((frame_header(n), data))
        else:
            # Two writes; joining them would copy the payload (writelines joins before 3.12).
            out.write(frame_header(n))
            out.write(data)
        if r.ws_protocol.writing_paused and self._drain_task is None:
            # The browser is slower than the VNC server: stop reading until it catches up.
            self.transport.pause_reading()
            self._drain_task = asyncio.ensure_future(self._wait_browser())

    async def _wait_browser(self) -> None:
        try:
            await self._relay.ws_protocol._drain_helper()
        except (ConnectionError, RuntimeError):
            self._relay.end("client closed")
            return
        finally:
            self._drain_task = None
        if not self._relay.ended and not self._lost:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._relay.end("server closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake_writer(exc)
        self._relay.end("server closed" if exc is None else f"error: {exc.__class__.__name__}: {exc}")

    # Up direction flow control (the transport calls these around its high-water mark).
    def pause_writing(self) -> None:
        if self._write_waiter is None:
            self._write_waiter = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer(None)

    def _wake_writer(self, exc: Exception | None) -> None:
        w, self._write_waiter = self._write_waiter, None
        if w is not None and not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(ConnectionError(str(exc)))

    async def writable(self) -> None:
        if self._write_waiter is not None:
            await self._write_waiter
        if self._lost:
            raise ConnectionError("VNC server connection lost")

    def stop(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
        if not self._lost:
            with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                self.transport.pause_reading()


class Relay:
    """Runs both directions until one side closes or ``stop(code, reason)`` is called."""

    __slots__ = (
        "_backend",
        "_task",
        "_why",
        "client_filter",
        "close_code",
        "close_reason",
        "ended",
        "reader",
        "session",
        "writer",
        "ws",
        "ws_protocol",
        "ws_tls",
        "ws_transport",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        *,
        request: web.BaseRequest,
        client_filter: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.ws = ws
        self.reader = reader
        self.writer = writer
        self.session = session
        self.client_filter = client_filter
        transport = request.transport
        assert transport is not None, "the WebSocket is prepared"
        self.ws_transport: asyncio.Transport = transport
        self.ws_protocol: Any = request.protocol
        self.ws_tls = transport.get_extra_info("sslcontext") is not None
        self.close_code: int | None = None
        self.close_reason = ""
        self.ended = False
        self._why = ""
        self._task: asyncio.Task[Any] | None = None
        self._backend: _Backend | None = None

    def stop(self, code: int, reason: str) -> None:
        """Ask the relay to end; the caller's ``run`` returns and the server sends ``code``."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.end("stopped")

    def end(self, why: str) -> None:
        """End the relay (first reason wins): stop the down side, interrupt the up side."""
        if self.ended:
            return
        self.ended = True
        self._why = why
        if self._backend is not None:
            self._backend.stop()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def run(self) -> str:
        """Relay until the end; returns why it ended ('client closed', 'server closed', ...)."""
        self._task = asyncio.current_task()
        if not self.ended:
            self._attach()
        try:
            if not self.ended:
                self._why = await self._up()
                self.end(self._why)
        except asyncio.CancelledError:
            task = self._task
            # Our own interruption: swallow it. Anyone else's cancel goes on up.
            if task is None or not self.ended or task.uncancel() > 0:
                raise
        finally:
            self._task = None
            self.ended = True  # also when the client filter raised: nothing more goes down
            if self._backend is not None:
                self._backend.stop()
        return self.close_reason or self._why

    def _attach(self) -> None:
        """Move the VNC socket from its StreamReader to ``_Backend`` (bytes it buffered go first)."""
        transport: Any = self.writer.transport
        backend = _Backend(self, transport)
        self._backend = backend
        # Bytes the StreamReader holds from the handshake's last read belong to the browser.
        buffered: bytearray = getattr(self.reader, "_buffer", bytearray())
        pending = bytes(buffered)
        buffered.clear()
        eof = self.reader.at_eof()
        transport.set_protocol(backend)
        if hasattr(transport, "max_size"):  # selector transports read this many bytes per recv
            transport.max_size = READ_SIZE
        if hasattr(self.ws_transport, "max_size"):
            self.ws_transport.max_size = READ_SIZE
        _share_ssl_buffer(self.ws_transport)
        _share_ssl_buffer(transport)
        if pending:
            backend.data_received(pending)
        if transport.is_closing() or eof:
            self.end("server closed")
            return
        with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
            if not backend._drain_task:
                transport.resume_reading()  # the StreamReader may have paused it at its limit
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            backend.pause_writing()

    async def _up(self) -> str:
        ws, s, flt = self.ws, self.session, self.client_filter
        backend = self._backend
        assert backend is not None
        out = backend.transport
        receive = ws.receive
        binary = WSMsgType.BINARY
        while True:
            msg = await receive()
            if msg.type is binary:
                data: bytes = msg.data
            elif msg.type is WSMsgType.TEXT:
                # RFB is binary; a text frame means a client we do not understand.
                self.stop(1003, "text frames are not accepted")
                return "client sent text"
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return "client closed"
            elif msg.type is WSMsgType.ERROR:
                return f"client error: {ws.exception()}"
            else:
                continue
            s.bytes_up += len(data)
            s.last_activity = time.monotonic()
            if flt is not None:
                data = flt(data)
                if not data:
                    continue
            if self.ended:
                return self._why
            out.write(data)
            if backend._write_waiter is not None or backend._lost:
                await backend.writable()
