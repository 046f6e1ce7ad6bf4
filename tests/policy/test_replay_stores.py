"""Shared replay stores (issue 7 point 4): SQLite and Redis behind the ReplayStore protocol, the
[cluster] failure policy, and readiness while a shared store is down.

The stores run for real: SQLite files in tmp_path (shared by real processes), a real
redis-server per test (``redis_server`` fixture, tests/redis_helpers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import RFBClient, connect_echo, echo_backend, expect_close, running_proxy, tcp_server
from redis_helpers import RedisServer
from sentinel_helpers import SERVICE, SentinelGroup

from consoleproxy.config import ConfigError, load_config, replace
from consoleproxy.errors import ConsoleError, TokenAlreadyUsed
from consoleproxy.policy.cloudstack import CloudStackKeys, CloudStackValidator, encrypt_gcm
from consoleproxy.policy.replay import (
    GuardedReplayStore,
    MemoryReplayStore,
    ReplayStore,
    ReplayStoreFull,
    ReplayStoreUnavailable,
)
from consoleproxy.policy.replay_open import open_replay_store
from consoleproxy.policy.replay_redis import RedisReplayStore, SentinelReplayStore
from consoleproxy.policy.replay_sqlite import SqliteReplayStore
from consoleproxy.policy.replay_url import BadStoreURL, StoreURL, parse_store_url, redact_url
from consoleproxy.policy.tokens import Keyring
from consoleproxy.server import ProxyServer

ROOT = Path(__file__).resolve().parents[2]


# --- the protocol's contract, for every store ------------------------------------------------

STORES = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.integration)]  # a redis-server


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReplayStore]:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        s: ReplayStore = RedisReplayStore(server.url)
    elif request.param == "sqlite":
        s = SqliteReplayStore(tmp_path / "replay.db")
    else:
        s = MemoryReplayStore()
    try:
        yield s
    finally:
        await s.close()


async def test_contract_first_use_then_seen(store: ReplayStore) -> None:
    exp = time.time() + 60
    assert await store.add("a", exp) is True
    assert await store.add("a", exp) is False
    assert await store.add("a", exp + 100) is False  # a later expiry does not make it new
    assert await store.add("b", exp) is True
    assert await store.ping() is True


async def test_contract_expired_key_can_be_added_again(store: ReplayStore) -> None:
    exp = time.time() + 0.3
    assert await store.add("k", exp) is True
    assert await store.add("k", exp) is False
    # Forgotten once past its expiry; bounded wait for the store to let it go.
    async with asyncio.timeout(5):
        while not await store.add("k", time.time() + 60):
            await asyncio.sleep(0.05)
    assert time.time() >= exp
    assert await store.add("k", time.time() + 60) is False  # and recorded again


async def test_contract_concurrent_adds_of_one_key_one_winner(store: ReplayStore) -> None:
    exp = time.time() + 60
    results = await asyncio.gather(*(store.add("same", exp) for _ in range(64)))
    assert results.count(True) == 1


# --- SQLite ------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_sqlite_expiry_boundary_and_purge(tmp_path: Path) -> None:
    clock = Clock(1000)
    store = SqliteReplayStore(tmp_path / "r.db", clock=clock, purge_interval=0)
    try:
        assert await store.add("a", 1100)
        for i in range(10):
            assert await store.add(f"old{i}", 1000 + i)
        clock.now = 1100  # the validator still accepts at exp + skew exactly
        assert await store.add("a", 1100) is False
        assert await store.count() == 1  # that add purged old0..old9 (all < 1100)
        clock.now = 1100.001
        assert await store.add("a", 1200) is True  # replaced once strictly past
        assert await store.add("a", 1200) is False
    finally:
        await store.close()


async def test_sqlite_uses_wal_and_a_relative_url_is_under_the_config_dir(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "consoleproxy.toml").write_text('[cluster]\nreplay_store = "sqlite:///state/replay.db"\n')
    (conf_dir / "state").mkdir()
    cfg = load_config(conf_dir / "consoleproxy.toml", env={})
    store = open_replay_store(cfg.cluster.replay_store, base_dir=cfg.base_dir)
    try:
        assert isinstance(store, SqliteReplayStore)
        assert store.path == conf_dir / "state" / "replay.db"
        assert await store.add("x", time.time() + 60)
    finally:
        await store.close()
    with sqlite3.connect(conf_dir / "state" / "replay.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT key FROM replay").fetchall() == [("x",)]


async def test_sqlite_locked_past_the_timeout_is_unavailable_not_first_use(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReplayStore(path, timeout=0.1)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(ReplayStoreUnavailable) as err:
            await store.add("k", time.time() + 60)
        assert "locked" in err.value.detail and err.value.close_code == 4008
        assert str(path) not in str(err.value)  # the browser sees no path
        blocker.execute("ROLLBACK")
        assert await store.add("k", time.time() + 60) is True  # reconnects and works again
    finally:
        blocker.close()
        await store.close()


def test_sqlite_open_waits_for_another_process_opening_the_same_file(tmp_path: Path) -> None:
    """Workers of `serve --workers N` open the file at once: one holding the write lock past the
    busy timeout (a loaded machine) must not fail another's start."""
    path = tmp_path / "r.db"
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # what a worker setting up the schema holds
    release = threading.Timer(0.5, lambda: blocker.execute("ROLLBACK"))
    release.start()
    try:
        store = SqliteReplayStore(path, timeout=0.1)  # 5 busy timeouts before the lock goes
        asyncio.run(store.close())
    finally:
        release.join()
        blocker.close()


