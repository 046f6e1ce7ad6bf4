"""TLS on the public listener: uploads through the admin API, live swap, SNI, SIGHUP, dev CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from certutil_helpers import SUFFIX, make_cert, make_chain, now
from cryptography.hazmat.primitives import serialization
from harness import RFBClient, connect_echo, echo_backend, running_proxy, tcp_server

from consoleproxy.policy.tokens import Keyring

HOST = "10-1-2-3.consoleproxy.company.com"


def client_ctx(root_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=root_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def peer_cert(port: int, name: str = HOST) -> bytes:
    """SHA-256 of the certificate the proxy presents for ``name`` (unverified, to see any)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    w.close()
    return hashlib.sha256(der).digest()


async def upload(p: Any, fields: dict[str, Any], *, form: bool = False) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(headers=p.admin_headers) as http:
        kw: dict[str, Any] = {"data": fields} if form else {"json": fields}
        async with http.post(p.admin + "/api/certificates", **kw) as r:
            return r.status, await r.json()


def fields(
    name: str, ident: int, cert: str, key: str | None = None, suffix: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "id": ident, "certificate": cert}
    if key:
        out["privatekey"] = key
    if suffix:
        out["domainsuffix"] = suffix
    return out


async def install_chain(p: Any, chain: Any, *, form: bool = False) -> None:
    for f in (
        fields("root1", 1, chain.root.pem),
        fields("intermed1", 2, chain.inter.pem),
        fields("server", 3, chain.leaf.pem, chain.leaf.key_pem(), SUFFIX),
    ):
        status, body = await upload(p, f, form=form)
        assert status == 200, body
    assert body["status"] == "live"


async def test_dev_certificate_then_upload_and_console_over_tls(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, listen={"tls": True}) as p, tcp_server(echo_backend) as port:
        # nothing configured: a development CA was made and the console works with it trusted
        assert p.server.dev_ca is not None and p.server.dev_ca.is_file()
        dev = client_ctx(p.server.dev_ca.read_text())
        async with RFBClient.connect(p.url(p.token(port=port)), ssl=dev, server_hostname="localhost") as c:
            await connect_echo(c)
        # the operator uploads a real chain as CloudStack's API sends it (URL-encoded form)
        chain = make_chain()
        await install_chain(p, chain, form=True)
        ctx = client_ctx(chain.root.pem)
        async with RFBClient.connect(p.url(p.token(port=port)), ssl=ctx, server_hostname=HOST) as c:
            await connect_echo(c)
            await c.send(b"over tls")
            assert await c.read_exact(8) == b"over tls"
        # a client that trusts only the dev CA no longer accepts the company name
        with pytest.raises(ssl.SSLCertVerificationError):
            async with RFBClient.connect(p.url(p.token(port=port)), ssl=dev, server_hostname=HOST):
                pass
        metrics = p.server.metrics.render().decode()
        assert (
            'consoleproxy_certificate_expiry_timestamp_seconds{name="*.consoleproxy.company.com"}' in metrics
        )


async def test_bad_uploads_keep_the_old_certificate(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, listen={"tls": True}) as p:
        chain = make_chain()
        await install_chain(p, chain)
        before = await peer_cert(p.port)
        other = make_chain(root_cn="Other Root")
        expired = make_cert(
            SUFFIX,
            issuer=chain.inter,
            sans=[SUFFIX],
            not_before=now() - dt.timedelta(days=30),
            not_after=now() - dt.timedelta(days=1),
        )
        cases: list[tuple[dict[str, Any], str]] = [
            (fields("server", 3, chain.leaf.pem, other.leaf.key_pem(), SUFFIX), "key"),
            (fields("server", 3, other.leaf.pem, other.leaf.key_pem(), SUFFIX), "issuer"),
            (fields("server", 3, chain.leaf.pem, chain.leaf.key_pem(), "*.other.company.com"), "cover"),
            (fields("intermed1", 2, "garbage"), "intermed1"),
            (fields("intermed1", 2, ""), "certificate"),
            (fields("server", 3, chain.leaf.pem, chain.leaf.key_pem("pw"), SUFFIX), "passphrase"),
            (fields("server", 3, expired.pem, expired.key_pem(), SUFFIX), "expired"),
        ]
        for f, needle in cases:
            status, body = await upload(p, f)
            assert status == 400, (needle, body)
            assert needle in body["error"].lower(), (needle, body)
            assert await peer_cert(p.port) == before, f"certificate changed after a bad upload ({needle})"
        status, body = await upload(p, {"name": "x"})
        assert status == 400 and "required" in body["error"]


async def test_renewal_mid_session_loses_no_bytes(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, listen={"tls": True}) as p, tcp_server(echo_backend) as port:
        old = make_chain()
        await install_chain(p, old)
        before = await peer_cert(p.port)
        ctx = client_ctx(old.root.pem)
        async with RFBClient.connect(p.url(p.token(port=port)), ssl=ctx, server_hostname=HOST) as c:
            await connect_echo(c)
            sent, got = hashlib.sha256(), hashlib.sha256()
            total = 0
            stop = asyncio.Event()

            async def pump() -> None:
                nonlocal total
                i = 0
                while not stop.is_set() or i < 20:
                    block = os.urandom(64 * 1024)
                    sent.update(block)
                    await c.send(block)
                    got.update(await c.read_exact(len(block)))
                    total += len(block)
                    i += 1

            task = asyncio.ensure_future(pump())
            # a renewed intermediate and server certificate under the same names, same root
            new = make_chain(root=old.root, inter_cn="Renewed Intermediate")
            for f in (
                fields("intermed1", 2, new.inter.pem),
                fields("server", 3, new.leaf.pem, new.leaf.key_pem(), SUFFIX),
            ):
                status, body = await upload(p, f)
                assert status == 200, body
            assert body["status"] == "live"
            stop.set()
            async with asyncio.timeout(60):
                await task
            assert total >= 20 * 64 * 1024 and sent.digest() == got.digest()
        assert await peer_cert(p.port) != before
        async with RFBClient.connect(p.url(p.token(port=port)), ssl=ctx, server_hostname=HOST) as c:
            await connect_echo(c)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_versions_below_1_2_refused(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, listen={"tls": True}) as p:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", p.port, ssl=ctx, server_hostname=HOST)


