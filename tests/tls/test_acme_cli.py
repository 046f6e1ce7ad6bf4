"""`consoleproxy certs acme status|renew-now` and the admin API, against a CA that is not there."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import Proxy, running_proxy
from pebble_helpers import free_port, wait_for

from consoleproxy.tools.cli import main

ZONE = "cp.example.com"


def acme_on(**acme: Any) -> dict[str, dict[str, Any]]:
    return {
        "listen": {"tls": True},
        "tls": {"domain_suffix": f"*.{ZONE}"},
        "dns": {"enabled": True, "listen": "127.0.0.1:0", "zone": ZONE},
        "acme": {
            "enabled": True,
            # Nothing listens there: every attempt is "unreachable".
            "directory": f"https://127.0.0.1:{free_port()}/dir",
            "check_interval_seconds": 0.2,
            "retry_base_seconds": 600,
            **acme,
        },
    }


def cli_config(tmp_path: Path, p: Proxy) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(
        f'[admin]\naddress = "127.0.0.1"\nport = {p.server.admin_port}\n'
        f'key_file = "{tmp_path / "admin.key"}"\n'
    )
    return path


async def test_status_and_renew_now_name_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_proxy(tmp_path, **acme_on()) as p:
        acme = p.server.acme
        assert acme is not None
        await wait_for(lambda: acme.state.last_result == "unreachable", 30, "the first failed attempt")
        assert acme.state.failures == 1  # backed off: no second attempt within retry_base_seconds
        conf = cli_config(tmp_path, p)
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["certs", "acme", "status", "--config", str(conf)]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["names"] == [f"*.{ZONE}"]
        assert status["last_result"] == "unreachable"
        assert "the ACME directory is unreachable" in status["last_error"]
        assert status["backoff_seconds"] == 600
        assert status["live"]["acme"] is False  # the development certificate still serves

        rc = await asyncio.to_thread(main, ["certs", "acme", "renew-now", "--config", str(conf)])
        assert rc == 1
        status = json.loads(capsys.readouterr().out)
        got = (status["last_result"], status["failures"], status["backoff_seconds"])
        assert got == ("unreachable", 2, 1200)

        async with aiohttp.ClientSession() as s:
            r = await s.post(p.admin + "/api/certificates/acme/renew", headers=p.admin_headers)
            assert r.status == 502
            assert (await r.json())["failures"] == 3
            r = await s.post(p.admin + "/api/certificates/acme/renew")
            assert r.status == 401  # the admin key is required
            # Far from expiry: a failing renewal does not make the instance unready.
            r = await s.get(p.http_base + "/readyz", ssl=p.client_ssl)
            assert r.status == 200


async def test_acme_off_is_a_clear_404(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_proxy(tmp_path) as p:
        async with aiohttp.ClientSession() as s:
            r = await s.post(p.admin + "/api/certificates/acme/renew", headers=p.admin_headers)
            assert r.status == 404
            assert "not enabled" in (await r.json())["error"]
        conf = cli_config(tmp_path, p)
        assert await asyncio.to_thread(main, ["certs", "acme", "status", "--config", str(conf)]) == 2
        assert "[acme] is not enabled" in capsys.readouterr().err


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "c.toml"
    (tmp_path / "admin.key").write_text("k" * 32)
    conf.write_text(f'[admin]\nport = {free_port()}\nkey_file = "{tmp_path / "admin.key"}"\n')
    assert main(["certs", "acme", "status", "--config", str(conf)]) == 2
    assert "does not answer" in capsys.readouterr().err
    conf.write_text(f'[admin]\nport = {free_port()}\nkey_file = "{tmp_path / "missing.key"}"\n')
    assert main(["certs", "acme", "renew-now", "--config", str(conf)]) == 2
    assert "cannot read the admin key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["certs", "acme", "renew"])
    assert exc.value.code == 2
