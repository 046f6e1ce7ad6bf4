"""The byte relay between a browser's WebSocket and the VNC server's TCP connection.

After the RFB security handshake every byte passes unchanged, in both directions at once.

Down (VNC -> browser) runs in the event loop's read callback, with no task and no stream buffer:
the VNC socket's transport gets a small buffered protocol (``_Backend``) that reads up to
``READ_SIZE`` bytes into a buffer shared by all consoles of the thread and writes them, in the same
callback, as one binary WebSocket frame (a 2-10 byte header, then a view of the buffer) to the
browser: over plain TCP header and view go to the socket in one writev(2) (``write_buffers``).
No allocation and no copy in Python per read.

Up (browser -> VNC) also runs in a read callback: the browser's transport belongs to
``browser.BrowserConnection`` from the upgrade request on (aiohttp never sees a console), whose
sans-I/O ``wsframes.Connection`` unmasks and caps the client's frames (1009 past
``max_client_message_bytes``), answers pings and runs the close handshake. In the relay the
unmasked pieces of one read go to the VNC server in one writev(2), not joined, with no task
wake-up and no per-message object. What the browser sent during the RFB handshake that the
handshake did not read goes first (``BrowserConnection.start_relay``). The sweeper pings a silent
browser (``BrowserConnection.heartbeat``); at the end the relay sends the close frame and the
browser's connection waits for the reply.

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
(tests/net/test_relay_freed.py, with the collector off, for every way a console ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from consoleproxy.net.threadbuffers import let_go, thread_buffer
from consoleproxy.policy.sessions import Session
from consoleproxy.protocol.rfb import RFBError
from consoleproxy.protocol.wsframes import Close, Event, close_reason, frame_header

if TYPE_CHECKING:
    from consoleproxy.net.browser import BrowserConnection
    from consoleproxy.net.vncconn import Handover
    from consoleproxy.recordings.recording import Recorder

__all__ = [
    "CLIENT_READ_SIZE", "MAX_IOV", "READ_SIZE", "Relay", "read_buffer", "socket_fd",
    "write_buffers",
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


def read_buffer() -> memoryview:
    """The thread's relay read buffer (threadbuffers): reads and frame writes happen in one
    callback, so it is free again before the next read unless a transport kept unsent bytes."""
    return thread_buffer("relay", READ_SIZE)


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
        rec = self._relay.recorder
        # A recorded console that streams reads into its recording's buffer: nothing is copied.
        buf = rec.read_buffer() if rec is not None else None
        if buf is None:
            buf = thread_buffer("relay", READ_SIZE)
        self._buf = buf
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        buf, self._buf = self._buf, None
        assert buf is not None
        self._send(buf[:nbytes])
        r = self._relay
        if r.ws_keeps_views and r.ws_transport.get_write_buffer_size():
            # The browser's transport may hold a view of the shared buffer: leave it that one
            # (a recording's own buffer is the recorder's to keep or reuse).
            let_go("relay", buf)
        if (
            self._turns and nbytes == len(buf) and not self.browser_wait
            and not self._yielding and not r.ended
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


class Relay:
    """One console's relay, from ``start`` until either side closes or ``stop(code, reason)``.

    No task waits on it: ``on_end(relay, result)``
    runs once when the console ends (both directions stop, the VNC socket closes and the close
    frame goes to the browser), ``on_closed(relay)`` when the browser's connection is gone too.
    """

    __slots__ = (
        "_backend",
        "_on_closed",
        "_on_end",
        "_pending",
        "_vnc",
        "_vnc_eof",
        "_vnc_pending",
        "_vnc_writing_paused",
        "_why",
        "client",
        "client_filter",
        "close_code",
        "close_reason",
        "ended",
        "recorder",
        "session",
        "vnc_fd",
        "ws_fd",
        "ws_keeps_views",
        "ws_transport",
    )

    def __init__(
        self,
        ws: BrowserConnection,
        vnc: Handover,
        session: Session,
        *,
        client_filter: Callable[[bytes], bytes] | None = None,
        client_leftover: bytes = b"",
        on_end: Callable[[Relay, str], None] | None = None,
        on_closed: Callable[[Relay], None] | None = None,
    ) -> None:
        # The VNC connection from vncconn.VNCConnection.detach(): its reading is paused until
        # ``start`` attaches (in the same callback), its bytes read past the handshake go first.
        self._vnc: asyncio.Transport = vnc.transport
        self._vnc_pending = vnc.pending
        self._vnc_eof = vnc.eof
        self._vnc_writing_paused = vnc.writing_paused
        self.session = session
        self.client_filter = client_filter
        # recording.Recorder of a recorded console (its ``down`` sees every VNC -> browser byte);
        # None costs the down path one check per read.
        self.recorder: Recorder | None = None
        if ws.transport is None:  # lost right after the handshake's last read
            raise ConnectionResetError("the browser closed its connection")
        self.client: BrowserConnection = ws
        self.ws_transport: asyncio.Transport = ws.transport
        self.ws_fd = socket_fd(self.ws_transport)
        # A plain transport keeps what it could not send as given (a view of the shared read
        # buffer); the TLS one (tlstransport) encrypts every write at once, so it keeps none.
        self.ws_keeps_views = self.ws_transport.get_extra_info("ssl_object") is None
        self.vnc_fd = -1  # set when the VNC socket is attached
        self.close_code: int | None = None
        self.close_reason = ""
        self.ended = False
        self._why = ""
        self._pending = client_leftover  # what the browser sent behind its ClientInit
        self._backend: _Backend | None = None
        self._on_end = on_end
        self._on_closed = on_closed

    def start(self) -> None:
        """Relay from now on, in the two sockets' callbacks: no task waits on a console.

        First what the browser sent during the handshake that the VNC server has not had:
        bytes behind its ClientInit, then messages no ``receive()`` took and a message begun.
        """
        queued = self.client.start_relay(self)
        self._attach()
        if self._pending:
            pending, self._pending = self._pending, b""
            self.up([pending])
        for data in queued:
            self.up([data])

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
        self.client.close(code, reason)
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

    def browser_drained(self) -> None:
        """The browser's transport is below its low-water mark again: read the VNC server."""
        if self._backend is not None:
            self._backend.browser_drained()

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
            if type(ev) is bytes:
                n += len(ev)
                if flt is not None:
                    try:
                        ev = flt(ev)
                    except RFBError as exc:
                        self.stop(1008, f"RFB error: {exc}")
                        return
                pieces.append(ev)
            elif isinstance(ev, Close):
                self._write(pieces, n)
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
        """Give the VNC transport to ``_Backend``: the bytes the handshake read past ServerInit
        go to the browser first, then what the transport reads once it resumes.

        Public transport APIs only. No per-read size is set: both protocols are buffered, so a
        read's size is the buffer ``get_buffer`` returns (READ_SIZE), whatever the loop.
        """
        transport = self._vnc
        backend = _Backend(self, transport)
        self._backend = backend
        pending, self._vnc_pending = self._vnc_pending, b""
        eof = self._vnc_eof
        transport.set_protocol(backend)
        self.vnc_fd = socket_fd(transport)
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
                transport.resume_reading()  # detach() paused it
        if self._vnc_writing_paused:
            # The transport paused writing during the handshake and calls resume_writing on
            # its protocol, now ``_Backend``, when it drains.
            backend.pause_writing()
