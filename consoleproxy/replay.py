"""Replay stores: remember token ids (``jti``) so a token is accepted once (DESIGN.md section 7).

A store answers one question atomically: "is this the first time this key is seen?" Keys are kept
until their ``expires_at`` (the token's ``exp`` plus the clock skew allowance); after that the
token would be refused as expired anyway, so forgetting the key is safe.

Only :class:`MemoryReplayStore` exists today; it protects one proxy instance. Cluster-wide
single use needs a shared store behind the same :class:`ReplayStore` protocol, planned as:

* ``SqliteReplayStore`` -- ``INSERT OR IGNORE`` into a table keyed by ``key`` with an
  ``expires_at`` column, ``changes() == 1`` meaning first use; for several workers on one host.
* ``RedisReplayStore`` -- ``SET key 1 NX EXAT <expires_at>``, a reply of ``OK`` meaning first use;
  for several hosts. ``ping`` maps to ``PING`` so ``/readyz`` can report a lost store.

Either must keep the "never forget a live key" rule below: a store that cannot record a key must
refuse the token rather than admit it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Protocol

from .errors import SessionLimit

__all__ = ["MemoryReplayStore", "ReplayStore", "ReplayStoreFull"]


class ReplayStoreFull(SessionLimit):
    """The store holds ``max_entries`` unexpired keys and cannot record another.

    A :class:`~consoleproxy.errors.ConsoleProxyError` like every deliberate error; it derives from
    ``SessionLimit`` so the console path closes the WebSocket with 4008 instead of failing with an
    unmapped exception.
    """

    reason = "replay store full"


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
