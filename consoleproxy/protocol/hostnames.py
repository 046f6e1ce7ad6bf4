"""Mapping between wildcard host names ``a-b-c-d.<suffix>`` and IPv4 addresses (DESIGN.md 5).

Strict on purpose: exactly four decimal octets 0-255 without leading zeros, exactly one label in
front of the suffix, matched case-insensitively. Anything looser would let one certificate name
stand for several addresses, or let a crafted name reach an address the operator never meant.
"""

from __future__ import annotations

import ipaddress

from consoleproxy.errors import HostnameError

__all__ = ["HostnameError", "hostname_for_ip", "ip_for_hostname", "normalize_suffix"]


def normalize_suffix(suffix: str) -> str:
    """``*.Console.Example.com.`` -> ``console.example.com``; rejects empty or malformed suffixes."""
    s = suffix.strip().lower()
    if s.startswith("*."):
        s = s[2:]
    s = s.rstrip(".")
    if not s:
        raise HostnameError("domain suffix is empty")
    labels = s.split(".")
    for label in labels:
        if not label or len(label) > 63:
            raise HostnameError(f"domain suffix {suffix!r} has an empty or over-long label")
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in label):
            raise HostnameError(f"domain suffix {suffix!r} has a character outside [a-z0-9-]")
        if label.startswith("-") or label.endswith("-"):
            raise HostnameError(f"domain suffix {suffix!r} has a label starting or ending with '-'")
    if len(s) > 253 - len("255-255-255-255."):
        raise HostnameError(f"domain suffix {suffix!r} is too long")
    return s


def _octet(text: str) -> int:
    if not text or len(text) > 3 or not text.isascii() or not text.isdigit():
        raise HostnameError(f"{text!r} is not a decimal octet")
    if len(text) > 1 and text[0] == "0":
        raise HostnameError(f"octet {text!r} has a leading zero")
    value = int(text)
    if value > 255:
        raise HostnameError(f"octet {text!r} is above 255")
    return value


def hostname_for_ip(ip: str | ipaddress.IPv4Address, suffix: str) -> str:
    """``203.0.113.7`` + ``*.consoleproxy.company.com`` -> ``203-0-113-7.consoleproxy.company.com``."""
    try:
        addr = ipaddress.IPv4Address(str(ip))
    except ipaddress.AddressValueError as exc:
        raise HostnameError(f"{ip!r} is not an IPv4 address") from exc
    return f"{str(addr).replace('.', '-')}.{normalize_suffix(suffix)}"


def ip_for_hostname(name: str, suffix: str) -> ipaddress.IPv4Address:
    """``203-0-113-7.consoleproxy.company.com`` -> ``IPv4Address('203.0.113.7')``.

    Raises HostnameError when the name is not exactly one ``a-b-c-d`` label under ``suffix``.
    """
    zone = normalize_suffix(suffix)
    host = name.lower()
    if host.endswith("."):
        host = host[:-1]
    tail = "." + zone
    if not host.endswith(tail):
        raise HostnameError(f"{name!r} is not under {zone!r}")
    label = host[: -len(tail)]
    if "." in label:
        raise HostnameError(f"{name!r} has more than one label in front of {zone!r}")
    parts = label.split("-")
    if len(parts) != 4:
        raise HostnameError(f"{name!r}: expected four octets joined by '-'")
    return ipaddress.IPv4Address(".".join(str(_octet(p)) for p in parts))
