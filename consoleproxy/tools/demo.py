"""An embedded demo VNC server: RFB 3.8 (RFC 6143) with VNC authentication and a ticking clock.

``consoleproxy demo`` and the tests put it behind the proxy so a console works without a
hypervisor. It speaks just enough RFB to be a faithful backend:

* handshake: versions 3.3, 3.7 and 3.8; only VNC authentication (type 2), checked with
  ``rfb.vnc_auth_response``; a wrong response gets SecurityResult 1 and, in 3.8, the reason
  "Authentication failed" (section 7.1.3);
* ServerInit: ``width`` x ``height``, 32 bpp true colour (little endian, depth 24, max 255, shifts
  16/8/0), ``name``;
* SetPixelFormat: any 32 bpp true-colour format with 8-bit channels on byte boundaries (noVNC asks
  for shifts 0/8/16); anything else closes the connection;
* SetEncodings: Raw only, and the QEMU extended key event pseudo-encoding (-258), acknowledged
  with a FramebufferUpdate carrying a -258 rectangle so noVNC switches to scan codes;
* FramebufferUpdateRequest: a Raw rectangle. An incremental request is answered only when the
  picture changed (the clock's second), with the part of the request that the clock covers;
  until then it is held;
* input (KeyEvent, PointerEvent, QEMU extended key events, ClientCutText) is recorded in
  ``events`` for the tests, which wait with ``wait_for_events``.

The picture is drawn with a built-in 5x7 bitmap font, scaled up, into one ``bytearray`` per second
(shared by every client); rectangles are slices of it. No numpy, no PIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consoleproxy.protocol import rfb

__all__ = [
    "CutText",
    "DemoInput",
    "DemoVncServer",
    "ExtendedKeyEvent",
    "KeyEvent",
    "PointerEvent",
    "render_text",
]

log = logging.getLogger(__name__)

MAX_CUT_TEXT = 1024 * 1024  # a longer ClientCutText closes the connection
HANDSHAKE_TIMEOUT = 30.0
_ENC_RAW = 0
_ENC_QEMU_EXT_KEY = -258

# -- recorded input ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEvent:
    down: bool
    keysym: int


@dataclass(frozen=True)
class PointerEvent:
    mask: int
    x: int
    y: int


@dataclass(frozen=True)
class ExtendedKeyEvent:
    """QEMU extended key event: keysym and XT scan code."""

    down: bool
    keysym: int
    keycode: int


@dataclass(frozen=True)
class CutText:
    text: str


DemoInput = KeyEvent | PointerEvent | ExtendedKeyEvent | CutText

# -- the picture -------------------------------------------------------------------------------

# 5x7 glyphs, rows top to bottom; only what the screen needs (and a few spares).
_FONT: dict[str, tuple[str, ...]] = {
    " ": (".....",) * 7,
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    ":": (".....", "..#..", "..#..", ".....", "..#..", "..#..", "....."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    "a": (".....", ".....", ".###.", "....#", ".####", "#...#", ".####"),
    "c": (".....", ".....", ".###.", "#...#", "#....", "#...#", ".###."),
    "d": ("....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"),
    "e": (".....", ".....", ".###.", "#...#", "#####", "#....", ".###."),
    "i": ("..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."),
    "l": (".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "m": (".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"),
    "n": (".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"),
    "o": (".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."),
    "p": (".....", "####.", "#...#", "#...#", "####.", "#....", "#...."),
    "r": (".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."),
    "s": (".....", ".....", ".####", "#....", ".###.", "....#", "####."),
    "t": (".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."),
    "v": (".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "x": (".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "y": (".....", "#...#", "#...#", "#...#", ".####", "....#", ".###."),
}
_GLYPH_W, _GLYPH_H, _ADVANCE = 5, 7, 6
_FALLBACK = ("#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####")

_BACKGROUND = (16, 24, 40)
_BAND = (28, 40, 64)
_TITLE = (235, 235, 245)
_CLOCK = (90, 200, 255)


def _pixel(rgb: tuple[int, int, int]) -> bytes:
    """One pixel in the server's native format: r<<16 | g<<8 | b, little endian."""
    r, g, b = rgb
    return bytes((b, g, r, 0))


def text_width(text: str, scale: int) -> int:
    return (len(text) * _ADVANCE - 1) * scale if text else 0


