"""Certificate store: CloudStack-style items in, verified TLS bundles out (DESIGN.md section 6).

Inputs mirror CloudStack's ``uploadCustomCertificate``: items named by the operator, each with an
``id`` (1 root, 2... intermediates, server certificate last), a PEM certificate, and for the server
item a private key and the domain suffix (``*.consoleproxy.company.com``) or FQDN it serves.

The pure part (``parse_certificate_pem``, ``parse_private_key_pem``, ``verify_bundle``) takes text and
returns values or raises ``CertificateError`` naming the failing item; warnings are returned.

On-disk layout of a store directory::

    items/<name>.json        staged input items: {"name", "id", "certificate", "privatekey",
                             "domainsuffix"}; the key (if any) is stored decrypted as PKCS#8,
                             so every item file is 0600
    bundles/<key>-<stamp>/   one verified bundle, never modified after it is written:
        chain.pem            leaf then intermediates: what the server sends (the root is not sent,
                             a client must already trust it)
        root.pem             the trust anchor, kept so ``verify`` can re-check the whole chain
        key.pem              unencrypted PKCS#8 for the ssl module, 0600
        meta.json            key, names, not_after, fingerprint, created, items, digest
    live/<key>               symlink -> ../bundles/<dir>, one per domain suffix / FQDN
    previous/<key>           symlink to the bundle that was live before (for ``rollback``)
    .lock                    flock serialising writers (CLI and admin API may import at once)

``<key>`` is the suffix or FQDN with a wildcard written ``_.`` (``_.consoleproxy.company.com``):
``_`` is not a valid host-name character, so a wildcard key never collides with an FQDN key.
Going live replaces a symlink with ``os.replace``, which is atomic: a reader sees the old bundle
or the new one, never a mix, and a failed import leaves the live bundle byte-identical.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .atomicfile import write_atomic
from .errors import ConsoleProxyError, HostnameError
from .hostnames import normalize_suffix

__all__ = [
    "CertStore",
    "CertificateError",
    "ImportResult",
    "Item",
    "SNIContexts",
    "ServerKey",
    "VerifiedBundle",
    "bundle_key",
    "ip_or_dns",
    "make_ssl_context",
    "parse_certificate_pem",
    "parse_private_key_pem",
    "verify_bundle",
]

ServerKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

MIN_RSA_BITS = 2048
EXPIRY_WARNING = dt.timedelta(days=30)
_ALLOWED_CURVES = ("secp256r1", "secp384r1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BEGIN_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_BLOCK_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END ([A-Z0-9 ]+)-----", re.S)
_HEADER_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*:")
_CERT_LABELS = ("CERTIFICATE", "X509 CERTIFICATE")
_KEY_LABELS = ("PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")


# The item name devcert uses for its server certificate; a real upload for the same suffix replaces it.
DEV_SERVER_ITEM = "dev-server"


class CertificateError(ConsoleProxyError):
    """A certificate, key or bundle is unusable; ``item`` names the failing item (None: the set)."""

    def __init__(self, message: str, item: str | None = None) -> None:
        super().__init__(message)
        self.item = item


def _err(item: str | None, message: str) -> CertificateError:
    prefix = f"item {item!r}: " if item is not None else ""
    return CertificateError(prefix + message, item)


# --------------------------------------------------------------------------------------------------
# PEM armour and the URL-decoding repair


@dataclass
class _Block:
    label: str
    headers: list[tuple[str, str]]
    body: str


def _find_blocks(text: str, item: str, what: str) -> list[_Block]:
    if not text or not text.strip():
        raise _err(item, f"the {what} is empty")
    if "-----BEGIN" not in text and re.search(r"%(0A|0D|2B|2F|3D|20)", text, re.I):
        raise _err(item, f"the {what} looks URL-encoded (%0A, %2B...); decode it exactly once")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" not in text.strip() and "\\n" in text:
        # Pasted from a JSON string: the line breaks are still escaped.
        text = text.replace("\\n", "\n")
    begins = _BEGIN_RE.findall(text)
    if not begins:
        raise _err(item, f"the {what} has no PEM armour (expected a '-----BEGIN ...-----' line)")
    blocks: list[_Block] = []
    for m in _BLOCK_RE.finditer(text):
        label, body, end_label = m.group(1), m.group(2), m.group(3)
        if label != end_label:
            raise _err(item, f"garbled PEM armour: 'BEGIN {label}' ends with 'END {end_label}'")
        headers, rest = _split_headers(body)
        blocks.append(_Block(label, headers, rest))
    if len(blocks) != len(begins):
        raise _err(item, f"garbled PEM armour: '-----BEGIN {begins[-1]}-----' without a matching END line")
    return blocks


def _split_headers(body: str) -> tuple[list[tuple[str, str]], str]:
    """RFC 1421 headers (``Proc-Type``, ``DEK-Info``) end at the first blank line; base64 has no ':'."""
    lines = body.split("\n")
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines) or not _HEADER_RE.match(lines[i].strip()):
        return [], body
    headers: list[tuple[str, str]] = []
    while i < len(lines) and lines[i].strip():
        name, _, value = lines[i].strip().partition(":")
        headers.append((name.strip(), value.strip()))
        i += 1
    return headers, "\n".join(lines[i:])


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _has_spaces(body: str) -> bool:
    """Spaces on a base64 line: the sign of URL-decoding damage (or of indentation)."""
    return any(line.strip() and " " in line for line in body.replace("\t", "").split("\n"))


def _body_candidates(body: str) -> tuple[bytes | None, list[bytes]]:
    """(the body decoded as it is, distinct decodings that assume '+' became spaces).

    URL-decoding turns '+' into ' '. A space inside a base64 line cannot be anything else, so it is
    put back; spaces at the ends of lines are ambiguous (indentation or a lost '+'), so both readings
    are tried and the caller keeps only readings whose DER parses.
    """
    plain = _b64("".join(body.split()))
    lines = [line.replace("\t", "") for line in body.split("\n")]
    if not _has_spaces(body):
        return plain, []
    readings: list[str] = [
        "".join(line.replace(" ", "+") for line in lines),
        "".join(line.strip().replace(" ", "+") for line in lines),
    ]
    content = [line for line in lines if line.strip()]
    if len(content) == 1:
        # The line breaks became spaces too: standard PEM lines are 64 characters, so every 65th
        # character is a former line break and the other spaces are former '+'.
        one = content[0].strip()
        chunks = [one[i : i + 65] for i in range(0, len(one), 65)]
        if all(len(c) == 65 and c[64] == " " for c in chunks[:-1]):
            readings.append("".join(c[:64].replace(" ", "+") for c in chunks))
    repaired: list[bytes] = []
    for reading in readings:
        der = _b64(reading)
        if der is not None and der not in repaired and der != plain:
            repaired.append(der)
    return plain, repaired


def _repair_warning(item: str) -> str:
    return f"item {item!r}: repaired '+' characters turned into spaces"


# --------------------------------------------------------------------------------------------------
# Parsing


def parse_certificate_pem(text: str, item: str, warnings: list[str] | None = None) -> x509.Certificate:
    """One PEM certificate; a URL-decoding repair is appended to ``warnings`` when given."""
    blocks = _find_blocks(text, item, "certificate")
    certs = [b for b in blocks if b.label in _CERT_LABELS]
    if not certs:
        found = blocks[0].label
        if "PRIVATE KEY" in found:
            raise _err(item, f"expected a certificate but found a '{found}' block (keys go in privatekey)")
        raise _err(item, f"expected a certificate but found a '{found}' PEM block")
    if len(certs) > 1:
        raise _err(
            item,
            f"holds {len(certs)} certificates; upload each as its own item "
            "(root id 1, intermediates 2..., server certificate last)",
        )
    plain, repaired = _body_candidates(certs[0].body)
    if plain is not None:
        with contextlib.suppress(ValueError):
            return x509.load_der_x509_certificate(plain)
    parsed: dict[bytes, x509.Certificate] = {}
    for der in repaired:
        with contextlib.suppress(ValueError):
            parsed[der] = x509.load_der_x509_certificate(der)
    if len(parsed) == 1:
        if warnings is not None:
            warnings.append(_repair_warning(item))
        return next(iter(parsed.values()))
    if len(parsed) > 1:
        raise _err(item, "base64 damaged ('+' turned into spaces) and the repair is ambiguous; re-upload it")
    if _has_spaces(certs[0].body):
        raise _err(
            item,
            "the certificate's base64 is damaged ('+' characters turned into spaces?) and could not be "
            "repaired; upload it again without URL-decoding damage",
        )
    if plain is None:
        raise _err(
            item,
            "the certificate's base64 is damaged (invalid characters or length; were '+' characters "
            "lost in URL encoding?)",
        )
    raise _err(
        item,
        "the certificate's base64 is damaged: it decodes but is not a valid X.509 certificate (truncated, "
        "or '+' characters lost in URL encoding?)",
    )


def _check_key_type(key: object, item: str, warnings: list[str]) -> ServerKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise _err(item, f"RSA key of {key.key_size} bits is too weak (at least {MIN_RSA_BITS})")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _ALLOWED_CURVES:
            raise _err(item, f"EC curve {key.curve.name} is not accepted (P-256 or P-384)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        warnings.append(f"item {item!r}: browsers do not accept Ed25519 server certificates yet")
        return key
    raise _err(item, f"unsupported private key type {type(key).__name__} (RSA, EC P-256/P-384, Ed25519)")


def parse_private_key_pem(
    text: str, passphrase: bytes | str | None, item: str
) -> tuple[ServerKey, list[str]]:
    """PKCS#8 (plain or encrypted), PKCS#1 / SEC1 and legacy encrypted PEM -> (key, warnings)."""
    warnings: list[str] = []
    blocks = _find_blocks(text, item, "private key")
    keys = [b for b in blocks if b.label in _KEY_LABELS]
    if not keys:
        found = blocks[0].label
        if found in _CERT_LABELS:
            raise _err(item, "expected a private key but found a certificate")
        if found == "OPENSSH PRIVATE KEY":
            raise _err(item, "OpenSSH key format is not accepted; convert it to PKCS#8 PEM")
        raise _err(item, f"unsupported PEM block '{found}' for a private key (PKCS#8 expected)")
    if len(keys) > 1:
        raise _err(item, f"holds {len(keys)} private keys; give exactly one")
    block = keys[0]
    password = passphrase.encode() if isinstance(passphrase, str) else passphrase
    password = password or None
    proc_encrypted = any(n.lower() == "proc-type" and "ENCRYPTED" in v.upper() for n, v in block.headers)
    encrypted = block.label == "ENCRYPTED PRIVATE KEY" or proc_encrypted
    if encrypted and password is None:
        raise _err(item, "the private key is encrypted; give its passphrase")
    if not encrypted and password is not None:
        warnings.append(f"item {item!r}: a passphrase was given but the private key is not encrypted")
        password = None
    plain, repaired = _body_candidates(block.body)
    candidates = [(d, False) for d in ([plain] if plain is not None else [])]
    candidates += [(d, True) for d in repaired]
    wrong_passphrase = False
    loaded: Any = None
    for der, was_repaired in candidates:
        # Rebuilt as clean PEM so the legacy headers (Proc-Type, DEK-Info) keep working.
        pem = f"-----BEGIN {block.label}-----\n"
        pem += "".join(f"{n}: {v}\n" for n, v in block.headers) + ("\n" if block.headers else "")
        b64 = base64.b64encode(der).decode()
        pem += "".join(b64[i : i + 64] + "\n" for i in range(0, len(b64), 64))
        pem += f"-----END {block.label}-----\n"
        try:
            loaded = serialization.load_pem_private_key(pem.encode(), password)
        except ValueError as exc:
            if "password" in str(exc).lower() or "decrypt" in str(exc).lower():
                wrong_passphrase = True
            continue
        except TypeError:
            continue
        except UnsupportedAlgorithm as exc:
            raise _err(item, f"the private key uses an unsupported algorithm or cipher ({exc})") from None
        if was_repaired:
            warnings.append(_repair_warning(item))
        break
    if loaded is None:
        if wrong_passphrase:
            raise _err(item, "wrong passphrase for the encrypted private key")
        raise _err(item, "the private key is damaged (base64 or DER does not parse)")
    if proc_encrypted:
        warnings.append(
            f"item {item!r}: legacy encrypted PEM key (Proc-Type: 4,ENCRYPTED) accepted; PKCS#8 is "
            "expected: openssl pkcs8 -topk8 -in yourprivate.key -out yourprivate.pkcs8.key"
        )
    elif block.label in ("RSA PRIVATE KEY", "EC PRIVATE KEY"):
        kind = "PKCS#1" if block.label.startswith("RSA") else "SEC1"
        warnings.append(
            f"item {item!r}: {kind} key ('BEGIN {block.label}') accepted; PKCS#8 is expected: "
            "openssl pkcs8 -topk8 -nocrypt -in yourprivate.key -out yourprivate.pkcs8.key"
        )
    return _check_key_type(loaded, item, warnings), warnings


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


