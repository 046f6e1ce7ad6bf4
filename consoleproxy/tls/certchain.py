"""Chain verification (TLS, pure): CloudStack-style items in, a ``VerifiedBundle`` out.

``verify_bundle`` orders the uploaded items (root, intermediates, the server certificate with its
key), checks every signature, date, CA flag, key usage and that the leaf covers the bundle's
domain suffix (``*.consoleproxy.company.com``) or FQDN; it raises ``CertificateError`` naming
the failing item, and returns warnings (near expiry, repaired PEM). Also the names of bundles:
``bundle_key`` (a suffix or FQDN, normalised) and its directory form (``_.`` for ``*.``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consoleproxy.errors import HostnameError
from consoleproxy.protocol.hostnames import normalize_suffix
from consoleproxy.tls.certpem import (
    CertificateError,
    ServerKey,
    item_error,
    parse_certificate_pem,
    parse_private_key_pem,
)

__all__ = [
    "DEV_SERVER_ITEM",
    "EXPIRY_WARNING",
    "Item",
    "VerifiedBundle",
    "bundle_key",
    "default_bundle_key",
    "dirname_key",
    "dn",
    "ip_or_dns",
    "key_dirname",
    "verify_bundle",
]

EXPIRY_WARNING = dt.timedelta(days=30)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# The item name devcert uses for its server certificate; a real upload for the same suffix replaces it.
DEV_SERVER_ITEM = "dev-server"

# --------------------------------------------------------------------------------------------------
# Items and bundle verification


@dataclass(frozen=True)
class Item:
    """One upload: ``id`` 1 root, 2... intermediates, server certificate last (ids only break ties)."""

    name: str
    id: int
    certificate: str
    private_key: str | None = None
    domain_suffix: str | None = None


def bundle_key(domain_suffix: str) -> str:
    """``*.Console.Example.com`` -> ``*.console.example.com``; an FQDN stays an FQDN (lower case)."""
    s = domain_suffix.strip()
    wildcard = s.startswith("*.")
    try:
        norm = normalize_suffix(s)
    except HostnameError as exc:
        raise CertificateError(f"domain suffix: {exc}") from None
    if s.startswith("*") and not wildcard:
        raise CertificateError(f"domain suffix {domain_suffix!r}: a wildcard must be a whole label ('*.')")
    if not wildcard and "." not in norm:
        raise CertificateError(f"domain suffix {domain_suffix!r} is not a fully qualified name")
    return ("*." if wildcard else "") + norm


def key_dirname(key: str) -> str:
    return "_." + key[2:] if key.startswith("*.") else key


def dirname_key(name: str) -> str:
    return "*." + name[2:] if name.startswith("_.") else name


@dataclass
class VerifiedBundle:
    """A chain that verified: leaf first, then intermediates, then the root."""

    key_name: str
    leaf: x509.Certificate
    key: ServerKey
    chain: list[x509.Certificate]
    names: list[str]
    not_after: dt.datetime
    warnings: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return self.leaf.fingerprint(hashes.SHA256()).hex()

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]

    def pem_chain(self) -> bytes:
        """Leaf + intermediates, what the server sends; the root only when the leaf is the root."""
        sent = self.chain[:-1] if len(self.chain) > 1 else self.chain
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in sent)

    def pem_root(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def pem_key(self) -> bytes:
        """Unencrypted PKCS#8: the ssl module has no passphrase at reload time. Store it 0600."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def digest(self) -> str:
        return hashlib.sha256(self.pem_chain() + self.pem_root() + self.pem_key()).hexdigest()


def dn(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty name)"


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:
        return None


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_dates(cert: x509.Certificate, item: str, now: dt.datetime, warnings: list[str]) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise item_error(item, f"certificate is not yet valid (valid from {start:%Y-%m-%d %H:%M} UTC)")
    if now > end:
        raise item_error(item, f"certificate expired on {end:%Y-%m-%d %H:%M} UTC")
    if end - now < EXPIRY_WARNING:
        warnings.append(f"item {item!r}: certificate expires in {(end - now).days} days ({end:%Y-%m-%d})")


