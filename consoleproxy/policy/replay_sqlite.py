"""The SQLite replay store: token ids in one file shared by the processes of one machine.

``sqlite:///FILE`` (``serve --workers N``). One upsert per token: a row whose ``expires_at`` has
passed is replaced, ``changes() == 1`` means first use.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from consoleproxy.policy.replay import ReplayStoreUnavailable

__all__ = ["SqliteReplayStore"]

log = logging.getLogger("consoleproxy.replay")  # one logger for every replay store

_T = TypeVar("_T")

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
