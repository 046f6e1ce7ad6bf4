"""Resume tickets (DESIGN 10): the pure codec, then the console path over real WebSockets.

A page asks for tickets with ``resume=1`` and gets each as a text message; it resumes by opening
``/websockify?resume=1`` and sending the ticket as its first message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from harness import (
    Proxy,
    RFBClient,
    connect_echo,
    echo_backend,
    free_port,
    make_config,
    running_proxy,
    tcp_server,
)
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from consoleproxy.errors import ConfigError, ResumeRefused, TokenInvalid
from consoleproxy.net.console import NOTICE_PREFIX, NOTICE_PROTOCOL, RECORDED_NOTICE
from consoleproxy.policy.cloudstack import CloudStackKeys, encrypt_gcm
from consoleproxy.policy.resume import TicketBody, issue_ticket, open_ticket, seal_body, used_key
from consoleproxy.policy.tokens import Keyring, decode, issue
from consoleproxy.server import ProxyServer

RING = Keyring.generate()
BODY = TicketBody(sid="chain", gen=3, host="10.0.0.5", port=5901, vm="vm-9", started=1_700_000_000,
                  password="s3cret", name="web", client_ip="192.0.2.7", view_only=True,
                  max_duration=600, lang_key_release="drop", session_uuid="uuid-1", record=True)
NOW = 1_800_000_000


def _ticket(body: TicketBody = BODY, exp: int = NOW + 60, ring: Keyring = RING) -> str:
    return issue_ticket(ring, seal_body(ring, body), exp=exp)


# --- the codec ---------------------------------------------------------------------------------


def test_round_trip_keeps_every_field_and_hides_the_password() -> None:
    body = open_ticket(RING, _ticket(), now=NOW, client_ip="192.0.2.7")
    assert body.to_dict() == BODY.to_dict()
    assert "s3cret" not in repr(body) and "s3cret" not in _ticket()


def test_a_record_claim_that_is_not_a_boolean_is_refused() -> None:
    bad = TicketBody(sid="chain", gen=0, host="h", port=5900, vm="v", started=1,
                     record="yes")  # type: ignore[arg-type]
    with pytest.raises(ResumeRefused, match="resume ticket invalid"):
        open_ticket(RING, _ticket(bad), now=NOW, client_ip="192.0.2.7")


def test_a_ticket_is_never_taken_for_the_recorded_notice() -> None:
    """The page tells the proxy's text messages apart by NOTICE_PREFIX: a ticket never has a ':'."""
    for _ in range(50):
        ticket = _ticket()
        assert ":" not in ticket and not ticket.startswith(NOTICE_PREFIX)
    assert RECORDED_NOTICE.startswith(NOTICE_PREFIX)
    with pytest.raises(ResumeRefused):
        open_ticket(RING, RECORDED_NOTICE, now=NOW, client_ip="192.0.2.7")


def test_expired_ticket_is_refused_with_its_reason() -> None:
    with pytest.raises(ResumeRefused, match="expired") as e:
        open_ticket(RING, _ticket(exp=NOW - 1), now=NOW, client_ip="192.0.2.7")
    assert e.value.close_code == 4005


def test_address_binding_of_the_original_token_holds() -> None:
    with pytest.raises(ResumeRefused, match="not allowed from this address"):
        open_ticket(RING, _ticket(), now=NOW, client_ip="192.0.2.8")
    # the same address as an IPv4-mapped IPv6 peer is the same client
    open_ticket(RING, _ticket(), now=NOW, client_ip="::ffff:192.0.2.7")
    # a token without a binding: any address may resume
    free = TicketBody(**{**BODY.to_dict(), "client_ip": None})
    assert open_ticket(RING, _ticket(free), now=NOW, client_ip="198.51.100.1").sid == "chain"


def test_tampered_unknown_key_and_rotated_keyring() -> None:
    t = _ticket()
    for i in range(5, len(t)):
        bad = t[:i] + ("A" if t[i] != "A" else "B") + t[i + 1 :]
        with pytest.raises(ResumeRefused, match="invalid"):
            open_ticket(RING, bad, now=NOW, client_ip="192.0.2.7")
    with pytest.raises(ResumeRefused, match="invalid"):
        open_ticket(Keyring.generate(), t, now=NOW, client_ip="192.0.2.7")
    # after a rotation the old key still validates (as for tokens)
    assert open_ticket(RING.rotate(), t, now=NOW, client_ip="192.0.2.7").gen == 3


