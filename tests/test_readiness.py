"""/readyz says 503 at the configured capacity, before max_sessions refuses consoles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from harness import RFBClient, connect_echo, echo_backend, running_proxy, tcp_server


async def _ready(url: str) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.json()


async def test_unready_at_sessions(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, limits={"unready_at_sessions": 2, "max_sessions": 5}) as p, \
            tcp_server(echo_backend) as port:
        ready = f"{p.http_base}/readyz"
        async with RFBClient.connect(p.url(p.token(port=port, vm="a"))) as a:
            await connect_echo(a)
            assert (await _ready(ready))[0] == 200
            async with RFBClient.connect(p.url(p.token(port=port, vm="b"))) as b:
                await connect_echo(b)
                status, body = await _ready(ready)
                assert status == 503 and body["reason"] == "at capacity"
                # not ready is not refusing: a console that still arrives is served
                async with RFBClient.connect(p.url(p.token(port=port, vm="c"))) as c:
                    await connect_echo(c)
        # wait for the server to see the consoles end, then ready again
        async with asyncio.timeout(5):
            while len(p.server.registry):
                await asyncio.sleep(0.02)
        assert (await _ready(ready))[0] == 200
