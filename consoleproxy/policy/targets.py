"""Which hypervisor addresses and ports a token may point at (DESIGN.md 4 ``[targets]``).

A token is only as trustworthy as its key; the allowlist bounds the damage of a leaked key or a
management-server bug to the hypervisor network. Loopback and link-local (169.254.169.254 is a
cloud's metadata service) are refused unless a listed network names them explicitly, and so are
the proxy's own addresses (its other listeners: admin, DNS) unless listed as a single address.
A host name is resolved once, by the caller; the first resolved address that passes these rules
is the one connected to, so DNS rebinding (one answer for the check, another for the connect) has
nothing to work on. ``check`` itself takes addresses only.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from consoleproxy.config import parse_port_range
from consoleproxy.errors import Forbidden
from consoleproxy.protocol.addresses import IPAddress, parse_ip

__all__ = ["TargetPolicy", "check_hostname_syntax", "is_ip_address", "local_addresses"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TargetPolicy:
    networks: tuple[IPNetwork, ...]
    ports: tuple[range, ...]
    own: frozenset[IPAddress] = frozenset()  # this host's addresses (local_addresses())

    @classmethod
    def from_config(
        cls, cidrs: Iterable[str], ports: str, own: Iterable[IPAddress] = ()
    ) -> TargetPolicy:
        return cls(
            tuple(ipaddress.ip_network(c, strict=False) for c in cidrs),
            parse_port_range(ports),
            frozenset(own),
        )

    def check(self, address: str | IPAddress, port: int) -> IPAddress:
        """Return the address when allowed; raise Forbidden naming the rule otherwise."""
        try:
            ip = parse_ip(address)
        except ValueError:
            raise Forbidden(f"target {address!r} is not an IP address") from None
        if not any(port in r for r in self.ports):
            raise Forbidden(f"target port {port} is outside the allowed VNC ports")
        inside = [n for n in self.networks if ip.version == n.version and ip in n]
        if not inside:
            raise Forbidden(f"target {ip} is outside the allowed hypervisor networks")
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            # Only a network that is itself loopback/link-local (not 0.0.0.0/0) lets these through.
            if not any(n.is_loopback or n.is_link_local for n in inside):
                raise Forbidden(f"target {ip} is a loopback, link-local or special address")
        elif ip in self.own and not any(n.num_addresses == 1 for n in inside):
            raise Forbidden(f"target {ip} is one of this proxy's own addresses")
        return ip


    def check_resolved(self, host: str, addresses: Sequence[str], port: int) -> IPAddress:
        """The first of ``host``'s resolved ``addresses`` that ``check`` allows; Forbidden if none."""
        if not addresses:
            raise Forbidden(f"target {host!r} has no addresses")
        problems: list[str] = []
        for address in addresses:
            try:
                return self.check(address, port)
            except Forbidden as exc:
                problems.append(str(exc))
        raise Forbidden(f"target {host!r} resolves only to refused addresses: {problems[0]}")


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_hostname_syntax(host: str) -> None:
    """Letters, digits, hyphens and dots in DNS labels; anything else is refused before a lookup."""
    if not _HOSTNAME.match(host):
        raise Forbidden(f"target {host[:80]!r} is neither an IP address nor a valid host name")


_SIOCGIFADDR = 0x8915


def local_addresses() -> frozenset[IPAddress]:
    """This host's interface addresses (Linux: one IPv4 address per interface, all IPv6 ones).

    Best effort: what cannot be read is left out, so the check can only get weaker, never refuse
    a hypervisor wrongly.
    """
    found: set[IPAddress] = set()
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                req = struct.pack("256s", name.encode()[:15])
                found.add(ipaddress.IPv4Address(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24]))
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(bytes.fromhex(line.split()[0])))
    return frozenset(found)
