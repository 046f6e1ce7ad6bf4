"""Replay stores: remember token ids (``jti``) so a token is accepted once (DESIGN.md section 7).

A store answers one question atomically: "is this the first time this key is seen?" Keys are kept
until their ``expires_at`` (the token's ``exp`` plus the clock skew allowance); after that the
token would be refused as expired anyway, so forgetting the key is safe.

``[cluster] replay_store`` picks one (:func:`parse_store_url`, :func:`open_replay_store`):

* ``memory`` -- :class:`MemoryReplayStore`, one process. Single use holds per instance only.
* ``sqlite:///FILE`` -- :class:`SqliteReplayStore`, one file shared by several processes on one
  machine (``serve --workers N``). One upsert per token: a row whose ``expires_at`` has passed is
  replaced, ``changes() == 1`` means first use.
* ``redis://HOST:PORT/DB`` or ``rediss://…`` -- :class:`RedisReplayStore`, shared by several
  hosts: ``SET prefix+key 1 NX PX <ms>``, a reply of ``OK`` meaning first use; ``ping`` is ``PING``.
* ``redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`` or ``rediss+sentinel://…`` --
  :class:`SentinelReplayStore`: the same commands sent to whichever server the Sentinels name
  primary, followed by ``WAIT`` so a mark is on a replica before the console is admitted
  (docs/cluster.md, "Single use across a failover").

Every store keeps the "never forget a live key" rule: a store that cannot record a key raises
:class:`ReplayStoreFull` or :class:`ReplayStoreUnavailable` instead of answering "first use".
What happens then is decided in one place, :class:`GuardedReplayStore`, from ``[cluster]
on_store_error``: ``reject`` (default) refuses the console with 4008, ``accept`` lets it through
without the single-use check, counts it and logs one warning per outage.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from consoleproxy.errors import ConsoleProxyError, SessionLimit

__all__ = [
    "BadStoreURL",
    "GuardedReplayStore",
    "MemoryReplayStore",
    "RedisReplayStore",
    "ReplayStore",
    "ReplayStoreFull",
    "ReplayStoreUnavailable",
    "SentinelReplayStore",
    "SqliteReplayStore",
    "StoreURL",
    "open_replay_store",
    "parse_store_url",
    "redact_url",
]

log = logging.getLogger("consoleproxy.replay")

_T = TypeVar("_T")

class ReplayStoreFull(SessionLimit):
    """The store holds ``max_entries`` unexpired keys and cannot record another.

    A :class:`~consoleproxy.errors.ConsoleProxyError` like every deliberate error; it derives from
    ``SessionLimit`` so the console path closes the WebSocket with 4008 instead of failing with an
    unmapped exception.
    """

    reason = "replay store full"


class ReplayStoreUnavailable(SessionLimit):
    """A shared store (SQLite file, Redis) could not answer: down, timed out, locked, read-only.

    Close code 4008 ("session limit reached"): DESIGN.md section 8 has no code for "a service this
    proxy depends on is down", and of its codes 4008 is the one that means "refused for now, not
    because of your token; try again shortly" -- as for :class:`ReplayStoreFull`. 4003 would tell
    the user the link was used (it was not), 4001 that it is bad, 1001 that this proxy is going
    away. The reason text says which it is. Raised by the stores; :class:`GuardedReplayStore`
    passes it on under ``on_store_error = "reject"`` and swallows it under ``"accept"``.
    """

    reason = "replay store unavailable; try again shortly"

    def __init__(self, detail: str) -> None:
        # The browser sees only ``reason``; ``detail`` (a path, a host, an error) is for the log.
        super().__init__(None)
        self.detail = detail


class BadStoreURL(ConsoleProxyError, ValueError):
    """``[cluster] replay_store`` is not ``memory``, ``sqlite:///FILE``, ``redis[s]://HOST[:PORT][/DB]``
    or ``redis[s]+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]``."""


class ReplayStore(Protocol):
    """Records keys until they expire; ``add`` must be atomic across everyone sharing the store."""

    async def add(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at`` (Unix seconds); True on first use, False if seen."""
        ...

    async def ping(self) -> bool:
        """True when the store is reachable (always, for an in-process store)."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


class MemoryReplayStore:
    """In-process store: a dict of key -> expiry plus a min-heap of (expiry, key) for purging.

    A key is remembered while ``clock() <= expires_at``. Expired keys are dropped at the start of
    each :meth:`add`; each key is pushed and popped once, so purging is amortised O(log n) per add.

    When ``max_entries`` unexpired keys are held, :meth:`add` raises :class:`ReplayStoreFull`
    instead of evicting: dropping a live key would let that token be replayed, which is the one
    thing this store exists to prevent. Refusing new consoles until keys expire (at most the
    token TTL plus skew) fails closed. At 1,000,000 entries the store uses on the order of
    200 MB, far above what any realistic token rate with short TTLs reaches.
    """

    def __init__(self, *, max_entries: int = 1_000_000, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        heap = self._heap
        # Strictly past: the validator still accepts a token at now == exp + skew, so its key
        # must still be remembered at that instant.
        while heap and heap[0][0] < now:
            expires_at, key = heapq.heappop(heap)
            # A key is pushed once (re-adding a live key is refused), so this is its only entry;
            # the equality check guards against a stale entry all the same.
            if self._expiry.get(key) == expires_at:
                del self._expiry[key]

    async def add(self, key: str, expires_at: float) -> bool:
        now = self._clock()
        self._purge(now)
        if key in self._expiry:
            return False
        if expires_at < now:
            # Already past its expiry: the validator refuses such tokens before asking, and
            # storing the key would only be purged on the next call. Count it as first use.
            return True
        if len(self._expiry) >= self.max_entries:
            raise ReplayStoreFull(
                f"replay store holds {self.max_entries} unexpired token ids; refusing new tokens "
                "until some expire"
            )
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return True

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._expiry.clear()
        self._heap.clear()


# --- store URLs (pure) -----------------------------------------------------------------------


SENTINEL_PORT = 26379  # Redis Sentinel's registered port, for an address written without one
# Query options of a Sentinel URL. TLS ones (rediss+sentinel only) have redis-py's names and
# meanings and apply to the Sentinels and to the data servers alike; ``sentinel_auth=yes`` sends
# the URL's user and password to the Sentinels too (by default only to the data servers).
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_SENTINEL_OPTIONS = ("sentinel_auth",)
_YES_NO = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


@dataclass(frozen=True)
class StoreURL:
    """A parsed ``[cluster] replay_store``."""

    kind: Literal["memory", "sqlite", "redis", "sentinel"]
    path: str = ""  # sqlite: the file as written; relative = relative to the configuration file
    url: str = ""  # redis: the URL as written, for redis-py; sentinel: as written (for messages)
    # sentinel only:
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr that may be logged
    sentinel_auth: bool = False
    tls_options: tuple[tuple[str, str | bool], ...] = ()


def parse_store_url(text: str) -> StoreURL:
    """Check a store URL without touching the network or the disk; :class:`BadStoreURL` if wrong.

    SQLite follows SQLAlchemy's spelling: three slashes then a relative path, four for an
    absolute one (``sqlite:////var/lib/consoleproxy/replay.db``).
    """
    t = text.strip()
    if not t:
        raise BadStoreURL("empty")
    if t == "memory":
        return StoreURL("memory")
    scheme, sep, _ = t.partition(":")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        if not t.startswith("sqlite:///"):
            raise BadStoreURL("a SQLite URL has no host: sqlite:///relative.db or sqlite:////absolute.db")
        path = t[len("sqlite:///") :]
        if not path or path.endswith("/"):
            raise BadStoreURL("the SQLite URL names no file")
        if "?" in path or "#" in path:
            raise BadStoreURL("a SQLite URL takes no query or fragment")
        if path == ":memory:":
            raise BadStoreURL("an in-memory SQLite database is not shared; use memory")
        return StoreURL("sqlite", path=path)
    if sep and scheme in ("redis", "rediss"):
        parts = urlsplit(t)
        if not t[len(scheme) :].startswith("://"):
            raise BadStoreURL(f"write {scheme}://HOST[:PORT][/DB]")
        if not parts.hostname:
            raise BadStoreURL("the Redis URL names no host")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise BadStoreURL("the Redis port must be 1-65535")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise BadStoreURL(f"the Redis database must be a number, not {db[:20]!r}")
        if parts.fragment:
            raise BadStoreURL("a Redis URL takes no fragment")
        return StoreURL("redis", url=t)
    if sep and scheme in ("redis+sentinel", "rediss+sentinel"):
        return _parse_sentinel_url(t, scheme)
    raise BadStoreURL(f"unknown store {t.partition(':')[0][:20]!r}")


def _sentinel_address(entry: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (port 26379)."""
    item = entry.strip()
    bad_port = BadStoreURL(f"the Sentinel port must be 1-65535 (bad entry {item[:60]!r})")
    if item.startswith("["):
        host, close, rest = item[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise BadStoreURL(f"bad Sentinel address {item[:60]!r}")
        port_text = rest[1:] if rest else str(SENTINEL_PORT)
    else:
        host, colon, port_text = item.rpartition(":")
        if not colon:
            host, port_text = item, str(SENTINEL_PORT)
    if not host:
        raise BadStoreURL(f"a Sentinel address names no host (entry {item[:60]!r})")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad_port
    return host, int(port_text)


def _parse_sentinel_url(t: str, scheme: str) -> StoreURL:
    form = f"{scheme}://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
    if not t[len(scheme) :].startswith("://"):
        raise BadStoreURL(f"write {form}")
    rest = t[len(scheme) + 3 :]
    rest, hash_, _ = rest.partition("#")
    if hash_:
        raise BadStoreURL("a Sentinel URL takes no fragment")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not hosts.strip():
        raise BadStoreURL(f"the Sentinel URL names no Sentinel: write {form}")
    sentinels = tuple(_sentinel_address(h) for h in hosts.split(","))
    segments = path.rstrip("/").split("/") if path.strip("/") else []
    if not segments or not segments[0]:
        raise BadStoreURL(f"the Sentinel URL names no service: write {form}")
    service = unquote(segments[0])
    if len(segments) == 1 and service.isdigit():
        raise BadStoreURL(
            f"the Sentinel URL names no service ({service!r} looks like a database number): write {form}"
        )
    if len(segments) > 2:
        raise BadStoreURL(f"too many parts after the Sentinels: write {form}")
    if any(c.isspace() for c in service):
        raise BadStoreURL(f"the Sentinel service name has white space: {service[:40]!r}")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise BadStoreURL(f"the Redis database must be a number, not {segments[1][:20]!r}")
        db = int(segments[1])
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    tls = scheme == "rediss+sentinel"
    sentinel_auth = False
    tls_options: list[tuple[str, str | bool]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _SENTINEL_OPTIONS or name == "ssl_check_hostname":
            flag = _YES_NO.get(value.lower())
            if flag is None:
                raise BadStoreURL(f"option {name} takes yes or no, not {value[:20]!r}")
            if name == "sentinel_auth":
                sentinel_auth = flag
                continue
            tls_options.append((name, flag))
        elif name in _TLS_OPTIONS:
            if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
                raise BadStoreURL(
                    f"option ssl_cert_reqs takes none, optional or required, not {value[:20]!r}"
                )
            tls_options.append((name, value))
        else:
            raise BadStoreURL(
                f"unknown option {name[:30]!r} (known: {', '.join(_SENTINEL_OPTIONS + _TLS_OPTIONS)})"
            )
        if not tls:
            raise BadStoreURL(f"option {name} needs TLS: write rediss+sentinel://")
    return StoreURL(
        "sentinel", url=t, sentinels=sentinels, service=service, db=db, tls=tls,
        username=username, password=password, sentinel_auth=sentinel_auth, tls_options=tuple(tls_options),
    )


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "(unreadable URL)"


def open_replay_store(
    url: str,
    *,
    base_dir: Path | None = None,
    timeout: float = 1.0,
    key_prefix: str = "consoleproxy:replay:",
    clock: Callable[[], float] = time.time,
    wait_replicas: int = 1,
    wait_timeout: float = 0.1,
    on_unacknowledged: Callable[[], object] = lambda: None,
) -> ReplayStore:
    """The store ``url`` names (:func:`parse_store_url`); a relative SQLite path is under ``base_dir``.

    Raises :class:`BadStoreURL` for a wrong URL and :class:`ReplayStoreUnavailable` when a SQLite
    file cannot be opened. A Redis store connects on first use (a Redis that is down at start is
    an outage, handled like one later). ``wait_replicas``, ``wait_timeout`` and
    ``on_unacknowledged`` apply to a Sentinel store only (:class:`SentinelReplayStore`).
    """
    spec = parse_store_url(url)
    if spec.kind == "memory":
        return MemoryReplayStore(clock=clock)
    if spec.kind == "sqlite":
        path = Path(spec.path).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        return SqliteReplayStore(path, timeout=timeout, clock=clock)
    if spec.kind == "sentinel":
        return SentinelReplayStore(
            spec, timeout=timeout, key_prefix=key_prefix, clock=clock, wait_replicas=wait_replicas,
            wait_timeout=wait_timeout, on_unacknowledged=on_unacknowledged,
        )
    return RedisReplayStore(spec.url, timeout=timeout, key_prefix=key_prefix, clock=clock)


# --- SQLite ----------------------------------------------------------------------------------

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS replay (key TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS replay_expires_at ON replay (expires_at)",
)
# One statement, so one write transaction: atomic against every process using the file. A row
# still live (expires_at >= now) is left alone and changes() is 0 -- "seen"; a new key or an
# expired row is (re)written and changes() is 1 -- "first use".
_ADD = (
    "INSERT INTO replay (key, expires_at) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at WHERE replay.expires_at < ?"
)
_PURGE = "DELETE FROM replay WHERE key IN (SELECT key FROM replay WHERE expires_at < ? LIMIT ?)"


# How long opening the SQLite file may wait for another process's lock (SqliteReplayStore._open).
OPEN_TIMEOUT = 10.0


class SqliteReplayStore:
    """Keys in one SQLite file, shared by the processes of one machine (not over NFS).

    WAL journal, so readers never wait and writers wait at most ``timeout`` (SQLite's busy
    timeout) for each other; past that the add raises :class:`ReplayStoreUnavailable`.
    ``synchronous = NORMAL``: a committed key survives a crash of the process; after a power
    loss the last few may be lost, but so are the consoles they admitted.

    All database work runs on one dedicated thread with one connection: no locking in Python,
    and a slow disk cannot take the default executor's threads from the rest of the proxy.
    Expired rows are deleted at most every ``purge_interval`` seconds, ``purge_batch`` at a
    time so one purge never holds the write lock for long.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
        purge_interval: float = 60.0,
        purge_batch: int = 10_000,
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._clock = clock
        self.purge_interval = purge_interval
        self.purge_batch = purge_batch
        self._next_purge = 0.0
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="replay-sqlite"
        )
        self._conn: sqlite3.Connection | None = None
        # Opened here so a file that cannot be created fails at start, not at the first console.
        self._call(lambda conn: None)

    def _open(self) -> sqlite3.Connection:
        # Workers of one `serve --workers N` open the file at the same moment; the journal-mode
        # switch and the schema take the write lock, and on a loaded machine one worker can hold
        # it past the busy timeout (a worker then failed to start). Opening may wait longer than
        # one console's add: up to OPEN_TIMEOUT, retried while the file is locked.
        deadline = time.monotonic() + max(self.timeout, OPEN_TIMEOUT)
        while True:
            try:
                return self._open_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _open_once(self) -> sqlite3.Connection:
        # check_same_thread=False: opened by the constructor, then used only by the worker thread.
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            for stmt in _SCHEMA:
                conn.execute(stmt)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` with the connection (in the worker thread, or at construction)."""
        try:
            if self._conn is None:
                self._conn = self._open()
            return fn(self._conn)
        except sqlite3.Error as exc:
            conn, self._conn = self._conn, None
            if conn is not None:
                # Start clean next time: the file may have been moved or its disk remounted.
                conn.close()
            raise ReplayStoreUnavailable(f"sqlite {self.path}: {exc}") from None

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._executor is None:
            raise ReplayStoreUnavailable(f"sqlite {self.path}: store closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    async def add(self, key: str, expires_at: float) -> bool:
        now = self._clock()

        def op(conn: sqlite3.Connection) -> bool:
            first = conn.execute(_ADD, (key, expires_at, now)).rowcount == 1
            mono = time.monotonic()
            if mono >= self._next_purge:
                self._next_purge = mono + self.purge_interval
                try:
                    conn.execute(_PURGE, (now, self.purge_batch))
                except sqlite3.Error as exc:
                    # The key is recorded; a purge can wait for the next interval.
                    log.warning("replay store %s: purge failed: %s", self.path, exc)
            return first

        return await self._run(op)

    async def ping(self) -> bool:
        try:
            await self._run(lambda conn: conn.execute("SELECT 1 FROM replay LIMIT 1").fetchall())
        except ReplayStoreUnavailable:
            return False
        return True

    async def count(self) -> int:
        """Rows in the file, expired or not (for tests and diagnostics)."""
        return int(await self._run(lambda conn: conn.execute("SELECT count(*) FROM replay").fetchone()[0]))

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def shut() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        await asyncio.get_running_loop().run_in_executor(executor, shut)
        executor.shutdown(wait=False)


# --- Redis -----------------------------------------------------------------------------------


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


# --- the failure policy ----------------------------------------------------------------------


class GuardedReplayStore:
    """The store the validators use: applies ``[cluster] on_store_error`` in one place.

    * ``reject`` -- :class:`ReplayStoreUnavailable` reaches the console path (close code 4008),
      and :meth:`not_ready_reason` reports the outage so a balancer sends consoles elsewhere --
      once it has lasted ``grace`` seconds (``[cluster] store_grace_seconds``). A Sentinel
      failover leaves every instance without a primary for the same few seconds; taking them all
      out of the balancer for that would turn a short refusal of new consoles into "no backend".
    * ``accept`` -- the token is let through without the single-use check.

    Either way each failed add calls ``on_failure`` (the ``replay_store_errors_total`` metric),
    and one warning is logged when an outage starts and one line when it ends, not one per
    console. :meth:`refresh` pings a shared store at most every ``check_interval`` seconds
    (callers during a ping share it), so ``/readyz`` stays cheap; a successful or failed add
    counts as a check too. ``ReplayStoreFull`` is not an outage and passes through unchanged.
    """

    def __init__(
        self,
        store: ReplayStore,
        *,
        on_error: str = "reject",
        on_failure: Callable[[], object] = lambda: None,
        name: str = "",
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        grace: float = 0.0,
    ) -> None:
        if on_error not in ("reject", "accept"):
            raise ValueError(f"on_error must be 'reject' or 'accept', got {on_error!r}")
        self.store = store
        self.on_error = on_error
        self._on_failure = on_failure
        self.name = name or type(store).__name__
        self.shared = not isinstance(store, MemoryReplayStore)
        self.check_interval = check_interval
        self._clock = clock
        self.grace = grace
        self.reachable = True
        self.unreachable_since: float | None = None  # clock() at the first failure of this outage
        self._checked_at = -math.inf
        self._ping: asyncio.Future[bool] | None = None

    def _lost(self, detail: str) -> None:
        self._checked_at = self._clock()
        if self.reachable:
            self.reachable = False
            self.unreachable_since = self._checked_at
            then = (
                "new consoles are refused (4008) until it answers"
                if self.on_error == "reject"
                else "new consoles are admitted WITHOUT the single-use check until it answers"
            )
            log.warning("replay store unreachable (%s): %s; %s", self.name, detail, then)

    def _found(self) -> None:
        self._checked_at = self._clock()
        if not self.reachable:
            self.reachable = True
            self.unreachable_since = None
            log.warning("replay store reachable again (%s)", self.name)

    async def add(self, key: str, expires_at: float) -> bool:
        try:
            first = await self.store.add(key, expires_at)
        except ReplayStoreUnavailable as exc:
            self._on_failure()
            self._lost(exc.detail)
            if self.on_error == "reject":
                raise
            return True
        self._found()
        return first

    async def ping(self) -> bool:
        ok = await self.store.ping()
        if ok:
            self._found()
        else:
            self._lost("no answer to a health check")
        return ok

    async def refresh(self, wait: float | None = None) -> None:
        """Ping the store if its last answer is older than ``check_interval`` (shared stores only).

        ``wait``: return after at most this many seconds even if the ping has not answered; it
        goes on and updates the state when it does. ``/readyz`` passes a short bound: a ping to
        an unreachable store may take ``2 * store_timeout_seconds`` (a connect timeout, a
        retry), and a balancer whose check times out marks the instance down whatever the grace.
        """
        if not self.shared or self._clock() - self._checked_at < self.check_interval:
            return
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self.ping())
        # asyncio.wait never cancels what it waits for: a health check that gives up (or is
        # cancelled) leaves the ping running for the others.
        await asyncio.wait({self._ping}, timeout=wait)

    def not_ready_reason(self) -> str | None:
        """The outage, once it has lasted ``grace`` seconds (as of the last add or ping)."""
        since = self.unreachable_since
        if self.shared and self.on_error == "reject" and since is not None \
                and self._checked_at - since >= self.grace:
            return "replay store unreachable"
        return None

    async def close(self) -> None:
        if self._ping is not None and not self._ping.done():
            self._ping.cancel()
        await self.store.close()
