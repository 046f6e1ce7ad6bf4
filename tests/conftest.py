"""Shared test helpers.

``require_tool`` is how a test asks for a real system program: missing under CI=true is a failure
(CI must never silently skip); elsewhere the test is skipped with the command that installs it.

A test that starts a program (a real server, a browser, a ``consoleproxy serve`` subprocess, a
shell script) carries ``@pytest.mark.integration``, so ``pytest -m "not integration"`` (``make
unit``) is a fast run of pure code. Nobody has to remember it: tests using a fixture of
``PROGRAM_FIXTURES`` are marked here, and every other test runs with process creation refused
(``ProgramGuard``), so a forgotten marker fails the test naming it, whether or not the program is
installed on this machine.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings
from redis_helpers import RedisServer, running_redis
from sentinel_helpers import SentinelGroup, running_group

# tests/ mirrors the package's folders (protocol/, policy/, tls/, net/, web/, tools/, recordings/,
# and install/ for what operators install); test modules share fixtures and helpers by importing one
# another by name (``from test_page import …``), so every folder is importable as tests/ is.
_TESTS = Path(__file__).resolve().parent
for _folder in sorted(p for p in _TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))


IN_CI = os.environ.get("CI") == "true"

# Hypothesis profiles: "bounded" (make test: each fuzzer's default or its own max_examples, no
# deadline on a shared 2-core machine) and "fuzz" (make fuzz: thousands of examples a test).
settings.register_profile("bounded", deadline=None)
settings.register_profile(
    "fuzz", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bounded"))


# The relay and the accept layer run on whichever event loop `serve --loop` picks (uvloop when it is
# installed, the default): these modules' tests run once on each, in the same process.
BOTH_LOOPS = frozenset({
    "test_console_path.py", "test_tls_proxy.py", "test_upstream.py", "test_socket_writes.py",
    "test_drain.py", "test_listener.py", "test_relay_turns.py", "test_relay_memory.py",
    "test_relay_close.py", "test_relay_freed.py", "test_vncconn.py", "test_tlstransport.py",
    "test_vencrypt.py",
})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if item.path.name not in BOTH_LOOPS:
        return loops
    try:
        import uvloop
    except ImportError:
        if IN_CI:
            raise pytest.UsageError("uvloop is missing under CI=true (pip install -e '.[test]')") from None
        return loops
    return loops | {"uvloop": uvloop.new_event_loop}


# Fixtures that start a program: a test using one (directly or through another fixture) is marked.
# A test module's own such fixture registers itself with @starts_program under @pytest.fixture.
PROGRAM_FIXTURES: set[str] = set()

F = TypeVar("F", bound=Callable[..., object])


def starts_program(fixture: F) -> F:
    PROGRAM_FIXTURES.add(fixture.__name__)
    return fixture


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so the marks added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if PROGRAM_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


class ProgramStartRefused(RuntimeError):
    """A test without the integration marker tried to start a program."""


class ProgramGuard:
    """Refuses process creation while a test without the integration marker runs.

    Wrapped for the whole session where Python starts processes: ``subprocess.Popen`` (``run``,
    ``check_output``, the default event loop's subprocesses), ``asyncio.create_subprocess_exec``
    and ``_shell`` (uvloop spawns on its own), ``os.posix_spawn``/``system``/``fork``/``exec*``.
    A wrapper passes the call through unless the test running (any phase: setup with fixtures of
    any scope, call, teardown) lacks the marker; then it raises, and whatever the code under test
    does with that exception, the test fails afterwards.
    """

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.refused: list[str] = []

    def check(self, what: str, args: tuple[object, ...]) -> None:
        item = self.item
        if item is None or item.get_closest_marker("integration") is not None:
            return
        message = f"{item.nodeid} starts a program ({what} {args[:1]!r:.80}) but is not marked integration"
        self.refused.append(message)
        raise ProgramStartRefused(message)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        def wrap(owner: object, name: str, label: str) -> None:
            original = getattr(owner, name)
            check = self.check
            if inspect.iscoroutinefunction(original):
                async def guarded_async(*a: object, **k: object) -> object:
                    check(label, a)
                    return await original(*a, **k)
                mp.setattr(owner, name, guarded_async)
            else:
                def guarded_call(*a: object, **k: object) -> object:
                    check(label, a[1:] if name == "__init__" else a)
                    return original(*a, **k)
                mp.setattr(owner, name, guarded_call)

        wrap(subprocess.Popen, "__init__", "subprocess.Popen")
        for owner in (asyncio, asyncio.subprocess):
            wrap(owner, "create_subprocess_exec", "asyncio.create_subprocess_exec")
            wrap(owner, "create_subprocess_shell", "asyncio.create_subprocess_shell")
        for name in ("posix_spawn", "posix_spawnp", "system", "fork", "execv", "execve"):
            wrap(os, name, f"os.{name}")


PROGRAM_GUARD = ProgramGuard()
GUARD_PATCHES = pytest.MonkeyPatch()


def pytest_sessionstart(session: pytest.Session) -> None:
    PROGRAM_GUARD.install(GUARD_PATCHES)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    GUARD_PATCHES.undo()


def guarded(item: pytest.Item) -> Generator[None, object, object]:
    """One phase of ``item`` with the guard watching; a refused start fails the phase."""
    PROGRAM_GUARD.item = item
    PROGRAM_GUARD.refused.clear()
    try:
        result = yield
    finally:
        PROGRAM_GUARD.item = None
    if PROGRAM_GUARD.refused:
        refused, PROGRAM_GUARD.refused = PROGRAM_GUARD.refused, []
        pytest.fail("\n".join(refused), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    return (yield from guarded(item))


def require_tool(cmd: str, package: str) -> str:
    item = PROGRAM_GUARD.item
    if item is not None and item.get_closest_marker("integration") is None:
        pytest.fail(f"{item.nodeid} needs {cmd} but is not marked @pytest.mark.integration", pytrace=False)
    path = shutil.which(cmd)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{cmd} is missing under CI=true (apt-get install {package}; see scripts/setup-*.sh)")
    pytest.skip(f"{cmd} not installed (not CI): apt-get install {package}")  # CI fails above
    raise AssertionError("unreachable")


@pytest.fixture
@starts_program
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on its own port (``.url``, ``.stop()``, ``.start()``), killed after."""
    binary = require_tool("redis-server", "redis-server")
    with running_redis(binary, tmp_path / "redis") as server:
        yield server


@pytest.fixture
@starts_program
async def sentinel_group(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    """A primary, a replica and three Sentinels (tests/sentinel_helpers.py), healthy, killed after."""
    binary = require_tool("redis-server", "redis-server")
    async with running_group(binary, tmp_path / "sentinel-group") as group:
        yield group
