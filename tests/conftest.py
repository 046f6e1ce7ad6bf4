"""Shared test helpers.

``require_tool`` is how a test asks for a real system program: missing under CI=true is a failure
(CI must never silently skip); elsewhere the test is skipped with the command that installs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from redis_helpers import RedisServer, running_redis
from sentinel_helpers import SentinelGroup, running_group

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
    "test_relay_close.py", "test_relay_freed.py", "test_tlstransport.py",
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


def require_tool(cmd: str, package: str) -> str:
    path = shutil.which(cmd)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{cmd} is missing under CI=true (apt-get install {package}; see scripts/setup-*.sh)")
    pytest.skip(f"{cmd} not installed (not CI): apt-get install {package}")  # CI fails above
    raise AssertionError("unreachable")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on its own port (``.url``, ``.stop()``, ``.start()``), killed after."""
    binary = require_tool("redis-server", "redis-server")
    with running_redis(binary, tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def sentinel_group(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    """A primary, a replica and three Sentinels (tests/sentinel_helpers.py), healthy, killed after."""
    binary = require_tool("redis-server", "redis-server")
    async with running_group(binary, tmp_path / "sentinel-group") as group:
        yield group
