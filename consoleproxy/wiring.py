"""Service wiring: the configuration's values turned into the objects a proxy is composed of.

Each function builds one service from ``Config`` (at start, or from a reload's configuration,
checked before anything is swapped in) and turns a bad value into a ``ConfigError`` that names
its key, so a proxy fails before it binds anything.
"""

from __future__ import annotations

import base64
import logging
import ssl
from pathlib import Path

from consoleproxy.config import Config, ConfigError, Limits
from consoleproxy.metrics import Metrics
from consoleproxy.net.dns import DnsSettings
from consoleproxy.policy.cloudstack import CloudStackKeyError, CloudStackKeys, CloudStackValidator
from consoleproxy.policy.origin import OriginPolicy
from consoleproxy.policy.replay import GuardedReplayStore, ReplayStoreUnavailable
from consoleproxy.policy.replay_open import open_replay_store
from consoleproxy.policy.replay_url import BadStoreURL, redact_url
from consoleproxy.policy.sessions import Registry
from consoleproxy.policy.targets import TargetPolicy, local_addresses
from consoleproxy.policy.tokens import Keyring, KeyringError, TokenValidator
from consoleproxy.recordings.recording import Recordings
from consoleproxy.recordings.recording_store import FileStore, parse_store

__all__ = [
    "apply_limits",
    "backend_tls_context",
    "cloudstack_validator",
    "dns_settings",
    "origin_policy",
    "recordings",
    "registry",
    "replay_store",
    "resume_keyring",
    "target_policy",
    "token_validator",
]

log = logging.getLogger("consoleproxy")


def replay_store(cfg: Config, metrics: Metrics) -> GuardedReplayStore:
    """``[cluster] replay_store`` with its failure policy; a SQLite file is opened now."""
    c = cfg.cluster
    sentinel = c.replay_store.strip().lower().startswith(("redis+sentinel:", "rediss+sentinel:"))
    if sentinel and c.store_wait_timeout_ms >= c.store_timeout_seconds * 1000:
        raise ConfigError(
            f"[cluster] store_wait_timeout_ms: expected less than store_timeout_seconds "
            f"({c.store_timeout_seconds:g} s), got {c.store_wait_timeout_ms} ms"
        )
    try:
        store = open_replay_store(
            c.replay_store, base_dir=cfg.base_dir, timeout=c.store_timeout_seconds,
            wait_replicas=c.store_wait_replicas, wait_timeout=c.store_wait_timeout_ms / 1000,
            on_unacknowledged=metrics.replay_store_unacknowledged_total.inc,
        )
    except BadStoreURL as exc:
        raise ConfigError(f"[cluster] replay_store: {exc}") from None
    except ReplayStoreUnavailable as exc:
        raise ConfigError(f"[cluster] replay_store: cannot open it: {exc.detail}") from None
    return GuardedReplayStore(
        store,
        on_error=c.on_store_error,
        on_failure=metrics.replay_store_errors_total.inc,
        name=redact_url(c.replay_store),
        grace=c.store_grace_seconds,
    )


def token_validator(cfg: Config, keyring: Keyring | None, replay: GuardedReplayStore) -> TokenValidator:
    """Native tokens (DESIGN 7), with ``keyring`` or the ``[tokens] keyring`` file."""
    if keyring is None:
        keyring = Keyring.load(cfg.path(cfg.tokens.keyring))
    return TokenValidator(
        keyring, replay, skew_seconds=cfg.tokens.skew_seconds, single_use=cfg.tokens.single_use
    )


def cloudstack_validator(cfg: Config, replay: GuardedReplayStore) -> CloudStackValidator:
    """Tokens as a CloudStack/Mold management server makes them (DESIGN 7)."""
    c = cfg.cloudstack
    try:
        auth = base64.b64decode(c.auth_key, validate=True) if c.auth_key else None
    except ValueError:
        raise ConfigError("[cloudstack] auth_key: expected base64") from None
    try:
        keys = CloudStackKeys.load(cfg.path(c.key_iv_file), auth_key=auth)
    except CloudStackKeyError as exc:
        raise ConfigError(f"[cloudstack] key_iv_file: {exc}") from None
    return CloudStackValidator(
        keys,
        replay,
        hash_key=c.hash_key,
        check_source_ip=c.check_source_ip,
        check_extra=c.check_extra,
    )


