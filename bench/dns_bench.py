"""Load test of the DNS responder: a bounded number of UDP queries over loopback.

The server runs in a child process (``--serve``) so the client and the server do not share one
event loop and one GIL; the number is then the responder's own throughput, not half of it. The
client keeps ``--window`` queries in flight, counts answers and losses (no answer within
``--timeout``), stops by itself and writes ``bench/results/dns.json``.

    python bench/dns_bench.py [--count 20000] [--window 64] [--out bench/results/dns.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import dns.message

SELF = Path(__file__).resolve()
ROOT = SELF.parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "dns.json"
ZONE = "consoleproxy.company.com"


async def _serve() -> None:
    """Child side: serve on a loopback port, print it, run until stdin closes."""
    from consoleproxy.net.dns import DnsServer, DnsSettings

    server = DnsServer(DnsSettings(zone=ZONE, listen="127.0.0.1:0"))
    await server.start()
    print(server.port, flush=True)
    loop = asyncio.get_running_loop()
    # The parent closing our stdin (or dying) ends the child: no orphan servers.
    await loop.run_in_executor(None, sys.stdin.read)
    await server.close()


def _templates(n: int = 1024) -> list[bytes]:
    names = [f"10-{i // 256 % 256}-{i % 256}-{i % 7}.{ZONE}" for i in range(n)]
    return [dns.message.make_query(name, "A").to_wire() for name in names]


class _Client(asyncio.DatagramProtocol):
    def __init__(self, count: int, window: int, timeout: float) -> None:
        self.count = count
        self.window = window
        self.timeout = timeout
        self.templates = _templates()
        self.sent = 0
        self.answered = 0
        self.errors = 0  # answered, but not NOERROR
        self.lost = 0
        self.latencies: list[float] = []
        self.inflight: dict[int, float] = {}
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance: CPython's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)
        for _ in range(min(self.window, self.count)):
            self._send_next()

    def _send_next(self) -> None:
        if self.sent >= self.count:
            if not self.inflight and not self.done.done():
                self.done.set_result(None)
            return
        qid = self.sent % 65536
        wire = self.templates[self.sent % len(self.templates)]
        # Patch the ID in place of re-rendering: keeps the client cheap next to the server.
        packet = struct.pack("!H", qid) + wire[2:]
        self.sent += 1
        self.inflight[qid] = time.perf_counter()
        assert self.transport is not None
        self.transport.sendto(packet)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 12:
            return
        qid, flags = struct.unpack_from("!HH", data)
        started = self.inflight.pop(qid, None)
        if started is None:
            return  # late answer to a query already counted as lost
        self.latencies.append(time.perf_counter() - started)
        self.answered += 1
        if flags & 0xF:
            self.errors += 1
        self._send_next()

    def expire(self) -> None:
        now = time.perf_counter()
        for qid, started in list(self.inflight.items()):
            if now - started > self.timeout:
                del self.inflight[qid]
                self.lost += 1
                self._send_next()
        if self.sent >= self.count and not self.inflight and not self.done.done():
            self.done.set_result(None)


async def run(count: int, window: int, loss_timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SELF),
        "--serve",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        if not line.strip():
            raise RuntimeError("DNS server child did not report its port")
        port = int(line)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        transport, client = await loop.create_datagram_endpoint(
            lambda: _Client(count, window, loss_timeout), remote_addr=("127.0.0.1", port)
        )
        # Hard stop in bounded time even if the server stalls (assumes at least 500 queries/s).
        deadline = started + 30 + count / 500
        try:
            while not client.done.done():
                if time.perf_counter() > deadline:
                    raise TimeoutError("DNS benchmark did not finish in time")
                await asyncio.wait({client.done}, timeout=min(0.2, loss_timeout / 2))
                client.expire()
        finally:
            transport.close()
        seconds = time.perf_counter() - started
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 10)
        except TimeoutError:
            child.kill()
            await child.wait()
    lat = sorted(client.latencies) or [0.0]
    return {
        "benchmark": "dns_udp",
        "queries": count,
        "answered": client.answered,
        "lost": client.lost,
        "errors": client.errors,
        "window": window,
        "seconds": round(seconds, 4),
        "qps": round(client.answered / seconds, 1) if seconds > 0 else 0.0,
        "latency_ms": {
            "p50": round(statistics.median(lat) * 1000, 3),
            "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3),
            "max": round(lat[-1] * 1000, 3),
        },
        "python": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--count", type=int, default=20000, help="queries to send (default 20000)")
    p.add_argument("--window", type=int, default=64, help="queries in flight (default 64)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds before a query counts as lost")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(_serve())
        return 0
    if args.count < 1 or not 1 <= args.window <= 4096:
        p.error("--count must be >= 1 and --window 1..4096")
    result = asyncio.run(run(args.count, args.window, args.timeout))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"dns: {result['answered']}/{result['queries']} answered, {result['lost']} lost, "
        f"{result['qps']:.0f} queries/s, p50 {result['latency_ms']['p50']} ms, "
        f"p99 {result['latency_ms']['p99']} ms -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
