"""[acme] against a real Pebble whose DNS is our responder (DESIGN.md section 10, issue 22)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import ssl
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import Proxy, RFBClient, echo_backend, make_config, running_proxy, tcp_server
from pebble_helpers import (
    Pebble,
    free_port,
    free_udp_tcp_port,
    pebble_server,
    rate_limiting_front,
    wait_for,
)

from consoleproxy.metrics import Metrics
from consoleproxy.net.dns import DnsServer, DnsSettings
from consoleproxy.policy.acme_policy import ChallengeRecords
from consoleproxy.tls.acme_orders import AcmeManager
from consoleproxy.tls.certstore import CertStore
from consoleproxy.tls.devcert import ensure_dev_certificate

pytestmark = pytest.mark.integration

ZONE = "cp.example.com"


def acme_sections(pebble: Pebble, dns_port: int, redirect: int, **acme: Any) -> dict[str, dict[str, Any]]:
    return {
        "listen": {"tls": True, "redirect_http_port": redirect},
        "tls": {"domain_suffix": f"*.{ZONE}"},
        "dns": {"enabled": True, "listen": f"127.0.0.1:{dns_port}", "zone": ZONE},
        "acme": {
            "enabled": True,
            "directory": pebble.directory,
            "ca_bundle": str(pebble.ca_bundle),
            "roots": str(pebble.roots),
            "check_interval_seconds": 0.2,
            "retry_base_seconds": 1,
            **acme,
        },
    }


async def s_client(port: int, servername: str, cafile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", servername,
        "-verify_hostname", servername, "-CAfile", str(cafile), "-verify_return_error",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out_b, _ = await asyncio.wait_for(proc.communicate(), 30)
    out = out_b.decode(errors="replace")
    assert proc.returncode == 0, out
    assert "Verify return code: 0 (ok)" in out, out
    return out


def secret_fragments(key_file: Path) -> list[str]:
    """Strings that any hex/base64/base64url text holding the key's private scalar must contain.

    Only the secret: the public key also sits in the CSR and the JWS, which may be logged. Base64
    has three alignments; the inner characters of each do not depend on neighbouring bytes.
    """
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    out = [scalar.hex()]
    for k in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            out.append(enc(bytes(k) + scalar).decode()[4:-4])
    return out


async def served_fingerprint(port: int, servername: str, cafile: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(cafile))
    _r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=servername)
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    w.close()
    return hashlib.sha256(der).hexdigest()


def issued(p: Proxy) -> bool:
    assert p.server.acme is not None
    return p.server.acme.state.last_result == "issued"


async def test_dns01_wildcard_from_pebble_is_served_and_verifies(tmp_path: Path, caplog: Any) -> None:
    """DNS-01 for *.zone answered by our responder; openssl verifies 1-2-3-4.zone against Pebble's root."""
    require_tool("openssl", "openssl")
    caplog.set_level(logging.DEBUG)
    dns_port, redirect = free_udp_tcp_port(), free_port()
    async with pebble_server(tmp_path, dns_port=dns_port, http_port=redirect) as pebble:
        async with running_proxy(tmp_path, **acme_sections(pebble, dns_port, redirect)) as p:
            await wait_for(lambda: issued(p), 60, "the first ACME certificate")
            out = await s_client(p.port, f"1-2-3-4.{ZONE}", pebble.roots)
            assert re.search(r"Pebble Intermediate", out), out
            assert p.server.certificate_problem is None
            store = p.server.certstore
            assert store is not None
            paths = store.live_paths(f"*.{ZONE}")
            assert paths is not None
            leaf = x509.load_pem_x509_certificate(paths[0].read_bytes())
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == [f"*.{ZONE}"]
            # The challenge record is withdrawn once the order is done.
            assert p.server.challenges is not None
            assert p.server.challenges.txt(f"_acme-challenge.{ZONE}") == []
            async with aiohttp.ClientSession() as s:
                r = await s.get(p.admin + "/metrics", headers=p.admin_headers)
                text = await r.text()
            assert 'consoleproxy_acme_renewals_total{result="issued"} 1.0' in text
            # Keys: 0600 on disk, and no key material in any log line.
            account = store.directory / "acme" / "account-key.pem"
            for path in (account, paths[1]):
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            fragments = [f for path in (account, paths[1]) for f in secret_fragments(path)]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "acme: ordering" in logged
    for fragment in fragments:
        assert fragment not in logged


