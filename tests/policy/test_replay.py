"""MemoryReplayStore: first use, expiry purging at the exact boundary, and the full-store refusal."""

from __future__ import annotations

import pytest

from consoleproxy.errors import ConsoleError, ConsoleProxyError
from consoleproxy.policy.replay import MemoryReplayStore, ReplayStore, ReplayStoreFull


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_first_use_then_seen() -> None:
    store: ReplayStore = MemoryReplayStore(clock=Clock())
    assert await store.add("a", 2000) is True
    assert await store.add("a", 2000) is False
    assert await store.add("b", 2000) is True
    assert await store.ping() is True


async def test_key_remembered_until_and_at_expiry_then_purged() -> None:
    clock = Clock(1000)
    store = MemoryReplayStore(clock=clock)
    assert await store.add("a", 1100)
    clock.now = 1100  # the validator still accepts at exp + skew exactly: so must the store refuse
    assert await store.add("a", 1100) is False
    clock.now = 1100.001
    assert await store.add("a", 1200) is True  # forgotten once strictly past its expiry


async def test_expired_entries_are_purged_on_add() -> None:
    clock = Clock(1000)
    store = MemoryReplayStore(clock=clock)
    for i in range(100):
        assert await store.add(f"old{i}", 1000 + i)
    assert await store.add("late", 5000)
    assert len(store) == 101
    clock.now = 1049.5  # old0..old49 expired
    assert await store.add("new", 5000)
    assert len(store) == 52  # old50..old99, late, new
    assert await store.add("old50", 2000) is False  # unexpired ones are still remembered
    clock.now = 4000
    assert await store.add("x", 5000)
    assert len(store) == 3  # late, new, x


async def test_already_expired_key_is_not_stored() -> None:
    clock = Clock(1000)
    store = MemoryReplayStore(clock=clock)
    assert await store.add("a", 999)
    assert len(store) == 0


async def test_full_store_refuses_instead_of_forgetting() -> None:
    clock = Clock(1000)
    store = MemoryReplayStore(max_entries=2, clock=clock)
    assert await store.add("a", 1100)
    assert await store.add("b", 1200)
    with pytest.raises(ReplayStoreFull) as full:
        await store.add("c", 1300)
    assert isinstance(full.value, ConsoleProxyError)
    assert isinstance(full.value, ConsoleError) and full.value.close_code == 4008
    # nothing was evicted to make room: both tokens are still single use
    assert await store.add("a", 1100) is False
    assert await store.add("b", 1200) is False
    # once one expires there is room again
    clock.now = 1150
    assert await store.add("c", 1300) is True
    assert await store.add("b", 1200) is False


async def test_full_store_still_answers_seen_keys() -> None:
    store = MemoryReplayStore(max_entries=1, clock=Clock())
    assert await store.add("a", 2000)
    assert await store.add("a", 2000) is False  # a replay is reported as a replay, not "full"


async def test_close_clears() -> None:
    store = MemoryReplayStore(clock=Clock())
    await store.add("a", 2000)
    await store.close()
    assert len(store) == 0


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MemoryReplayStore(max_entries=0)
