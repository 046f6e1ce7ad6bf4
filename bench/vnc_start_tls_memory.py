"""RSS per VNC connection that VeNCrypt's TLS upgrade adds (vncconn.VNCConnection.start_tls, over
tlstransport; it was ``loop.start_tls`` before: 287 KiB on asyncio's loop, 40 KiB on uvloop).

Opens N plain connections to a TLS server in another process, then wraps each in TLS with
``VNCConnection.start_tls`` and reads this process's RSS before and after (the first connection
is a warm-up: the SSL context's and the thread's allocations are not per console).

    .venv/bin/python bench/vnc_start_tls_memory.py [asyncio|uvloop]   (N=500 in the environment)
"""

from __future__ import annotations

import asyncio
import gc
import os
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "net"))  # test_vencrypt lives there

from test_vencrypt import make_qemu_tls_dir  # noqa: E402

from consoleproxy.net import vncconn  # noqa: E402

N = int(os.environ.get("N", "300"))

SERVER = r"""
import asyncio, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
async def hold(r, w):
    await r.read()
async def main():
    s = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=ctx, backlog=1024)
    print(s.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS in /proc/self/status")


async def measure(port: int, ca: Path) -> float:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    conns = [await vncconn.open_connection("127.0.0.1", port) for _ in range(N)]
    await conns[0].start_tls(ctx)
    gc.collect()
    before = rss_kib()
    for c in conns[1:]:
        await c.start_tls(ctx)
    gc.collect()
    after = rss_kib()
    for c in conns:
        c.close()
    return (after - before) / (N - 1)


def main() -> None:
    loop = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "tls"
        ca = make_qemu_tls_dir(d)
        argv = [sys.executable, "-c", SERVER, str(d / "server-cert.pem"), str(d / "server-key.pem")]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            try:
                port = int(proc.stdout.readline())
                if loop == "uvloop":
                    import uvloop

                    per = uvloop.run(measure(port, ca))
                else:
                    per = asyncio.run(measure(port, ca))
            finally:
                proc.kill()
    print(f"{loop}: {per:.1f} KiB RSS per VeNCrypt connection's start_tls (N={N})")


if __name__ == "__main__":
    main()
