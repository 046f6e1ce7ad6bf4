"""Remote diagnostics: probe a hypervisor's VNC port from this proxy (``consoleproxy diagnose``).

What an operator needs when "the console does not load": can this host reach the VNC server
(TCP connect time), does it speak RFB (version line, RFC 6143 section 7.1.1), which security types
it offers (section 7.1.2), which VeNCrypt subtypes, and which TLS certificate it presents; plus
``ping`` and ``traceroute`` run through the system tools, as the Mold guide's system-VM
diagnostics do.

* ``validate_host`` / ``validate_port``: the only gate for user input. A host is an IP literal or a
  name of ``[A-Za-z0-9.-]`` (no leading ``-``, at most 253 characters); anything else raises
  ``BadDiagnosticTarget`` before any socket or process exists. Tools run with
  ``create_subprocess_exec`` (an argument vector, never a shell).
* ``RFBProbe``: ``rfb_server.ServerHandshake`` in its probe mode (sans-I/O, it never authenticates). After
  the security types it stops, unless VeNCrypt is offered: then it negotiates VeNCrypt 0.2 to read
  the subtypes and, when an X.509 subtype is offered, asks for TLS so the glue can read the
  certificate.
* ``probe`` / ``diagnose``: the asyncio glue, each step under a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import re
import shutil
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from consoleproxy.errors import ConsoleProxyError
from consoleproxy.net.vncconn import drive, open_connection
from consoleproxy.protocol.rfb import RFBError
from consoleproxy.protocol.rfb_server import ServerHandshake, ServerHandshakeState

__all__ = [
    "BadDiagnosticTarget",
    "ProbeReport",
    "RFBProbe",
    "ToolResult",
    "diagnose",
    "format_report",
    "ping_argv",
    "probe",
    "run_tool",
    "traceroute_argv",
    "validate_host",
    "validate_port",
]

MAX_HOST_LENGTH = 253  # a DNS name's limit; also bounds what reaches a tool's argv
_HOST_RE = re.compile(r"[A-Za-z0-9.-]+")
MAX_TOOL_OUTPUT = 64 * 1024  # bytes kept of ping/traceroute output
PING_COUNT = 3
TRACEROUTE_MAX_HOPS = 20

SECURITY_TYPE_NAMES = {
    1: "None",
    2: "VNC Authentication",
    5: "RA2",
    6: "RA2ne",
    16: "Tight",
    17: "Ultra",
    18: "TLS",
    19: "VeNCrypt",
    20: "GTK-VNC SASL",
    21: "MD5 hash",
    22: "xvp",
    30: "Apple Remote Desktop",
}
VENCRYPT_SUBTYPE_NAMES = {
    256: "Plain",
    257: "TLSNone",
    258: "TLSVnc",
    259: "TLSPlain",
    260: "X509None",
    261: "X509Vnc",
    262: "X509Plain",
    263: "TLSSASL",
    264: "X509SASL",
}


def os_error_text(exc: OSError) -> str:
    """"Connection refused" rather than asyncio's "Connect call failed ('10.0.0.5', 5900)"."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


class BadDiagnosticTarget(ConsoleProxyError, ValueError):
    """A host or port given to diagnostics is not acceptable; nothing has run."""


