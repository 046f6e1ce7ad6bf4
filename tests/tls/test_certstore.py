"""Certificate store: the Mold guide's openssl steps, every bad input, renewal, rollback, SNI."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from certutil_helpers import (
    PASS,
    SUFFIX,
    Cert,
    Chain,
    OpensslPKI,
    make_cert,
    make_chain,
    now,
    openssl,
    rsa_key,
    snapshot,
)
from conftest import require_tool, starts_program
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from harness import running_proxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consoleproxy.tls.certchain import Item, verify_bundle
from consoleproxy.tls.certpem import CertificateError, parse_certificate_pem, parse_private_key_pem
from consoleproxy.tls.certsni import SNIContexts, make_ssl_context
from consoleproxy.tls.certstore import CertStore
from consoleproxy.tls.devcert import ensure_dev_certificate

HOST = "10-1-2-3.consoleproxy.company.com"


# --------------------------------------------------------------------------------------------------
# TLS plumbing: a bare asyncio TLS server (no proxy) and clients


@asynccontextmanager
async def tls_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)  # echo, so a test can use a connection after a reload
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def peer(
    port: int, server_hostname: str, cafile: Path | None = None
) -> tuple[bytes, str | None, asyncio.StreamWriter, asyncio.StreamReader]:
    """(leaf DER the server presented, ALPN, writer, reader); verifies against ``cafile`` when given."""
    if cafile is not None:
        ctx = ssl.create_default_context(cafile=str(cafile))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname
    )
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True)
    return der, sslobj.selected_alpn_protocol(), writer, reader


async def presented(port: int, server_hostname: str, cafile: Path | None = None) -> bytes:
    der, _alpn, writer, _reader = await peer(port, server_hostname, cafile)
    writer.close()
    return hashlib.sha256(der).digest()


# --------------------------------------------------------------------------------------------------
# The Mold guide, step by step, with the openssl CLI


@pytest.fixture(scope="module")
@starts_program  # openssl
def guide(tmp_path_factory: pytest.TempPathFactory) -> OpensslPKI:
    require_tool("openssl", "openssl")
    pki = OpensslPKI(tmp_path_factory.mktemp("guide"))
    pki.make_cas()
    d, pw = pki.dir, f"pass:{PASS}"
    # 2.1 new 2048-bit private key (OpenSSL 3 writes it as encrypted PKCS#8 despite the name).
    openssl("genrsa", "-des3", "-passout", pw, "-out", "yourprivate.key", "2048", cwd=d)
    # 2.2 CSR for the wildcard.
    openssl(
        "req", "-new", "-key", "yourprivate.key", "-passin", pw, "-out", "yourcertificate.csr",
        "-subj", "/CN=*.consoleproxy.company.com",
        "-addext", "subjectAltName=DNS:*.consoleproxy.company.com",
        cwd=d,
    )  # fmt: skip
    # 2.3 the "CA's website": our test intermediate signs it.
    pki.sign("yourcertificate.csr", "yourcertificate.pem")
    # 2.4 to encrypted PKCS#8, 2.5 to plain PKCS#8 (what Mold's UI takes).
    openssl(
        "pkcs8", "-topk8", "-in", "yourprivate.key", "-passin", pw,
        "-out", "yourprivate.pkcs8.encrypted.key", "-passout", pw,
        cwd=d,
    )  # fmt: skip
    openssl(
        "pkcs8", "-in", "yourprivate.pkcs8.encrypted.key", "-passin", pw, "-out", "yourprivate.pkcs8.key",
        cwd=d,
    )  # fmt: skip
    # An old-style key: genrsa -des3 -traditional gives "BEGIN RSA PRIVATE KEY" + Proc-Type: 4,ENCRYPTED.
    openssl("genrsa", "-des3", "-traditional", "-passout", pw, "-out", "traditional.key", "2048", cwd=d)
    openssl(
        "req", "-new", "-key", "traditional.key", "-passin", pw, "-out", "traditional.csr",
        "-subj", "/CN=*.consoleproxy.company.com",
        cwd=d,
    )  # fmt: skip
    pki.sign("traditional.csr", "traditional.pem")
    return pki


def import_cas(store: CertStore, pki: OpensslPKI) -> None:
    r1 = store.import_item(Item("root1", 1, pki.read("root.pem")))
    assert r1.status == "staged" and r1.message == "staged, waiting for: server certificate"
    r2 = store.import_item(Item("intermed1", 2, pki.read("intermed1.pem")))
    assert r2.status == "staged" and r2.waiting_for == ["server certificate"]


@pytest.mark.integration
def test_guide_files_are_what_the_guide_says(guide: OpensslPKI) -> None:
    assert "BEGIN ENCRYPTED PRIVATE KEY" in guide.read("yourprivate.pkcs8.encrypted.key")
    assert "BEGIN PRIVATE KEY" in guide.read("yourprivate.pkcs8.key")
    assert "Proc-Type: 4,ENCRYPTED" in guide.read("traditional.key")


@pytest.mark.integration
async def test_guide_plain_pkcs8_goes_live_and_serves_tls(guide: OpensslPKI, tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    import_cas(store, guide)
    result = store.import_item(
        Item("server", 3, guide.read("yourcertificate.pem"), guide.read("yourprivate.pkcs8.key"), SUFFIX)
    )
    assert result.status == "live", result.message
    assert result.warnings == []
    bundle = store.verify()
    assert [c.subject.rfc4514_string() for c in bundle.chain] == [
        "CN=*.consoleproxy.company.com",
        "CN=Test Intermediate CA,O=Example Test",
        "CN=Test Root CA,O=Example Test",
    ]
    paths = store.live_paths()
    assert paths is not None
    chain_path, key_path = paths
    # We send leaf + intermediate; the root is the client's trust anchor and is not sent.
    assert chain_path.read_text().count("BEGIN CERTIFICATE") == 2
    assert key_path.stat().st_mode & 0o777 == 0o600

    # The real proxy's public listener serving this store (not a bare TLS server).
    async with running_proxy(tmp_path, listen={"tls": True}, tls={"store": str(store.directory)}) as p:
        port = p.port
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST,
            "-verify_hostname", HOST, "-CAfile", str(guide.dir / "root.pem"),
            "-verify_return_error", "-showcerts",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out_b, _ = await asyncio.wait_for(proc.communicate(), 30)
        out = out_b.decode()
        assert proc.returncode == 0, out
        assert "Verify return code: 0 (ok)" in out
        assert out.count("-----BEGIN CERTIFICATE-----") == 2  # leaf + intermediate sent
        assert re.search(r"depth=2 .*Test Root CA", out), out  # and the client built up to the root

        der, alpn, writer, _ = await peer(port, HOST, guide.dir / "root.pem")
        writer.close()
        assert hashlib.sha256(der).digest() == bundle.leaf.fingerprint(hashes.SHA256())
        assert alpn == "http/1.1"
        with pytest.raises(ssl.SSLCertVerificationError):
            await peer(port, "10-1-2-3.other.company.com", guide.dir / "root.pem")


@pytest.mark.integration
def test_guide_encrypted_pkcs8_with_passphrase(guide: OpensslPKI, tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    import_cas(store, guide)
    key = guide.read("yourprivate.pkcs8.encrypted.key")
    result = store.import_item(Item("server", 3, guide.read("yourcertificate.pem"), key, SUFFIX), PASS)
    assert result.status == "live" and result.warnings == []
    # Stored decrypted as PKCS#8 (0600): the server needs no passphrase at reload time.
    stored = tmp_path / "certs" / "items" / "server.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert stored.parent.stat().st_mode & 0o777 == 0o700
    assert "BEGIN PRIVATE KEY" in json.loads(stored.read_text())["privatekey"]
    assert PASS not in stored.read_text()


@pytest.mark.integration
def test_guide_genrsa_des3_key_imported_directly(guide: OpensslPKI, tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    import_cas(store, guide)
    item = Item("server", 3, guide.read("yourcertificate.pem"), guide.read("yourprivate.key"), SUFFIX)
    assert store.import_item(item, PASS.encode()).status == "live"


@pytest.mark.integration
def test_traditional_encrypted_key_accepted_with_warning(guide: OpensslPKI, tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    import_cas(store, guide)
    item = Item("server", 3, guide.read("traditional.pem"), guide.read("traditional.key"), SUFFIX)
    result = store.import_item(item, PASS)
    assert result.status == "live"
    assert any("Proc-Type: 4,ENCRYPTED" in w and "openssl pkcs8 -topk8" in w for w in result.warnings)
    # The CSR had no SAN, but the CA's v3_leaf section added one.
    assert store.verify().names == ["*.consoleproxy.company.com"]


def test_pkcs1_key_accepted_with_warning() -> None:
    cert = make_cert(SUFFIX, key=rsa_key())
    key, warnings = parse_private_key_pem(cert.key_pem(fmt="pkcs1"), None, "server")
    assert key.key_size == 2048  # type: ignore[union-attr]
    assert len(warnings) == 1 and "PKCS#1" in warnings[0] and "openssl pkcs8 -topk8" in warnings[0]


def test_key_types() -> None:
    ed = Cert(make_cert(SUFFIX).cert, ed25519.Ed25519PrivateKey.generate())
    _key, warnings = parse_private_key_pem(ed.key_pem(), None, "server")
    assert warnings == ["item 'server': browsers do not accept Ed25519 server certificates yet"]
    dsa_pem = Cert(make_cert(SUFFIX).cert, dsa.generate_private_key(2048)).key_pem()
    with pytest.raises(CertificateError, match="unsupported private key type") as exc:
        parse_private_key_pem(dsa_pem, None, "server")
    assert exc.value.item == "server"
    p384 = Cert(make_cert(SUFFIX).cert, ec.generate_private_key(ec.SECP384R1())).key_pem()
    assert parse_private_key_pem(p384, None, "server")[1] == []


# --------------------------------------------------------------------------------------------------
# Bad inputs: a specific error naming the item, and the store byte-identical


@pytest.fixture
def live_store(tmp_path: Path) -> tuple[CertStore, Chain]:
    store = CertStore(tmp_path / "certs")
    chain = make_chain()
    for item in chain.items():
        store.import_item(item)
    assert store.live_paths() is not None
    return store, chain


def _plus_inter(c: Chain) -> str:
    """PEM of an intermediate under ``c.root`` with '+' inside its base64 (an EC one may have none)."""
    for _ in range(100):
        pem = make_cert("Test Intermediate CA", issuer=c.root, ca=True).pem
        if any("+" in line.strip("+") for line in pem.splitlines()[1:4]):
            return pem
    raise AssertionError("no '+' in 100 certificates")


BAD: dict[str, tuple[Callable[[Chain], tuple[Item, str | None]], str, str | None]] = {
    "key of another certificate": (
        lambda c: (Item("server", 3, c.leaf.pem, make_cert(SUFFIX).key_pem(), SUFFIX), None),
        "the private key does not belong to this certificate",
        "server",
    ),
    "missing intermediate": (
        # A leaf from another CA chain whose intermediate was never uploaded.
        lambda c: (make_chain(inter_cn="Other Intermediate CA").items()[2], None),
        "no issuer found for 'CN=*.consoleproxy.company.com' (issued by 'CN=Other Intermediate CA'",
        "server",
    ),
    "expired server certificate": (
        lambda c: (
            _leaf_item(
                make_cert(SUFFIX, issuer=c.inter, not_before=_days(-400), not_after=_days(-2)),
            ),
            None,
        ),
        "certificate expired on",
        "server",
    ),
    "expired intermediate": (
        lambda c: (
            Item(
                "intermed2",
                2,
                make_cert("Old CA", issuer=c.root, ca=True, not_before=_days(-90), not_after=_days(-1)).pem,
            ),
            None,
        ),
        "certificate expired on",
        "intermed2",
    ),
    "not yet valid": (
        lambda c: (
            _leaf_item(make_cert(SUFFIX, issuer=c.inter, not_before=_days(3), not_after=_days(90))),
            None,
        ),
        "not yet valid",
        "server",
    ),
    "certificate not covering the suffix": (
        lambda c: (_leaf_item(make_cert("*.other.company.com", issuer=c.inter)), None),
        "does not cover '*.consoleproxy.company.com'",
        "server",
    ),
    "one host name is not the wildcard": (
        lambda c: (_leaf_item(make_cert(HOST, issuer=c.inter)), None),
        "does not cover '*.consoleproxy.company.com'",
        "server",
    ),
    "garbage": (
        lambda c: (Item("intermed1", 2, "this is not a certificate\n"), None),
        "no PEM armour",
        "intermed1",
    ),
    "empty input": (lambda c: (Item("root1", 1, "  \n"), None), "the certificate is empty", "root1"),
    "plus damage beyond repair": (
        lambda c: (Item("intermed1", 2, _plus_inter(c).replace("+", "")), None),
        "base64 is damaged",
        "intermed1",
    ),
    "plus damage and a lost character": (
        lambda c: (Item("intermed1", 2, _flip(_plus_inter(c).replace("+", " "))), None),
        "could not be repaired",
        "intermed1",
    ),
    "wrong passphrase": (
        lambda c: (
            Item("server", 3, c.leaf.pem, c.leaf.key_pem(passphrase=PASS), SUFFIX),
            "not the passphrase",
        ),
        "wrong passphrase for the encrypted private key",
        "server",
    ),
    "missing passphrase": (
        lambda c: (Item("server", 3, c.leaf.pem, c.leaf.key_pem(passphrase=PASS), SUFFIX), None),
        "the private key is encrypted; give its passphrase",
        "server",
    ),
    "RSA key too short": (
        lambda c: (_leaf_item(make_cert(SUFFIX, issuer=c.inter, key=rsa_key(1024))), None),
        "RSA key of 1024 bits is too weak",
        "server",
    ),
    "P-521 key": (
        lambda c: (
            _leaf_item(make_cert(SUFFIX, issuer=c.inter, key=ec.generate_private_key(ec.SECP521R1()))),
            None,
        ),
        "EC curve secp521r1 is not accepted",
        "server",
    ),
    "client-only EKU": (
        lambda c: (
            _leaf_item(make_cert(SUFFIX, issuer=c.inter, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])),
            None,
        ),
        "lacks serverAuth",
        "server",
    ),
    "intermediate that is not a CA": (
        lambda c: (Item("intermed2", 2, make_cert("Not A CA", issuer=c.root, sans=[]).pem), None),
        "is not a CA certificate",
        "intermed2",
    ),
    "issuer name matches, signature does not": (
        lambda c: (_leaf_item(make_cert(SUFFIX, issuer=make_cert("Test Intermediate CA", ca=True))), None),
        "is not signed by item 'intermed1'",
        "server",
    ),
    "END line missing": (
        lambda c: (Item("root1", 1, c.root.pem.split("-----END")[0]), None),
        "without a matching END line",
        "root1",
    ),
    "key pasted as certificate": (
        lambda c: (Item("root1", 1, c.leaf.key_pem()), None),
        "expected a certificate but found a 'PRIVATE KEY' block",
        "root1",
    ),
    "whole chain in one item": (
        lambda c: (Item("server", 3, c.leaf.pem + c.inter.pem, c.leaf.key_pem(), SUFFIX), None),
        "holds 2 certificates",
        "server",
    ),
    "malformed suffix": (
        lambda c: (Item("server", 3, c.leaf.pem, c.leaf.key_pem(), "*.bad_suffix.com"), None),
        "domain suffix",
        "server",
    ),
    "URL-encoded twice": (
        lambda c: (
            Item("root1", 1, c.root.pem.replace("\n", "%0A").replace("-----BEGIN", "%2D" * 5 + "BEGIN")),
            None,
        ),
        "looks URL-encoded",
        "root1",
    ),
}


def _days(n: int) -> dt.datetime:
    return now() + dt.timedelta(days=n)


def _leaf_item(cert: Cert) -> Item:
    return Item("server", 3, cert.pem, cert.key_pem(), SUFFIX)


def _flip(pem: str) -> str:
    """Drops one base64 character (not a space): no reading of the spaces can restore the length."""
    lines = pem.split("\n")
    line = lines[1]
    i = next(i for i in range(10, len(line)) if line[i] != " ")
    lines[1] = line[:i] + line[i + 1 :]
    return "\n".join(lines)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_rejected_and_store_untouched(case: str, live_store: tuple[CertStore, Chain]) -> None:
    store, chain = live_store
    make, expected, item_name = BAD[case]
    item, passphrase = make(chain)
    before = snapshot(store.directory)
    with pytest.raises(CertificateError) as exc:
        store.import_item(item, passphrase)
    assert expected in str(exc.value)
    assert exc.value.item == item_name
    if item_name:
        assert f"item {item_name!r}" in str(exc.value)
    assert snapshot(store.directory) == before
    assert store.verify().leaf == chain.leaf.cert


def test_repairable_plus_damage_is_accepted_with_warning(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    root = make_cert("Test Root CA", ca=True)
    # Make an intermediate whose base64 has '+' inside a line (nearly always; bounded retry).
    for _ in range(50):
        inter = make_cert("Test Intermediate CA", issuer=root, ca=True)
        if any("+" in line.strip("+") for line in inter.pem.splitlines()):
            break
    damaged = inter.pem.replace("+", " ")
    assert damaged != inter.pem
    store.import_item(Item("root1", 1, root.pem))
    result = store.import_item(Item("intermed1", 2, damaged))
    assert result.warnings == ["item 'intermed1': repaired '+' characters turned into spaces"]
    stored = json.loads((store.items_dir / "intermed1.json").read_text())
    assert stored["certificate"] == inter.pem  # stored repaired
    leaf = make_cert(SUFFIX, issuer=inter)
    assert store.import_item(_leaf_item(leaf)).status == "live"


def test_plus_damage_on_a_single_line_is_repaired() -> None:
    def unambiguous(pem: str) -> bool:
        # A '+' at either end of a base64 line becomes a space beside the line-join space: that
        # damage cannot be undone unambiguously; such damage is refused ("plus damage beyond repair" above).
        body = pem.strip().split("\n")[1:-1]
        return "+" in pem and not any(b.startswith("+") or b.endswith("+") for b in body)

    cert = make_cert("Test Root CA", ca=True)
    while not unambiguous(cert.pem):
        cert = make_cert("Test Root CA", ca=True)
    lines = cert.pem.strip().split("\n")
    flattened = lines[0] + "\n" + " ".join(lines[1:-1]).replace("+", " ") + "\n" + lines[-1]
    warnings: list[str] = []
    assert parse_certificate_pem(flattened, "root1", warnings) == cert.cert
    assert warnings == ["item 'root1': repaired '+' characters turned into spaces"]


def test_plus_damaged_key_is_repaired() -> None:
    cert = make_cert(SUFFIX, key=rsa_key())
    pem = cert.key_pem()
    assert "+" in pem
    key, warnings = parse_private_key_pem(pem.replace("+", " "), None, "server")
    assert key.private_numbers() == cert.key.private_numbers()  # type: ignore[union-attr]
    assert warnings == ["item 'server': repaired '+' characters turned into spaces"]


def test_indented_and_crlf_pem_needs_no_repair() -> None:
    cert = make_cert("Test Root CA", ca=True)
    text = "\r\n".join("    " + line for line in cert.pem.splitlines())
    warnings: list[str] = []
    assert parse_certificate_pem(text, "root1", warnings) == cert.cert
    assert warnings == []


# --------------------------------------------------------------------------------------------------
# Chain building and the rules of verify_bundle


def test_chain_order_comes_from_signatures_not_ids() -> None:
    chain = make_chain()
    items = [
        Item("server", 1, chain.leaf.pem, chain.leaf.key_pem(), SUFFIX),
        Item("zz-root", 7, chain.root.pem),
        Item("aa-inter", 9, chain.inter.pem),
    ]
    bundle = verify_bundle(items)
    assert bundle.chain == [chain.leaf.cert, chain.inter.cert, chain.root.cert]
    assert bundle.items == ["server", "aa-inter", "zz-root"]
    assert bundle.warnings == []


def test_exactly_one_item_with_a_key() -> None:
    chain = make_chain()
    items = chain.items()
    with pytest.raises(CertificateError, match="no item has a private key"):
        verify_bundle(items[:2])
    both = [Item("root1", 1, chain.root.pem, chain.root.key_pem(), SUFFIX), *items[1:]]
    with pytest.raises(CertificateError, match="both carry a private key") as exc:
        verify_bundle(both)
    assert exc.value.item == "server"


def test_fqdn_is_covered_by_exact_name_or_one_label_wildcard() -> None:
    chain = make_chain(sans=["*.example.net"])
    items = chain.items()
    ok = verify_bundle(
        [*items[:2], Item("server", 3, chain.leaf.pem, chain.leaf.key_pem(), "console.example.net")]
    )
    assert ok.key_name == "console.example.net"
    for fqdn in ("a.console.example.net", "example.net"):
        with pytest.raises(CertificateError, match="does not cover"):
            verify_bundle([*items[:2], Item("server", 3, chain.leaf.pem, chain.leaf.key_pem(), fqdn)])


def test_cn_fallback_only_without_san_and_with_warning() -> None:
    root = make_cert("Test Root CA", ca=True)
    leaf = make_cert(SUFFIX, issuer=root, sans=[])
    bundle = verify_bundle([Item("root1", 1, root.pem), _leaf_item(leaf)])
    assert any("no subjectAltName" in w for w in bundle.warnings)


def test_expiring_soon_is_a_warning() -> None:
    chain = make_chain()
    soon = chain.items()[2]
    bundle = verify_bundle(chain.items(), now=chain.leaf.cert.not_valid_after_utc - dt.timedelta(days=10))
    assert any("server" in w and "expires in" in w for w in bundle.warnings)
    assert soon.name == "server"


def test_self_signed_leaf_is_a_one_certificate_chain() -> None:
    leaf = make_cert(SUFFIX)  # self-signed, CA:FALSE
    bundle = verify_bundle([_leaf_item(leaf)])
    assert bundle.chain == [leaf.cert]
    assert bundle.pem_chain().count(b"BEGIN CERTIFICATE") == 1
    assert any("self-signed" in w for w in bundle.warnings)


def test_missing_basic_constraints_on_root_rejected() -> None:
    root = make_cert("Test Root CA", ca=True, basic_constraints=False)
    with pytest.raises(CertificateError, match="not a CA certificate") as exc:
        verify_bundle([Item("root1", 1, root.pem), _leaf_item(make_cert(SUFFIX, issuer=root))])
    assert exc.value.item == "root1"


# --------------------------------------------------------------------------------------------------
# Store: staging, renewal, rollback, verify


def test_staged_until_the_server_certificate_arrives(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    chain = make_chain()
    root, inter, server = chain.items()
    r = store.import_item(inter)
    assert r.status == "staged"
    assert r.waiting_for == ["server certificate", "issuer of item 'intermed1' ('CN=Test Root CA')"]
    assert store.import_item(root).message == "staged, waiting for: server certificate"
    assert store.live_paths() is None
    with pytest.raises(CertificateError, match="no live certificate bundle"):
        store.verify()
    live = store.import_item(server)
    assert live.status == "live" and live.message == "live: '*.consoleproxy.company.com'"
    assert store.import_item(server).status == "unchanged"
    kinds = [(e["type"], e.get("name")) for e in store.list()]
    assert kinds == [("item", "root1"), ("item", "intermed1"), ("item", "server"), ("live", None)]
    assert all("privatekey" not in e and "BEGIN" not in json.dumps(e) for e in store.list())


def test_renewal_under_the_same_names_then_rollback(live_store: tuple[CertStore, Chain]) -> None:
    store, old = live_store
    old_live = snapshot(store.directory / "live")
    new = make_chain()  # new root, intermediate and server under the same names and subjects
    new_root, new_inter, new_server = new.items()
    assert store.import_item(new_root).status == "staged"
    r = store.import_item(new_inter)
    assert r.status == "staged" and "server certificate matching the new chain" in r.message
    assert snapshot(store.directory / "live") == old_live  # still serving the old bundle
    assert store.verify().leaf == old.leaf.cert

    assert store.import_item(new_server).status == "live"
    assert store.verify().chain == [new.leaf.cert, new.inter.cert, new.root.cert]
    previous = [e for e in store.list() if e["type"] == "previous"]
    assert previous[0]["fingerprint"] == old.leaf.fingerprint.hex()

    meta = store.rollback()
    assert meta["fingerprint"] == old.leaf.fingerprint.hex()
    assert store.verify().chain == [old.leaf.cert, old.inter.cert, old.root.cert]
    assert store.rollback()["fingerprint"] == new.leaf.fingerprint.hex()  # rollback of the rollback


def test_rollback_without_previous_fails(live_store: tuple[CertStore, Chain]) -> None:
    store, _ = live_store
    with pytest.raises(CertificateError, match="no previous certificate bundle"):
        store.rollback()


def test_only_live_and_previous_bundles_are_kept(live_store: tuple[CertStore, Chain]) -> None:
    store, chain = live_store
    for _ in range(3):
        leaf = make_cert(SUFFIX, issuer=chain.inter)
        assert store.import_item(_leaf_item(leaf)).status == "live"
    assert len(list(store.bundles_dir.iterdir())) == 2


def test_verify_reports_expiry_after_going_live(live_store: tuple[CertStore, Chain]) -> None:
    store, chain = live_store
    later = chain.leaf.cert.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(CertificateError, match="expired"):
        store.verify(now=later)


def test_same_suffix_under_another_name_is_refused(live_store: tuple[CertStore, Chain]) -> None:
    store, chain = live_store
    leaf = make_cert(SUFFIX, issuer=chain.inter)
    with pytest.raises(CertificateError, match="already served by item 'server'"):
        store.import_item(Item("server2", 3, leaf.pem, leaf.key_pem(), SUFFIX))


def test_renewal_may_omit_the_suffix(live_store: tuple[CertStore, Chain]) -> None:
    store, chain = live_store
    leaf = make_cert(SUFFIX, issuer=chain.inter)
    assert store.import_item(Item("server", 3, leaf.pem, leaf.key_pem())).status == "live"


# --------------------------------------------------------------------------------------------------
# TLS contexts and SNI


def test_ssl_context_settings(live_store: tuple[CertStore, Chain]) -> None:
    store, _ = live_store
    paths = store.live_paths()
    assert paths is not None
    ctx = make_ssl_context(*paths)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & getattr(ssl, "OP_NO_RENEGOTIATION", 0) == getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all(n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n) for n in tls12)
    other = make_cert(SUFFIX).key_pem()
    bad_key = store.directory / "other.key"
    bad_key.write_text(other)
    with pytest.raises(CertificateError, match="cannot load certificate"):
        make_ssl_context(paths[0], bad_key)


async def test_sni_picks_the_bundle_by_server_name(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    chain = make_chain()
    for item in chain.items():
        store.import_item(item)
    fqdn_leaf = make_cert("console.example.net", issuer=chain.inter)
    r = store.import_item(Item("server-fqdn", 4, fqdn_leaf.pem, fqdn_leaf.key_pem(), "console.example.net"))
    assert r.status == "live"
    assert sorted(store.live_bundles()) == ["*.consoleproxy.company.com", "console.example.net"]

    sni = SNIContexts(store)
    assert sni.context is not None
    async with tls_server(sni.context) as port:
        assert await presented(port, HOST) == chain.leaf.fingerprint
        assert await presented(port, "console.example.net") == fqdn_leaf.fingerprint
        assert await presented(port, "") == chain.leaf.fingerprint  # no SNI: default (the wildcard)
        assert await presented(port, "unknown.example.org") == chain.leaf.fingerprint
        assert await presented(port, "a.b.consoleproxy.company.com") == chain.leaf.fingerprint

        # A connection made before the reload keeps working; new handshakes get the new certificate.
        _der, _alpn, writer, reader = await peer(port, "console.example.net")
        renewed = make_cert("console.example.net", issuer=chain.inter)
        store.import_item(Item("server-fqdn", 4, renewed.pem, renewed.key_pem(), "console.example.net"))
        assert sni.reload() == ["*.consoleproxy.company.com", "console.example.net"]
        assert await presented(port, "console.example.net") == renewed.fingerprint
        writer.write(b"still here")
        assert await reader.readexactly(10) == b"still here"
        writer.close()

    sni_fqdn_default = SNIContexts(store, default_key="console.example.net")
    assert sni_fqdn_default.context is not None
    async with tls_server(sni_fqdn_default.context) as port:
        assert await presented(port, "") == renewed.fingerprint


# --------------------------------------------------------------------------------------------------
# Development certificate


async def test_dev_certificate_is_live_and_stable(tmp_path: Path) -> None:
    ca_path = ensure_dev_certificate(tmp_path / "certs")
    assert ca_path == tmp_path / "certs" / "dev-ca.pem"
    assert (tmp_path / "certs" / "dev-ca.key").stat().st_mode & 0o777 == 0o600
    store = CertStore(tmp_path / "certs")
    first = store.verify("*.consoleproxy.local")
    assert set(first.names) == {"*.consoleproxy.local", "localhost", "127.0.0.1"}
    ca_bytes = ca_path.read_bytes()
    assert ensure_dev_certificate(tmp_path / "certs") == ca_path
    assert ca_path.read_bytes() == ca_bytes
    assert store.verify().fingerprint == first.fingerprint  # second call changed nothing

    paths = store.live_paths()
    assert paths is not None
    async with tls_server(make_ssl_context(*paths)) as port:
        for name in ("1-2-3-4.consoleproxy.local", "localhost", "127.0.0.1"):
            der, _alpn, writer, _ = await peer(port, name, ca_path)
            writer.close()
            assert x509.load_der_x509_certificate(der) == first.leaf


def test_dev_certificate_leaves_an_operator_bundle_alone(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    chain = make_chain("*.consoleproxy.local")
    for item in chain.items("*.consoleproxy.local"):
        store.import_item(item)
    before = snapshot(store.directory)
    path = ensure_dev_certificate(tmp_path / "certs")
    assert x509.load_pem_x509_certificate(path.read_bytes()) == chain.root.cert
    assert {k: v for k, v in snapshot(store.directory).items() if "devcert" not in k} == before


# --------------------------------------------------------------------------------------------------
# Fuzz: only CertificateError escapes the parsers


_REAL = make_cert("Fuzz Root", ca=True)
_REAL_KEY = _REAL.key_pem()

_texts = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda t: f"-----BEGIN CERTIFICATE-----\n{t}\n-----END CERTIFICATE-----\n", st.text(max_size=300)
    ),
    st.builds(
        lambda t: f"-----BEGIN PRIVATE KEY-----\n{t}\n-----END PRIVATE KEY-----\n", st.text(max_size=300)
    ),
    st.builds(
        lambda t: (
            f"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: {t}\n\nAAAA\n"
            "-----END RSA PRIVATE KEY-----\n"
        ),
        st.text(max_size=60),
    ),
    st.builds(
        lambda src, i, j, t: src[:i] + t + src[i + j :],
        st.sampled_from([_REAL.pem, _REAL_KEY]),
        st.integers(0, 700),
        st.integers(0, 40),
        st.text(alphabet="ABCxyz019+/= \n-", max_size=20),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_texts, passphrase=st.one_of(st.none(), st.binary(max_size=8)))
def test_parsers_raise_only_certificate_error(text: str, passphrase: bytes | None) -> None:
    parsers_raise_only_certificate_error(text, passphrase)


def parsers_raise_only_certificate_error(text: str, passphrase: bytes | None) -> None:
    """Both PEM parsers either return or raise CertificateError naming the item (also test_fuzz)."""
    for call in (
        lambda: parse_certificate_pem(text, "fuzz"),
        lambda: parse_private_key_pem(text, passphrase, "fuzz"),
    ):
        try:
            call()
        except CertificateError as exc:
            assert exc.item == "fuzz"


@pytest.mark.integration
async def test_one_session_ticket_per_tls13_connection(tmp_path: Path) -> None:
    """openssl s_client counts the NewSessionTicket messages of a real handshake with the proxy."""
    require_tool("openssl", "openssl")
    async with running_proxy(tmp_path, listen={"tls": True}) as p:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{p.port}", "-tls1_3", "-msg", "-quiet", "-ign_eof",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        # A request makes the client read past the handshake: the tickets come before the answer.
        out_b, _ = await asyncio.wait_for(
            proc.communicate(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n"), 30
        )
    out = out_b.decode(errors="replace")
    assert re.search(r"HTTP/1.[01] 200", out), out[-2000:]
    assert out.count("NewSessionTicket") == 1, out[-4000:]


def test_names_of_the_store_before_its_split_still_import() -> None:
    """certstore.py was split (certpem, certchain, certsni); code importing from it keeps working."""
    import consoleproxy.tls.certstore as store
    from consoleproxy.tls import certchain, certpem, certsni

    before = ["CertStore", "CertificateError", "ImportResult", "Item", "SNIContexts", "ServerKey",
              "VerifiedBundle", "bundle_key", "ip_or_dns", "make_ssl_context", "parse_certificate_pem",
              "parse_private_key_pem", "verify_bundle", "DEV_SERVER_ITEM", "EXPIRY_WARNING"]
    assert set(before) <= set(store.__all__)
    assert store.CertificateError is certpem.CertificateError
    assert store.verify_bundle is certchain.verify_bundle and store.SNIContexts is certsni.SNIContexts
