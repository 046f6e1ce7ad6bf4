"""Opening a replay store: the store ``[cluster] replay_store`` names, ready to use.

Its own module because it needs every store (:mod:`.replay` for memory, :mod:`.replay_sqlite`,
:mod:`.replay_redis`), while they all need :mod:`.replay`'s interface and errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from consoleproxy.policy.replay import MemoryReplayStore, ReplayStore
from consoleproxy.policy.replay_redis import RedisReplayStore, SentinelReplayStore
from consoleproxy.policy.replay_sqlite import SqliteReplayStore
from consoleproxy.policy.replay_url import parse_store_url

__all__ = ["open_replay_store"]


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
    """The store ``url`` names (:func:`~.replay_url.parse_store_url`); a relative SQLite path is
    under ``base_dir``.

    Raises :class:`~.replay_url.BadStoreURL` for a wrong URL and
    :class:`~.replay.ReplayStoreUnavailable` when a SQLite file cannot be opened. A Redis store
    connects on first use (a Redis that is down at start is an outage, handled like one later).
    ``wait_replicas``, ``wait_timeout`` and ``on_unacknowledged`` apply to a Sentinel store only
    (:class:`~.replay_redis.SentinelReplayStore`).
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