def _key_dirname(key: str) -> str:
    return "_." + key[2:] if key.startswith("*.") else key


def _dirname_key(name: str) -> str:
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


def _dn(name: x509.Name) -> str:
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
        raise _err(item, f"certificate is not yet valid (valid from {start:%Y-%m-%d %H:%M} UTC)")
    if now > end:
        raise _err(item, f"certificate expired on {end:%Y-%m-%d %H:%M} UTC")
    if end - now < EXPIRY_WARNING:
        warnings.append(f"item {item!r}: certificate expires in {(end - now).days} days ({end:%Y-%m-%d})")


def _check_ca(cert: x509.Certificate, item: str) -> None:
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise _err(
            item,
            f"'{_dn(cert.subject)}' is not a CA certificate (BasicConstraints CA:TRUE missing); only the "
            "server certificate item carries a private key",
        )
    ku = _ext(cert, x509.KeyUsage)
    if ku is not None and not ku.key_cert_sign:
        raise _err(item, "CA certificate's keyUsage lacks keyCertSign")


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
            raise _err(item, f"certificate does not cover {key_name!r} (no subjectAltName, CN {cns})")
        warnings.append(
            f"item {item!r}: no subjectAltName; browsers ignore the CN, reissue with "
            f"subjectAltName=DNS:{key_name}"
        )
        names = cns
    elif key_name.startswith("*."):
        if key_name not in names:
            raise _err(item, f"certificate does not cover {key_name!r} (subjectAltName has {names})")
    elif not any(_covers(n, key_name) for n in names):
        raise _err(item, f"certificate does not cover {key_name!r} (subjectAltName has {names})")
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise _err(item, "certificate's extendedKeyUsage lacks serverAuth (TLS Web Server Authentication)")
    return names


