"""PEM parsing and repair (TLS, pure): certificate and private-key text in, ``cryptography``
objects out, or ``CertificateError`` naming the failing item (DESIGN.md 6).

Operators paste PEM into CloudStack's ``uploadCustomCertificate``, which often arrives
URL-decoded (``+`` turned into spaces, newlines lost): such armour is repaired when exactly one
reading decodes, with a warning. Keys are checked for an allowed type and size
(RSA >= 2048 bits, P-256/P-384, Ed25519).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from consoleproxy.errors import ConsoleProxyError

__all__ = [
    "MIN_RSA_BITS",
    "CertificateError",
    "ServerKey",
    "item_error",
    "parse_certificate_pem",
    "parse_private_key_pem",
    "split_pem_certs",
]

ServerKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

MIN_RSA_BITS = 2048
_ALLOWED_CURVES = ("secp256r1", "secp384r1")
_BEGIN_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_BLOCK_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END ([A-Z0-9 ]+)-----", re.S)
_HEADER_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*:")
_CERT_LABELS = ("CERTIFICATE", "X509 CERTIFICATE")
_KEY_LABELS = ("PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")



class CertificateError(ConsoleProxyError):
    """A certificate, key or bundle is unusable; ``item`` names the failing item (None: the set)."""

    def __init__(self, message: str, item: str | None = None) -> None:
        super().__init__(message)
        self.item = item


def item_error(item: str | None, message: str) -> CertificateError:
    prefix = f"item {item!r}: " if item is not None else ""
    return CertificateError(prefix + message, item)


_err = item_error  # short: this module raises it on many long lines


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


def split_pem_certs(data: str) -> list[str]:
    return [m.group(0) for m in _BLOCK_RE.finditer(data) if m.group(1) == "CERTIFICATE"]
