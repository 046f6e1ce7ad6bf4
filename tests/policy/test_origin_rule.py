"""The origin rule (origin.py) as values: header strings in, accept or Forbidden (4004) out.

tests/test_origin.py drives the same rule through a running proxy and a real browser.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from consoleproxy.errors import Forbidden
from consoleproxy.net.console import Consoles
from consoleproxy.policy.origin import OriginPolicy, check_origin, host_part, normalize_origin

PLAIN = OriginPolicy.of([], allow_missing=True, tls=False)
TLS = OriginPolicy.of([], allow_missing=True, tls=True)
LISTED = OriginPolicy.of(
    ["https://Portal.Example.com/", " http://mold.example:8080 "], allow_missing=True, tls=True
)


def ok(origin: str | None, host: str | None, policy: OriginPolicy = PLAIN) -> bool:
    try:
        check_origin(origin, host, policy)
    except Forbidden as exc:
        assert exc.close_code == 4004
        return False
    return True


def test_missing_origin_follows_allow_missing() -> None:
    assert ok(None, "127.0.0.1:6060")
    with pytest.raises(Forbidden, match="Origin header is required"):
        check_origin(None, "127.0.0.1:6060", OriginPolicy.of([], allow_missing=False, tls=False))


def test_null_and_empty_origins_are_refused() -> None:
    # "null": a sandboxed frame or a file: page (RFC 6454 7.3); never the console's own page.
    for origin in ("null", "", " ", "/", "http://", "127.0.0.1:6060"):
        assert not ok(origin, "127.0.0.1:6060"), origin


def test_own_host_on_any_port() -> None:
    assert ok("http://127.0.0.1:6060", "127.0.0.1:6060")
    assert ok("http://127.0.0.1:8080", "127.0.0.1:6060")  # CloudStack: page and WebSocket on other ports
    assert ok("http://127.0.0.1", "127.0.0.1:6060")
    assert ok("http://127.0.0.1:6060", "127.0.0.1")
    assert ok(" HTTP://127.0.0.1:6060/ ", "127.0.0.1:6060")


def test_other_hosts_are_refused() -> None:
    for origin in (
        "https://evil.example",
        "http://127.0.0.2",
        "https://127.0.0.1.evil.example",  # our name as a prefix
        "https://evil.example/127.0.0.1",  # in the path
        "https://127.0.0.1@evil.example",  # as userinfo
        "https://evil.127.0.0.1",
        "ftp://127.0.0.1",
        "ws://127.0.0.1",
    ):
        assert not ok(origin, "127.0.0.1:6060"), origin


def test_scheme_over_tls() -> None:
    # Behind a balancer that terminates TLS the page is https while we listen plain.
    assert ok("https://console.example", "console.example")
    assert ok("https://console.example:8443", "console.example:443", TLS)
    assert not ok("http://console.example:8443", "console.example:443", TLS)


def test_host_names_compare_without_case() -> None:
    assert ok("https://Console.Example.COM", "CONSOLE.example.com:443", TLS)


def test_idn_hosts_compare_as_a_labels() -> None:
    # Browsers send both headers with the A-label (punycode) form of 콘솔.한국.
    host = "xn--ok0bl4r.xn--3e0b707e:443"
    assert ok("https://XN--OK0BL4R.xn--3e0b707e", host, TLS)
    assert not ok("https://콘솔.한국", host, TLS)  # no IDNA decoding: not what a browser sends


def test_ipv6_literals() -> None:
    assert ok("http://[::1]:8080", "[::1]:6060")
    assert ok("http://[::1]", "[::1]")
    assert ok("http://[2001:DB8::1]:1", "[2001:db8::1]:6060")
    assert not ok("http://[::2]:8080", "[::1]:6060")
    assert host_part("[::1]:6060") == "::1" and host_part("::1") == "::1"


def test_a_b_c_d_wildcard_names() -> None:
    # Each VM's console has its own name under the wildcard: another VM's name is another host.
    host = "10-1-2-3.consoleproxy.company.com"
    assert ok("https://10-1-2-3.consoleproxy.company.com", host, TLS)
    assert ok("https://10-1-2-3.consoleproxy.company.com:8443", host + ":443", TLS)
    assert not ok("https://10-1-2-4.consoleproxy.company.com", host, TLS)
    assert not ok("https://consoleproxy.company.com", host, TLS)
    assert not ok("https://x.10-1-2-3.consoleproxy.company.com", host, TLS)


def test_listed_origins_exactly() -> None:
    assert ok("https://portal.example.com", "proxy.example", LISTED)
    assert ok("HTTPS://PORTAL.EXAMPLE.COM/", "proxy.example", LISTED)
    assert ok("http://mold.example:8080", "proxy.example", LISTED)  # listed: http over TLS too
    assert not ok("http://mold.example", "proxy.example", LISTED)  # the port is part of an origin
    assert not ok("http://portal.example.com", "proxy.example", LISTED)
    assert not ok("https://portal.example.com.evil", "proxy.example", LISTED)
    assert normalize_origin(" https://Portal.Example.com/ ") == "https://portal.example.com"


def test_no_host_header_matches_nothing() -> None:
    assert not ok("http://", None)
    assert not ok("http://x", "")


def test_refusal_names_the_origin_briefly() -> None:
    with pytest.raises(Forbidden) as exc:
        check_origin("https://" + "e" * 200, "127.0.0.1", PLAIN)
    assert "may not open consoles here" in str(exc.value) and len(str(exc.value)) < 130


def _check(headers: dict[str, str]) -> bool:
    """The pipeline's origin check (Consoles._check_origin) on a real aiohttp request (no
    socket): it reads Host only."""
    request = make_mocked_request("GET", "/websockify", headers=headers)
    holder: Any = SimpleNamespace(server=SimpleNamespace(origin_policy=PLAIN))
    try:
        Consoles._check_origin(holder, request)
    except Forbidden:
        return False
    return True


def test_the_server_reads_host_not_forwarded_host() -> None:
    assert _check({"Host": "console.example:6060", "Origin": "http://console.example:8080"})
    # X-Forwarded-Host is anyone's to send: it never makes an origin ours.
    assert not _check({"Host": "console.example", "X-Forwarded-Host": "evil.example",
                       "Origin": "https://evil.example"})
    assert _check({"Host": "console.example", "X-Forwarded-Host": "evil.example",
                   "Origin": "https://console.example"})


def test_edge_forms_as_the_rule_reads_them() -> None:
    # A trailing dot is another spelling to this rule: refused (browsers drop it from Origin).
    assert not ok("https://console.example", "console.example.", TLS)
    # A path never comes from a browser; the host part before it is what counts.
    assert ok("https://console.example/x", "console.example", TLS)
    # Bytes that are not UTF-8 reach us as surrogate escapes (aiohttp): never our host.
    raw = b"https://console.ex\xe4mple".decode("utf-8", "surrogateescape")
    assert not ok(raw, "console.example", TLS)
    # Over a plain port, an https page on our host is the balancer terminating TLS.
    assert ok("https://console.example:443", "console.example:6060")


def test_forwarded_headers_change_nothing() -> None:
    for name, value in (("X-Forwarded-Proto", "https"), ("Forwarded", "host=evil.example;proto=https"),
                        ("X-Forwarded-For", "203.0.113.7")):
        assert not _check({"Host": "console.example", name: value, "Origin": "https://evil.example"})
        assert _check({"Host": "console.example", name: value, "Origin": "http://console.example"})
