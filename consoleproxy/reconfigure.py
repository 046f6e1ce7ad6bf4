"""Live reload, the building half (SIGHUP and ``POST /api/reload``; policy in reload.py).

``prepare`` reads the configuration file and the key and certificate files again and builds every
new value (keyring, CloudStack keys, target policy, backend TLS, certificates) without changing
anything the proxy uses; any error raises ``ReloadError``. The server then swaps the prepared
values in where nothing can fail (``ProxyServer.reload``), so a reload is all or nothing. Open
consoles keep what they started with.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from consoleproxy.config import Config, ConfigError, load_config
from consoleproxy.errors import ConsoleProxyError
from consoleproxy.policy.cloudstack import CloudStackValidator
from consoleproxy.policy.replay import GuardedReplayStore
from consoleproxy.policy.targets import TargetPolicy
from consoleproxy.policy.tokens import Keyring, TokenValidator
from consoleproxy.reload import ReloadError, plan
from consoleproxy.tls.certpem import CertificateError
from consoleproxy.tls.certstate import ServingCertificates
from consoleproxy.wiring import backend_tls_context, cloudstack_validator, target_policy

__all__ = ["Prepared", "prepare", "swap_validators"]

log = logging.getLogger("consoleproxy")


@dataclass(frozen=True)
class Prepared:
    cfg: Config
    changed: tuple[str, ...]  # what is applied now (the plan's keys, the key files)
    restart: tuple[str, ...]  # what waits for a restart
    keyring: Keyring | None  # native tokens: the keyring file read again
    cloudstack: CloudStackValidator | None  # CloudStack tokens: built from the new settings
    targets: TargetPolicy
    backend_tls: ssl.SSLContext
    certificates: tuple[str, ...]  # the live bundles now serving


def prepare(
    running: Config,
    *,
    validator: TokenValidator | None,
    cloudstack: CloudStackValidator | None,
    replay: GuardedReplayStore,
    certificates: ServingCertificates,
) -> Prepared:
    try:
        loaded = load_config(running.source) if running.source is not None else running
        p = plan(running, loaded)
        cfg = p.config
        changed = list(p.changed)
        keyring = new_cloudstack = None
        if validator is not None:
            keyring = Keyring.load(cfg.path(cfg.tokens.keyring))
            if keyring != validator.keyring:
                changed.append(f"keyring ({', '.join(keyring.kids)})")
        if cloudstack is not None:
            new_cloudstack = cloudstack_validator(cfg, replay)
            if new_cloudstack.keys != cloudstack.keys:
                changed.append("CloudStack key/IV")
        targets = target_policy(cfg)
        backend_tls = backend_tls_context(cfg)
        # Last: the certificates swap themselves only when the whole store loads.
        tls = certificates.tls
        serving = tls.reload() if tls is not None else []
    except (ConfigError, ConsoleProxyError, CertificateError, OSError, ValueError) as exc:
        log.error("reload failed; nothing changed, the running configuration stays: %s", exc)
        raise ReloadError(str(exc)) from None
    finally:
        if certificates.tls is not None:
            certificates.refresh()
    return Prepared(cfg, tuple(changed), p.restart, keyring, new_cloudstack, targets, backend_tls,
                    tuple(serving))


def swap_validators(
    p: Prepared, validator: TokenValidator | None, cloudstack: CloudStackValidator | None
) -> None:
    """The prepared token settings into the validators in use (cannot fail)."""
    cfg = p.cfg
    if validator is not None and p.keyring is not None:
        validator.keyring = p.keyring
        validator.skew_seconds = cfg.tokens.skew_seconds
        validator.single_use = cfg.tokens.single_use
    if cloudstack is not None and p.cloudstack is not None:
        for attr in ("keys", "hash_key", "check_source_ip", "check_extra"):
            setattr(cloudstack, attr, getattr(p.cloudstack, attr))
