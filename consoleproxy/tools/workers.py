"""``consoleproxy serve --workers N``: N processes on the same ports, for every core of one machine.

Python runs one core per process, so a 2-core console host needs two. Each worker is a normal
``serve`` process with ``--worker-index i``: it binds the public ports with SO_REUSEPORT (the
kernel spreads new connections over the workers), its admin API on ``[admin] port + i`` (each
worker's sessions and metrics stay addressable), and only worker 0 answers DNS.

Single use must hold across workers, so a ``memory`` replay store (one process only) is replaced
by a SQLite file shared by the workers of this supervisor. A ``redis://`` or ``sqlite://`` store
from the configuration is used as given.

The supervisor forwards SIGTERM (drain), SIGINT (stop) and SIGHUP (reload, consoleproxy/reload.py) to every
worker, restarts a worker that dies while serving, gives up when workers keep dying at start, and
exits 0 when every worker has drained and exited 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from consoleproxy.config import Config, replace

__all__ = ["MAX_WORKERS", "Supervisor", "worker_config"]

log = logging.getLogger("consoleproxy.workers")

MAX_WORKERS = 256
# A worker that dies sooner than this after starting is failing, not crashing once.
EARLY_EXIT_SECONDS = 10.0
MAX_EARLY_EXITS = 5


def worker_config(cfg: Config, index: int) -> Config:
    """What worker ``index`` runs with: its own admin port, DNS on worker 0 only."""
    admin_port = cfg.admin.port + index if cfg.admin.port else 0
    if admin_port > 65535:
        raise ValueError(f"[admin] port {cfg.admin.port} + worker {index} is past 65535")
    return replace(cfg, admin={"port": admin_port}, dns={"enabled": cfg.dns.enabled and index == 0})


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    exit_code: int | None = None


@dataclass
class Supervisor:
    config_path: str | None
    count: int
    cfg: Config
    loop: str = "auto"  # serve --loop, passed on to every worker
    python: str = sys.executable
    workers: list[_Worker] = field(default_factory=list)
    stopping: bool = False
    _early_exits: int = 0
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.cfg.cluster.replay_store == "memory":
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="consoleproxy-workers-")
            db = Path(self._tmp.name) / "replay.db"
            env["CONSOLEPROXY_CLUSTER_REPLAY_STORE"] = f"sqlite:///{db}"
        return env

    def _argv(self, index: int) -> list[str]:
        argv = [self.python, "-m", "consoleproxy", "serve", "--worker-index", str(index), "--loop", self.loop]
        if self.config_path is not None:
            argv += ["--config", self.config_path]
        return argv

    async def _spawn(self, w: _Worker) -> None:
        w.proc = await asyncio.create_subprocess_exec(*self._argv(w.index), env=self._env())
        w.started = time.monotonic()
        w.exit_code = None
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def signal_all(self, sig: signal.Signals) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(sig)

    async def _watch(self, w: _Worker) -> None:
        while True:
            assert w.proc is not None
            w.exit_code = await w.proc.wait()
            if self.stopping:
                return
            quick = time.monotonic() - w.started < EARLY_EXIT_SECONDS
            self._early_exits += quick
            if self._early_exits >= MAX_EARLY_EXITS:
                log.error("workers keep exiting at start (last: worker %d, code %d); stopping",
                          w.index, w.exit_code)
                self.signal_all(signal.SIGINT)
                return
            log.warning("worker %d exited with %d; starting it again", w.index, w.exit_code)
            await self._spawn(w)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.signal_all, sig)
        try:
            self.workers = [_Worker(i) for i in range(self.count)]
            for w in self.workers:
                await self._spawn(w)
            log.info("supervising %d workers", self.count)
            await asyncio.gather(*(self._watch(w) for w in self.workers))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self._tmp is not None:
                self._tmp.cleanup()
        # a worker killed by a signal reports -N; say 128+N as a shell would
        codes = [c if c >= 0 else 128 - c for c in (w.exit_code or 0 for w in self.workers)]
        if self._early_exits >= MAX_EARLY_EXITS:
            return max(1, *codes)
        return max(codes)