async def test_http01_fqdn_on_the_redirect_port(tmp_path: Path) -> None:
    """HTTP-01 for an FQDN: Pebble fetches the key authorization from our redirect port."""
    require_tool("openssl", "openssl")
    dns_port, redirect = free_udp_tcp_port(), free_port()
    fqdn = f"127-0-0-1.{ZONE}"  # our responder resolves it to 127.0.0.1 for Pebble
    async with pebble_server(tmp_path, dns_port=dns_port, http_port=redirect) as pebble:
        sections = acme_sections(pebble, dns_port, redirect, challenge="http-01")
        sections["tls"] = {"fqdn": fqdn}
        async with running_proxy(tmp_path, **sections) as p:
            await wait_for(lambda: issued(p), 60, "the HTTP-01 certificate")
            await s_client(p.port, fqdn, pebble.roots)
            assert p.server.challenges is not None
            assert p.server.challenges.snapshot()["http"] == []
            # Anything else on the redirect port still redirects.
            async with aiohttp.ClientSession() as s:
                r = await s.get(f"http://127.0.0.1:{redirect}/.well-known/acme-challenge/nope",
                                allow_redirects=False)
                assert r.status == 404
                r = await s.get(f"http://127.0.0.1:{redirect}/console", allow_redirects=False)
                assert r.status == 301


async def test_renewal_of_a_short_lived_certificate_while_a_console_relays(tmp_path: Path) -> None:
    """Pebble issues 60-second certificates; the proxy renews before expiry; a console keeps relaying."""
    dns_port, redirect = free_udp_tcp_port(), free_port()
    async with (
        pebble_server(tmp_path, dns_port=dns_port, http_port=redirect, validity_seconds=60) as pebble,
        tcp_server(echo_backend) as vnc,
    ):
        # Due 52 s before expiry: 8 s after issuance.
        sections = acme_sections(pebble, dns_port, redirect, renew_before_days=52 / 86400)
        async with running_proxy(tmp_path, **sections) as p:
            await wait_for(lambda: issued(p), 60, "the first certificate")
            host = f"10-0-0-1.{ZONE}"
            first = await served_fingerprint(p.port, host, pebble.roots)
            ctx = ssl.create_default_context(cafile=str(pebble.roots))
            url = f"wss://{host}:{p.port}/websockify?token={p.token(port=vnc)}"
            async with RFBClient.connect(url, ssl=ctx, server_hostname=host,
                                         host="127.0.0.1", port=p.port) as c:
                await c.handshake()
                sent = bytearray()
                got = bytearray()
                n = 0
                renewed = False

                def renewed_here() -> bool:
                    acme = p.server.acme
                    assert acme is not None
                    return acme.state.issued >= 2

                async with asyncio.timeout(60):
                    while not renewed:
                        chunk = bytes([n % 251]) * 4096 + n.to_bytes(4, "big")
                        n += 1
                        await c.send(chunk)
                        sent += chunk
                        got += await c.read_exact(len(chunk))
                        renewed = renewed_here()
                        await asyncio.sleep(0.05)  # pacing: a console's trickle, not a flood
                    assert await served_fingerprint(p.port, host, pebble.roots) != first
                    for _ in range(3):  # and after the swap, on the same connection
                        chunk = bytes(range(256)) * 16
                        await c.send(chunk)
                        sent += chunk
                        got += await c.read_exact(len(chunk))
                assert got == sent
            assert p.server.acme is not None
            assert p.server.acme.state.issued >= 2
            store = p.server.certstore
            assert store is not None
            assert any(e["type"] == "previous" for e in store.list())  # the old bundle kept for rollback


class WrongTxt(ChallengeRecords):
    """Publishes a TXT value that is not the key authorization's digest."""

    def add_txt(self, name: str, value: str) -> None:
        super().add_txt(name, "wrong-" + value)


