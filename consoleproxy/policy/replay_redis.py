"""The Redis replay stores: token ids in Redis, shared by every instance of a cluster.

* ``redis://HOST:PORT/DB`` or ``rediss://…`` -- :class:`RedisReplayStore`: ``SET prefix+key 1 NX
  PX <ms>``, a reply of ``OK`` meaning first use; ``ping`` is ``PING``.
* ``redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`` or ``rediss+sentinel://…`` --
  :class:`SentinelReplayStore`: the same commands sent to whichever server the Sentinels name
  primary, followed by ``WAIT`` so a mark is on a replica before the console is admitted
  (docs/cluster.md, "Single use across a failover").

redis-py is imported inside the stores, so proxies without a Redis store never load it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from consoleproxy.policy.replay import ReplayStoreUnavailable
from consoleproxy.policy.replay_url import StoreURL, redact_url

__all__ = ["RedisReplayStore", "SentinelReplayStore"]

log = logging.getLogger("consoleproxy.replay")  # one logger for every replay store


class RedisReplayStore:
    """Keys in Redis, shared by every instance of a cluster: ``SET prefix+key 1 NX PX ms``.

    The expiry is sent relative (``PX``, milliseconds left by this proxy's clock, rounded up)
    rather than absolute (``EXAT``): the key then expires when this proxy's clock passes
    ``expires_at`` even if the Redis host's clock is off, and it is this proxy's clock that
    decides whether the token has expired.

    A dead Redis must fail a handshake fast, not hang it: connect and socket timeouts are
    ``timeout``; a refused or broken connection is retried once at once (a Redis that restarted
    left a stale pooled connection), a timeout never; the whole call is bounded by
    ``2 * timeout``. The pool holds at most ``max_connections`` connections, so a burst of
    handshakes during an outage cannot open thousands of sockets. redis-py is imported here, so
    proxies without a Redis store never load it.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 1.0,
        key_prefix: str = "consoleproxy:replay:",
        clock: Callable[[], float] = time.time,
        max_connections: int = 50,
    ) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.where = redact_url(url)
        self.timeout = timeout
        self.key_prefix = key_prefix
        self._clock = clock
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,  # waiting for a free pooled connection
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_error=[RedisConnectionError],
        )
        self._redis = Redis.from_pool(pool)

    async def _do(self, what: str, call: Callable[[], Any], extra: float = 0.0) -> Any:
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(2 * self.timeout + extra):
                return await call()
        except TimeoutError:
            raise ReplayStoreUnavailable(f"redis {self.where}: {what} timed out") from None
        except (RedisError, OSError) as exc:
            raise ReplayStoreUnavailable(f"redis {self.where}: {what}: {exc}") from None

    async def add(self, key: str, expires_at: float) -> bool:
        ttl_ms = max(1, math.ceil((expires_at - self._clock()) * 1000))
        reply = await self._do(
            "SET", lambda: self._redis.set(self.key_prefix + key, b"1", nx=True, px=ttl_ms)
        )
        return reply is not None and reply is not False

    async def ping(self) -> bool:
        try:
            await self._do("PING", self._redis.ping)
        except ReplayStoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._redis.aclose()


