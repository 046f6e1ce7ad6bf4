"""Profile consoleproxy's relay with pyinstrument: one console streaming down, then one sending up.

The proxy runs in this process under the profiler; the backend and the client are
relay_parts.py processes. Prints the call tree (and writes bench/results/profile_*.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


def _save(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


async def main(size: int, out: Path, opens: int, show_all: bool = False) -> None:
    from harness import free_port, running_proxy
    from pyinstrument import Profiler

    tmp = Path(tempfile.mkdtemp(prefix="relay-profile-"))
    bport = free_port(20000, 30000)
    be = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "relay_parts.py"), "backend", "--port", str(bport), stdout=subprocess.PIPE
    )
    assert be.stdout is not None
    await be.stdout.readline()
    try:
        limits = {"max_sessions_per_client_ip": 0, "max_handshakes_per_ip": 0,
                  "connections_per_ip_per_second": 0}
        async with running_proxy(tmp, limits=limits, listen={"tls": opens > 0}) as px:
            px.keyring.save(tmp / "k.json")
            target = {"kind": "ws", "host": "127.0.0.1", "port": px.port, "keyring": str(tmp / "k.json"),
                      "backend_port": bport, "tls": opens > 0, "cafile": str(px.server.dev_ca)}
            ops: tuple[tuple[str, dict[str, int]], ...] = (
                ("down", {"size": size}), ("up", {"size": size // 2, "msg": 65536})
            )
            if opens:  # new TLS consoles: TLS, token, backend connect, both RFB handshakes
                ops = (("open", {"n": opens, "parallel": 16, "first": 0}),)
            for op, args in ops:
                spec = json.dumps({"target": target, "op": op, "args": args})
                prof = Profiler(interval=0.0005, async_mode="disabled")
                prof.start()
                c = await asyncio.create_subprocess_exec(
                    sys.executable, str(HERE / "relay_parts.py"), "client", spec, stdout=subprocess.PIPE
                )
                result, _ = await c.communicate()
                prof.stop()
                text = prof.output_text(unicode=False, color=False, show_all=show_all)
                await asyncio.to_thread(_save, out / f"profile_{op}.txt", text)
                print(f"== {op}: {result.decode().strip()}\n{text}")
    finally:
        be.terminate()
        await be.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512 << 20)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--opens", type=int, default=0, help="profile opening N TLS consoles instead")
    ap.add_argument("--all", action="store_true", help="show library frames too")
    a = ap.parse_args()
    asyncio.run(main(a.size, Path(a.out), a.opens, a.all))
