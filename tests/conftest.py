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
from redis_helpers import RedisServer, running_redis

IN_CI = os.environ.get("CI") == "true"


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
