"""A running proxy's life after start: the sweeper, drain, signals, ``run_forever``.

One sweeper task enforces every console's time limits and pings browsers (no task or timer per
console). A drain fails readiness first, refuses new consoles after ``[drain] grace_seconds``,
closes what is left at ``deadline_seconds`` and ends when no console is open. ``run_forever``
is ``consoleproxy serve``: SIGTERM drains (the way orchestrators stop a service), SIGINT stops at
once, SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from consoleproxy.config import Config, Limits
from consoleproxy.config import Drain as DrainSettings
from consoleproxy.errors import SessionKilled, ShuttingDown
from consoleproxy.metrics import Metrics
from consoleproxy.net.listener import ConsoleSite
from consoleproxy.policy.sessions import Registry
from consoleproxy.reload import ReloadError
from consoleproxy.tls.certstate import ServingCertificates

if TYPE_CHECKING:
    from consoleproxy.server import ProxyServer

__all__ = ["CERT_RECHECK_SECONDS", "Drain", "Pinged", "kill", "run_forever", "sweep"]

log = logging.getLogger("consoleproxy")

# How often the sweeper re-verifies the live certificates: one can expire while we run.
CERT_RECHECK_SECONDS = 60.0


class Pinged(Protocol):
    """A browser connection the sweeper pings (net.browser.BrowserConnection)."""

    def heartbeat(self, now: float, interval: float) -> None: ...


async def sweep(
    *,
    limits: Callable[[], Limits],
    registry: Registry,
    tick: Callable[[], None],
    pinged: Callable[[], Iterable[Pinged]],
    refresh_tickets: Callable[[float], None],
    certificates: ServingCertificates,
) -> None:
    """Enforce idle timeout and lifetime for all sessions from one task (no task per console).

    ``tick`` runs once a pass (the memory trimmer's); ``pinged``: the browser connections to ping."""
    next_cert_check = time.monotonic() + CERT_RECHECK_SECONDS
    while True:
        lim = limits()  # read each pass: a reload's limits apply from the next one
        idle = lim.idle_timeout_seconds
        life = lim.max_lifetime_seconds
        ping = lim.ping_interval_seconds
        # A tenth of the shortest limit: pings go out 0-10% late and a missing pong (due at half
        # the interval) is seen 0-20% late; one pass every 3 s by default (~2 ms for 10,000 consoles).
        shortest = min(x for x in (idle, life, ping, 50.0) if x > 0)
        await asyncio.sleep(min(max(shortest / 10, 0.05), 5.0))
        tick()
        now = time.monotonic()
        if certificates.store is not None and now >= next_cert_check:
            # A certificate can expire while we run: readiness and the metric must notice.
            next_cert_check = now + CERT_RECHECK_SECONDS
            await asyncio.to_thread(certificates.refresh)
        if ping:
            for client in pinged():
                client.heartbeat(now, ping)
        refresh_tickets(now)
        for s in registry:
            if s.closer is None:
                continue
            if idle and now - s.last_activity > idle:
                s.close(4012, f"idle for more than {idle:g} s")
                continue
            cap = min(x for x in (life, s.max_duration or 0, float("inf")) if x)
            if now - s.started_mono > cap:
                s.close(4012, f"console lifetime of {cap:g} s reached")


class Drain:
    """Drain state: ``draining`` (readiness fails), ``refusing`` (new consoles refused),
    ``idle`` (set whenever no session is open), ``drained`` (set when a drain has run to its end)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.draining = False
        self.refusing = False  # set when a drain's grace period is over
        self.idle = asyncio.Event()
        self.idle.set()
        self.drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, d: DrainSettings, registry: Registry, *, hand_over: Iterable[ConsoleSite] = ()) -> bool:
        """Begin draining (idempotent); returns False when already draining. ``hand_over``: the
        public sites to stop listening on ([listen] reuse_port: an instance beside us takes them)."""
        if self.draining:
            return False
        self.draining = True
        self.metrics.draining.set(1)
        sites = list(hand_over)
        if sites:
            # Hand the ports over to the instance listening beside us; open consoles stay.
            for site in sites:
                site.stop_listening()
            log.info("draining: public ports closed, new connections go to the other instance")
        log.info("draining: readiness now fails; new consoles refused after %g s", d.grace_seconds)
        self._task = asyncio.create_task(self._run(d, registry))
        return True

    async def _run(self, d: DrainSettings, registry: Registry) -> None:
        await asyncio.sleep(d.grace_seconds)
        self.refusing = True
        if d.deadline_seconds:
            try:
                async with asyncio.timeout(max(d.deadline_seconds - d.grace_seconds, 0)):
                    await self.idle.wait()
            except TimeoutError:
                for s in list(registry):
                    s.close(ShuttingDown.close_code, "proxy shutting down (drain deadline)")
        await self.idle.wait()
        log.info("drain complete: no consoles left")
        self.drained.set()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def kill(registry: Registry, session_id: str, reason: str = "ended by an administrator") -> bool:
    """End one console (admin API); False when no such console is open."""
    s = registry.get(session_id)
    if s is None:
        return False
    s.close(SessionKilled.close_code, reason)
    return True


def _reload_quietly(server: ProxyServer) -> None:
    with contextlib.suppress(ReloadError):  # logged; everything old stays
        server.reload()


async def run_forever(cfg: Config, *, worker_index: int | None = None) -> int:
    from consoleproxy.server import ProxyServer  # the server composes this module's parts

    tag = "" if worker_index is None else f"[w{worker_index}] "
    logging.basicConfig(level=cfg.log.level.upper(), format=f"%(asctime)s {tag}%(name)s %(message)s")
    server = ProxyServer(cfg, reuse_port=worker_index is not None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed before the listeners open, so a SIGTERM at any point drains instead of killing.
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
