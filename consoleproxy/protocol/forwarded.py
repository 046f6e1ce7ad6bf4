"""The browser's address behind a load balancer that terminates HTTP: ``X-Forwarded-For``.

Anyone can send ``X-Forwarded-For``, so it is believed only when the TCP peer is one of the
configured balancers (``[listen] trusted_proxies``). HAProxy's ``option forwardfor`` appends the
address it saw to whatever the browser sent, so the list is read from the right: trusted
balancers' own entries are skipped and the first other address is the client. Everything left of
it was written by the client and is ignored. Pure code: strings in, an address or a named error out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from consoleproxy.errors import Forbidden
from consoleproxy.protocol.addresses import normalized_ip

__all__ = ["BadForwardedFor", "Networks", "client_address", "in_networks", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = tuple[Network, ...]

# A balancer chain longer than this is a client stuffing the header, not a topology.
MAX_HOPS = 32


class BadForwardedFor(Forbidden):
    """A trusted balancer sent an X-Forwarded-For we cannot read; closing with 4004 beats guessing."""


def parse_networks(cidrs: Iterable[str]) -> Networks:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def in_networks(address: str, networks: Networks) -> bool:
    """Is ``address`` inside one of ``networks`` (e.g. the trusted balancers)?"""
    ip = normalized_ip(address)
    return ip is not None and any(ip in net for net in networks)


def _parse_entry(entry: str) -> str:
    """One list element: ``1.2.3.4``, ``2001:db8::1``, ``[2001:db8::1]:123`` or ``1.2.3.4:123``."""
    text = entry.strip()
    if text.startswith("["):
        host, sep, _ = text[1:].partition("]")
        if not sep:
            raise BadForwardedFor(f"X-Forwarded-For entry {entry[:60]!r} is not an address")
        text = host
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has two or more colons
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise BadForwardedFor(f"X-Forwarded-For entry {entry[:60]!r} is not an address") from None


def client_address(peer: str, headers: Sequence[str], trusted: Networks) -> str:
    """The client's address: ``peer`` unless ``peer`` is trusted and the header names another."""
    if not headers or not in_networks(peer, trusted):
        return peer
    entries = [e for h in headers for e in h.split(",")]
    if len(entries) > MAX_HOPS:
        raise BadForwardedFor(f"X-Forwarded-For has {len(entries)} entries (at most {MAX_HOPS})")
    for entry in reversed(entries):
        if not entry.strip():
            raise BadForwardedFor("X-Forwarded-For has an empty entry")
        addr = _parse_entry(entry)
        if not in_networks(addr, trusted):
            return addr
    # Every hop is a balancer: the request started inside the balancer tier (e.g. a health check).
    return _parse_entry(entries[0])