def test_sqlite_file_that_cannot_be_created_fails_at_start(tmp_path: Path) -> None:
    cfg = load_config(env={})
    cfg = replace(cfg, cluster={"replay_store": f"sqlite:///{tmp_path}/missing-dir/replay.db"},
                  admin={"key_file": str(tmp_path / "admin.key")})
    with pytest.raises(ConfigError, match=r"\[cluster\] replay_store: cannot open it: sqlite .*missing-dir"):
        ProxyServer(cfg, keyring=Keyring.generate())


_WORKER = r"""
import asyncio, json, os, random, sys, time
from consoleproxy.policy.replay_sqlite import SqliteReplayStore

async def main(db, go, n):
    store = SqliteReplayStore(db, timeout=5)
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(go):  # start together, so the adds really race
        assert time.monotonic() < deadline, "never told to go"
        await asyncio.sleep(0.001)
    exp = time.time() + 600
    order = list(range(n))
    random.shuffle(order)  # each its own order: a process that lags still reaches keys first
    won = [k for k in order if await store.add(f"key{k}", exp)]
    await store.close()
    print(json.dumps(won))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.integration
async def test_sqlite_shared_by_processes_each_key_wins_once(tmp_path: Path) -> None:
    db, go, n = tmp_path / "replay.db", tmp_path / "go", 3000
    SqliteReplayStore(db)  # create the file first, as the first worker would
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WORKER, str(db), str(go), str(n),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        )
        for _ in range(3)
    ]
    async with asyncio.timeout(60):
        for p in procs:  # all imported and opened: then start them together
            assert p.stdout is not None
            assert await p.stdout.readline() == b"ready\n"
        go.touch()
        outs = [await p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
    won = [set(json.loads(out)) for out, _ in outs]
    assert sum(len(w) for w in won) == n  # every key accepted exactly once across the processes
    assert set().union(*won) == set(range(n))
    # every process won some keys: they ran at the same time (one finishing first would take all)
    assert all(won), [len(w) for w in won]


# --- Redis -------------------------------------------------------------------------------------


async def test_redis_keys_carry_prefix_and_expiry(redis_server: RedisServer) -> None:
    import redis.asyncio as aioredis

    store = RedisReplayStore(redis_server.url, key_prefix="cp-test:")
    probe = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await store.add("jti-1", time.time() + 30)
        ttl = await probe.pttl("cp-test:jti-1")
        assert 28_000 < ttl <= 30_000
    finally:
        await probe.aclose()
        await store.close()


async def test_redis_down_is_unavailable_and_comes_back(redis_server: RedisServer) -> None:
    store = RedisReplayStore(redis_server.url, timeout=0.5)
    try:
        assert await store.add("a", time.time() + 60)
        redis_server.stop()
        assert await store.ping() is False
        with pytest.raises(ReplayStoreUnavailable) as err:
            await store.add("b", time.time() + 60)
        assert err.value.close_code == 4008 and "redis redis://127.0.0.1" in err.value.detail
        redis_server.start()  # same port, empty
        assert await store.ping() is True
        assert await store.add("b", time.time() + 60) is True
    finally:
        await store.close()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers: a hung Redis."""

    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()  # until the client gives up

    async with tcp_server(hold) as port:
        yield port


async def test_hung_redis_fails_within_the_timeout(silent_port: int) -> None:
    store = RedisReplayStore(f"redis://127.0.0.1:{silent_port}/0", timeout=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(ReplayStoreUnavailable, match="unavailable"):
            await store.add("k", time.time() + 60)
        assert time.monotonic() - t0 < 2, "a hung Redis must fail a console within 2 s (timeout 0.2 s)"
        t0 = time.monotonic()
        assert await store.ping() is False
        assert time.monotonic() - t0 < 2
    finally:
        await store.close()


def test_redis_store_never_logs_the_password() -> None:
    store = RedisReplayStore("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in store.where and "***" in store.where


# --- URLs and [cluster] configuration ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memory", StoreURL("memory")),
        ("sqlite:///replay.db", StoreURL("sqlite", path="replay.db")),
        ("sqlite:////var/lib/cp/replay.db", StoreURL("sqlite", path="/var/lib/cp/replay.db")),
        ("redis://10.0.0.5:6379/2", StoreURL("redis", url="redis://10.0.0.5:6379/2")),
        ("rediss://:pw@redis.example:6380", StoreURL("redis", url="rediss://:pw@redis.example:6380")),
        ("redis://localhost", StoreURL("redis", url="redis://localhost")),
    ],
)
def test_store_urls(url: str, expected: StoreURL) -> None:
    assert parse_store_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty"),
        ("memcached://x:1", "unknown store 'memcached'"),
        ("/var/lib/replay.db", "unknown store"),
        ("sqlite://host/replay.db", "has no host"),
        ("sqlite:///", "names no file"),
        ("sqlite:///dir/", "names no file"),
        ("sqlite:///:memory:", "not shared"),
        ("sqlite:///r.db?mode=ro", "no query"),
        ("redis://", "names no host"),
        ("redis:host:6379", r"write redis://HOST"),
        ("redis://host:0/0", "port must be 1-65535"),
        ("redis://host:99999/0", "port must be 1-65535"),
        ("redis://host:abc/0", "port must be 1-65535"),
        ("redis://host:6379/x", "database must be a number"),
    ],
)
def test_bad_store_urls(url: str, problem: str) -> None:
    with pytest.raises(BadStoreURL, match=problem):
        parse_store_url(url)


