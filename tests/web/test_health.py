"""Health checks (consoleproxy/health.py): each check passes, and fails when its failure is caused.

Scheduling and results follow the Mold guide's router health checks: basic and advanced on their
own intervals, on demand through the admin API, each result with name, type, success, message,
start, end and duration; custom scripts that take ``basic``/``advanced``; failures that take the
instance out of service (here: /readyz 503).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from certutil_helpers import SUFFIX, Chain, make_cert, make_chain
from harness import free_port, rfb38_none_handshake, running_proxy, tcp_server

from consoleproxy.config import load_config
from consoleproxy.errors import ConfigError
from consoleproxy.tls.certstore import CertStore
from consoleproxy.web.health import (
    ADVANCED,
    BASIC,
    CheckResult,
    check_cpu,
    check_disk,
    check_hypervisor,
    check_listeners,
    check_memory,
    check_tls_handshake,
    cpu_busy_percent,
    evaluate_certificates,
    evaluate_percent,
    run_script,
    script_outcome,
)

MANUAL = {"basic_interval_minutes": 0, "advanced_interval_minutes": 0}  # only on demand


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


# --- pure evaluators ------------------------------------------------------------------------


def test_cpu_busy_percent_from_two_samples() -> None:
    T = namedtuple("T", "user system idle iowait")
    assert cpu_busy_percent(T(0, 0, 0, 0), T(30, 20, 40, 10)) == pytest.approx(50.0)
    assert cpu_busy_percent(T(1, 1, 1, 1), T(1, 1, 1, 1)) == 0.0  # no time passed


def test_evaluate_percent_boundary() -> None:
    assert evaluate_percent("CPU use", 80.0, 80).success
    bad = evaluate_percent("CPU use", 80.1, 80)
    assert not bad.success and "above the maximum of 80%" in bad.message


def test_script_outcome_contract() -> None:
    assert script_outcome("a", 0, "all good\n") is not None
    ok = script_outcome("a", 0, "all good\n")
    assert ok is not None and ok.success and ok.message == "all good"
    bad = script_outcome("a", 1, "broken")
    assert bad is not None and not bad.success
    assert script_outcome("a", 0, "  \n") is None  # silent: not registered
    odd = script_outcome("a", 3, "what")
    assert odd is not None and not odd.success and "exit status 3" in odd.message


# --- certificate ------------------------------------------------------------------------------


def _store_with(tmp_path: Path, chain: Chain, at: dt.datetime | None = None) -> CertStore:
    store = CertStore(tmp_path / "certs")
    for item in chain.items():
        store.import_item(item, now=at)
    return store


def test_certificate_check_passes_then_fails_on_days_left(tmp_path: Path) -> None:
    store = _store_with(tmp_path, make_chain())  # the leaf is valid for 365 days
    ok = evaluate_certificates(store, min_days=30)
    assert ok.success and "days left" in ok.message
    short = evaluate_certificates(store, min_days=400)
    assert not short.success and "at least 400 required" in short.message


def test_certificate_check_fails_for_an_expired_certificate(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    root = make_cert("Root", ca=True, not_before=now - dt.timedelta(days=800))
    inter = make_cert("Inter", issuer=root, ca=True, not_before=now - dt.timedelta(days=800))
    leaf = make_cert(SUFFIX, issuer=inter, not_before=now - dt.timedelta(days=100),
                     not_after=now - dt.timedelta(days=1))
    # Imported while it was valid (50 days ago); it has expired since.
    store = _store_with(tmp_path, Chain(root, inter, leaf), at=now - dt.timedelta(days=50))
    bad = evaluate_certificates(store, min_days=0)
    assert not bad.success and "expired" in bad.message.lower()


def test_certificate_check_with_an_empty_store(tmp_path: Path) -> None:
    bad = evaluate_certificates(CertStore(tmp_path / "empty"), min_days=0)
    assert not bad.success and "no live certificate" in bad.message


# --- disk, CPU, memory ------------------------------------------------------------------------


def test_disk_check_passes_and_fails_on_the_threshold(tmp_path: Path) -> None:
    assert check_disk(tmp_path / "certs-not-made-yet", 0).success
    bad = check_disk(tmp_path, 10**12)  # an exabyte free: no disk has it
    assert not bad.success and "below the minimum" in bad.message


@pytest.mark.integration
async def test_cpu_check_passes_and_fails_under_load() -> None:
    assert (await check_cpu(100)).success
    burner = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
    try:
        bad = await check_cpu(1)  # one busy core of at most a few: well above 1%
        assert not bad.success and "above the maximum" in bad.message
    finally:
        burner.kill()
        await burner.wait()


def test_memory_check_passes_and_fails_on_the_threshold() -> None:
    assert check_memory(100).success
    bad = check_memory(0.01)  # a running system always uses more than 0.01% of its memory
    assert not bad.success and "memory use" in bad.message


# --- network checks ---------------------------------------------------------------------------


async def test_hypervisor_check_reachable_and_closed_port() -> None:
    async with tcp_server(rfb38_none_handshake) as port:
        ok = await check_hypervisor("127.0.0.1", port)
        assert ok.success and "RFB 3.8" in ok.message
    closed = free_port(20000, 30000)
    bad = await check_hypervisor("127.0.0.1", closed)
    assert not bad.success and "refused" in bad.message.lower()


async def test_hypervisor_check_not_a_vnc_server() -> None:
    async def http(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await w.drain()

    async with tcp_server(http) as port:
        bad = await check_hypervisor("127.0.0.1", port)
        assert not bad.success and "not a VNC server" in bad.message


async def test_listeners_check_reports_a_closed_port() -> None:
    closed = free_port(20000, 30000)
    bad = await check_listeners([("public", "127.0.0.1", closed)])
    assert not bad.success and f"127.0.0.1:{closed}" in bad.message


async def _admin_get(p: Any, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=p.admin_headers) as http, http.get(p.admin + path) as r:
        return r.status, await r.json()


async def _readyz(p: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(p.http_base + "/readyz", ssl=False) as r:
        return r.status, await r.json()


async def test_basic_checks_on_a_running_proxy_then_a_listener_stops(tmp_path: Path) -> None:
    # CPU and memory at 100% pass by definition: a busy test machine must not fail this test.
    health = {**MANUAL, "max_cpu_percent": 100, "max_memory_percent": 100}
    async with running_proxy(tmp_path, health=health) as p:
        results = by_name(await p.server.health.run(BASIC))
        assert set(results) == {
            "listeners_check", "disk_space_check", "cpu_usage_check", "memory_usage_check",
            "replay_store_check",
        }  # no certificate_check: [listen] tls is off
        assert all(r.success for r in results.values()), results
        assert all(r.type == BASIC for r in results.values())
        # The public listener stops accepting: the check must see it.
        await p.server._sites[0].stop()
        bad = by_name(await p.server.health.run(BASIC))["listeners_check"]
        assert not bad.success and "public: not listening" in bad.message


async def test_replay_store_check_follows_redis(tmp_path: Path, redis_server: Any) -> None:
    async with running_proxy(
        tmp_path, health=MANUAL, cluster={"replay_store": redis_server.url, "store_timeout_seconds": 0.5}
    ) as p:
        ok = by_name(await p.server.health.run(BASIC))["replay_store_check"]
        assert ok.success and "answers" in ok.message
        redis_server.stop()
        bad = by_name(await p.server.health.run(BASIC))["replay_store_check"]
        assert not bad.success and "does not answer" in bad.message


async def test_dns_check_answers_then_fails_when_the_responder_stops(tmp_path: Path) -> None:
    dns_cfg = {"enabled": True, "listen": "127.0.0.1:0", "zone": "consoleproxy.test"}
    async with running_proxy(tmp_path, health=MANUAL, dns=dns_cfg) as p:
        ok = by_name(await p.server.health.run(ADVANCED))["dns_check"]
        assert ok.success and ok.type == ADVANCED and "consoleproxy.test" in ok.message
        assert p.server.dns is not None
        await p.server.dns.close()
        bad = by_name(await p.server.health.run(ADVANCED))["dns_check"]
        assert not bad.success, bad


async def test_dns_check_absent_when_dns_is_off(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, health=MANUAL) as p:
        assert "dns_check" not in by_name(await p.server.health.run(ADVANCED))


async def test_tls_checks_pass_with_a_good_certificate(tmp_path: Path) -> None:
    _store_with(tmp_path, make_chain())
    async with running_proxy(tmp_path, health=MANUAL, listen={"tls": True}) as p:
        results = by_name(await p.server.health.run_all())
        assert results["certificate_check"].success, results["certificate_check"]
        tls = results["tls_handshake_check"]
        assert tls.success and "verified" in tls.message, tls
        # Verified against another CA, the same listener is refused: the check does verify.
        other = make_cert("Other Root", ca=True)
        bad = await check_tls_handshake(
            "127.0.0.1", p.port, "127-0-0-1.consoleproxy.company.com", other.pem.encode()
        )
        assert not bad.success and "not accepted" in bad.message


async def test_tls_checks_fail_with_an_expired_certificate(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    root = make_cert("Root", ca=True, not_before=now - dt.timedelta(days=800))
    inter = make_cert("Inter", issuer=root, ca=True, not_before=now - dt.timedelta(days=800))
    leaf = make_cert(SUFFIX, issuer=inter, not_before=now - dt.timedelta(days=100),
                     not_after=now - dt.timedelta(days=1))
    _store_with(tmp_path, Chain(root, inter, leaf), at=now - dt.timedelta(days=50))
    async with running_proxy(tmp_path, health=MANUAL, listen={"tls": True}) as p:
        results = by_name(await p.server.health.run_all())
        assert not results["certificate_check"].success
        assert "expired" in results["certificate_check"].message.lower()
        assert not results["tls_handshake_check"].success


async def test_configured_hypervisors_are_advanced_checks(tmp_path: Path) -> None:
    closed = free_port(20000, 30000)
    async with tcp_server(rfb38_none_handshake) as port:
        hv = [f"127.0.0.1:{port}", f"127.0.0.1:{closed}"]
        async with running_proxy(tmp_path, health={**MANUAL, "hypervisors": hv}) as p:
            results = by_name(await p.server.health.run(ADVANCED))
            assert results[f"hypervisor_check[127.0.0.1:{port}]"].success
            bad = results[f"hypervisor_check[127.0.0.1:{closed}]"]
            assert not bad.success and "refused" in bad.message.lower()


# --- custom scripts ---------------------------------------------------------------------------


def _script(folder: Path, name: str, body: str, mode: int = 0o755) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


@pytest.mark.integration
async def test_custom_script_contract(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "scripts"
    _script(d, "passing.sh", 'echo "all fine ($1)"; exit 0\n')
    _script(d, "failing.sh", 'echo "queue is stuck"; exit 1\n')
    _script(d, "silent.sh", "exit 1\n")
    _script(d, "advanced_only.sh", '[ "$1" = advanced ] && echo "deep check ok"; exit 0\n')
    _script(d, "not_executable.sh", 'echo "never"; exit 1\n', mode=0o644)
    caplog.set_level(logging.WARNING, logger="consoleproxy.health")
    async with running_proxy(tmp_path, health={**MANUAL, "scripts_dir": str(d)}) as p:
        basic = by_name(await p.server.health.run(BASIC))
        assert basic["passing.sh"].success and basic["passing.sh"].message == "all fine (basic)"
        assert not basic["failing.sh"].success and basic["failing.sh"].message == "queue is stuck"
        assert "silent.sh" not in basic  # printed nothing: not registered
        assert "advanced_only.sh" not in basic
        assert "not_executable.sh" not in basic
        advanced = by_name(await p.server.health.run(ADVANCED))
        assert advanced["advanced_only.sh"].success and advanced["advanced_only.sh"].type == ADVANCED
        assert advanced["passing.sh"].message == "all fine (advanced)"
        await p.server.health.run(BASIC)
    why = [r.getMessage() for r in caplog.records if "not_executable.sh" in r.getMessage()]
    assert len(why) == 1 and "not executable" in why[0]  # logged once, not per run


@pytest.mark.integration
async def test_custom_script_timeout_kills_it(tmp_path: Path) -> None:
    path = _script(tmp_path / "s", "hangs.sh", "echo started; sleep 60 & sleep 60\n")
    async with asyncio.timeout(10):  # killed at 0.5 s with its children; never the 60 s
        out = await run_script(path, BASIC, 0.5)
    assert out is not None and not out.success and "killed" in out.message


# --- results through the admin API and readiness ----------------------------------------------


async def test_api_health_fields_and_fresh_rerun(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, health={**MANUAL, "exclude": ["cpu_usage_check"]}) as p:
        status, body = await _admin_get(p, "/api/health")
        assert status == 200 and body["results"] == []  # nothing scheduled, nothing run yet
        status, body = await _admin_get(p, "/api/health?fresh=true")
        assert status == 200 and body["fresh"] is True
        names = {r["name"] for r in body["results"]}
        assert "listeners_check" in names and "cpu_usage_check" not in names  # excluded
        for r in body["results"]:
            assert set(r) == {"name", "type", "success", "message", "start", "end", "duration"}
            assert r["type"] in ("basic", "advanced") and isinstance(r["success"], bool)
            start, end = dt.datetime.fromisoformat(r["start"]), dt.datetime.fromisoformat(r["end"])
            assert start <= end and r["duration"] >= 0
        first = {r["name"]: r["start"] for r in body["results"]}
        status, cached = await _admin_get(p, "/api/health")
        assert {r["name"]: r["start"] for r in cached["results"]} == first  # last results, not rerun
        status, again = await _admin_get(p, "/api/health?fresh=true")
        assert all(r["start"] != first[r["name"]] for r in again["results"])  # ran again
        status, body = await _admin_get(p, "/api/health?fresh=perhaps")
        assert status == 400 and "fresh" in body["error"]


async def test_failure_listed_in_failures_to_unready_fails_readyz(tmp_path: Path) -> None:
    health = {"basic_interval_minutes": 0.01, "advanced_interval_minutes": 0,  # every 0.6 s
              "min_free_disk_mb": 10**12, "failures_to_unready": ["disk_space_check"]}
    async with running_proxy(tmp_path, health=health) as p:
        # The scheduled round runs after one interval; wait for it (bounded), then readiness fails.
        async with asyncio.timeout(15):
            while not p.server.health.results:
                await asyncio.sleep(0.05)
        status, body = await _readyz(p)
        assert status == 503 and "disk_space_check" in body["reason"], body


async def test_hypervisor_family_name_in_failures_to_unready(tmp_path: Path) -> None:
    closed = free_port(20000, 30000)
    health = {**MANUAL, "hypervisors": [f"127.0.0.1:{closed}"], "failures_to_unready": ["hypervisor_check"]}
    async with running_proxy(tmp_path, health=health) as p:
        assert (await _readyz(p))[0] == 200
        await p.server.health.run(ADVANCED)
        status, body = await _readyz(p)
        assert status == 503 and f"hypervisor_check[127.0.0.1:{closed}]" in body["reason"], body


async def test_failure_not_listed_keeps_readyz_ready(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, health={**MANUAL, "min_free_disk_mb": 10**12,
                                               "failures_to_unready": ["replay_store_check"]}) as p:
        results = by_name(await p.server.health.run(BASIC))
        assert not results["disk_space_check"].success and results["replay_store_check"].success
        status, body = await _readyz(p)
        assert status == 200, body


# --- configuration ----------------------------------------------------------------------------


def test_health_config_env_and_validation() -> None:
    cfg = load_config(env={"CONSOLEPROXY_HEALTH_EXCLUDE": "cpu_usage_check,dns_check",
                           "CONSOLEPROXY_HEALTH_ADVANCED_INTERVAL_MINUTES": "0"})
    assert cfg.health.exclude == ["cpu_usage_check", "dns_check"]
    assert cfg.health.advanced_interval_minutes == 0
    with pytest.raises(ConfigError, match="hypervisors"):
        load_config(env={"CONSOLEPROXY_HEALTH_HYPERVISORS": "10.0.0.5"})
    with pytest.raises(ConfigError, match="max_cpu_percent"):
        load_config(env={"CONSOLEPROXY_HEALTH_MAX_CPU_PERCENT": "150"})
    with pytest.raises(ConfigError, match="basic_interval_minutes"):
        load_config(env={"CONSOLEPROXY_HEALTH_BASIC_INTERVAL_MINUTES": "-1"})
