"""A console's end in numbers and records: metrics, the audit log, CloudStack's removed list.

The audit record (logger ``consoleproxy.audit``, one JSON object a line) keeps the free-text
``result``; the metric ``sessions_total`` counts it by its ``Outcome`` (outcome.py). Both are a
contract (DESIGN.md 9).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from consoleproxy.metrics import Metrics
from consoleproxy.policy.outcome import Outcome
from consoleproxy.policy.sessions import Session

__all__ = ["MAX_REMOVED", "Bookkeeping"]

audit_log = logging.getLogger("consoleproxy.audit")

# Ended consoles kept for the next /cmd/getstatus (CloudStack's removedSessions), at most.
MAX_REMOVED = 10000


class Bookkeeping:
    """``audit_on``: read per record (``[log] audit`` follows a reload)."""

    def __init__(self, metrics: Metrics, audit_on: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.audit_on = audit_on
        # Sessions ended since the last /cmd/getstatus, reported once.
        self.removed_sessions: list[str] = []

    def ended(self, session: Session, result: str) -> Outcome:
        """Count an ended console (``result``: why it ended, as text) and write its record."""
        if session.closer is not None and len(self.removed_sessions) < MAX_REMOVED:
            self.removed_sessions.append(session.session_uuid or session.id)
        outcome = Outcome.of(result)
        m = self.metrics
        m.bytes_total.labels("up").inc(session.bytes_up)
        m.bytes_total.labels("down").inc(session.bytes_down)
        m.sessions_total.labels(outcome.label).inc()
        m.session_duration_seconds.observe(time.monotonic() - session.started_mono)
        self.audit("session_end", session, result=result)
        return outcome

    def audit(self, event: str, session: Session, **extra: Any) -> None:
        if not self.audit_on() or not audit_log.isEnabledFor(logging.INFO):
            return  # not built when it would not be written (~11 µs a console start or end)
        record = {"event": event, "time": round(time.time(), 3), **session.info(), **extra}
        audit_log.info(json.dumps(record, sort_keys=True))

    def take_removed(self) -> list[str]:
        """The ended sessions not reported yet; reported once."""
        removed, self.removed_sessions = self.removed_sessions, []
        return removed
