"""A host name in a token: resolved once, every candidate checked, the checked address connected to."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from harness import RFBClient, connect_echo, echo_backend, expect_close, running_proxy, tcp_server

from consoleproxy.errors import Forbidden
from consoleproxy.policy.targets import TargetPolicy, check_hostname_syntax

POLICY = TargetPolicy.from_config(["10.0.0.0/8"], "5900-6999")


def test_first_allowed_address_wins() -> None:
    assert str(POLICY.check_resolved("hv1", ["169.254.169.254", "10.1.2.3"], 5900)) == "10.1.2.3"
    assert str(POLICY.check_resolved("hv1", ["10.1.2.3", "10.1.2.4"], 5900)) == "10.1.2.3"


@pytest.mark.parametrize(
    ("addresses", "needle"),
    [
        (["127.0.0.1"], "resolves only to refused addresses: target 127.0.0.1 is outside"),
        (["169.254.169.254", "192.168.1.1"], "resolves only to refused addresses"),
        ([], "has no addresses"),
    ],
)
def test_no_allowed_address(addresses: list[str], needle: str) -> None:
    with pytest.raises(Forbidden, match=needle):
        POLICY.check_resolved("hv1", addresses, 5900)


@pytest.mark.parametrize("host", ["hv1.example", "hv-1", "a" * 63 + ".example", "hv1.example."])
def test_hostname_syntax_ok(host: str) -> None:
    check_hostname_syntax(host)


@pytest.mark.parametrize(
    "host",
    ["-hv", "hv_1", "hv 1", "hv1..example", "a" * 64, "hv1;rm", "hv1/x", "\uff48\uff56\uff11", "hv1:5900"],
)
def test_hostname_syntax_refused(host: str) -> None:
    with pytest.raises(Forbidden, match="neither an IP address nor a valid host name"):
        check_hostname_syntax(host)


async def test_name_resolved_and_connected(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, tcp_server(echo_backend) as port:
        async with RFBClient.connect(p.url(p.token(host="localhost", port=port))) as c:
            await connect_echo(c)
            assert [s.host for s in p.server.registry] == ["127.0.0.1"]  # the checked address


async def test_name_outside_the_allowlist_never_connected(tmp_path: Path) -> None:
    connections = 0

    async def count(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1

    async with running_proxy(tmp_path, targets={"allowed_cidrs": ["10.0.0.0/8"]}) as p, \
            tcp_server(count) as port:
        code, reason = await expect_close(p.url(p.token(host="localhost", port=port)))
        assert code == 4004 and "resolves only to refused addresses" in reason
        assert connections == 0


async def test_unresolvable_and_malformed_names(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p:
        code, reason = await expect_close(p.url(p.token(host="no-such-host.invalid", port=5901)))
        assert code == 4010 and "cannot resolve no-such-host.invalid" in reason
        code, reason = await expect_close(p.url(p.token(host="hv_1;x", port=5901)))
        assert code == 4004 and "nor a valid host name" in reason
