"""Where an idle console's memory goes: tracemalloc's heap growth per console, by allocation site.

The proxy runs in this process; the backend and the client (which opens N idle consoles and
holds them) are relay_parts.py processes. The benchmark's PSS figure (scenario 4) is the
process-level truth; this says which lines of code the per-console bytes come from.

    .venv/bin/python bench/idle_memory.py [-n 500] [--tls] [--no-gc] [--top 30]

``--no-gc`` turns the cycle collector off while the consoles open: what only a full collection
would free (objects in reference cycles) then shows up as kept.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


async def _idle_client(target: dict[str, object], n: int) -> asyncio.subprocess.Process:
    """A client process holding ``n`` idle consoles; it reports once they are open."""
    spec = {"target": target, "op": "idle", "args": {"n": n, "parallel": 32, "first": 0}}
    return await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "relay_parts.py"), "client", json.dumps(spec),
        stdout=subprocess.PIPE, stdin=subprocess.PIPE,
    )


async def _close_client(client: asyncio.subprocess.Process) -> None:
    assert client.stdout is not None and client.stdin is not None
    await client.stdout.readline()
    client.stdin.write(b"close\n")
    await client.stdin.drain()
    await client.wait()


async def main(n: int, tls: bool, no_gc: bool, top: int) -> None:
    from harness import free_port, running_proxy

    tmp = Path(tempfile.mkdtemp(prefix="idle-memory-"))
    backend_port = free_port(20000, 30000)
    backend = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "relay_parts.py"), "backend", "--port", str(backend_port),
        stdout=subprocess.PIPE,
    )
    assert backend.stdout is not None
    await backend.stdout.readline()
    limits = {"max_sessions_per_client_ip": 0, "max_handshakes_per_ip": 0,
              "connections_per_ip_per_second": 0, "max_sessions": n + 100}
    try:
        async with running_proxy(tmp, limits=limits, listen={"tls": tls}, log={"level": "warning"}) as px:
            px.keyring.save(tmp / "keys.json")
            target = {"kind": "ws", "host": "127.0.0.1", "port": px.port, "keyring": str(tmp / "keys.json"),
                      "backend_port": backend_port, "tls": tls,
                      "cafile": str(px.server.dev_ca) if tls else None}
            # One console first, opened and closed: what the first console fills once (the ABC
            # caches of the request's header mapping, ~66 KiB) is not counted per console.
            warm = await _idle_client(target, 1)
            await _close_client(warm)
            gc.collect()
            if no_gc:
                gc.disable()
            tracemalloc.start(1)
            before = tracemalloc.take_snapshot()
            client = await _idle_client(target, n)
            assert client.stdout is not None and client.stdin is not None
            report = json.loads(await client.stdout.readline())
            if not no_gc:
                gc.collect()
            after = tracemalloc.take_snapshot()
            diff = after.compare_to(before, "lineno")
            total = sum(d.size_diff for d in diff)
            print(f"{report['opened']} consoles open ({report['failed']} failed); "
                  f"heap growth {total / n / 1024:.2f} KiB per console"
                  f"{' (cycle collector off)' if no_gc else ''}")
            for d in diff[:top]:
                frame = d.traceback[0]
                where = f"{frame.filename}:{frame.lineno}"
                print(f"{d.size_diff / n:8.0f} B {d.count_diff / n:6.2f} objects  {where}")
            client.stdin.write(b"close\n")
            await client.stdin.drain()
            await client.wait()
    finally:
        gc.enable()
        backend.terminate()
        await backend.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=500, help="idle consoles to open (default 500)")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--no-gc", action="store_true", help="cycle collector off while they open")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    asyncio.run(main(a.n, a.tls, a.no_gc, a.top))
