"""Live reload (SIGHUP and admin ``POST /api/reload``, DESIGN.md 10): what may change while consoles run.

Pure policy, no I/O: :func:`plan` compares the running configuration with the one just read and
says, key by key, what is applied now and what needs a restart. The server (``ProxyServer.reload``)
then builds everything the new values need (keyring, CloudStack keys, target policy, backend TLS,
certificates) before it swaps any of it in, so an error anywhere leaves every old value in use.

Applied live: the certificates, the token keyring file, CloudStack's key/IV and keys, ``[tokens]``
(but ``format``), ``[cloudstack]``, ``[targets]``, ``[origin]``, ``[log]`` and the ``[limits]`` read
per console. Everything else was used to open a socket or start a task (listen addresses and ports,
the admin listener, the accept layer's limits, DNS, the replay store, …): a change there is named
in the reply and the log and waits for a restart; the running process keeps the old value, so what
it reports stays what it does. Open consoles are never touched: they keep what they started with, except that
the sweeper applies the idle timeout, lifetime and ping interval it reads at each pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from consoleproxy.config import Config

__all__ = ["LIVE_SECTIONS", "RESTART_KEYS", "ReloadError", "ReloadPlan", "ReloadResult", "plan"]


class ReloadError(Exception):
    """A reload found something wrong (the message says what); nothing was changed."""

# Sections whose keys apply to the next console (or log line) once reloaded.
LIVE_SECTIONS = frozenset({"tokens", "cloudstack", "targets", "origin", "limits", "log"})
# Keys of those sections taken once at start: the accept layer's limits (listener.py) and the
# token format (which validator exists at all).
RESTART_KEYS = frozenset({
    ("tokens", "format"),
    ("limits", "max_header_line_bytes"),
    ("limits", "keepalive_timeout_seconds"),
    ("limits", "max_concurrent_handshakes"),
    ("limits", "max_handshakes_per_ip"),
    ("limits", "connections_per_ip_per_second"),
    ("limits", "connection_burst"),
    ("limits", "request_head_timeout_seconds"),
    ("limits", "max_request_head_bytes"),
})


@dataclass(frozen=True)
class ReloadPlan:
    """``config``: what to run with (new live values, old values of restart-only keys);
    ``changed`` and ``restart``: ``"[section] key"`` names, in the configuration's order."""

    config: Config
    changed: tuple[str, ...]
    restart: tuple[str, ...]


@dataclass(frozen=True)
class ReloadResult:
    """The reply to a reload: what changed (keys and files), what waits for a restart."""

    changed: tuple[str, ...]
    restart: tuple[str, ...]
    certificates: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str]]:
        return {"changed": list(self.changed), "restart_needed": list(self.restart),
                "certificates": list(self.certificates)}

    def summary(self) -> str:
        """One log line."""
        parts = [f"changed: {', '.join(self.changed) or 'nothing'}"]
        if self.restart:
            parts.append(f"needs a restart (not applied): {', '.join(self.restart)}")
        if self.certificates:
            parts.append(f"certificates: {', '.join(self.certificates)}")
        return "; ".join(parts)


def plan(running: Config, loaded: Config) -> ReloadPlan:
    """Split the differences between ``running`` and ``loaded`` into live changes and restarts."""
    changed: list[str] = []
    restart: list[str] = []
    sections: dict[str, Any] = {}
    for sec in dataclasses.fields(Config):
        if sec.name in ("base_dir", "source"):
            continue
        old, new = getattr(running, sec.name), getattr(loaded, sec.name)
        if old == new:
            continue
        keep: dict[str, Any] = {}
        for key in dataclasses.fields(old):
            before, after = getattr(old, key.name), getattr(new, key.name)
            if before == after:
                continue
            name = f"[{sec.name}] {key.name}"
            if sec.name in LIVE_SECTIONS and (sec.name, key.name) not in RESTART_KEYS:
                changed.append(name)
            else:
                restart.append(name)
                keep[key.name] = before
        sections[sec.name] = dataclasses.replace(new, **keep) if keep else new
    config = dataclasses.replace(running, **sections) if sections else running
    return ReloadPlan(config, tuple(changed), tuple(restart))
