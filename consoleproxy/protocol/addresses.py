"""IP addresses as the policy code compares them: an IPv4-mapped IPv6 address is its IPv4 address.

A dual-stack socket (listening on ``::``) reports an IPv4 peer as ``::ffff:a.b.c.d``; a token
bound to ``a.b.c.d``, a trusted balancer's network, a per-source limit and a target network must
all see the same address. Every such comparison goes through here. A scoped IPv6 address
(``fe80::1%eth0``) keeps its scope: it is part of which host it is. Pure code.
"""

from __future__ import annotations

import ipaddress

__all__ = ["IPAddress", "normalized_ip", "parse_ip", "same_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(address: str | IPAddress) -> IPAddress:
    """``address`` as an IP, an IPv4-mapped IPv6 address as IPv4; ``ValueError`` when it is not one."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalized_ip(address: str | IPAddress) -> IPAddress | None:
    """:func:`parse_ip`, or None when ``address`` is not an IP address."""
    try:
        return parse_ip(address)
    except ValueError:
        return None


def same_ip(a: str, b: str) -> bool:
    """Are ``a`` and ``b`` one address (``::ffff:192.0.2.1`` is ``192.0.2.1``)? False if either is
    not an address."""
    x, y = normalized_ip(a), normalized_ip(b)
    return x is not None and x == y
