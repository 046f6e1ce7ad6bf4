"""X-Forwarded-For: believed only from configured balancers, read from the right."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import RFBClient, connect_echo, echo_backend, make_config, running_proxy, tcp_server

from consoleproxy.config import ConfigError, load_config, replace
from consoleproxy.protocol.forwarded import MAX_HOPS, BadForwardedFor, client_address, parse_networks

LB = parse_networks(["10.0.0.0/24", "2001:db8::/64"])


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("10.0.0.5", ["203.0.113.7"], "203.0.113.7"),
        # HAProxy appends: whatever the browser wrote on the left is ignored
        ("10.0.0.5", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),
        # two balancers in a row: skip the trusted hop
        ("10.0.0.5", ["203.0.113.7, 10.0.0.9"], "203.0.113.7"),
        ("10.0.0.5", ["203.0.113.7", "10.0.0.9"], "203.0.113.7"),  # repeated header lines
        ("10.0.0.5", ["[2001:db9::1]:5555"], "2001:db9::1"),
        ("10.0.0.5", ["203.0.113.7:4711"], "203.0.113.7"),
        ("10.0.0.5", ["2001:db9::1"], "2001:db9::1"),
        ("::ffff:10.0.0.5", ["203.0.113.7"], "203.0.113.7"),  # IPv4-mapped peer is still trusted
        ("2001:db8::2", ["203.0.113.7"], "203.0.113.7"),
        # not from a balancer: the header is the client's own claim and is ignored
        ("198.51.100.9", ["203.0.113.7"], "198.51.100.9"),
        ("10.0.0.5", [], "10.0.0.5"),
        # only balancers in the chain (a check from inside the tier)
        ("10.0.0.5", ["10.0.0.6"], "10.0.0.6"),
    ],
)
def test_client_address(peer: str, headers: list[str], expected: str) -> None:
    assert client_address(peer, headers, LB) == expected


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ("not-an-ip", "is not an address"),
        ("203.0.113.7,", "empty entry"),
        ("[2001:db8::1", "is not an address"),
        ("unknown", "is not an address"),
        (",".join(["203.0.113.7"] * (MAX_HOPS + 1)), "entries"),
    ],
)
def test_bad_header_from_balancer(header: str, needle: str) -> None:
    with pytest.raises(BadForwardedFor, match=needle) as info:
        client_address("10.0.0.5", [header], LB)
    assert info.value.close_code == 4004


def test_bad_header_from_elsewhere_is_ignored() -> None:
    assert client_address("198.51.100.9", ["garbage"], LB) == "198.51.100.9"


def test_forwarded_for_needs_trusted_proxies(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="forwarded_for needs trusted_proxies"):
        replace(load_config(env={}), listen={"forwarded_for": True})
    with pytest.raises(ConfigError, match="trusted_proxies"):
        make_config(tmp_path, listen={"trusted_proxies": ["10.0.0.0/33"]})


async def test_token_bound_to_client_behind_balancer(tmp_path: Path) -> None:
    """The proxy's peer is the balancer (127.0.0.1, trusted); the token binds the browser's address."""
    async with running_proxy(
        tmp_path, listen={"forwarded_for": True, "trusted_proxies": ["127.0.0.1/32"]}
    ) as p, tcp_server(echo_backend) as port:
        fwd = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
        async with RFBClient.connect(
            p.url(p.token(port=port, client_ip="203.0.113.7")), additional_headers=fwd
        ) as c:
            await connect_echo(c)
            sessions = list(p.server.registry)
            assert [s.client_ip for s in sessions] == ["203.0.113.7"]
        # bound to another address: refused, and no console opened
        code, reason = await _close_with_headers(p.url(p.token(port=port, client_ip="203.0.113.8")), fwd)
        assert code == 4004 and "address" in reason
        code, reason = await _close_with_headers(p.url(p.token(port=port)), {"X-Forwarded-For": "nonsense"})
        assert code == 4004 and "not an address" in reason


async def test_header_ignored_from_untrusted_peer(tmp_path: Path) -> None:
    async with running_proxy(
        tmp_path, listen={"forwarded_for": True, "trusted_proxies": ["10.9.9.9/32"]}
    ) as p, tcp_server(echo_backend) as port:
        # the browser claims to be 203.0.113.7; the proxy sees 127.0.0.1 and believes that
        code, _ = await _close_with_headers(
            p.url(p.token(port=port, client_ip="203.0.113.7")), {"X-Forwarded-For": "203.0.113.7"}
        )
        assert code == 4004
        async with RFBClient.connect(
            p.url(p.token(port=port, client_ip="127.0.0.1")),
            additional_headers={"X-Forwarded-For": "203.0.113.7"},
        ) as c:
            await connect_echo(c)


async def test_header_ignored_when_off(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, listen={"trusted_proxies": ["127.0.0.1/32"]}) as p, \
            tcp_server(echo_backend) as port:
        code, _ = await _close_with_headers(
            p.url(p.token(port=port, client_ip="203.0.113.7")), {"X-Forwarded-For": "203.0.113.7"}
        )
        assert code == 4004


async def _close_with_headers(url: str, headers: dict[str, str]) -> tuple[int | None, str]:
    async with RFBClient.connect(url, additional_headers=headers) as c:
        code = await c.close_code()
        return code, c.close_reason


async def test_balancer_is_not_rate_limited_as_one_source(tmp_path: Path) -> None:
    """Behind an HTTP balancer every browser arrives from its address: per-source limits skip it."""
    limits = {"connections_per_ip_per_second": 0.01, "connection_burst": 1, "max_handshakes_per_ip": 1}
    async with running_proxy(
        tmp_path, limits=limits, listen={"forwarded_for": True, "trusted_proxies": ["127.0.0.1/32"]}
    ) as p, tcp_server(echo_backend) as port:
        for n in range(4):
            headers = {"X-Forwarded-For": f"203.0.113.{n + 1}"}
            async with RFBClient.connect(p.url(p.token(port=port)), additional_headers=headers) as c:
                await connect_echo(c)
        assert not p.server.metrics.registry.get_sample_value(
            "consoleproxy_connections_refused_total", {"reason": "rate"}
        )
