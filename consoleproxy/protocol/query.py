"""Raw query-string parsing for console URLs.

CloudStack puts its base64 token into the URL without URL-encoding, so ``+``, ``/`` and ``=`` must
survive: standard form decoding would turn ``+`` into a space. We split the raw query on ``&`` and
only percent-decode (never ``+``-decode) a value that actually contains ``%``.
"""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["raw_query_param"]

MAX_QUERY = 16 * 1024


def raw_query_param(query_string: str, name: str) -> str | None:
    """The first value of ``name`` in ``query_string``, or None when absent."""
    if len(query_string) > MAX_QUERY:
        return None
    prefix = name + "="
    for part in query_string.split("&"):
        if part.startswith(prefix):
            value = part[len(prefix) :]
            return unquote(value, errors="strict") if "%" in value else value
        if part == name:
            return ""
    return None
