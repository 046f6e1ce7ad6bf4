"""Cross-site WebSocket hijacking (nova's CVE-2015-0259): only the console's own origin may connect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import require_tool
from harness import RFBClient, connect_echo, echo_backend, expect_close, running_proxy, tcp_server
from playwright.async_api import async_playwright


async def test_origins(tmp_path: Path) -> None:
    connections = 0

    async def counting_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await echo_backend(r, w)

    async with (
        running_proxy(tmp_path, origin={"allowed": ["https://Portal.Example.com/"]}) as p,
        tcp_server(counting_echo) as port,
    ):
        own = f"http://127.0.0.1:{p.port}"
        for ok in (
            None,
            own,
            f"http://127.0.0.1:{p.port + 1}",
            "https://portal.example.com",
            f"https://127.0.0.1:{p.port}",
        ):
            async with RFBClient.connect(p.url(p.token(port=port)), origin=ok) as c:
                await connect_echo(c)
        assert connections == 5
        for bad in ("https://evil.example", "http://127.0.0.2", "null", "https://127.0.0.1.evil.example"):
            code, reason = await _close_with_origin(p.url(p.token(port=port)), bad)
            assert code == 4004 and "origin" in reason, bad
        assert connections == 5, "a refused origin must not reach the hypervisor"

    async with (
        running_proxy(tmp_path, listen={"tls": True}, origin={"allow_missing": False}) as p,
        tcp_server(echo_backend) as port,
    ):
        code, reason = await expect_close(p.url(p.token(port=port)))
        assert code == 4004 and "Origin header is required" in reason
        # over TLS the page is https: an http origin on the same host is not ours
        code, _ = await _close_with_origin(p.url(p.token(port=port)), f"http://127.0.0.1:{p.port}")
        assert code == 4004
        async with RFBClient.connect(p.url(p.token(port=port)), origin=f"https://127.0.0.1:{p.port}") as c:
            await connect_echo(c)


async def _close_with_origin(url: str, origin: str) -> tuple[int | None, str]:
    async with RFBClient.connect(url, origin=origin) as c:
        code = await c.close_code()
        return code, c.close_reason


WS_PROBE = """([url]) => new Promise((resolve) => {
    const ws = new WebSocket(url, ['binary']);
    ws.binaryType = 'arraybuffer';
    ws.onmessage = (e) => { resolve({opened: true, first: new TextDecoder().decode(e.data)}); ws.close(); };
    ws.onclose = (e) => resolve({code: e.code, reason: e.reason});
})"""


@pytest.mark.integration
async def test_cross_origin_page_in_chromium(tmp_path: Path) -> None:
    from test_page import CHROMIUM_ARGS

    chromium = require_tool("chromium", "chromium")
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port, async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = await b.new_page()
            # A page on another origin (localhost is not 127.0.0.1 to a browser) with a stolen token
            await page.goto(f"http://localhost:{p.port}/healthz")
            result = await page.evaluate(WS_PROBE, [p.url(p.token(port=port))])
            assert result["code"] == 4004, result
            # The proper origin gets the RFB greeting
            await page.goto(f"http://127.0.0.1:{p.port}/healthz")
            result = await page.evaluate(WS_PROBE, [p.url(p.token(port=port))])
            assert result == {"opened": True, "first": "RFB 003.008\n"}, result
        finally:
            await b.close()
