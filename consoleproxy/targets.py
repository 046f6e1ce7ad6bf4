"""Which hypervisor addresses and ports a token may point at (DESIGN.md 4 ``[targets]``).

A token is only as trustworthy as its key; the allowlist bounds the damage of a leaked key or a
management-server bug to the hypervisor network. Loopback and link-local (169.254.169.254 is a
cloud's metadata service) are refused unless a listed network names them explicitly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .config import parse_port_range
from .errors import Forbidden

__all__ = ["TargetPolicy"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TargetPolicy:
    networks: tuple[IPNetwork, ...]
    ports: tuple[range, ...]

    @classmethod
    def from_config(cls, cidrs: Iterable[str], ports: str) -> TargetPolicy:
        return cls(
            tuple(ipaddress.ip_network(c, strict=False) for c in cidrs), parse_port_range(ports)
        )

    def check(self, address: str | IPAddress, port: int) -> IPAddress:
        """Return the address when allowed; raise Forbidden naming the rule otherwise."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise Forbidden(f"target {address!r} is not an IP address") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(port in r for r in self.ports):
            raise Forbidden(f"target port {port} is outside the allowed VNC ports")
        inside = [n for n in self.networks if ip.version == n.version and ip in n]
        if not inside:
            raise Forbidden(f"target {ip} is outside the allowed hypervisor networks")
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            # Only a network that is itself loopback/link-local (not 0.0.0.0/0) lets these through.
            if not any(n.is_loopback or n.is_link_local for n in inside):
                raise Forbidden(f"target {ip} is a loopback, link-local or special address")
        return ip
