"""The console path end to end on loopback: upgrade, token, limits, RFB handshake, relay."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import aiohttp
import harness
import pytest
from harness import (
    RFBClient,
    connect_echo,
    echo_backend,
    expect_close,
    free_port,
    rfb38_none_handshake,
    running_proxy,
    tcp_server,
)
from websockets.exceptions import ConnectionClosed

from consoleproxy.net import vncconn
from consoleproxy.protocol.rfb import vnc_auth_response


@pytest.fixture(autouse=True, params=["plain", "tls"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every console-path test runs over plain WebSocket and over TLS (dev CA trusted)."""
    monkeypatch.setattr(harness, "TLS_BY_DEFAULT", request.param == "tls")
    return str(request.param)


async def test_echo_round_trip_and_subprotocols(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        # noVNC >= 1.2 offers no subprotocol; older noVNC offers "binary". Both must work.
        for subprotocols in (None, ["binary"]):
            async with RFBClient.connect(p.url(p.token(port=port)), subprotocols=subprotocols) as c:
                assert c.ws.subprotocol == (subprotocols[0] if subprotocols else None)
                await connect_echo(c)
                await c.send(b"hello")
                assert await c.read_exact(5) == b"hello"


async def test_byte_exact_256_mib_each_way(tmp_path: Path) -> None:
    total = 256 * 1024 * 1024
    chunk = 1024 * 1024
    seed = os.urandom(chunk)
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            await connect_echo(c)
            sent_hash = hashlib.sha256()
            got_hash = hashlib.sha256()

            async def send_all() -> None:
                for i in range(total // chunk):
                    # vary the data so a reordering or a dropped chunk changes the hash
                    block = i.to_bytes(4, "big") + seed[4:]
                    sent_hash.update(block)
                    await c.send(block)

            async def recv_all() -> None:
                got = len(c.buf)
                got_hash.update(bytes(c.buf))
                c.buf.clear()
                while got < total:
                    msg = await c.ws.recv()
                    assert isinstance(msg, bytes)
                    got_hash.update(msg)
                    got += len(msg)
                assert got == total

            async with asyncio.timeout(240):
                await asyncio.gather(send_all(), recv_all())
            assert got_hash.hexdigest() == sent_hash.hexdigest()
            s = next(iter(p.server.registry))
            # the counters also hold ClientInit (1 byte up) and the echo server's ServerInit (28 down)
            assert s.bytes_up == total + 1 and s.bytes_down == total + 28


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_backpressure_bounds_memory(tmp_path: Path) -> None:
    """A browser that stops reading while the VNC server floods must not make the proxy buffer."""
    sent = 0
    flood_done = asyncio.Event()

    async def flood(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        await rfb38_none_handshake(r, w)
        w.write(struct.pack(">HH", 8, 8) + bytes(16) + b"\0\0\0\0")
        block = os.urandom(256 * 1024)
        try:
            for _ in range(4096):  # up to 1 GiB
                w.write(block)
                await w.drain()
                sent += len(block)
        finally:
            flood_done.set()

    async with running_proxy(tmp_path) as p, tcp_server(flood) as port:
        async with RFBClient.connect(p.url(p.token(port=port)), max_queue=1) as c:
            await c.handshake()
            rss_before = _rss_bytes()
            # Stop reading. Wait until the flood stalls: `sent` stops growing for a second.
            last = -1
            async with asyncio.timeout(60):
                while sent != last and not flood_done.is_set():
                    last = sent
                    await asyncio.sleep(1.0)
            growth = _rss_bytes() - rss_before
            # Unbounded buffering would take the whole 1 GiB; kernel socket buffers on loopback
            # (two TCP connections, both directions) account for most of what is in flight.
            assert sent < 64 * 1024 * 1024, f"{sent} bytes left the VNC server: proxy buffers"
            assert growth < 64 * 1024 * 1024, f"proxy RSS grew by {growth} bytes"


async def test_token_errors_close_codes(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, tokens={"skew_seconds": 0}) as p, tcp_server(echo_backend) as port:
        good = p.token(port=port)
        tampered = good[:-3] + ("A" if good[-3] != "A" else "B") + good[-2:]
        assert (await expect_close(p.url(tampered)))[0] == 4001
        assert (await expect_close(p.url("").partition("?")[0]))[0] == 4001
        assert (await expect_close(p.url("not-a-token")))[0] == 4001
        assert (await expect_close(p.url(p.token(port=port, ttl=1, now=0))))[0] == 4002
        async with RFBClient.connect(p.url(good)) as c:
            await connect_echo(c)
        code, reason = await expect_close(p.url(good))
        assert code == 4003, reason
        bound = p.token(port=port, client_ip="192.0.2.1")
        code, reason = await expect_close(p.url(bound))
        assert code == 4004 and "client address" in reason
        metrics = p.server.metrics.render().decode()
        assert 'consoleproxy_token_rejections_total{reason="token expired"} 1.0' in metrics


async def test_target_outside_allowlist_makes_no_connection(tmp_path: Path) -> None:
    connected = asyncio.Event()

    async def listener(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connected.set()

    async with running_proxy(tmp_path, targets={"allowed_cidrs": ["10.0.0.0/8"]}) as p:
        async with tcp_server(listener) as port:
            code, reason = await expect_close(p.url(p.token(port=port)))
            assert code == 4004 and "outside" in reason
            assert not connected.is_set()


async def test_closed_port_is_4010(tmp_path: Path) -> None:
    port = free_port()
    async with running_proxy(tmp_path, limits={"connect_timeout_seconds": 2}) as p:
        code, reason = await expect_close(p.url(p.token(port=port)))
        assert code == 4010 and str(port) in reason


async def test_connect_timeout_is_4010(tmp_path: Path) -> None:
    # 192.0.2.0/24 (TEST-NET-1) is never routed; a SYN there gets no answer, so the connect
    # timeout fires. Nothing reaches the network: the kernel has no route, or the packet dies.
    async with running_proxy(
        tmp_path,
        limits={"connect_timeout_seconds": 0.5},
        targets={"allowed_cidrs": ["192.0.2.0/24"]},
    ) as p:
        code, _ = await expect_close(p.url(p.token(host="192.0.2.1", port=5900)), timeout=5)
        assert code == 4010


async def test_wrong_vnc_password_is_4011_with_server_reason(tmp_path: Path) -> None:
    from consoleproxy.tools.demo import DemoVncServer

    vnc = DemoVncServer(password="right")
    await vnc.start()
    try:
        async with running_proxy(tmp_path) as p:
            code, reason = await expect_close(p.url(p.token(port=vnc.port, password="wrong")))
            assert code == 4011
            assert "Authentication failed" in reason
    finally:
        await vnc.close()


async def test_demo_server_through_proxy_and_input(tmp_path: Path) -> None:
    from consoleproxy.tools.demo import DemoVncServer

    vnc = DemoVncServer()
    await vnc.start()
    try:
        async with running_proxy(tmp_path) as p:
            token = p.token(port=vnc.port, password=vnc.password)
            async with RFBClient.connect(p.url(token)) as c:
                await c.handshake()
                assert (c.width, c.height) == (720, 400)
                assert c.name == b"consoleproxy demo"
                await c.request_update()
                pixels = await c.read_raw_update()
                assert len(set(pixels[i : i + 4] for i in range(0, len(pixels), 4))) > 1
                await c.send(struct.pack(">BBxxI", 4, 1, 0x61))  # KeyEvent 'a' down
                await c.send(struct.pack(">BBHH", 5, 1, 10, 20))  # PointerEvent
                await vnc.wait_for_events(lambda evs: len(evs) >= 2, timeout=10)
    finally:
        await vnc.close()


async def test_view_only_drops_input(tmp_path: Path) -> None:
    from consoleproxy.tools.demo import DemoVncServer

    vnc = DemoVncServer()
    await vnc.start()
    try:
        async with running_proxy(tmp_path) as p:
            token = p.token(port=vnc.port, password=vnc.password, view_only=True)
            async with RFBClient.connect(p.url(token)) as c:
                await c.handshake()
                await c.send(struct.pack(">BBxxI", 4, 1, 0x61))  # KeyEvent: dropped
                await c.send(struct.pack(">BBHH", 5, 1, 10, 20))  # PointerEvent: dropped
                # A FramebufferUpdateRequest passes; its answer proves the earlier messages
                # were processed (or dropped) in order.
                await c.request_update()
                await c.read_raw_update()
                assert vnc.events == []
    finally:
        await vnc.close()


async def test_rfb_33_server_with_vnc_auth(tmp_path: Path) -> None:
    challenge = bytes(range(16))

    async def server33(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"RFB 003.003\n")
        assert await r.readexactly(12) == b"RFB 003.003\n"
        w.write(struct.pack(">I", 2) + challenge)
        ok = await r.readexactly(16) == vnc_auth_response("pw33", challenge)
        w.write(struct.pack(">I", 0 if ok else 1))
        if not ok:
            return
        await r.readexactly(1)
        w.write(struct.pack(">HH", 10, 10) + bytes(16) + struct.pack(">I", 2) + b"33")
        while data := await r.read(1024):
            w.write(data)

    async with running_proxy(tmp_path) as p, tcp_server(server33) as port:
        async with RFBClient.connect(p.url(p.token(port=port, password="pw33"))) as c:
            await c.handshake()
            assert c.name == b"33"
        code, _ = await expect_close(p.url(p.token(port=port, password="bad")))
        assert code == 4011


async def test_idle_timeout_spares_active_and_closes_idle(tmp_path: Path) -> None:
    async with (
        running_proxy(tmp_path, limits={"idle_timeout_seconds": 1.0}) as p,
        tcp_server(echo_backend) as port,
    ):
        async with (
            RFBClient.connect(p.url(p.token(port=port))) as busy,
            RFBClient.connect(p.url(p.token(port=port))) as idle,
        ):
            await connect_echo(busy)
            await connect_echo(idle)
            idle_closed = asyncio.ensure_future(idle.close_code(timeout=10))
            # Traffic every 0.2 s on `busy` until `idle` is closed, and for at least 3 idle periods.
            rounds = 0
            while rounds < 15 or not idle_closed.done():
                await busy.send(b"x")
                assert await busy.read_exact(1) == b"x"
                await asyncio.sleep(0.2)
                rounds += 1
                assert rounds < 100, "idle console never closed"
            assert idle_closed.result() == 4012
            await busy.send(b"y")
            assert await busy.read_exact(1) == b"y"


async def test_lifetime_from_token(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port, max_duration=1))) as c:
            await connect_echo(c)
            assert await c.close_code(timeout=10) == 4012
            assert "lifetime" in c.close_reason


async def test_limits_and_policies(tmp_path: Path) -> None:
    async with (
        running_proxy(tmp_path, limits={"max_sessions": 2, "per_vm_policy": "share"}) as p,
        tcp_server(echo_backend) as port,
    ):
        async with (
            RFBClient.connect(p.url(p.token(port=port, vm="a"))) as a,
            RFBClient.connect(p.url(p.token(port=port, vm="b"))) as b,
        ):
            await connect_echo(a)
            await connect_echo(b)
            code, reason = await expect_close(p.url(p.token(port=port, vm="c")))
            assert code == 4008 and "limit of 2" in reason
            ready = await aiohttp_get(p.http_base + "/readyz")
            assert ready[0] == 503 and ready[1]["reason"] == "at capacity"

    async with (
        running_proxy(tmp_path, limits={"per_vm_policy": "replace"}) as p,
        tcp_server(echo_backend) as port,
    ):
        async with RFBClient.connect(p.url(p.token(port=port, vm="x"))) as old:
            await connect_echo(old)
            async with RFBClient.connect(p.url(p.token(port=port, vm="x"))) as new:
                await connect_echo(new)
                assert await old.close_code() == 4013
                await new.send(b"z")
                assert await new.read_exact(1) == b"z"

    async with (
        running_proxy(tmp_path, limits={"per_vm_policy": "reject"}) as p,
        tcp_server(echo_backend) as port,
    ):
        async with RFBClient.connect(p.url(p.token(port=port, vm="x"))) as first:
            await connect_echo(first)
            assert (await expect_close(p.url(p.token(port=port, vm="x"))))[0] == 4008

    async with (
        running_proxy(tmp_path, limits={"max_sessions_per_client_ip": 1}) as p,
        tcp_server(echo_backend) as port,
    ):
        async with RFBClient.connect(p.url(p.token(port=port, vm="1"))) as first:
            await connect_echo(first)
            code, reason = await expect_close(p.url(p.token(port=port, vm="2")))
            assert code == 4008 and "client 127.0.0.1" in reason


async def aiohttp_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    ctx = harness._client_ssl if url.startswith("https:") else None
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers, ssl=ctx or True) as r:
        return r.status, await r.json()


async def test_admin_list_kill_metrics_and_audit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="consoleproxy.audit")
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        token = p.token(port=port, password="s3cr3t-pw", vm="vm-42")
        async with RFBClient.connect(p.url(token)) as c:
            await connect_echo(c)
            await c.send(b"12345")
            assert await c.read_exact(5) == b"12345"

            status, _ = await aiohttp_get(p.admin + "/api/sessions")
            assert status == 401
            status, body = await aiohttp_get(p.admin + "/api/sessions", p.admin_headers)
            assert status == 200
            (info,) = body["sessions"]  # type: ignore[misc]
            assert info["vm"] == "vm-42" and info["target"] == f"127.0.0.1:{port}"

            async with aiohttp.ClientSession(headers=p.admin_headers) as http:
                async with http.delete(p.admin + "/api/sessions/nope") as r:
                    assert r.status == 404
                async with http.delete(p.admin + f"/api/sessions/{info['id']}") as r:
                    assert r.status == 200
            assert await c.close_code() == 4013

        async with aiohttp.ClientSession(headers=p.admin_headers) as http:
            async with http.get(p.admin + "/metrics") as r:
                text = await r.text()
        assert "consoleproxy_sessions_active 0.0" in text
        assert 'consoleproxy_sessions_total{result="killed"} 1.0' in text
        # Relayed after the security handshake: ClientInit (1) + 5 bytes up; ServerInit (28) + 5 down
        assert 'consoleproxy_bytes_total{direction="up"} 6.0' in text
        assert 'consoleproxy_bytes_total{direction="down"} 33.0' in text
        assert "consoleproxy_backend_connect_seconds_count 1.0" in text

    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "consoleproxy.audit"]
    assert [r["event"] for r in records] == ["session_start", "session_end"]
    assert records[1]["vm"] == "vm-42" and records[1]["result"] == "ended by an administrator"
    everything = caplog.text
    assert "s3cr3t-pw" not in everything and token not in everything


