"""PROXY protocol on the public listener (consoleproxy/listener.py): raw headers, then real HAProxy.

The address the proxy checks and reports must be the one in the header (the browser's), never the
balancer's; a header is believed only from ``[listen] trusted_proxies``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import require_tool
from harness import (
    Proxy,
    RFBClient,
    connect_echo,
    echo_backend,
    expect_close,
    free_port,
    running_proxy,
    stop_program,
    tcp_server,
)
from test_limits import QUIET, client_hello, refused, reset_at_once, tcp

from consoleproxy.config import ConfigError, load_config
from consoleproxy.protocol.proxyproto import V2_SIGNATURE
from consoleproxy.tools.cli import main
from consoleproxy.tools.loadbalancer import Backend, haproxy_config

TRUST_LOCAL = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}


def v1(src: str, sport: int = 40000, dport: int = 443) -> bytes:
    return f"PROXY TCP4 {src} 127.0.0.1 {sport} {dport}\r\n".encode()


def v2(src: str | None, sport: int = 40000, dport: int = 443) -> bytes:
    if src is None:  # LOCAL: the balancer's own connection (health check)
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack(">H", 0)
    body = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack(">HH", sport, dport)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack(">H", len(body)) + body


def connected(p: Proxy, header: bytes, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10, source_address=(source, 0))
    s.sendall(header)
    return s


async def sessions(p: Proxy) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(headers=p.admin_headers) as http:
        async with http.get(p.admin + "/api/sessions") as r:
            body: dict[str, list[dict[str, Any]]] = await r.json()
            return body["sessions"]


async def console_via(p: Proxy, url: str, client_ip: str, **kw: Any) -> None:
    """A console that must work; the admin API must report ``client_ip`` for it."""
    async with RFBClient.connect(url, **kw) as c:
        await connect_echo(c)
        assert [s["client_ip"] for s in await sessions(p)] == [client_ip]


async def test_v1_header_plain_http(tmp_path: Path) -> None:
    async with (
        running_proxy(tmp_path, health=QUIET, listen=TRUST_LOCAL) as p,
        tcp_server(echo_backend) as port,
    ):
        token = p.token(port=port, client_ip="198.51.100.7")
        await console_via(p, p.url(token), "198.51.100.7", sock=connected(p, v1("198.51.100.7")))
        # the token's client-IP binding is checked against the header's address
        other = p.token(port=port, client_ip="127.0.0.1")
        async with RFBClient.connect(p.url(other), sock=connected(p, v1("198.51.100.7"))) as c:
            assert await c.close_code() == 4004
        # header and request in one segment: nothing past the header may be lost
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        s = connected(p, v1("198.51.100.8") + request)
        reply = await asyncio.to_thread(s.recv, 4096)
        s.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply
        # a file response (the console page) through the client-address transport
        page = b"GET /console?token=x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        r, w = await asyncio.open_connection(sock=connected(p, v1("198.51.100.8") + page))
        body = await asyncio.wait_for(r.read(), 10)
        w.close()
        assert body.startswith(b"HTTP/1.1 200") and b"</html>" in body.lower(), body[:200]


def _tls_in_one_segment(port: int, header: bytes, ca: ssl.SSLContext, request: bytes) -> bytes:
    """PROXY header and ClientHello in one send, as HAProxy does; then one request over TLS."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ca.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        s.sendall(header + outgoing.read())
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(outgoing.read())
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed during the TLS handshake") from None
                incoming.write(data)
        tls.write(request)
        s.sendall(outgoing.read())
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = s.recv(65536)
            if not data:
                break
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                reply += tls.read(65536)
        return reply


