"""The origin rule for a console's WebSocket (policy, pure): which pages may open consoles here.

Cross-site WebSocket hijacking (nova's CVE-2015-0259): a page elsewhere must not open a console
with a victim's token. A browser always sends ``Origin`` (RFC 6454 section 7, RFC 6455 section
4.1 item 8). It must name the host this console is served from (any port: CloudStack serves the
page and the WebSocket on different ports) or be listed in ``[origin] allowed``. No Origin means a
non-browser client, which still needs a token; ``[origin] allow_missing = false`` refuses it.

Only the request's own ``Host`` counts: ``X-Forwarded-Host`` is never read (anyone can send it),
and a balancer speaking the PROXY protocol passes the browser's Host through unchanged. Names are
compared as the browser sent them, lower-cased: an IDN host arrives as its A-label
(``xn--...``) in both Host and Origin, so no IDNA decoding is done here.

``check_origin`` takes the header values and returns None or raises ``Forbidden`` (close 4004).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from consoleproxy.errors import Forbidden

__all__ = ["OriginPolicy", "check_origin", "host_part", "normalize_origin"]


def normalize_origin(value: str) -> str:
    """An origin as compared: no surrounding spaces, lower case, no trailing slash."""
    return value.strip().lower().rstrip("/")


def host_part(netloc: str) -> str:
    """``host:port`` or ``[v6]:port`` (anything after a ``/`` ignored) -> the host, as given."""
    netloc = netloc.split("/", 1)[0]
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    # One colon: host:port. None: a bare host. More: a bare IPv6 literal without brackets.
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc


@dataclass(frozen=True)
class OriginPolicy:
    """``[origin]`` and whether the public listener speaks TLS."""

    allowed: frozenset[str] = frozenset()
    allow_missing: bool = True
    tls: bool = False

    @classmethod
    def of(cls, allowed: Iterable[str], *, allow_missing: bool, tls: bool) -> OriginPolicy:
        return cls(frozenset(normalize_origin(a) for a in allowed), allow_missing, tls)


def check_origin(origin: str | None, host: str | None, policy: OriginPolicy) -> None:
    """Accept, or raise ``Forbidden``: ``origin`` is the Origin header (None when absent),
    ``host`` the request's Host header (``host[:port]``)."""
    if origin is None:
        if policy.allow_missing:
            return
        raise Forbidden("a browser Origin header is required")
    value = normalize_origin(origin)
    if value in policy.allowed:
        return
    scheme, sep, rest = value.partition("://")
    own = host_part((host or "").lower())
    if sep and own and host_part(rest) == own:
        # Behind a balancer that terminates TLS the page is https even when we are not.
        if scheme == "https" or (scheme == "http" and not policy.tls):
            return
    raise Forbidden(f"origin {origin[:80]!r} may not open consoles here")