async def test_healthz_and_admin_not_on_public(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p:
        status, body = await aiohttp_get(p.http_base + "/healthz")
        assert status == 200 and body == {"status": "ok"}
        status, body = await aiohttp_get(p.http_base + "/readyz")
        assert status == 200
        async with aiohttp.ClientSession() as http:
            for path in ("/metrics", "/api/sessions"):
                async with http.get(
                    p.http_base + path, headers=p.admin_headers, ssl=p.client_ssl or True
                ) as r:
                    assert r.status == 404


async def test_oversized_client_message_closes_only_that_session(tmp_path: Path) -> None:
    async with (
        running_proxy(tmp_path, limits={"max_client_message_bytes": 65536}) as p,
        tcp_server(echo_backend) as port,
    ):
        async with (
            RFBClient.connect(p.url(p.token(port=port, vm="a"))) as big,
            RFBClient.connect(p.url(p.token(port=port, vm="b"))) as other,
        ):
            await connect_echo(big)
            await connect_echo(other)
            await big.send(bytes(65537))
            assert await big.close_code() == 1009
            await other.send(b"still")
            assert await other.read_exact(5) == b"still"


async def test_cloudstack_getstatus_load_report(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port, vm="vm-uuid-1"))) as c:
            await connect_echo(c)
            status, body = await aiohttp_get(p.admin + "/cmd/getstatus", p.admin_headers)
            assert status == 200
            (conn,) = body["connections"]  # type: ignore[misc]
            assert set(conn) == {
                "id",
                "clientInfo",
                "host",
                "port",
                "tag",
                "createTime",
                "lastUsedTime",
                "sessionUuid",
            }
            assert (conn["host"], conn["port"], conn["tag"]) == ("127.0.0.1", port, "vm-uuid-1")
            assert conn["clientInfo"] == "127.0.0.1"
            assert conn["lastUsedTime"] >= conn["createTime"] > 1_600_000_000_000
            assert body["removedSessions"] == []
        async with asyncio.timeout(10):
            while len(p.server.registry):
                await asyncio.sleep(0.02)
        status, body = await aiohttp_get(p.admin + "/cmd/getstatus", p.admin_headers)
        assert body == {"connections": [], "removedSessions": [conn["sessionUuid"]]}
        # reported once
        status, body = await aiohttp_get(p.admin + "/cmd/getstatus", p.admin_headers)
        assert body["removedSessions"] == []