def validate_host(text: object) -> str:
    """An IP literal or a host name of ``[A-Za-z0-9.-]``; raise ``BadDiagnosticTarget`` otherwise.

    The name goes into ping's and traceroute's argument vectors, so besides shell metacharacters a
    leading ``-`` (it would be read as an option) and anything longer than a DNS name are refused.
    """
    if not isinstance(text, str) or not text:
        raise BadDiagnosticTarget("host is required (an IP address or a host name)")
    if len(text) > MAX_HOST_LENGTH:
        raise BadDiagnosticTarget(f"host is {len(text)} characters long; at most {MAX_HOST_LENGTH}")
    with contextlib.suppress(ValueError):
        if "%" not in text:  # no IPv6 zone ids: they would name an interface
            return str(ipaddress.ip_address(text))
    if not _HOST_RE.fullmatch(text):
        bad = next(c for c in text if not _HOST_RE.fullmatch(c))
        raise BadDiagnosticTarget(
            f"host {text[:64]!r} has the character {bad!r}; only an IP address or letters, "
            "digits, '-' and '.' are allowed"
        )
    if text.startswith("-"):
        raise BadDiagnosticTarget(f"host {text[:64]!r} starts with '-'")
    labels = text.removesuffix(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            raise BadDiagnosticTarget(f"host {text[:64]!r} is not a valid host name (label {label!r})")
    return text


def validate_port(value: object) -> int:
    """A TCP port 1-65535 (an int, or text of digits)."""
    if isinstance(value, bool):
        raise BadDiagnosticTarget("port must be a number 1-65535")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise BadDiagnosticTarget(f"port must be a number 1-65535, got {str(value)[:20]!r}")
    return value


# --- the RFB probe (sans-I/O) -----------------------------------------------------------------


class RFBProbe(ServerHandshake):
    """Read what a VNC server offers without authenticating: ``rfb_server.ServerHandshake`` in probe mode.

    ``done`` once it has read all it can (or the server refused: ``refused``); ``wants_tls`` when
    the glue should run the TLS handshake to read the certificate. Protocol violations raise
    ``RFBError``.
    """

    def __init__(self, *, want_certificate: bool = True) -> None:
        super().__init__(None, probe=True, probe_tls=want_certificate)

    @property
    def done(self) -> bool:
        return self.state in (ServerHandshakeState.PROBED, ServerHandshakeState.FAILED)

    @property
    def wants_tls(self) -> bool:
        return self.state is ServerHandshakeState.TLS_HANDSHAKE

    @property
    def tls_subtype(self) -> int | None:
        return self.vencrypt_subtype

    @property
    def note(self) -> str | None:
        return self.probe_note


# --- reports ----------------------------------------------------------------------------------


def certificate_summary(der: bytes, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Subject, issuer, validity, names and fingerprint of a DER certificate."""
    now = now or dt.datetime.now(dt.UTC)
    cert = x509.load_der_x509_certificate(der)
    names: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    end = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": end.isoformat(),
        "days_left": (end - now).days,
        "expired": now > end,
        "names": names,
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
    }


@dataclass
class ToolResult:
    command: list[str]
    exit_code: int | None  # None when it was killed at the time limit
    output: str
    timed_out: bool = False


@dataclass
class ProbeReport:
    host: str
    port: int
    ok: bool = False
    error: str | None = None
    connect_seconds: float | None = None
    rfb_version: str | None = None
    security_types: list[dict[str, Any]] = field(default_factory=list)
    refused: str | None = None
    vencrypt_version: str | None = None
    vencrypt_subtypes: list[dict[str, Any]] = field(default_factory=list)
    certificate: dict[str, Any] | None = None
    note: str | None = None
    ping: ToolResult | None = None
    traceroute: ToolResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _named(values: list[int], names: dict[int, str]) -> list[dict[str, Any]]:
    return [{"id": v, "name": names.get(v, "unknown")} for v in values]


def _tls_context(ca_file: Path | None, *, verify: bool) -> ssl.SSLContext:
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # only to read the certificate, never to send a password
        return ctx
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.check_hostname = False  # hypervisor certificates name hosts, the probe may use an address
    return ctx


async def _probe_once(
    host: str, port: int, report: ProbeReport, *, time_limit: float, tls: ssl.SSLContext
) -> RFBProbe:
    """One connection: fills ``report`` up to the certificate; raises OSError/RFBError/TimeoutError."""
    t0 = time.monotonic()
    async with asyncio.timeout(time_limit):
        conn = await open_connection(host, port)
    report.connect_seconds = round(time.monotonic() - t0, 6)
    machine = RFBProbe()
    try:
        async with asyncio.timeout(time_limit):
            if await drive(conn, machine, tls) is None:
                raise RFBError(f"server closed the connection in state {machine.state.name}")
            if der := conn.peer_certificate():  # after TLS: what the server presented
                report.certificate = certificate_summary(der)
    finally:
        conn.close()
    return machine


async def probe(
    host: str, port: int, *, time_limit: float = 5.0, ca_file: Path | None = None
) -> ProbeReport:
    """Probe ``host:port`` (validated here too); never raises for network or protocol trouble."""
    host, port = validate_host(host), validate_port(port)
    report = ProbeReport(host=host, port=port)
    try:
        try:
            tls = _tls_context(ca_file, verify=True)
            machine = await _probe_once(host, port, report, time_limit=time_limit, tls=tls)
            trusted: str | None = None
        except ssl.SSLCertVerificationError as exc:
            # Untrusted: say why, then read the certificate over a second, unverified connection.
            trusted = exc.verify_message or str(exc)
            tls = _tls_context(None, verify=False)
            machine = await _probe_once(host, port, report, time_limit=time_limit, tls=tls)
    except TimeoutError:
        where = "connecting" if report.connect_seconds is None else "waiting for the RFB handshake"
        report.error = f"timed out after {time_limit:g} s {where} ({host}:{port})"
        return report
    except RFBError as exc:
        report.error = f"not an RFB (VNC) server or a broken handshake: {exc}"
        return report
    except ssl.SSLError as exc:
        report.error = f"TLS handshake with the VNC server failed: {exc.reason or exc}"
        return report
    except OSError as exc:
        report.error = f"cannot connect to {host}:{port}: {os_error_text(exc)}"
        return report
    if machine.server_version is not None:
        report.rfb_version = "{}.{}".format(*machine.server_version)
    report.security_types = _named(list(machine.security_types), SECURITY_TYPE_NAMES)
    report.refused = machine.refused
    if machine.vencrypt_version is not None:
        report.vencrypt_version = "{}.{}".format(*machine.vencrypt_version)
    report.vencrypt_subtypes = _named(list(machine.vencrypt_subtypes), VENCRYPT_SUBTYPE_NAMES)
    if report.certificate is not None:
        report.certificate["trusted"] = trusted is None
        if trusted is not None:
            report.certificate["verify_error"] = trusted
    report.note = machine.note
    report.ok = machine.refused is None
    if machine.refused is not None:
        report.error = f"VNC server refused the connection: {machine.refused}"
    return report


# --- ping and traceroute ----------------------------------------------------------------------


def ping_argv(host: str, count: int = PING_COUNT) -> list[str]:
    """``ping`` of iputils: numeric output, ``count`` echoes, 2 s wait each."""
    return ["ping", "-n", "-c", str(count), "-W", "2", validate_host(host)]


def traceroute_argv(host: str) -> list[str]:
    return ["traceroute", "-n", "-q", "1", "-w", "2", "-m", str(TRACEROUTE_MAX_HOPS), validate_host(host)]


async def run_tool(argv: list[str], time_limit: float) -> ToolResult:
    """Run a validated argument vector (no shell), output capped, killed at ``time_limit``."""
    exe = shutil.which(argv[0])
    if exe is None:
        return ToolResult(argv, None, f"{argv[0]} is not installed (apt-get install "
                          f"{'iputils-ping' if argv[0] == 'ping' else argv[0]})")
    proc = await asyncio.create_subprocess_exec(
        exe, *argv[1:], stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = bytearray()
    timed_out = False
    try:
        async with asyncio.timeout(time_limit):
            while chunk := await proc.stdout.read(4096):
                if len(out) < MAX_TOOL_OUTPUT:
                    out += chunk[: MAX_TOOL_OUTPUT - len(out)]
            await proc.wait()
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    text = out.decode("utf-8", "replace")
    if timed_out:
        text += f"\n(stopped after {time_limit:g} s)"
    return ToolResult(argv, None if timed_out else proc.returncode, text, timed_out)


async def diagnose(
    host: object,
    port: object,
    *,
    ping: bool = False,
    traceroute: bool = False,
    time_limit: float = 5.0,
    ca_file: Path | None = None,
) -> ProbeReport:
    """Validate everything first (``BadDiagnosticTarget``), then probe, ping, traceroute."""
    h, p = validate_host(host), validate_port(port)
    tasks: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(probe(h, p, time_limit=time_limit, ca_file=ca_file))
    ]
    if ping:
        tasks.append(asyncio.ensure_future(run_tool(ping_argv(h), time_limit=PING_COUNT * 2 + 5)))
    if traceroute:
        limit = TRACEROUTE_MAX_HOPS * 2 + 5
        tasks.append(asyncio.ensure_future(run_tool(traceroute_argv(h), time_limit=limit)))
    results = await asyncio.gather(*tasks)
    report: ProbeReport = results[0]
    rest = iter(results[1:])
    if ping:
        report.ping = next(rest)
    if traceroute:
        report.traceroute = next(rest)
    return report


def format_report(r: ProbeReport) -> str:
    """Human-readable lines for the CLI."""
    lines = [f"target: {r.host}:{r.port}"]
    if r.connect_seconds is not None:
        lines.append(f"tcp connect: {r.connect_seconds * 1000:.1f} ms")
    if r.rfb_version:
        lines.append(f"rfb version: {r.rfb_version}")
    if r.security_types:
        lines.append("security types: " + ", ".join(f"{t['name']} ({t['id']})" for t in r.security_types))
    if r.vencrypt_version:
        lines.append(f"vencrypt version: {r.vencrypt_version}")
    if r.vencrypt_subtypes:
        subtypes = ", ".join(f"{t['name']} ({t['id']})" for t in r.vencrypt_subtypes)
        lines.append(f"vencrypt subtypes: {subtypes}")
    if c := r.certificate:
        trust = "trusted" if c.get("trusted") else f"NOT trusted ({c.get('verify_error')})"
        lines.append(f"certificate: {c['subject']} issued by {c['issuer']}; {trust}")
        lines.append(f"  valid until {c['not_after']} ({c['days_left']} days left); names: "
                     + (", ".join(c["names"]) or "none"))
        lines.append(f"  sha256 {c['sha256']}")
    if r.note:
        lines.append(f"note: {r.note}")
    if r.error:
        lines.append(f"FAILED: {r.error}")
    for label, tool in (("ping", r.ping), ("traceroute", r.traceroute)):
        if tool is not None:
            status = "timed out" if tool.timed_out else f"exit {tool.exit_code}"
            lines.append(f"--- {label} ({status}): {' '.join(tool.command)}")
            lines.append(tool.output.rstrip())
    return "\n".join(lines)
