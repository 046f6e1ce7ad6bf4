"""The console pipeline: one console from its upgrade to the relay, readable top to bottom.

``Consoles.accept`` takes a connection whose first request is the console's upgrade (from
``listener.ConsoleSite``) and runs the opening handshake (``browser``); ``handle_console`` then
goes origin (``policy.origin``) -> token (``policy.tokens`` or ``policy.cloudstack``, or a resume
ticket: ``policy.resume``) -> target (``policy.targets``) -> session limits (``policy.sessions``)
-> VNC connection and its RFB handshake (``net.vncconn``, ``protocol.rfb_server``) -> the browser's
RFB handshake (``protocol.rfb_client``) -> ``relay``. Every refusal is a WebSocket close code
(DESIGN.md 8) with its reason; its outcome is counted and audited (``bookkeeping``).

It reads the server's current policy objects (``ProxyServer``: configuration, validators,
target policy, origin policy, VNC TLS context, registry, recordings), which a reload swaps, and
owns what belongs to open consoles: the relays, the browser connections still in the handshake,
their tasks, resume chains and the single-use marks being written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from consoleproxy.errors import (
    BackendUnreachable,
    ConsoleError,
    ConsoleProxyError,
    Forbidden,
    ResumeRefused,
    SessionKilled,
    ShuttingDown,
    TokenInvalid,
)
from consoleproxy.net import vncconn
from consoleproxy.net.browser import NOTICE_PROTOCOL, BrowserClosed, BrowserConnection, ConsoleRequest
from consoleproxy.net.relay import Relay
from consoleproxy.net.vncconn import Handover, VNCConnection
from consoleproxy.policy.origin import check_origin
from consoleproxy.policy.resume import (
    MAX_TICKET_BYTES,
    TicketBody,
    issue_ticket,
    new_resume_id,
    open_ticket,
    seal_body,
    used_key,
)
from consoleproxy.policy.sessions import Session
from consoleproxy.policy.targets import check_hostname_syntax, is_ip_address
from consoleproxy.policy.tokens import Claims, Keyring
from consoleproxy.protocol import rfb, rfb_client, rfb_messages
from consoleproxy.protocol.forwarded import client_address
from consoleproxy.protocol.query import raw_query_param
from consoleproxy.protocol.wsframes import CLOSE_TIMEOUT
from consoleproxy.protocol.wsframes import close_reason as _reason
from consoleproxy.recordings.recording_policy import should_record

if TYPE_CHECKING:
    from consoleproxy.server import ProxyServer

__all__ = ["NOTICE_PREFIX", "NOTICE_PROTOCOL", "RECORDED_NOTICE", "Consoles"]

log = logging.getLogger("consoleproxy")

# A browser offering this WebSocket subprotocol (our console page) is told, in a text message
# before RFB starts, that its session is recorded; noVNC ignores a text message (it has no bytes).
# The page's other text messages are resume tickets ("cpr1.<base64url>...", resume.py), which
# never contain ':': a text message starting with NOTICE_PREFIX is a notice, anything else a
# ticket (README, "Resume"; docs/recording.md).
NOTICE_PREFIX = "consoleproxy:"
RECORDED_NOTICE = NOTICE_PREFIX + "recorded"


class Consoles:
    """The console pipeline of one ``ProxyServer`` and the consoles it has open.

    Longer than 300 lines because the pipeline is meant to be read top to bottom in one place:
    ``handle_console`` and the steps it calls, in the order it calls them, then the relay's
    start and end and the resume bookkeeping they share.
    """

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        # Consoles whose browser connection is open: relaying, or closing (close handshake).
        self.relays: dict[str, Relay] = {}
        # Browser connections in the RFB handshake (pinged by the sweeper like relaying ones).
        self.handshaking: set[BrowserConnection] = set()
        # The pipeline's tasks (one a console, from the 101 until the relay starts).
        self.tasks: set[asyncio.Task[None]] = set()
        self.relays_gone = asyncio.Event()
        self.relays_gone.set()
        # Resume (resume.py): consoles by resume chain id, and the store writes that mark a
        # generation used when its console must not come back.
        self._by_resume: dict[str, Session] = {}
        self._burns: set[asyncio.Task[None]] = set()

    def pinged(self) -> list[BrowserConnection]:
        """Every open browser connection: in the RFB handshake, relaying, or closing."""
        return [*self.handshaking, *(relay.client for relay in self.relays.values())]

    async def close(self) -> None:
        """Shutdown: every open console gets 1001 and its close handshake (at most
        CLOSE_TIMEOUT), then is cut; consoles still in their handshake are cancelled."""
        for s in list(self.server.registry):
            s.close(1001, "proxy shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.relays_gone.wait()
        for relay in list(self.relays.values()):
            relay.abort()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=2)

    async def settle(self) -> None:
        """Wait (briefly) for the single-use marks still being written."""
        if self._burns:
            await asyncio.wait(self._burns, timeout=2)

    @staticmethod
    def _peer_ip(request: ConsoleRequest) -> str:
        peer = request.transport.get_extra_info("peername")
        return str(peer[0]) if peer else "unknown"

    def _client_ip(self, request: ConsoleRequest, peer: str) -> str:
        """The browser's address; raises BadForwardedFor (4004) for an unreadable balancer header."""
        if not self.server.cfg.listen.forwarded_for:
            return peer
        return client_address(peer, request.headers.get_all("X-Forwarded-For"), self.server.trusted_proxies)

    def accept(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        """The accept layer's hand-over (listener.ConsoleSite): a connection whose first request
        is the console's upgrade. The opening handshake (browser.py), then the pipeline's task."""
        ws = BrowserConnection(transport, self.server.cfg.limits.max_client_message_bytes)
        request = ws.start(head, rest)
        if request is None:
            return  # refused with an HTTP status (not a WebSocket upgrade)
        # Pinged by the sweeper from the 101 on (BrowserConnection.heartbeat).
        self.handshaking.add(ws)
        task = asyncio.get_running_loop().create_task(self.handle_console(ws, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle_late_request(self, request: web.Request) -> web.Response:
        """A console request behind another request on its connection (keep-alive): consoles are
        served on a connection of their own, as browsers open them."""
        return web.Response(status=400, text="the console WebSocket must be its connection's first request\n")

    async def handle_console(self, ws: BrowserConnection, request: ConsoleRequest) -> None:
        """One console, in order: draining? -> client IP -> origin -> token (or resume ticket)
        -> target -> session limits -> VNC connection -> ticket's single use -> recorded notice
        -> RFB both sides -> relay. A refusal anywhere closes the browser with its code; the
        outcome is counted and audited either way (``_end``, or the relay's end)."""
        lim = self.server.cfg.limits
        client_ip = self._peer_ip(request)
        session: Session | None = None
        vnc: VNCConnection | None = None
        result = "error"
        relaying = False
        keys = self.server.resume_keyring
        # The page asks for tickets with resume=1; other clients never see a text message.
        wants_resume = keys is not None and _query(request, "resume") == "1"
        ticket: TicketBody | None = None
        try:
            async with asyncio.timeout(lim.handshake_timeout_seconds):
                if self.server.refusing:
                    raise ShuttingDown("this proxy is draining; reconnect to reach another")
                client_ip = self._client_ip(request, client_ip)
                self._check_origin(request)
                if wants_resume and not _query(request, "token"):
                    assert keys is not None
                    ticket = await self._receive_ticket(ws, keys, client_ip)
                    claims = await self._check_target(_ticket_claims(ticket))
                else:
                    claims = await self._validate(request, client_ip)
                session = Session(
                    vm=claims.vm,
                    client_ip=client_ip,
                    host=claims.host,
                    port=claims.port,
                    name=claims.name,
                    view_only=claims.view_only,
                    max_duration=claims.max_duration,
                    session_uuid=(ticket.session_uuid if ticket is not None else claims.jti)
                    if self.server.cloudstack is not None else None,
                )
                if wants_resume:
                    self._resume_state(session, ticket)
                self.server.drain.idle.clear()
                for old in self.server.registry.add(session):
                    if ticket is not None and old.resume_id == ticket.sid:
                        old.resume_id = None  # its own resumed connection: no mark as used
                    old.close(SessionKilled.close_code, "replaced by a newer console for this VM")
                rc = self.server.cfg.recording
                record = should_record(rc.enabled, claims.record, claims.vm, rc.vms)
                vnc = await self._connect(claims)
                if ticket is not None:
                    await self._use_ticket(ticket, request)
                if record and NOTICE_PROTOCOL in request.offered_subprotocols():
                    # Our console page offers this protocol: it shows "this session is recorded".
                    # Only now, just before RFB: a console refused before this point (its resume
                    # ticket used, its VNC server unreachable) is never said to be recorded.
                    await ws.send_str(RECORDED_NOTICE)
                client_leftover, server_init = await self._rfb_handshake(ws, vnc, claims, session)
                if wants_resume and keys is not None:
                    session.resume_body = seal_body(keys, _ticket_body(session, claims))
                    await ws.send_str(self._ticket(keys, session))
            # The token's claim, else [input]: drop the Lang1/Lang2 releases for this console?
            drop_lang = (claims.lang_key_release or self.server.cfg.input.lang_key_release) == "drop"
            # The claims (with the VNC password) are done with: not kept for the console's life.
            del claims
            # From here the relay owns the console: it ends it (``_relay_ended``) and closes both
            # sockets; this handler returns at once and aiohttp frees what it kept for it.
            self._start_relay(
                ws, vnc, session, client_leftover, drop_lang_release=drop_lang,
                server_init=server_init if record else None,
            )
            relaying = True
        except TimeoutError:
            result = "handshake timeout"
            self._refuse(ws, 4012, b"handshake timed out")
        except ConsoleError as exc:
            result = exc.reason
            if isinstance(exc, TokenInvalid | Forbidden) or exc.close_code in (4002, 4003, 4005):
                self.server.metrics.token_rejections_total.labels(exc.reason).inc()
            log.info("console refused for %s: %s (%d)", client_ip, exc, exc.close_code)
            self._refuse(ws, exc.close_code, _reason(str(exc)))
        except rfb.RFBError as exc:
            result = "protocol error"
            self._refuse(ws, 1002, _reason(f"RFB protocol error: {exc}"))
        except ConnectionError:  # BrowserClosed included
            result = "client closed"  # the browser went away mid-handshake; nothing to tell it
            request.transport.close()  # (closed already, or its close handshake is over)
        except asyncio.CancelledError:  # the proxy is shutting down
            result = "shutting down"
            self._refuse(ws, 1001, b"proxy shutting down")
            raise
        except OSError as exc:  # e.g. a TLS alert from the VNC server after the handshake
            result = "error"
            log.warning("console for %s ended by a socket error: %s", client_ip, exc)
            self._refuse(ws, 1011, _reason("connection to the VNC server failed"))
        except Exception:  # a bug, not the peers': logged, and the browser is told (aiohttp did both)
            result = "error"
            log.exception("console for %s failed", client_ip)
            self._refuse(ws, 1011, b"internal error")
        finally:
            self.handshaking.discard(ws)
            if not relaying:
                if vnc is not None:
                    vnc.close()
                if session is not None:
                    self._end(session, result)
                self.server.trimmer.ended()

    # --- resume (resume.py) ------------------------------------------------------------------

    async def _receive_ticket(self, ws: BrowserConnection, keys: Keyring, client_ip: str) -> TicketBody:
        """A resuming page's first message is its ticket (never in the URL: access logs), in a
        binary message like every message a browser sends here (the frame parser refuses text)."""
        try:
            data = await ws.receive()
        except BrowserClosed:
            data = None
        if data is None or len(data) > MAX_TICKET_BYTES:
            raise ResumeRefused("resume ticket invalid: expected the ticket as the first message")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ResumeRefused("resume ticket invalid") from None
        return open_ticket(keys, text, now=time.time(), client_ip=client_ip)

    def _resume_state(self, session: Session, ticket: TicketBody | None) -> None:
        """A new chain for a token's console; the next generation of a resumed one, whose
        lifetime counts from the console's first start."""
        if ticket is None:
            session.resume_id = new_resume_id()
            return
        session.resume_id = ticket.sid
        session.resume_gen = ticket.gen + 1
        age = max(time.time() - ticket.started, 0.0)
        session.started = float(ticket.started)
        session.started_mono = time.monotonic() - age

    async def _use_ticket(self, ticket: TicketBody, request: ConsoleRequest) -> None:
        """Single use, cluster-wide: the generation's key goes into the shared store once the VNC
        server has accepted the connection, before the browser gets a byte of RFB. So a resume
        that fails to reach the VNC server (a storm after a lost instance: connect timeouts) can
        be retried with the same ticket, and a refused one never shows the page a console."""
        window = self.server.cfg.resume.window_seconds
        # Tickets of this generation expire at most a window after the last one was sent; the
        # key outlives them (an old connection still open elsewhere is cut by the heartbeat).
        if not await self.server.replay.add(used_key(ticket.sid, ticket.gen), time.time() + 2 * window + 60):
            raise ResumeRefused("resume ticket already used")
        old = self._by_resume.get(ticket.sid)
        if old is not None:
            # The same console's half-open connection here (not yet cut by the heartbeat): this
            # one replaces it. (Under per_vm_policy "reject" the limits refused this one (4008)
            # while it was open; the page retries until the heartbeat has cut it.)
            old.close(SessionKilled.close_code, "replaced by its resumed connection")
        after = _query(request, "after")
        cause = "drain" if after == "1001" else "network" if after in ("1005", "1006") else "other"
        self.server.metrics.resumes_total.labels(cause).inc()
        log.info("console resumed (%s) for VM %s", cause, ticket.vm)

    def _ticket(self, keys: Keyring, session: Session) -> str:
        assert session.resume_body is not None
        session.ticket_sent = time.monotonic()
        exp = int(time.time()) + self.server.cfg.resume.window_seconds
        return issue_ticket(keys, session.resume_body, exp=exp)

    def refresh_tickets(self, now: float) -> None:
        """A fresh ticket every third of the window to each console that asked for them."""
        keys = self.server.resume_keyring
        if keys is None:
            return
        due = now - self.server.cfg.resume.window_seconds / 3
        for relay in list(self.relays.values()):
            s = relay.session
            if s.resume_body is not None and s.ticket_sent <= due and not relay.ended:
                relay.client.send_text(self._ticket(keys, s).encode("ascii"))

    def _burn(self, session: Session) -> None:
        """Mark the console's generation used: an administrator's kill, a replacement, a time
        limit or a VNC server that closed must not come back with the ticket the page holds."""
        if session.resume_id is None:
            return
        key = used_key(session.resume_id, session.resume_gen)
        expires = time.time() + 2 * self.server.cfg.resume.window_seconds + 60

        async def burn() -> None:
            try:
                await self.server.replay.add(key, expires)
            except ConsoleProxyError as exc:  # store down: counted by the guard; tickets expire
                log.warning("could not mark an ended console as not resumable: %s", exc)

        task = asyncio.create_task(burn())
        self._burns.add(task)
        task.add_done_callback(self._burns.discard)

    def _refuse(self, ws: BrowserConnection, code: int, message: bytes) -> None:
        """Close a console that did not reach the relay. Out of the sweeper's pings first: only a
        close reply is due from the browser now (RFC 6455 5.5.1); the browser's connection
        ends on its reply or after CLOSE_TIMEOUT, without this task."""
        self.handshaking.discard(ws)
        ws.close(code, message)

    def _check_origin(self, request: ConsoleRequest) -> None:
        """Refuse cross-site WebSockets: the rule is origin.check_origin, over the request's
        Origin and Host headers (never X-Forwarded-Host)."""
        check_origin(request.headers.get("Origin"), request.host, self.server.origin_policy)

    async def _check_target(self, claims: Claims) -> Claims:
        """``[targets]`` for the claims' host; a name is resolved once and replaced by the address."""
        if is_ip_address(claims.host):
            self.server.targets.check(claims.host, claims.port)
            return claims
        # Resolved here, once; the connection goes to the address checked, not to the name again.
        address = await self._resolve_target(claims.host, claims.port)
        return dataclasses.replace(claims, host=str(address))

    async def _validate(self, request: ConsoleRequest, client_ip: str) -> Claims:
        try:
            token = raw_query_param(request.query_string, "token")
        except UnicodeDecodeError:
            raise TokenInvalid("token is not valid percent-encoded UTF-8") from None
        if not token:
            raise TokenInvalid("no token in the URL")
        if self.server.cloudstack is not None:
            try:
                extra = raw_query_param(request.query_string, "extra")
            except UnicodeDecodeError:
                raise Forbidden("extra is not valid percent-encoded UTF-8") from None
            claims = await self.server.cloudstack.validate(token, client_ip=client_ip, extra=extra)
        else:
            assert self.server.validator is not None
            claims = await self.server.validator.validate(token, client_ip=client_ip)
        return await self._check_target(claims)

    async def _resolve_target(self, host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        check_hostname_syntax(host)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.server.cfg.limits.connect_timeout_seconds):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise BackendUnreachable(f"resolving {host} timed out") from None
        except OSError as exc:
            raise BackendUnreachable(f"cannot resolve {host}: {exc.strerror or exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return self.server.targets.check_resolved(host, addresses, port)

    async def _connect(self, claims: Claims) -> VNCConnection:
        t0 = time.monotonic()
        conn = await vncconn.connect(claims.host, claims.port, self.server.cfg.limits.connect_timeout_seconds)
        self.server.metrics.backend_connect_seconds.observe(time.monotonic() - t0)
        return conn

    async def _rfb_handshake(
        self,
        ws: BrowserConnection,
        vnc: VNCConnection,
        claims: Claims,
        session: Session,
    ) -> tuple[bytes, bytes]:
        """Authenticate to the VNC server, then give the browser a no-password 3.8 server.

        Returns the browser's bytes that followed its security choice (the relay forwards them)
        and the ServerInit the browser got (a recording starts with it).
        """
        browser = rfb_client.ClientHandshake()
        # Send our version to the browser first so its reply overlaps the backend handshake.
        await ws.send_bytes(browser.data_to_send())

        await vncconn.authenticate(vnc, claims.password, self.server.backend_tls)

        ready = False
        while not ready:
            browser.receive_data(await _message(ws, "during the RFB handshake"))
            out = browser.data_to_send()
            if out:
                await ws.send_bytes(out)
            for ev in browser.events():
                if isinstance(ev, rfb.ClientReady):
                    ready = True
        browser.accept()
        await ws.send_bytes(browser.data_to_send())

        # ClientInit (one byte: the shared flag) goes to the VNC server here, so that its
        # ServerInit is checked before anything is relayed (a bounded desktop name).
        leftover = browser.leftover()
        while not leftover:
            leftover = await _message(ws, "before its ClientInit")
        vnc.write(leftover[:1])
        # What the server pipelines behind its ServerInit stays in ``vnc`` for the relay.
        init = await vncconn.read_server_init(vnc)
        await ws.send_bytes(init)
        session.bytes_up += 1  # the init messages count as relayed, as they did when streamed
        session.bytes_down += len(init)
        return leftover[1:], init

    def _start_relay(
        self,
        ws: BrowserConnection,
        vnc: VNCConnection,
        session: Session,
        client_leftover: bytes,
        *,
        drop_lang_release: bool = False,
        server_init: bytes | None = None,
    ) -> None:
        """Relay the console; with ``server_init`` (the ServerInit the browser got), record it."""
        flt = None
        recorder = None
        vnc_side: Handover | None = None
        if server_init is not None:
            recorder = self.server.recordings.begin(session)
        if session.view_only or drop_lang_release or recorder is not None:
            # What a client pipelined behind its ClientInit goes through the same filter.
            filt = rfb_messages.ClientMessageFilter(
                view_only=session.view_only,
                drop_lang_release=drop_lang_release,
                expect_client_init=False,
                observer=recorder.input if recorder is not None else None,
                lenient=not (session.view_only or drop_lang_release),
                on_request=recorder.request if recorder is not None else None,
                seekable=recorder is not None and self.server.cfg.recording.seekable_encodings,
            )
            flt = filt.feed
            if recorder is not None:
                recorder.filter = filt
        try:
            # Detached here, and the relay attaches in this same callback (relay.start below):
            # no byte the VNC server sends can reach the handshake's protocol in between.
            vnc_side = vnc.detach()
            relay = Relay(
                ws, vnc_side, session,
                client_filter=flt,
                client_leftover=client_leftover,
                on_end=self._relay_ended,
                on_closed=self._relay_closed,
            )
        except BaseException:
            if vnc_side is not None:
                vnc_side.transport.close()  # no relay owns it
            if recorder is not None:
                recorder.close()
            raise
        if recorder is not None:
            assert server_init is not None
            recorder.server_init(server_init)
            relay.recorder = recorder
        session.closer = relay.stop
        self.relays[session.id] = relay
        if session.resume_id is not None:
            self._by_resume[session.resume_id] = session
        self.relays_gone.clear()
        self.server.metrics.sessions_active.inc()
        self._audit("session_start", session)
        try:
            relay.start()
        except Exception:  # a bug, not the peers': the console still ends (1011) and is counted
            log.exception("console for %s failed to start relaying", session.client_ip)
            relay.stop(1011, "internal error")

    def _relay_ended(self, relay: Relay, result: str) -> None:
        self.server.metrics.sessions_active.dec()
        recorder, relay.recorder = relay.recorder, None
        if recorder is not None:
            recorder.close()
        session = relay.session
        if session.resume_id is not None:
            if self._by_resume.get(session.resume_id) is session:
                del self._by_resume[session.resume_id]
            # Comes back: a lost connection (the browser's or ours) and a drain or shutdown (1001).
            lost = relay.close_code is None and result == "client closed"
            if not (lost or relay.close_code == 1001):
                self._burn(session)
        self._end(session, result)
        # The closer is the relay's bound method: the session and the relay would be a cycle.
        session.closer = None

    def _relay_closed(self, relay: Relay) -> None:
        self.relays.pop(relay.session.id, None)
        self.server.trimmer.ended()
        if not self.relays:
            self.relays_gone.set()

    def _end(self, session: Session, result: str) -> None:
        """A console is over (refused, or its relay ended): counted, audited, out of the limits."""
        self.server.registry.remove(session)
        if not len(self.server.registry):
            self.server.drain.idle.set()
        self.server.books.ended(session, result)

    def _audit(self, event: str, session: Session, **extra: Any) -> None:
        self.server.books.audit(event, session, **extra)


def _query(request: ConsoleRequest, name: str) -> str | None:
    try:
        return raw_query_param(request.query_string, name)
    except UnicodeDecodeError:
        return None


async def _message(ws: BrowserConnection, when: str) -> bytes:
    """The browser's next message in the RFB handshake; its close (or a broken frame: its close
    code is out already) is an RFB protocol error."""
    try:
        return await ws.receive()
    except BrowserClosed:
        raise rfb.RFBError(f"the browser closed {when}") from None


def _ticket_claims(t: TicketBody) -> Claims:
    """The resumed console's claims: what the original token said, as the ticket carries it."""
    now = int(time.time())
    return Claims(
        host=t.host, port=t.port, vm=t.vm, exp=now, iat=now, jti=t.sid, password=t.password,
        name=t.name, client_ip=t.client_ip, view_only=t.view_only, max_duration=t.max_duration,
        lang_key_release=t.lang_key_release, record=t.record,
    )


def _ticket_body(session: Session, claims: Claims) -> TicketBody:
    assert session.resume_id is not None
    return TicketBody(
        sid=session.resume_id, gen=session.resume_gen, host=claims.host, port=claims.port,
        vm=claims.vm, started=int(session.started), password=claims.password, name=claims.name,
        client_ip=claims.client_ip, view_only=claims.view_only,
        max_duration=claims.max_duration, lang_key_release=claims.lang_key_release,
        session_uuid=session.session_uuid, record=claims.record,
    )
