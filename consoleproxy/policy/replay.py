"""Replay stores' interface: remember token ids (``jti``) so a token is accepted once (DESIGN.md section 7).

A store answers one question atomically: "is this the first time this key is seen?" Keys are kept
until their ``expires_at`` (the token's ``exp`` plus the clock skew allowance); after that the
token would be refused as expired anyway, so forgetting the key is safe.

This module holds what every store and every user of one shares: the :class:`ReplayStore`
protocol, its errors, the in-process :class:`MemoryReplayStore` and the failure policy
(:class:`GuardedReplayStore`). ``[cluster] replay_store`` picks the store
(:mod:`.replay_url` parses it, :func:`.replay_open.open_replay_store` opens it):

* ``memory`` -- :class:`MemoryReplayStore`, one process. Single use holds per instance only.
* ``sqlite:///FILE`` -- :class:`~.replay_sqlite.SqliteReplayStore`, one file shared by several
  processes on one machine (``serve --workers N``).
* ``redis://…``, ``redis+sentinel://…`` (and ``rediss``) -- :mod:`.replay_redis`, shared by
  several hosts.

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
import time
from collections.abc import Callable
from typing import Protocol

from consoleproxy.errors import SessionLimit

__all__ = [
    "GuardedReplayStore",
    "MemoryReplayStore",
    "ReplayStore",
    "ReplayStoreFull",
    "ReplayStoreUnavailable",
]

log = logging.getLogger("consoleproxy.replay")  # one logger for every replay store


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
