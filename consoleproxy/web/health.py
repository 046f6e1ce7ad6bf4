"""Health checks as the Mold guide describes them for its system VMs ("가상 라우터의 상태 확인").

Two kinds, each on its own interval (``[health] basic_interval_minutes`` and
``advanced_interval_minutes``, minutes, 0 = not scheduled) and on demand (admin
``GET /api/health?fresh=true``). Every result carries name, type (``basic``/``advanced``), success,
message, start, end and duration; only the last result of each check is kept.

Basic: ``listeners_check`` (each listener accepts a TCP connection), ``certificate_check`` (every
live bundle verifies and has more than ``min_certificate_days`` left), ``disk_space_check`` (free MB
under the certificate store), ``cpu_usage_check`` and ``memory_usage_check`` (percent), and
``replay_store_check`` (the single-use store answers a ping).
Advanced: ``dns_check`` (our DNS responder answers SOA for its zone, when ``[dns]`` is on),
``tls_handshake_check`` (a verified TLS handshake with our own public listener, when ``[listen]
tls``), ``hypervisor_check[HOST:PORT]`` for each ``[health] hypervisors`` entry (TCP connect and
an RFB version line).

Custom checks (the guide's contract): every executable file in ``scripts_dir`` runs with the
argument ``basic`` or ``advanced``; its stdout is the message, exit 0 passes and 1 fails. A script
that prints nothing is not registered (no result). A non-executable file is ignored, and logged
once. A script that outlives ``script_timeout_seconds`` is killed (with its process group) and
reported as failed: a hung check is itself a finding.

A failed check named in ``failures_to_unready`` (its name, or ``hypervisor_check`` for all of
those) makes ``/readyz`` answer 503 with the check's name in the reason, the guide's
``failures.to.recreate`` turned into "take this instance out of the balancer".

The evaluators (``evaluate_*``, ``cpu_busy_percent``, ``script_outcome``) are pure; the ``check_*``
coroutines measure and call them; ``HealthRunner`` schedules, times and stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import shutil
import signal
import ssl
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import psutil

from consoleproxy.protocol.proxyproto import V2_SIGNATURE
from consoleproxy.protocol.rfb import VersionError, parse_version
from consoleproxy.tls.certpem import CertificateError
from consoleproxy.tls.certstore import CertStore
from consoleproxy.tools.diagnose import certificate_summary, os_error_text

if TYPE_CHECKING:
    from consoleproxy.config import Health
    from consoleproxy.control import ProxyControl

__all__ = [
    "ADVANCED",
    "BASIC",
    "CheckResult",
    "HealthRunner",
    "Outcome",
    "check_dns",
    "check_hypervisor",
    "check_listeners",
    "check_tls_handshake",
    "cpu_busy_percent",
    "evaluate_certificates",
    "evaluate_disk",
    "evaluate_percent",
    "run_script",
    "script_outcome",
]

log = logging.getLogger("consoleproxy.health")

BASIC = "basic"
ADVANCED = "advanced"
CHECK_TIMEOUT = 5.0  # each network check (connect, handshake, query)
CPU_SAMPLE_SECONDS = 0.5  # CPU use is measured over this window
MAX_SCRIPT_OUTPUT = 4096  # characters of a script's stdout kept as its message
HYPERVISOR_CHECK = "hypervisor_check"


@dataclass(frozen=True)
class Outcome:
    success: bool
    message: str


@dataclass(frozen=True)
class CheckResult:
    name: str
    type: str  # BASIC or ADVANCED
    success: bool
    message: str
    start: dt.datetime
    end: dt.datetime
    duration: float  # seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "success": self.success,
            "message": self.message,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "duration": round(self.duration, 6),
        }


def base_name(name: str) -> str:
    """``hypervisor_check[10.0.0.5:5900]`` -> ``hypervisor_check``, so one entry names them all."""
    return name.partition("[")[0]


def _listed(name: str, names: list[str]) -> bool:
    return name in names or base_name(name) in names


# --- pure evaluators --------------------------------------------------------------------------


def evaluate_disk(path: Path, free_bytes: int, min_free_mb: int) -> Outcome:
    free_mb = free_bytes // (1024 * 1024)
    ok = free_mb >= min_free_mb
    rel = "at least" if ok else "below the minimum of"
    return Outcome(ok, f"{free_mb} MB free under {path} ({rel} {min_free_mb} MB)")


def evaluate_percent(what: str, value: float, maximum: float) -> Outcome:
    ok = value <= maximum
    return Outcome(ok, f"{what} {value:.1f}% ({'within' if ok else 'above'} the maximum of {maximum:g}%)")


def cpu_busy_percent(before: Any, after: Any) -> float:
    """Busy share of all CPUs between two ``psutil.cpu_times()`` samples (idle and iowait are idle)."""
    total = sum(after) - sum(before)
    if total <= 0:
        return 0.0
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    return float(max(0.0, min(100.0, 100.0 * (1 - idle / total))))


def evaluate_certificates(store: CertStore, *, min_days: int, now: dt.datetime | None = None) -> Outcome:
    """Every live bundle verifies now and has more than ``min_days`` days left."""
    now = now or dt.datetime.now(dt.UTC)
    keys = sorted(store.live_bundles())
    if not keys:
        return Outcome(False, f"no live certificate bundle in {store.directory}")
    good: list[str] = []
    for key in keys:
        try:
            bundle = store.verify(key, now=now)
        except CertificateError as exc:
            return Outcome(False, f"certificate {key}: {exc}")
        left = bundle.not_after - now
        if left < dt.timedelta(days=min_days):
            return Outcome(
                False,
                f"certificate {key} expires in {left.days} days ({bundle.not_after:%Y-%m-%d %H:%M} UTC); "
                f"at least {min_days} required",
            )
        good.append(f"{key}: {left.days} days left")
    return Outcome(True, "; ".join(good))


def script_outcome(name: str, returncode: int | None, stdout: str) -> Outcome | None:
    """The guide's contract: no output = not a check; exit 0 passes, 1 fails, anything else fails."""
    message = stdout.strip()[:MAX_SCRIPT_OUTPUT]
    if not message:
        return None
    if returncode == 0:
        return Outcome(True, message)
    if returncode == 1:
        return Outcome(False, message)
    return Outcome(False, f"{message} (exit status {returncode}; a check exits 0 or 1)")


