"""Named errors shared by every layer.

Each error that can end a console carries the WebSocket close code of DESIGN.md section 8, so the
asyncio glue maps an exception to a close frame without a table of its own. Messages are meant for
the user and the operator: they never contain a token, a password or a key.
"""

from __future__ import annotations


class ConsoleProxyError(Exception):
    """Base of every error this package raises on purpose."""


class ConsoleError(ConsoleProxyError):
    """An error that ends (or refuses) one console; ``close_code`` goes to the browser."""

    close_code: int = 4001
    reason: str = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.reason)


class TokenError(ConsoleError):
    """Base of token validation failures."""


class TokenInvalid(TokenError):
    """Malformed, unknown key, tampered or otherwise undecryptable token."""

    close_code = 4001
    reason = "token invalid"


class TokenExpired(TokenError):
    close_code = 4002
    reason = "token expired"


class TokenAlreadyUsed(TokenError):
    close_code = 4003
    reason = "token already used"


class Forbidden(ConsoleError):
    """Origin, client IP, target outside the allowed ranges, extra token mismatch."""

    close_code = 4004
    reason = "forbidden"


class SessionLimit(ConsoleError):
    close_code = 4008
    reason = "session limit reached"


class BackendUnreachable(ConsoleError):
    close_code = 4010
    reason = "hypervisor unreachable"


class BackendAuthFailed(ConsoleError):
    close_code = 4011
    reason = "authentication to the hypervisor's VNC server failed"


class SessionTimeout(ConsoleError):
    close_code = 4012
    reason = "idle timeout or lifetime reached"


class SessionKilled(ConsoleError):
    close_code = 4013
    reason = "ended by an administrator"


class ResumeRefused(ConsoleError):
    """A resume ticket was refused: invalid, used, expired, or not allowed from this address.

    The message names which (DESIGN 10); it never quotes the ticket.
    """

    close_code = 4005
    reason = "resume refused"


class ShuttingDown(ConsoleError):
    close_code = 1001
    reason = "proxy shutting down"


class ConfigError(ConsoleProxyError):
    """A configuration file, key or value is wrong; the CLI prints it on one line and exits 2."""


class HostnameError(ConsoleProxyError):
    """A host name is not of the strict ``a-b-c-d.<suffix>`` form."""