async def test_failures_keep_the_live_certificate_name_the_error_and_back_off(
    tmp_path: Path, caplog: Any
) -> None:
    """Wrong TXT, a rate limit, Pebble stopped: the live bundle stays, each error is named, waits grow."""
    caplog.set_level(logging.INFO)
    dns_port, redirect = free_udp_tcp_port(), free_port()
    store = CertStore(tmp_path / "certs")
    ensure_dev_certificate(store.directory, f"*.{ZONE}")
    live_before = store.live_paths(f"*.{ZONE}")
    assert live_before is not None
    chain_before = live_before[0].read_bytes()
    records = WrongTxt()
    metrics = Metrics()
    installs: list[int] = []
    async with (
        pebble_server(tmp_path, dns_port=dns_port, http_port=redirect) as pebble,
        DnsServer(DnsSettings(zone=ZONE, listen=f"127.0.0.1:{dns_port}"), challenges=records),
    ):
        cfg = make_config(tmp_path, **acme_sections(pebble, dns_port, redirect))
        manager = AcmeManager(
            cfg, store, records, lock=None, metrics=metrics, on_installed=lambda: installs.append(1)
        )
        status = await manager.renew_now()
        assert status["last_result"] == "challenge_failed", status
        assert "urn:ietf:params:acme:error:" in status["last_error"], status
        assert f"{ZONE} dns-01" in status["last_error"], status
        assert (status["failures"], status["backoff_seconds"]) == (1, 1.0)
        assert manager.problem() is None  # the live certificate is far from expiry: still ready

        # A rate-limit answer: its Retry-After (300 s) is the floor of the wait.
        async with rate_limiting_front(pebble, retry_after=300) as limited:
            cfg_limited = make_config(
                tmp_path, **acme_sections(pebble, dns_port, redirect, directory=limited)
            )
            limited_manager = AcmeManager(
                cfg_limited, store, records, lock=None, metrics=metrics,
                on_installed=lambda: installs.append(1),
            )  # fmt: skip
            status = await limited_manager.renew_now()
        assert status["last_result"] == "rate_limited", status
        assert "urn:ietf:params:acme:error:rateLimited" in status["last_error"], status
        assert status["backoff_seconds"] == 300.0

        await pebble.stop()
        status = await manager.renew_now()
        assert status["last_result"] == "unreachable", status
        assert "unreachable" in status["last_error"]
        assert (status["failures"], status["backoff_seconds"]) == (2, 2.0)  # doubled

    live_after = store.live_paths(f"*.{ZONE}")
    assert live_after is not None and live_after[0].read_bytes() == chain_before
    assert installs == []
    text = metrics.render().decode()
    assert 'consoleproxy_acme_renewals_total{result="challenge_failed"} 1.0' in text
    assert 'consoleproxy_acme_renewals_total{result="unreachable"} 1.0' in text
    assert 'consoleproxy_acme_renewals_total{result="rate_limited"} 1.0' in text
    lines = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "failed (challenge_failed)" in lines[0] and "the live certificate stays" in lines[0]


@pytest.mark.parametrize("replay_kind", ["sqlite", "redis"])
async def test_two_instances_one_order_both_serve_it(
    tmp_path: Path, replay_kind: str, request: pytest.FixtureRequest
) -> None:
    """A shared store directory and replay store: one instance orders, both serve the bundle.

    Pebble asks instance B's DNS responder, while A (started first) usually holds the lock: the
    TXT record then reaches B through the shared challenge file.
    """
    dns_a, dns_b, redirect = free_udp_tcp_port(), free_udp_tcp_port(), free_port()
    shared = tmp_path / "shared-certs"
    if replay_kind == "redis":
        replay = request.getfixturevalue("redis_server").url  # the lock across hosts
    else:
        replay = f"sqlite:///{tmp_path / 'replay.db'}"  # the lock across processes of one machine
    async with pebble_server(tmp_path, dns_port=dns_b, http_port=redirect) as pebble:
        sa = acme_sections(pebble, dns_a, free_port())
        sb = acme_sections(pebble, dns_b, redirect)
        for sec in (sa, sb):
            sec["tls"]["store"] = str(shared)
            sec["cluster"] = {"replay_store": replay}
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with (
            running_proxy(tmp_path / "a", **sa) as a,
            running_proxy(tmp_path / "b", keyring=a.keyring, **sb) as b,
        ):
            ma, mb = a.server.acme, b.server.acme
            assert ma is not None and mb is not None
            await wait_for(lambda: ma.state.issued + mb.state.issued == 1, 60, "one certificate")
            store = CertStore(shared)

            async def both_serve_it() -> bool:
                paths = store.live_paths(f"*.{ZONE}")
                assert paths is not None
                leaf = x509.load_pem_x509_certificate(paths[0].read_bytes())
                want = leaf.fingerprint(hashes.SHA256()).hex()
                try:
                    fa = await served_fingerprint(a.port, f"1-2-3-4.{ZONE}", pebble.roots)
                    fb = await served_fingerprint(b.port, f"1-2-3-4.{ZONE}", pebble.roots)
                except ssl.SSLCertVerificationError:
                    return False  # still the development certificate
                return fa == fb == want

            # Two handshakes a poll: slow enough for the per-address connection rate limit.
            await wait_for(both_serve_it, 30, "both instances to serve the new certificate", interval=0.3)
            assert ma.state.orders + mb.state.orders == 1  # exactly one order reached the CA
            installer = mb if ma.state.issued else ma
            text = (a if installer is ma else b).server.metrics.render().decode()
            assert 'consoleproxy_acme_renewals_total{result="installed"} 1.0' in text
            # Pebble asked B's responder; it answered the TXT record whoever ordered.
            assert 'consoleproxy_dns_queries_total{rcode="NOERROR"}' in b.server.metrics.render().decode()
