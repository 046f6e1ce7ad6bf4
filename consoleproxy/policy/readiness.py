"""Readiness (``/readyz``) as a pure decision: the proxy's state as values in, a reason or None out.

The first reason that applies is the one reported (DESIGN.md 5): a draining proxy says "draining"
whatever else is wrong, so a balancer's operator sees why it stopped sending consoles. Not ready is
not refusing: consoles that still arrive are served.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReadinessState", "not_ready_reason"]


@dataclass(frozen=True)
class ReadinessState:
    draining: bool = False
    # The live certificate's problem, counted only when the public listener speaks TLS.
    tls: bool = False
    certificate_problem: str | None = None
    acme_problem: str | None = None  # certificate automation ([acme]) failing
    store_problem: str | None = None  # the shared replay store unreachable past its grace
    health_problem: str | None = None  # a failed check listed in [health] failures_to_unready
    sessions: int = 0
    at_capacity: bool = False  # the session registry refuses new consoles
    unready_at_sessions: int = 0  # [limits] unready_at_sessions; 0: off


def not_ready_reason(s: ReadinessState) -> str | None:
    if s.draining:
        return "draining"
    if s.tls and s.certificate_problem:
        return s.certificate_problem
    for problem in (s.acme_problem, s.store_problem, s.health_problem):
        if problem is not None:
            return problem
    if s.at_capacity or (s.unready_at_sessions and s.sessions >= s.unready_at_sessions):
        return "at capacity"
    return None