@dataclass
class _Parsed:
    item: Item
    cert: x509.Certificate
    key: ServerKey | None


def _parse_item(item: Item, passphrase: bytes | str | None, now: dt.datetime, warnings: list[str]) -> _Parsed:
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
            raise _err(item.name, "the private key does not belong to this certificate")
        if not item.domain_suffix:
            raise _err(item.name, "the server certificate needs a domain suffix (*.example.com) or FQDN")
        key_name = _item_key(item)
        _check_leaf(cert, key_name, item.name, warnings)
    else:
        _check_ca(cert, item.name)
        if cert.subject == cert.issuer and not _signed_by(cert, cert):
            raise _err(item.name, "self-issued certificate whose self-signature does not verify")
    _check_dates(cert, item.name, now, warnings)
    return _Parsed(item, cert, key)


def _item_key(item: Item) -> str:
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
    server = _parse_item(with_key[0], passphrase, now, warnings)
    assert server.key is not None
    cas: list[_Parsed] = []
    seen: dict[bytes, str] = {server.cert.fingerprint(hashes.SHA256()): server.item.name}
    for it in sorted((i for i in items if i is not with_key[0]), key=lambda i: (i.id, i.name)):
        parsed = _parse_item(it, None, now, warnings)
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
            raise _err(current.item.name, "certificate chain longer than 16")
        by_name = [c for c in cas if c.cert.subject == current.cert.issuer and all(c is not p for p in chain)]
        if not by_name:
            raise _err(
                current.item.name,
                f"no issuer found for '{_dn(current.cert.subject)}' (issued by "
                f"'{_dn(current.cert.issuer)}'; upload that certificate as an item)",
            )
        signed = [c for c in by_name if _signed_by(current.cert, c.cert)]
        if not signed:
            raise _err(
                current.item.name,
                f"'{_dn(current.cert.subject)}' is not signed by item {by_name[0].item.name!r} (the issuer "
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
            raise _err(link.item.name, f"pathLenConstraint {bc.path_length} is exceeded by the chain")
    if len(chain) == 1:
        warnings.append(
            f"item {server.item.name!r}: the server certificate is self-signed; browsers will warn unless "
            "it is trusted explicitly"
        )
    used = {p.item.name for p in chain}
    for c in cas:
        if c.item.name not in used:
            warnings.append(f"item {c.item.name!r} is not part of the chain of {server.item.name!r}")

    key_name = _item_key(server.item)
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


# --------------------------------------------------------------------------------------------------
# TLS contexts


def make_ssl_context(chain_path: Path | str, key_path: Path | str) -> ssl.SSLContext:
    """Server context: TLS >= 1.2, forward-secret AEAD suites only, ALPN http/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 list only; TLS 1.3 suites are all AEAD and keep OpenSSL's defaults.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(["http/1.1"])
    # One TLS 1.3 session ticket per connection, not OpenSSL's two: enough for the browser to
    # resume the page's session for the console's WebSocket, and 60 us less per handshake.
    ctx.num_tickets = 1
    try:
        ctx.load_cert_chain(str(chain_path), str(key_path))
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"cannot load certificate {chain_path} / key {key_path}: {exc}") from None
    return ctx


class SNIContexts:
    """One SSLContext per live bundle, chosen per handshake by server name.

    Listeners are created once with ``context``; its ``sni_callback`` hands every new handshake the
    context of the current bundle, so ``reload`` changes certificates for new handshakes while
    established connections keep theirs.
    """

    def __init__(self, store: CertStore, default_key: str | None = None) -> None:
        self.store = store
        self.default_key = bundle_key(default_key) if default_key else None
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.default: ssl.SSLContext | None = None
        self.context: ssl.SSLContext | None = None
        self.reload()

    def reload(self) -> list[str]:
        """Re-reads the store; on any error the current contexts stay in use and the error is raised."""
        bundles = self.store.live_bundles()
        if not bundles:
            raise CertificateError(f"no live certificate bundle in {self.store.directory}")
        contexts = {key: make_ssl_context(chain, keyp) for key, (chain, keyp) in bundles.items()}
        default_key = self.default_key if self.default_key in contexts else _default_key(list(contexts))
        chain, keyp = bundles[default_key]
        if self.context is None:
            self.context = make_ssl_context(chain, keyp)
            self.context.sni_callback = self.sni_callback
        else:
            # The listener's context keeps the default certificate current for clients that never
            # reach the callback's switch (OpenSSL copies it at SSL_new, so live connections keep theirs).
            self.context.load_cert_chain(str(chain), str(keyp))
        self.contexts = contexts
        self.default = contexts[default_key]
        return sorted(contexts)

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            host = server_name.lower().rstrip(".")
            if host in self.contexts:
                return self.contexts[host]
            head, _, rest = host.partition(".")
            if head and ("*." + rest) in self.contexts:
                return self.contexts["*." + rest]
        assert self.default is not None
        return self.default

    def sni_callback(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self.select(server_name)


def _default_key(keys: list[str]) -> str:
    """Without a configured default: wildcards first, then by name (stable across restarts)."""
    return sorted(keys, key=lambda k: (not k.startswith("*."), k))[0]


# --------------------------------------------------------------------------------------------------
# The store on disk


@dataclass
class ImportResult:
    item: str
    status: str  # "live" (a bundle went live), "staged" (waiting for more items), "unchanged"
    message: str
    warnings: list[str] = field(default_factory=list)
    waiting_for: list[str] = field(default_factory=list)
    bundles: list[dict[str, Any]] = field(default_factory=list)


def _write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    write_atomic(path, data, mode=mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)  # rename(2) over the old symlink: atomic


def _split_pem_certs(data: str) -> list[str]:
    return [m.group(0) for m in _BLOCK_RE.finditer(data) if m.group(1) == "CERTIFICATE"]


class CertStore:
    """The store directory (layout in the module docstring). Writers hold an flock."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.items_dir = self.directory / "items"
        self.bundles_dir = self.directory / "bundles"
        self.live_dir = self.directory / "live"
        self.previous_dir = self.directory / "previous"

    # -- reading --------------------------------------------------------------------------------

    def items(self) -> list[Item]:
        if not self.items_dir.is_dir():
            return []
        out: list[Item] = []
        for path in sorted(self.items_dir.glob("*.json")):
            data = json.loads(path.read_text())
            out.append(
                Item(
                    name=data["name"],
                    id=int(data["id"]),
                    certificate=data["certificate"],
                    private_key=data.get("privatekey") or None,
                    domain_suffix=data.get("domainsuffix") or None,
                )
            )
        return sorted(out, key=lambda i: (i.id, i.name))

    def _bundle_dir(self, which: Path, key: str) -> Path | None:
        link = which / _key_dirname(key)
        if not link.is_symlink() and not link.exists():
            return None
        real = link.resolve()
        return real if real.is_dir() else None

    def _keys(self, which: Path) -> list[str]:
        if not which.is_dir():
            return []
        return sorted(_dirname_key(p.name) for p in which.iterdir() if not p.name.startswith("."))

    def live_bundles(self) -> dict[str, tuple[Path, Path]]:
        """key -> (chain.pem, key.pem), resolved once so both files come from the same bundle."""
        out: dict[str, tuple[Path, Path]] = {}
        for key in self._keys(self.live_dir):
            d = self._bundle_dir(self.live_dir, key)
            if d is not None and (d / "chain.pem").is_file() and (d / "key.pem").is_file():
                out[key] = (d / "chain.pem", d / "key.pem")
        return out

    def live_paths(self, key: str | None = None) -> tuple[Path, Path] | None:
        """(chain.pem, key.pem) of ``key``'s bundle, or of the default one (wildcards first)."""
        bundles = self.live_bundles()
        if not bundles:
            return None
        if key is None:
            return bundles[_default_key(list(bundles))]
        return bundles.get(bundle_key(key))

    def _meta(self, d: Path | None) -> dict[str, Any] | None:
        if d is None or not (d / "meta.json").is_file():
            return None
        meta: dict[str, Any] = json.loads((d / "meta.json").read_text())
        meta["directory"] = str(d)
        return meta

    def verify(self, key: str | None = None, *, now: dt.datetime | None = None) -> VerifiedBundle:
        """Re-checks a live bundle from its files (dates against ``now``); raises when missing/invalid."""
        bundles = self.live_bundles()
        if not bundles:
            raise CertificateError(f"no live certificate bundle in {self.directory}")
        k = _default_key(list(bundles)) if key is None else bundle_key(key)
        if k not in bundles:
            raise CertificateError(f"no live certificate bundle for {k!r} in {self.directory}")
        d = bundles[k][0].parent
        meta = self._meta(d) or {}
        certs = _split_pem_certs((d / "chain.pem").read_text())
        root = (d / "root.pem").read_text() if (d / "root.pem").is_file() else ""
        if root and (not certs or root.strip() != certs[0].strip()):
            certs.append(root)
        if not certs:
            raise CertificateError(f"live bundle {d} has no certificate")
        names = list(meta.get("items") or [])
        if len(names) != len(certs):
            names = ["server"] + [f"chain{i}" for i in range(1, len(certs))]
        items = [Item(names[0], len(certs), certs[0], (d / "key.pem").read_text(), k)]
        items += [
            Item(n, len(certs) - i, c) for i, (n, c) in enumerate(zip(names[1:], certs[1:], strict=True), 1)
        ]
        return verify_bundle(items, now=now)

    # -- writing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def import_item(
        self, item: Item, passphrase: bytes | str | None = None, *, now: dt.datetime | None = None
    ) -> ImportResult:
        """Adds or replaces ``item``; a complete chain goes live, an invalid item is not stored."""
        now = now or dt.datetime.now(dt.UTC)
        with self._locked():
            return self._import(item, passphrase, now)

    def _import(self, item: Item, passphrase: bytes | str | None, now: dt.datetime) -> ImportResult:
        warnings: list[str] = []
        existing = {i.name: i for i in self.items()}
        if item.private_key and not item.domain_suffix and existing.get(item.name, item).domain_suffix:
            # Renewal under the same name may omit the suffix: keep the one already stored.
            item = Item(
                item.name, item.id, item.certificate, item.private_key, existing[item.name].domain_suffix
            )
        parsed = _parse_item(item, passphrase, now, warnings)
        # Store canonical text: repaired base64, and the key decrypted to PKCS#8 (the file is 0600).
        stored = Item(
            item.name,
            item.id,
            parsed.cert.public_bytes(serialization.Encoding.PEM).decode(),
            None
            if parsed.key is None
            else parsed.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
            _item_key(item) if parsed.key is not None else None,
        )
        items = {**existing, stored.name: stored}
        cas = [i for i in items.values() if i.private_key is None]
        servers = [i for i in items.values() if i.private_key is not None]

        built: list[VerifiedBundle] = []
        waiting: list[str] = []
        if stored.private_key is not None:
            for other in servers:
                if other.name == DEV_SERVER_ITEM != stored.name:
                    continue  # a development certificate gives way to the first real one
                if other.name != stored.name and other.domain_suffix == stored.domain_suffix:
                    raise _err(
                        stored.name,
                        f"{stored.domain_suffix!r} is already served by item {other.name!r}; upload under "
                        "that name to replace it",
                    )
            # The server item is the trigger: its chain must verify now, else nothing changes.
            bundle = verify_bundle([stored, *cas], now=now)
            built.append(bundle)
            warnings.extend(bundle.warnings)
        else:
            if not servers:
                waiting.append("server certificate")
            for server in servers:
                try:
                    bundle = verify_bundle([server, *cas], now=now)
                except CertificateError as exc:
                    waiting.append(f"server certificate matching the new chain ({exc})")
                else:
                    built.append(bundle)
                    warnings.extend(bundle.warnings)
            ca_certs = [(ca.name, parse_certificate_pem(ca.certificate, ca.name)) for ca in cas]
            subjects = {cert.subject for _n, cert in ca_certs}
            for name, cert in ca_certs:
                if cert.issuer != cert.subject and cert.issuer not in subjects:
                    waiting.append(f"issuer of item {name!r} ('{_dn(cert.issuer)}')")

        went_live = self._commit(stored, existing.get(stored.name), built, now)
        if went_live and stored.private_key is not None and stored.name != DEV_SERVER_ITEM:
            dev = self.items_dir / f"{DEV_SERVER_ITEM}.json"
            if dev.exists() and DEV_SERVER_ITEM in existing and (
                existing[DEV_SERVER_ITEM].domain_suffix == stored.domain_suffix
            ):
                dev.unlink()
        warnings = list(dict.fromkeys(warnings))
        if went_live:
            keys = ", ".join(repr(m["key"]) for m in went_live)
            msg = f"live: {keys}"
            if waiting:
                msg += "; still waiting for: " + "; ".join(waiting)
            return ImportResult(stored.name, "live", msg, warnings, waiting, went_live)
        if built:
            return ImportResult(stored.name, "unchanged", "stored; the live bundle is unchanged", warnings)
        return ImportResult(
            stored.name, "staged", "staged, waiting for: " + "; ".join(waiting), warnings, waiting
        )

    def _commit(
        self, stored: Item, replaced: Item | None, built: list[VerifiedBundle], now: dt.datetime
    ) -> list[dict[str, Any]]:
        """Writes bundles, then the item, then swaps links; the old item returns if anything fails."""
        for d in (self.items_dir, self.bundles_dir, self.live_dir, self.previous_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.items_dir.chmod(0o700)  # item files hold decrypted keys
        new_dirs: list[tuple[str, Path, dict[str, Any]]] = []
        for bundle in built:
            live_meta = self._meta(self._bundle_dir(self.live_dir, bundle.key_name))
            if live_meta is not None and live_meta.get("digest") == bundle.digest():
                continue
            new_dirs.append((bundle.key_name, *self._write_bundle(bundle, now)))
        item_path = self.items_dir / f"{stored.name}.json"
        old_bytes = item_path.read_bytes() if replaced is not None and item_path.is_file() else None
        record = {
            "name": stored.name,
            "id": stored.id,
            "certificate": stored.certificate,
            "privatekey": stored.private_key,
            "domainsuffix": stored.domain_suffix,
        }
        try:
            _write_file(item_path, json.dumps(record, indent=1).encode(), 0o600)
            _fsync_dir(self.items_dir)
            for key, d, _meta in new_dirs:
                name = _key_dirname(key)
                old = self.live_dir / name
                if old.is_symlink():
                    _swap_link(self.previous_dir / name, os.readlink(old))
                _swap_link(old, f"../bundles/{d.name}")
            _fsync_dir(self.live_dir)
            _fsync_dir(self.previous_dir)
        except BaseException:
            if old_bytes is not None:
                _write_file(item_path, old_bytes, 0o600)
            elif replaced is None:
                item_path.unlink(missing_ok=True)
            raise
        self._collect_garbage()
        return [meta for _k, _d, meta in new_dirs]

    def _write_bundle(self, bundle: VerifiedBundle, now: dt.datetime) -> tuple[Path, dict[str, Any]]:
        stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
        d = self.bundles_dir / f"{_key_dirname(bundle.key_name)}-{stamp}-{secrets.token_hex(3)}"
        tmp = d.with_name("." + d.name + ".tmp")
        tmp.mkdir(mode=0o700)
        meta: dict[str, Any] = {
            "key": bundle.key_name,
            "names": bundle.names,
            "not_after": bundle.not_after.isoformat(),
            "fingerprint": bundle.fingerprint,
            "subject": _dn(bundle.leaf.subject),
            "issuer": _dn(bundle.leaf.issuer),
            "created": now.isoformat(),
            "items": bundle.items,
            "digest": bundle.digest(),
            "warnings": bundle.warnings,
        }
        _write_file(tmp / "chain.pem", bundle.pem_chain())
        _write_file(tmp / "root.pem", bundle.pem_root())
        _write_file(tmp / "key.pem", bundle.pem_key(), 0o600)
        _write_file(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        _fsync_dir(tmp)
        os.rename(tmp, d)
        _fsync_dir(self.bundles_dir)
        return d, meta

    def _collect_garbage(self) -> None:
        """Only bundles that live/ or previous/ point at are kept."""
        keep = set()
        for which in (self.live_dir, self.previous_dir):
            for key in self._keys(which):
                d = self._bundle_dir(which, key)
                if d is not None:
                    keep.add(d.name)
        for d in self.bundles_dir.iterdir():
            if d.is_dir() and d.name not in keep and not d.name.startswith("."):
                shutil.rmtree(d, ignore_errors=True)

    def rollback(self, key: str | None = None) -> dict[str, Any]:
        """Swaps previous and live for ``key`` (default: the only/default bundle); returns new live meta."""
        with self._locked():
            keys = self._keys(self.previous_dir)
            if key is not None:
                k = bundle_key(key)
            elif keys:
                live = self._keys(self.live_dir)
                k = _default_key(live) if live else keys[0]
            else:
                raise CertificateError(f"no previous certificate bundle in {self.directory}")
            name = _key_dirname(k)
            prev_link, live_link = self.previous_dir / name, self.live_dir / name
            prev_dir = self._bundle_dir(self.previous_dir, k)
            if prev_dir is None:
                raise CertificateError(f"no previous certificate bundle for {k!r} in {self.directory}")
            prev_target = os.readlink(prev_link)
            live_target = os.readlink(live_link) if live_link.is_symlink() else None
            _swap_link(live_link, prev_target)
            if live_target is not None:
                # Keeping the replaced bundle as "previous" makes a second rollback undo the first.
                _swap_link(prev_link, live_target)
            else:
                prev_link.unlink()
            _fsync_dir(self.live_dir)
            _fsync_dir(self.previous_dir)
            meta = self._meta(prev_dir)
            assert meta is not None
            return meta

    # Defined last: inside the class body the name shadows the builtin used in annotations above.
    def list(self) -> list[dict[str, Any]]:
        """Items (never their keys) then one entry per live and previous bundle."""
        out: list[dict[str, Any]] = []
        for it in self.items():
            entry: dict[str, Any] = {"type": "item", "name": it.name, "id": it.id}
            try:
                cert = parse_certificate_pem(it.certificate, it.name)
            except CertificateError as exc:
                entry["error"] = str(exc)
            else:
                entry |= {
                    "subject": _dn(cert.subject),
                    "issuer": _dn(cert.issuer),
                    "not_after": cert.not_valid_after_utc.isoformat(),
                    "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
                }
            entry["has_private_key"] = it.private_key is not None
            if it.domain_suffix:
                entry["domainsuffix"] = it.domain_suffix
            out.append(entry)
        for which, label in ((self.live_dir, "live"), (self.previous_dir, "previous")):
            for key in self._keys(which):
                meta = self._meta(self._bundle_dir(which, key))
                if meta is not None:
                    out.append({"type": label, **meta})
        return out


def ip_or_dns(name: str) -> x509.GeneralName:
    """``127.0.0.1`` -> IPAddress, anything else -> DNSName (shared with the dev certificate)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
