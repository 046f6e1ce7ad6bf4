"""A real ``redis-server`` for tests: its own port, no persistence, stoppable and restartable.

Use the ``redis_server`` fixture from conftest.py, or ``running_redis(binary, directory)`` where a
fixture does not fit (several servers, a module-scoped one). ``stop()`` then ``start()`` brings
the same server back on the same port, empty (nothing is saved), as after a crash.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT = 10.0


def ephemeral_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def answers_ping(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Whether a just-started redis-server (or Sentinel) answers PING within START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if redis_ping(port):
            return True
        time.sleep(0.02)
    return False


def redis_ping(port: int, timeout: float = 0.5) -> bool:
    """True when something on 127.0.0.1:port answers ``PING`` with ``+PONG``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, binary: str, directory: Path, args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.directory = directory
        self.args = list(args)  # more redis-server options, e.g. ("--replicaof", "127.0.0.1", "6379")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        fresh = not self.port
        for _ in range(3 if fresh else 1):  # a new port may be taken between probe and bind
            if fresh:
                self.port = ephemeral_port()
            log = (self.directory / "redis.log").open("ab")
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            if answers_ping(self.proc, self.port):
                return
            self.stop()
        tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT:g} s:\n{tail}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop it (SIGTERM, or SIGKILL as a crash) and wait for the process to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextlib.contextmanager
def running_redis(binary: str, directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(binary, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
