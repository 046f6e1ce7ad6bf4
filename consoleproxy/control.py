"""What the admin API (admin.py) and the health checks (health.py) may ask of a running proxy.

A narrow, typed interface: they see these properties and methods, never the server's internals,
so the server's composition can change without them. ``ProxyServer`` implements it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from consoleproxy.config import Config
    from consoleproxy.metrics import Metrics
    from consoleproxy.net.dns import DnsServer
    from consoleproxy.policy.replay import GuardedReplayStore
    from consoleproxy.policy.sessions import Registry
    from consoleproxy.recordings.recording import Recordings
    from consoleproxy.reload import ReloadResult
    from consoleproxy.tls.acme_orders import AcmeManager
    from consoleproxy.tls.certsni import SNIContexts
    from consoleproxy.tls.certstore import CertStore
    from consoleproxy.web.health import HealthRunner

__all__ = ["ProxyControl"]


class ProxyControl(Protocol):
    @property
    def cfg(self) -> Config: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def recordings(self) -> Recordings: ...
    @property
    def replay(self) -> GuardedReplayStore: ...
    @property
    def health(self) -> HealthRunner: ...
    @property
    def dns(self) -> DnsServer | None: ...
    @property
    def acme(self) -> AcmeManager | None: ...
    @property
    def tls(self) -> SNIContexts | None:
        """The public listeners' certificates ([listen] tls), once started."""
    @property
    def certstore(self) -> CertStore | None: ...
    @property
    def certificate_problem(self) -> str | None: ...

    def kill(self, session_id: str) -> bool: ...
    def start_drain(self) -> bool: ...
    def reload(self) -> ReloadResult: ...
    def reload_certificates(self) -> list[str]: ...
    def take_removed_sessions(self) -> list[str]:
        """Consoles ended since the last call (CloudStack's removedSessions), each reported once."""
    def page_dirs(self) -> tuple[Path, Path]:
        """Our page's static folder and noVNC's."""
    def public_listeners(self) -> list[tuple[str, list[socket.socket]]]:
        """Each public console port: its configured host and its listening sockets (none when closed)."""
    def admin_sockets(self) -> list[socket.socket] | None:
        """The admin listener's sockets; None before it started."""
