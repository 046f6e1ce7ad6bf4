"""Development certificate: a local root CA and a wildcard leaf, made live through the CertStore.

Used by ``consoleproxy demo`` and by ``serve`` when no certificate is configured (DESIGN.md 2, 6).
The CA is written beside the store (``dev-ca.pem``; its key ``dev-ca.key``, 0600) so the operator can
trust it in a browser once; the leaf goes through ``CertStore.import_item`` like any upload, so the
dev bundle is checked by the same code as a production one. EC P-256 keeps generation instant.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consoleproxy.atomicfile import write_atomic
from consoleproxy.tls.certchain import EXPIRY_WARNING, Item, VerifiedBundle, bundle_key, ip_or_dns
from consoleproxy.tls.certpem import CertificateError
from consoleproxy.tls.certstore import CertStore

__all__ = ["CA_FILE", "CA_KEY_FILE", "ensure_dev_certificate", "write_private"]

CA_FILE = "dev-ca.pem"
CA_KEY_FILE = "dev-ca.key"
CA_ITEM = "dev-root"
SERVER_ITEM = "dev-server"
CA_DAYS = 3650
# Browsers cap leaf lifetimes (398 days for public CAs, 825 for locally trusted ones on macOS).
LEAF_DAYS = 397


def write_private(path: Path, data: bytes) -> None:
    """A secret file: 0600 from the first byte (O_CREAT mode), then an atomic rename into place
    (a unique temporary name, so two writers never share one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, mode=0o600)


@contextlib.contextmanager
def _locked(store_dir: Path) -> Iterator[None]:
    # Two processes starting at once must not each make a CA and overwrite the other's.
    fd = os.open(store_dir / ".devcert.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_ca(store_dir: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The existing dev CA if both files parse, belong together and have more than 30 days left."""
    try:
        cert = x509.load_pem_x509_certificate((store_dir / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key((store_dir / CA_KEY_FILE).read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        return None
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        return None
    return cert, key


def _make_ca(store_dir: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "consoleproxy development"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"consoleproxy development CA ({socket.gethostname()})"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(
        store_dir / CA_KEY_FILE,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    write_atomic(store_dir / CA_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert, key


def _make_leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([ip_or_dns(n) for n in names]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _is_current(bundle: VerifiedBundle, ca: x509.Certificate, names: Sequence[str]) -> bool:
    if bundle.root.fingerprint(hashes.SHA256()) != ca.fingerprint(hashes.SHA256()):
        return False
    if bundle.not_after - dt.datetime.now(dt.UTC) < EXPIRY_WARNING:
        return False
    covered = {n.lower() for n in bundle.names}
    return all(n.lower() in covered for n in names)


def ensure_dev_certificate(
    store_dir: Path,
    suffix: str = "*.consoleproxy.local",
    extra_names: Sequence[str] = ("localhost", "127.0.0.1"),
) -> Path:
    """Makes (once) a dev CA and a live wildcard bundle; returns the CA file to trust in a browser.

    Idempotent: an existing dev CA and a current dev bundle are kept. A valid live bundle for the
    suffix that the dev CA did not issue is left alone, and its root.pem is returned instead.
    """
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    key_name = bundle_key(suffix)
    names = [key_name, *extra_names]
    now = dt.datetime.now(dt.UTC)
    store = CertStore(store_dir)
    with _locked(store_dir):
        try:
            bundle: VerifiedBundle | None = store.verify(key_name)
        except CertificateError:
            bundle = None
        if bundle is not None and bundle.items[0] != SERVER_ITEM:
            # An operator's certificate is live for this suffix: never replace it with a dev one.
            paths = store.live_paths(key_name)
            assert paths is not None
            return paths[0].parent / "root.pem"
        loaded = _load_ca(store_dir, now)
        if loaded is not None and bundle is not None and _is_current(bundle, loaded[0], names):
            return store_dir / CA_FILE
        ca, ca_key = loaded if loaded is not None else _make_ca(store_dir, now)
        leaf, leaf_key = _make_leaf(ca, ca_key, names, now)
        pem = serialization.Encoding.PEM
        store.import_item(Item(CA_ITEM, 1, ca.public_bytes(pem).decode()))
        store.import_item(
            Item(
                SERVER_ITEM,
                2,
                leaf.public_bytes(pem).decode(),
                leaf_key.private_bytes(
                    pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ).decode(),
                key_name,
            )
        )
    return store_dir / CA_FILE
