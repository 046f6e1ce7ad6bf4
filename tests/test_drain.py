"""Graceful drain: readiness fails at once, grace period, refusal, deadline, clean exit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from harness import RFBClient, connect_echo, echo_backend, expect_close, running_proxy, tcp_server

from consoleproxy.policy.tokens import Keyring


async def _get(url: str, **kw: object) -> int:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as r:  # type: ignore[arg-type]
        return r.status


async def test_drain_sequence(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, drain={"grace_seconds": 1.0, "deadline_seconds": 3.0}) as p, \
            tcp_server(echo_backend) as port:
        ready = f"http://127.0.0.1:{p.port}/readyz"
        async with RFBClient.connect(p.url(p.token(port=port, vm="a"))) as running:
            await connect_echo(running)
            assert await _get(ready) == 200
            async with aiohttp.ClientSession(headers=p.admin_headers) as http, \
                    http.post(p.admin + "/api/drain") as r:
                assert r.status == 200 and (await r.json())["sessions"] == 1
            assert await _get(ready) == 503  # at once
            assert "consoleproxy_draining 1.0" in p.server.metrics.render().decode()
            # within the grace period a new console is still accepted
            async with RFBClient.connect(p.url(p.token(port=port, vm="b"))) as during:
                await connect_echo(during)
            # after it, refused with 1001
            async with asyncio.timeout(5):
                while not p.server.refusing:
                    await asyncio.sleep(0.05)
            code, reason = await expect_close(p.url(p.token(port=port, vm="c")))
            assert code == 1001 and "draining" in reason
            # the running console kept relaying all along
            await running.send(b"still here")
            assert await running.read_exact(10) == b"still here"
            # until the deadline closes it with 1001
            assert await running.close_code(timeout=10) == 1001
        async with asyncio.timeout(5):
            await p.server.drained.wait()


async def test_drain_ends_when_last_console_closes(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, drain={"grace_seconds": 0, "deadline_seconds": 0}) as p, \
            tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            await connect_echo(c)
            p.server.start_drain()
            async with asyncio.timeout(5):
                while not p.server.refusing:
                    await asyncio.sleep(0.02)
            # past the grace period, but a console is open: the drain is not over
            assert not p.server.drained.is_set()
        async with asyncio.timeout(5):
            await p.server.drained.wait()


@pytest.mark.integration
async def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    Keyring.generate().save(tmp_path / "keys.json")
    (tmp_path / "consoleproxy.toml").write_text(
        '[listen]\naddress = "127.0.0.1"\nports = [0]\ntls = false\n'
        '[admin]\nport = 0\n[drain]\ngrace_seconds = 0.2\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSOLEPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consoleproxy", "serve", "--config", "consoleproxy.toml",
        cwd=tmp_path, env=env, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while b"serving on" not in await proc.stderr.readline():
                assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            rc = await proc.wait()
        assert rc == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
