"""Configuration (DESIGN.md section 4): one TOML file, environment overrides, typed defaults.

Every key is a field of a frozen dataclass below; the field's metadata holds its constraint, so
one loop checks the file, the environment and the defaults alike. An unknown key, a wrong type or
an out-of-range value raises ``ConfigError`` whose message names the source (file or environment
variable), the key and what was expected: the CLI prints that line and exits 2.

Environment: ``CONSOLEPROXY_<SECTION>_<KEY>`` (upper case), e.g. ``CONSOLEPROXY_LIMITS_MAX_SESSIONS=50``.
Lists take a TOML array (``["10.0.0.0/8"]``) or comma-separated text (``10.0.0.0/8,192.168.0.0/16``).
Relative paths are relative to the directory of the configuration file (or the working directory).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consoleproxy.errors import ConfigError
from consoleproxy.policy.acme_policy import (
    CHALLENGES,
    KEY_TYPES,
    challenge_txt_name,
    directory_url,
    order_names,
)
from consoleproxy.policy.replay_url import BadStoreURL, parse_store_url, redact_url

__all__ = ["Config", "ConfigError", "load_config", "parse_port_range"]

Check = Callable[[Any], str | None]  # returns what was expected when the value is wrong


def _range(lo: int | float | None = None, hi: int | float | None = None) -> Check:
    def check(v: Any) -> str | None:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if hi is None:
                return f"a number >= {lo}"
            if lo is None:
                return f"a number <= {hi}"
            return f"a number from {lo} to {hi}"
        return None

    return check


def _choice(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else "one of " + ", ".join(repr(o) for o in options)

    return check


def _cidrs(v: Any) -> str | None:
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"a list of CIDR networks (bad entry {item!r})"
    return None


def _ports(v: Any) -> str | None:
    for p in v:
        if not 0 <= p <= 65535:  # 0 = any free port (tests)
            return f"a list of TCP ports 1-65535 (bad entry {p})"
    return None


def _port_range_check(v: Any) -> str | None:
    try:
        parse_port_range(v)
    except ValueError as exc:
        return str(exc)
    return None


def _hostport(v: Any) -> str | None:
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "ADDRESS:PORT, e.g. 0.0.0.0:53 or [::1]:53"
    return None


def _replay_store_url(v: Any) -> str | None:
    try:
        parse_store_url(v)
    except BadStoreURL as exc:
        return (
            "memory, sqlite:///FILE, redis://HOST[:PORT][/DB] or "
            f"redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] ({exc})"
        )
    return None


def _redacted(v: Any) -> str:
    return repr(redact_url(str(v)))


def _opt(
    check: Check | None = None, doc: str = "", show: Callable[[Any], str] = repr
) -> dict[str, Any]:
    # show: how a wrong value is quoted in the error (a URL may hold a password).
    return {"check": check, "doc": doc, "show": show}


def parse_port_range(text: str) -> tuple[range, ...]:
    """``"5900-6999,443"`` -> (range(5900, 7000), range(443, 444)); ValueError when malformed."""
    out: list[range] = []
    for part in str(text).split(","):
        part = part.strip()
        lo_s, dash, hi_s = part.partition("-")
        if not lo_s.isdigit() or (dash and not hi_s.isdigit()):
            raise ValueError(f"a port range like 5900-6999 (bad part {part!r})")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"a port range within 1-65535, low <= high (bad part {part!r})")
        out.append(range(lo, hi + 1))
    return tuple(out)


@dataclass(frozen=True)
class Listen:
    address: str = field(default="0.0.0.0", metadata=_opt())
    ports: list[int] = field(default_factory=lambda: [443], metadata=_opt(_ports))
    tls: bool = field(default=True, metadata=_opt())
    # A plain-HTTP port that only redirects to HTTPS (e.g. 80); 0 = none.
    redirect_http_port: int = field(default=0, metadata=_opt(_range(0, 65535)))
    # Load balancers allowed to state the client's address (PROXY header, X-Forwarded-For).
    trusted_proxies: list[str] = field(default_factory=list, metadata=_opt(_cidrs))
    # Read X-Forwarded-For, but only on requests whose peer is in trusted_proxies.
    forwarded_for: bool = field(default=False, metadata=_opt())
    # Expect a PROXY protocol v1/v2 header (HAProxy send-proxy-v2) before TLS on every public
    # connection, only from trusted_proxies; the header's source becomes the client's address.
    proxy_protocol: bool = field(default=False, metadata=_opt())
    # Upgrades on one host (docs/upgrade.md): bind the public ports with SO_REUSEPORT, so a new
    # version can listen beside this one, and close them at the start of a drain, so that every
    # new connection goes to the new version while open consoles stay here until they end.
    reuse_port: bool = field(default=False, metadata=_opt())


@dataclass(frozen=True)
class Admin:
    address: str = field(default="127.0.0.1", metadata=_opt())
    port: int = field(default=8001, metadata=_opt(_range(0, 65535)))
    key_file: str = field(default="admin.key", metadata=_opt())


@dataclass(frozen=True)
class Tls:
    store: str = field(default="certs", metadata=_opt())
    domain_suffix: str = field(default="", metadata=_opt())
    fqdn: str = field(default="", metadata=_opt())


@dataclass(frozen=True)
class Tokens:
    format: str = field(default="native", metadata=_opt(_choice("native", "cloudstack")))
    keyring: str = field(default="keys.json", metadata=_opt())
    skew_seconds: int = field(default=30, metadata=_opt(_range(0, 3600)))
    single_use: bool = field(default=True, metadata=_opt())
    ttl_seconds: int = field(default=60, metadata=_opt(_range(1, 86400)))


@dataclass(frozen=True)
class CloudStack:
    key_iv_file: str = field(default="keyiv.json", metadata=_opt())
    auth_key: str = field(default="", metadata=_opt())
    hash_key: str = field(default="", metadata=_opt())
    check_source_ip: bool = field(default=False, metadata=_opt())
    check_extra: bool = field(default=False, metadata=_opt())


@dataclass(frozen=True)
class Limits:
    max_sessions: int = field(default=10000, metadata=_opt(_range(1)))
    max_sessions_per_vm: int = field(default=0, metadata=_opt(_range(0)))
    per_vm_policy: str = field(default="share", metadata=_opt(_choice("share", "replace", "reject")))
    max_sessions_per_client_ip: int = field(default=20, metadata=_opt(_range(0)))
    max_client_message_bytes: int = field(default=1048576, metadata=_opt(_range(1024, 1 << 30)))
    idle_timeout_seconds: float = field(default=1800, metadata=_opt(_range(0)))
    max_lifetime_seconds: float = field(default=0, metadata=_opt(_range(0)))
    handshake_timeout_seconds: float = field(default=10, metadata=_opt(_range(0.1, 600)))
    connect_timeout_seconds: float = field(default=5, metadata=_opt(_range(0.1, 600)))
    ping_interval_seconds: float = field(default=30, metadata=_opt(_range(0)))
    # /readyz says 503 from this many open consoles, so a balancer sends new ones elsewhere
    # before max_sessions refuses them; 0 = at max_sessions.
    unready_at_sessions: int = field(default=0, metadata=_opt(_range(0)))
    # Accept layer (listener.py). A "handshake" runs from accept to the end of the first HTTP
    # request head: PROXY header, TLS handshake, request line and headers. Each open one costs a
    # socket and a few KiB; over a cap a new connection is reset at once, before any TLS work.
    max_concurrent_handshakes: int = field(default=1000, metadata=_opt(_range(1)))
    max_handshakes_per_ip: int = field(default=100, metadata=_opt(_range(0)))  # 0 = no limit
    # Token bucket per source address (IPv6: per /64); 0 = off.
    connections_per_ip_per_second: float = field(default=20, metadata=_opt(_range(0)))
    connection_burst: int = field(default=100, metadata=_opt(_range(1)))
    # Slowloris: the whole handshake must end within this time, or the connection is closed.
    request_head_timeout_seconds: float = field(default=10, metadata=_opt(_range(0.1, 600)))
    # Longest request line / header line (aiohttp answers 400), and the whole head (431).
    max_header_line_bytes: int = field(default=8190, metadata=_opt(_range(256, 65536)))
    max_request_head_bytes: int = field(default=32768, metadata=_opt(_range(1024, 1048576)))
    # An idle keep-alive HTTP connection (no request in progress) is closed after this.
    keepalive_timeout_seconds: float = field(default=75, metadata=_opt(_range(1, 3600)))


@dataclass(frozen=True)
class Targets:
    allowed_cidrs: list[str] = field(default_factory=lambda: ["10.0.0.0/8"], metadata=_opt(_cidrs))
    ports: str = field(default="5900-6999", metadata=_opt(_port_range_check))
    vnc_ca_file: str = field(default="", metadata=_opt())
    insecure: bool = field(default=False, metadata=_opt())


@dataclass(frozen=True)
class Origin:
    allowed: list[str] = field(default_factory=list, metadata=_opt())
    allow_missing: bool = field(default=True, metadata=_opt())


@dataclass(frozen=True)
class Drain:
    # New consoles are still accepted this long after a drain starts, so the balancer's health
    # check (two failed checks at its interval) notices before anyone is refused.
    grace_seconds: float = field(default=4, metadata=_opt(_range(0, 3600)))
    # Running consoles are closed with 1001 at this point; 0 = wait for them however long.
    deadline_seconds: float = field(default=3600, metadata=_opt(_range(0)))


@dataclass(frozen=True)
class Page:
    # Empty = a checkout's novnc_static/ and node_modules/@novnc/novnc/, else the copies the wheel
    # carries (consoleproxy/assets.py).
    static_dir: str = field(default="", metadata=_opt())
    novnc_dir: str = field(default="", metadata=_opt())


@dataclass(frozen=True)
class Input:
    # "drop": drop the release of the Korean Lang1 (한/영) and Lang2 (한자) keys on their way to
    # the VNC server, for guests whose hypervisor turns that release into a second press (QEMU
    # before its 2023 PS/2 fix, with Windows guests). The native token claim `lang_key_release`
    # overrides this for one console. Costs nothing per console with "send" (no filter at all).
    lang_key_release: str = field(default="send", metadata=_opt(_choice("send", "drop")))


def _recording_store(v: Any) -> str | None:
    from consoleproxy.recordings.recording_store import BadStoreURL as BadRecordingStore
    from consoleproxy.recordings.recording_store import parse_store

    try:
        parse_store(v)
    except BadRecordingStore as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Recording:
    # Console recording (recording.py). Off by default; the native token claim `record` overrides
    # `enabled` for one console, and a VM listed in `vms` is recorded whatever `enabled` says.
    enabled: bool = field(default=False, metadata=_opt())
    store: str = field(default="file:///var/lib/consoleproxy/recordings", metadata=_opt(_recording_store))
    s3_endpoint: str = field(default="", metadata=_opt())
    s3_region: str = field(default="", metadata=_opt())
    keys: str = field(default="redact", metadata=_opt(_choice("redact", "full", "none")))
    # The proxy asks the VNC server for a whole screen this often: a player seeks to these.
    keyframe_interval_seconds: float = field(default=60, metadata=_opt(_range(1, 86400)))
    # The browser's SetEncodings is cut to encodings without state carried from update to update
    # (Raw, CopyRect, RRE, Hextile and pseudo-encodings: rfb_messages.seekable_encodings), so a player can
    # start decoding at any keyframe. Costs bandwidth: no Tight or ZRLE compression (a busy 1080p
    # screen in Hextile is several times the bytes of Tight). false: smaller, seeking replays
    # from the start.
    seekable_encodings: bool = field(default=True, metadata=_opt())
    retention_days: float = field(default=0, metadata=_opt(_range(0)))  # 0 = keep
    max_total_gib: float = field(default=0, metadata=_opt(_range(0)))  # 0 = no cap
    vms: list[str] = field(default_factory=list, metadata=_opt())
    # With an s3:// store: recordings are written here first and uploaded when finished; a store
    # outage leaves them here until it returns (nothing is lost).
    spool_dir: str = field(default="/var/lib/consoleproxy/recordings-spool", metadata=_opt())


@dataclass(frozen=True)
class Resume:
    # How long a console that lost its WebSocket (network, drain, a lost instance) can come back
    # with its resume ticket instead of a new token; 0 = off. Costs ~300 bytes per console (its
    # sealed ticket body) and a ticket sent every third of the window.
    window_seconds: int = field(default=120, metadata=_opt(_range(0, 3600)))


@dataclass(frozen=True)
class Dns:
    enabled: bool = field(default=False, metadata=_opt())
    listen: str = field(default="0.0.0.0:53", metadata=_opt(_hostport))
    zone: str = field(default="consoleproxy.company.com", metadata=_opt())
    ttl: int = field(default=300, metadata=_opt(_range(0, 604800)))
    nameservers: list[str] = field(default_factory=list, metadata=_opt())
    apex_addresses: list[str] = field(default_factory=list, metadata=_opt())
    public_ranges: list[str] = field(default_factory=list, metadata=_opt(_cidrs))
    rate_limit_qps: float = field(default=0, metadata=_opt(_range(0)))


@dataclass(frozen=True)
class Cluster:
    # memory (one process), sqlite:///FILE (processes of one machine), redis://HOST:PORT/DB,
    # redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] (a primary that Sentinels fail over).
    replay_store: str = field(default="memory", metadata=_opt(_replay_store_url, show=_redacted))
    # When a shared store cannot answer: "reject" new consoles (4008, /readyz 503) or "accept"
    # them without the single-use check (counted in replay_store_errors_total).
    on_store_error: str = field(default="reject", metadata=_opt(_choice("reject", "accept")))
    # Bound on each store call (connect, command, SQLite lock wait), so an outage fails fast.
    store_timeout_seconds: float = field(default=1.0, metadata=_opt(_range(0.05, 30)))
    # /readyz says 503 only once the store has been unreachable this long (under "reject"), so a
    # Sentinel failover (a few seconds) does not take every instance out of the balancer at once.
    store_grace_seconds: float = field(default=10.0, metadata=_opt(_range(0, 3600)))
    # redis+sentinel only: after marking a token, WAIT until this many replicas hold the mark
    # (0 = no WAIT), at most store_wait_timeout_ms; a mark not acknowledged in time is counted in
    # replay_store_unacknowledged_total and the console admitted (docs/cluster.md).
    store_wait_replicas: int = field(default=1, metadata=_opt(_range(0, 16)))
    store_wait_timeout_ms: int = field(default=100, metadata=_opt(_range(1, 10000)))


def _acme_directory(v: Any) -> str | None:
    try:
        directory_url(str(v))
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Acme:
    enabled: bool = field(default=False, metadata=_opt())
    # An ACME v2 directory URL, or "letsencrypt" / "letsencrypt-staging".
    directory: str = field(default="letsencrypt", metadata=_opt(_acme_directory))
    # PEM file of CAs to trust for the directory's HTTPS (private CAs); "" = the system's.
    ca_bundle: str = field(default="", metadata=_opt())
    # An e-mail address (or mailto: URI) the CA may write to about expiry and incidents.
    contact: str = field(default="", metadata=_opt())
    challenge: str = field(default="dns-01", metadata=_opt(_choice(*CHALLENGES)))
    key_type: str = field(default="ec-p256", metadata=_opt(_choice(*KEY_TYPES)))
    # PEM file of roots that complete an issued chain (an ACME CA sends leaf and intermediates;
    # the store keeps the root for `certs verify`); "" = the system's trust store.
    roots: str = field(default="", metadata=_opt())
    # Renew this long before expiry; 0 = when a third of the lifetime is left (or the CA's ARI
    # window when it offers one).
    renew_before_days: float = field(default=0, metadata=_opt(_range(0, 365)))
    # After the n-th failure in a row wait retry_base * 2^(n-1), at most retry_max (a CA's
    # Retry-After is a floor).
    retry_base_seconds: float = field(default=60, metadata=_opt(_range(0.1, 86400)))
    retry_max_seconds: float = field(default=21600, metadata=_opt(_range(0.1, 604800)))
    # How often an instance checks whether renewal is due or another instance installed a bundle.
    check_interval_seconds: float = field(default=60, metadata=_opt(_range(0.05, 86400)))
    # Bound on one order (challenges, finalization, download).
    order_timeout_seconds: float = field(default=120, metadata=_opt(_range(1, 3600)))


def _hostports(v: Any) -> str | None:
    for item in v:
        if _hostport(item) or str(item).rpartition(":")[2] == "0":
            return f"a list of HOST:PORT with a port 1-65535 (bad entry {item!r})"
    return None


@dataclass(frozen=True)
class Health:
    # Health checks (health.py), on two schedules as in the Mold guide; 0 = not scheduled
    # (GET /api/health?fresh=true still runs them).
    basic_interval_minutes: float = field(default=3, metadata=_opt(_range(0)))
    advanced_interval_minutes: float = field(default=10, metadata=_opt(_range(0)))
    exclude: list[str] = field(default_factory=list, metadata=_opt())  # check names not run
    # A failed check named here makes /readyz answer 503 (the guide's failures.to.recreate).
    failures_to_unready: list[str] = field(default_factory=list, metadata=_opt())
    # Every executable here runs with "basic" or "advanced"; stdout is its message, exit 0 = pass.
    scripts_dir: str = field(default="", metadata=_opt())
    script_timeout_seconds: float = field(default=30, metadata=_opt(_range(0.1, 3600)))
    min_certificate_days: int = field(default=14, metadata=_opt(_range(0, 3650)))
    min_free_disk_mb: int = field(default=100, metadata=_opt(_range(0)))
    max_cpu_percent: float = field(default=95, metadata=_opt(_range(0, 100)))
    max_memory_percent: float = field(default=95, metadata=_opt(_range(0, 100)))
    # VNC servers whose reachability (TCP connect + RFB version line) is an advanced check.
    hypervisors: list[str] = field(default_factory=list, metadata=_opt(_hostports))


@dataclass(frozen=True)
class Log:
    level: str = field(default="info", metadata=_opt(_choice("debug", "info", "warning", "error")))
    audit: bool = field(default=True, metadata=_opt())


@dataclass(frozen=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    admin: Admin = field(default_factory=Admin)
    tls: Tls = field(default_factory=Tls)
    tokens: Tokens = field(default_factory=Tokens)
    cloudstack: CloudStack = field(default_factory=CloudStack)
    limits: Limits = field(default_factory=Limits)
    targets: Targets = field(default_factory=Targets)
    origin: Origin = field(default_factory=Origin)
    drain: Drain = field(default_factory=Drain)
    page: Page = field(default_factory=Page)
    input: Input = field(default_factory=Input)
    recording: Recording = field(default_factory=Recording)
    resume: Resume = field(default_factory=Resume)
    dns: Dns = field(default_factory=Dns)
    cluster: Cluster = field(default_factory=Cluster)
    acme: Acme = field(default_factory=Acme)
    health: Health = field(default_factory=Health)
    log: Log = field(default_factory=Log)
    # Where relative paths are anchored: the configuration file's directory.
    base_dir: Path = field(default_factory=Path.cwd, compare=False)
    # The file it was read from (None: defaults and environment only); a reload reads it again.
    source: Path | None = field(default=None, compare=False)

    def path(self, value: str) -> Path:
        """Resolve a path-valued setting against the configuration file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


_SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name not in ("base_dir", "source")
}


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is list:
        return "a list of " + _type_name(typing.get_args(tp)[0]).removeprefix("a ").removeprefix(
            "an "
        ) + "s"
    return str(tp)


def _coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` (from TOML) against ``tp``; raise TypeError when it does not fit."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp)
            return [_coerce(v, inner) for v in value]
    raise TypeError


def _from_env_text(text: str, tp: Any) -> Any:
    """Turn an environment variable's text into a TOML-like value of type ``tp``."""
    t = text.strip()
    if tp is bool:
        low = t.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise TypeError
    if tp is int:
        try:
            return int(t)
        except ValueError:
            raise TypeError from None
    if tp is float:
        try:
            return float(t)
        except ValueError:
            raise TypeError from None
    if tp is str:
        return text
    if typing.get_origin(tp) is list:
        if t.startswith("["):
            try:
                return tomllib.loads("v = " + t)["v"]
            except tomllib.TOMLDecodeError:
                raise TypeError from None
        (inner,) = typing.get_args(tp)
        return [_from_env_text(p, inner) for p in t.split(",") if p.strip()]
    raise TypeError


def _build_section(
    name: str, cls: type, values: Mapping[str, Any], sources: Mapping[str, str]
) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        where = sources[f.name]
        tp = hints[f.name]
        try:
            v = _coerce(values[f.name], tp)
        except TypeError:
            raise ConfigError(
                f"{where}: [{name}] {f.name}: expected {_type_name(tp)}, "
                f"got {values[f.name]!r}"
            ) from None
        check = f.metadata.get("check")
        if check is not None:
            problem = check(v)
            if problem:
                shown = f.metadata.get("show", repr)(v)
                raise ConfigError(f"{where}: [{name}] {f.name}: expected {problem}, got {shown}")
        kwargs[f.name] = v
    return cls(**kwargs)


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load defaults, then the TOML file (if any), then ``CONSOLEPROXY_*`` environment overrides."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    label = "defaults"
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        label = str(p)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read configuration: {exc.strerror or exc}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        base = p.resolve().parent

    sections: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for sec, body in data.items():
        if sec not in _SECTIONS:
            raise ConfigError(
                f"{label}: unknown section [{sec}]; expected one of " + ", ".join(_SECTIONS)
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{label}: [{sec}] must be a table, got {body!r}")
        known = {f.name for f in dataclasses.fields(_SECTIONS[sec])}
        for key in body:
            if key not in known:
                raise ConfigError(
                    f"{label}: [{sec}] unknown key {key!r}; expected one of " + ", ".join(sorted(known))
                )
        sections[sec] = dict(body)
        sources[sec] = dict.fromkeys(body, label)

    prefix = "CONSOLEPROXY_"
    for var, text in env.items():
        if not var.startswith(prefix) or var in ("CONSOLEPROXY_CONFIG",):
            continue
        rest = var[len(prefix) :].lower()
        sec, _, key = rest.partition("_")
        if sec not in _SECTIONS:
            raise ConfigError(f"environment {var}: unknown section {sec!r}")
        cls = _SECTIONS[sec]
        hints = typing.get_type_hints(cls)
        if key not in hints:
            raise ConfigError(
                f"environment {var}: [{sec}] unknown key {key!r}; expected one of "
                + ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
            )
        try:
            value = _from_env_text(text, hints[key])
        except TypeError:
            raise ConfigError(
                f"environment {var}: [{sec}] {key}: expected {_type_name(hints[key])}, got {text!r}"
            ) from None
        sections.setdefault(sec, {})[key] = value
        sources.setdefault(sec, {})[key] = f"environment {var}"

    built = {
        sec: _build_section(sec, cls, sections.get(sec, {}), sources.get(sec, {}))
        for sec, cls in _SECTIONS.items()
    }
    cfg = Config(base_dir=base, source=None if path is None else Path(path).resolve(), **built)
    _cross_checks(cfg, label)
    return cfg


def _cross_checks(cfg: Config, label: str) -> None:
    if cfg.tls.domain_suffix and cfg.tls.fqdn:
        raise ConfigError(f"{label}: [tls] set domain_suffix or fqdn, not both")
    if not cfg.listen.ports:
        raise ConfigError(f"{label}: [listen] ports: expected at least one port")
    if cfg.listen.forwarded_for and not cfg.listen.trusted_proxies:
        # Believing the header from anyone would let a browser pick its own client address.
        raise ConfigError(
            f"{label}: [listen] forwarded_for needs trusted_proxies (the balancers' addresses)"
        )
    if cfg.acme.enabled:
        _acme_checks(cfg, label)
    if cfg.listen.proxy_protocol and not cfg.listen.trusted_proxies:
        # A PROXY header from anyone would let a client pick its own address.
        raise ConfigError(
            f"{label}: [listen] proxy_protocol needs trusted_proxies (the balancers' addresses)"
        )


def _acme_checks(cfg: Config, label: str) -> None:
    a = cfg.acme
    try:
        names = order_names(a.challenge, cfg.tls.domain_suffix, cfg.tls.fqdn)
    except ValueError as exc:
        raise ConfigError(f"{label}: [acme] {exc}") from None
    problem = None
    if a.challenge == "tls-alpn-01":
        problem = "challenge 'tls-alpn-01' is not supported yet; use dns-01 or http-01"
    elif not cfg.listen.tls:
        problem = "needs [listen] tls = true (the certificate is for our listeners)"
    elif a.challenge == "dns-01" and not cfg.dns.enabled:
        problem = "dns-01 is answered by our DNS responder; set [dns] enabled = true"
    elif a.challenge == "dns-01":
        zone = cfg.dns.zone.strip().lower().rstrip(".")
        txt = challenge_txt_name(names[0])
        if not txt.endswith("." + zone):
            problem = f"dns-01 needs {txt} inside [dns] zone {zone!r}"
    elif a.challenge == "http-01" and not cfg.listen.redirect_http_port:
        problem = "http-01 is answered on the redirect port; set [listen] redirect_http_port (80)"
    if problem:
        raise ConfigError(f"{label}: [acme] {problem}")


def replace(cfg: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of ``cfg`` with some keys changed, e.g. ``replace(cfg, limits={"max_sessions": 5})``.

    Values go through the same checks as a file's.
    """
    new: dict[str, Any] = {}
    for sec, values in sections.items():
        cls = _SECTIONS[sec]
        merged = {**dataclasses.asdict(getattr(cfg, sec)), **values}
        new[sec] = _build_section(sec, cls, merged, dict.fromkeys(merged, "override"))
    result = dataclasses.replace(cfg, **new)
    _cross_checks(result, "override")
    return result

