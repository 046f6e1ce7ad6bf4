"""Upgrading one host without dropping a console (issue 18; docs/upgrade.md): with
``[listen] reuse_port`` a new instance listens on the old one's port, the old one drains, every
new console lands on the new instance, and the consoles open on the old one keep relaying
byte-exact until they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from harness import Proxy, RFBClient, connect_echo, echo_backend, make_config, tcp_server

from consoleproxy.config import replace
from consoleproxy.policy.tokens import Keyring
from consoleproxy.server import ProxyServer


@contextlib.asynccontextmanager
async def instance(tmp_path: Path, keyring: Keyring, port: int) -> AsyncIterator[Proxy]:
    cfg = make_config(tmp_path, listen={"ports": [port], "reuse_port": True}, drain={"grace_seconds": 0})
    cfg = replace(cfg, tls={"store": str(tmp_path.parent / "certs")})  # one store: one dev CA for both
    server = ProxyServer(cfg, keyring=keyring)
    await server.start()
    try:
        yield Proxy(server, keyring)
    finally:
        await server.close()


async def test_new_instance_beside_the_old_takes_every_new_console(tmp_path: Path) -> None:
    keyring = Keyring.generate()
    async with tcp_server(echo_backend) as vnc, instance(tmp_path / "old", keyring, 0) as old:
        port = old.port
        async with RFBClient.connect(old.url(old.token(port=vnc, vm="open"))) as console:
            await connect_echo(console)
            async with instance(tmp_path / "new", keyring, port) as new:
                assert new.port == port
                assert old.server.start_drain()
                assert old.server.public_ports != [port]  # its listening socket is closed
                for i in range(20):  # all land on the new instance: none is refused
                    async with RFBClient.connect(new.url(new.token(port=vnc, vm=f"vm-{i}"))) as c:
                        await connect_echo(c)
                assert len(old.server.registry) == 1
                data = os.urandom(512 * 1024)
                await console.send(data)
                assert await console.read_exact(len(data)) == data
                assert not old.server.drained.is_set()  # the open console keeps the old one running
            await console.send(b"bye")
            assert await console.read_exact(3) == b"bye"
        async with asyncio.timeout(10):
            await old.server.drained.wait()
