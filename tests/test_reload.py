"""Live reload (issue 18; DESIGN.md 10): SIGHUP and admin ``POST /api/reload``.

The plan (reload.py) is tested as a pure function; then a real `consoleproxy serve` gets `kill -HUP`
with a console open (it keeps relaying byte-exact), a rotated keyring (the new key's tokens open,
the old key's too while it stays in the ring) and a broken keyring file (the old one keeps working,
the log says why); the admin endpoint names what changed and what needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from harness import RFBClient, connect_echo, echo_backend, expect_close, running_proxy, tcp_server

from consoleproxy.config import load_config, replace
from consoleproxy.policy.cloudstack import CloudStackKeys, encrypt_gcm
from consoleproxy.policy.tokens import Keyring, issue
from consoleproxy.reload import ReloadError, plan
from consoleproxy.server import ProxyServer

# --- the plan: pure ----------------------------------------------------------------------------


def test_plan_applies_live_keys_and_names_the_rest_for_a_restart() -> None:
    running = load_config(env={})
    loaded = replace(
        running,
        listen={"ports": [8443]},
        limits={"idle_timeout_seconds": 60, "max_request_head_bytes": 4096, "max_sessions": 7},
        targets={"ports": "5900-5999"},
        origin={"allowed": ["https://portal.example"]},
        log={"level": "debug"},
        tokens={"format": "cloudstack", "skew_seconds": 5},
    )
    p = plan(running, loaded)
    assert p.changed == (
        "[tokens] skew_seconds", "[limits] max_sessions", "[limits] idle_timeout_seconds",
        "[targets] ports", "[origin] allowed", "[log] level",
    )
    assert p.restart == ("[listen] ports", "[tokens] format", "[limits] max_request_head_bytes")
    # what runs: the new live values, the old values of what needs a restart
    assert p.config.limits.idle_timeout_seconds == 60 and p.config.limits.max_sessions == 7
    assert p.config.limits.max_request_head_bytes == running.limits.max_request_head_bytes
    assert p.config.listen.ports == running.listen.ports
    assert p.config.tokens.format == "native" and p.config.tokens.skew_seconds == 5
    assert p.config.targets.ports == "5900-5999" and p.config.log.level == "debug"


def test_plan_of_an_unchanged_configuration_is_empty() -> None:
    cfg = load_config(env={})
    p = plan(cfg, load_config(env={}))
    assert (p.changed, p.restart) == ((), ()) and p.config == cfg


# --- SIGHUP on a real `consoleproxy serve` -----------------------------------------------------


@contextlib.asynccontextmanager
async def serve(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, asyncio.Queue[str]]]:
    """`consoleproxy serve` on ephemeral loopback ports: (process, public port, its log lines)."""
    (tmp_path / "consoleproxy.toml").write_text(
        '[listen]\naddress = "127.0.0.1"\nports = [0]\ntls = false\n'
        '[admin]\nport = 0\n'
        '[targets]\nallowed_cidrs = ["127.0.0.1/32"]\nports = "1-65535"\n'
        '[tokens]\nkeyring = "keys.json"\n[log]\nlevel = "info"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSOLEPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consoleproxy", "serve", "--config", "consoleproxy.toml",
        cwd=tmp_path, env=env, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: asyncio.Queue[str] = asyncio.Queue()

    async def pump() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            await lines.put(line.decode(errors="replace").rstrip())

    reader = asyncio.ensure_future(pump())
    try:
        line = await wait_line(lines, "serving on")
        m = re.search(r"ports \[(\d+)", line)
        assert m, line
        yield proc, int(m.group(1)), lines
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(20):
                await proc.wait()
        reader.cancel()


async def wait_line(lines: asyncio.Queue[str], needle: str, timeout: float = 20) -> str:
    """The next log line containing ``needle`` (bounded wait)."""
    seen = []
    try:
        async with asyncio.timeout(timeout):
            while needle not in (line := await lines.get()):
                seen.append(line)
    except TimeoutError:
        raise AssertionError(f"no log line with {needle!r} in {timeout} s; saw {seen}") from None
    return line


async def echo_round(c: RFBClient, data: bytes) -> None:
    await c.send(data)
    assert await c.read_exact(len(data)) == data


@pytest.mark.integration
async def test_sighup_rotates_the_keyring_without_dropping_an_open_console(tmp_path: Path) -> None:
    old = Keyring.generate()
    old.save(tmp_path / "keys.json")
    async with tcp_server(echo_backend) as vnc, serve(tmp_path) as (proc, port, lines):
        def url(keyring: Keyring, vm: str) -> str:
            token = issue(keyring, host="127.0.0.1", port=vnc, vm=vm)
            return f"ws://127.0.0.1:{port}/websockify?token={token}"

        minted_before = url(old, "b")  # a token of the key that is rotated out of the issuing place
        async with RFBClient.connect(url(old, "a")) as console:
            await connect_echo(console)
            await echo_round(console, os.urandom(64 * 1024))

            new = old.rotate()
            new.save(tmp_path / "keys.json")
            code, _ = await expect_close(url(new, "c"))
            assert code == 4001, "the new key is unknown until the reload"

            proc.send_signal(signal.SIGHUP)
            line = await wait_line(lines, "reload:")
            assert f"keyring ({new.kids[0]}, {old.kids[0]})" in line, line

            await echo_round(console, os.urandom(1024 * 1024))  # byte-exact across the reload
            async with RFBClient.connect(url(new, "d")) as rotated_in:
                await connect_echo(rotated_in)
            async with RFBClient.connect(minted_before) as rotated_out:
                await connect_echo(rotated_out)

            # A broken keyring file: the reload says why, the running keyring stays.
            (tmp_path / "keys.json").write_text('{"keys": [{"kid": "x", "key": "too short"}]}')
            proc.send_signal(signal.SIGHUP)
            line = await wait_line(lines, "reload failed")
            assert "keys.json" in line and "nothing changed" in line, line
            async with RFBClient.connect(url(new, "e")) as still:
                await connect_echo(still)
            await echo_round(console, os.urandom(64 * 1024))
        assert proc.returncode is None


# --- POST /api/reload --------------------------------------------------------------------------


async def test_admin_reload_names_changes_and_restarts_and_refuses_a_bad_file(tmp_path: Path) -> None:
    Keyring.generate().save(tmp_path / "keys.json")
    toml = tmp_path / "consoleproxy.toml"
    base = ('[listen]\naddress = "127.0.0.1"\nports = [0]\ntls = false\n'
            f'[admin]\nport = 0\nkey_file = "{tmp_path / "admin.key"}"\n'
            '[tokens]\nkeyring = "keys.json"\n')
    toml.write_text(base + '[targets]\nallowed_cidrs = ["127.0.0.1/32"]\nports = "1-65535"\n')
    server = ProxyServer(load_config(toml, env={}))
    await server.start()
    try:
        keyring = server.validator.keyring if server.validator else None
        assert keyring is not None
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        admin = f"http://127.0.0.1:{server.admin_port}/api/reload"
        async with tcp_server(echo_backend) as vnc, aiohttp.ClientSession(headers=headers) as http:
            def url() -> str:
                token = issue(keyring, host="127.0.0.1", port=vnc, vm="v")
                return f"ws://127.0.0.1:{server.public_ports[0]}/websockify?token={token}"

            async with RFBClient.connect(url()) as c:
                await connect_echo(c)
            toml.write_text(base.replace("ports = [0]", "ports = [0, 0]")
                            + f'[targets]\nallowed_cidrs = ["127.0.0.1/32"]\nports = "{vnc + 1}-65535"\n'
                            + '[limits]\nmax_sessions = 7\n')
            async with http.post(admin) as r:
                assert r.status == 200
                body = await r.json()
            assert body["changed"] == ["[limits] max_sessions", "[targets] ports"]
            assert body["restart_needed"] == ["[listen] ports"]
            assert server.registry.max_sessions == 7 and server.cfg.listen.ports == [0]
            code, reason = await expect_close(url())
            assert code == 4004, reason  # the new target range is live

            toml.write_text(base + '[limits]\nmax_sessions = "many"\n')
            async with http.post(admin) as r:
                assert r.status == 422
                error = (await r.json())["error"]
            assert "max_sessions" in error
            assert server.registry.max_sessions == 7 and server.cfg.targets.ports == f"{vnc + 1}-65535"
            async with http.post(admin, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
    finally:
        await server.close()


async def test_reload_takes_new_cloudstack_keys(tmp_path: Path) -> None:
    keys = CloudStackKeys.generate()
    (tmp_path / "keyiv.json").write_text(keys.dumps())
    async with tcp_server(echo_backend) as vnc, running_proxy(
        tmp_path, tokens={"format": "cloudstack"}, cloudstack={"key_iv_file": str(tmp_path / "keyiv.json")}
    ) as p:
        fields = {"clientHostAddress": "127.0.0.1", "clientHostPort": vnc, "clientTag": "vm-1"}
        new = CloudStackKeys.generate()
        (tmp_path / "keyiv.json").write_text(new.dumps())
        assert p.server.reload().changed == ("CloudStack key/IV",)
        async with RFBClient.connect(p.url(encrypt_gcm(new, fields))) as c:
            await connect_echo(c)
        code, _ = await expect_close(p.url(encrypt_gcm(keys, fields)))
        assert code == 4001
        (tmp_path / "keyiv.json").write_text("{}")
        with pytest.raises(ReloadError, match="key_iv_file"):
            p.server.reload()
        async with RFBClient.connect(p.url(encrypt_gcm(new, fields))) as c:
            await connect_echo(c)
