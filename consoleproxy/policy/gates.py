"""The accept layer's limits as pure code: counters, token buckets and the request-head scan.

``net/listener.py`` applies them to sockets (see its docstring for the limits and why); these take
values (source addresses, clock readings, bytes) and return decisions, and are tested without
sockets (tests/net/test_listener.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from consoleproxy.config import Limits
from consoleproxy.protocol.addresses import normalized_ip
from consoleproxy.protocol.forwarded import Networks, in_networks, parse_networks

__all__ = ["AcceptSettings", "HandshakeGate", "HeadScanner", "HeadTooLarge", "RateLimiter", "source_key"]


def source_key(address: str) -> str:
    """What a per-source limit counts: the IPv4 address, or the /64 of an IPv6 address.

    One IPv6 host usually holds a whole /64, so per-address counting would not bound it.
    """
    ip = normalized_ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class HandshakeGate:
    """Counts handshakes in progress, in total and per source; refuses over the caps.

    ``enter()`` takes a total slot, ``enter_source(key)`` a per-source one (separate because
    behind the PROXY protocol the source is only known after the header). Each successful enter
    is paired with one leave.
    """

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source  # 0 = no per-source cap
        self.in_progress = 0
        self._per: dict[str, int] = {}

    def enter(self) -> bool:
        if self.in_progress >= self.total:
            return False
        self.in_progress += 1
        return True

    def leave(self) -> None:
        self.in_progress -= 1

    def enter_source(self, key: str) -> bool:
        n = self._per.get(key, 0)
        if self.per_source and n >= self.per_source:
            return False
        self._per[key] = n + 1
        return True

    def leave_source(self, key: str) -> None:
        n = self._per[key] - 1
        if n:
            self._per[key] = n
        else:
            del self._per[key]  # the table holds only sources with a handshake open

    def count(self, key: str) -> int:
        return self._per.get(key, 0)


class RateLimiter:
    """A token bucket per source: ``rate`` new connections a second, bursts up to ``burst``.

    Memory: one entry per source seen recently; past ``max_sources`` entries, full buckets
    (sources idle long enough to have refilled) are dropped, then the least recent ones.
    ``rate == 0`` turns it off.
    """

    def __init__(self, rate: float, burst: int, max_sources: int = 65536) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time)

    def allow(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_sources:
            self._prune(now)
        return ok

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
        if len(self._buckets) > self.max_sources:
            keep = sorted(self._buckets.items(), key=lambda kv: kv[1][1])[-self.max_sources // 2 :]
            self._buckets = dict(keep)

    def __len__(self) -> int:
        return len(self._buckets)


class HeadTooLarge(Exception):
    """The first request head went past ``max_request_head_bytes`` without ending."""


class HeadScanner:
    """Finds the end (CRLF CRLF) of the first HTTP request head in a byte stream.

    ``feed(data)`` returns True once the head is complete (aiohttp's parser does the real
    parsing; this only decides when the handshake is over) and raises ``HeadTooLarge`` when
    ``limit`` bytes pass without the end. Keeps three bytes, whatever the chunking.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0
        self._tail = b""

    def feed(self, data: bytes) -> bool:
        joined = self._tail + data
        end = joined.find(b"\r\n\r\n")
        if end >= 0:
            size = self.seen - len(self._tail) + end + 4
            if size > self.limit:
                raise HeadTooLarge(f"request head of {size} bytes (at most {self.limit})")
            self.seen = size
            return True
        self.seen += len(data)
        if self.seen > self.limit:
            raise HeadTooLarge(f"request head longer than {self.limit} bytes")
        self._tail = joined[-3:]
        return False


@dataclass(frozen=True)
class AcceptSettings:
    """What a ``ConsoleSite`` enforces; built from ``[listen]`` and ``[limits]``."""

    max_concurrent_handshakes: int = 1000
    max_handshakes_per_ip: int = 100
    connections_per_ip_per_second: float = 20
    connection_burst: int = 100
    request_head_timeout_seconds: float = 10
    max_request_head_bytes: int = 32768
    proxy_protocol: bool = False
    trusted_proxies: Networks = ()

    @classmethod
    def from_config(cls, limits: Limits, proxy_protocol: bool, trusted: Iterable[str]) -> AcceptSettings:
        return cls(
            max_concurrent_handshakes=limits.max_concurrent_handshakes,
            max_handshakes_per_ip=limits.max_handshakes_per_ip,
            connections_per_ip_per_second=limits.connections_per_ip_per_second,
            connection_burst=limits.connection_burst,
            request_head_timeout_seconds=limits.request_head_timeout_seconds,
            max_request_head_bytes=limits.max_request_head_bytes,
            proxy_protocol=proxy_protocol,
            trusted_proxies=parse_networks(trusted),
        )

    def trusted(self, address: str) -> bool:
        return in_networks(address, self.trusted_proxies)
