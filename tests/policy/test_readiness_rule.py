"""Readiness as values (readiness.py): which reason /readyz reports, first one first.

tests/test_readiness.py checks the same rule through a running proxy's /readyz.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from consoleproxy.policy.readiness import ReadinessState, not_ready_reason

READY = ReadinessState(tls=True, sessions=3, unready_at_sessions=10)


def test_ready_when_nothing_is_wrong() -> None:
    assert not_ready_reason(READY) is None
    assert not_ready_reason(ReadinessState()) is None


def test_each_problem_alone() -> None:
    cases: dict[str, dict[str, Any]] = {
        "draining": {"draining": True},
        "certificate x: expired": {"certificate_problem": "certificate x: expired"},
        "acme failing": {"acme_problem": "acme failing"},
        "replay store unreachable": {"store_problem": "replay store unreachable"},
        "health check dns failed: x": {"health_problem": "health check dns failed: x"},
        "at capacity": {"at_capacity": True},
    }
    for reason, change in cases.items():
        assert not_ready_reason(dataclasses.replace(READY, **change)) == reason, change


def test_certificate_problem_counts_only_over_tls() -> None:
    plain = dataclasses.replace(READY, tls=False, certificate_problem="no usable certificate")
    assert not_ready_reason(plain) is None


def test_unready_at_sessions() -> None:
    assert not_ready_reason(dataclasses.replace(READY, sessions=9)) is None
    assert not_ready_reason(dataclasses.replace(READY, sessions=10)) == "at capacity"
    assert not_ready_reason(dataclasses.replace(READY, sessions=10**6, unready_at_sessions=0)) is None


def test_the_first_reason_wins() -> None:
    everything = ReadinessState(
        draining=True, tls=True, certificate_problem="cert", acme_problem="acme", store_problem="store",
        health_problem="health", sessions=5, at_capacity=True, unready_at_sessions=1,
    )
    order = ["draining", "cert", "acme", "store", "health", "at capacity"]
    fixes: list[dict[str, Any]] = [
        {"draining": False}, {"certificate_problem": None}, {"acme_problem": None},
        {"store_problem": None}, {"health_problem": None},
    ]
    state = everything
    for i, expected in enumerate(order):
        assert not_ready_reason(state) == expected
        if i < len(fixes):
            state = dataclasses.replace(state, **fixes[i])
    assert not_ready_reason(dataclasses.replace(state, at_capacity=False, unready_at_sessions=0)) is None