# --- checks (measure, then evaluate) ----------------------------------------------------------


def check_disk(path: Path, min_free_mb: int) -> Outcome:
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent  # the store may not exist yet; its file system does
    return evaluate_disk(path, shutil.disk_usage(where).free, min_free_mb)


async def check_cpu(maximum: float, sample: float = CPU_SAMPLE_SECONDS) -> Outcome:
    before = psutil.cpu_times()
    await asyncio.sleep(sample)
    return evaluate_percent("CPU use", cpu_busy_percent(before, psutil.cpu_times()), maximum)


def check_memory(maximum: float) -> Outcome:
    return evaluate_percent("memory use", float(psutil.virtual_memory().percent), maximum)


async def _tcp_connect(host: str, port: int, time_limit: float) -> str | None:
    """None when a TCP connection opens; otherwise why not."""
    try:
        async with asyncio.timeout(time_limit):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return f"{host}:{port}: no answer within {time_limit:g} s"
    except OSError as exc:
        return f"{host}:{port}: {os_error_text(exc)}"
    writer.close()
    return None


async def check_listeners(
    listeners: list[tuple[str, str, int | None]], time_limit: float = CHECK_TIMEOUT
) -> Outcome:
    """``(label, host, port)`` each; a port of None is a listener that has no socket open."""
    if not listeners:
        return Outcome(False, "no listeners")
    problems: list[str] = []
    for label, host, port in listeners:
        if port is None:
            problems.append(f"{label}: not listening")
        elif (why := await _tcp_connect(host, port, time_limit)) is not None:
            problems.append(f"{label} {why}")
    if problems:
        return Outcome(False, "; ".join(problems))
    return Outcome(True, "accepting: " + ", ".join(f"{label} {h}:{p}" for label, h, p in listeners))