def render_text(
    frame: bytearray, width: int, text: str, x0: int, y0: int, scale: int, rgb: tuple[int, int, int]
) -> None:
    """Draw ``text`` into a native-format frame ``width`` pixels wide (no clipping: callers fit it)."""
    px = _pixel(rgb)
    for n, ch in enumerate(text):
        glyph = _FONT.get(ch, _FALLBACK)
        gx0 = x0 + n * _ADVANCE * scale
        for gy, row in enumerate(glyph):
            col = 0
            while col < _GLYPH_W:  # draw runs of lit pixels with one slice per scan line
                if row[col] != "#":
                    col += 1
                    continue
                end = col
                while end < _GLYPH_W and row[end] == "#":
                    end += 1
                run = px * ((end - col) * scale)
                for dy in range(scale):
                    off = ((y0 + gy * scale + dy) * width + gx0 + col * scale) * 4
                    frame[off : off + len(run)] = run
                col = end


class _Screen:
    """The demo picture: background, title and a clock; redrawn once per second."""

    def __init__(self, width: int, height: int, title: str) -> None:
        self.width, self.height = width, height
        static = bytearray(_pixel(_BACKGROUND) * (width * height))
        band_top, band_h = height * 3 // 5 - height // 10, height // 5
        static[band_top * width * 4 : (band_top + band_h) * width * 4] = _pixel(_BAND) * (band_h * width)
        scale = max(1, min(6, (width - 40) // max(1, len(title) * _ADVANCE)))
        tx = max(0, (width - text_width(title, scale)) // 2)
        ty = max(0, height * 3 // 10 - _GLYPH_H * scale // 2)
        if ty + _GLYPH_H * scale <= height:
            render_text(static, width, title, tx, ty, scale, _TITLE)
        self._static = bytes(static)
        # The clock "HH:MM:SS" is the only part that changes.
        cs = max(1, min(8, (width - 40) // (8 * _ADVANCE), band_h // _GLYPH_H))
        self.clock_scale = cs
        cw, ch = text_width("00:00:00", cs), _GLYPH_H * cs
        self.clock_box = (max(0, (width - cw) // 2), band_top + (band_h - ch) // 2, cw, ch)
        self.frame_id = 0
        self.frame = bytearray(self._static)
        self.clock_text = ""

    def render(self, clock_text: str) -> bool:
        """Redraw for ``clock_text``; return whether the picture changed."""
        if clock_text == self.clock_text:
            return False
        frame = bytearray(self._static)
        x, y, w, h = self.clock_box
        if x + w <= self.width and y + h <= self.height:
            render_text(frame, self.width, clock_text, x, y, self.clock_scale, _CLOCK)
        self.frame, self.clock_text = frame, clock_text
        self.frame_id += 1
        return True


def _convert(native: bytes | bytearray, fmt: _PixelFormat) -> bytes:
    """Native (b, g, r, 0) pixels to a 32 bpp format with byte-aligned 8-bit channels."""
    if fmt == _NATIVE:
        return bytes(native)
    out = bytearray(len(native))
    for src, shift in ((2, fmt.red_shift), (1, fmt.green_shift), (0, fmt.blue_shift)):
        pos = 3 - shift // 8 if fmt.big_endian else shift // 8
        out[pos::4] = native[src::4]
    return bytes(out)


@dataclass(frozen=True)
class _PixelFormat:
    big_endian: bool
    red_shift: int
    green_shift: int
    blue_shift: int

    @classmethod
    def parse(cls, raw: bytes) -> _PixelFormat | None:
        """Parse a 16-byte PIXEL_FORMAT; None when the demo cannot produce it."""
        bpp, _depth, big, true_colour, rmax, gmax, bmax, rs, gs, bs = struct.unpack(">BBBBHHHBBB3x", raw)
        shifts = {rs, gs, bs}
        if bpp != 32 or not true_colour or (rmax, gmax, bmax) != (255, 255, 255):
            return None
        if len(shifts) != 3 or not shifts <= {0, 8, 16, 24}:
            return None
        return cls(bool(big), rs, gs, bs)

    def pack(self) -> bytes:
        return struct.pack(
            ">BBBBHHHBBB3x", 32, 24, int(self.big_endian), 1, 255, 255, 255,
            self.red_shift, self.green_shift, self.blue_shift,
        )  # fmt: skip


_NATIVE = _PixelFormat(False, 16, 8, 0)

# -- connections -------------------------------------------------------------------------------


class _Closed(Exception):
    """End this client's connection (bad message, unsupported format, failed authentication)."""


@dataclass
class _Request:
    incremental: bool
    x: int
    y: int
    w: int
    h: int

    def merge(self, other: _Request) -> _Request:
        x0, y0 = min(self.x, other.x), min(self.y, other.y)
        x1 = max(self.x + self.w, other.x + other.w)
        y1 = max(self.y + self.h, other.y + other.h)
        return _Request(self.incremental and other.incremental, x0, y0, x1 - x0, y1 - y0)


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.format = _NATIVE
        self.request: _Request | None = None
        self.sent_frame = -1
        self.ext_key_ack = False
        self.ext_key_acked = False
        self.wake = asyncio.Event()


class DemoVncServer:
    """A small RFB 3.8 server with VNC authentication; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        width: int = 720,
        height: int = 400,
        name: str = "consoleproxy demo",
    ) -> None:
        if not (16 <= width <= 8192 and 16 <= height <= 8192):
            raise ValueError("demo screen must be between 16x16 and 8192x8192")
        self.host = host
        self._port = port
        self._password = password if password is not None else secrets.token_urlsafe(6)[:8]
        self.width, self.height, self.name = width, height, name
        self.events: list[DemoInput] = []
        self._changed = asyncio.Condition()
        self._screen = _Screen(width, height, name)
        self._converted: dict[_PixelFormat, tuple[int, bytes]] = {}
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        return self._port

    @property
    def password(self) -> str:
        return self._password

    async def start(self) -> None:
        self._screen.render(time.strftime("%H:%M:%S"))
        self._server = await asyncio.start_server(self._serve, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick())

    async def close(self) -> None:
        """Stop listening, end every connection and the clock; idempotent."""
        if self._server is not None:
            self._server.close()
        tasks = [*self._tasks]
        if self._ticker is not None:
            tasks.append(self._ticker)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._server = self._ticker = None

    async def wait_for_events(
        self,
        predicate: Callable[[list[DemoInput]], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 (the tests' API)
    ) -> list[DemoInput]:
        """Wait until ``predicate(events)`` holds; raise ``TimeoutError`` after ``timeout`` s."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.events))
            return list(self.events)

    async def _record(self, event: DemoInput) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    # -- clock

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0 - time.time() % 1.0 + 0.005)
            if self._clients and self._screen.render(time.strftime("%H:%M:%S")):
                for c in self._clients:
                    c.wake.set()

    def _frame(self, fmt: _PixelFormat) -> bytes | bytearray:
        screen = self._screen
        if fmt == _NATIVE:
            return screen.frame
        cached = self._converted.get(fmt)
        if cached is None or cached[0] != screen.frame_id:
            cached = (screen.frame_id, _convert(screen.frame, fmt))
            self._converted[fmt] = cached
        return cached[1]

    # -- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = _Client(writer)
        sender: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await self._handshake(reader, writer)
            self._clients.add(client)
            sender = asyncio.create_task(self._send_loop(client))
            await self._read_loop(reader, client)
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.debug("demo VNC connection ended: %r", exc)
        except Exception:
            log.exception("demo VNC server: connection failed")
        except asyncio.CancelledError:
            # close() ends connections by cancelling their tasks. Python 3.11's start_server
            # callback logs a task that ends cancelled, so end normally (this is the task's top).
            pass
        finally:
            self._clients.discard(client)
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(rfb.format_version((3, 8)))
        try:
            major, minor = rfb.parse_version(await reader.readexactly(rfb.VERSION_LENGTH))
        except rfb.VersionError as exc:
            raise _Closed(str(exc)) from None
        if major != 3 or not 3 <= minor <= 8:
            raise _Closed(f"unsupported client version {major}.{minor}")
        if minor not in (7, 8):
            minor = 3  # 3.5 and friends mean 3.3 (RFC 6143 section 7.1.1)
        if minor == 3:
            writer.write(struct.pack(">I", rfb.SecurityType.VNC_AUTH))  # 3.3: the server picks
        else:
            writer.write(bytes((1, rfb.SecurityType.VNC_AUTH)))
            (choice,) = await reader.readexactly(1)
            if choice != rfb.SecurityType.VNC_AUTH:
                if minor == 8:
                    reason = b"Security type not offered"
                    writer.write(struct.pack(">II", 1, len(reason)) + reason)
                raise _Closed(f"client chose security type {choice}")
        challenge = secrets.token_bytes(16)
        writer.write(challenge)
        response = await reader.readexactly(16)
        if not hmac.compare_digest(response, rfb.vnc_auth_response(self._password, challenge)):
            reason = b"Authentication failed"
            writer.write(
                struct.pack(">I", 1) + (struct.pack(">I", len(reason)) + reason if minor == 8 else b"")
            )
            await writer.drain()
            raise _Closed("wrong password")
        writer.write(struct.pack(">I", 0))
        await reader.readexactly(1)  # ClientInit: shared or not, all clients share the demo
        name = self.name.encode("utf-8")
        writer.write(
            struct.pack(">HH", self.width, self.height) + _NATIVE.pack() + struct.pack(">I", len(name)) + name
        )
        await writer.drain()

    async def _read_loop(self, reader: asyncio.StreamReader, client: _Client) -> None:
        read = reader.readexactly
        while True:
            try:
                (mtype,) = await read(1)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    return  # clean close between messages
                raise
            if mtype == 0:  # SetPixelFormat
                fmt = _PixelFormat.parse((await read(19))[3:])
                if fmt is None:
                    raise _Closed("SetPixelFormat for a format the demo does not produce")
                client.format = fmt
            elif mtype == 2:  # SetEncodings
                (count,) = struct.unpack(">xH", await read(3))
                encodings = struct.unpack(f">{count}i", await read(4 * count))
                if _ENC_QEMU_EXT_KEY in encodings and not client.ext_key_acked:
                    client.ext_key_ack = True
                    client.wake.set()
            elif mtype == 3:  # FramebufferUpdateRequest
                inc, x, y, w, h = struct.unpack(">BHHHH", await read(9))
                req = _Request(bool(inc), x, y, w, h)
                client.request = req if client.request is None else client.request.merge(req)
                client.wake.set()
            elif mtype == 4:  # KeyEvent
                down, keysym = struct.unpack(">B2xI", await read(7))
                await self._record(KeyEvent(bool(down), keysym))
            elif mtype == 5:  # PointerEvent
                mask, x, y = struct.unpack(">BHH", await read(5))
                await self._record(PointerEvent(mask, x, y))
            elif mtype == 6:  # ClientCutText (negative length: extended clipboard, not recorded)
                (length,) = struct.unpack(">3xi", await read(7))
                if abs(length) > MAX_CUT_TEXT:
                    raise _Closed("ClientCutText too long")
                data = await read(abs(length))
                if length >= 0:
                    await self._record(CutText(data.decode("latin-1")))
            elif mtype == 150:  # EnableContinuousUpdates (never advertised)
                await read(9)
            elif mtype == 248:  # ClientFence (never advertised)
                (plen,) = struct.unpack(">7xB", await read(8))
                await read(plen)
            elif mtype == 250:  # xvp
                await read(3)
            elif mtype == 251:  # SetDesktopSize (never advertised)
                (screens,) = struct.unpack(">5xB", await read(6))
                await read(1 + 16 * screens)
            elif mtype == 255:  # QEMU
                (sub,) = await read(1)
                if sub == 0:
                    down, keysym, keycode = struct.unpack(">HII", await read(10))
                    await self._record(ExtendedKeyEvent(bool(down), keysym, keycode))
                elif sub == 1:
                    (op,) = struct.unpack(">H", await read(2))
                    if op == 2:
                        await read(6)
                    elif op not in (0, 1):
                        raise _Closed(f"unknown QEMU audio operation {op}")
                else:
                    raise _Closed(f"unknown QEMU message subtype {sub}")
            else:
                raise _Closed(f"unknown client message type {mtype}")

    async def _send_loop(self, client: _Client) -> None:
        """The only writer after the handshake: acks and framebuffer updates, in order."""
        writer = client.writer
        while True:
            await client.wake.wait()
            client.wake.clear()
            out = bytearray()
            if client.ext_key_ack:
                client.ext_key_ack, client.ext_key_acked = False, True
                out += struct.pack(">BxHHHHHi", 0, 1, 0, 0, self.width, self.height, _ENC_QEMU_EXT_KEY)
            req = client.request
            if req is not None:
                update = self._update(client, req)
                if update is not None:
                    out += update
                    client.request = None
            if out:
                writer.write(out)
                await writer.drain()

    def _update(self, client: _Client, req: _Request) -> bytes | None:
        """A FramebufferUpdate answering ``req``, or None to hold an incremental request."""
        screen = self._screen
        x0, y0 = min(req.x, self.width), min(req.y, self.height)
        x1, y1 = min(req.x + req.w, self.width), min(req.y + req.h, self.height)
        if req.incremental:
            if client.sent_frame == screen.frame_id:
                return None  # nothing changed since this client's last update
            cx, cy, cw, ch = screen.clock_box
            x0, y0 = max(x0, cx), max(y0, cy)
            x1, y1 = min(x1, cx + cw), min(y1, cy + ch)
            if x1 <= x0 or y1 <= y0:
                return None  # only the clock ever changes
        client.sent_frame = screen.frame_id
        w, h = max(0, x1 - x0), max(0, y1 - y0)
        if not w or not h:
            return struct.pack(">BxH", 0, 0)
        frame = self._frame(client.format)
        stride = self.width * 4
        rows = [frame[y * stride + x0 * 4 : y * stride + x1 * 4] for y in range(y0, y1)]
        header = struct.pack(">BxHHHHHi", 0, 1, x0, y0, w, h, _ENC_RAW)
        return header + b"".join(rows)
