"""The proxy: composition and lifecycle of one instance.

A console's bytes go ``net.listener`` (accept, limits, first request head) -> ``net.browser``
(the upgrade; our own WebSocket) -> ``net.console`` (the pipeline: origin, token, target,
limits, RFB on both sides) -> ``net.relay``. Everything a proxy does lives in a module of its
own, composed here: the console pipeline (net/console.py), service wiring (wiring.py), the HTTP
apps and page (web/webapps.py), certificates while serving (tls/certstate.py), live reload
(reconfigure.py), readiness (policy/readiness.py), the sweeper, drain and signals (lifecycle.py),
metrics and audit (bookkeeping.py, policy/outcome.py); web/admin.py and web/health.py reach the
server through control.ProxyControl.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from pathlib import Path

from aiohttp import web

from consoleproxy import wiring
from consoleproxy.bookkeeping import Bookkeeping
from consoleproxy.config import Config
from consoleproxy.lifecycle import Drain, kill, sweep
from consoleproxy.metrics import Metrics
from consoleproxy.net.console import Consoles
from consoleproxy.net.dns import DnsServer
from consoleproxy.net.listener import ConsoleSite, handler_args
from consoleproxy.net.memory import Trimmer, malloc_trim
from consoleproxy.policy.acme_policy import ChallengeRecords
from consoleproxy.policy.cloudstack import CloudStackValidator
from consoleproxy.policy.gates import AcceptSettings
from consoleproxy.policy.readiness import ReadinessState, not_ready_reason
from consoleproxy.policy.tokens import Keyring, TokenValidator
from consoleproxy.protocol.forwarded import parse_networks
from consoleproxy.reconfigure import prepare, swap_validators
from consoleproxy.reload import ReloadResult
from consoleproxy.tls.acme_orders import AcmeManager
from consoleproxy.tls.certpem import CertificateError
from consoleproxy.tls.certsni import SNIContexts
from consoleproxy.tls.certstate import ServingCertificates
from consoleproxy.tls.certstore import CertStore
from consoleproxy.web.health import HealthRunner
from consoleproxy.web.webapps import bind_admin, page_dirs, page_handler, public_app, redirect_app

__all__ = ["ProxyServer"]

log = logging.getLogger("consoleproxy")

# /readyz waits at most this long for a replay store ping: far below any balancer's check timeout.
READYZ_STORE_WAIT = 0.1


class ProxyServer:
    """One proxy instance: public listener(s) from ``[listen]`` and the admin listener.

    Implements control.ProxyControl for admin.py and health.py.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        keyring: Keyring | None = None,
        tls: SNIContexts | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.cfg = cfg
        # Set for `serve --workers N`: every worker binds the same public ports; [listen] reuse_port:
        # a new version binds them beside this one (docs/upgrade.md).
        self.reuse_port = reuse_port or cfg.listen.reuse_port
        self.metrics = metrics or Metrics()
        # Certificates for the public listeners; loaded in start() when [listen] tls is on.
        self.certificates = ServingCertificates(self.metrics, tls)
        self.replay = wiring.replay_store(cfg, self.metrics)
        self.validator: TokenValidator | None = None
        self.cloudstack: CloudStackValidator | None = None
        if cfg.tokens.format == "cloudstack":
            self.cloudstack = wiring.cloudstack_validator(cfg, self.replay)
        else:
            self.validator = wiring.token_validator(cfg, keyring, self.replay)
        self.targets = wiring.target_policy(cfg)
        self.trusted_proxies = parse_networks(cfg.listen.trusted_proxies)
        self.origin_policy = wiring.origin_policy(cfg)
        # Built once: a missing or bad CA file is a configuration error at start, not per console.
        self.backend_tls = wiring.backend_tls_context(cfg)
        self.registry = wiring.registry(cfg.limits)
        self.drain = Drain(self.metrics)
        self.books = Bookkeeping(self.metrics, lambda: self.cfg.log.audit)
        self._runners: list[web.AppRunner] = []
        self._sites: list[ConsoleSite] = []
        self._redirect_site: ConsoleSite | None = None
        self._admin_sockets: list[socket.socket] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Gives the pages of ended consoles back to the OS (memory.py: ~9 KiB of RSS a TLS console).
        self.trimmer = Trimmer(malloc_trim())
        self.admin_key: str | None = None
        self.dns: DnsServer | None = None
        # [acme]: challenge answers (DNS responder, redirect port) and the renewal loop.
        self.challenges: ChallengeRecords | None = None
        self.acme: AcmeManager | None = None
        self._dns_settings = wiring.dns_settings(cfg)
        # Resume (resume.py): the keyring that seals tickets.
        self._resume_keys = wiring.resume_keyring(cfg, keyring, native_tokens=self.validator is not None)
        self.health = HealthRunner(self)  # [health] checks; scheduled from start()
        self.recordings = wiring.recordings(cfg, self.metrics)
        # The console pipeline (net/console.py) and the consoles it has open.
        self.consoles = Consoles(self)

    @property
    def resume_keyring(self) -> Keyring | None:
        if not self.cfg.resume.window_seconds:
            return None
        return self.validator.keyring if self.validator is not None else self._resume_keys

    # --- state other modules read (control.ProxyControl) -------------------------------------

    @property
    def tls(self) -> SNIContexts | None:
        return self.certificates.tls

    @property
    def certstore(self) -> CertStore | None:
        return self.certificates.store

    @property
    def certificate_problem(self) -> str | None:
        return self.certificates.problem

    @property
    def dev_ca(self) -> Path | None:
        return self.certificates.dev_ca

    @property
    def draining(self) -> bool:
        return self.drain.draining

    @property
    def refusing(self) -> bool:
        return self.drain.refusing

    @property
    def drained(self) -> asyncio.Event:
        return self.drain.drained

    @property
    def public_ports(self) -> list[int]:
        return [s.port for s in self._sites]

    @property
    def admin_port(self) -> int:
        assert self._admin_sockets, "the admin listener is not started"
        port: int = self._admin_sockets[0].getsockname()[1]
        return port

    def page_dirs(self) -> tuple[Path, Path]:
        return page_dirs(self.cfg)

    def public_listeners(self) -> list[tuple[str, list[socket.socket]]]:
        return [(site.host, list(site.sockets)) for site in self._sites]

    def admin_sockets(self) -> list[socket.socket] | None:
        return None if self._admin_sockets is None else list(self._admin_sockets)

    def take_removed_sessions(self) -> list[str]:
        return self.books.take_removed()

    # --- lifecycle ---------------------------------------------------------------------------

    def public_app(self) -> web.Application:
        return public_app(
            self.cfg, websocket=self.consoles.handle_late_request, healthz=self.handle_healthz,
            readyz=self.handle_readyz, page=page_handler(lambda: self.cfg),
        )

    async def start(self) -> None:
        from consoleproxy.web.admin import admin_app, startup_admin_key

        # Checked before anything binds: a public admin address needs a key file made beforehand.
        self.admin_key = startup_admin_key(self.cfg.admin.address, self.cfg.path(self.cfg.admin.key_file))
        lst = self.cfg.listen
        certs = self.certificates
        if lst.tls and certs.tls is None:
            await asyncio.to_thread(certs.load, self.cfg.tls, self.cfg.path(self.cfg.tls.store))
        if self.cfg.acme.enabled and certs.store is not None:
            self.challenges = ChallengeRecords(certs.store.directory / "acme" / "challenges.json")
        runner = web.AppRunner(
            self.public_app(), access_log=None, handle_signals=False, **handler_args(self.cfg.limits)
        )
        await runner.setup()
        self._runners.append(runner)
        ctx = certs.tls.context if (lst.tls and certs.tls) else None
        accept = AcceptSettings.from_config(self.cfg.limits, lst.proxy_protocol, lst.trusted_proxies)
        for port in lst.ports:
            # listener.py: handshake limits, PROXY protocol, then TLS (SNI via ctx) and aiohttp.
            site = ConsoleSite(
                runner, lst.address, port, settings=accept, metrics=self.metrics, ssl_context=ctx,
                backlog=1024, reuse_port=self.reuse_port, console=self.consoles.accept,
            )
            await site.start()
            self._sites.append(site)
        if lst.tls and lst.redirect_http_port:
            rrunner = web.AppRunner(
                redirect_app(self.challenges, lambda: self.public_ports[0]), access_log=None,
                handle_signals=False,
            )
            await rrunner.setup()
            self._runners.append(rrunner)
            # The same accept layer as the console ports (slow heads, floods, per-source rates), but
            # never a PROXY header: the balancer forwards only the TLS ports.
            self._redirect_site = ConsoleSite(
                rrunner, lst.address, lst.redirect_http_port, metrics=self.metrics, backlog=1024,
                settings=dataclasses.replace(accept, proxy_protocol=False), reuse_port=self.reuse_port,
            )
            await self._redirect_site.start()
        arunner = web.AppRunner(admin_app(self, self.admin_key), access_log=None)
        await arunner.setup()
        self._runners.append(arunner)
        self._admin_sockets = await bind_admin(arunner, self.cfg.admin.address, self.cfg.admin.port)
        self._sweeper = asyncio.create_task(sweep(
            limits=lambda: self.cfg.limits, registry=self.registry, tick=lambda: self.trimmer.tick(),
            pinged=self.consoles.pinged, refresh_tickets=self.consoles.refresh_tickets, certificates=certs,
        ))
        self.recordings.start(self.consoles.relays.values)
        if self._dns_settings is not None:
            self.dns = DnsServer(self._dns_settings, self.metrics, challenges=self.challenges)
            await self.dns.start()
            log.info("DNS responder for %s on %s", self._dns_settings.zone, self.cfg.dns.listen)
        self.health.start()
        if self.challenges is not None and certs.store is not None:
            self.acme = AcmeManager(
                self.cfg, certs.store, self.challenges, lock=self.replay, metrics=self.metrics,
                on_installed=self._acme_installed,
            )
            self.acme.start()

    def _acme_installed(self) -> None:
        with contextlib.suppress(CertificateError):  # logged; the old certificates stay
            self.reload_certificates()

    def reload_certificates(self) -> list[str]:
        """Use the store's current live bundles for new handshakes; on error keep the old ones."""
        return self.certificates.reload()

    def reload(self) -> ReloadResult:
        """SIGHUP and ``POST /api/reload``: build and check everything first (reconfigure.py),
        then swap it in. Any error raises ReloadError and changes nothing."""
        p = prepare(self.cfg, validator=self.validator, cloudstack=self.cloudstack, replay=self.replay,
                    certificates=self.certificates)
        # Nothing below can fail: the new values go live together.
        cfg_now, self.cfg = self.cfg, p.cfg
        swap_validators(p, self.validator, self.cloudstack)
        self.targets = p.targets
        self.backend_tls = p.backend_tls
        self.origin_policy = wiring.origin_policy(p.cfg)
        wiring.apply_limits(self.registry, p.cfg.limits)
        if p.cfg.log.level != cfg_now.log.level:
            logging.getLogger().setLevel(p.cfg.log.level.upper())
        result = ReloadResult(p.changed, p.restart, p.certificates)
        log.info("reload: %s", result.summary())
        return result

    def start_drain(self) -> bool:
        """Begin draining (idempotent); returns False when already draining."""
        hand_over = self._sites if self.cfg.listen.reuse_port else ()
        return self.drain.start(self.cfg.drain, self.registry, hand_over=hand_over)

    def kill(self, session_id: str, reason: str = "ended by an administrator") -> bool:
        return kill(self.registry, session_id, reason)

    async def close(self) -> None:
        self.drain.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.consoles.close()  # 1001 and each one's close handshake (CLOSE_TIMEOUT at most)
        await self.recordings.close()
        await self.consoles.settle()
        if self.acme is not None:
            await self.acme.close()
        await self.health.close()
        if self.dns is not None:
            await self.dns.close()
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        await self.replay.close()

    # --- health ------------------------------------------------------------------------------

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def not_ready_reason(self) -> str | None:
        return not_ready_reason(ReadinessState(
            draining=self.draining,
            tls=self.cfg.listen.tls,
            certificate_problem=self.certificates.problem,
            acme_problem=self.acme.problem() if self.acme is not None else None,
            store_problem=self.replay.not_ready_reason(),
            health_problem=self.health.unready_reason(),
            sessions=len(self.registry),
            at_capacity=self.registry.at_capacity(),
            unready_at_sessions=self.cfg.limits.unready_at_sessions,
        ))

    async def handle_readyz(self, request: web.Request) -> web.Response:
        # Pings a shared store at most once a second; answers from the last known state when the
        # ping takes longer than READYZ_STORE_WAIT (the ping finishes in the background).
        await self.replay.refresh(wait=READYZ_STORE_WAIT)
        reason = self.not_ready_reason()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)
