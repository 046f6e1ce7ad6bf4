"""The byte relay between a browser's WebSocket and the VNC server's TCP connection.

After the RFB security handshake every byte passes unchanged, in both directions at once.

Backpressure, both ways, without polling:
- down (VNC -> browser): we read at most ``READ_SIZE`` bytes, then ``await ws.send_bytes``, which
  waits for the WebSocket transport to drain past aiohttp's write-buffer limit. While we wait we do
  not read, the StreamReader fills to its limit and pauses the socket, and the hypervisor's TCP
  window shrinks. Memory per console is bounded by ``READ_SIZE`` + 2 x the StreamReader limit +
  aiohttp's write buffer.
- up (browser -> VNC): one WebSocket message at a time (capped by ``max_client_message_bytes``),
  written and drained before the next is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import WSMsgType, web

from .sessions import Session

__all__ = ["READ_SIZE", "STREAM_LIMIT", "Relay"]

# Bytes asked of the VNC socket per read. Large reads mean few WebSocket frames and little Python
# work per byte; a full-screen update is often several hundred KiB.
READ_SIZE = 256 * 1024
# StreamReader buffer limit; it pauses the socket at 2 x this. Costs nothing while idle.
STREAM_LIMIT = 256 * 1024


class Relay:
    """Runs both directions until one side closes or ``stop(code, reason)`` is called."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        *,
        client_filter: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.ws = ws
        self.reader = reader
        self.writer = writer
        self.session = session
        self.client_filter = client_filter
        self.close_code: int | None = None
        self.close_reason = ""
        self._tasks: list[asyncio.Task[str]] = []

    def stop(self, code: int, reason: str) -> None:
        """Ask the relay to end; the caller's ``run`` returns and the server sends ``code``."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        for t in self._tasks:
            t.cancel()

    async def run(self) -> str:
        """Relay until the end; returns why it ended ('client closed', 'server closed', ...)."""
        down = asyncio.ensure_future(self._down())
        up = asyncio.ensure_future(self._up())
        self._tasks = [down, up]
        if self.close_code is not None:  # stopped before we started
            for t in self._tasks:
                t.cancel()
        done, pending = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        why = "stopped"
        for t in done:
            if not t.cancelled():
                exc = t.exception()
                why = t.result() if exc is None else f"error: {exc.__class__.__name__}: {exc}"
                break
        return self.close_reason or why

    async def _down(self) -> str:
        reader, ws, s = self.reader, self.ws, self.session
        read = reader.read
        send = ws.send_bytes
        while True:
            data = await read(READ_SIZE)
            if not data:
                return "server closed"
            s.bytes_down += len(data)
            s.last_activity = time.monotonic()
            await send(data)

    async def _up(self) -> str:
        ws, writer, s, flt = self.ws, self.writer, self.session, self.client_filter
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.BINARY:
                data: bytes = msg.data
            elif msg.type is WSMsgType.TEXT:
                # RFB is binary; a text frame means a client we do not understand.
                self.stop(1003, "text frames are not accepted")
                return "client sent text"
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return "client closed"
            elif msg.type is WSMsgType.ERROR:
                return f"client error: {ws.exception()}"
            else:
                continue
            s.bytes_up += len(data)
            s.last_activity = time.monotonic()
            if flt is not None:
                data = flt(data)
                if not data:
                    continue
            writer.write(data)
            await writer.drain()
