"""How a console ended, as a closed set of outcomes (policy, pure).

A console's end is reported twice: the audit log's ``session_end`` record keeps the free-text
``result`` (the close reason a relay or a refusal gave, e.g. ``"client closed"``,
``"token invalid"``, ``"idle for more than 600 s"``), and the metric
``consoleproxy_sessions_total{result}`` counts it under one of the few label values below
(DESIGN.md 9). Both are a contract: the label values are the enum's values and never change;
``Outcome.of`` is the one place that maps a result text to its outcome.
"""

from __future__ import annotations

import enum

__all__ = ["Outcome"]

# Words of a result text that name its outcome, tried in this order (the first found wins).
_BY_WORD = ("token", "forbidden", "limit", "unreachable", "authentication", "handshake")


class Outcome(enum.Enum):
    """A console's outcome; ``value`` is its ``sessions_total`` label."""

    CLIENT_CLOSED = "client_closed"  # the browser closed (or its connection was lost)
    SERVER_CLOSED = "server_closed"  # the VNC server closed
    TIMEOUT = "timeout"  # idle timeout or lifetime reached
    KILLED = "killed"  # an administrator ended it, or a newer console for its VM replaced it
    TOKEN = "token"  # noqa: S105 (a label, not a secret) refused: the token (invalid, expired, used)
    FORBIDDEN = "forbidden"  # refused: origin, client address, target
    LIMIT = "limit"  # refused: a session limit
    UNREACHABLE = "unreachable"  # the VNC server could not be reached
    AUTHENTICATION = "authentication"  # the VNC server refused our credentials
    HANDSHAKE = "handshake"  # the handshake took too long
    ERROR = "error"  # anything else: protocol errors, socket errors, shutdown, resume refused

    @property
    def label(self) -> str:
        return self.value

    @classmethod
    def of(cls, result: str) -> Outcome:
        """The outcome a free-text result names."""
        if result == "client closed":
            return cls.CLIENT_CLOSED
        if result == "server closed":
            return cls.SERVER_CLOSED
        if result.startswith("idle") or "lifetime" in result:
            return cls.TIMEOUT
        if "administrator" in result or "replaced" in result:
            return cls.KILLED
        for word in _BY_WORD:
            if word in result:
                return cls(word)
        return cls.ERROR