SENTINEL_FORM = r"write redis\+sentinel://HOST:PORT\[,HOST:PORT...\]/SERVICE\[/DB\]"


def test_sentinel_urls() -> None:
    spec = parse_store_url("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,[fd00::3]:26379/mymaster/2")
    assert spec.kind == "sentinel" and spec.service == "mymaster" and spec.db == 2 and not spec.tls
    assert spec.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("fd00::3", 26379))
    assert (spec.username, spec.password, spec.sentinel_auth) == (None, None, False)
    spec = parse_store_url("redis+sentinel://s1,s2:1234/svc")  # port defaults to 26379, DB to 0
    assert spec.sentinels == (("s1", 26379), ("s2", 1234)) and spec.db == 0
    spec = parse_store_url(
        "rediss+sentinel://app:p%40ss@s1:26379/svc/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required"
        "&ssl_check_hostname=no&sentinel_auth=yes"
    )
    assert spec.tls and (spec.username, spec.password, spec.sentinel_auth) == ("app", "p@ss", True)
    assert dict(spec.tls_options) == {
        "ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required", "ssl_check_hostname": False}
    assert "p@ss" not in repr(spec)  # a parsed URL may end up in a log line


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://s1:26379", "names no service: " + SENTINEL_FORM),
        ("redis+sentinel://s1:26379/", "names no service"),
        ("redis+sentinel://s1:26379/0", r"names no service \('0' looks like a database number\)"),
        ("redis+sentinel:///svc", "names no Sentinel"),
        ("redis+sentinel:s1:26379/svc", "write redis\\+sentinel://"),
        ("redis+sentinel://s1:99999/svc", r"Sentinel port must be 1-65535 \(bad entry 's1:99999'\)"),
        ("redis+sentinel://s1:26379,s2:x/svc", r"Sentinel port must be 1-65535 \(bad entry 's2:x'\)"),
        ("redis+sentinel://s1:0/svc", "Sentinel port must be 1-65535"),
        ("redis+sentinel://s1:26379,,s2/svc", "names no host"),
        ("redis+sentinel://[::1/svc", "bad Sentinel address"),
        ("redis+sentinel://s1/svc/x", "database must be a number, not 'x'"),
        ("redis+sentinel://s1/svc/0/extra", "too many parts"),
        ("redis+sentinel://s1/svc?timeout=3", "unknown option 'timeout'"),
        ("redis+sentinel://s1/svc?ssl_ca_certs=/ca.pem", "needs TLS: write rediss\\+sentinel://"),
        ("rediss+sentinel://s1/svc?ssl_cert_reqs=maybe", "ssl_cert_reqs takes none, optional or required"),
        ("redis+sentinel://s1/svc?sentinel_auth=perhaps", "sentinel_auth takes yes or no"),
        ("redis+sentinel://s1/svc#x", "no fragment"),
        ("redis+sentinal://s1:26379/svc", "unknown store 'redis\\+sentinal'"),
        ("sentinel://s1:26379/svc", "unknown store 'sentinel'"),
    ],
)
def test_bad_sentinel_urls(url: str, problem: str) -> None:
    with pytest.raises(BadStoreURL, match=problem):
        parse_store_url(url)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://127.0.0.1:26379", "names no service"),
        ("redis+sentinel://127.0.0.1:70000/svc", "port must be 1-65535 (bad entry '127.0.0.1:70000')"),
        ("redis+sentinal://:hunter2@127.0.0.1:26379/svc", "unknown store 'redis+sentinal'"),
    ],
)
def test_bad_sentinel_url_stops_serve_with_one_line(
    url: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from consoleproxy.tools.cli import main

    conf = tmp_path / "consoleproxy.toml"
    conf.write_text(f'[cluster]\nreplay_store = "{url}"\n')
    assert main(["serve", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "configuration error" in err and "[cluster] replay_store" in err and problem in err, err
    assert "hunter2" not in err


def test_sentinel_store_keys_have_defaults_checks_and_env_overrides(tmp_path: Path) -> None:
    c = load_config(env={}).cluster
    assert (c.store_grace_seconds, c.store_wait_replicas, c.store_wait_timeout_ms) == (10.0, 1, 100)
    env = {
        "CONSOLEPROXY_CLUSTER_STORE_GRACE_SECONDS": "0",
        "CONSOLEPROXY_CLUSTER_STORE_WAIT_REPLICAS": "2",
        "CONSOLEPROXY_CLUSTER_STORE_WAIT_TIMEOUT_MS": "250",
    }
    c = load_config(env=env).cluster
    assert (c.store_grace_seconds, c.store_wait_replicas, c.store_wait_timeout_ms) == (0, 2, 250)
    with pytest.raises(ConfigError, match=r"store_grace_seconds: expected a number from 0 to 3600"):
        load_config(env={"CONSOLEPROXY_CLUSTER_STORE_GRACE_SECONDS": "-1"})
    with pytest.raises(ConfigError, match=r"store_wait_replicas: expected a number from 0 to 16"):
        load_config(env={"CONSOLEPROXY_CLUSTER_STORE_WAIT_REPLICAS": "-1"})
    # WAIT must end before the store call's own time limit, or every mark would time out
    cfg = replace(load_config(env={}), cluster={
        "replay_store": "redis+sentinel://127.0.0.1:26379/svc", "store_timeout_seconds": 0.5,
        "store_wait_timeout_ms": 500}, admin={"key_file": str(tmp_path / "admin.key")})
    with pytest.raises(ConfigError, match=r"store_wait_timeout_ms: expected less than store_timeout_seconds"):
        ProxyServer(cfg, keyring=Keyring.generate())


async def test_sentinel_store_is_built_from_the_url_without_connecting(tmp_path: Path) -> None:
    cfg = replace(load_config(env={}), cluster={
        "replay_store": "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/svc/3", "store_wait_replicas": 2,
        "store_wait_timeout_ms": 250}, admin={"key_file": str(tmp_path / "admin.key")})
    server = ProxyServer(cfg, keyring=Keyring.generate())
    store = server.replay.store
    try:
        assert isinstance(store, SentinelReplayStore)
        assert (store.service, store.wait_replicas, store.wait_timeout) == ("svc", 2, 0.25)
        assert "pw" not in store.where and server.replay.grace == 10.0
        # nothing listens on ports 1 and 2: no primary, so the add is an outage, not a first use
        with pytest.raises(ReplayStoreUnavailable, match="unavailable"):
            await store.add("k", time.time() + 60)
    finally:
        await server.replay.close()


async def test_tls_sentinel_options_reach_redis_py() -> None:
    """A TLS URL builds a store whose Sentinel clients accept the options (no TypeError later)."""
    url = "rediss+sentinel://u:s3cretpw@127.0.0.1:1/svc?ssl_cert_reqs=none&ssl_check_hostname=no&sentinel_auth=yes"
    store = SentinelReplayStore(parse_store_url(url), timeout=0.2)
    try:
        with pytest.raises(ReplayStoreUnavailable) as err:
            await store.add("k", time.time() + 60)
        assert "s3cretpw" not in err.value.detail and "u:***@" in err.value.detail  # the detail is logged
        assert await store.ping() is False
    finally:
        await store.close()


def test_sentinel_store_refuses_a_wait_longer_than_its_timeout() -> None:
    spec = parse_store_url("redis+sentinel://127.0.0.1:1/svc")
    with pytest.raises(ValueError, match=r"wait_timeout \(1 s\) must be less than timeout \(1 s\)"):
        SentinelReplayStore(spec, timeout=1.0, wait_timeout=1.0)
    with pytest.raises(ValueError, match="wait_replicas must be 0 or more"):
        SentinelReplayStore(spec, wait_replicas=-1)


def test_bad_store_url_is_a_config_error_naming_the_key_without_the_password(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[cluster]\nreplay_store = "redsi://:hunter2@db:6379/0"\n')
    with pytest.raises(ConfigError) as err:
        load_config(conf, env={})
    msg = str(err.value)
    assert "[cluster] replay_store: expected memory, sqlite:///FILE, redis://HOST[:PORT][/DB] or " \
        "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]" in msg
    assert "unknown store 'redsi'" in msg and "hunter2" not in msg and ":***@db" in msg


def test_cluster_keys_have_defaults_checks_and_env_overrides() -> None:
    c = load_config(env={}).cluster
    assert (c.replay_store, c.on_store_error, c.store_timeout_seconds) == ("memory", "reject", 1.0)
    env = {
        "CONSOLEPROXY_CLUSTER_REPLAY_STORE": "redis://10.1.1.1:6379/0",
        "CONSOLEPROXY_CLUSTER_ON_STORE_ERROR": "accept",
        "CONSOLEPROXY_CLUSTER_STORE_TIMEOUT_SECONDS": "0.25",
    }
    c = load_config(env=env).cluster
    assert (c.replay_store, c.on_store_error, c.store_timeout_seconds) == (
        "redis://10.1.1.1:6379/0", "accept", 0.25)
    with pytest.raises(ConfigError, match=r"on_store_error: expected one of 'reject', 'accept'"):
        load_config(env={"CONSOLEPROXY_CLUSTER_ON_STORE_ERROR": "ignore"})
    with pytest.raises(ConfigError, match=r"CONSOLEPROXY_CLUSTER_REPLAY_STORE: \[cluster\] replay_store"):
        load_config(env={"CONSOLEPROXY_CLUSTER_REPLAY_STORE": "redis://h:6379/db"})


def test_redact_url() -> None:
    assert redact_url("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:p@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


# --- the failure policy (GuardedReplayStore), with a scripted store -------------------------------


class FlakyStore:
    """A shared store whose availability the test switches."""

    def __init__(self) -> None:
        self.up = True
        self.inner = MemoryReplayStore()
        self.pings = 0

    async def add(self, key: str, expires_at: float) -> bool:
        if not self.up:
            raise ReplayStoreUnavailable("flaky: connection refused")
        return await self.inner.add(key, expires_at)

    async def ping(self) -> bool:
        self.pings += 1
        return self.up

    async def close(self) -> None:
        pass


def guarded(
    policy: str, clock: Callable[[], float] = time.monotonic
) -> tuple[GuardedReplayStore, FlakyStore, list[int]]:
    flaky = FlakyStore()
    failures: list[int] = []
    g = GuardedReplayStore(flaky, on_error=policy, on_failure=lambda: failures.append(1), name="flaky",
                           clock=clock)
    return g, flaky, failures


async def test_reject_policy_refuses_and_reports_not_ready(caplog: pytest.LogCaptureFixture) -> None:
    g, flaky, failures = guarded("reject")
    exp = time.time() + 60
    assert await g.add("a", exp) and g.not_ready_reason() is None
    flaky.up = False
    with caplog.at_level(logging.WARNING, "consoleproxy.replay"):
        for key in ("b", "c", "d"):
            with pytest.raises(ReplayStoreUnavailable) as err:
                await g.add(key, exp)
            assert isinstance(err.value, ConsoleError) and err.value.close_code == 4008
        assert g.not_ready_reason() == "replay store unreachable"
        assert len(failures) == 3
        down = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(down) == 1, "one warning per outage, not one per console"
        assert "refused (4008)" in down[0].getMessage()
        flaky.up = True
        assert await g.add("b", exp) is True  # nothing was recorded while it was down
        assert await g.add("a", exp) is False
        assert g.not_ready_reason() is None
        assert sum("reachable again" in r.getMessage() for r in caplog.records) == 1


async def test_accept_policy_admits_counts_and_stays_ready(caplog: pytest.LogCaptureFixture) -> None:
    g, flaky, failures = guarded("accept")
    flaky.up = False
    exp = time.time() + 60
    with caplog.at_level(logging.WARNING, "consoleproxy.replay"):
        assert await g.add("a", exp) is True
        assert await g.add("a", exp) is True  # no single-use check while the store is down
    assert len(failures) == 2
    assert g.not_ready_reason() is None  # accepting: a balancer may keep sending consoles
    assert next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING).endswith(
        "admitted WITHOUT the single-use check until it answers")
    assert sum(1 for r in caplog.records if "unreachable" in r.getMessage()) == 1


async def test_full_store_is_not_an_outage() -> None:
    failures: list[int] = []
    g = GuardedReplayStore(MemoryReplayStore(max_entries=1), on_error="accept",
                           on_failure=lambda: failures.append(1))
    assert await g.add("a", time.time() + 60)
    with pytest.raises(ReplayStoreFull):
        await g.add("b", time.time() + 60)  # "accept" is for outages, not for a full store
    assert failures == [] and g.reachable


async def test_refresh_pings_at_most_once_per_interval_and_shares_the_ping() -> None:
    clock = Clock(0)
    g, flaky, _ = guarded("reject", clock=clock)
    await asyncio.gather(*(g.refresh() for _ in range(10)))
    assert flaky.pings == 1
    flaky.up = False
    clock.now = 0.5
    await g.refresh()
    assert flaky.pings == 1 and g.not_ready_reason() is None  # cached
    clock.now = 1.1
    await g.refresh()
    assert flaky.pings == 2 and g.not_ready_reason() == "replay store unreachable"
    flaky.up = True
    clock.now = 1.5
    assert await g.add("x", time.time() + 60)  # an answered add is a check: ready at once
    assert g.not_ready_reason() is None


async def test_unready_only_after_the_grace_and_ready_again_at_once() -> None:
    clock = Clock(0)
    flaky = FlakyStore()
    g = GuardedReplayStore(flaky, clock=clock, grace=10)
    flaky.up = False
    with pytest.raises(ReplayStoreUnavailable):
        await g.add("a", time.time() + 60)  # the outage starts at 0: refused, but still ready
    assert not g.reachable and g.not_ready_reason() is None
    clock.now = 9.5
    await g.refresh()
    assert g.not_ready_reason() is None  # unreachable for 9.5 s < 10 s
    clock.now = 10.6
    await g.refresh()
    assert g.not_ready_reason() == "replay store unreachable"
    flaky.up = True
    clock.now = 11.7
    await g.refresh()
    assert g.not_ready_reason() is None
    # a new outage starts its own grace: the last one's length does not count
    flaky.up = False
    clock.now = 20
    await g.refresh()
    assert g.not_ready_reason() is None and g.unreachable_since == 20


async def test_refresh_with_a_bound_returns_while_a_slow_ping_goes_on() -> None:
    answer = asyncio.Event()

    class SlowStore(FlakyStore):
        async def ping(self) -> bool:
            self.pings += 1
            await answer.wait()  # a store that takes its time (connect timeout, retry)
            return False

    slow = SlowStore()
    g = GuardedReplayStore(slow, clock=Clock(5))
    await g.refresh(wait=0.01)  # returns without the answer ...
    assert slow.pings == 1 and g.reachable and g.not_ready_reason() is None
    answer.set()
    async with asyncio.timeout(5):  # ... which arrives later and counts
        while g.reachable:
            await asyncio.sleep(0.01)
    assert g.not_ready_reason() == "replay store unreachable"


async def test_memory_store_is_never_pinged_nor_unready() -> None:
    g = GuardedReplayStore(MemoryReplayStore())
    await g.refresh()
    assert not g.shared and g.not_ready_reason() is None


def test_policy_must_be_known() -> None:
    with pytest.raises(ValueError, match="'reject' or 'accept'"):
        GuardedReplayStore(MemoryReplayStore(), on_error="ignore")


# --- the CloudStack token path uses the same store ------------------------------------------------

CS_KEYS = CloudStackKeys(bytes(range(16)), bytes(range(100, 116)))


def _shared_store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A store several instances share: a fresh redis-server, or one SQLite file."""
    if kind == "redis":
        return str(request.getfixturevalue("redis_server").url)
    return f"sqlite:///{tmp_path}/replay.db"


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.integration)])
async def test_cloudstack_token_single_use_across_instances(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = _shared_store_url(kind, tmp_path, request)
    # Two instances: each its own store object on the shared backend, as two processes would have.
    stores = [GuardedReplayStore(open_replay_store(url)) for _ in range(2)]
    a, b = (CloudStackValidator(CS_KEYS, s) for s in stores)
    token = encrypt_gcm(CS_KEYS, {"clientHostAddress": "10.0.0.7", "clientHostPort": 5901,
                                  "clientTag": "vm-1", "sessionUuid": "0b5e3c1e-1111-4000-8000-00000000000a"})
    try:
        claims = await a.validate(token, client_ip="192.0.2.1", extra=None)
        assert claims.host == "10.0.0.7"
        with pytest.raises(TokenAlreadyUsed):
            await b.validate(token, client_ip="192.0.2.1", extra=None)
    finally:
        for s in stores:
            await s.close()


def test_cloudstack_format_proxy_validates_against_the_configured_store(tmp_path: Path) -> None:
    keyiv = tmp_path / "keyiv.json"
    keyiv.write_text(json.dumps({"base64EncodedKeyBytes": "AAECAwQFBgcICQoLDA0ODw==",
                                 "base64EncodedIvBytes": "ZGVmZ2hpamtsbW5vcHFycw=="}))
    cfg = replace(load_config(env={}), tokens={"format": "cloudstack"},
                  cloudstack={"key_iv_file": str(keyiv)},
                  cluster={"replay_store": f"sqlite:///{tmp_path}/replay.db"},
                  admin={"key_file": str(tmp_path / "admin.key")})
    server = ProxyServer(cfg)
    assert server.cloudstack is not None and server.cloudstack.replay is server.replay
    assert isinstance(server.replay.store, SqliteReplayStore)
    asyncio.run(server.replay.close())


# --- proxies sharing a store end to end ------------------------------------------------------------


async def _get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.json()


async def _wait_ready(base: str, status: int, timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            got, body = await _get(base + "/readyz")
            if got == status:
                return body
            await asyncio.sleep(0.1)


def _errors(server: ProxyServer) -> float:
    return server.metrics.registry.get_sample_value("consoleproxy_replay_store_errors_total") or 0.0


@pytest.mark.parametrize("kind", [pytest.param("redis", marks=pytest.mark.integration), "sqlite"])
async def test_native_token_used_on_one_instance_is_refused_on_another(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = _shared_store_url(kind, tmp_path, request)
    keyring = Keyring.generate()
    cluster = {"replay_store": url}
    async with running_proxy(tmp_path, keyring=keyring, cluster=cluster) as p1, \
            running_proxy(tmp_path, keyring=keyring, cluster=cluster) as p2, \
            tcp_server(echo_backend) as port:
        token = p1.token(port=port)
        async with RFBClient.connect(p1.url(token)) as c:
            await connect_echo(c)
            code, reason = await expect_close(p2.url(token))
            assert (code, reason) == (4003, "token already used")
            assert p2.server.metrics.registry.get_sample_value(
                "consoleproxy_token_rejections_total", {"reason": "token already used"}) == 1
        # a fresh token still works on the second instance
        async with RFBClient.connect(p2.url(p2.token(port=port))) as c2:
            await connect_echo(c2)


async def test_redis_down_reject_refuses_4008_unready_then_recovers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    cluster = {"replay_store": redis_server.url, "store_grace_seconds": 0}  # unready at the first miss
    async with running_proxy(tmp_path, cluster=cluster) as p, tcp_server(echo_backend) as port:
        assert (await _get(p.http_base + "/readyz"))[0] == 200
        async with RFBClient.connect(p.url(p.token(port=port))) as running:
            await connect_echo(running)
            redis_server.stop()
            # the health check alone notices (no console needed), within a bounded time
            body = await _wait_ready(p.http_base, 503)
            assert body == {"status": "not ready", "reason": "replay store unreachable"}
            code, reason = await expect_close(p.url(p.token(port=port)))
            assert (code, reason) == (4008, "replay store unavailable; try again shortly")
            assert _errors(p.server) == 1
            # a console already running does not need the store
            await running.send(b"\x00" * 20)
            assert await running.read_exact(20) == b"\x00" * 20
            redis_server.start()
            await _wait_ready(p.http_base, 200)
        async with RFBClient.connect(p.url(p.token(port=port))) as again:
            await connect_echo(again)


async def test_redis_down_within_the_grace_refuses_4008_but_stays_ready(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    cluster = {"replay_store": redis_server.url, "store_grace_seconds": 60}
    async with running_proxy(tmp_path, cluster=cluster) as p, tcp_server(echo_backend) as port:
        redis_server.stop()
        code, _ = await expect_close(p.url(p.token(port=port)))
        assert code == 4008  # refused: the store cannot record the token
        assert not p.server.replay.reachable  # the outage is known ...
        got, body = await _get(p.http_base + "/readyz")
        assert (got, body) == (200, {"status": "ready"})  # ... but shorter than the grace
        redis_server.start()
        async with RFBClient.connect(p.url(p.token(port=port))) as c:
            await connect_echo(c)
        assert p.server.replay.reachable


async def test_redis_down_accept_admits_and_counts(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = {"replay_store": redis_server.url, "on_store_error": "accept"}
    async with running_proxy(tmp_path, cluster=cluster) as p, tcp_server(echo_backend) as port:
        redis_server.stop()
        with caplog.at_level(logging.WARNING, "consoleproxy.replay"):
            for vm in ("a", "b"):
                async with RFBClient.connect(p.url(p.token(port=port, vm=vm))) as c:
                    await connect_echo(c)
        assert _errors(p.server) == 2
        assert b"consoleproxy_replay_store_errors_total 2.0" in p.server.metrics.render()
        assert sum("replay store unreachable" in r.getMessage() for r in caplog.records) == 1
        assert (await _get(p.http_base + "/readyz"))[0] == 200  # accepting: stays in rotation


async def test_readyz_does_not_wait_for_a_hung_store(silent_port: int, tmp_path: Path) -> None:
    # a ping to this store takes 2 x 3 s; a balancer's check would give up long before
    cluster = {"replay_store": f"redis://127.0.0.1:{silent_port}/0", "store_timeout_seconds": 3,
               "store_grace_seconds": 0}
    async with running_proxy(tmp_path, cluster=cluster) as p:
        async with asyncio.timeout(2):
            got, _ = await _get(p.http_base + "/readyz")
        assert got == 200  # nothing known yet: the first ping is still waiting
        body = await _wait_ready(p.http_base, 503, timeout=20)  # its failure counts when it comes
        assert body["reason"] == "replay store unreachable"


async def test_hung_redis_refuses_the_console_fast_not_at_the_handshake_timeout(
    silent_port: int, tmp_path: Path
) -> None:
    cluster = {"replay_store": f"redis://127.0.0.1:{silent_port}/0", "store_timeout_seconds": 0.2}
    async with running_proxy(tmp_path, cluster=cluster, limits={"handshake_timeout_seconds": 10}) as p:
        t0 = time.monotonic()
        code, _ = await expect_close(p.url(p.token(port=5900)))
        assert code == 4008  # a hang would end as 4012 after 10 s
        assert time.monotonic() - t0 < 3, "refused within 3 s with a 0.2 s store timeout"



# --- Redis Sentinel: a real primary, replica and three Sentinels (tests/sentinel_helpers.py) -------


def _sentinel_store(group: SentinelGroup, unacked: list[int], **kw: Any) -> SentinelReplayStore:
    # A replica acknowledges in well under a millisecond here, but the suite shares a loaded 2-core
    # machine: 1 s keeps "not acknowledged" meaning "the replica could not", not "was not scheduled".
    kw.setdefault("timeout", 3.0)
    kw.setdefault("wait_timeout", 1.0)
    spec = parse_store_url(group.url())
    return SentinelReplayStore(spec, on_unacknowledged=lambda: unacked.append(1), **kw)


def _tries(stats: dict[str, Any], command: str) -> int:
    """How often a server was sent ``command``: run, refused before running, or failed."""
    row = stats.get(command, {})
    return sum(int(row.get(k, 0)) for k in ("calls", "rejected_calls", "failed_calls"))


async def _get_key(server: RedisServer, key: str) -> bytes | None:
    import redis.asyncio as aioredis

    probe = aioredis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1)
    try:
        value: bytes | None = await probe.get(key)
        return value
    finally:
        await probe.aclose()


@pytest.mark.integration
async def test_sentinel_store_follows_a_failover_and_never_writes_to_the_old_primary(
    sentinel_group: SentinelGroup,
) -> None:
    g = sentinel_group
    unacked: list[int] = []
    store = _sentinel_store(g, unacked)
    old = g.primary
    try:
        assert await store.add("used", time.time() + 600) is True
        assert unacked == []  # WAIT 1: the replica acknowledged the mark ...
        assert await _get_key(g.replica, "consoleproxy:replay:used") == b"1"  # ... and holds it

        old.stop(kill=True)  # the primary crashes
        # Until the Sentinels promote the replica, adds fail (no primary), never "first use" twice
        # and never against something else. Bounded: the failover takes seconds.
        async with asyncio.timeout(30):
            while True:
                try:
                    assert await store.add("after", time.time() + 600) is True
                    break
                except ReplayStoreUnavailable:
                    await asyncio.sleep(0.1)
        new = await g.wait_promoted(old)
        assert new is g.replica
        assert await store.add("used", time.time() + 600) is False  # marked before: refused after
        assert await _get_key(new, "consoleproxy:replay:after") == b"1"
        # the new primary has no replica yet: marks are admitted but counted as unacknowledged
        assert unacked

        # The old primary comes back as a crashed server does: empty and claiming to be a primary
        # until the Sentinels turn it into a replica of the new one. Keep marking meanwhile.
        await asyncio.to_thread(old.start)
        rejoined = asyncio.create_task(g.wait_rejoined(old, new))
        n = 0
        while not rejoined.done():
            with contextlib.suppress(ReplayStoreUnavailable):  # an overloaded Sentinel's doubt
                assert await store.add(f"while-rejoining-{n}", time.time() + 600) is True
            n += 1
            await asyncio.wait({rejoined}, timeout=0.1)
        await rejoined  # raises, with the Sentinels' logs, if it took too long
        before = len(unacked)
        assert await store.add("rejoined", time.time() + 600) is True
        assert len(unacked) == before  # acknowledged again by the rejoined server
        assert await store.add("used", time.time() + 600) is False
        # Every mark ends with WAIT, which neither replication nor the Sentinels ever send (and a
        # rejected call is counted too): the new primary saw WAITs, the old one none, as primary
        # before the Sentinels demoted it or as replica after.
        assert "cmdstat_wait" in await g.commandstats(new)
        assert "cmdstat_wait" not in await g.commandstats(old)
    finally:
        await store.close()


@pytest.mark.integration
async def test_sentinel_mark_not_acknowledged_by_a_stopped_replica_is_counted(
    sentinel_group: SentinelGroup, caplog: pytest.LogCaptureFixture
) -> None:
    g = sentinel_group
    unacked: list[int] = []
    store = _sentinel_store(g, unacked)
    assert g.replica.proc is not None
    try:
        assert await store.add("a", time.time() + 600) is True and unacked == []
        os.kill(g.replica.proc.pid, signal.SIGSTOP)  # the replica stops reading its link
        try:
            with caplog.at_level(logging.WARNING, "consoleproxy.replay"):
                assert await store.add("b", time.time() + 600) is True  # admitted ...
                assert await store.add("c", time.time() + 600) is True
            assert len(unacked) == 2  # ... and counted: the mark is on the primary only
            warned = [r.getMessage() for r in caplog.records if "acknowledged a token mark" in r.getMessage()]
            assert len(warned) == 1 and "0 of 1 replicas" in warned[0] and "1000 ms" in warned[0], warned
            assert await store.add("a", time.time() + 600) is False
            assert len(unacked) == 2  # a refused token was not marked, so there is nothing to wait for
        finally:
            os.kill(g.replica.proc.pid, signal.SIGCONT)
        async with asyncio.timeout(30):  # the replica catches up; WAIT is acknowledged again
            for n in itertools.count():
                before = len(unacked)
                assert await store.add(f"d{n}", time.time() + 600) is True
                if len(unacked) == before:
                    break
                await asyncio.sleep(0.1)
        assert await _get_key(g.replica, "consoleproxy:replay:b") == b"1"
    finally:
        await store.close()


@pytest.mark.integration
async def test_sentinel_store_leaves_a_demoted_primary_that_is_still_running(
    sentinel_group: SentinelGroup,
) -> None:
    """SENTINEL FAILOVER: the primary stays up and becomes a replica; the store's pooled
    connections to it must not be used for the next marks (they would get READONLY)."""
    import redis.asyncio as aioredis

    g = sentinel_group
    unacked: list[int] = []
    store = _sentinel_store(g, unacked)
    old = g.primary
    try:
        assert await store.add("a", time.time() + 600) is True  # a pooled connection to the primary
        sentinel = aioredis.Redis(host="127.0.0.1", port=g.sentinels[0].port, socket_timeout=2)
        try:
            assert await sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
        finally:
            await sentinel.aclose()
        new = await g.wait_promoted(old)
        await g.wait_rejoined(old, new)
        waits_on_old = _tries(await g.commandstats(old), "cmdstat_wait")
        # the first mark after the switch goes to the new primary: first use, not an error
        assert await store.add("b", time.time() + 600) is True
        assert await store.add("a", time.time() + 600) is False
        assert await _get_key(new, "consoleproxy:replay:b") == b"1"
        assert _tries(await g.commandstats(old), "cmdstat_wait") == waits_on_old  # nothing sent to it
    finally:
        await store.close()
