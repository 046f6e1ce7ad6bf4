"""Resume storm (issue 21): an instance holding 2,000 consoles dies; how fast do they come back?

Two ``consoleproxy serve`` instances share a replay store (Redis, or ``--store sqlite``) and a
keyring (one machine; a
balancer in front adds nothing to measure here, so the clients reconnect to the survivor's port
as a balancer would send them there). ``--consoles`` consoles are opened on instance A with
``resume=1``, each relaying (an echo round trip through the busy-VNC-like backend of
relay_parts.py); then A gets SIGKILL. Every console waits as the page does (backoff 250 ms x 2^n,
capped at 8 s, jittered 0.5-1.5x) and resumes on B with its ticket; it counts as relaying again
after an echo round trip. Reported: time from the kill to 50%, 99% and 100% relaying again on B,
B's peak CPU (over 0.25 s samples), and consoles lost (not back within the resume window).

    .venv/bin/python bench/resume_storm.py [--consoles 2000] [--window 120] [--store redis|sqlite]

Writes bench/results/resume_storm.json. The clients run in this process (uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import relay_bench as rb  # noqa: E402
import relay_parts as parts  # noqa: E402
import websockets  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402

from consoleproxy.policy.tokens import Keyring, issue  # noqa: E402

BASE_MS, CAP_MS = 250, 8000  # novnc_static/console.js: RESUME_BASE_MS, RESUME_CAP_MS


def delay(n: int) -> float:
    return min(CAP_MS, BASE_MS * 2**n) * (0.5 + random.random()) / 1000  # noqa: S311 - jitter


class Refused(Exception):
    pass


async def open_console(url: str, ticket: str | None) -> tuple[Any, str | None]:
    """Open, send the ticket first when resuming, do the RFB client side, then one echo."""
    ws = await websockets.connect(url, subprotocols=["binary"], max_size=None,  # type: ignore[list-item]
                                  compression=None, open_timeout=60, proxy=None)
    latest = ticket
    buf = bytearray()

    async def read(n: int) -> bytes:
        nonlocal latest
        while len(buf) < n:
            msg = await ws.recv()
            if isinstance(msg, str):
                latest = msg
            else:
                buf.extend(msg)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    try:
        if ticket is not None:
            await ws.send(ticket.encode())
        await ws.send(await read(12))
        (count,) = await read(1)
        await read(count)
        await ws.send(b"\x01")
        await read(4)
        await ws.send(b"\x01")
        (name_len,) = struct.unpack(">I", (await read(24))[20:])
        await read(name_len)
        await ws.send(parts.command(b"E") + b"ping")
        assert await read(4) == b"ping"
        while latest is None or latest == ticket:  # the new ticket follows ServerInit
            msg = await ws.recv()
            if isinstance(msg, str):
                latest = msg
    except ConnectionClosed as exc:
        await ws.close()
        if exc.rcvd is not None and exc.rcvd.code == 4005:
            raise Refused(exc.rcvd.reason) from None
        raise
    return ws, latest


async def watch(ws: Any, ticket: str | None) -> str | None:
    """Until the connection ends; the latest ticket it sent."""
    try:
        async for msg in ws:
            if isinstance(msg, str):
                ticket = msg
    except ConnectionClosed:
        pass
    return ticket


async def console_life(i: int, a_url: str, b_url: str, keyring: Keyring, backend: int,
                       sem: asyncio.Semaphore, opened: list[int], killed: asyncio.Event,
                       back: dict[int, float], lost: list[str], window: float, drops: list[float],
                       tries: list[tuple[int, float]], failures: list[str]) -> None:
    token = issue(keyring, host="127.0.0.1", port=backend, vm=f"vm-{i}", ttl=600)
    async with sem:
        ws, ticket = await open_console(f"{a_url}?token={token}&resume=1", None)
    opened.append(i)
    ticket = await watch(ws, ticket)
    await killed.wait()
    dropped = time.monotonic()
    drops.append(dropped)
    n = 0
    while time.monotonic() - dropped < window:
        await asyncio.sleep(delay(n))
        n += 1
        t0 = time.monotonic()
        try:
            ws, ticket = await open_console(f"{b_url}?resume=1&after=1006", ticket)
        except Refused as exc:
            lost.append(str(exc))
            return
        except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError, AssertionError) as exc:
            rcvd = getattr(exc, "rcvd", None)
            why = f"{rcvd.code} {rcvd.reason}" if rcvd else ""
            failures.append(f"{type(exc).__name__} {why}"[:80])
            continue
        back[i] = time.monotonic()
        tries.append((n, back[i] - t0))
        await watch(ws, ticket)  # kept open until the bench ends
        return
    lost.append("window over")


def proxy_config(env: rb.Env, port: int, store: str, window: int) -> Path:
    cfg = rb.consoleproxy_config(env, port, tls=False)
    cfg.write_text(cfg.read_text() + f"""
