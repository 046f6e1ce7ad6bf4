"""lifecycle.py without sockets: a drain's steps, an administrator's kill, the sweeper's limits.

tests/test_drain.py drives the same through a running proxy, a balancer's view and signals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from consoleproxy.config import Drain as DrainSettings
from consoleproxy.config import Limits
from consoleproxy.errors import SessionKilled, ShuttingDown
from consoleproxy.lifecycle import Drain, kill, sweep
from consoleproxy.metrics import Metrics
from consoleproxy.policy.sessions import Registry, Session
from consoleproxy.tls.certstate import ServingCertificates


def _session(closed: list[tuple[str, int, str]], vm: str) -> Session:
    s = Session(vm=vm, client_ip="192.0.2.1", host="10.0.0.1", port=5900)
    s.closer = lambda code, reason: closed.append((vm, code, reason))
    return s


async def _until(cond: Callable[[], object], seconds: float = 5) -> None:
    async with asyncio.timeout(seconds):
        while not cond():
            await asyncio.sleep(0.01)


async def test_drain_refuses_after_grace_and_closes_at_the_deadline() -> None:
    metrics, reg = Metrics(), Registry(max_sessions=10)
    closed: list[tuple[str, int, str]] = []
    s = _session(closed, "a")
    reg.add(s)
    d = Drain(metrics)
    d.idle.clear()  # a console is open
    settings = DrainSettings(grace_seconds=0.05, deadline_seconds=0.2)
    assert d.start(settings, reg) and not d.start(settings, reg)  # idempotent
    assert d.draining and not d.refusing
    assert metrics.registry.get_sample_value("consoleproxy_draining") == 1
    await _until(lambda: d.refusing)
    await _until(lambda: closed)
    assert closed == [("a", ShuttingDown.close_code, "proxy shutting down (drain deadline)")]
    assert not d.drained.is_set()  # until the console is really gone
    d.idle.set()
    await _until(d.drained.is_set)


async def test_a_drain_without_consoles_ends_after_its_grace() -> None:
    d = Drain(Metrics())
    d.start(DrainSettings(grace_seconds=0, deadline_seconds=0), Registry(max_sessions=1))
    await _until(d.drained.is_set)


def test_kill() -> None:
    reg = Registry(max_sessions=10)
    closed: list[tuple[str, int, str]] = []
    s = _session(closed, "a")
    reg.add(s)
    assert kill(reg, s.id) and closed == [("a", SessionKilled.close_code, "ended by an administrator")]
    assert not kill(reg, "no-such-session")


async def test_sweeper_applies_idle_timeout_and_lifetime() -> None:
    reg, ticks = Registry(max_sessions=10), []
    closed: list[tuple[str, int, str]] = []
    refreshed: list[float] = []
    idle, old, fresh = _session(closed, "idle"), _session(closed, "old"), _session(closed, "fresh")
    now = time.monotonic()
    idle.last_activity = now - 100
    old.started_mono = now - 100
    for s in (idle, old, fresh):
        reg.add(s)
    limits = Limits(idle_timeout_seconds=50, max_lifetime_seconds=60, ping_interval_seconds=1)
    task = asyncio.create_task(sweep(
        limits=lambda: limits, registry=reg, tick=lambda: ticks.append(1), pinged=list,
        refresh_tickets=refreshed.append, certificates=ServingCertificates(Metrics()),
    ))
    try:
        await _until(lambda: len(closed) == 2 and ticks and refreshed)
    finally:
        task.cancel()
    assert sorted(closed) == [("idle", 4012, "idle for more than 50 s"),
                              ("old", 4012, "console lifetime of 60 s reached")]
