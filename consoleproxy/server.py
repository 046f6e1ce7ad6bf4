"""The aiohttp application: public listeners and the console path.

A console's bytes go ``server`` (upgrade, token) -> ``tokens`` -> ``targets`` -> ``sessions``
(limits) -> ``rfb`` (security handshake on both sides) -> ``relay``. Errors after the upgrade are
sent as WebSocket close codes (DESIGN.md 8): a browser cannot read the HTTP status of a failed
upgrade, but it can read a close code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from . import pagefiles, rfb
from .acme_orders import AcmeManager
from .acme_policy import ChallengeRecords
from .assets import default_page_dirs
from .certstore import CertificateError, CertStore, SNIContexts, bundle_key
from .cloudstack import CloudStackKeyError, CloudStackKeys, CloudStackValidator
from .config import Config, ConfigError, load_config
from .devcert import CA_FILE as DEV_CA_FILE
from .devcert import ensure_dev_certificate
from .dns import DnsServer, DnsSettings
from .errors import (
    BackendAuthFailed,
    BackendUnreachable,
    ConsoleError,
    ConsoleProxyError,
    Forbidden,
    ResumeRefused,
    SessionKilled,
    ShuttingDown,
    TokenInvalid,
)
from .forwarded import client_address, parse_networks
from .health import HealthRunner
from .listener import AcceptSettings, ConsoleSite, handler_args
from .memory import Trimmer, malloc_trim
from .metrics import Metrics
from .query import raw_query_param
from .recording import Recordings
from .recording_policy import should_record
from .recording_store import FileStore, parse_store
from .relay import CLOSE_TIMEOUT, STREAM_LIMIT, ClientReader, ConsoleWebSocket, Relay
from .reload import ReloadError, ReloadResult, plan
from .replay import (
    BadStoreURL,
    GuardedReplayStore,
    ReplayStoreUnavailable,
    open_replay_store,
    redact_url,
)
from .resume import (
    MAX_TICKET_BYTES,
    TicketBody,
    issue_ticket,
    new_resume_id,
    open_ticket,
    seal_body,
    used_key,
)
from .sessions import Registry, Session
from .targets import TargetPolicy, check_hostname_syntax, is_ip_address, local_addresses
from .tokens import Claims, Keyring, KeyringError, TokenValidator
from .wsframes import close_reason as _reason

__all__ = ["ProxyServer", "run_forever"]

log = logging.getLogger("consoleproxy")
audit_log = logging.getLogger("consoleproxy.audit")

DEV_SUFFIX = "*.consoleproxy.local"
CERT_RECHECK_SECONDS = 60.0
# A browser offering this WebSocket subprotocol (our console page) is told, in a text message
# before RFB starts, that its session is recorded; noVNC ignores a text message (it has no bytes).
# The page's other text messages are resume tickets ("cpr1.<base64url>...", resume.py), which
# never contain ':': a text message starting with NOTICE_PREFIX is a notice, anything else a
# ticket (README, "Resume"; docs/recording.md).
NOTICE_PROTOCOL = "consoleproxy.notice"
NOTICE_PREFIX = "consoleproxy:"
RECORDED_NOTICE = NOTICE_PREFIX + "recorded"
# /readyz waits at most this long for a replay store ping: far below any balancer's check timeout.
READYZ_STORE_WAIT = 0.1


class ProxyServer:
    """One proxy instance: public listener(s) from ``[listen]`` and the admin listener."""

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
        # Certificates for the public listeners; set up in start() when [listen] tls is on.
        self.tls = tls
        self.certstore: CertStore | None = tls.store if tls else None
        self.certificate_problem: str | None = None
        self.dev_ca: Path | None = None
        self.replay = self._replay_store()
        self.validator: TokenValidator | None = None
        self.cloudstack: CloudStackValidator | None = None
        if cfg.tokens.format == "cloudstack":
            self.cloudstack = self._cloudstack_validator()
        else:
            if keyring is None:
                keyring = Keyring.load(cfg.path(cfg.tokens.keyring))
            self.validator = TokenValidator(
                keyring,
                self.replay,
                skew_seconds=cfg.tokens.skew_seconds,
                single_use=cfg.tokens.single_use,
            )
        self.targets = TargetPolicy.from_config(
            cfg.targets.allowed_cidrs, cfg.targets.ports, own=local_addresses()
        )
        self._trusted_proxies = parse_networks(cfg.listen.trusted_proxies)
        self._allowed_origins = {a.strip().lower().rstrip("/") for a in cfg.origin.allowed}
        # Built once: a missing or bad CA file is a configuration error at start, not per console.
        self._backend_tls = self._backend_tls_context()
        lim = cfg.limits
        self.registry = Registry(
            max_sessions=lim.max_sessions,
            max_per_vm=lim.max_sessions_per_vm,
            per_vm_policy=lim.per_vm_policy,
            max_per_client_ip=lim.max_sessions_per_client_ip,
        )
        self.draining = False
        self.refusing = False  # set when a drain's grace period is over
        self._drain_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set whenever no session is open
        self._idle.set()
        self.drained = asyncio.Event()  # set when a drain has run to its end
        self._runners: list[web.AppRunner] = []
        self._sites: list[ConsoleSite] = []
        self._sweeper: asyncio.Task[None] | None = None
        # Consoles whose browser connection is open: relaying, or closing (close handshake).
        self._relays: dict[str, Relay] = {}
        # Browser connections in the RFB handshake (pinged by the sweeper like relaying ones).
        self._handshaking: set[ClientReader] = set()
        self._relays_gone = asyncio.Event()
        self._relays_gone.set()
        # Gives the pages of ended consoles back to the OS (memory.py: ~9 KiB of RSS a TLS console).
        self.trimmer = Trimmer(malloc_trim())
        # Sessions ended since the last /cmd/getstatus, reported once (CloudStack's removedSessions).
        self.removed_sessions: list[str] = []
        self.admin_key: str | None = None
        self.dns: DnsServer | None = None
        # [acme]: challenge answers (DNS responder, redirect port) and the renewal loop.
        self.challenges: ChallengeRecords | None = None
        self.acme: AcmeManager | None = None
        self._dns_settings = self._dns_config()
        # Resume (resume.py): the keyring that seals tickets, consoles by resume chain id, and the
        # store writes that mark a generation used when its console must not come back.
        self._resume_keys = self._resume_keyring(keyring)
        self._by_resume: dict[str, Session] = {}
        self._burns: set[asyncio.Task[None]] = set()
        self.health = HealthRunner(self)  # [health] checks; scheduled from start()
        self.recordings = self._recordings()

    def _recordings(self) -> Recordings:
        """``[recording]``: a local directory, or an S3 bucket fed from a local spool."""
        rc = self.cfg.recording
        url = parse_store(rc.store)  # checked by load_config
        if url.scheme == "file":
            return Recordings(rc, FileStore(Path(url.path)), self.metrics)
        from .recording_s3 import S3Store

        spool = FileStore(self.cfg.path(rc.spool_dir))
        remote = S3Store(url.path, url.prefix, endpoint=rc.s3_endpoint, region=rc.s3_region, spool=spool)
        return Recordings(rc, spool, self.metrics, remote)

    def _replay_store(self) -> GuardedReplayStore:
        """``[cluster] replay_store`` with its failure policy; a SQLite file is opened now."""
        c = self.cfg.cluster
        sentinel = c.replay_store.strip().lower().startswith(("redis+sentinel:", "rediss+sentinel:"))
        if sentinel and c.store_wait_timeout_ms >= c.store_timeout_seconds * 1000:
            raise ConfigError(
                f"[cluster] store_wait_timeout_ms: expected less than store_timeout_seconds "
                f"({c.store_timeout_seconds:g} s), got {c.store_wait_timeout_ms} ms"
            )
        try:
            store = open_replay_store(
                c.replay_store, base_dir=self.cfg.base_dir, timeout=c.store_timeout_seconds,
                wait_replicas=c.store_wait_replicas, wait_timeout=c.store_wait_timeout_ms / 1000,
                on_unacknowledged=self.metrics.replay_store_unacknowledged_total.inc,
            )
        except BadStoreURL as exc:
            raise ConfigError(f"[cluster] replay_store: {exc}") from None
        except ReplayStoreUnavailable as exc:
            raise ConfigError(f"[cluster] replay_store: cannot open it: {exc.detail}") from None
        return GuardedReplayStore(
            store,
            on_error=c.on_store_error,
            on_failure=self.metrics.replay_store_errors_total.inc,
            name=redact_url(c.replay_store),
            grace=c.store_grace_seconds,
        )

    def _resume_keyring(self, keyring: Keyring | None) -> Keyring | None:
        """Native tokens: their keyring (tickets use keys derived from it). CloudStack tokens:
        ``[tokens] keyring`` when the file exists (the same file on every instance), else resume
        is off: a key of this process alone would strand consoles on a lost instance."""
        if not self.cfg.resume.window_seconds:
            return None
        if self.validator is not None:
            return None  # read from the validator each time: it follows a keyring reload
        if keyring is not None:
            return keyring
        path = self.cfg.path(self.cfg.tokens.keyring)
        if not path.is_file():
            log.info("resume is off: CloudStack tokens and no [tokens] keyring file at %s", path)
            return None
        try:
            return Keyring.load(path)
        except KeyringError as exc:
            raise ConfigError(f"[tokens] keyring (for resume tickets): {exc}") from None

    @property
    def resume_keyring(self) -> Keyring | None:
        if not self.cfg.resume.window_seconds:
            return None
        return self.validator.keyring if self.validator is not None else self._resume_keys

    def _cloudstack_validator(self, cfg: Config | None = None) -> CloudStackValidator:
        """Tokens as a CloudStack/Mold management server makes them (DESIGN 7); ``cfg``: a reload's."""
        cfg = cfg or self.cfg
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
            self.replay,
            hash_key=c.hash_key,
            check_source_ip=c.check_source_ip,
            check_extra=c.check_extra,
        )

    # --- lifecycle -------------------------------------------------------------------------

    def public_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/websockify", self.handle_websocket)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        static, novnc = self._page_dirs()
        # The console page, at our path and at CloudStack's (its query parameters are read by
        # the page's script, not here).
        app.router.add_get("/console", self.handle_page)
        app.router.add_get("/resource/noVNC/vnc.html", self.handle_page)
        if static.is_dir():
            pagefiles.add_static(app.router, "/static/", static)  # never loop.sendfile: see pagefiles
        if novnc.is_dir():
            pagefiles.add_static(app.router, "/novnc/", novnc)
        return app

    def _page_dirs(self) -> tuple[Path, Path]:
        default_static, default_novnc = default_page_dirs()
        pg = self.cfg.page
        static = self.cfg.path(pg.static_dir) if pg.static_dir else default_static
        novnc = self.cfg.path(pg.novnc_dir) if pg.novnc_dir else default_novnc
        return static, novnc

    async def handle_page(self, request: web.Request) -> web.StreamResponse:
        page = self._page_dirs()[0] / "console.html"
        if not page.is_file():
            return web.Response(status=503, text=f"console page not installed ({page} missing)\n")
        return await pagefiles.file_response(
            request,
            page,
            headers={
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",  # the token is in the URL
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; "
                "img-src 'self' data: blob:; style-src 'self'; frame-ancestors 'none'",
            },
        )

    async def start(self) -> None:
        from .admin import admin_app, startup_admin_key

        # Checked before anything binds: a public admin address needs a key file made beforehand.
        self.admin_key = startup_admin_key(self.cfg.admin.address, self.cfg.path(self.cfg.admin.key_file))
        lst = self.cfg.listen
        if lst.tls and self.tls is None:
            self.tls = await asyncio.to_thread(self._load_tls)
        if self.cfg.acme.enabled and self.certstore is not None:
            self.challenges = ChallengeRecords(self.certstore.directory / "acme" / "challenges.json")
        runner = web.AppRunner(
            self.public_app(), access_log=None, handle_signals=False, **handler_args(self.cfg.limits)
        )
        await runner.setup()
        self._runners.append(runner)
        ctx = self.tls.context if (lst.tls and self.tls) else None
        accept = AcceptSettings.from_config(self.cfg.limits, lst.proxy_protocol, lst.trusted_proxies)
        for port in lst.ports:
            # listener.py: handshake limits, PROXY protocol, then TLS (SNI via ctx) and aiohttp.
            site = ConsoleSite(
                runner, lst.address, port, settings=accept, metrics=self.metrics, ssl_context=ctx,
                backlog=1024, reuse_port=self.reuse_port,
            )
            await site.start()
            self._sites.append(site)
        if lst.tls and lst.redirect_http_port:
            rrunner = web.AppRunner(self._redirect_app(), access_log=None, handle_signals=False)
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
        asite = web.TCPSite(arunner, self.cfg.admin.address, self.cfg.admin.port)
        await asite.start()
        self._admin_site = asite
        self._sweeper = asyncio.create_task(self._sweep())
        self.recordings.start(self._relays.values)
        if self._dns_settings is not None:
            self.dns = DnsServer(self._dns_settings, self.metrics, challenges=self.challenges)
            await self.dns.start()
            log.info("DNS responder for %s on %s", self._dns_settings.zone, self.cfg.dns.listen)
        self.health.start()
        if self.challenges is not None and self.certstore is not None:
            self.acme = AcmeManager(
                self.cfg, self.certstore, self.challenges, lock=self.replay, metrics=self.metrics,
                on_installed=self._acme_installed,
            )
            self.acme.start()

    def _acme_installed(self) -> None:
        with contextlib.suppress(CertificateError):  # logged; the old certificates stay
            self.reload_certificates()

    def _dns_config(self) -> DnsSettings | None:
        """Checked at construction so bad settings fail before anything binds."""
        d = self.cfg.dns
        if not d.enabled:
            return None
        try:
            settings = DnsSettings(
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
        return settings

    def _redirect_app(self) -> web.Application:
        """Plain HTTP that only sends browsers to the HTTPS listener (same host, path, query)."""

        async def acme_http01(request: web.Request) -> web.Response:
            # RFC 8555 8.3: the key authorization as the body, for the CA's validation request.
            answer = self.challenges.http(request.match_info["token"]) if self.challenges else None
            if answer is None:
                raise web.HTTPNotFound()
            return web.Response(text=answer, content_type="application/octet-stream")

        async def redirect(request: web.Request) -> web.Response:
            host = request.url.raw_host or "localhost"
            if ":" in host:  # IPv6 literal
                host = f"[{host}]"
            port = self.public_ports[0]
            netloc = host if port == 443 else f"{host}:{port}"
            raise web.HTTPMovedPermanently(f"https://{netloc}{request.raw_path}")

        app = web.Application(client_max_size=1024)
        app.router.add_get("/.well-known/acme-challenge/{token}", acme_http01)
        app.router.add_route("*", "/{tail:.*}", redirect)
        return app

    # --- certificates ----------------------------------------------------------------------

    def _load_tls(self) -> SNIContexts:
        """The store's live bundles; a development CA and wildcard when the store has none."""
        t = self.cfg.tls
        store = CertStore(self.cfg.path(t.store))
        name = t.fqdn or t.domain_suffix or None
        live = store.live_bundles()
        if not live:
            self.dev_ca = ensure_dev_certificate(store.directory, t.domain_suffix or DEV_SUFFIX)
        elif bundle_key(t.domain_suffix or DEV_SUFFIX) in live and (store.directory / DEV_CA_FILE).is_file():
            self.dev_ca = store.directory / DEV_CA_FILE  # made by an earlier start
        if self.dev_ca is not None:
            log.warning("no certificate configured: serving a development certificate; "
                        "trust this CA in the browser: %s", self.dev_ca)
        self.certstore = store
        sni = SNIContexts(store, default_key=name)
        self._certificate_state()
        return sni

    def _certificate_state(self) -> None:
        """Refresh the expiry metric and readiness from the store's live bundles."""
        store = self.certstore
        if store is None:
            return
        problem = None
        keys = list(store.live_bundles())
        if not keys:
            problem = "no usable certificate"
        for key in keys:
            try:
                bundle = store.verify(key)
            except CertificateError as exc:
                problem = f"certificate {key}: {exc}"
                continue
            self.metrics.certificate_expiry_timestamp_seconds.labels(key).set(
                bundle.not_after.timestamp()
            )
        self.certificate_problem = problem

    def reload_certificates(self) -> list[str]:
        """Use the store's current live bundles for new handshakes; on error keep the old ones."""
        if self.tls is None:
            return []
        try:
            keys = self.tls.reload()
        except CertificateError as exc:
            log.error("certificate reload failed; keeping the current certificates: %s", exc)
            raise
        finally:
            self._certificate_state()
        log.info("certificates reloaded: %s", ", ".join(keys))
        return keys

    def reload(self) -> ReloadResult:
        """SIGHUP and ``POST /api/reload`` (reload.py): read the configuration file and the key and
        certificate files again; build and check everything first, then swap it in. Any error raises
        ReloadError and changes nothing. Open consoles keep what they started with."""
        try:
            cfg_now = self.cfg
            loaded = load_config(cfg_now.source) if cfg_now.source is not None else cfg_now
            p = plan(cfg_now, loaded)
            cfg = p.config
            changed = list(p.changed)
            keyring = cloudstack = None
            if self.validator is not None:
                keyring = Keyring.load(cfg.path(cfg.tokens.keyring))
                if keyring != self.validator.keyring:
                    changed.append(f"keyring ({', '.join(keyring.kids)})")
            if self.cloudstack is not None:
                cloudstack = self._cloudstack_validator(cfg)
                if cloudstack.keys != self.cloudstack.keys:
                    changed.append("CloudStack key/IV")
            targets = TargetPolicy.from_config(cfg.targets.allowed_cidrs, cfg.targets.ports,
                                               own=local_addresses())
            backend_tls = self._backend_tls_context(cfg)
            # Last: the certificates swap themselves only when the whole store loads.
            certificates = self.tls.reload() if self.tls is not None else []
        except (ConfigError, ConsoleProxyError, CertificateError, OSError, ValueError) as exc:
            log.error("reload failed; nothing changed, the running configuration stays: %s", exc)
            raise ReloadError(str(exc)) from None
        finally:
            if self.tls is not None:
                self._certificate_state()
        # Nothing below can fail: the new values go live together.
        self.cfg = cfg
        if self.validator is not None and keyring is not None:
            self.validator.keyring = keyring
            self.validator.skew_seconds = cfg.tokens.skew_seconds
            self.validator.single_use = cfg.tokens.single_use
        if self.cloudstack is not None and cloudstack is not None:
            for attr in ("keys", "hash_key", "check_source_ip", "check_extra"):
                setattr(self.cloudstack, attr, getattr(cloudstack, attr))
        self.targets = targets
        self._backend_tls = backend_tls
        self._allowed_origins = {a.strip().lower().rstrip("/") for a in cfg.origin.allowed}
        lim = cfg.limits
        self.registry.max_sessions = lim.max_sessions
        self.registry.max_per_vm = lim.max_sessions_per_vm
        self.registry.per_vm_policy = lim.per_vm_policy
        self.registry.max_per_client_ip = lim.max_sessions_per_client_ip
        if cfg.log.level != cfg_now.log.level:
            logging.getLogger().setLevel(cfg.log.level.upper())
        result = ReloadResult(tuple(changed), p.restart, tuple(certificates))
        log.info("reload: %s", result.summary())
        return result

    @staticmethod
    def _site_port(site: web.TCPSite) -> int:
        server = site._server
        # asyncio's Server, or uvloop's (serve --loop uvloop): both have .sockets
        assert server is not None
        sockets: Any = getattr(server, "sockets", None)
        port: int = sockets[0].getsockname()[1]
        return port

    @property
    def public_ports(self) -> list[int]:
        return [s.port for s in self._sites]

    @property
    def admin_port(self) -> int:
        return self._site_port(self._admin_site)

    async def close(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for s in list(self.registry):
            s.close(1001, "proxy shutting down")
        # Their close handshakes: each ends on the browser's reply or after CLOSE_TIMEOUT.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._relays_gone.wait()
        for relay in list(self._relays.values()):
            relay.abort()
        await self.recordings.close()
        if self._burns:
            await asyncio.wait(self._burns, timeout=2)
        if self.acme is not None:
            await self.acme.close()
        await self.health.close()
        if self.dns is not None:
            await self.dns.close()
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        await self.replay.close()

    # --- health ----------------------------------------------------------------------------

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if self.cfg.listen.tls and self.certificate_problem:
            return self.certificate_problem
        if self.acme is not None and (acme_problem := self.acme.problem()) is not None:
            return acme_problem
        if (store_problem := self.replay.not_ready_reason()) is not None:
            return store_problem
        if (health_problem := self.health.unready_reason()) is not None:
            return health_problem  # a failed check listed in [health] failures_to_unready
        unready_at = self.cfg.limits.unready_at_sessions
        if self.registry.at_capacity() or (unready_at and len(self.registry) >= unready_at):
            return "at capacity"
        return None

    async def handle_readyz(self, request: web.Request) -> web.Response:
        # Pings a shared store at most once a second; answers from the last known state when the
        # ping takes longer than READYZ_STORE_WAIT (the ping finishes in the background).
        await self.replay.refresh(wait=READYZ_STORE_WAIT)
        reason = self.not_ready_reason()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    # --- the console path ------------------------------------------------------------------

    @staticmethod
    def _peer_ip(request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return str(peer[0]) if peer else "unknown"

    def _client_ip(self, request: web.Request, peer: str) -> str:
        """The browser's address; raises BadForwardedFor (4004) for an unreadable balancer header."""
        if not self.cfg.listen.forwarded_for:
            return peer
        return client_address(peer, request.headers.getall("X-Forwarded-For", ()), self._trusted_proxies)

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        lim = self.cfg.limits
        ws = ConsoleWebSocket(
            max_message=lim.max_client_message_bytes,  # enforced by ClientReader's parser
            protocols=("binary",),
            max_msg_size=lim.max_client_message_bytes + 1,  # aiohttp refuses a message of exactly its cap
            heartbeat=None,  # the sweeper pings every console from the 101 on (ClientReader.heartbeat)
            compress=False,  # RFB is already compressed where it matters; deflate costs CPU
        )
        await ws.prepare(request)
        assert ws.client is not None
        self._handshaking.add(ws.client)
        client_ip = self._peer_ip(request)
        session: Session | None = None
        writer: asyncio.StreamWriter | None = None
        result = "error"
        relaying = False
        keys = self.resume_keyring
        # The page asks for tickets with resume=1; other clients never see a text message.
        wants_resume = keys is not None and _query(request, "resume") == "1"
        ticket: TicketBody | None = None
        try:
            async with asyncio.timeout(lim.handshake_timeout_seconds):
                if self.refusing:
                    raise ShuttingDown("this proxy is draining; reconnect to reach another")
                client_ip = self._client_ip(request, client_ip)
                self._check_origin(request)
                if wants_resume and not _query(request, "token"):
                    assert keys is not None
                    ticket = await self._receive_ticket(ws, keys, client_ip)
                    claims = await self._check_target(_ticket_claims(ticket))
                else:
                    claims = await self._validate(request, client_ip)
                session = Session(
                    vm=claims.vm,
                    client_ip=client_ip,
                    host=claims.host,
                    port=claims.port,
                    name=claims.name,
                    view_only=claims.view_only,
                    max_duration=claims.max_duration,
                    session_uuid=(ticket.session_uuid if ticket is not None else claims.jti)
                    if self.cloudstack is not None else None,
                )
                if wants_resume:
                    self._resume_state(session, ticket)
                self._idle.clear()
                for old in self.registry.add(session):
                    if ticket is not None and old.resume_id == ticket.sid:
                        old.resume_id = None  # its own resumed connection: no mark as used
                    old.close(SessionKilled.close_code, "replaced by a newer console for this VM")
                rc = self.cfg.recording
                record = should_record(rc.enabled, claims.record, claims.vm, rc.vms)
                if record and NOTICE_PROTOCOL in request.headers.get("Sec-WebSocket-Protocol", ""):
                    # Our console page offers this protocol: it shows "this session is recorded".
                    await ws.send_str(RECORDED_NOTICE)
                reader, writer = await self._connect(claims)
                if ticket is not None:
                    await self._use_ticket(ticket, request)
                client_leftover, server_init = await self._rfb_handshake(ws, reader, writer, claims, session)
                if wants_resume and keys is not None:
                    session.resume_body = seal_body(keys, _ticket_body(session, claims))
                    await ws.send_str(self._ticket(keys, session))
            # The token's claim, else [input]: drop the Lang1/Lang2 releases for this console?
            drop_lang = (claims.lang_key_release or self.cfg.input.lang_key_release) == "drop"
            # The claims (with the VNC password) are done with: not kept for the console's life.
            del claims
            # From here the relay owns the console: it ends it (``_relay_ended``) and closes both
            # sockets; this handler returns at once and aiohttp frees what it kept for it.
            self._start_relay(
                ws, reader, writer, session, client_leftover, drop_lang_release=drop_lang,
                server_init=server_init if record else None,
            )
            relaying = True
        except TimeoutError:
            result = "handshake timeout"
            await self._refuse(ws, 4012, b"handshake timed out")
        except ConsoleError as exc:
            result = exc.reason
            if isinstance(exc, TokenInvalid | Forbidden) or exc.close_code in (4002, 4003, 4005):
                self.metrics.token_rejections_total.labels(exc.reason).inc()
            log.info("console refused for %s: %s (%d)", client_ip, exc, exc.close_code)
            await self._refuse(ws, exc.close_code, _reason(str(exc)))
        except rfb.RFBError as exc:
            result = "protocol error"
            await self._refuse(ws, 1002, _reason(f"RFB protocol error: {exc}"))
        except ConnectionError:
            result = "client closed"  # the browser went away mid-handshake; nothing to tell it
        except OSError as exc:  # e.g. a TLS alert from the VNC server after the handshake
            result = "error"
            log.warning("console for %s ended by a socket error: %s", client_ip, exc)
            await self._refuse(ws, 1011, _reason("connection to the VNC server failed"))
        finally:
            self._handshaking.discard(ws.client)
            if not relaying:
                if writer is not None:
                    writer.close()
                if session is not None:
                    self._end(session, result)
                self.trimmer.ended()
        return ws

    # --- resume (resume.py) ------------------------------------------------------------------

    async def _receive_ticket(self, ws: ConsoleWebSocket, keys: Keyring, client_ip: str) -> TicketBody:
        """A resuming page's first message is its ticket (never in the URL: access logs), in a
        binary message like every message a browser sends here (the frame parser refuses text)."""
        msg = await ws.receive()
        if msg.type is not WSMsgType.BINARY or len(msg.data) > MAX_TICKET_BYTES:
            raise ResumeRefused("resume ticket invalid: expected the ticket as the first message")
        try:
            text = msg.data.decode("ascii")
        except UnicodeDecodeError:
            raise ResumeRefused("resume ticket invalid") from None
        return open_ticket(keys, text, now=time.time(), client_ip=client_ip)

    def _resume_state(self, session: Session, ticket: TicketBody | None) -> None:
        """A new chain for a token's console; the next generation of a resumed one, whose
        lifetime counts from the console's first start."""
        if ticket is None:
            session.resume_id = new_resume_id()
            return
        session.resume_id = ticket.sid
        session.resume_gen = ticket.gen + 1
        age = max(time.time() - ticket.started, 0.0)
        session.started = float(ticket.started)
        session.started_mono = time.monotonic() - age

    async def _use_ticket(self, ticket: TicketBody, request: web.Request) -> None:
        """Single use, cluster-wide: the generation's key goes into the shared store once the VNC
        server has accepted the connection, before the browser gets a byte of RFB. So a resume
        that fails to reach the VNC server (a storm after a lost instance: connect timeouts) can
        be retried with the same ticket, and a refused one never shows the page a console."""
        window = self.cfg.resume.window_seconds
        # Tickets of this generation expire at most a window after the last one was sent; the
        # key outlives them (an old connection still open elsewhere is cut by the heartbeat).
        if not await self.replay.add(used_key(ticket.sid, ticket.gen), time.time() + 2 * window + 60):
            raise ResumeRefused("resume ticket already used")
        old = self._by_resume.get(ticket.sid)
        if old is not None:
            # The same console's half-open connection here (not yet cut by the heartbeat): this
            # one replaces it. (Under per_vm_policy "reject" the limits refused this one (4008)
            # while it was open; the page retries until the heartbeat has cut it.)
            old.close(SessionKilled.close_code, "replaced by its resumed connection")
        after = _query(request, "after")
        cause = "drain" if after == "1001" else "network" if after in ("1005", "1006") else "other"
        self.metrics.resumes_total.labels(cause).inc()
        log.info("console resumed (%s) for VM %s", cause, ticket.vm)

    def _ticket(self, keys: Keyring, session: Session) -> str:
        assert session.resume_body is not None
        session.ticket_sent = time.monotonic()
        exp = int(time.time()) + self.cfg.resume.window_seconds
        return issue_ticket(keys, session.resume_body, exp=exp)

    def _refresh_tickets(self, now: float) -> None:
        """A fresh ticket every third of the window to each console that asked for them."""
        keys = self.resume_keyring
        if keys is None:
            return
        due = now - self.cfg.resume.window_seconds / 3
        for relay in list(self._relays.values()):
            s = relay.session
            if s.resume_body is not None and s.ticket_sent <= due and not relay.ended:
                relay.client.send_text(self._ticket(keys, s).encode("ascii"))

    def _burn(self, session: Session) -> None:
        """Mark the console's generation used: an administrator's kill, a replacement, a time
        limit or a VNC server that closed must not come back with the ticket the page holds."""
        if session.resume_id is None:
            return
        key = used_key(session.resume_id, session.resume_gen)
        expires = time.time() + 2 * self.cfg.resume.window_seconds + 60

        async def burn() -> None:
            try:
                await self.replay.add(key, expires)
            except ConsoleProxyError as exc:  # store down: counted by the guard; tickets expire
                log.warning("could not mark an ended console as not resumable: %s", exc)

        task = asyncio.create_task(burn())
        self._burns.add(task)
        task.add_done_callback(self._burns.discard)

    async def _refuse(self, ws: ConsoleWebSocket, code: int, message: bytes) -> None:
        """Close a console that did not reach the relay. Out of the sweeper's pings first: only a
        close reply is due from the browser now (RFC 6455 5.5.1)."""
        self._handshaking.discard(ws.client)
        await ws.close(code=code, message=message)

    def _check_origin(self, request: web.Request) -> None:
        """Refuse cross-site WebSockets (a page elsewhere using a victim's token or cookies).

        A browser always sends Origin. It must name the host this console is served from (any
        port: CloudStack serves the page and the WebSocket on different ports) or be listed in
        ``[origin] allowed``. No Origin means a non-browser client, which still needs a token.
        """
        origin = request.headers.get("Origin")
        o = self.cfg.origin
        if origin is None:
            if o.allow_missing:
                return
            raise Forbidden("a browser Origin header is required")
        value = origin.strip().lower().rstrip("/")
        if value in self._allowed_origins:
            return
        scheme, sep, rest = value.partition("://")
        host = (request.host or "").lower()
        if sep and _hostname(rest) == _hostname(host) and _hostname(host):
            # Behind a balancer that terminates TLS the page is https even when we are not.
            if scheme == "https" or (scheme == "http" and not self.cfg.listen.tls):
                return
        raise Forbidden(f"origin {origin[:80]!r} may not open consoles here")

    async def _check_target(self, claims: Claims) -> Claims:
        """``[targets]`` for the claims' host; a name is resolved once and replaced by the address."""
        if is_ip_address(claims.host):
            self.targets.check(claims.host, claims.port)
            return claims
        # Resolved here, once; the connection goes to the address checked, not to the name again.
        address = await self._resolve_target(claims.host, claims.port)
        return dataclasses.replace(claims, host=str(address))

    async def _validate(self, request: web.Request, client_ip: str) -> Claims:
        try:
            token = raw_query_param(request.query_string, "token")
        except UnicodeDecodeError:
            raise TokenInvalid("token is not valid percent-encoded UTF-8") from None
        if not token:
            raise TokenInvalid("no token in the URL")
        if self.cloudstack is not None:
            try:
                extra = raw_query_param(request.query_string, "extra")
            except UnicodeDecodeError:
                raise Forbidden("extra is not valid percent-encoded UTF-8") from None
            claims = await self.cloudstack.validate(token, client_ip=client_ip, extra=extra)
        else:
            assert self.validator is not None
            claims = await self.validator.validate(token, client_ip=client_ip)
        return await self._check_target(claims)

    async def _resolve_target(self, host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        check_hostname_syntax(host)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.cfg.limits.connect_timeout_seconds):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise BackendUnreachable(f"resolving {host} timed out") from None
        except OSError as exc:
            raise BackendUnreachable(f"cannot resolve {host}: {exc.strerror or exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return self.targets.check_resolved(host, addresses, port)

    async def _connect(self, claims: Claims) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.limits.connect_timeout_seconds):
                reader, writer = await asyncio.open_connection(
                    claims.host, claims.port, limit=STREAM_LIMIT
                )
        except TimeoutError:
            raise BackendUnreachable(
                f"connecting to {claims.host}:{claims.port} timed out after "
                f"{self.cfg.limits.connect_timeout_seconds:g} s"
            ) from None
        except OSError as exc:
            raise BackendUnreachable(
                f"cannot connect to {claims.host}:{claims.port}: {exc.strerror or exc}"
            ) from None
        self.metrics.backend_connect_seconds.observe(time.monotonic() - t0)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _rfb_handshake(
        self,
        ws: web.WebSocketResponse,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        claims: Claims,
        session: Session,
    ) -> tuple[bytes, bytes]:
        """Authenticate to the VNC server, then give the browser a no-password 3.8 server.

        Returns the browser's bytes that followed its security choice (the relay forwards them)
        and the ServerInit the browser got (a recording starts with it).
        """
        browser = rfb.ClientHandshake()
        # Send our version to the browser first so its reply overlaps the backend handshake.
        await ws.send_bytes(browser.data_to_send())

        backend = rfb.ServerHandshake(claims.password, allow_tls=True)
        outcome: rfb.Authenticated | rfb.AuthFailed | None = None
        while outcome is None:
            data = await reader.read(4096)
            if not data:
                raise BackendUnreachable("the VNC server closed the connection during the handshake")
            backend.receive_data(data)
            out = backend.data_to_send()
            if out:
                writer.write(out)
            for ev in backend.events():
                if isinstance(ev, rfb.StartTLS):
                    await writer.drain()
                    try:
                        await writer.start_tls(self._backend_tls)
                    except ssl.SSLCertVerificationError as exc:
                        raise BackendAuthFailed(
                            f"VNC server's TLS certificate is not trusted: {exc.verify_message}"
                        ) from None
                    except OSError as exc:  # other TLS failures, or a reset during the handshake
                        raise BackendUnreachable(f"TLS handshake with the VNC server failed: {exc}") from None
                    backend.tls_started()
                    out = backend.data_to_send()
                    if out:
                        writer.write(out)
                elif isinstance(ev, rfb.Authenticated | rfb.AuthFailed):
                    outcome = ev
        if isinstance(outcome, rfb.AuthFailed):
            raise BackendAuthFailed(f"VNC server: {outcome.reason}")
        await writer.drain()
        pending_to_server = backend.leftover()

        ready = False
        while not ready:
            msg = await ws.receive()
            if not isinstance(msg.data, bytes):
                raise rfb.RFBError("the browser closed or sent text during the RFB handshake")
            browser.receive_data(msg.data)
            out = browser.data_to_send()
            if out:
                await ws.send_bytes(out)
            for ev in browser.events():
                if isinstance(ev, rfb.ClientReady):
                    ready = True
        browser.accept()
        await ws.send_bytes(browser.data_to_send())

        # ClientInit (one byte: the shared flag) goes to the VNC server here, so that its
        # ServerInit is checked before anything is relayed (a bounded desktop name).
        leftover = browser.leftover()
        while not leftover:
            msg = await ws.receive()
            if not isinstance(msg.data, bytes):
                raise rfb.RFBError("the browser closed or sent text before its ClientInit")
            leftover = msg.data
        writer.write(leftover[:1])
        # Bytes the VNC server sent right after its SecurityResult (normally none) start ServerInit.
        init = bytearray(pending_to_server)
        try:
            if len(init) < rfb.SERVER_INIT_FIXED:
                init += await reader.readexactly(rfb.SERVER_INIT_FIXED - len(init))
            total = rfb.SERVER_INIT_FIXED + rfb.server_init_name_length(bytes(init[: rfb.SERVER_INIT_FIXED]))
            if len(init) < total:
                init += await reader.readexactly(total - len(init))
        except asyncio.IncompleteReadError:
            raise BackendUnreachable("the VNC server closed the connection before its ServerInit") from None
        await ws.send_bytes(bytes(init))  # with anything the server pipelined after it
        session.bytes_up += 1  # the init messages count as relayed, as they did when streamed
        session.bytes_down += len(init)
        return leftover[1:], bytes(init)

    def _backend_tls_context(self, cfg: Config | None = None) -> ssl.SSLContext:
        cfg = cfg or self.cfg  # a reload's, checked before it is used
        t = cfg.targets
        cafile = cfg.path(t.vnc_ca_file) if t.vnc_ca_file else None
        try:
            ctx = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[targets] vnc_ca_file: cannot load {cafile}: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if t.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            # Hypervisor certificates name hosts, not the addresses tokens carry.
            ctx.check_hostname = False
        return ctx

    def _start_relay(
        self,
        ws: ConsoleWebSocket,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        client_leftover: bytes,
        *,
        drop_lang_release: bool = False,
        server_init: bytes | None = None,
    ) -> None:
        """Relay the console; with ``server_init`` (the ServerInit the browser got), record it."""
        flt = None
        recorder = None
        if server_init is not None:
            recorder = self.recordings.begin(session)
        if session.view_only or drop_lang_release or recorder is not None:
            # What a client pipelined behind its ClientInit goes through the same filter.
            filt = rfb.ClientMessageFilter(
                view_only=session.view_only,
                drop_lang_release=drop_lang_release,
                expect_client_init=False,
                observer=recorder.input if recorder is not None else None,
                lenient=not (session.view_only or drop_lang_release),
            )
            flt = filt.feed
            if recorder is not None:
                recorder.filter = filt
        try:
            relay = Relay(
                ws, reader, writer, session,
                client_filter=flt,
                client_leftover=client_leftover,
                on_end=self._relay_ended,
                on_closed=self._relay_closed,
            )
        except BaseException:
            if recorder is not None:
                recorder.close()
            raise
        if recorder is not None:
            assert server_init is not None
            recorder.server_init(server_init)
            relay.recorder = recorder
        session.closer = relay.stop
        self._relays[session.id] = relay
        if session.resume_id is not None:
            self._by_resume[session.resume_id] = session
        self._relays_gone.clear()
        self.metrics.sessions_active.inc()
        self._audit("session_start", session)
        try:
            relay.start()
        except Exception:  # a bug, not the peers': the console still ends (1011) and is counted
            log.exception("console for %s failed to start relaying", session.client_ip)
            relay.stop(1011, "internal error")

    def _relay_ended(self, relay: Relay, result: str) -> None:
        self.metrics.sessions_active.dec()
        recorder, relay.recorder = relay.recorder, None
        if recorder is not None:
            recorder.close()
        session = relay.session
        if session.resume_id is not None:
            if self._by_resume.get(session.resume_id) is session:
                del self._by_resume[session.resume_id]
            # Comes back: a lost connection (the browser's or ours) and a drain or shutdown (1001).
            lost = relay.close_code is None and result == "client closed"
            if not (lost or relay.close_code == 1001):
                self._burn(session)
        self._end(session, result)
        # The closer is the relay's bound method: the session and the relay would be a cycle.
        session.closer = None

    def _relay_closed(self, relay: Relay) -> None:
        self._relays.pop(relay.session.id, None)
        self.trimmer.ended()
        if not self._relays:
            self._relays_gone.set()

    def _end(self, session: Session, result: str) -> None:
        if session.closer is not None and len(self.removed_sessions) < 10000:
            self.removed_sessions.append(session.session_uuid or session.id)
        self.registry.remove(session)
        if not len(self.registry):
            self._idle.set()
        m = self.metrics
        m.bytes_total.labels("up").inc(session.bytes_up)
        m.bytes_total.labels("down").inc(session.bytes_down)
        m.sessions_total.labels(_result_label(result)).inc()
        m.session_duration_seconds.observe(time.monotonic() - session.started_mono)
        self._audit("session_end", session, result=result)

    def _audit(self, event: str, session: Session, **extra: Any) -> None:
        if not self.cfg.log.audit or not audit_log.isEnabledFor(logging.INFO):
            return  # not built when it would not be written (~11 µs a console start or end)
        record = {"event": event, "time": round(time.time(), 3), **session.info(), **extra}
        audit_log.info(json.dumps(record, sort_keys=True))

    # --- time limits -----------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Enforce idle timeout and lifetime for all sessions from one task (no task per console)."""
        next_cert_check = time.monotonic() + CERT_RECHECK_SECONDS
        while True:
            lim = self.cfg.limits  # read each pass: a reload's limits apply from the next one
            idle = lim.idle_timeout_seconds
            life = lim.max_lifetime_seconds
            ping = lim.ping_interval_seconds
            # A tenth of the shortest limit: pings go out 0-10% late and a missing pong (due at half
            # the interval) is seen 0-20% late; one pass every 3 s by default (~2 ms for 10,000 consoles).
            shortest = min(x for x in (idle, life, ping, 50.0) if x > 0)
            await asyncio.sleep(min(max(shortest / 10, 0.05), 5.0))
            self.trimmer.tick()
            now = time.monotonic()
            if self.certstore is not None and now >= next_cert_check:
                # A certificate can expire while we run: readiness and the metric must notice.
                next_cert_check = now + CERT_RECHECK_SECONDS
                await asyncio.to_thread(self._certificate_state)
            if ping:
                for client in list(self._handshaking):
                    client.heartbeat(now, ping)
                for relay in list(self._relays.values()):
                    relay.client.heartbeat(now, ping)
            self._refresh_tickets(now)
            for s in self.registry:
                if s.closer is None:
                    continue
                if idle and now - s.last_activity > idle:
                    s.close(4012, f"idle for more than {idle:g} s")
                    continue
                cap = min(x for x in (life, s.max_duration or 0, float("inf")) if x)
                if now - s.started_mono > cap:
                    s.close(4012, f"console lifetime of {cap:g} s reached")

    # --- drain -------------------------------------------------------------------------------

    def start_drain(self) -> bool:
        """Begin draining (idempotent); returns False when already draining."""
        if self.draining:
            return False
        self.draining = True
        self.metrics.draining.set(1)
        if self.cfg.listen.reuse_port:
            # Hand the ports over to the instance listening beside us; open consoles stay.
            for site in self._sites:
                site.stop_listening()
            log.info("draining: public ports closed, new connections go to the other instance")
        log.info("draining: readiness now fails; new consoles refused after %g s",
                 self.cfg.drain.grace_seconds)
        self._drain_task = asyncio.create_task(self._drain())
        return True

    async def _drain(self) -> None:
        d = self.cfg.drain
        await asyncio.sleep(d.grace_seconds)
        self.refusing = True
        if d.deadline_seconds:
            try:
                async with asyncio.timeout(max(d.deadline_seconds - d.grace_seconds, 0)):
                    await self._idle.wait()
            except TimeoutError:
                for s in list(self.registry):
                    s.close(ShuttingDown.close_code, "proxy shutting down (drain deadline)")
        await self._idle.wait()
        log.info("drain complete: no consoles left")
        self.drained.set()

    def kill(self, session_id: str, reason: str = "ended by an administrator") -> bool:
        s = self.registry.get(session_id)
        if s is None:
            return False
        s.close(SessionKilled.close_code, reason)
        return True


def _hostname(netloc: str) -> str:
    """``Host:port`` or ``[v6]:port`` -> the host part, lower-case."""
    netloc = netloc.split("/", 1)[0]
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc


def _query(request: web.Request, name: str) -> str | None:
    try:
        return raw_query_param(request.query_string, name)
    except UnicodeDecodeError:
        return None


def _ticket_claims(t: TicketBody) -> Claims:
    """The resumed console's claims: what the original token said, as the ticket carries it."""
    now = int(time.time())
    return Claims(
        host=t.host, port=t.port, vm=t.vm, exp=now, iat=now, jti=t.sid, password=t.password,
        name=t.name, client_ip=t.client_ip, view_only=t.view_only, max_duration=t.max_duration,
        lang_key_release=t.lang_key_release, record=t.record,
    )


def _ticket_body(session: Session, claims: Claims) -> TicketBody:
    assert session.resume_id is not None
    return TicketBody(
        sid=session.resume_id, gen=session.resume_gen, host=claims.host, port=claims.port,
        vm=claims.vm, started=int(session.started), password=claims.password, name=claims.name,
        client_ip=claims.client_ip, view_only=claims.view_only,
        max_duration=claims.max_duration, lang_key_release=claims.lang_key_release,
        session_uuid=session.session_uuid, record=claims.record,
    )


def _result_label(result: str) -> str:
    """Collapse free-text endings into a few metric label values."""
    if result in ("client closed", "server closed"):
        return result.replace(" ", "_")
    if result.startswith("idle") or "lifetime" in result:
        return "timeout"
    if "administrator" in result or "replaced" in result:
        return "killed"
    for known in ("token", "forbidden", "limit", "unreachable", "authentication", "handshake"):
        if known in result:
            return known
    return "error"


def _reload_quietly(server: ProxyServer) -> None:
    with contextlib.suppress(ReloadError):  # logged; everything old stays
        server.reload()


async def run_forever(cfg: Config, *, worker_index: int | None = None) -> int:
    tag = "" if worker_index is None else f"[w{worker_index}] "
    logging.basicConfig(level=cfg.log.level.upper(), format=f"%(asctime)s {tag}%(name)s %(message)s")
    server = ProxyServer(cfg, reuse_port=worker_index is not None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed before the listeners open, so a SIGTERM at any point drains instead of killing.
    # SIGTERM drains (the way orchestrators stop a service); SIGINT stops at once.
    loop.add_signal_handler(signal.SIGTERM, server.start_drain)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_quietly, server)
    await server.start()
    log.info("serving on %s ports %s; admin on %s:%d", cfg.listen.address, server.public_ports,
             cfg.admin.address, server.admin_port)
    waits = [asyncio.ensure_future(server.drained.wait()), asyncio.ensure_future(stop.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    await server.close()
    return 0

