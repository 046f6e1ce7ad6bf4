"""Integration-test helpers: a proxy on loopback, an RFB client over WebSocket, fake VNC servers.

The client speaks what noVNC speaks after the upgrade: RFB 3.8 with security None towards the
proxy. It reads a byte stream, ignoring WebSocket message boundaries, as a browser's RFB does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from consoleproxy.config import Config, load_config, replace
from consoleproxy.policy.tokens import Keyring, issue
from consoleproxy.server import ProxyServer

# Set by a test module's fixture to run its consoles over TLS (the proxy's development CA trusted).
TLS_BY_DEFAULT = False
_client_ssl: ssl.SSLContext | None = None


def free_port(lo: int = 5900, hi: int = 6999) -> int:
    """A TCP port in [lo, hi] that nothing listens on right now."""
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def stop_program(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a program a test started: SIGTERM, and SIGKILL if it is still running ``timeout`` s
    later (a hung program must not hang the run, nor outlive it)."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    cfg = load_config(env={})
    base: dict[str, dict[str, Any]] = {
        "listen": {"address": "127.0.0.1", "ports": [0], "tls": False},
        "admin": {"address": "127.0.0.1", "port": 0, "key_file": str(tmp_path / "admin.key")},
        "tokens": {"keyring": str(tmp_path / "keys.json")},
        "targets": {"allowed_cidrs": ["127.0.0.1/32"], "ports": "1-65535"},
        "tls": {"store": str(tmp_path / "certs")},
    }
    if TLS_BY_DEFAULT:
        base["listen"]["tls"] = True
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return replace(cfg, **base)


@dataclass
class Proxy:
    server: ProxyServer
    keyring: Keyring

    @property
    def port(self) -> int:
        return self.server.public_ports[0]

    def url(self, token: str, path: str = "/websockify") -> str:
        scheme = "wss" if self.server.cfg.listen.tls else "ws"
        return f"{scheme}://127.0.0.1:{self.port}{path}?token={token}"

    @property
    def http_base(self) -> str:
        return f"{'https' if self.server.cfg.listen.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def client_ssl(self) -> ssl.SSLContext | None:
        """A client context trusting the development CA, when the proxy made one."""
        ca = self.server.dev_ca
        return ssl.create_default_context(cafile=str(ca)) if ca is not None else None

    def token(self, host: str = "127.0.0.1", port: int = 5900, **kw: Any) -> str:
        kw.setdefault("vm", "vm-1")
        return issue(self.keyring, host=host, port=port, **kw)

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.admin_key}"}


@contextlib.asynccontextmanager
async def running_proxy(
    tmp_path: Path, keyring: Keyring | None = None, **sections: dict[str, Any]
) -> AsyncIterator[Proxy]:
    """A started ProxyServer; pass one ``keyring`` to several for instances of one cluster."""
    cfg = make_config(tmp_path, **sections)
    keyring = keyring or Keyring.generate()
    global _client_ssl
    server = ProxyServer(cfg, keyring=keyring)
    await server.start()
    proxy = Proxy(server, keyring)
    _client_ssl = proxy.client_ssl
    try:
        yield proxy
    finally:
        await server.close()


class RFBClient:
    """A None-security RFB 3.8 client over a WebSocket, as noVNC is after the upgrade."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buf = bytearray()
        self.width = self.height = 0
        self.name = b""

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, url: str, *, subprotocols: list[str] | None = None, **kw: Any
    ) -> AsyncIterator[RFBClient]:
        if url.startswith("wss:") and "ssl" not in kw and _client_ssl is not None:
            kw["ssl"] = _client_ssl
        async with websockets.connect(
            url,
            subprotocols=subprotocols,  # type: ignore[arg-type]
            max_size=None,
            compression=None,
            open_timeout=10,
            proxy=None,  # loopback tests never go through an HTTP proxy from the environment
            **kw,
        ) as ws:
            yield cls(ws)

    async def read_exact(self, n: int, timeout: float = 10) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self.buf) < n:
                msg = await self.ws.recv()
                assert isinstance(msg, bytes), f"text frame from the proxy: {msg!r}"
                self.buf += msg
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def handshake(self, shared: bool = True) -> None:
        version = await self.read_exact(12)
        assert version == b"RFB 003.008\n", version
        await self.send(version)
        (count,) = await self.read_exact(1)
        types = await self.read_exact(count)
        assert types == b"\x01", f"proxy must offer only None, offered {types!r}"
        await self.send(b"\x01")
        (result,) = struct.unpack(">I", await self.read_exact(4))
        assert result == 0, "SecurityResult failed"
        await self.send(b"\x01" if shared else b"\x00")
        self.width, self.height = struct.unpack(">HH", await self.read_exact(4))
        await self.read_exact(16)  # pixel format
        (name_len,) = struct.unpack(">I", await self.read_exact(4))
        self.name = await self.read_exact(name_len)

    async def request_update(self, incremental: bool = False) -> None:
        await self.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    async def read_raw_update(self) -> bytes:
        """Read one FramebufferUpdate of Raw rectangles (32 bpp) and return the pixels."""
        while True:
            (mtype,) = await self.read_exact(1)
            if mtype == 0:
                break
            if mtype == 2:  # Bell
                continue
            raise AssertionError(f"unexpected server message {mtype}")
        _, nrects = struct.unpack(">BH", await self.read_exact(3))
        pixels = bytearray()
        for _ in range(nrects):
            _x, _y, w, h, enc = struct.unpack(">HHHHi", await self.read_exact(12))
            if enc == 0:
                pixels += await self.read_exact(w * h * 4, timeout=30)
            elif enc in (-223, -258, -257, -308, -307):  # pseudo-encodings carry no pixels here
                continue
            else:
                raise AssertionError(f"unexpected encoding {enc}")
        return bytes(pixels)

    async def close_code(self, timeout: float = 10) -> int | None:
        """Wait for the proxy to close; return its close code (reading and dropping data)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed:
            pass
        rcvd = self.ws.protocol.close_rcvd
        return rcvd.code if rcvd is not None else None

    @property
    def close_reason(self) -> str:
        rcvd = self.ws.protocol.close_rcvd
        return rcvd.reason if rcvd is not None else ""


async def expect_close(url: str, timeout: float = 10) -> tuple[int | None, str]:
    """Open a console that must fail; return (close code, reason)."""
    async with RFBClient.connect(url) as c:
        code = await c.close_code(timeout)
        return code, c.close_reason


# --- fake VNC servers -----------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """Run ``handler`` for each connection on a loopback port; yields the port."""
    tasks: set[asyncio.Task[None]] = set()

    async def wrap(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            tasks.discard(task)
            w.close()

    server = await asyncio.start_server(wrap, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def rfb38_none_handshake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Server side of RFB 3.8 with security None, up to and including ClientInit."""
    w.write(b"RFB 003.008\n")
    await r.readexactly(12)
    w.write(b"\x01\x01")
    await r.readexactly(1)
    w.write(b"\x00\x00\x00\x00")
    await r.readexactly(1)  # ClientInit


SERVER_INIT = struct.pack(">HH", 64, 32) + bytes(16) + struct.pack(">I", 4) + b"echo"


async def echo_backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """An RFB server that, after ServerInit, echoes every byte (for byte-exact relay tests)."""
    await rfb38_none_handshake(r, w)
    w.write(SERVER_INIT)
    while data := await r.read(256 * 1024):
        w.write(data)
        await w.drain()


async def connect_echo(c: RFBClient) -> None:
    await c.handshake()
    assert (c.width, c.height, c.name) == (64, 32, b"echo")


async def aiohttp_console(ws: aiohttp.ClientWebSocketResponse) -> None:
    """The client side of the RFB handshake (None security) over an aiohttp WebSocket."""
    buf = bytearray()

    async def read(n: int) -> bytes:
        while len(buf) < n:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            buf.extend(msg.data)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    await ws.send_bytes(await read(12))
    (count,) = await read(1)
    await read(count)
    await ws.send_bytes(b"\x01")
    assert await read(4) == bytes(4)
    await ws.send_bytes(b"\x01")
    (name_len,) = struct.unpack(">I", (await read(24))[20:])
    assert await read(name_len) == b"echo"