async def test_v2_header_then_tls(tmp_path: Path) -> None:
    async with (
        running_proxy(tmp_path, health=QUIET, listen={"tls": True, **TRUST_LOCAL}) as p,
        tcp_server(echo_backend) as port,
    ):
        token = p.token(port=port, client_ip="203.0.113.9")
        await console_via(p, p.url(token), "203.0.113.9", sock=connected(p, v2("203.0.113.9")))
        ca = p.client_ssl
        assert ca is not None
        reply = await asyncio.to_thread(
            _tls_in_one_segment, p.port, v2("203.0.113.10"), ca,
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply
        # keep-alive: the page and a large noVNC module (past the write buffer's high-water mark)
        r, w = await asyncio.open_connection(sock=connected(p, v2("203.0.113.11")), ssl=ca,
                                             server_hostname="127.0.0.1")
        for path in ("/console?token=x", "/novnc/core/rfb.js", "/console?token=y"):
            w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            async with asyncio.timeout(10):
                head = await r.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), (path, head)
                length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                              if h.lower().startswith(b"content-length:"))
                await r.readexactly(length)
        w.close()
        # a LOCAL header (the balancer's health check) keeps the balancer's own address
        reply = await asyncio.to_thread(
            _tls_in_one_segment, p.port, v2(None), ca, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply


async def test_untrusted_source_and_missing_header_are_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "consoleproxy.listener")
    listen = {"tls": True, "proxy_protocol": True, "trusted_proxies": ["127.0.0.2/32"]}
    async with running_proxy(tmp_path, health=QUIET, listen=listen) as p:
        # 127.0.0.1 is not a trusted balancer: closed even with a well-formed header
        assert await reset_at_once(p, "127.0.0.1", v2("198.51.100.1"))
        assert refused(p, "untrusted_proxy") == 1
        assert "from 127.0.0.1: PROXY protocol is on and it is not in [listen] trusted_proxies" in caplog.text
        # from the trusted balancer, but a TLS ClientHello where the header should be
        assert await reset_at_once(p, "127.0.0.2", client_hello())
        assert refused(p, "proxy_header") == 1
        assert "did not start with a PROXY protocol header" in caplog.text
        # the trusted balancer with a header is served
        ca = p.client_ssl
        assert ca is not None
        s = connected(p, v2("198.51.100.1"), "127.0.0.2")
        r, w = await asyncio.open_connection(sock=s, ssl=ca, server_hostname="127.0.0.1")
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await r.readline()).startswith(b"HTTP/1.1 200")
        w.close()


async def _open(p: Proxy, data: bytes, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await tcp(p, source)
    w.write(data)
    return r, w


async def test_rate_limit_uses_the_headers_address(tmp_path: Path) -> None:
    lim = {"connections_per_ip_per_second": 0.01, "connection_burst": 2}
    async with running_proxy(tmp_path, health=QUIET, listen=TRUST_LOCAL, limits=lim) as p:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

        async def status(src: str) -> bytes:
            r, w = await _open(p, v1(src) + request, "127.0.0.1")
            try:
                async with asyncio.timeout(10):
                    return await r.readline()
            except ConnectionResetError:
                return b""
            finally:
                w.close()

        assert (await status("198.51.100.1")).startswith(b"HTTP/1.1 200")
        assert (await status("198.51.100.1")).startswith(b"HTTP/1.1 200")
        assert await status("198.51.100.1") == b"", "third from the same client within the burst of 2"
        assert refused(p, "rate") == 1
        # same balancer connection source, another client: its own bucket
        assert (await status("198.51.100.2")).startswith(b"HTTP/1.1 200")


def test_proxy_protocol_needs_trusted_proxies() -> None:
    with pytest.raises(ConfigError, match="proxy_protocol needs trusted_proxies"):
        load_config(env={"CONSOLEPROXY_LISTEN_PROXY_PROTOCOL": "true"})
    cfg = load_config(env={"CONSOLEPROXY_LISTEN_PROXY_PROTOCOL": "true",
                           "CONSOLEPROXY_LISTEN_TRUSTED_PROXIES": "10.0.0.0/8"})
    assert cfg.listen.proxy_protocol and cfg.listen.trusted_proxies == ["10.0.0.0/8"]


# --- real HAProxy, mode tcp, send-proxy-v2 ------------------------------------------------------


@contextlib.asynccontextmanager
async def haproxy_in_front(tmp_path: Path, p: Proxy) -> AsyncIterator[int]:
    """HAProxy (the generator's passthrough layout) in front of ``p``; yields its frontend port.

    Ready when HAProxy's own health check (PROXY v2 + TLS + GET /readyz) passes: its stats CSV
    shows the server UP with L7OK, which proves the check goes through the PROXY listener too.
    """
    binary = require_tool("haproxy", "haproxy")
    front, stats = free_port(20000, 25000), free_port(25001, 30000)
    cfg = haproxy_config(
        fqdn="console.consoleproxy.local",
        backends=[Backend("127.0.0.1", p.port)],
        bind=f"127.0.0.1:{front}",
        check_interval_ms=300,
        stats_bind=f"127.0.0.1:{stats}",
    )
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    log = (tmp_path / "haproxy.log").open("w")
    # spawning does not block; the wait to stop it goes through to_thread
    proc = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=log, stderr=log)  # noqa: ASYNC220
    try:
        row: dict[str, str] = {}
        async with asyncio.timeout(20), aiohttp.ClientSession() as http:
            while not (row.get("status") == "UP" and row.get("check_status") == "L7OK"):
                assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
                await asyncio.sleep(0.1)
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{stats}/stats;csv") as r:
                        lines = (await r.text()).lstrip("# ").splitlines()
                    names = lines[0].split(",")
                    rows = [dict(zip(names, line.split(","), strict=False)) for line in lines[1:]]
                    row = next((x for x in rows if x.get("svname") == "proxy1"), {})
        yield front
    finally:
        await asyncio.to_thread(stop_program, proc)
        log.close()


