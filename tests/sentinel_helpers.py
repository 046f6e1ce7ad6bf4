"""A real Redis Sentinel group for tests: a primary, a replica and three Sentinels, all on loopback.

``running_group(binary, directory)`` starts them on ephemeral ports and waits until every Sentinel
knows the primary, the replica and the two other Sentinels (so a failover can be authorized).
The Sentinels are tuned for tests: the primary is "subjectively down" after
``DOWN_AFTER_MS`` without an answer, so a killed primary is replaced within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis_helpers import START_TIMEOUT, RedisServer, answers_ping, ephemeral_port

SERVICE = "cpservice"
DOWN_AFTER_MS = 1000  # primary considered down after 1 s without a valid reply
FAILOVER_TIMEOUT_MS = 4000
QUORUM = 2


class SentinelServer:
    """One ``redis-server CONF --sentinel`` on its own port (its config file is its own, writable)."""

    def __init__(self, binary: str, directory: Path, primary_port: int) -> None:
        self.binary = binary
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.primary_port = primary_port
        # a run id chosen here, so the others can be told about it; random, so Sentinels of two
        # groups (two test runs on one machine) never take each other for one of their own
        self.myid = secrets.token_hex(20)
        self.port = ephemeral_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, peers: list[SentinelServer], replica_port: int) -> None:
        # The peers and the replica are written in as known, which spares the two-second rounds
        # of hello messages and INFO in which Sentinels would otherwise find them.
        known = "".join(
            f"sentinel known-sentinel {SERVICE} 127.0.0.1 {p.port} {p.myid}\n" for p in peers if p is not self
        )
        for attempt in range(3):  # a new port may be taken between probe and bind
            if attempt:
                self.port = ephemeral_port()
            conf = self.directory / "sentinel.conf"
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.directory}\n"
                f"sentinel myid {self.myid}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
                f"sentinel known-replica {SERVICE} 127.0.0.1 {replica_port}\n{known}"
            )
            log = (self.directory / "sentinel.log").open("ab")
            self.proc = subprocess.Popen(
                [self.binary, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )
            log.close()
            if answers_ping(self.proc, self.port):
                return
            self.stop()
        tail = (self.directory / "sentinel.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server --sentinel did not answer PING within {START_TIMEOUT:g} s:\n{tail}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class SentinelGroup:
    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.primary = RedisServer(binary, directory / "redis-a")
        self.replica = RedisServer(binary, directory / "redis-b")
        self.sentinels: list[SentinelServer] = []

    def start(self) -> None:
        # A full sync starts at once instead of after Redis's default 5 s wait for more replicas
        # (the replica at the start, and the old primary when it rejoins after a failover).
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        self.primary.args = fast_sync
        self.primary.start()
        self.replica.args = [*fast_sync, "--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        self.sentinels = [
            SentinelServer(self.binary, self.directory / f"sentinel{i + 1}", self.primary.port)
            for i in range(3)
        ]
        for s in self.sentinels:
            s.start(self.sentinels, self.replica.port)

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.replica.stop()
        self.primary.stop()

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def by_port(self, port: int) -> RedisServer:
        return next(r for r in (self.primary, self.replica) if r.port == port)

    async def sentinel_views(self) -> list[dict[str, Any]]:
        """``SENTINEL MASTER`` as each running Sentinel sees the service (empty dict if it cannot say)."""
        views = []
        for s in self.sentinels:
            if s.proc is None:
                continue
            client = aioredis.Redis(host="127.0.0.1", port=s.port, socket_timeout=1, decode_responses=True)
            try:
                views.append(await client.sentinel_master(SERVICE))
            except (aioredis.RedisError, OSError):
                views.append({})
            finally:
                await client.aclose()
        return views

    async def replicas_usable(self, replica: RedisServer) -> bool:
        """Every running Sentinel has fresh INFO from ``replica`` with its link to the primary up:
        only then will it promote it (before, ``SENTINEL FAILOVER`` answers NOGOODSLAVE)."""
        for s in self.sentinels:
            if s.proc is None:
                continue
            client = aioredis.Redis(host="127.0.0.1", port=s.port, socket_timeout=1, decode_responses=True)
            try:
                rows = await client.sentinel_slaves(SERVICE)
            except (aioredis.RedisError, OSError):
                return False
            finally:
                await client.aclose()
            if not any(
                int(r.get("port", 0)) == replica.port and r.get("master-link-status") == "ok"
                and not r.get("is_sdown") and not r.get("is_disconnected")
                and 0 <= int(r.get("info-refresh", -1)) < 5000
                for r in rows
            ):
                return False
        return True

    async def role(self, server: RedisServer) -> str:
        client = aioredis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1)
        try:
            reply = await client.execute_command("ROLE")
        except (aioredis.RedisError, OSError):
            return "unreachable"
        finally:
            await client.aclose()
        role = reply[0]
        return role.decode() if isinstance(role, bytes) else str(role)

    async def wait_healthy(self, primary: RedisServer, timeout: float = 30) -> None:
        """Every Sentinel names ``primary``, sees it up with one live replica and the other two Sentinels."""
        other = self.replica if primary is self.primary else self.primary
        async with asyncio.timeout(timeout):
            while True:
                views = await self.sentinel_views()
                if len(views) == 3 and all(
                    int(v.get("port", 0)) == primary.port
                    and int(v.get("num-other-sentinels", 0)) == 2
                    and int(v.get("num-slaves", 0)) >= 1
                    and not v.get("is_sdown") and not v.get("is_odown")
                    and "failover_in_progress" not in str(v.get("flags", ""))
                    for v in views
                ) and await self.replica_linked(primary) and await self.replicas_usable(other):
                    return
                await asyncio.sleep(0.1)

    async def commandstats(self, server: RedisServer) -> dict[str, Any]:
        """``INFO commandstats`` of ``server``: which commands it ran (or refused) since it started."""
        client = aioredis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1)
        try:
            return dict(await client.info("commandstats"))
        finally:
            await client.aclose()

    async def replica_linked(self, primary: RedisServer) -> bool:
        """``primary`` has at least one replica whose link is up (INFO replication)."""
        client = aioredis.Redis(host="127.0.0.1", port=primary.port, socket_timeout=1, decode_responses=True)
        try:
            info = await client.info("replication")
        except (aioredis.RedisError, OSError):
            return False
        finally:
            await client.aclose()
        links = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return info.get("role") == "master" and bool(links) and all(v.get("state") == "online" for v in links)

    async def wait_promoted(self, old: RedisServer, timeout: float = 30) -> RedisServer:
        """Wait until every running Sentinel names the other server as primary and it says "master"."""
        new = self.replica if old is self.primary else self.primary
        views: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    views = await self.sentinel_views()
                    if views and all(int(v.get("port", 0)) == new.port for v in views) \
                            and await self.role(new) == "master":
                        return new
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(
                f"{new.port} was not promoted within {timeout:g} s\n{views}\n{self.logs()}"
            ) from None


    def logs(self, lines: int = 15) -> str:
        """The last lines of every Sentinel's and server's log, for a failure message."""
        out = []
        for name, path in [
            *((f"sentinel{i + 1}", s.directory / "sentinel.log") for i, s in enumerate(self.sentinels)),
            ("redis-a", self.primary.directory / "redis.log"),
            ("redis-b", self.replica.directory / "redis.log"),
        ]:
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = ["(no log)"]
            out.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    async def wait_rejoined(self, old: RedisServer, new: RedisServer, timeout: float = 60) -> None:
        """Wait until the Sentinels have made ``old`` a replica of ``new`` and its link is up."""
        try:
            async with asyncio.timeout(timeout):
                while not (await self.role(old) == "slave" and await self.replica_linked(new)):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(
                f"{old.port} did not become a linked replica of {new.port} within {timeout:g} s\n"
                f"{await self.sentinel_views()}\n{self.logs()}"
            ) from None


@contextlib.asynccontextmanager
async def running_group(binary: str, directory: Path) -> AsyncIterator[SentinelGroup]:
    group = SentinelGroup(binary, directory)
    try:
        await asyncio.to_thread(group.start)
        await group.wait_healthy(group.primary)
        yield group
    finally:
        await asyncio.to_thread(group.stop)
