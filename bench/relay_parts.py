"""The moving parts of the relay benchmark: backend, clients, proxies and /proc accounting.

Every part runs in its own process (``python relay_parts.py backend|client ...``) so the proxy's
CPU and memory can be read from /proc without the load generators in them.

The backend speaks RFB 3.8 with security None first, as a VNC server does. consoleproxy does the
RFB client side itself and offers the browser 3.8/None; websockify relays the backend's handshake
unchanged. Either way the client sees the same bytes: version, security None, SecurityResult,
then (after its ClientInit) ServerInit. The client then sends a 9-byte command (mode, size) that
both proxies relay like any client bytes, and the backend answers:

- ``D size``: stream ``size`` bytes down in framebuffer-sized writes (1 MiB);
- ``R size`` + a double: the same, paced at that many bytes per second (a console the recording
  disk can keep up with);
- ``U size``: read ``size`` bytes, then send one byte ``K``;
- ``E 0``: echo every byte;
- ``I 0``: say nothing until the client goes away (an idle console).

So both proxies relay exactly the same payload bytes in every scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # one "framebuffer update" written by the busy backend
SERVER_INIT = struct.pack(">HH", 1920, 1080) + bytes(16) + struct.pack(">I", 5) + b"bench"
PAYLOAD = os.urandom(CHUNK)


def command(mode: bytes, size: int = 0) -> bytes:
    return struct.pack(">cQ", mode, size)


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (10,000 consoles need 2 sockets each)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def install_uvloop() -> bool:
    """The load generators use uvloop when installed so they stay faster than the proxies."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# --- backend ---------------------------------------------------------------------------------


async def _backend_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        w.write(b"RFB 003.008\n")
        await r.readexactly(12)
        w.write(b"\x01\x01")  # one security type: None
        await r.readexactly(1)
        w.write(b"\x00\x00\x00\x00")
        await r.readexactly(1)  # ClientInit
        w.write(SERVER_INIT)
        mode, size = struct.unpack(">cQ", await r.readexactly(9))
        if mode == b"T":  # "D" from a given wall-clock time, so that many consoles start together
            (start,) = struct.unpack(">d", await r.readexactly(8))
            await asyncio.sleep(max(0.0, start - time.time()))
            mode = b"D"
        rate = 0.0
        if mode == b"R":
            (rate,) = struct.unpack(">d", await r.readexactly(8))
            mode = b"D"
        if mode == b"D":
            view = memoryview(PAYLOAD)
            left = size
            t0 = time.monotonic()
            while left:
                if rate:  # the next chunk is due when the ones before took their share of time
                    await asyncio.sleep(max(0.0, t0 + (size - left) / rate - time.monotonic()))
                n = min(left, CHUNK)
                w.write(view[:n])
                left -= n
                await w.drain()
                # drain() does not yield while the socket takes everything: without this the first
                # of many consoles could get all its bytes before the others got one chunk. (Real
                # VNC servers are a process per VM; the kernel interleaves them.)
                await asyncio.sleep(0)
            await r.read()
        elif mode == b"U":
            # Counted in place, not copied through a StreamReader: the sink must not be the limit.
            pending = len(r._buffer)  # type: ignore[attr-defined]  # bytes that came with the command
            sink = LeanStream(w.transport, framed=False)  # type: ignore[arg-type]
            await sink.wait_payload(size - pending)
            w.transport.write(b"K")
            await sink.wait_payload(1 << 62)  # until the client goes away (ConnectionError)
        elif mode == b"E":
            while data := await r.read(1 << 20):
                w.write(data)
                await w.drain()
        else:
            await r.read()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


