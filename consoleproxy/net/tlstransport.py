"""TLS over a plain asyncio TCP transport with ``ssl.SSLObject`` and ``ssl.MemoryBIO`` (public APIs).

Why it exists: asyncio's own TLS (``sslproto.SSLProtocol``, used by ``connect_accepted_socket(ssl=)``
and ``start_tls``) gives every connection a 256 KiB receive buffer of its own, zeroed and so
resident: ~300 KiB per idle TLS console, where the goal is 64 KiB at 10,000 consoles. Sharing
that buffer meant swapping a private attribute. Here the buffer is ours: ``_Wire`` is the TCP
transport's buffered protocol and reads into one buffer per event-loop thread, and copies what it
read into the connection's incoming BIO before ``buffer_updated`` returns. Nothing is decrypted
from the shared buffer and nothing refers to it afterwards, so its reuse by the next read, of any
connection, is safe by construction (tests/net/test_tlstransport.py streams many connections at once
and checks every stream byte for byte). Plaintext for a plain ``asyncio.Protocol`` is decrypted
into a second per-thread buffer and handed over as ``bytes``; an ``asyncio.BufferedProtocol`` gets
it decrypted straight into its own ``get_buffer``.

Writes are encrypted at once into the outgoing BIO and go to the TCP transport; this transport
buffers no plaintext (except while OpenSSL waits for the peer in the middle of a write), so its
write-buffer size, limits and ``pause_writing``/``resume_writing`` are the TCP transport's.

``close()`` sends close_notify and waits up to ``shutdown_timeout`` for the peer's (or its EOF),
then closes the TCP connection; an error aborts it and the error goes to ``connection_lost``.

Server and client side alike (``server_side=False`` with ``server_hostname``); a context's
``sni_callback`` is called with the ``SSLObject`` and may switch its ``context`` (certstore's
SNIContexts does), as with asyncio's TLS.

What it costs, measured with ``bench/tls_bench.py --idle 2000 --mib 1024`` (server process only;
2-core machine under other load, Python 3.11, OpenSSL 3, loopback; CPU seconds per GiB, 1 MiB
writes; noisy, ±20 % between runs):

=====================  ================  ========  ==========
server                 idle KiB/conn     up s/GiB  down s/GiB
=====================  ================  ========  ==========
tlstransport, asyncio  18.2              0.90      0.91
tlstransport, uvloop   18.7              0.82      0.82
asyncio's sslproto     281.4             1.03      1.17
uvloop's own TLS       23.8              0.82      1.02
=====================  ================  ========  ==========

So no CPU cost against either (the same OpenSSL calls; Python work is per 256 KiB read or per
write), and an idle connection is OpenSSL's state plus a few small objects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Iterable
from typing import Any, cast

from consoleproxy.net.threadbuffers import thread_buffer

__all__ = ["SHUTDOWN_TIMEOUT", "TLSTransport", "accept_tls", "start_tls"]

# Bytes asked of the TCP socket per read, and plaintext handed to a plain Protocol per call at most.
READ_SIZE = 256 * 1024
# How long close() waits for the peer's close_notify before the TCP connection is closed anyway.
SHUTDOWN_TIMEOUT = 10.0

_HANDSHAKE, _OPEN, _SHUTDOWN, _CLOSED = range(4)


class _Wire(asyncio.BufferedProtocol):
    """The TCP transport's protocol: ciphertext in (into the thread's buffer), then to the BIO."""

    __slots__ = ("tls",)

    def __init__(self, tls: TLSTransport) -> None:
        self.tls: TLSTransport | None = tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.tls is not None:
            self.tls.raw_connected(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return thread_buffer("wire", READ_SIZE)

    def buffer_updated(self, nbytes: int) -> None:
        tls = self.tls
        if tls is not None:
            # The copy into the BIO happens first, before any callback could read into the buffer.
            tls.incoming.write(thread_buffer("wire", READ_SIZE)[:nbytes])
            tls.ciphertext_received()

    def data_received(self, data: bytes) -> None:
        # Loops call it only for protocols that are not buffered. Defined because uvloop keeps a
        # transport's last ``data_received`` until a new protocol brings one: without it, after
        # ``start_tls`` the TCP transport would keep the protocol it replaced alive (VeNCrypt's
        # handshake protocol, for the console's whole life).
        tls = self.tls
        if tls is not None:
            tls.incoming.write(data)
            tls.ciphertext_received()

    def eof_received(self) -> bool | None:
        if self.tls is not None:
            self.tls.raw_eof()
        return True  # the TLS layer decides when the TCP connection closes

    def connection_lost(self, exc: Exception | None) -> None:
        tls, self.tls = self.tls, None
        if tls is not None:
            tls.raw_lost(exc)

    def pause_writing(self) -> None:
        if self.tls is not None:
            self.tls.raw_pause_writing()

    def resume_writing(self) -> None:
        if self.tls is not None:
            self.tls.raw_resume_writing()


class TLSTransport(asyncio.Transport):
    """The application's transport: plaintext in and out, TLS on the TCP transport underneath.

    ``wire`` is the protocol to give the TCP transport (``accept_tls``/``start_tls`` do it);
    ``handshake`` resolves when the handshake is done (the application's ``connection_made`` has
    then been called) or fails with its error.

    Longer than 300 lines because it is the whole public ``asyncio.Transport`` API (writes, flow
    control both ways, close, abort, extra info) over one SSLObject, whose state every one of
    those methods reads; the handshake and shutdown are a few lines each.
    """

    __slots__ = (
        "_app", "_app_buffered", "_closing", "_error", "_pending", "_raw_eof", "_read_paused",
        "_read_scheduled", "_state", "_timer", "_writing_paused", "context", "handshake", "incoming", "loop",
        "outgoing", "raw", "shutdown_timeout", "sslobj", "wire",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        protocol: asyncio.BaseProtocol,
        *,
        server_side: bool = True,
        server_hostname: str | None = None,
        handshake_timeout: float | None = None,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.context = context
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.raw: asyncio.Transport | None = None
        self.wire: _Wire | None = _Wire(self)
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self.shutdown_timeout = shutdown_timeout
        self._app: asyncio.BaseProtocol | None = None
        self._app_buffered = False
        self.set_protocol(protocol)
        self._state = _HANDSHAKE
        self._closing = False
        self._error: BaseException | None = None
        self._pending: collections.deque[bytes] | None = None  # plaintext OpenSSL could not take yet
        self._raw_eof = False
        self._read_paused = False
        self._read_scheduled = False
        self._writing_paused = False
        self._timer: asyncio.TimerHandle | None = None
        if handshake_timeout is not None:
            self._timer = self.loop.call_later(handshake_timeout, self._handshake_timed_out)

    # -- the TCP side (called by _Wire) -----------------------------------------------------

    def raw_connected(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's
        self._do_handshake()

    def ciphertext_received(self) -> None:
        if self._state == _HANDSHAKE:
            self._do_handshake()
        elif self._state == _OPEN:
            self._retry_pending()
            if not self._read_paused:
                self._do_read()
        elif self._state == _SHUTDOWN:
            self._do_shutdown()

    def raw_eof(self) -> None:
        # Not written to the incoming BIO: a TCP EOF without close_notify (most browsers) is an
        # EOF for the application, as with asyncio's TLS, not an error.
        self._raw_eof = True
        if self._state == _HANDSHAKE:
            self._fail(ConnectionResetError("connection closed during the TLS handshake"))
        elif self._state == _OPEN and not self._read_paused:
            self._do_read()  # what was decrypted before the EOF, then the application's EOF
            if self._state == _OPEN and not self._read_paused:
                self._eof(raw=True)
        elif self._state == _SHUTDOWN:
            self._close_raw()

    def raw_lost(self, exc: Exception | None) -> None:
        state, self._state = self._state, _CLOSED
        self._cancel_timer()
        err = self._error or exc
        if state == _HANDSHAKE and not self.handshake.done():
            self.handshake.set_exception(err or ConnectionResetError("connection lost in the TLS handshake"))
        app, self._app = self._app, None
        # No link left between the objects of an ended connection: freed by reference counting.
        self.wire = None
        self.raw = None
        self.sslobj = None
        self._pending = None
        if app is not None and state != _HANDSHAKE:
            app.connection_lost(err if isinstance(err, Exception) else None)

    def raw_pause_writing(self) -> None:
        self._writing_paused = True
        if self._state == _OPEN and self._app is not None:
            self._app.pause_writing()

    def raw_resume_writing(self) -> None:
        self._writing_paused = False
        if self._state == _OPEN and self._app is not None:
            self._app.resume_writing()

    # -- TLS --------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.outgoing.pending and self.raw is not None and not self.raw.is_closing():
            self.raw.write(self.outgoing.read())

    def _do_handshake(self) -> None:
        assert self.sslobj is not None
        try:
            self.sslobj.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self._flush()
            return
        except Exception as exc:
            self._flush()  # the alert, if OpenSSL made one
            self._fail(exc)
            return
        self._flush()
        self._cancel_timer()
        self._state = _OPEN
        assert self._app is not None
        paused = self._writing_paused  # by the handshake's own writes: the app has not heard
        self._app.connection_made(self)
        if not self.handshake.done():
            self.handshake.set_result(None)
        if paused and self._writing_paused and self._app is not None:
            self._app.pause_writing()
        if self.incoming.pending and self._state == _OPEN and not self._read_paused:
            self._do_read()  # the peer's first bytes came with its last handshake message

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            self._fail(ConnectionAbortedError("TLS handshake timed out"))

    def _fail(self, exc: BaseException) -> None:
        """End the connection at once (no close_notify); ``exc`` goes to connection_lost."""
        if self._error is None:
            self._error = exc
        if self._state == _HANDSHAKE and not self.handshake.done():
            self.handshake.set_exception(exc)
        if self.raw is not None:
            self.raw.abort()
        else:
            self.raw_lost(None)

    def _do_read(self) -> None:
        """Decrypt what the incoming BIO holds and hand it to the application."""
        sslobj = self.sslobj
        while self._state == _OPEN and not self._read_paused and sslobj is not None:
            buffered = self._app_buffered
            app = self._app
            if buffered:
                buf = app.get_buffer(-1)  # type: ignore[union-attr]
                buf = buf if isinstance(buf, memoryview) else memoryview(buf)
            else:
                buf = thread_buffer("plain", READ_SIZE)
            wants = len(buf)
            if not wants:
                raise RuntimeError("get_buffer() returned an empty buffer")
            got = 0
            closed = False
            try:
                while got < wants:
                    n = sslobj.read(wants - got, buf[got:])
                    assert isinstance(n, int)  # with a buffer, read() returns a count
                    if not n:
                        closed = True  # the peer's close_notify
                        break
                    got += n
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLZeroReturnError:
                closed = True
            except ssl.SSLError as exc:
                if got:
                    self._deliver(app, buffered, buf, got)
                self._flush()
                self._fail(exc)
                return
            if got:
                self._deliver(app, buffered, buf, got)
            self._flush()  # a TLS 1.3 key update or session ticket may want an answer
            if closed:
                self._eof(raw=False)
                return
            if got < wants:
                return  # all of it read

    def _deliver(self, app: Any, buffered: bool, buf: memoryview, n: int) -> None:
        if buffered:
            app.buffer_updated(n)
        else:
            app.data_received(bytes(buf[:n]))  # a copy: the thread's buffer is reused

    def _eof(self, raw: bool) -> None:
        """The peer is done sending (close_notify, or TCP EOF without one)."""
        eof_received = getattr(self._app, "eof_received", None)
        keep_open = bool(eof_received()) if eof_received is not None else False
        if not keep_open or not raw:
            # After close_notify nothing more can be read; answering it ends our side too.
            self.close()

    def _do_shutdown(self) -> None:
        sslobj = self.sslobj
        if sslobj is None:
            return
        try:
            sslobj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self._flush()
            if not self._raw_eof:
                return  # waiting for the peer's close_notify
        except ssl.SSLError:
            pass  # an error on the way out: the connection ends either way
        self._flush()
        self._close_raw()

    def _close_raw(self) -> None:
        self._cancel_timer()
        if self.raw is not None:
            self.raw.close()  # after what is buffered has gone

    def _shutdown_timed_out(self) -> None:
        self._timer = None
        if self.raw is not None:
            self.raw.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _retry_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending:
            self.writelines(pending)

    # -- asyncio.Transport ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._encrypt(data):
            self._flush()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """All pieces encrypted, then one write to the TCP transport (one send for a frame's
        header and payload)."""
        for data in list_of_data:
            if not self._encrypt(data):
                break
        self._flush()

    def _encrypt(self, data: bytes | bytearray | memoryview) -> bool:
        """Into the outgoing BIO (a copy: ``data`` may be reused once this returns)."""
        if self._state != _OPEN:
            return False  # closing or closed: dropped, as asyncio's transports do
        if not data:
            return True
        if self._pending is not None:
            self._pending.append(bytes(data))
            return True
        assert self.sslobj is not None
        try:
            self.sslobj.write(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            # OpenSSL waits for the peer (a renegotiation; our server contexts refuse them):
            # kept until ciphertext arrives.
            self._pending = collections.deque([bytes(data)])
        except ssl.SSLError as exc:
            self._fail(exc)
            return False
        return True

    def can_write_eof(self) -> bool:
        return False  # close_notify ends both directions for most peers; close() sends it

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot half-close; use close()")

    def get_write_buffer_size(self) -> int:
        pending = sum(len(b) for b in self._pending) if self._pending else 0
        return pending + (self.raw.get_write_buffer_size() if self.raw is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.raw.get_write_buffer_limits() if self.raw is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.raw is not None:
            self.raw.set_write_buffer_limits(high, low)

    def close(self) -> None:
        """Send close_notify; the TCP connection closes on the peer's reply or after shutdown_timeout."""
        if self._closing or self._state == _CLOSED:
            return
        self._closing = True
        if self._state == _HANDSHAKE:
            self._fail(ConnectionAbortedError("closed during the TLS handshake"))
            return
        self._state = _SHUTDOWN
        self._pending = None
        if self.raw is not None and not self.raw.is_reading():
            with contextlib.suppress(RuntimeError):
                self.raw.resume_reading()  # the peer's close_notify must be read
        self._timer = self.loop.call_later(self.shutdown_timeout, self._shutdown_timed_out)
        self._do_shutdown()

    def abort(self) -> None:
        self._closing = True
        if self.raw is not None:
            self.raw.abort()
        elif self._state != _CLOSED:
            self.raw_lost(None)

    def is_closing(self) -> bool:
        return self._closing or self._state in (_SHUTDOWN, _CLOSED)

    def pause_reading(self) -> None:
        self._read_paused = True
        if self.raw is not None and self._state == _OPEN:
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        if self.raw is not None and self._state == _OPEN:
            self.raw.resume_reading()
        if not self._read_scheduled:
            # Not from inside the caller's callback: bytes decrypted now would re-enter it.
            self._read_scheduled = True
            self.loop.call_soon(self._scheduled_read)

    def _scheduled_read(self) -> None:
        self._read_scheduled = False
        if self._state == _OPEN and not self._read_paused:
            self._do_read()
            if self._state == _OPEN and not self._read_paused and self._raw_eof:
                self._eof(raw=True)

    def is_reading(self) -> bool:
        return self._state == _OPEN and not self._read_paused

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol
        self._app_buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        # None once the connection has ended, as with asyncio's own transports.
        return cast(asyncio.BaseProtocol, self._app)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``ssl_object``, ``peercert``, ``cipher``, ``compression``, ``sslcontext``, then the TCP
        transport's (``peername``, ``sockname``, ``socket``: writing to that socket bypasses TLS)."""
        sslobj = self.sslobj
        if name == "ssl_object":
            return sslobj if sslobj is not None else default
        if name in ("peercert", "cipher", "compression", "sslcontext"):
            if sslobj is None or self._state == _HANDSHAKE:
                return default
            if name == "sslcontext":
                return sslobj.context  # the one the SNI callback chose
            value = sslobj.getpeercert() if name == "peercert" else getattr(sslobj, name)()
            return default if value is None else value
        return self.raw.get_extra_info(name, default) if self.raw is not None else default


