"""The public listeners' accept layer: everything between ``accept()`` and aiohttp's HTTP parser.

A connection's *handshake* runs from accept to the end of its first HTTP request head: the PROXY
protocol header (when ``[listen] proxy_protocol`` is on), the TLS handshake, the request line and
headers. Until then the peer has proven nothing, so this is where one source could tie up the
proxy (websockify issue 404: half-open connections, slowloris). The limits here:

* ``max_concurrent_handshakes`` (all sources) and ``max_handshakes_per_ip``: over either cap a new
  connection is reset right after ``accept()``, before any TLS work; it costs one accept and one
  close. A finished handshake frees its slot, so established consoles never count.
* ``connections_per_ip_per_second`` / ``connection_burst``: a token bucket per source (IPv4
  address, IPv6 /64); over it, reset at accept. With the PROXY protocol the source is the one the
  header names, so a balancer's address is never rate-limited as a whole.
* ``request_head_timeout_seconds``: the whole handshake must finish in time, or it is closed.
* ``max_request_head_bytes``: a first request head larger than this gets 431 and a close; each
  line is also capped by aiohttp (``max_header_line_bytes``, 400).

PROXY protocol: HAProxy in ``mode tcp`` with ``send-proxy-v2`` writes the header and then the
browser's ClientHello, often in one segment. The header is read from the raw socket with
``MSG_PEEK`` so that not one byte past it is consumed; the socket then becomes an asyncio
transport, with TLS by ``tlstransport.TLSTransport`` (our own TLS on public APIs, one read buffer
per thread; the SNI callback of the shared context picks the certificate, so a certificate hot
swap applies to new handshakes; a failed TLS handshake is the "tls" refusal). Once the first
request head is complete, a GET for the console path goes to ``ConsoleSite.console`` (our own
WebSocket, ``browser.py``) and anything else to aiohttp's request handler. Both get a
``ClientAddressTransport`` whose ``get_extra_info("peername")`` is the header's source, so everything reading
``request.transport.get_extra_info("peername")`` sees the browser (on asyncio's loop and on
uvloop alike); ``proxy_peername`` is the balancer's own address. A header is only accepted from
``[listen] trusted_proxies``; a connection from elsewhere, or one without a valid header, is
closed with a logged reason. A LOCAL header (the balancer's health check) keeps the real peer.

The counting and rate logic (``HandshakeGate``, ``RateLimiter``, ``HeadScanner``) is pure code in
``policy/gates.py``, tested without sockets; ``ConsoleSite`` here is the asyncio glue, an aiohttp
site used instead of ``web.TCPSite``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from aiohttp import web

from consoleproxy.config import Limits
from consoleproxy.metrics import Metrics
from consoleproxy.net.browser import is_console_request
from consoleproxy.net.tlstransport import TLSTransport
from consoleproxy.policy.gates import (
    AcceptSettings,
    HandshakeGate,
    HeadScanner,
    HeadTooLarge,
    RateLimiter,
    source_key,
)
from consoleproxy.protocol import proxyproto
from consoleproxy.protocol.addresses import normalized_ip
from consoleproxy.protocol.proxyproto import ProxyHeader, ProxyProtocolError

# A console's connection, its upgrade request's head and the bytes that followed it.
ConsoleHandoff = Callable[[asyncio.Transport, bytes, bytes], None]

__all__ = [
    "ClientAddressTransport",
    "ConsoleHandoff",
    "ConsoleSite",
    "handler_args",
    "read_proxy_header",
]

log = logging.getLogger("consoleproxy.listener")


# Enough for the longest v2 header we accept (proxyproto's 4096-byte body) plus its 16-byte prefix.
_PEEK_MAX = 16 + 4096
_RESPONSE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 32\r\nConnection: close\r\n\r\nrequest header fields too large\n"
)
# One log line per reason at most this often; the metric counts every refusal.
_LOG_EVERY_SECONDS = 10.0
_LIMIT_NAMES = {
    "rate": "[limits] connections_per_ip_per_second",
    "handshakes_per_ip": "[limits] max_handshakes_per_ip",
}


def handler_args(limits: Limits) -> dict[str, Any]:
    """aiohttp request-handler settings for the public runner (``web.AppRunner(**...)``)."""
    return {
        "max_line_size": limits.max_header_line_bytes,
        "max_field_size": limits.max_header_line_bytes,
        "keepalive_timeout": limits.keepalive_timeout_seconds,
    }


class _Refused(Exception):
    """A handshake ended by a limit; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class _Connection(asyncio.Protocol):
    """Holds a connection's bytes until its first request head has arrived, then hands it on.

    ``connection_made`` comes once the transport is ready (after the TLS handshake on a TLS
    listener). When the head is complete this protocol steps out of the path
    (``transport.set_protocol``): a GET for the console path goes, with the head and what
    followed it, to the site's ``console`` hand-over (``browser.BrowserConnection``: aiohttp
    never sees a console); anything else to a new aiohttp request handler, fed the same bytes.
    """

    def __init__(self, site: ConsoleSite, client: tuple[str, int] | None) -> None:
        self.site = site
        self.client = client  # the PROXY header's source, when there is one
        self.transport: asyncio.Transport | None = None
        # Resolved when the handshake is over: head complete, too large, or the connection lost.
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outcome = ""  # "head", "head_too_large" or "lost"
        self.scanner = HeadScanner(site.settings.max_request_head_bytes)
        self.received = bytearray()  # the head so far (at most max_request_head_bytes + a read)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        if self.outcome:
            return  # refused or lost
        self.received += data
        try:
            complete = self.scanner.feed(data)
        except HeadTooLarge:
            self._end("head_too_large")
            t.write(_RESPONSE_431)
            t.close()
            return
        if not complete:
            return
        self._end("head")
        received, self.received = bytes(self.received), bytearray()
        # Everything reading the peer's address (aiohttp's request, the console's) sees the browser.
        seen = t if self.client is None else ClientAddressTransport(t, self.client)
        console = self.site.console
        if console is not None and is_console_request(received):
            size = self.scanner.seen
            console(seen, received[:size], received[size:])
            return
        server = self.site.runner.server
        assert server is not None
        handler = server()
        t.set_protocol(handler)
        handler.connection_made(seen)
        handler.data_received(received)

    def _end(self, outcome: str) -> None:
        if not self.outcome:
            self.outcome = outcome
            self.head.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # before a complete head: nothing to answer; the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("lost")