async def run_backend(port: int) -> None:
    server = await asyncio.start_server(
        _backend_conn, "127.0.0.1", port, limit=4 << 20, backlog=4096, reuse_address=True
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# --- client side -----------------------------------------------------------------------------


@dataclass
class Target:
    """Where a client opens consoles: a proxy over ws/wss, or the backend over raw TCP."""

    kind: str  # "ws" or "tcp"
    host: str
    port: int
    tls: bool = False
    cafile: str | None = None
    keyring: str | None = None  # consoleproxy: issue a fresh single-use token per console
    token: str | None = None  # websockify: the token-file entry
    backend_port: int = 0

    def url(self, index: int, keyring: Any) -> str:
        if keyring is not None:
            from consoleproxy.policy.tokens import issue

            token = issue(keyring, host="127.0.0.1", port=self.backend_port, vm=f"bench-{index}", ttl=600)
        else:
            token = self.token or ""
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{self.host}:{self.port}/websockify?token={token}"


class LeanStream(asyncio.BufferedProtocol):
    """The client's side of a console after its handshake, for the throughput scenarios.

    A general WebSocket client (websockets) spends more CPU per byte than the proxies it measures:
    it assembles every message into a new bytes object and masks every frame it sends. This reads
    into one reused buffer and only counts the payload of the server's frames (headers parsed,
    payload dropped), and sends frames masked once in advance. Over raw TCP (``framed=False``) it
    counts bytes. Both proxies get exactly the same bytes from it as from websockets.
    """

    def __init__(self, transport: asyncio.Transport, framed: bool) -> None:
        self.transport = transport
        self.framed = framed
        self._buf = memoryview(bytearray(4 << 20))
        self._head = b""  # a frame header split between two reads
        self._remaining = 0  # payload bytes of the current frame still to come
        self._data_frame = True
        self.payload = 0  # data bytes received so far
        self.kept = bytearray()  # data bytes kept while ``keep`` (short replies)
        self.keep = False
        self._target = 0
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._lost = False
        transport.set_protocol(self)
        with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
            transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        data = self._buf[:nbytes]
        if not self.framed:
            self._count(data)
        else:
            i = 0
            while i < nbytes:
                if self._remaining:
                    k = min(self._remaining, nbytes - i)
                    self._remaining -= k
                    if self._data_frame:
                        self._count(data[i : i + k])
                    i += k
                    continue
                take = bytes(data[i : i + 10])
                head = self._head + take
                size = 2 if len(head) < 2 else (2, 4, 10)[(head[1] & 0x7F > 125) + (head[1] & 0x7F > 126)]
                if len(head) < size:
                    self._head = head
                    break
                length = head[1] & 0x7F
                if length > 125:
                    length = int.from_bytes(head[2:size], "big")
                i += size - len(self._head)
                self._head = b""
                self._data_frame = head[0] & 0x0F in (0x0, 0x2)  # pings and closes are not data
                self._remaining = length
        if self.payload >= self._target:
            self._wake()

    def _count(self, chunk: memoryview) -> None:
        self.payload += len(chunk)
        if self.keep:
            self.kept += chunk

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_payload(self, total: int) -> None:
        """Until ``total`` data bytes have arrived since the stream began."""
        while self.payload < total:
            if self._lost:
                raise ConnectionError(f"closed after {self.payload} of {total} bytes")
            self._target = total
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def frame(self, data: bytes) -> bytes:
        """``data`` as one masked binary frame (what a browser sends), or as is over raw TCP."""
        if not self.framed:
            return data
        from websockets.utils import apply_mask

        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            head = struct.pack(">BB", 0x82, 0x80 | n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x82, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x82, 0x80 | 127, n)
        return head + mask + apply_mask(data, mask)

    async def write(self, data: bytes) -> None:
        """Write ``data`` (already framed); wait while the transport is over its high-water mark."""
        self.transport.write(data)
        while self._writable is not None:
            await self._writable

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake()
        self.resume_writing()

    def eof_received(self) -> bool:
        return False


class Console:
    """One console from the client's side: RFB client handshake, then raw payload bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ws: Any = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lean: LeanStream | None = None

    @classmethod
    async def open(
        cls, target: Target, index: int, keyring: Any, ctx: ssl.SSLContext | None, url: str | None = None
    ) -> Console:
        """``url``: made beforehand (``target.url``) so that issuing the token is not timed."""
        c = cls()
        if target.kind == "tcp":
            c.reader, c.writer = await asyncio.open_connection(target.host, target.port, limit=4 << 20)
            c.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            import websockets

            c.ws = await websockets.connect(
                url or target.url(index, keyring),
                subprotocols=["binary"],  # type: ignore[list-item]
                max_size=None,
                compression=None,
                open_timeout=60,
                ping_interval=None,
                proxy=None,
                ssl=ctx,
                max_queue=64,
            )
        await c.handshake()
        return c

    async def recv_some(self) -> bytes:
        if self.ws is not None:
            data = await self.ws.recv()
            if not isinstance(data, bytes):
                raise RuntimeError(f"text frame: {data!r}")
            return data
        assert self.reader is not None
        data = await self.reader.read(4 << 20)
        if not data:
            raise ConnectionError("closed")
        return data

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += await self.recv_some()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def send(self, data: bytes) -> None:
        if self.ws is not None:
            await self.ws.send(data)
        else:
            assert self.writer is not None
            self.writer.write(data)
            await self.writer.drain()

    async def handshake(self) -> None:
        version = await self.read_exact(12)
        if version != b"RFB 003.008\n":
            raise RuntimeError(f"version {version!r}")
        await self.send(version)
        (count,) = await self.read_exact(1)
        if await self.read_exact(count) != b"\x01":
            raise RuntimeError("security None not offered")
        await self.send(b"\x01")
        if await self.read_exact(4) != bytes(4):
            raise RuntimeError("SecurityResult failed")
        await self.send(b"\x01")  # ClientInit, shared
        if await self.read_exact(len(SERVER_INIT)) != SERVER_INIT:
            raise RuntimeError("ServerInit differs")

    def go_lean(self) -> LeanStream:
        """After the handshake: read and write through a ``LeanStream`` from now on.

        Nothing is in flight at this point (the backend says nothing after ServerInit until it
        gets a command), so no byte is left behind in the library's buffers.
        """
        if self.buf:
            raise RuntimeError(f"{len(self.buf)} bytes unread after the handshake")
        transport: Any = self.ws.transport if self.ws is not None else self.writer.transport  # type: ignore[union-attr]
        self.lean = LeanStream(transport, framed=self.ws is not None)
        return self.lean

    async def close(self) -> None:
        if self.lean is not None:
            self.lean.transport.close()
            return
        with contextlib.suppress(Exception):
            if self.ws is not None:
                await asyncio.wait_for(self.ws.close(), 5)
            elif self.writer is not None:
                self.writer.close()


def client_ssl(cafile: str | None) -> ssl.SSLContext | None:
    if cafile is None:
        return None
    return ssl.create_default_context(cafile=cafile)


async def op_down(
    t: Target, keyring: Any, ctx: ssl.SSLContext | None, size: int, rate: float = 0.0
) -> dict[str, Any]:
    """``size`` bytes down, as fast as they go or paced at ``rate`` bytes per second."""
    c = await Console.open(t, 0, keyring, ctx)
    lean = c.go_lean()
    t0 = time.perf_counter()
    cmd = command(b"R", size) + struct.pack(">d", rate) if rate else command(b"D", size)
    await lean.write(lean.frame(cmd))
    await lean.wait_payload(size)
    dt = time.perf_counter() - t0
    await c.close()
    return {"bytes": size, "seconds": dt, "mb_s": size / dt / 1e6}


async def op_up(t: Target, keyring: Any, ctx: ssl.SSLContext | None, size: int, msg: int) -> dict[str, Any]:
    c = await Console.open(t, 0, keyring, ctx)
    lean = c.go_lean()
    whole = lean.frame(PAYLOAD[:msg])  # masked once: the proxy still unmasks every frame
    t0 = time.perf_counter()
    await lean.write(lean.frame(command(b"U", size)))
    lean.keep = True
    left = size
    while left:
        n = min(left, msg)
        await lean.write(whole if n == msg else lean.frame(PAYLOAD[:n]))
        left -= n
    await lean.wait_payload(1)
    if bytes(lean.kept) != b"K":
        raise RuntimeError(f"no K after the upload: {bytes(lean.kept)!r}")
    dt = time.perf_counter() - t0
    await c.close()
    return {"bytes": size, "seconds": dt, "mb_s": size / dt / 1e6}


async def op_rtt(t: Target, keyring: Any, ctx: ssl.SSLContext | None, count: int) -> dict[str, Any]:
    c = await Console.open(t, 0, keyring, ctx)
    # The same lean client over raw TCP and through a proxy: the difference is the proxy's.
    lean = c.go_lean()
    await lean.write(lean.frame(command(b"E")))
    msg = lean.frame(PAYLOAD[:64])  # one frame, masked once, sent each time
    got = 0
    samples = []
    for i in range(50 + count):  # 50 warm-up round trips first
        t0 = time.perf_counter()
        await lean.write(msg)
        got += 64
        await lean.wait_payload(got)
        if i >= 50:
            samples.append(time.perf_counter() - t0)
    await c.close()
    samples.sort()
    us = [s * 1e6 for s in samples]
    return {
        "count": count,
        "p50_us": us[len(us) // 2],
        "p99_us": us[int(len(us) * 0.99)],
        "max_us": us[-1],
    }


async def _open_many(
    t: Target, keyring: Any, ctx: ssl.SSLContext | None, n: int, parallel: int, first: int, mode: bytes
) -> tuple[list[Console], list[str], float]:
    consoles: list[Console] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(parallel)

    # The management server makes tokens, not the browser: issued before the clock starts (and
    # websockify's single token-file entry costs nothing either).
    urls = [t.url(first + i, keyring) if t.kind == "ws" else "" for i in range(n)]

    async def one(i: int) -> None:
        async with sem:
            try:
                c = await Console.open(t, first + i, keyring, ctx, urls[i] or None)
                await c.send(command(mode))
                consoles.append(c)
            except Exception as exc:
                errors.append(f"{exc.__class__.__name__}: {exc}"[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return consoles, errors, time.perf_counter() - t0


async def op_idle(
    t: Target, keyring: Any, ctx: ssl.SSLContext | None, n: int, parallel: int, first: int
) -> dict[str, Any]:
    """Open ``n`` idle consoles, report, hold them until stdin says 'close'."""
    consoles, errors, dt = await _open_many(t, keyring, ctx, n, parallel, first, b"I")
    report = {"opened": len(consoles), "failed": len(errors), "errors": sorted(set(errors))[:5],
              "seconds": dt}
    print(json.dumps(report), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(c.close() for c in consoles))
    return report


async def op_open(
    t: Target, keyring: Any, ctx: ssl.SSLContext | None, n: int, parallel: int, first: int
) -> dict[str, Any]:
    """New consoles per second: open (TLS, token, backend, RFB) then close, ``parallel`` at a time."""
    sem = asyncio.Semaphore(parallel)
    errors: list[str] = []
    ok = 0

    urls = [t.url(first + i, keyring) if t.kind == "ws" else "" for i in range(n)]  # as in _open_many

    async def one(i: int) -> None:
        nonlocal ok
        async with sem:
            try:
                c = await Console.open(t, first + i, keyring, ctx, urls[i] or None)
                ok += 1
                await c.close()
            except Exception as exc:
                errors.append(f"{exc.__class__.__name__}: {exc}"[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    dt = time.perf_counter() - t0
    return {"opened": ok, "failed": len(errors), "errors": sorted(set(errors))[:5], "seconds": dt}


async def op_multi_down(
    t: Target, keyring: Any, ctx: ssl.SSLContext | None, n: int, size: int, first: int
) -> dict[str, Any]:
    opened: list[Console] = []
    for i in range(0, n, 50):
        count = min(50, n - i)
        batch = await asyncio.gather(*(Console.open(t, first + i + j, keyring, ctx) for j in range(count)))
        opened.extend(batch)
    rates: list[float] = []
    # Every console's stream starts at the same instant (the backend waits for it): a request sent
    # a few ms before the others would otherwise stream alone meanwhile and skew slowest/fastest.
    start = time.time() + 0.2 + n * 0.002

    async def one(c: Console) -> None:
        lean = c.go_lean()
        await lean.write(lean.frame(command(b"T", size) + struct.pack(">d", start)))
        await lean.wait_payload(size)
        rates.append(size / (time.time() - start) / 1e6)

    await asyncio.gather(*(one(c) for c in opened))
    dt = time.time() - start
    await asyncio.gather(*(c.close() for c in opened))
    return {"consoles": n, "bytes": n * size, "seconds": dt, "rates": rates}


OPS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "down": op_down,
    "up": op_up,
    "rtt": op_rtt,
    "idle": op_idle,
    "open": op_open,
    "multi_down": op_multi_down,
}


async def run_client(spec: dict[str, Any]) -> dict[str, Any]:
    t = Target(**spec["target"])
    keyring = None
    if t.keyring:
        from consoleproxy.policy.tokens import Keyring

        keyring = Keyring.load(t.keyring)
    ctx = client_ssl(t.cafile) if t.tls else None
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    result = await OPS[spec["op"]](t, keyring, ctx, **spec.get("args", {}))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu_s"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return result


# --- process accounting (/proc) --------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (from /proc/*/stat ppid fields)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a live process (all its threads), to the nanosecond.

    /proc/PID/stat counts in 10 ms ticks: ±20 ms on a 0.1 s measurement. The kernel's per-process
    CPU clock (clock id ``(~pid << 3) | 2``, CPUCLOCK_SCHED, as clock_getcpuclockid(3) makes) is exact.
    """
    return time.clock_gettime(((~pid) << 3) | 2)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid``'s tree, including reaped children (websockify forks per console).

    Live processes are read from their CPU clocks (exact); children already reaped only exist as
    their parent's cutime/cstime (ticks).
    """
    total = 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            # cutime cstime are fields 16-17 (1-based); index 13.. after the ')' split
            reaped = (int(fields[13]) + int(fields[14])) / TICK
            total += process_cpu_seconds(p) + reaped
        except (OSError, ValueError):  # it exited meanwhile: its parent's cutime has it next time
            continue
    return total


def tree_pss_kib(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total


def tree_size(pid: int) -> int:
    return len(_tree(pid))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("spec", help="JSON: {target, op, args}")
    args = p.parse_args(argv)
    raise_nofile()
    install_uvloop()
    if args.cmd == "backend":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_backend(args.port))
        return 0
    result = asyncio.run(run_client(json.loads(args.spec)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