class SentinelReplayStore(RedisReplayStore):
    """Keys in the primary of a Redis Sentinel group, found and followed through redis-py's
    public Sentinel support (``redis.asyncio.sentinel``).

    Every new connection asks the Sentinels (in turn, each bounded by ``timeout``) which server is
    primary and connects there; a Sentinel that reports the primary down or a failover in
    progress counts as "no primary", so the add fails at once (:class:`ReplayStoreUnavailable`,
    then ``[cluster] on_store_error``) instead of writing somewhere else. A pooled connection to a
    server that has since been demoted gets ``READONLY`` on its first write; redis-py turns that
    into a connection error, the connection is dropped, and the one retry asks the Sentinels
    again. Nothing is ever sent to a server that the Sentinels call a replica.

    The mark is ``SET prefix+key 1 NX PX ms`` then ``WAIT wait_replicas wait_timeout_ms`` on the
    same connection (one pipeline, one round trip plus the replica's acknowledgement). Redis
    replicates asynchronously: without ``WAIT`` a mark made just before the primary dies may be
    missing on the replica the Sentinels promote, and the token would be accepted a second time.
    With ``WAIT`` the console is admitted after a replica holds the mark. If fewer replicas
    acknowledge within ``wait_timeout`` the console is still admitted (the mark is on the
    primary, which would have to fail within that moment for it to be lost), and
    ``on_unacknowledged`` is called (the ``replay_store_unacknowledged_total`` metric); one
    warning is logged when acknowledgements stop and one line when they resume.
    ``wait_replicas = 0`` sends no ``WAIT``.

    At most ``max_connections`` calls run at once (a semaphore; redis-py's Sentinel pool has no
    blocking variant), so a burst during an outage cannot open thousands of sockets.
    """

    def __init__(
        self,
        spec: StoreURL,
        *,
        timeout: float = 1.0,
        key_prefix: str = "consoleproxy:replay:",
        clock: Callable[[], float] = time.time,
        max_connections: int = 50,
        wait_replicas: int = 1,
        wait_timeout: float = 0.1,
        on_unacknowledged: Callable[[], object] = lambda: None,
    ) -> None:
        from redis.asyncio.retry import Retry
        from redis.asyncio.sentinel import Sentinel
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        if spec.kind != "sentinel":
            raise ValueError(f"not a Sentinel store URL: {spec.kind}")
        if wait_replicas < 0:
            raise ValueError(f"wait_replicas must be 0 or more, got {wait_replicas}")
        if wait_replicas and wait_timeout >= timeout:
            # WAIT's reply is read under the socket timeout: a longer WAIT would be a failure
            raise ValueError(f"wait_timeout ({wait_timeout:g} s) must be less than timeout ({timeout:g} s)")
        self.where = redact_url(spec.url)
        self.timeout = timeout
        self.key_prefix = key_prefix
        self._clock = clock
        self.service = spec.service
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self._on_unacknowledged = on_unacknowledged
        self.acknowledged = True
        self._slots = asyncio.Semaphore(max_connections)
        sockets: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        tls: dict[str, Any] = {"ssl": True, **dict(spec.tls_options)} if spec.tls else {}
        auth: dict[str, Any] = {"username": spec.username, "password": spec.password}
        sentinel_kwargs: dict[str, Any] = {**sockets, **tls, **(auth if spec.sentinel_auth else {})}
        self._sentinel = Sentinel(list(spec.sentinels), sentinel_kwargs=sentinel_kwargs)
        self._redis = self._sentinel.master_for(
            spec.service,
            db=spec.db,
            client_name="consoleproxy",  # shows in CLIENT LIST on the primary
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_error=[RedisConnectionError],
            **sockets,
            **tls,
            **auth,
        )

    async def _mark(self, key: str, ttl_ms: int) -> list[Any]:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ReadOnlyError

        try:
            return await self._mark_once(key, ttl_ms)
        except (ReadOnlyError, RedisConnectionError):
            # A demoted primary closes its clients (or answers READONLY). Newer redis-py retries a
            # pipeline on a fresh connection itself; 5.0.1, our lowest, does not: drop the pool's
            # connections, and the one retry asks the Sentinels for the primary again.
            await self._redis.connection_pool.disconnect()
            return await self._mark_once(key, ttl_ms)

    async def _mark_once(self, key: str, ttl_ms: int) -> list[Any]:
        async with self._slots, self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.key_prefix + key, b"1", nx=True, px=ttl_ms)
            if self.wait_replicas:
                # WAIT counts the replicas that acknowledged every write made on this connection
                # so far, so it must follow the SET on the same connection: one pipeline.
                pipe.wait(self.wait_replicas, max(1, math.ceil(self.wait_timeout * 1000)))
            return list(await pipe.execute())

    async def add(self, key: str, expires_at: float) -> bool:
        ttl_ms = max(1, math.ceil((expires_at - self._clock()) * 1000))
        replies = await self._do("SET", lambda: self._mark(key, ttl_ms), extra=self.wait_timeout)
        first = replies[0] is not None and replies[0] is not False
        if first and self.wait_replicas:
            acked = int(replies[1])
            if acked < self.wait_replicas:
                self._on_unacknowledged()
                if self.acknowledged:
                    self.acknowledged = False
                    log.warning(
                        "replay store %s: %d of %d replicas acknowledged a token mark within %g ms; "
                        "consoles are admitted, but a mark not on a replica is lost if the primary "
                        "fails now", self.where, acked, self.wait_replicas, self.wait_timeout * 1000,
                    )
            elif not self.acknowledged:
                self.acknowledged = True
                log.warning("replay store %s: replicas acknowledge token marks again", self.where)
        return first

    async def _ping(self) -> Any:
        async with self._slots:
            return await self._redis.ping()

    async def ping(self) -> bool:
        try:
            await self._do("PING", self._ping)
        except ReplayStoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._redis.aclose()
        # Sentinel.aclose() came after redis 5.0.1, our lowest: close its clients one by one.
        for client in self._sentinel.sentinels:
            await client.aclose()
