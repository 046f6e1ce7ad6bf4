"""addresses: the one place an IPv4-mapped IPv6 address becomes its IPv4 address."""

from __future__ import annotations

import ipaddress

import pytest

from consoleproxy.protocol.addresses import normalized_ip, parse_ip, same_ip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("::ffff:192.0.2.1", ipaddress.IPv4Address("192.0.2.1")),
        ("::FFFF:c000:0201", ipaddress.IPv4Address("192.0.2.1")),  # the same, in hex
        ("::ffff:127.0.0.1", ipaddress.IPv4Address("127.0.0.1")),
        ("192.0.2.1", ipaddress.IPv4Address("192.0.2.1")),
        ("2001:db8::1", ipaddress.IPv6Address("2001:db8::1")),
        ("::1", ipaddress.IPv6Address("::1")),
        ("::192.0.2.1", ipaddress.IPv6Address("::c000:201")),  # IPv4-compatible, not mapped: stays v6
        ("64:ff9b::192.0.2.1", ipaddress.IPv6Address("64:ff9b::c000:201")),  # NAT64: stays v6
        ("fe80::1%eth0", ipaddress.IPv6Address("fe80::1%eth0")),
    ],
)
def test_parse_ip(text: str, expected: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert parse_ip(text) == expected
    assert type(parse_ip(text)) is type(expected)
    assert normalized_ip(text) == expected


def test_a_scoped_address_keeps_its_scope() -> None:
    ip = parse_ip("fe80::1%eth0")
    assert isinstance(ip, ipaddress.IPv6Address) and ip.scope_id == "eth0"
    assert not same_ip("fe80::1%eth0", "fe80::1")  # another link's fe80::1 is another host
    assert same_ip("fe80::1%eth0", "fe80::1%eth0")


def test_address_objects_pass_through() -> None:
    assert parse_ip(ipaddress.IPv6Address("::ffff:10.0.0.1")) == ipaddress.IPv4Address("10.0.0.1")
    assert parse_ip(ipaddress.IPv4Address("10.0.0.1")) == ipaddress.IPv4Address("10.0.0.1")


@pytest.mark.parametrize(
    "text",
    ["", " 192.0.2.1", "192.0.2.1 ", "192.0.2", "192.0.2.256", "::ffff:192.0.2.256", "[::1]", "::1:", "host",
     "192.0.2.1/32", "2001:db8::1/64", "1.2.3.4:80", "%eth0", "fe80::1%"],
)
def test_bad_input(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ip(text)
    assert normalized_ip(text) is None


def test_same_ip() -> None:
    assert same_ip("::ffff:192.0.2.1", "192.0.2.1")
    assert same_ip("192.0.2.1", "::ffff:192.0.2.1")
    assert same_ip("2001:db8::1", "2001:DB8:0::1")
    assert not same_ip("192.0.2.1", "192.0.2.2")
    assert not same_ip("::192.0.2.1", "192.0.2.1")
    assert not same_ip("bad", "bad")  # two unreadable addresses are not one address
    assert not same_ip("192.0.2.1", "")