def test_a_ticket_is_never_a_token_and_a_token_never_a_ticket() -> None:
    with pytest.raises(TokenInvalid):
        decode(RING, _ticket())
    token = issue(RING, host="10.0.0.5", port=5901, vm="vm-9")
    with pytest.raises(ResumeRefused, match="invalid"):
        open_ticket(RING, token, now=time.time(), client_ip="192.0.2.7")
    # nor is the inner layer (the sealed body) a ticket of its own
    with pytest.raises(ResumeRefused, match="invalid"):
        open_ticket(RING, seal_body(RING, BODY), now=NOW, client_ip="192.0.2.7")


def test_used_key_is_per_generation() -> None:
    assert used_key("chain", 3) != used_key("chain", 4)


# --- the console path --------------------------------------------------------------------------


class TicketClient(RFBClient):
    """An RFB client that keeps the proxy's text messages (tickets) aside."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(ws)
        self.tickets: list[str] = []

    async def read_exact(self, n: int, timeout: float = 10) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self.buf) < n:
                msg = await self.ws.recv()
                if isinstance(msg, str):
                    self.tickets.append(msg)
                else:
                    self.buf += msg
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def ticket(self) -> str:
        """The latest ticket (the first comes right behind ServerInit)."""
        return self.tickets[-1] if self.tickets else await self.next_ticket()

    async def next_ticket(self, timeout: float = 10) -> str:
        seen = len(self.tickets)
        async with asyncio.timeout(timeout):
            while len(self.tickets) == seen:
                msg = await self.ws.recv()
                if isinstance(msg, str):
                    self.tickets.append(msg)
                else:
                    self.buf += msg
        return self.tickets[-1]

    def cut(self) -> None:
        """Lose the connection without a close frame (network gone, laptop asleep)."""
        self.ws.transport.abort()


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[TicketClient]:
    async with TicketClient.connect(url) as c:
        assert isinstance(c, TicketClient)
        await connect_echo(c)
        yield c


@contextlib.asynccontextmanager
async def resumed(p: Proxy, ticket: str, after: int = 1006) -> AsyncIterator[TicketClient]:
    scheme = "wss" if p.server.cfg.listen.tls else "ws"
    async with TicketClient.connect(f"{scheme}://127.0.0.1:{p.port}/websockify?resume=1&after={after}") as c:
        assert isinstance(c, TicketClient)
        with contextlib.suppress(ConnectionClosed):  # refused before it (resume off)
            await c.ws.send(ticket.encode())
        yield c


async def _refused(p: Proxy, ticket: str) -> tuple[int | None, str]:
    async with resumed(p, ticket) as c:
        return await c.close_code(), c.close_reason


async def _echo(c: RFBClient, data: bytes) -> None:
    await c.send(data)
    assert await c.read_exact(len(data)) == data


async def test_ticket_only_when_asked_and_resume_after_a_cut(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with opened(p.url(p.token(port=port))) as plain:  # no resume=1: no text message
            await _echo(plain, b"x")
            assert plain.tickets == []
        async with opened(p.url(p.token(port=port)) + "&resume=1") as c:
            ticket = await c.ticket()
            c.cut()
        async with resumed(p, ticket) as again:
            await connect_echo(again)  # a new RFB session towards the page, a fresh VNC connection
            await _echo(again, b"back")
            second = await again.ticket()
            assert second != ticket
        assert 'consoleproxy_resumes_total{cause="network"} 1.0' in p.server.metrics.render().decode()
        # each ticket works once
        code, reason = await _refused(p, ticket)
        assert (code, reason) == (4005, "resume ticket already used")
        # and the second one still works
        async with resumed(p, second, after=1001) as third:
            await connect_echo(third)
        assert 'consoleproxy_resumes_total{cause="drain"} 1.0' in p.server.metrics.render().decode()


async def test_a_refused_resume_sends_no_recorded_notice(tmp_path: Path) -> None:
    """A recorded console's page is told "this session is recorded" only by a console that
    opens: a resume refused with 4005 (its ticket already used) sends no notice before its close,
    or the page would flash it over the refusal."""
    rec = {"enabled": False, "store": f"file://{tmp_path / 'rec'}"}  # recorded by the claim
    protocols = ["binary", NOTICE_PROTOCOL]
    async with running_proxy(tmp_path, recording=rec) as p, tcp_server(echo_backend) as port:
        url = p.url(p.token(port=port, record=True)) + "&resume=1"
        async with TicketClient.connect(url, subprotocols=protocols) as c:
            assert isinstance(c, TicketClient)
            await connect_echo(c)
            while not [t for t in c.tickets if not t.startswith(NOTICE_PREFIX)]:
                await c.next_ticket()
            assert c.tickets[0] == RECORDED_NOTICE  # the console that opened was told
            (ticket,) = [t for t in c.tickets if not t.startswith(NOTICE_PREFIX)]
            c.cut()
        async with resumed(p, ticket) as again:  # the ticket is used here
            await connect_echo(again)
        texts: list[str] = []
        async with TicketClient.connect(
            f"ws://127.0.0.1:{p.port}/websockify?resume=1&after=1006", subprotocols=protocols
        ) as refused:
            await refused.ws.send(ticket.encode())
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(10):
                    async for msg in refused.ws:
                        if isinstance(msg, str):
                            texts.append(msg)
            assert refused.ws.close_code == 4005
        assert texts == []


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.integration)])
async def test_used_ticket_is_refused_on_another_instance(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    ring = Keyring.generate()
    if kind == "redis":
        url = request.getfixturevalue("redis_server").url  # a real redis-server (tests/conftest.py)
    else:
        url = f"sqlite:///{tmp_path}/replay.db"
    store = {"replay_store": url}
    async with running_proxy(tmp_path / "a", ring, cluster=store) as a, \
            running_proxy(tmp_path / "b", ring, cluster=store) as b, tcp_server(echo_backend) as port:
        async with opened(a.url(a.token(port=port)) + "&resume=1") as c:
            ticket = await c.ticket()
            c.cut()
        async with resumed(b, ticket) as other:  # the other instance resumes it
            await connect_echo(other)
            await _echo(other, b"on b")
        assert await _refused(a, ticket) == (4005, "resume ticket already used")
        assert await _refused(b, ticket) == (4005, "resume ticket already used")


async def test_expired_ticket_and_wrong_address(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        body = TicketBody(sid="x", gen=0, host="127.0.0.1", port=port, vm="vm-1", started=int(time.time()))
        assert await _refused(p, _ticket(body, exp=int(time.time()) - 1, ring=p.keyring)) == (
            4005, "resume ticket expired: the resume window is over")
        bound = TicketBody(**{**body.to_dict(), "client_ip": "192.0.2.1"})
        assert await _refused(p, _ticket(bound, exp=int(time.time()) + 60, ring=p.keyring)) == (
            4005, "resume not allowed from this address")
        # a first message that is no ticket
        assert (await _refused(p, "RFB 003.008\n"))[0] == 4005
        async with TicketClient.connect(f"ws://127.0.0.1:{p.port}/websockify?resume=1") as c:
            await c.ws.send(bytes(range(256)))
            assert await c.close_code() == 4005


@pytest.mark.parametrize("how", ["admin", "replaced", "idle"])
async def test_ended_on_purpose_does_not_come_back(tmp_path: Path, how: str) -> None:
    limits: dict[str, Any] = {}
    if how == "replaced":
        limits = {"per_vm_policy": "replace"}
    if how == "idle":
        limits = {"idle_timeout_seconds": 0.5}
    async with running_proxy(tmp_path, limits=limits) as p, tcp_server(echo_backend) as port:
        async with opened(p.url(p.token(port=port)) + "&resume=1") as c:
            ticket = await c.ticket()
            if how == "admin":
                (session,) = list(p.server.registry)
                async with aiohttp.ClientSession(headers=p.admin_headers) as http, \
                        http.delete(f"{p.admin}/api/sessions/{session.id}") as r:
                    assert r.status in (200, 204)
                assert await c.close_code() == 4013
            elif how == "replaced":
                async with opened(p.url(p.token(port=port))):
                    assert await c.close_code() == 4013
            else:
                assert await c.close_code() == 4012
        assert await _refused(p, ticket) == (4005, "resume ticket already used")


async def test_drained_console_resumes_elsewhere_and_keeps_its_start(tmp_path: Path) -> None:
    ring = Keyring.generate()
    store = {"replay_store": f"sqlite:///{tmp_path}/replay.db"}
    drain = {"grace_seconds": 0, "deadline_seconds": 0.01}
    async with running_proxy(tmp_path / "a", ring, cluster=store, drain=drain) as a, \
            running_proxy(tmp_path / "b", ring, cluster=store) as b, tcp_server(echo_backend) as port:
        async with opened(a.url(a.token(port=port)) + "&resume=1") as c:
            ticket = await c.ticket()
            (first,) = list(a.server.registry)
            a.server.start_drain()
            assert await c.close_code() == 1001
        async with resumed(b, ticket, after=1001) as again:
            await connect_echo(again)
            (moved,) = list(b.server.registry)
            assert moved.started == int(first.started)  # lifetime counts from the first start


async def test_resume_off_sends_no_ticket_and_refuses_resumes(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, resume={"window_seconds": 0}) as p, tcp_server(echo_backend) as port:
        async with opened(p.url(p.token(port=port)) + "&resume=1") as c:
            await _echo(c, b"x")
            assert c.tickets == []
        body = TicketBody(sid="x", gen=0, host="127.0.0.1", port=port, vm="vm-1", started=int(time.time()))
        code, _ = await _refused(p, _ticket(body, exp=int(time.time()) + 60, ring=p.keyring))
        assert code == 4001  # no token, and resume is not on


async def test_tickets_are_refreshed_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_proxy(tmp_path, resume={"window_seconds": 1}) as p, tcp_server(echo_backend) as port:
        async with opened(p.url(p.token(port=port)) + "&resume=1") as c:
            first = await c.ticket()
            refreshed = await c.next_ticket(timeout=10)  # a third of the window later
            assert refreshed != first
            c.cut()
        async with resumed(p, refreshed) as again:
            await connect_echo(again)
            latest = await again.ticket()
        await _refused(p, refreshed)
    seen = [first, refreshed, latest]
    for record in caplog.records:
        line = record.getMessage()
        assert not any(t in line or t.split(".")[-1][:40] in line for t in seen), line


async def test_a_resume_that_could_not_reach_the_vnc_server_can_be_retried(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, limits={"connect_timeout_seconds": 2}) as p:
        port = free_port(20000, 40000)  # nothing listens there yet: 4010
        body = TicketBody(sid="y", gen=0, host="127.0.0.1", port=port, vm="vm-1", started=int(time.time()))
        ticket = _ticket(body, exp=int(time.time()) + 60, ring=p.keyring)
        code, _ = await _refused(p, ticket)
        assert code == 4010
        # the VNC server is back: the same ticket resumes (it was not spent on the failure)
        server = await asyncio.start_server(echo_backend, "127.0.0.1", port)
        try:
            async with resumed(p, ticket) as again:
                await connect_echo(again)
        finally:
            server.close()


async def test_lifetime_counts_from_the_first_start(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, limits={"max_lifetime_seconds": 60}) as p, \
            tcp_server(echo_backend) as port:
        # a console first opened an hour ago: its resume is over its lifetime at once
        body = TicketBody(sid="z", gen=0, host="127.0.0.1", port=port, vm="vm-1",
                          started=int(time.time()) - 3600)
        async with resumed(p, _ticket(body, exp=int(time.time()) + 60, ring=p.keyring)) as c:
            await connect_echo(c)
            given = await c.ticket()
            assert await c.close_code() == 4012
        # and the ticket that console was given does not bring it back
        assert await _refused(p, given) == (4005, "resume ticket already used")


async def test_cloudstack_console_resumes_with_its_session_uuid(tmp_path: Path) -> None:
    """CloudStack tokens: tickets sealed with the [tokens] keyring; the load report keeps the
    console's sessionUuid across the resume."""
    keys = CloudStackKeys.generate()
    (tmp_path / "keyiv.json").write_text(keys.dumps())
    sections: dict[str, Any] = {"tokens": {"format": "cloudstack"},
                                "cloudstack": {"key_iv_file": str(tmp_path / "keyiv.json")}}
    async with running_proxy(tmp_path, **sections) as p, tcp_server(echo_backend) as port:
        fields = {"clientHostAddress": "127.0.0.1", "clientHostPort": port, "clientTag": "vm-cs",
                  "sessionUuid": "5f0c-uuid"}
        token = quote(encrypt_gcm(keys, fields), safe="")
        async with opened(p.url(token) + "&resume=1") as c:
            ticket = await c.ticket()
            c.cut()
        async with resumed(p, ticket) as again:
            await connect_echo(again)
            (session,) = list(p.server.registry)
            assert session.session_uuid == "5f0c-uuid" and session.resume_gen == 1


def test_cloudstack_resume_needs_a_keyring_file(tmp_path: Path) -> None:
    keys = CloudStackKeys.generate()
    (tmp_path / "keyiv.json").write_text(keys.dumps())
    cfg = make_config(tmp_path, tokens={"format": "cloudstack"},
                      cloudstack={"key_iv_file": str(tmp_path / "keyiv.json")})
    assert ProxyServer(cfg).resume_keyring is None  # no keys.json: off (a key of one process would not do)
    ring = Keyring.generate()
    ring.save(tmp_path / "keys.json")
    assert ProxyServer(cfg).resume_keyring == ring
    (tmp_path / "keys.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"\[tokens\] keyring \(for resume tickets\)"):
        ProxyServer(cfg)
