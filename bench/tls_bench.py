"""TLS server sides compared: consoleproxy.net.tlstransport vs asyncio's sslproto vs uvloop's TLS.

For each, a server process (this script, ``serve``) takes TLS connections; this process is the
client. Measured on the server process only:

* idle: PSS growth per idle TLS connection after the handshake (``/proc/PID/smaps_rollup``);
* up: CPU seconds per GiB received and decrypted (a buffered protocol that discards, as the
  relay's browser side reads);
* down: CPU seconds per GiB encrypted and sent (1 MiB writes, as the relay's frames).

    .venv/bin/python bench/tls_bench.py [--quick] [--idle N] [--mib M]

The numbers in tlstransport's docstring come from here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

IMPLS = ("tlstransport/asyncio", "tlstransport/uvloop", "sslproto/asyncio", "uvloop-tls")
CHUNK = 1024 * 1024


class Sink(asyncio.BufferedProtocol):
    """Discards what it reads; ``SEND n\\n`` first makes it send n bytes back in 1 MiB writes."""

    buf = memoryview(bytearray(256 * 1024))  # shared, as the relay's: not part of a connection's cost

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.first = True
        self.todo = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.first:
            self.first = False
            head = bytes(self.buf[:nbytes])
            if head.startswith(b"SEND "):
                self.todo = int(head[5:].split(b"\n")[0])
                self.send()

    def send(self) -> None:
        block = b"x" * CHUNK
        while self.todo > 0 and not self.paused:
            assert self.transport is not None
            self.transport.write(block[: min(CHUNK, self.todo)])
            self.todo -= CHUNK

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.send()


async def serve(impl: str, cert: str, key: str) -> None:
    from consoleproxy.net.tlstransport import TLSTransport
    from consoleproxy.tls.certstore import make_ssl_context

    ctx = make_ssl_context(cert, key)
    loop = asyncio.get_running_loop()
    if impl.startswith("tlstransport"):
        def factory() -> asyncio.BaseProtocol:
            t = TLSTransport(ctx, Sink())
            t.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
            assert t.wire is not None
            return t.wire

        server = await loop.create_server(factory, "127.0.0.1", 0)
    else:
        server = await loop.create_server(Sink, "127.0.0.1", 0, ssl=ctx)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError("no Pss line")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(impl: str, cert: str, key: str, idle: int, mib: int) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "serve", impl, cert, key, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        port = int(await proc.stdout.readline())
        client = ssl.create_default_context(cafile=cert)
        out: dict[str, float] = {}

        # idle: N connections after their handshake, holding nothing
        before = pss_kib(proc.pid)
        conns = []
        sem = asyncio.Semaphore(32)

        async def one() -> None:
            async with sem:
                _, w = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client, server_hostname="localhost"
                )
                w.write(b"hi")
                await w.drain()
                conns.append(w)

        await asyncio.gather(*(one() for _ in range(idle)))
        await asyncio.sleep(1)  # the server's last handshakes finish; nothing is asserted on it
        out["idle KiB/conn"] = (pss_kib(proc.pid) - before) / idle
        for w in conns:
            w.close()

        total = mib * 1024 * 1024
        # up: the server decrypts
        _, w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
        w.write(b"UP\n")
        block = os.urandom(CHUNK)
        c0 = cpu_seconds(proc.pid)
        for _ in range(mib):
            w.write(block)
            await w.drain()
        w.write(b"x")
        await w.drain()
        await asyncio.sleep(0.5)  # let the server finish reading what is in flight
        out["up s/GiB"] = (cpu_seconds(proc.pid) - c0) * 1024 / mib
        w.close()
        # down: the server encrypts
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
        c0 = cpu_seconds(proc.pid)
        w.write(b"SEND %d\n" % total)
        got = 0
        while got < total:
            got += len(await r.read(CHUNK))
        out["down s/GiB"] = (cpu_seconds(proc.pid) - c0) * 1024 / mib
        w.close()
        return out
    finally:
        proc.kill()
        await proc.wait()


def make_cert(d: Path) -> tuple[str, str]:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
         "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )
    return str(d / "cert.pem"), str(d / "key.pem")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        impl, cert, key = sys.argv[2:5]
        if "uvloop" in impl:
            import uvloop

            uvloop.run(serve(impl, cert, key))
        else:
            asyncio.run(serve(impl, cert, key))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 idle connections, 256 MiB each way")
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=1024)
    a = ap.parse_args()
    idle, mib = (300, 256) if a.quick else (a.idle, a.mib)
    d = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    cert, key = make_cert(d)
    head = f"{'server':24} {'idle KiB/conn':>14} {'up s/GiB':>9} {'down s/GiB':>11}"
    print(f"{head}   ({idle} idle, {mib} MiB)")
    for impl in IMPLS:
        t0 = time.monotonic()
        r = asyncio.run(measure(impl, cert, key, idle, mib))
        print(f"{impl:24} {r['idle KiB/conn']:14.1f} {r['up s/GiB']:9.2f} {r['down s/GiB']:11.2f}"
              f"   [{time.monotonic() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