def resume_keyring(cfg: Config, keyring: Keyring | None, *, native_tokens: bool) -> Keyring | None:
    """The keyring that seals resume tickets when it is not the native validator's (which the
    server reads each time: it follows a keyring reload). CloudStack tokens: ``[tokens] keyring``
    when the file exists (the same file on every instance), else resume is off: a key of this
    process alone would strand consoles on a lost instance."""
    if not cfg.resume.window_seconds or native_tokens:
        return None
    if keyring is not None:
        return keyring
    path = cfg.path(cfg.tokens.keyring)
    if not path.is_file():
        log.info("resume is off: CloudStack tokens and no [tokens] keyring file at %s", path)
        return None
    try:
        return Keyring.load(path)
    except KeyringError as exc:
        raise ConfigError(f"[tokens] keyring (for resume tickets): {exc}") from None


def dns_settings(cfg: Config) -> DnsSettings | None:
    """``[dns]``, checked at construction so bad settings fail before anything binds."""
    d = cfg.dns
    if not d.enabled:
        return None
    try:
        return DnsSettings(
            zone=d.zone,
            listen=d.listen,
            ttl=d.ttl,
            nameservers=tuple(d.nameservers),
            apex_addresses=tuple(d.apex_addresses),
            public_ranges=tuple(d.public_ranges),
            rate_limit_qps=d.rate_limit_qps,
        )
    except ValueError as exc:
        raise ConfigError(f"[dns] {exc}") from None


def recordings(cfg: Config, metrics: Metrics) -> Recordings:
    """``[recording]``: a local directory, or an S3 bucket fed from a local spool."""
    rc = cfg.recording
    url = parse_store(rc.store)  # checked by load_config
    if url.scheme == "file":
        return Recordings(rc, FileStore(Path(url.path)), metrics)
    from consoleproxy.recordings.recording_s3 import S3Store

    spool = FileStore(cfg.path(rc.spool_dir))
    remote = S3Store(url.path, url.prefix, endpoint=rc.s3_endpoint, region=rc.s3_region, spool=spool)
    return Recordings(rc, spool, metrics, remote)


def backend_tls_context(cfg: Config) -> ssl.SSLContext:
    """TLS towards VNC servers (VeNCrypt); a missing or bad CA file is an error at start (or
    reload), not per console."""
    t = cfg.targets
    cafile = cfg.path(t.vnc_ca_file) if t.vnc_ca_file else None
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[targets] vnc_ca_file: cannot load {cafile}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Hypervisor certificates name hosts, not the addresses tokens carry. (Set before
    # verify_mode: CERT_NONE with check_hostname on is refused by the ssl module.)
    ctx.check_hostname = False
    if t.insecure:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def target_policy(cfg: Config) -> TargetPolicy:
    return TargetPolicy.from_config(cfg.targets.allowed_cidrs, cfg.targets.ports, own=local_addresses())


def origin_policy(cfg: Config) -> OriginPolicy:
    return OriginPolicy.of(cfg.origin.allowed, allow_missing=cfg.origin.allow_missing, tls=cfg.listen.tls)


def registry(lim: Limits) -> Registry:
    return Registry(
        max_sessions=lim.max_sessions,
        max_per_vm=lim.max_sessions_per_vm,
        per_vm_policy=lim.per_vm_policy,
        max_per_client_ip=lim.max_sessions_per_client_ip,
    )


def apply_limits(reg: Registry, lim: Limits) -> None:
    """A reload's session limits, for the next console (open ones stay)."""
    reg.max_sessions = lim.max_sessions
    reg.max_per_vm = lim.max_sessions_per_vm
    reg.per_vm_policy = lim.per_vm_policy
    reg.max_per_client_ip = lim.max_sessions_per_client_ip
