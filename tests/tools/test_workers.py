"""`consoleproxy serve --workers N`: processes sharing the ports, one replay store, clean drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from harness import RFBClient, connect_echo, echo_backend, expect_close, free_port, tcp_server

from consoleproxy.config import load_config
from consoleproxy.policy.tokens import Keyring, issue
from consoleproxy.tools.workers import worker_config

ADMIN_KEY = "k" * 43


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@dataclass
class Workers:
    proc: subprocess.Popen[bytes]
    port: int
    admin_ports: list[int]
    keyring: Keyring

    def url(self, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/websockify?token={token}"

    def token(self, port: int, **kw: object) -> str:
        return issue(self.keyring, host="127.0.0.1", port=port, vm="vm-1", **kw)  # type: ignore[arg-type]

    async def metric(self, index: int, name: str) -> float:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with aiohttp.ClientSession(headers=headers) as http, \
                http.get(f"http://127.0.0.1:{self.admin_ports[index]}/metrics") as r:
            text = await r.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


async def _wait_ready(port: int, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


@asynccontextmanager
async def workers(tmp_path: Path, count: int = 2, *extra: str) -> AsyncIterator[Workers]:
    keyring = Keyring.generate()
    keyring.save(tmp_path / "keys.json")
    (tmp_path / "admin.key").write_text(ADMIN_KEY)
    port = free_port(20000, 29999)
    admin = free_port(30000, 39000)
    while any(not _port_free(admin + i) for i in range(count)):
        admin += count
    (tmp_path / "consoleproxy.toml").write_text(f"""
[listen]
address = "127.0.0.1"
ports = [{port}]
tls = false
[admin]
port = {admin}
key_file = "admin.key"
[tokens]
keyring = "keys.json"
[targets]
allowed_cidrs = ["127.0.0.1/32"]
ports = "1-65535"
[drain]
grace_seconds = 0
deadline_seconds = 30
""")
    proc = subprocess.Popen(  # noqa: ASYNC220 - spawning does not block; waits go through to_thread
        [sys.executable, "-m", "consoleproxy", "serve", "--workers", str(count),
         "--config", str(tmp_path / "consoleproxy.toml"), *extra],
        cwd=tmp_path,
    )
    try:
        w = Workers(proc, port, [admin + i for i in range(count)], keyring)
        async with asyncio.timeout(30):
            for a in w.admin_ports:
                while not await _admin_up(a):
                    assert proc.poll() is None, "supervisor exited"
                    await asyncio.sleep(0.1)
        await _wait_ready(port)
        yield w
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                for child in _children(proc.pid):
                    os.kill(child, signal.SIGKILL)
                proc.kill()
                proc.wait()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def _admin_up(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/metrics",
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


def test_worker_config() -> None:
    cfg = load_config(env={})
    w0, w3 = worker_config(cfg, 0), worker_config(cfg, 3)
    assert (w0.admin.port, w3.admin.port) == (8001, 8004)
    dns_on = load_config(env={"CONSOLEPROXY_DNS_ENABLED": "true"})
    assert worker_config(dns_on, 0).dns.enabled and not worker_config(dns_on, 1).dns.enabled
    with pytest.raises(ValueError, match="past 65535"):
        worker_config(load_config(env={"CONSOLEPROXY_ADMIN_PORT": "65535"}), 1)


@pytest.mark.integration
async def test_two_workers_share_port_and_replay_store(tmp_path: Path) -> None:
    async with workers(tmp_path) as w, tcp_server(echo_backend) as backend:
        # a new TCP connection lands on either worker (SO_REUSEPORT hashes the 4-tuple)
        for _ in range(24):
            async with RFBClient.connect(w.url(w.token(backend))) as c:
                await connect_echo(c)
        served = [await w.metric(i, "consoleproxy_sessions_total") for i in range(2)]
        assert sum(served) == 24 and all(n > 0 for n in served), served
        # single use holds across the workers: a token replayed lands somewhere and is refused
        token = w.token(backend)
        async with RFBClient.connect(w.url(token)) as c:
            await connect_echo(c)
        for _ in range(6):
            code, _ = await expect_close(w.url(token))
            assert code == 4003


@pytest.mark.integration
async def test_worker_restarted_and_drain_exits_zero(tmp_path: Path) -> None:
    async with workers(tmp_path) as w, tcp_server(echo_backend) as backend:
        before = _children(w.proc.pid)
        assert len(before) == 2
        os.kill(before[1], signal.SIGKILL)
        async with asyncio.timeout(20):
            while True:
                now = _children(w.proc.pid)
                if len(now) == 2 and before[1] not in now and await _admin_up(w.admin_ports[1]):
                    break
                await asyncio.sleep(0.1)
        async with RFBClient.connect(w.url(w.token(backend))) as running:
            await connect_echo(running)
            w.proc.send_signal(signal.SIGTERM)  # drain every worker
            async with asyncio.timeout(10):
                while await _ready_status(w.port) != 503:
                    await asyncio.sleep(0.05)
            await running.send(b"draining")
            assert await running.read_exact(8) == b"draining"
        # the last console closed: every worker exits, and the supervisor with 0
        assert await asyncio.to_thread(w.proc.wait, 20) == 0


async def _ready_status(port: int) -> int:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
            return r.status
    except aiohttp.ClientError:
        return 0


@pytest.mark.integration
def test_bad_worker_counts() -> None:
    for bad, needle in (("0", "at least 1"), ("two", "not a whole number"), ("1000", "more than 256")):
        r = subprocess.run([sys.executable, "-m", "consoleproxy", "serve", "--workers", bad],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1


def _uses_uvloop(pid: int) -> bool:
    """uvloop's extension is loaded in ``pid`` (serve imports it only to run on it)."""
    return "uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.integration
@pytest.mark.parametrize(("args", "uvloop"), [((), True), (("--loop", "asyncio"), False)])
async def test_serve_runs_on_uvloop_by_default(tmp_path: Path, args: tuple[str, ...], uvloop: bool) -> None:
    """uvloop is installed with the test extra: serve's default (auto) takes it; asyncio on request."""
    async with workers(tmp_path, 2, *args) as w, tcp_server(echo_backend) as backend:
        children = _children(w.proc.pid)
        assert len(children) == 2
        for child in children:
            assert _uses_uvloop(child) is uvloop
        async with RFBClient.connect(w.url(w.token(backend))) as c:
            await connect_echo(c)


@pytest.mark.integration
async def test_workers_run_the_chosen_event_loop(tmp_path: Path) -> None:
    async with workers(tmp_path, 2, "--loop", "uvloop") as w, tcp_server(echo_backend) as backend:
        for child in _children(w.proc.pid):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"--loop") + 1] == b"uvloop", argv
        for _ in range(4):
            async with RFBClient.connect(w.url(w.token(backend))) as c:
                await connect_echo(c)
