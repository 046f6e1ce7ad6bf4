"""QEMU's VNC server with TLS (VeNCrypt, security type 19) behind the proxy.

QEMU 7.2 with ``tls-creds-x509`` offers only VeNCrypt: X509None without a password and X509VNC
with one. The proxy verifies QEMU's certificate against ``[targets] vnc_ca_file`` (no host name
check: tokens carry addresses), or skips verification with ``[targets] insecure = true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import expect_close, free_port, running_proxy
from test_real_vnc import _process, open_qemu_console, wait_port

PASSWORD = "tls-pw"
X509_NONE, X509_VNC = 260, 261  # VeNCrypt subtypes


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def write_ca(path: Path, cn: str) -> Path:
    """A CA certificate alone (one that signed nothing QEMU presents)."""
    cert, _ = make_ca(cn)
    path.write_bytes(_pem(cert))
    return path


def make_qemu_tls_dir(directory: Path) -> Path:
    """``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem`` for QEMU; returns the CA file."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca("consoleproxy test VNC CA")
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca-cert.pem").write_bytes(_pem(ca))
    (directory / "server-cert.pem").write_bytes(_pem(cert))
    (directory / "server-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (directory / "server-key.pem").chmod(0o600)
    ca_file = directory.parent / "vnc-ca.pem"
    ca_file.write_bytes(_pem(ca))
    return ca_file


@contextlib.asynccontextmanager
async def qemu_tls(tmp_path: Path, password: str | None = None) -> AsyncIterator[tuple[int, Path]]:
    """QEMU with a TLS-only VNC server; yields its port and the CA file that signed its certificate."""
    binary = require_tool("qemu-system-x86_64", "qemu-system-x86")
    ca_file = make_qemu_tls_dir(tmp_path / "qemu-tls")
    port = free_port()
    vnc = f"127.0.0.1:{port - 5900},tls-creds=tls0"
    args = [
        binary,
        "-machine",
        "accel=tcg",
        "-display",
        "none",
        "-nodefaults",
        "-vga",
        "std",
        "-object",
        f"tls-creds-x509,id=tls0,dir={tmp_path / 'qemu-tls'},endpoint=server,verify-peer=no",
    ]
    if password is not None:
        args += ["-object", f"secret,id=pw,data={password}"]
        vnc += ",password-secret=pw"
    args += ["-vnc", vnc, "-m", "64"]
    with _process(args, tmp_path / "qemu.log") as proc:
        await wait_port(port, proc)
        yield port, ca_file


async def vencrypt_subtypes(port: int) -> list[int]:
    """Ask QEMU directly (no proxy) which security types and VeNCrypt subtypes it offers."""
    async with asyncio.timeout(10):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await r.readexactly(12) == b"RFB 003.008\n"
            w.write(b"RFB 003.008\n")
            (count,) = await r.readexactly(1)
            assert list(await r.readexactly(count)) == [19], "QEMU with tls-creds offers only VeNCrypt"
            w.write(b"\x13")
            assert await r.readexactly(2) == b"\x00\x02"  # VeNCrypt 0.2
            w.write(b"\x00\x02")
            assert await r.readexactly(1) == b"\x00"
            (n,) = await r.readexactly(1)
            return list(struct.unpack(f">{n}I", await r.readexactly(4 * n)))
        finally:
            w.close()


@pytest.mark.integration
async def test_vencrypt_x509none_verified(tmp_path: Path) -> None:
    async with (
        qemu_tls(tmp_path) as (port, ca),
        running_proxy(tmp_path, targets={"vnc_ca_file": str(ca)}) as p,
    ):
        assert await vencrypt_subtypes(port) == [X509_NONE]
        w, h, pixels = await open_qemu_console(p, port)
        assert (w, h) == (720, 400)
        assert len(pixels) == 720 * 400 * 4


@pytest.mark.integration
async def test_vencrypt_x509vnc_verified(tmp_path: Path) -> None:
    async with (
        qemu_tls(tmp_path, password=PASSWORD) as (port, ca),
        running_proxy(tmp_path, targets={"vnc_ca_file": str(ca)}) as p,
    ):
        assert await vencrypt_subtypes(port) == [X509_VNC]
        w, h, pixels = await open_qemu_console(p, port, password=PASSWORD)
        assert (w, h) == (720, 400)
        assert len(pixels) == 720 * 400 * 4
        # The inner VNC authentication still runs inside TLS: a wrong password is refused.
        code, reason = await expect_close(p.url(p.token(port=port, password="wrong")))
        assert code == 4011, (code, reason)
        code, reason = await expect_close(p.url(p.token(port=port)))
        assert code == 4011 and "password" in reason, (code, reason)


@pytest.mark.integration
async def test_vencrypt_untrusted_certificate_refused(tmp_path: Path) -> None:
    wrong_ca = write_ca(tmp_path / "other-ca.pem", "some other CA")
    async with (
        qemu_tls(tmp_path) as (port, _),
        running_proxy(tmp_path, targets={"vnc_ca_file": str(wrong_ca), "insecure": False}) as p,
    ):
        code, reason = await expect_close(p.url(p.token(port=port)), timeout=30)
        # The certificate is the VNC server's problem, reported as one: not a crash (1006/1011)
        # nor a handshake timeout (4012).
        assert code in (4010, 4011), (code, reason)
        assert "certificate" in reason.lower(), reason


@pytest.mark.integration
async def test_vencrypt_untrusted_certificate_refused_with_password(tmp_path: Path) -> None:
    wrong_ca = write_ca(tmp_path / "other-ca.pem", "some other CA")
    async with (
        qemu_tls(tmp_path, password=PASSWORD) as (port, _),
        running_proxy(tmp_path, targets={"vnc_ca_file": str(wrong_ca)}) as p,
    ):
        code, reason = await expect_close(p.url(p.token(port=port, password=PASSWORD)), timeout=30)
        assert code in (4010, 4011), (code, reason)
        assert "certificate" in reason.lower(), reason


@pytest.mark.integration
async def test_vencrypt_insecure_skips_verification(tmp_path: Path) -> None:
    wrong_ca = write_ca(tmp_path / "other-ca.pem", "some other CA")
    async with (
        qemu_tls(tmp_path, password=PASSWORD) as (port, _),
        running_proxy(tmp_path, targets={"vnc_ca_file": str(wrong_ca), "insecure": True}) as p,
    ):
        w, h, _ = await open_qemu_console(p, port, password=PASSWORD)
        assert (w, h) == (720, 400)


@pytest.mark.integration
async def test_vencrypt_insecure_without_password(tmp_path: Path) -> None:
    wrong_ca = write_ca(tmp_path / "other-ca.pem", "some other CA")
    async with (
        qemu_tls(tmp_path) as (port, _),
        running_proxy(tmp_path, targets={"vnc_ca_file": str(wrong_ca), "insecure": True}) as p,
    ):
        w, h, _ = await open_qemu_console(p, port)
        assert (w, h) == (720, 400)


async def test_missing_vnc_ca_file_is_a_config_error(tmp_path: Path) -> None:
    from consoleproxy.errors import ConfigError

    with pytest.raises(ConfigError, match="vnc_ca_file"):
        async with running_proxy(tmp_path, targets={"vnc_ca_file": str(tmp_path / "missing.pem")}):
            pass
