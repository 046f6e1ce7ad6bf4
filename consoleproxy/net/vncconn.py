"""The connection to a hypervisor's VNC server, from the connect to the relay, on public asyncio APIs.

``VNCConnection`` is the socket's buffered protocol while the proxy runs the RFB handshake with the
VNC server (``rfb_server.ServerHandshake``, RFC 6143 sections 7.1-7.3): awaitable reads, writes with flow
control, and VeNCrypt's TLS through our own ``tlstransport.start_tls`` (on both loops). When the
relay starts, ``detach()`` hands it the transport (a ``TLSTransport`` after VeNCrypt) and every
byte already read past the handshake: nothing lost, nothing read twice.

* ``connect``: ``loop.create_connection`` under the connect time limit, TCP_NODELAY; failures are
  ``BackendUnreachable`` with the text the browser's close reason shows.
* ``authenticate``: drives ``rfb_server.ServerHandshake`` to its outcome. An untrusted VNC certificate is
  ``BackendAuthFailed`` (with OpenSSL's verify message), other TLS failures and an EOF are
  ``BackendUnreachable``, a refusal is ``BackendAuthFailed``.
* ``read_server_init``: ServerInit (7.3.2), its desktop name bounded before it is read.
* ``drive``: the loop both ``authenticate`` and ``diagnose``'s probe use (raw errors).

Buffers: reads land in one buffer per event-loop thread (``READ_SIZE``), copied into the
connection's own ``pending`` before ``buffer_updated`` returns, so the shared one is free again;
``pending`` is bounded by ``PENDING_LIMIT``: over it, reading pauses until the handshake takes the
bytes (the server's TCP window then shrinks), as StreamReader's limit did. After VeNCrypt the
same: ``TLSTransport`` decrypts into that buffer and its pausing reaches the TCP transport.

VeNCrypt's TLS is ``tlstransport`` (``ssl.SSLObject`` + ``ssl.MemoryBIO``, one read buffer per
thread), not ``loop.start_tls``: on asyncio's loop that one's SSLProtocol zeroes a 256 KiB receive
buffer per connection. Measured with bench/vnc_start_tls_memory.py (N=500, RSS per connection
after ``start_tls``, CPython 3.11, uvloop 0.23): ``loop.start_tls`` 287 KiB on asyncio's loop and
40 KiB on uvloop; ``tlstransport`` 27 KiB on either.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import cast

from consoleproxy.errors import BackendAuthFailed, BackendUnreachable
from consoleproxy.net import tlstransport
from consoleproxy.net.threadbuffers import thread_buffer
from consoleproxy.protocol import rfb, rfb_messages, rfb_server

__all__ = [
    "PENDING_LIMIT",
    "READ_SIZE",
    "TLS_HANDSHAKE_TIMEOUT",
    "Handover",
    "VNCConnection",
    "authenticate",
    "connect",
    "drive",
    "open_connection",
    "read_server_init",
]

READ_SIZE = 64 * 1024
"""Bytes asked of the socket per read during the handshake (one buffer per event-loop thread)."""

PENDING_LIMIT = 256 * 1024
"""Bytes read but not yet taken by the handshake before reading pauses: the most a handshaking
console buffers (a server may pipeline a framebuffer update right behind its ServerInit)."""

TLS_HANDSHAKE_TIMEOUT = 60.0
"""Seconds VeNCrypt's TLS handshake may take (``loop.start_tls``'s default, kept): a backstop for
callers without a time limit of their own (a console's is ``[limits] handshake_timeout_seconds``)."""

@dataclass(frozen=True)
class Handover:
    """What the relay takes over (``VNCConnection.detach``); reading is paused until it resumes it.

    ``pending``: bytes the server sent past the handshake, already read, in order, before anything
    the transport reads later. ``eof``: the server has closed its side after them.
    ``writing_paused``: the transport is over its high-water mark (it will call the new protocol's
    ``resume_writing``).
    """

    transport: asyncio.Transport
    pending: bytes
    eof: bool
    writing_paused: bool


class VNCConnection(asyncio.BufferedProtocol):
    """The VNC socket's protocol until ``detach()``; see the module docstring.

    Errors: after the connection is lost with an exception, reads and ``drain`` raise it (a reset
    is a ``ConnectionResetError``); an EOF makes ``read`` return b"" once ``pending`` is empty.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._pending = bytearray()
        self._eof = False
        self._exc: BaseException | None = None
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False
        self._detached = False
        self._readable: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._view: memoryview | None = None

    # -- asyncio.BufferedProtocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses: no isinstance check).
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        self._view = view = thread_buffer("vnc", READ_SIZE)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view, self._view = self._view, None
        assert view is not None
        self.data_received(view[:nbytes])  # copied: the thread's buffer is free when this returns

    def data_received(self, data: bytes | memoryview) -> None:
        self._pending += data
        if len(self._pending) >= PENDING_LIMIT and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake_reader()
        return None  # the transport closes; what was read stays readable

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        if exc is not None:
            self._exc = exc
        self._wake_reader()
        fut, self._drained = self._drained, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        fut, self._drained = self._drained, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _wake_reader(self) -> None:
        fut, self._readable = self._readable, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- the handshake's I/O ---------------------------------------------------------------------

    async def _wait_readable(self) -> None:
        while not self._pending and not self._eof:
            self._resume()
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable

    def _resume(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _take(self, n: int) -> bytes:
        out = bytes(self._pending[:n])
        del self._pending[:n]
        if len(self._pending) < PENDING_LIMIT:
            self._resume()
        return out

    async def read(self) -> bytes:
        """Whatever has arrived (waiting for something); b"" at EOF."""
        self._check_attached()
        await self._wait_readable()
        if not self._pending and self._exc is not None:
            raise self._exc
        return self._take(len(self._pending))

    async def read_exactly(self, n: int) -> bytes | None:
        """``n`` bytes, or None when the connection ends first (what arrived stays pending)."""
        self._check_attached()
        while len(self._pending) < n:
            if self._eof:
                if self._exc is not None:
                    raise self._exc
                return None
            self._resume()  # the bound is the caller's n, not PENDING_LIMIT
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable
        return self._take(n)

    def unread(self, data: bytes) -> None:
        """Put back bytes a reader took but did not use; they are read first."""
        self._pending[:0] = data

    def write(self, data: bytes) -> None:
        self._check_attached()
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport is below its high-water mark again.

        A connection lost with an error raises it; a closed one does not (the next read says so,
        and bytes the server sent before closing are still read).
        """
        while self._writing_paused and not self._lost:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self._exc is not None:
            raise self._exc

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Wrap the connection in TLS (VeNCrypt) with ``tlstransport.start_tls``.

        Raises ``ssl.SSLError`` (``SSLCertVerificationError`` for an untrusted certificate) or
        ``ConnectionError`` (the server closed or reset the connection, or the handshake took
        longer than ``TLS_HANDSHAKE_TIMEOUT``), as ``loop.start_tls`` did. Once it returns,
        ``transport`` is the ``TLSTransport`` and this protocol reads through it.
        """
        self._check_attached()
        assert self.transport is not None
        await self.drain()
        if self._pending:
            raise rfb.RFBError("VNC server sent data after its VeNCrypt ack, before the TLS handshake")
        # No SNI: hypervisor certificates name hosts, tokens carry addresses (check_hostname is off).
        self.transport = await tlstransport.start_tls(
            self.transport, context, self, server_side=False, server_hostname=None,
            handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )

    def peer_certificate(self) -> bytes | None:
        """The DER certificate of the TLS peer (after ``start_tls``), if it sent one."""
        obj = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        return obj.getpeercert(binary_form=True) if obj is not None else None

    def detach(self) -> Handover:
        """Hand the transport and the pending bytes to the relay; reading pauses until it resumes.

        Call it in the same callback as the relay attaches (no await in between): the transport
        still calls this protocol until its ``set_protocol``. From here the transport is the
        caller's to close, and this object keeps nothing that points back at the transport
        (nothing should keep this object either: tests/net/test_vncconn.py checks it is freed).
        """
        self._check_attached()
        t = self.transport
        assert t is not None
        self._detached = True
        self.transport = None
        self._readable = self._drained = None
        if not self._reading_paused and not t.is_closing():
            with contextlib.suppress(RuntimeError, NotImplementedError):
                t.pause_reading()
        pending = bytes(self._pending)
        self._pending = bytearray()
        return Handover(t, pending, eof=self._eof, writing_paused=self._writing_paused)

    def close(self) -> None:
        """Close the connection (after ``detach`` the transport is the relay's: nothing to do)."""
        if self.transport is not None:
            self.transport.close()

    def _check_attached(self) -> None:
        if self._detached:
            raise RuntimeError("the VNC connection was handed to the relay")


async def open_connection(host: str, port: int) -> VNCConnection:
    """Connect (OSError as the loop raises it); TCP_NODELAY: RFB's small messages go at once."""
    loop = asyncio.get_running_loop()
    transport, conn = await loop.create_connection(VNCConnection, host, port)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


async def connect(host: str, port: int, limit_seconds: float) -> VNCConnection:
    """``open_connection`` within ``limit_seconds``; failures are ``BackendUnreachable``."""
    try:
        async with asyncio.timeout(limit_seconds):
            return await open_connection(host, port)
    except TimeoutError:
        raise BackendUnreachable(f"connecting to {host}:{port} timed out after {limit_seconds:g} s") from None
    except OSError as exc:
        raise BackendUnreachable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None


async def drive(
    conn: VNCConnection, handshake: rfb_server.ServerHandshake, tls: ssl.SSLContext
) -> rfb.Authenticated | rfb.AuthFailed | rfb.Probed | None:
    """Feed ``handshake`` the server's bytes and send its answers, TLS included, to its outcome.

    None when the server closes the connection first. Bytes past the handshake stay pending in
    ``conn``. TLS errors are raised as ``VNCConnection.start_tls`` raises them.
    """
    while True:
        data = await conn.read()
        if not data:
            return None
        handshake.receive_data(data)
        if out := handshake.data_to_send():
            conn.write(out)
        for ev in handshake.events():
            if isinstance(ev, rfb.StartTLS):
                await conn.start_tls(tls)
                handshake.tls_started()
                if out := handshake.data_to_send():
                    conn.write(out)
                for after in handshake.events():  # a probe ends here
                    if isinstance(after, rfb.Probed):
                        return after
            elif isinstance(ev, rfb.Authenticated | rfb.AuthFailed | rfb.Probed):
                if leftover := handshake.leftover():
                    conn.unread(leftover)  # the start of ServerInit, and what follows it
                if isinstance(ev, rfb.Authenticated):
                    await conn.drain()
                return ev


async def authenticate(conn: VNCConnection, password: str | None, tls: ssl.SSLContext) -> None:
    """Authenticate to the VNC server (RFC 6143 7.1-7.2, VeNCrypt); errors as the console's close."""
    handshake = rfb_server.ServerHandshake(password, allow_tls=True)
    try:
        outcome = await drive(conn, handshake, tls)
    except ssl.SSLCertVerificationError as exc:
        why = exc.verify_message
        raise BackendAuthFailed(f"VNC server's TLS certificate is not trusted: {why}") from None
    except OSError as exc:
        if handshake.state is not rfb_server.ServerHandshakeState.TLS_HANDSHAKE:
            raise  # a reset outside TLS: as a StreamReader raised it
        raise BackendUnreachable(f"TLS handshake with the VNC server failed: {exc}") from None
    if outcome is None:
        raise BackendUnreachable("the VNC server closed the connection during the handshake")
    if isinstance(outcome, rfb.AuthFailed):
        raise BackendAuthFailed(f"VNC server: {outcome.reason}")


async def read_server_init(conn: VNCConnection) -> bytes:
    """The server's ServerInit (RFC 6143 7.3.2), its desktop name checked before it is read."""
    fixed = await conn.read_exactly(rfb_messages.SERVER_INIT_FIXED)
    name = None
    if fixed is not None:
        name = await conn.read_exactly(rfb_messages.server_init_name_length(fixed))
    if fixed is None or name is None:
        raise BackendUnreachable("the VNC server closed the connection before its ServerInit")
    return fixed + name
