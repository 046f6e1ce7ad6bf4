"""Test helpers: certificate authorities and certificates made with cryptography or the openssl CLI.

The cryptography builders are fast (EC P-256 by default) and can make what openssl makes awkward
(past dates, odd extensions). ``OpensslPKI`` follows the operator's steps from the Mold guide with
the real ``openssl`` program, so the formats are what operators actually paste.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consoleproxy.tls.certchain import Item

SUFFIX = "*.consoleproxy.company.com"
PASS = "correct horse battery staple"

Key = Any  # a cryptography private key


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@dataclass
class Cert:
    cert: x509.Certificate
    key: Key

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def fingerprint(self) -> bytes:
        return self.cert.fingerprint(hashes.SHA256())

    def key_pem(self, passphrase: str | None = None, fmt: str = "pkcs8") -> str:
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase.encode())
            if passphrase
            else serialization.NoEncryption()
        )
        pf = (
            serialization.PrivateFormat.PKCS8
            if fmt == "pkcs8"
            else serialization.PrivateFormat.TraditionalOpenSSL
        )
        data: bytes = self.key.private_bytes(serialization.Encoding.PEM, pf, enc)
        return data.decode()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_cert(
    cn: str,
    *,
    issuer: Cert | None = None,
    key: Key | None = None,
    ca: bool = False,
    sans: Sequence[str] | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.SERVER_AUTH,),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    basic_constraints: bool = True,
    issuer_name: str | None = None,
) -> Cert:
    """Self-signed when ``issuer`` is None; ``issuer_name`` forges the issuer DN (signed by ``issuer``)."""
    key = key or ec_key()
    sign_key = issuer.key if issuer else key
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_name) if issuer_name else (issuer.cert.subject if issuer else _name(cn)))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now() - dt.timedelta(days=1))
        .not_valid_after(not_after or now() + dt.timedelta(days=365))
    )
    if basic_constraints:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    b = b.add_extension(_ku(ca), critical=True)
    # Key identifiers, as real CAs issue them; RFC 5280 path validators (sslyze's) require them.
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if not ca:
        if eku is not None:
            b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if sans is None:
            sans = [cn]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return Cert(b.sign(sign_key, hashes.SHA256()), key)


@dataclass
class Chain:
    root: Cert
    inter: Cert
    leaf: Cert

    def items(self, suffix: str = SUFFIX, server: str = "server") -> list[Item]:
        return [
            Item("root1", 1, self.root.pem),
            Item("intermed1", 2, self.inter.pem),
            Item(server, 3, self.leaf.pem, self.leaf.key_pem(), suffix),
        ]


def make_chain(
    suffix: str = SUFFIX,
    *,
    root: Cert | None = None,
    root_cn: str = "Test Root CA",
    inter_cn: str = "Test Intermediate CA",
    sans: Sequence[str] | None = None,
) -> Chain:
    root = root or make_cert(root_cn, ca=True)
    inter = make_cert(inter_cn, issuer=root, ca=True)
    leaf = make_cert(suffix, issuer=inter, sans=sans if sans is not None else [suffix])
    return Chain(root, inter, leaf)


# --------------------------------------------------------------------------------------------------
# openssl CLI


def openssl(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


V3_EXT = """\
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[v3_leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:*.consoleproxy.company.com
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass
class OpensslPKI:
    """A test root and intermediate made with openssl; ``sign`` issues a server certificate for a CSR."""

    dir: Path

    def read(self, name: str) -> str:
        return (self.dir / name).read_text()

    def make_cas(self) -> None:
        d = self.dir
        (d / "v3.ext").write_text(V3_EXT)
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root.key", "-out", "root.pem",
            "-days", "3650", "-subj", "/O=Example Test/CN=Test Root CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d,
        )  # fmt: skip
        openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "intermed1.key",
            "-out", "intermed1.csr", "-subj", "/O=Example Test/CN=Test Intermediate CA",
            cwd=d,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", "intermed1.csr", "-CA", "root.pem", "-CAkey", "root.key",
            "-CAcreateserial", "-out", "intermed1.pem", "-days", "1825",
            "-extfile", "v3.ext", "-extensions", "v3_ca",
            cwd=d,
        )  # fmt: skip

    def sign(self, csr: str, out: str) -> None:
        openssl(
            "x509", "-req", "-in", csr, "-CA", "intermed1.pem", "-CAkey", "intermed1.key",
            "-CAcreateserial", "-out", out, "-days", "397", "-extfile", "v3.ext", "-extensions", "v3_leaf",
            cwd=self.dir,
        )  # fmt: skip


def snapshot(directory: Path) -> dict[str, Any]:
    """Every file's bytes and mode and every symlink's target under ``directory``."""
    out: dict[str, Any] = {}
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            p = Path(root) / name
            rel = str(p.relative_to(directory))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_bytes(), p.stat().st_mode & 0o777)
    return out