async def test_special_targets_refused_even_inside_a_wide_allowlist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0.0.0.0/0 does not open loopback or the metadata service: 4004, and no connect attempted."""
    attempts: list[object] = []
    real_open = vncconn.open_connection

    async def spy(host: str, port: int) -> vncconn.VNCConnection:
        attempts.append(host)
        return await real_open(host, port)

    monkeypatch.setattr(vncconn, "open_connection", spy)
    connected = asyncio.Event()

    async def listener(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connected.set()

    wide = {"allowed_cidrs": ["0.0.0.0/0"], "ports": "1-65535"}
    async with running_proxy(tmp_path, targets=wide) as p, tcp_server(listener) as port:
        for host in ("127.0.0.1", "169.254.169.254"):
            code, reason = await expect_close(p.url(p.token(host=host, port=port)))
            assert code == 4004 and "loopback, link-local" in reason, (host, reason)
        assert attempts == [] and not connected.is_set()


async def test_huge_desktop_name_refused_before_relaying(tmp_path: Path) -> None:
    """A VNC server announcing a 4 GiB name: the browser gets a protocol error, not the buffering."""

    async def huge_name(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await rfb38_none_handshake(r, w)
        w.write(struct.pack(">HH", 64, 32) + bytes(16) + struct.pack(">I", 0xFFFFFFFF) + b"x" * 1000)
        await w.drain()
        await r.read()

    async with running_proxy(tmp_path) as p, tcp_server(huge_name) as port:
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            with pytest.raises(ConnectionClosed):
                await c.handshake()  # ServerInit never reaches the browser
            assert await c.close_code() == 1002
            assert "desktop name is 4294967295 bytes" in c.close_reason


LANG1_PRESS = struct.pack(">BBHII", 255, 0, 1, 0xFF31, 0x72)
LANG1_RELEASE = struct.pack(">BBHII", 255, 0, 0, 0xFF31, 0x72)
LANG2_RELEASE = struct.pack(">BBHII", 255, 0, 0, 0xFF34, 0x71)
A_PRESS = struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E)
A_RELEASE = struct.pack(">BBHII", 255, 0, 0, 0x61, 0x1E)


@pytest.mark.parametrize(
    ("config", "claim", "dropped"),
    [
        (None, None, False),  # the default is "send"
        ("drop", None, True),
        ("send", "drop", True),  # the token's claim overrides [input]
        ("drop", "send", False),
    ],
)
async def test_lang_key_release_option_and_claim(
    tmp_path: Path, config: str | None, claim: str | None, dropped: bool
) -> None:
    sections = {"input": {"lang_key_release": config}} if config else {}
    async with running_proxy(tmp_path, **sections) as p, tcp_server(echo_backend) as port:
        token = p.token(port=port, **({"lang_key_release": claim} if claim else {}))
        async with RFBClient.connect(p.url(token)) as c:
            await connect_echo(c)
            sent = LANG1_PRESS + LANG1_RELEASE + A_PRESS + A_RELEASE + LANG2_RELEASE
            # Split inside the messages: the proxy frames across WebSocket messages.
            for i in range(0, len(sent), 7):
                await c.send(sent[i : i + 7])
            await c.send(A_PRESS)  # a marker: everything before it has been filtered
            want = LANG1_PRESS + A_PRESS + A_RELEASE if dropped else sent
            assert await c.read_exact(len(want) + len(A_PRESS)) == want + A_PRESS