class ClientAddressTransport(asyncio.Transport):
    """The transport aiohttp gets behind the PROXY protocol: ``peername`` is the header's source.

    Everything else goes to the real (TCP or TLS) transport, so everything that reads
    ``request.transport.get_extra_info("peername")`` sees the browser on any event loop;
    ``get_extra_info("proxy_peername")`` is the balancer's own address. Only used with
    ``[listen] proxy_protocol``; without it aiohttp gets the real transport. ``loop.sendfile``
    does not take this transport (nor a TLS one): the public app serves its files with
    ``pagefiles``, never with aiohttp's FileResponse.
    """

    __slots__ = ("addresses", "inner")

    def __init__(self, inner: asyncio.Transport, client: tuple[str, int]) -> None:
        super().__init__()
        self.inner = inner
        self.addresses = {"peername": client, "proxy_peername": inner.get_extra_info("peername")}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self.addresses:
            return self.addresses[name]
        return self.inner.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self.inner.write_eof()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.inner.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()


class ConsoleSite(web.BaseSite):
    """A public listener (one host:port) with the limits above, serving ``runner``'s app."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        settings: AcceptSettings,
        metrics: Metrics,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
        clock: Callable[[], float] = time.monotonic,
        console: ConsoleHandoff | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        # Our own copies: BaseSite keeps them in private attributes.
        self.tls_context = ssl_context
        self.backlog = backlog
        # Takes a connection whose first request is the console's upgrade (None: aiohttp serves all).
        self.console = console
        self.runner = runner
        self.host = host
        self.requested_port = port
        self.settings = settings
        self.metrics = metrics
        self.reuse_port = reuse_port
        self.clock = clock
        self.gate = HandshakeGate(settings.max_concurrent_handshakes, settings.max_handshakes_per_ip)
        self.rate = RateLimiter(settings.connections_per_ip_per_second, settings.connection_burst)
        self.sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @property
    def name(self) -> str:
        scheme = "https" if self.tls_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1]) if self.sockets else self.requested_port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host or None, self.requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, Any]] = set()
        try:
            for family, kind, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(self.backlog)
                sock.setblocking(False)
        except OSError:
            for s in self.sockets:
                s.close()
            self.sockets.clear()
            raise
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept_ready, sock)

    def stop_listening(self) -> None:
        """Close the listening sockets; accepted connections are not touched. With SO_REUSEPORT
        the kernel then gives every new connection to the other listeners of the port."""
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()

    async def stop(self) -> None:
        self.stop_listening()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await super().stop()

    # --- accept ----------------------------------------------------------------------------

    def _accept_ready(self, listening: socket.socket) -> None:
        for _ in range(self.backlog):
            try:
                conn, addr = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: back off a little, as asyncio does
                self._log("accept", "accept() failed: %s; pausing accepts for 0.5 s", exc)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listening.fileno())
                loop.call_later(0.5, self._resume_accepting, listening)
                return
            self._accepted(conn, str(addr[0]))

    def _resume_accepting(self, listening: socket.socket) -> None:
        if listening in self.sockets:
            asyncio.get_running_loop().add_reader(listening.fileno(), self._accept_ready, listening)

    def _accepted(self, conn: socket.socket, peer: str) -> None:
        """Cheap checks right after accept; a refused connection never reaches TLS."""
        s = self.settings
        # The proxy's own health checks come from loopback with a LOCAL header (no address claim).
        if s.proxy_protocol and not s.trusted(peer) and not _is_loopback(peer):
            self._log("untrusted_proxy", "closed a connection from %s: PROXY protocol is on and "
                      "it is not in [listen] trusted_proxies", peer)
            return self._reset(conn, "untrusted_proxy")
        if not self.gate.enter():
            self._log("handshakes", "refusing connections: %d handshakes in progress "
                      "([limits] max_concurrent_handshakes)", self.gate.in_progress)
            return self._reset(conn, "handshakes")
        key = None
        # A balancer in front (X-Forwarded-For layout) is not one source: it carries everyone.
        if not s.proxy_protocol and not s.trusted(peer):
            key = source_key(peer)
            why = self._admit_source(key)
            if why is not None:
                self.gate.leave()
                self._log(why, "refusing connections from %s (%s)", key, _LIMIT_NAMES[why])
                return self._reset(conn, why)
        conn.setblocking(False)
        self.metrics.handshakes_in_progress.inc()
        task = asyncio.get_running_loop().create_task(self._handshake(conn, peer, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _admit_source(self, key: str) -> str | None:
        """Per-source checks; on success a per-source slot is held. Returns a refusal reason."""
        if not self.rate.allow(key, self.clock()):
            return "rate"
        if not self.gate.enter_source(key):
            return "handshakes_per_ip"
        return None

    def _reset(self, conn: socket.socket, reason: str) -> None:
        self.metrics.connections_refused_total.labels(reason).inc()
        with contextlib.suppress(OSError):
            # RST instead of FIN: no TIME_WAIT on our side, and the peer learns at once.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    async def _handshake(self, conn: socket.socket, peer: str, key: str | None) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        transport: asyncio.Transport | None = None
        reason = ""
        done = False
        try:
            async with asyncio.timeout(s.request_head_timeout_seconds):
                client: tuple[str, int] | None = None
                if s.proxy_protocol:
                    header = await read_proxy_header(loop, conn)
                    client = header.source  # None for LOCAL (the balancer's health check)
                    if client is not None and not s.trusted(peer):
                        # let in for a LOCAL header only (a health check of this machine)
                        self._log("untrusted_proxy", "closed a connection from %s: PROXY protocol is on "
                                  "and it is not in [listen] trusted_proxies", peer)
                        raise _Refused("untrusted_proxy")
                    key = source_key(client[0] if client else peer)
                    why = self._admit_source(key)
                    if why is not None:
                        self._log(why, "refusing connections from %s (%s)", key, _LIMIT_NAMES[why])
                        key = None
                        raise _Refused(why)
                proto = _Connection(self, client)
                if self.tls_context is not None:
                    # The SNI callback of the shared context picks the certificate, so a hot
                    # swap applies to new handshakes. A failed handshake (ssl.SSLError: the "tls"
                    # refusal) or a timeout: the transport is aborted below, like a plain one.
                    tls = TLSTransport(self.tls_context, proto)
                    wire = tls.wire
                    assert wire is not None
                    await loop.connect_accepted_socket(lambda: wire, conn)
                    transport = tls
                    await tls.handshake
                else:
                    transport, _ = await loop.connect_accepted_socket(lambda: proto, conn)
                await proto.head
                if proto.outcome == "head_too_large":
                    raise _Refused("head_too_large")
                done = proto.outcome == "head"
        except TimeoutError:
            reason = "head_timeout"
        except _Refused as exc:
            reason = exc.reason
        except ProxyProtocolError as exc:
            reason = "proxy_header"
            self._log(reason, "closed a connection from balancer %s: %s", peer, exc)
        except ssl.SSLError:
            reason = "tls"
        except (OSError, EOFError):
            pass  # the client went away; nothing to count
        except Exception:  # a bug here must not kill the accept loop, nor go unnoticed
            reason = "error"
            log.exception("handshake of a connection from %s failed", peer)
        finally:
            if key is not None:
                self.gate.leave_source(key)
            self.gate.leave()
            self.metrics.handshakes_in_progress.dec()
            if reason:
                self.metrics.connections_refused_total.labels(reason).inc()
            if not done:
                if transport is None:
                    conn.close()  # never became a transport (or its transport closed it already)
                elif reason != "head_too_large":  # that one is closing after its 431
                    transport.abort()

    def _log(self, reason: str, msg: str, *args: Any) -> None:
        """A warning at most every few seconds per reason, with the count of the ones skipped."""
        now = self.clock()
        last = self._last_log.get(reason)
        if last is not None and now - last < _LOG_EVERY_SECONDS:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last_log[reason] = now
        skipped = self._suppressed.pop(reason, 0)
        if skipped:
            msg += f" ({skipped} more like this not logged)"
        log.warning(msg, *args)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes already seen with MSG_PEEK, so they are in the socket's buffer."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def _is_loopback(address: str) -> bool:
    ip = normalized_ip(address)
    return ip is not None and ip.is_loopback


async def read_proxy_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> ProxyHeader:
    """Read one PROXY header from a non-blocking socket without consuming a byte past it."""
    buf = b""
    while True:
        await _readable(loop, sock)
        try:
            peek = sock.recv(_PEEK_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peek:
            raise ProxyProtocolError("connection closed before a complete PROXY header")
        header = proxyproto.parse(buf + peek)
        if header is None:
            # Every byte seen is still header: take them, so the socket is not readable forever.
            buf += _recv_exactly(sock, len(peek))
            continue
        _recv_exactly(sock, header.length - len(buf))
        return header
