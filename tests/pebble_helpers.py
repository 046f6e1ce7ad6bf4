"""Pebble (Let's Encrypt's test ACME server, Debian package ``pebble``) for the [acme] tests.

``pebble_server`` writes a configuration with loopback ports, a TLS certificate for its own HTTPS
listener (signed by a throwaway CA the client trusts through ``[acme] ca_bundle``), starts it with
``-dnsserver`` pointed at our DNS responder, waits for the directory, and fetches the root it
issues under from its management interface (``/roots/0``) for ``[acme] roots`` and openssl.
Real validation: ``PEBBLE_VA_ALWAYS_VALID`` is removed from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Ports handed out in this process: the kernel may offer a just-closed port again.
_given: set[int] = set()


def free_port() -> int:
    """An ephemeral loopback port nothing listens on now (for programs that need a number upfront)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port
    raise RuntimeError("no fresh free port")


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP (the DNS responder binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            if port in _given:
                continue
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                _given.add(port)
                return port
    raise RuntimeError("no port free for UDP and TCP")


def _tls_for_pebble(directory: Path) -> tuple[Path, Path, Path]:
    """(CA file, certificate, key) for Pebble's HTTPS listener on 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble wfe test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_path, cert_path, key_path = directory / "wfe-ca.pem", directory / "wfe.pem", directory / "wfe-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


@dataclass
class Pebble:
    directory: str  # the ACME directory URL
    ca_bundle: Path  # trust for the directory's HTTPS
    roots: Path  # the root Pebble issues under (PEM)
    proc: asyncio.subprocess.Process
    log: Path

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def wait_for(
    cond: Callable[[], bool] | Callable[[], Awaitable[bool]], timeout: float, what: str,
    interval: float = 0.05,
) -> None:
    """Poll ``cond`` every ``interval`` s until true; fail naming ``what`` after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                r = cond()
                if not isinstance(r, bool):
                    r = await r
                if r:
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


def _get(url: str, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        data: bytes = resp.read()
        return data


@contextlib.asynccontextmanager
async def pebble_server(
    tmp_path: Path, *, dns_port: int, http_port: int, validity_seconds: int = 0
) -> AsyncIterator[Pebble]:
    exe = require_tool("pebble", "pebble")
    d = tmp_path / "pebble"
    d.mkdir()
    ca, cert, key = _tls_for_pebble(d)
    port, mgmt = free_port(), free_port()
    conf: dict[str, object] = {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(cert),
        "privateKey": str(key),
        "httpPort": http_port,
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity_seconds:
        conf["certificateValidityPeriod"] = validity_seconds
    (d / "config.json").write_text(json.dumps({"pebble": conf}))
    env = {k: v for k, v in os.environ.items() if k != "PEBBLE_VA_ALWAYS_VALID"}
    env |= {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    log = d / "pebble.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            exe, "-config", str(d / "config.json"), "-dnsserver", f"127.0.0.1:{dns_port}",
            stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
    directory = f"https://127.0.0.1:{port}/dir"

    async def up() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"pebble exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            await asyncio.to_thread(_get, directory, ca)
        except OSError:
            return False
        return True

    pebble = Pebble(directory, ca, d / "roots.pem", proc, log)
    try:
        await wait_for(up, 20, "pebble's directory")
        pebble.roots.write_bytes(await asyncio.to_thread(_get, f"https://127.0.0.1:{mgmt}/roots/0", ca))
        yield pebble
    finally:
        await pebble.stop()


@contextlib.asynccontextmanager
async def rate_limiting_front(pebble: Pebble, retry_after: int) -> AsyncIterator[str]:
    """An ACME directory whose newOrder answers 429 ``rateLimited``; everything else is Pebble's.

    Yields the front's directory URL. Pebble has no rate limits of its own; accounts and nonces
    still come from the real Pebble, only the new-order request meets the limit.
    """
    from aiohttp import web

    wfe = pebble.ca_bundle.parent
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(wfe / "wfe.pem"), str(wfe / "wfe-key.pem"))
    base: list[str] = []

    async def directory(request: web.Request) -> web.Response:
        body = json.loads(await asyncio.to_thread(_get, pebble.directory, pebble.ca_bundle))
        body["newOrder"] = base[0] + "/new-order"
        return web.json_response(body)

    async def new_order(request: web.Request) -> web.Response:
        problem = {
            "type": "urn:ietf:params:acme:error:rateLimited",
            "detail": "too many new orders recently",
            "status": 429,
        }
        return web.json_response(
            problem, status=429, content_type="application/problem+json",
            headers={"Retry-After": str(retry_after)},
        )  # fmt: skip

    app = web.Application()
    app.router.add_get("/dir", directory)
    app.router.add_post("/new-order", new_order)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base.append(f"https://127.0.0.1:{port}")
    try:
        yield base[0] + "/dir"
    finally:
        await runner.cleanup()
