"""Shared test helpers.

``require_tool`` is how a test asks for a real system program: missing under CI=true is a failure
(CI must never silently skip); elsewhere the test is skipped with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from redis_helpers import RedisServer, running_redis

IN_CI = os.environ.get("CI") == "true"

# Hypothesis profiles: "bounded" (make test: each fuzzer's default or its own max_examples, no
# deadline on a shared 2-core machine) and "fuzz" (make fuzz: thousands of examples a test).
settings.register_profile("bounded", deadline=None)
settings.register_profile(
    "fuzz", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bounded"))


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