async def accept_tls(
    sock: Any,
    context: ssl.SSLContext,
    protocol: asyncio.BaseProtocol,
    *,
    handshake_timeout: float | None = None,
) -> TLSTransport:
    """Server side of TLS on an accepted socket; returns once the handshake is done.

    On a failed handshake the connection is aborted and the error (``ssl.SSLError``,
    ``ConnectionError``) raised. Cancelling the wait aborts it too.
    """
    tls = TLSTransport(context, protocol, server_side=True, handshake_timeout=handshake_timeout)
    wire = tls.wire
    assert wire is not None
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: wire, sock)
        await tls.handshake
    except BaseException:
        if tls.raw is None:
            sock.close()
        tls.abort()
        raise
    return tls


async def start_tls(
    transport: asyncio.BaseTransport,
    context: ssl.SSLContext,
    protocol: asyncio.BaseProtocol,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    handshake_timeout: float | None = None,
    already_read: bytes = b"",
) -> TLSTransport:
    """TLS on a connected transport from now on (STARTTLS, VeNCrypt): its protocol is replaced.

    ``already_read``: the peer's first TLS bytes when the old protocol read them with its last
    plaintext (``loop.start_tls`` has no way to take them).
    """
    tls = TLSTransport(
        context, protocol, server_side=server_side, server_hostname=server_hostname,
        handshake_timeout=handshake_timeout,
    )
    wire = tls.wire
    assert wire is not None
    if already_read:
        tls.incoming.write(already_read)
    transport.set_protocol(wire)
    wire.connection_made(transport)
    try:
        await tls.handshake
    except BaseException:
        tls.abort()
        raise
    return tls
