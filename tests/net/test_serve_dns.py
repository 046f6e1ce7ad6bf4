"""The DNS responder runs inside `serve` when [dns] enabled, sharing the proxy's metrics."""

from __future__ import annotations

from pathlib import Path

import dns.asyncresolver
import pytest
from harness import running_proxy

from consoleproxy.errors import ConfigError


async def test_dns_inside_serve(tmp_path: Path) -> None:
    async with running_proxy(
        tmp_path, dns={"enabled": True, "listen": "127.0.0.1:0", "zone": "*.consoleproxy.company.com"}
    ) as p:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        assert p.server.dns is not None
        resolver.port = p.server.dns.port
        answer = await resolver.resolve("203-0-113-7.consoleproxy.company.com", "A", lifetime=5)
        assert [r.address for r in answer] == ["203.0.113.7"]
        assert 'consoleproxy_dns_queries_total{rcode="NOERROR"} 1.0' in p.server.metrics.render().decode()


async def test_bad_dns_settings_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[dns\]"):
        async with running_proxy(tmp_path, dns={"enabled": True, "listen": "127.0.0.1:0", "zone": "*."}):
            pass