@pytest.mark.integration
async def test_sighup_reloads_after_cli_import(tmp_path: Path) -> None:
    Keyring.generate().save(tmp_path / "keys.json")
    (tmp_path / "consoleproxy.toml").write_text(
        '[listen]\naddress = "127.0.0.1"\nports = [0]\ntls = true\n[admin]\nport = 0\n'
        '[tls]\nstore = "certs"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSOLEPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consoleproxy",
        "serve",
        "--config",
        "consoleproxy.toml",
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "proxy exited"
                if "serving on" in line:
                    port = int(line.split("ports [")[1].split("]")[0])
                    break
        before = await peer_cert(port)
        chain = make_chain()
        for name, ident, cert, key in (
            ("root1", 1, chain.root.pem, None),
            ("intermed1", 2, chain.inter.pem, None),
            ("server", 3, chain.leaf.pem, chain.leaf.key_pem()),
        ):
            (tmp_path / f"{name}.pem").write_text(cert)
            args = [
                "certs",
                "import",
                "--store",
                "certs",
                "--name",
                name,
                "--id",
                str(ident),
                "--certificate",
                f"{name}.pem",
            ]
            if key:
                (tmp_path / "server.key").write_text(key)
                args += ["--private-key", "server.key", "--domain-suffix", SUFFIX]
            r = subprocess.run(
                [sys.executable, "-m", "consoleproxy", *args],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
        assert "live" in r.stdout.lower()
        assert await peer_cert(port) == before  # files changed, not yet reloaded
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(5):
            while await peer_cert(port) == before:
                await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await proc.wait()


@pytest.mark.integration
def test_certs_cli_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("garbage")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "consoleproxy",
            "certs",
            "import",
            "--store",
            "s",
            "--name",
            "root1",
            "--id",
            "1",
            "--certificate",
            "junk.pem",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "root1" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "consoleproxy", "certs", "verify", "--store", "s"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "no live certificate bundle" in r.stderr


async def test_http_port_only_redirects_to_https(tmp_path: Path) -> None:
    from harness import free_port

    http_port = free_port(20000, 30000)
    async with running_proxy(tmp_path, listen={"tls": True, "redirect_http_port": http_port}) as p:
        async with aiohttp.ClientSession() as http:
            url = f"http://localhost:{http_port}/console?token=a+b/c=="
            async with http.get(url, allow_redirects=False) as r:
                assert r.status == 301
                assert r.headers["Location"] == f"https://localhost:{p.port}/console?token=a+b/c=="
            # the plain port serves nothing else: no WebSocket, no health, no page
            async with http.get(f"http://localhost:{http_port}/websockify", allow_redirects=False) as r:
                assert r.status == 301


async def test_readyz_fails_when_the_live_certificate_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import consoleproxy.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "CERT_RECHECK_SECONDS", 0.2)
    chain = make_chain()
    short = make_cert(
        SUFFIX,
        issuer=chain.inter,
        sans=[SUFFIX],
        not_before=now() - dt.timedelta(days=1),
        not_after=now() + dt.timedelta(seconds=2),
    )
    async with running_proxy(tmp_path, listen={"tls": True}, tls={"domain_suffix": SUFFIX}) as p:
        for f in (
            fields("root1", 1, chain.root.pem),
            fields("intermed1", 2, chain.inter.pem),
            fields("server", 3, short.pem, short.key_pem(), SUFFIX),
        ):
            status, body = await upload(p, f)
            assert status == 200, body
        # the served certificate names *.consoleproxy.company.com, not 127.0.0.1: a load
        # balancer's probe does not verify it either
        async with aiohttp.ClientSession() as http:
            async with http.get(p.http_base + "/readyz", ssl=False) as r:
                assert r.status == 200, await r.text()
            # wait (bounded) until the certificate has expired and the periodic check noticed
            async with asyncio.timeout(15):
                while p.server.certificate_problem is None:
                    await asyncio.sleep(0.1)
            async with http.get(p.http_base + "/readyz", ssl=False) as r:
                assert r.status == 503
                assert "expired" in (await r.json())["reason"]


async def test_first_real_upload_replaces_the_development_certificate(tmp_path: Path) -> None:
    # An operator configured the suffix but had no certificate yet: the dev one filled in.
    async with running_proxy(tmp_path, listen={"tls": True}, tls={"domain_suffix": SUFFIX}) as p:
        assert p.server.dev_ca is not None
        dev = await peer_cert(p.port)
        chain = make_chain()
        await install_chain(p, chain)
        assert (
            await peer_cert(p.port)
            == hashlib.sha256(chain.leaf.cert.public_bytes(serialization.Encoding.DER)).digest()
            != dev
        )
        names = [i["name"] for i in p.server.certstore.list() if i["type"] == "item"]  # type: ignore[union-attr]
        assert "dev-server" not in names and "server" in names
