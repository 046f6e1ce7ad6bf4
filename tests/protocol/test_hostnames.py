import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consoleproxy.protocol.hostnames import HostnameError, hostname_for_ip, ip_for_hostname, normalize_suffix

SUFFIX = "*.consoleproxy.company.com"


def test_examples() -> None:
    assert hostname_for_ip("203.0.113.7", SUFFIX) == "203-0-113-7.consoleproxy.company.com"
    assert ip_for_hostname("203-0-113-7.consoleproxy.company.com", SUFFIX) == ipaddress.IPv4Address(
        "203.0.113.7"
    )


def test_case_insensitive_and_trailing_dot() -> None:
    assert str(ip_for_hostname("10-1-2-3.CONSOLEPROXY.Company.COM.", SUFFIX)) == "10.1.2.3"


@pytest.mark.parametrize(
    "name",
    [
        "010-1-2-3.consoleproxy.company.com",  # leading zero
        "256-1-2-3.consoleproxy.company.com",  # above 255
        "1-2-3.consoleproxy.company.com",  # three octets
        "1-2-3-4-5.consoleproxy.company.com",  # five
        "a.1-2-3-4.consoleproxy.company.com",  # extra label
        "1-2-3-4.other.company.com",  # other zone
        "1-2-3-4.xconsoleproxy.company.com",  # suffix must be a whole label
        "1--2-3.consoleproxy.company.com",
        "+1-2-3-4.consoleproxy.company.com",
        "1-2-3-٣.consoleproxy.company.com",  # non-ASCII digit
        "consoleproxy.company.com",
        "",
    ],
)
def test_rejects(name: str) -> None:
    with pytest.raises(HostnameError):
        ip_for_hostname(name, SUFFIX)


@pytest.mark.parametrize("bad", ["", "*.", "a..b", "-a.b", "a_b.c", "*"])
def test_bad_suffix(bad: str) -> None:
    with pytest.raises(HostnameError):
        normalize_suffix(bad)


def test_hostname_for_non_ipv4() -> None:
    with pytest.raises(HostnameError):
        hostname_for_ip("::1", SUFFIX)


@given(st.ip_addresses(v=4))
def test_round_trip(ip: ipaddress.IPv4Address) -> None:
    assert ip_for_hostname(hostname_for_ip(ip, SUFFIX), SUFFIX) == ip


@given(st.text(max_size=60))
def test_anything_else_is_rejected_or_canonical(label: str) -> None:
    name = f"{label}.consoleproxy.company.com"
    try:
        ip = ip_for_hostname(name, SUFFIX)
    except HostnameError:
        return
    # Whatever is accepted must be exactly the canonical spelling of its address.
    assert hostname_for_ip(ip, SUFFIX) == name.lower().rstrip(".")