def _check_ca(cert: x509.Certificate, item: str) -> None:
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise item_error(
            item,
            f"'{dn(cert.subject)}' is not a CA certificate (BasicConstraints CA:TRUE missing); only the "
            "server certificate item carries a private key",
        )
    ku = _ext(cert, x509.KeyUsage)
    if ku is not None and not ku.key_cert_sign:
        raise item_error(item, "CA certificate's keyUsage lacks keyCertSign")


def _dns_names(cert: x509.Certificate) -> list[str] | None:
    san = _ext(cert, x509.SubjectAlternativeName)
    if san is None:
        return None
    names: list[str] = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def _covers(pattern: str, name: str) -> bool:
    """RFC 6125: a wildcard is the whole left-most label and stands for exactly one label."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and head != "*" and rest == pattern[2:]
    return False


def _check_leaf(cert: x509.Certificate, key_name: str, item: str, warnings: list[str]) -> list[str]:
    names = _dns_names(cert)
    if names is None:
        cns = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        ok = key_name in cns or (not key_name.startswith("*.") and any(_covers(c, key_name) for c in cns))
        if not ok:
            raise item_error(item, f"certificate does not cover {key_name!r} (no subjectAltName, CN {cns})")
        warnings.append(
            f"item {item!r}: no subjectAltName; browsers ignore the CN, reissue with "
            f"subjectAltName=DNS:{key_name}"
        )
        names = cns
    elif key_name.startswith("*."):
        if key_name not in names:
            raise item_error(item, f"certificate does not cover {key_name!r} (subjectAltName has {names})")
    elif not any(_covers(n, key_name) for n in names):
        raise item_error(item, f"certificate does not cover {key_name!r} (subjectAltName has {names})")
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise item_error(
            item, "certificate's extendedKeyUsage lacks serverAuth (TLS Web Server Authentication)"
        )
    return names


@dataclass
class ParsedItem:
    item: Item
    cert: x509.Certificate
    key: ServerKey | None


def parse_item(
    item: Item, passphrase: bytes | str | None, now: dt.datetime, warnings: list[str]
) -> ParsedItem:
    """Checks an item can pass on its own: parses, in date, a CA unless it has the key."""
    if not _NAME_RE.match(item.name):
        raise CertificateError(
            f"item name {item.name!r} must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or "
            "digit",
            item.name,
        )
    cert = parse_certificate_pem(item.certificate, item.name, warnings)
    key: ServerKey | None = None
    if item.private_key is not None and item.private_key.strip():
        key, key_warnings = parse_private_key_pem(item.private_key, passphrase, item.name)
        warnings.extend(key_warnings)
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise item_error(item.name, "the private key does not belong to this certificate")
        if not item.domain_suffix:
            raise item_error(
                item.name, "the server certificate needs a domain suffix (*.example.com) or FQDN"
            )
        key_name = item_key(item)
        _check_leaf(cert, key_name, item.name, warnings)
    else:
        _check_ca(cert, item.name)
        if cert.subject == cert.issuer and not _signed_by(cert, cert):
            raise item_error(item.name, "self-issued certificate whose self-signature does not verify")
    _check_dates(cert, item.name, now, warnings)
    return ParsedItem(item, cert, key)


def item_key(item: Item) -> str:
    try:
        return bundle_key(item.domain_suffix or "")
    except CertificateError as exc:
        raise CertificateError(f"item {item.name!r}: {exc}", item.name) from None


def verify_bundle(
    items: Sequence[Item], *, now: dt.datetime | None = None, passphrase: bytes | str | None = None
) -> VerifiedBundle:
    """Builds and checks the chain of the one item that carries a private key.

    ``passphrase`` decrypts that key. The chain is found by issuer name and signature, whatever the
    ids say; ids only order candidates that both verify (e.g. a renewed intermediate with the old key).
    """
    now = now or dt.datetime.now(dt.UTC)
    warnings: list[str] = []
    if not items:
        raise CertificateError("no certificate items")
    names = [i.name for i in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CertificateError(f"item name {dup[0]!r} appears more than once", dup[0])
    with_key = [i for i in items if i.private_key is not None and i.private_key.strip()]
    if not with_key:
        raise CertificateError("no item has a private key (the server certificate item needs one)")
    if len(with_key) > 1:
        raise CertificateError(
            f"items {with_key[0].name!r} and {with_key[1].name!r} both carry a private key; only the "
            "server certificate has one",
            with_key[1].name,
        )
    server = parse_item(with_key[0], passphrase, now, warnings)
    assert server.key is not None
    cas: list[ParsedItem] = []
    seen: dict[bytes, str] = {server.cert.fingerprint(hashes.SHA256()): server.item.name}
    for it in sorted((i for i in items if i is not with_key[0]), key=lambda i: (i.id, i.name)):
        parsed = parse_item(it, None, now, warnings)
        fp = parsed.cert.fingerprint(hashes.SHA256())
        if fp in seen:
            warnings.append(f"item {it.name!r} is the same certificate as item {seen[fp]!r}; ignored")
            continue
        seen[fp] = it.name
        cas.append(parsed)

    chain = [server]
    current = server
    while not (current.cert.subject == current.cert.issuer and _signed_by(current.cert, current.cert)):
        if len(chain) > 16:
            raise item_error(current.item.name, "certificate chain longer than 16")
        by_name = [c for c in cas if c.cert.subject == current.cert.issuer and all(c is not p for p in chain)]
        if not by_name:
            raise item_error(
                current.item.name,
                f"no issuer found for '{dn(current.cert.subject)}' (issued by "
                f"'{dn(current.cert.issuer)}'; upload that certificate as an item)",
            )
        signed = [c for c in by_name if _signed_by(current.cert, c.cert)]
        if not signed:
            raise item_error(
                current.item.name,
                f"'{dn(current.cert.subject)}' is not signed by item {by_name[0].item.name!r} (the issuer "
                "name matches but the signature does not verify: a different key, e.g. an old or new "
                "intermediate)",
            )
        # Tie-break: the issuer nearest in id below the current item (root 1, intermediates 2...).
        signed.sort(key=lambda c: (c.item.id < current.item.id, c.item.id), reverse=True)
        current = signed[0]
        chain.append(current)

    for depth, link in enumerate(chain[1:], start=1):
        bc = _ext(link.cert, x509.BasicConstraints)
        if bc is not None and bc.path_length is not None and depth - 1 > bc.path_length:
            raise item_error(link.item.name, f"pathLenConstraint {bc.path_length} is exceeded by the chain")
    if len(chain) == 1:
        warnings.append(
            f"item {server.item.name!r}: the server certificate is self-signed; browsers will warn unless "
            "it is trusted explicitly"
        )
    used = {p.item.name for p in chain}
    for c in cas:
        if c.item.name not in used:
            warnings.append(f"item {c.item.name!r} is not part of the chain of {server.item.name!r}")

    key_name = item_key(server.item)
    leaf_names = _check_leaf(server.cert, key_name, server.item.name, [])
    return VerifiedBundle(
        key_name=key_name,
        leaf=server.cert,
        key=server.key,
        chain=[p.cert for p in chain],
        names=leaf_names,
        not_after=min(p.cert.not_valid_after_utc for p in chain),
        warnings=list(dict.fromkeys(warnings)),
        items=[p.item.name for p in chain],
    )


def default_bundle_key(keys: list[str]) -> str:
    """Without a configured default: wildcards first, then by name (stable across restarts)."""
    return sorted(keys, key=lambda k: (not k.startswith("*."), k))[0]


def ip_or_dns(name: str) -> x509.GeneralName:
    """``127.0.0.1`` -> IPAddress, anything else -> DNSName (shared with the dev certificate)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
