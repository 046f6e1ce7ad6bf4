"""Several `consoleproxy serve` processes behind a real HAProxy, as an operator runs them.

``layout="passthrough"``: HAProxy in mode tcp sends PROXY v2; each instance terminates TLS with
the FQDN's certificate from its own store. ``layout="http"``: HAProxy terminates TLS and adds
X-Forwarded-For; instances are plain HTTP and trust HAProxy's address. Either way the browser
connects to ``wss://console.test:PORT`` and the instances share one Redis replay store.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import random
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from certutil_helpers import make_chain
from conftest import require_tool
from harness import free_port

from consoleproxy.policy.tokens import Keyring, issue
from consoleproxy.tls.certstore import CertStore
from consoleproxy.tools.loadbalancer import Backend, haproxy_config

FQDN = "console.test"
ADMIN_KEY = "a" * 43
CHECK_MS = 300  # HAProxy marks a server down after 2 failed checks: about 0.6 s


def _free(lo: int, hi: int, taken: set[int]) -> int:
    # a random start, so two test runs on one machine do not race for the same ports
    lo = random.randrange(lo, hi - 200)
    for _ in range(50):
        port = free_port(lo, hi)
        if port not in taken:
            taken.add(port)
            return port
        lo = port + 1
    raise RuntimeError("no free port")


@dataclass
class Instance:
    index: int
    directory: Path
    port: int
    admin_port: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"proxy{self.index + 1}"

    def start(self) -> None:
        log = (self.directory / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "consoleproxy", "serve", "--config", str(self.config)],
            cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return (self.directory / "serve.log").read_text(errors="replace")

    async def admin(self, method: str, path: str) -> Any:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with aiohttp.ClientSession(headers=headers) as http, \
                http.request(method, f"http://127.0.0.1:{self.admin_port}{path}") as r:
            r.raise_for_status()
            return await (r.text() if path == "/metrics" else r.json())

    async def metric(self, name: str) -> float:
        text = await self.admin("GET", "/metrics")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )

    async def up(self) -> bool:
        try:
            await self.admin("GET", "/api/sessions")
        except (aiohttp.ClientError, OSError):
            return False
        return True


@dataclass
class Cluster:
    instances: list[Instance]
    keyring: Keyring
    port: int
    stats_port: int
    ca: ssl.SSLContext
    root_pem: str
    haproxy: subprocess.Popen[bytes] | None = None
    directory: Path = field(default_factory=Path)

    def url(self, token: str) -> str:
        return f"wss://{FQDN}:{self.port}/websockify?token={token}"

    def connect_kwargs(self) -> dict[str, Any]:
        """websockets.connect arguments: reach HAProxy on loopback under the FQDN's name."""
        return {"ssl": self.ca, "host": "127.0.0.1", "port": self.port}

    def token(self, backend: int, **kw: Any) -> str:
        kw.setdefault("vm", "vm-1")
        return issue(self.keyring, host="127.0.0.1", port=backend, **kw)

    async def states(self) -> dict[str, str]:
        """HAProxy's view of each server (UP, DOWN, ...), from its CSV stats."""
        return {name: row["status"].split()[0] for name, row in (await self.stats()).items()}

    async def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's CSV stats row of each server (``status``, ``chkdown`` = UP->DOWN transitions, ...)."""
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{self.stats_port}/stats;csv") as r:
            text = await r.text()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "consoleproxies" and row["svname"].startswith("proxy")
        }

    async def wait_states(self, expected: dict[str, str], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    states = await self.states()
                except aiohttp.ClientError:
                    states = {}
                if all(states.get(k) == v for k, v in expected.items()):
                    return
                await asyncio.sleep(0.05)


def _instance_config(
    inst: Instance, layout: str, replay: str, extra: str, cluster_extra: str, deadline: float
) -> str:
    if layout == "passthrough":
        listen = 'tls = true\nproxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]'
        tls = f'fqdn = "{FQDN}"'
    else:
        listen = 'tls = false\nforwarded_for = true\ntrusted_proxies = ["127.0.0.1/32"]'
        tls = ""
    return f"""
[listen]
address = "127.0.0.1"
ports = [{inst.port}]
{listen}
[tls]
store = "certs"
{tls}
[admin]
port = {inst.admin_port}
key_file = "../admin.key"
[tokens]
keyring = "../keys.json"
[targets]
allowed_cidrs = ["127.0.0.1/32"]
ports = "1-65535"
[cluster]
replay_store = "{replay}"
{cluster_extra}
[drain]
grace_seconds = {CHECK_MS * 3 / 1000}
deadline_seconds = {deadline}
[log]
level = "info"
{extra}
"""


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, *, layout: str, replay: str, count: int = 3, extra: str = "", cluster_extra: str = "",
    check_ms: int = CHECK_MS, drain_deadline: float = 120,
) -> AsyncIterator[Cluster]:
    """``extra``: more TOML sections for every instance; ``cluster_extra``: more ``[cluster]`` keys;
    ``check_ms``: HAProxy's check interval, which is also each check's time limit;
    ``drain_deadline``: ``[drain] deadline_seconds``; at the grace period's length (or below)
    a drain closes its consoles with 1001 as soon as new ones are refused."""
    haproxy = require_tool("haproxy", "haproxy")
    chain = make_chain(FQDN)
    keyring = Keyring.generate()
    keyring.save(tmp_path / "keys.json")
    (tmp_path / "admin.key").write_text(ADMIN_KEY)
    taken: set[int] = set()
    instances = []
    for i in range(count):
        d = tmp_path / f"proxy{i + 1}"
        d.mkdir()
        inst = Instance(i, d, _free(20000, 29999, taken), _free(30000, 39999, taken), d / "consoleproxy.toml")
        inst.config.write_text(_instance_config(inst, layout, replay, extra, cluster_extra, drain_deadline))
        if layout == "passthrough":
            store = CertStore(d / "certs")
            for item in chain.items(suffix=FQDN):
                store.import_item(item)
        instances.append(inst)
    pem = tmp_path / "haproxy.pem"
    pem.write_text(chain.leaf.pem + chain.inter.pem + chain.leaf.key_pem())
    port, stats = _free(40000, 44999, taken), _free(45000, 49999, taken)
    cfg = haproxy_config(
        fqdn=FQDN,
        backends=[Backend("127.0.0.1", inst.port) for inst in instances],
        mode=layout,
        bind=f"127.0.0.1:{port}",
        certificate=str(pem),
        check_interval_ms=check_ms,
        stats_bind=f"127.0.0.1:{stats}",
        maxconn=2000,
    )
    (tmp_path / "haproxy.cfg").write_text(cfg)
    ca = ssl.create_default_context(cadata=chain.root.pem)
    c = Cluster(instances, keyring, port, stats, ca, chain.root.pem, directory=tmp_path)
    try:
        for inst in instances:
            inst.start()
        async with asyncio.timeout(30):
            for inst in instances:
                while not await inst.up():
                    assert inst.proc is not None and inst.proc.poll() is None, inst.log
                    await asyncio.sleep(0.1)
        c.haproxy = subprocess.Popen(  # noqa: ASYNC220
            [haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")],
            stdout=(tmp_path / "haproxy.log").open("ab"), stderr=subprocess.STDOUT,
        )
        await c.wait_states({inst.name: "UP" for inst in instances})
        yield c
    finally:
        if c.haproxy is not None:
            c.haproxy.terminate()
            c.haproxy.wait(10)
        for inst in instances:
            if inst.proc is not None and inst.proc.poll() is None:
                inst.proc.send_signal(signal.SIGINT)
        for inst in instances:
            if inst.proc is not None:
                try:
                    inst.proc.wait(10)
                except subprocess.TimeoutExpired:
                    inst.proc.kill()
                    inst.proc.wait()