[cluster]
replay_store = "{store}"

[resume]
window_seconds = {window}
""")
    return cfg


def start(args: list[str], out: Any) -> subprocess.Popen[Any]:
    """A part of the bench, started before the clock runs (a blocking call is fine here)."""
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


async def run(n: int, window: int, work: Path, store_kind: str) -> dict[str, Any]:
    env = rb.make_env(work, work)
    keyring = Keyring.load(env.keyring)
    procs: list[subprocess.Popen[Any]] = []
    if store_kind == "redis":
        rport = rb.free_port()
        procs.append(start([
            "redis-server", "--bind", "127.0.0.1", "--port", str(rport), "--save", "", "--appendonly", "no",
        ], subprocess.DEVNULL))
        rb.wait_port(rport, procs[-1])
        store = f"redis://127.0.0.1:{rport}/0"
    else:
        store = f"sqlite:///{work / 'replay.db'}"
    ports = [rb.free_port(), rb.free_port()]
    with rb.backend(env):
        try:
            for port in ports:
                cfg = proxy_config(env, port, store, window)
                log = (work / f"serve-{port}.log").open("ab")
                procs.append(start([rb.PY, "-m", "consoleproxy", "serve", "--config", str(cfg)], log))
                rb.wait_port(port, procs[-1])
            a_url, b_url = (f"ws://127.0.0.1:{p}/websockify" for p in ports)
            sem = asyncio.Semaphore(100)
            opened: list[int] = []
            back: dict[int, float] = {}
            lost: list[str] = []
            drops: list[float] = []
            tries: list[tuple[int, float]] = []
            failures: list[str] = []
            killed = asyncio.Event()
            t_open = time.monotonic()
            tasks = [asyncio.create_task(console_life(i, a_url, b_url, keyring, env.backend_port, sem,
                                                      opened, killed, back, lost, window, drops, tries,
                                                      failures))
                     for i in range(n)]
            while len(opened) < n:
                if any(t.done() and t.exception() for t in tasks):
                    raise next(t.exception() for t in tasks if t.done() and t.exception())  # type: ignore[misc]
                await asyncio.sleep(0.1)
            open_s = time.monotonic() - t_open
            survivor = procs[-1].pid
            cpu0 = parts.process_cpu_seconds(survivor)
            client0 = time.process_time()
            procs[-2].send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            killed.set()
            peak, last_cpu, last_t = 0.0, cpu0, t_kill
            while len(back) + len(lost) < n and time.monotonic() - t_kill < window + 10:
                await asyncio.sleep(0.25)
                now, cpu = time.monotonic(), parts.process_cpu_seconds(survivor)
                peak = max(peak, (cpu - last_cpu) / (now - last_t))
                last_cpu, last_t = cpu, now
            total_cpu = parts.process_cpu_seconds(survivor) - cpu0
            client_cpu = time.process_time() - client0
            times = sorted(t - t_kill for t in back.values())

            def at(q: float) -> float | None:
                k = int(q * n + 0.999999) - 1
                return round(times[k], 2) if 0 <= k < len(times) else None

            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return {
                "consoles": n, "store": store_kind, "window_seconds": window,
                "open_seconds": round(open_s, 1),
                # when the clients saw their connection end (the last one)
                "seconds_to_last_drop_seen": round(max(drops) - t_kill, 2) if drops else None,
                "attempts_max": max((t[0] for t in tries), default=0),
                # how long the successful attempt took, median and slowest
                "attempt_seconds_p50": round(sorted(t[1] for t in tries)[len(tries) // 2], 2)
                if tries else None,
                "attempt_seconds_max": round(max(t[1] for t in tries), 2) if tries else None,
                "failed_attempts": {f: failures.count(f) for f in sorted(set(failures))},
                "back": len(back), "lost": len(lost), "lost_reasons": sorted(set(lost))[:5],
                "seconds_to_50pct": at(0.5), "seconds_to_99pct": at(0.99), "seconds_to_all": at(1.0),
                "survivor_peak_cpu_percent": round(peak * 100), "survivor_cpu_seconds": round(total_cpu, 2),
                # the clients (this process, one core): when near the storm's length, they are the limit
                "client_cpu_seconds": round(client_cpu, 2),
            }
        finally:
            for p in procs:
                rb.stop(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--consoles", type=int, default=2000)
    ap.add_argument("--window", type=int, default=120)
    ap.add_argument("--store", choices=["sqlite", "redis"], default="redis",
                    help="the shared replay store (redis: redis-server from Debian)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where resume_storm.json goes")
    args = ap.parse_args(argv)
    parts.raise_nofile()
    parts.install_uvloop()
    with tempfile.TemporaryDirectory(prefix="resume-storm-") as tmp:
        result = asyncio.run(run(args.consoles, args.window, Path(tmp), args.store))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "resume_storm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
