"""The unit run (``pytest -m "not integration"``, ``make unit``) starts no program.

conftest.py's ProgramGuard refuses process creation in any test without the integration marker;
these tests show that it does, on each way Python starts a process, and that the marker lets it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from conftest import PROGRAM_FIXTURES, PROGRAM_GUARD, ProgramStartRefused


def refused(call: object) -> str:
    """Run ``call`` expecting the guard's refusal; forget it so this test itself passes."""
    assert callable(call)
    with pytest.raises(ProgramStartRefused, match="not marked integration") as info:
        result = call()
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    assert PROGRAM_GUARD.refused, "the refusal was not recorded: the test would pass anyway"
    PROGRAM_GUARD.refused.clear()
    return str(info.value)


def test_unit_tests_cannot_start_programs() -> None:
    assert "test_unit_tests_cannot_start_programs" in refused(lambda: subprocess.run([sys.executable, "-V"]))
    refused(lambda: subprocess.check_output(["true"]))
    refused(lambda: asyncio.create_subprocess_exec(sys.executable, "-V"))
    refused(lambda: asyncio.create_subprocess_shell("true"))
    refused(lambda: os.system("true"))
    refused(lambda: os.posix_spawn(sys.executable, [sys.executable, "-V"], os.environ))


def test_a_swallowed_refusal_is_still_recorded() -> None:
    try:
        subprocess.run(["true"])
    except Exception:  # code under test that treats any failure as "not installed"
        pass
    assert PROGRAM_GUARD.refused
    PROGRAM_GUARD.refused.clear()  # the guard's hook would fail this test after the call


@pytest.mark.integration
def test_integration_tests_start_programs() -> None:
    out = subprocess.run([sys.executable, "-c", "print('ran')"], capture_output=True, text=True, timeout=30)
    assert out.stdout == "ran\n"


def test_conftest_program_fixtures_are_registered() -> None:
    assert {"redis_server", "sentinel_group"} <= PROGRAM_FIXTURES


def test_fixture_users_are_marked(request: pytest.FixtureRequest) -> None:
    users = [i for i in request.session.items if PROGRAM_FIXTURES & set(getattr(i, "fixturenames", ()))]
    assert all(i.get_closest_marker("integration") for i in users)