async def check_hypervisor(host: str, port: int, time_limit: float = CHECK_TIMEOUT) -> Outcome:
    """TCP connect and read the RFB ProtocolVersion line (RFC 6143 7.1.1); nothing is sent."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(time_limit):
            reader, writer = await asyncio.open_connection(host, port)
            connect = time.monotonic() - t0
            try:
                line = await reader.readexactly(12)
            finally:
                writer.close()
        major, minor = parse_version(line)
    except TimeoutError:
        return Outcome(False, f"{host}:{port}: no answer within {time_limit:g} s")
    except asyncio.IncompleteReadError as exc:
        return Outcome(False, f"{host}:{port}: closed after {len(exc.partial)} bytes, before an RFB version")
    except VersionError:
        return Outcome(False, f"{host}:{port}: not a VNC server (no RFB version line)")
    except OSError as exc:
        return Outcome(False, f"{host}:{port}: {os_error_text(exc)}")
    return Outcome(True, f"{host}:{port}: RFB {major}.{minor}, connected in {connect * 1000:.1f} ms")


async def check_dns(host: str, port: int, zone: str, time_limit: float = CHECK_TIMEOUT) -> Outcome:
    """Ask our responder for its zone's SOA over UDP; it must answer authoritatively."""
    q = dns.message.make_query(zone, dns.rdatatype.SOA)
    try:
        reply = await dns.asyncquery.udp(q, host, port=port, timeout=time_limit)
    except (dns.exception.Timeout, TimeoutError):
        return Outcome(False, f"DNS responder {host}:{port}: no answer for {zone} SOA "
                       f"within {time_limit:g} s")
    except OSError as exc:
        return Outcome(False, f"DNS responder {host}:{port}: {os_error_text(exc)}")
    except dns.exception.DNSException as exc:
        return Outcome(False, f"DNS responder {host}:{port}: bad answer: {exc}")
    rcode = dns.rcode.to_text(reply.rcode())
    has_soa = any(r.rdtype == dns.rdatatype.SOA for r in reply.answer)
    if reply.rcode() != dns.rcode.NOERROR or not has_soa:
        return Outcome(False, f"DNS responder {host}:{port}: {zone} SOA answered {rcode} without the SOA")
    return Outcome(True, f"DNS responder {host}:{port} answers {zone} SOA")


# PROXY protocol v2 LOCAL: "this connection is the balancer's own" -- what a listener that expects
# the PROXY protocol accepts from the proxy's own health checks.
PROXY_V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


async def check_tls_handshake(
    host: str,
    port: int,
    server_name: str,
    root_pem: bytes | None,
    time_limit: float = CHECK_TIMEOUT,
    *,
    proxy_protocol: bool = False,
) -> Outcome:
    """A handshake as a browser would make it: the name checked and the chain verified to ``root_pem``."""
    ctx = ssl.create_default_context(cadata=root_pem.decode() if root_pem else None)
    try:
        async with asyncio.timeout(time_limit):
            if proxy_protocol:
                _, writer = await asyncio.open_connection(host, port)
                writer.write(PROXY_V2_LOCAL)
                await writer.start_tls(ctx, server_hostname=server_name)
            else:
                _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_name)
    except TimeoutError:
        return Outcome(False, f"TLS to {host}:{port} ({server_name}): no handshake "
                       f"within {time_limit:g} s")
    except ssl.SSLCertVerificationError as exc:
        return Outcome(False, f"TLS to {host}:{port} ({server_name}): certificate not accepted: "
                       f"{exc.verify_message or exc}")
    except (ssl.SSLError, OSError) as exc:
        return Outcome(False, f"TLS to {host}:{port} ({server_name}): {getattr(exc, 'reason', None) or exc}")
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    version = sslobj.version() if sslobj is not None else "?"
    writer.close()
    summary = certificate_summary(der) if der else None
    detail = f"; certificate {summary['subject']}, {summary['days_left']} days left" if summary else ""
    return Outcome(True, f"TLS ({version}) to {host}:{port} as {server_name} verified{detail}")


async def check_replay_store(ping: Callable[[], Awaitable[bool]], name: str) -> Outcome:
    try:
        ok = await ping()
    except Exception as exc:  # a store bug must show up as a failed check, not a dead runner
        return Outcome(False, f"replay store {name}: {exc}")
    return Outcome(ok, f"replay store {name} {'answers' if ok else 'does not answer'}")


