"""A console's outcome (outcome.py): the result texts the proxy reports, and their metric labels.

The labels are a contract (DESIGN.md 9, dashboards query them): each row is a result text the
code produces today and the label ``sessions_total{result}`` must keep for it.
"""

from __future__ import annotations

import pytest

from consoleproxy import errors
from consoleproxy.policy.outcome import Outcome

LABELS = [
    ("client closed", "client_closed"),
    ("server closed", "server_closed"),
    ("idle for more than 600 s", "timeout"),
    ("console lifetime of 3600 s reached", "timeout"),
    (errors.SessionTimeout.reason, "timeout"),
    ("ended by an administrator", "killed"),
    ("replaced by a newer console for this VM", "killed"),
    ("replaced by its resumed connection", "killed"),
    (errors.TokenInvalid.reason, "token"),
    (errors.TokenExpired.reason, "token"),
    (errors.TokenAlreadyUsed.reason, "token"),
    (errors.Forbidden.reason, "forbidden"),
    (errors.SessionLimit.reason, "limit"),
    (errors.BackendUnreachable.reason, "unreachable"),
    (errors.BackendAuthFailed.reason, "authentication"),
    ("handshake timeout", "handshake"),
    ("protocol error", "error"),
    ("error", "error"),
    ("stopped", "error"),
    ("internal error", "error"),
    (errors.ResumeRefused.reason, "error"),
    (errors.ShuttingDown.reason, "error"),
    ("proxy shutting down (drain deadline)", "error"),
    ("", "error"),
]


@pytest.mark.parametrize(("result", "label"), LABELS)
def test_result_texts_keep_their_labels(result: str, label: str) -> None:
    assert Outcome.of(result).label == label


def test_every_outcome_has_a_distinct_label() -> None:
    labels = [o.label for o in Outcome]
    assert len(set(labels)) == len(labels) == 11
    assert {label for _, label in LABELS} == set(labels)