def cli_token(keys: Path, port: int, client_ip: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["token", "issue", "--host", "127.0.0.1", "--port", str(port), "--vm", "vm-lb",
                 "--client-ip", client_ip, "--keys", str(keys)]) == 0
    return capsys.readouterr().out.strip()


@pytest.mark.integration
async def test_haproxy_send_proxy_v2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with (
        running_proxy(tmp_path, health=QUIET, listen={"tls": True, **TRUST_LOCAL}) as p,
        tcp_server(echo_backend) as port,
        haproxy_in_front(tmp_path, p) as front,
    ):
        keys = tmp_path / "keys.json"
        p.keyring.save(keys)
        url = f"wss://127.0.0.1:{front}/websockify?token="
        # the browser at 127.0.0.2; HAProxy connects to the proxy from 127.0.0.1
        ok = cli_token(keys, port, "127.0.0.2", capsys)
        await console_via(p, url + ok, "127.0.0.2", local_addr=("127.0.0.2", 0))
        # a token bound to another address is refused, though HAProxy's own address differs too
        for bound in ("127.0.0.3", "127.0.0.1"):
            other = cli_token(keys, port, bound, capsys)
            async with RFBClient.connect(url + other, local_addr=("127.0.0.2", 0)) as c:
                assert await c.close_code() == 4004, bound
                assert "client" in c.close_reason.lower() or "address" in c.close_reason.lower()
        code, _ = await expect_close(url + "not-a-token", timeout=10)
        assert code == 4001
        for reason in ("proxy_header", "untrusted_proxy", "tls", "head_timeout"):
            assert refused(p, reason) == 0, reason  # HAProxy's checks and consoles all got through


async def test_local_header_from_this_machine_without_trust(tmp_path: Path) -> None:
    """The proxy's own health check: loopback, a LOCAL header, no address claimed, so no trust needed."""
    listen = {"tls": True, "proxy_protocol": True, "trusted_proxies": ["192.0.2.1/32"]}
    async with running_proxy(tmp_path, health=QUIET, listen=listen) as p:
        ca = p.client_ssl
        assert ca is not None
        s = connected(p, v2(None))
        r, w = await asyncio.open_connection(sock=s, ssl=ca, server_hostname="127.0.0.1")
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await r.readline()).startswith(b"HTTP/1.1 200")
        w.close()
        # the same machine claiming a client address is not a balancer we trust
        assert await reset_at_once(p, "127.0.0.1", v2("198.51.100.1"))
        assert refused(p, "untrusted_proxy") == 1
        # and the built-in TLS health check speaks that LOCAL header
        from consoleproxy.web.health import HealthRunner

        results = {r.name: r for r in await HealthRunner(p.server).run("advanced")}
        assert results["tls_handshake_check"].success, results["tls_handshake_check"].message


async def test_a_failed_tls_handshake_is_the_tls_refusal(tmp_path: Path) -> None:
    """Plain HTTP on the TLS port fails the handshake (tlstransport): counted as "tls", the
    connection closed and its handshake slot freed; a client gone mid-handshake is not counted."""
    async with running_proxy(tmp_path, health=QUIET, listen={"tls": True}) as p:
        r, w = await tcp(p)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            while await r.read(65536):
                pass  # (a TLS alert, at most) until the proxy closes
        w.close()
        async with asyncio.timeout(10):
            while refused(p, "tls") != 1 or sum(s.gate.in_progress for s in p.server._sites):
                await asyncio.sleep(0.02)
        r, w = await tcp(p)
        w.write(client_hello()[:20])  # half a ClientHello, then gone
        w.close()
        # a request afterwards still works over TLS (accepted after the half handshake), and
        # once no handshake is left in progress nothing more was counted
        async with aiohttp.ClientSession() as http:
            async with http.get(p.http_base + "/healthz", ssl=p.client_ssl) as resp:
                assert resp.status == 200
        async with asyncio.timeout(10):
            while sum(s.gate.in_progress for s in p.server._sites):
                await asyncio.sleep(0.02)
        assert refused(p, "tls") == 1