async def run_script(path: Path, kind: str, time_limit: float) -> Outcome | None:
    """Run one custom check (argv ``[path, kind]``, no shell); None when it printed nothing."""
    proc = await asyncio.create_subprocess_exec(
        str(path), kind,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        cwd=str(path.parent), start_new_session=True,  # its own group, so a timeout kills children too
    )
    assert proc.stdout is not None
    out = bytearray()
    try:
        async with asyncio.timeout(time_limit):
            while chunk := await proc.stdout.read(4096):
                if len(out) < MAX_SCRIPT_OUTPUT * 4:
                    out += chunk
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return Outcome(False, f"{path.name} {kind}: no result within {time_limit:g} s (killed)")
    return script_outcome(path.name, proc.returncode, out.decode("utf-8", "replace"))


# --- the runner -------------------------------------------------------------------------------

CheckFn = Callable[[], Awaitable[Outcome | None]]


def _loopback_for(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class HealthRunner:
    """Runs the checks for one proxy (control.ProxyControl) on their intervals and on demand."""

    def __init__(self, server: ProxyControl) -> None:
        self.server = server
        self.cfg: Health = server.cfg.health
        self.results: dict[tuple[str, str], CheckResult] = {}
        self._locks = {BASIC: asyncio.Lock(), ADVANCED: asyncio.Lock()}
        self._tasks: list[asyncio.Task[None]] = []
        self._logged: set[str] = set()  # things logged once (ignored scripts, missing folder)

    # scheduling

    def start(self) -> None:
        schedule = ((BASIC, self.cfg.basic_interval_minutes), (ADVANCED, self.cfg.advanced_interval_minutes))
        for kind, minutes in schedule:
            if minutes > 0:
                self._tasks.append(asyncio.create_task(self._every(kind, minutes * 60)))

    async def _every(self, kind: str, seconds: float) -> None:
        # The first round runs one interval after start, as the guide's schedule does (and so a
        # starting instance does not poke its own listeners at once); ?fresh=true runs them earlier.
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.run(kind)
            except Exception:  # keep the schedule alive; the next round may work
                log.exception("health: %s checks failed to run", kind)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # results

    def last_results(self) -> list[CheckResult]:
        return sorted(self.results.values(), key=lambda r: (r.type != BASIC, r.name))

    def unready_reason(self) -> str | None:
        """The first failed check listed in ``failures_to_unready``, for /readyz."""
        for r in self.last_results():
            if not r.success and _listed(r.name, self.cfg.failures_to_unready):
                return f"health check {r.name} failed: {r.message}"
        return None

    async def run_all(self) -> list[CheckResult]:
        return [*await self.run(BASIC), *await self.run(ADVANCED)]

    async def run(self, kind: str) -> list[CheckResult]:
        """Run every check of ``kind`` now; the results replace that kind's previous ones."""
        async with self._locks[kind]:
            checks = self._builtin(kind) + self._scripts(kind)
            results = await asyncio.gather(
                *(self._timed(name, kind, fn) for name, fn in checks if not _listed(name, self.cfg.exclude))
            )
            kept = [r for r in results if r is not None]
            self.results = {k: v for k, v in self.results.items() if k[0] != kind}
            self.results.update({(kind, r.name): r for r in kept})
            for r in kept:
                if not r.success:
                    log.warning("health: %s check %s failed: %s", kind, r.name, r.message)
            return kept

    async def _timed(self, name: str, kind: str, fn: CheckFn) -> CheckResult | None:
        start = dt.datetime.now(dt.UTC)
        t0 = time.monotonic()
        try:
            outcome = await fn()
        except Exception as exc:  # a broken check is a failed check, never a crashed runner
            log.exception("health: check %s raised", name)
            outcome = Outcome(False, f"check raised {type(exc).__name__}: {exc}")
        if outcome is None:
            return None  # a silent custom script: not registered
        duration = time.monotonic() - t0
        return CheckResult(name, kind, outcome.success, outcome.message, start,
                           start + dt.timedelta(seconds=duration), duration)

    # the checks

    def _builtin(self, kind: str) -> list[tuple[str, CheckFn]]:
        s, h = self.server, self.cfg
        out: list[tuple[str, CheckFn]] = []
        if kind == BASIC:
            out.append(("listeners_check", lambda: check_listeners(self._listeners())))
            store = s.certstore
            if s.cfg.listen.tls and store is not None:
                out.append(("certificate_check", lambda: asyncio.to_thread(
                    evaluate_certificates, store, min_days=h.min_certificate_days)))
            disk = s.cfg.path(s.cfg.tls.store)
            out.append(("disk_space_check", lambda: asyncio.to_thread(check_disk, disk, h.min_free_disk_mb)))
            out.append(("cpu_usage_check", lambda: check_cpu(h.max_cpu_percent)))
            out.append(("memory_usage_check", lambda: asyncio.to_thread(check_memory, h.max_memory_percent)))
            out.append(("replay_store_check", lambda: check_replay_store(s.replay.ping, s.replay.name)))
            return out
        if s.cfg.dns.enabled:
            out.append(("dns_check", self._dns_check))
        if s.cfg.listen.tls:
            out.append(("tls_handshake_check", self._tls_check))
        for hp in h.hypervisors:
            host, _, port = hp.rpartition(":")
            host = host.strip("[]")
            out.append((f"{HYPERVISOR_CHECK}[{hp}]", functools.partial(check_hypervisor, host, int(port))))
        return out

    def _listeners(self) -> list[tuple[str, str, int | None]]:
        s = self.server
        out: list[tuple[str, str, int | None]] = []
        for host, sockets in s.public_listeners():
            if not sockets:
                out.append(("public", _loopback_for(host), None))
            for sock in sockets:
                addr = sock.getsockname()
                out.append(("public", _loopback_for(str(addr[0])), int(addr[1])))
        socks = s.admin_sockets()
        if socks is not None and not socks:
            out.append(("admin", s.cfg.admin.address, None))
        for sock in socks or ():
            addr = sock.getsockname()
            out.append(("admin", _loopback_for(str(addr[0])), int(addr[1])))
        return out

    async def _dns_check(self) -> Outcome:
        d = self.server.dns
        if d is None or not d.sockets:
            return Outcome(False, "DNS responder is not running")
        host = _loopback_for(self.server.cfg.dns.listen.rpartition(":")[0].strip("[]"))
        return await check_dns(host, d.port, d.settings.zone)

    async def _tls_check(self) -> Outcome:
        s = self.server
        listeners = s.public_listeners()
        if s.tls is None or not listeners or not listeners[0][1]:
            return Outcome(False, "no TLS listener is open")
        key = s.tls.default_key or next(iter(sorted(s.tls.contexts)), None)
        store = s.certstore
        if key is None or store is None:
            return Outcome(False, "no live certificate")
        try:
            bundle = await asyncio.to_thread(store.verify, key)
            root: bytes | None = bundle.pem_root()
        except CertificateError as exc:
            return Outcome(False, f"certificate {key}: {exc}")
        # A name the certificate must cover: the FQDN, or one a-b-c-d name under the wildcard.
        name = "127-0-0-1." + key[2:] if key.startswith("*.") else key
        addr = listeners[0][1][0].getsockname()
        return await check_tls_handshake(
            _loopback_for(str(addr[0])), int(addr[1]), name, root, proxy_protocol=s.cfg.listen.proxy_protocol
        )

    def _scripts(self, kind: str) -> list[tuple[str, CheckFn]]:
        if not self.cfg.scripts_dir:
            return []
        folder = self.server.cfg.path(self.cfg.scripts_dir)
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            self._once(f"dir:{folder}", "health: scripts_dir %s cannot be read: %s",
                       folder, os_error_text(exc))
            return []
        out: list[tuple[str, CheckFn]] = []
        time_limit = self.cfg.script_timeout_seconds
        for path in entries:
            try:
                st = path.stat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if not os.access(path, os.X_OK):
                self._once(f"noexec:{path}", "health: ignoring %s: not executable (chmod a+x to use it)",
                           path)
                continue
            out.append((path.name, functools.partial(run_script, path, kind, time_limit)))
        return out

    def _once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)

