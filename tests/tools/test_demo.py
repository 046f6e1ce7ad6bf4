"""The embedded demo VNC server, reached with asyncio streams and ``rfb_server.ServerHandshake`` by hand."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from consoleproxy.protocol import rfb, rfb_server
from consoleproxy.tools.demo import CutText, DemoVncServer, ExtendedKeyEvent, KeyEvent, PointerEvent

TIMEOUT = 10.0
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def vnc() -> AsyncIterator[DemoVncServer]:
    server = DemoVncServer(password="pw")
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def authenticate(port: int, password: str | None) -> tuple[Stream, rfb.Authenticated | rfb.AuthFailed]:
    """The proxy's glue in miniature: read, feed, write until the handshake ends."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    hs = rfb_server.ServerHandshake(password)
    async with asyncio.timeout(TIMEOUT):
        while True:
            data = await r.read(4096)
            assert data, "demo server closed during the handshake"
            hs.receive_data(data)
            w.write(hs.data_to_send())
            for ev in hs.events():
                assert isinstance(ev, rfb.Authenticated | rfb.AuthFailed)
                assert hs.leftover() == b""
                return (r, w), ev


async def connect(port: int, password: str = "pw") -> tuple[Stream, int, int, bytes, bytes]:
    """Authenticate, send ClientInit; return the stream and ServerInit's size, format and name."""
    (r, w), ev = await authenticate(port, password)
    assert ev == rfb.Authenticated((3, 8))
    w.write(b"\x01")  # ClientInit, shared
    async with asyncio.timeout(TIMEOUT):
        width, height = struct.unpack(">HH", await r.readexactly(4))
        pixel_format = await r.readexactly(16)
        (name_len,) = struct.unpack(">I", await r.readexactly(4))
        name = await r.readexactly(name_len)
    return (r, w), width, height, pixel_format, name


async def read_update(r: asyncio.StreamReader) -> list[tuple[int, int, int, int, int, bytes]]:
    """One FramebufferUpdate: (x, y, w, h, encoding, pixels) per rectangle (32 bpp)."""
    async with asyncio.timeout(TIMEOUT):
        mtype, nrects = struct.unpack(">BxH", await r.readexactly(4))
        assert mtype == 0
        rects = []
        for _ in range(nrects):
            x, y, w, h, enc = struct.unpack(">HHHHi", await r.readexactly(12))
            pixels = await r.readexactly(w * h * 4) if enc == 0 else b""
            rects.append((x, y, w, h, enc, pixels))
        return rects


def fbur(incremental: bool, x: int = 0, y: int = 0, w: int = 720, h: int = 400) -> bytes:
    return struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h)


def pixels_of(data: bytes) -> set[bytes]:
    return {data[i : i + 4] for i in range(0, len(data), 4)}


async def test_handshake_server_init_and_a_picture(vnc: DemoVncServer) -> None:
    (r, w), width, height, pixel_format, name = await connect(vnc.port)
    assert (width, height, name) == (720, 400, b"consoleproxy demo")
    bpp, depth, big_endian, true_colour, rmax, gmax, bmax, rs, gs, bs = struct.unpack(
        ">BBBBHHHBBB3x", pixel_format
    )
    assert (bpp, depth, big_endian, true_colour) == (32, 24, 0, 1)
    assert (rmax, gmax, bmax, rs, gs, bs) == (255, 255, 255, 16, 8, 0)
    w.write(fbur(False))
    [(x, y, rw, rh, enc, pixels)] = await read_update(r)
    assert (x, y, rw, rh, enc) == (0, 0, 720, 400, 0)
    assert len(pixels) == 720 * 400 * 4
    assert len(pixels_of(pixels)) >= 3  # background, title and clock at least
    w.close()


async def test_incremental_request_is_held_until_the_clock_changes(vnc: DemoVncServer) -> None:
    (r, w), *_ = await connect(vnc.port)
    w.write(fbur(False))
    [(*_, full)] = await read_update(r)
    w.write(fbur(True))  # nothing changed yet: answered only at the next second
    [(x, y, rw, rh, enc, pixels)] = await read_update(r)  # within TIMEOUT, i.e. the clock ticks
    assert enc == 0 and len(pixels) == rw * rh * 4
    assert 0 < rw * rh < 720 * 400 // 2  # only the clock's area, not the whole screen
    assert x + rw <= 720 and y + rh <= 400
    before = b"".join(full[((y + row) * 720 + x) * 4 : ((y + row) * 720 + x + rw) * 4] for row in range(rh))
    assert pixels != before  # the picture changed: it was not answered with a stale frame
    w.close()


async def test_request_is_clipped_to_the_screen(vnc: DemoVncServer) -> None:
    (r, w), *_ = await connect(vnc.port)
    w.write(fbur(False, 700, 390, 100, 100))
    [(x, y, rw, rh, enc, pixels)] = await read_update(r)
    assert (x, y, rw, rh, enc, len(pixels)) == (700, 390, 20, 10, 0, 20 * 10 * 4)
    w.close()


async def test_input_is_recorded(vnc: DemoVncServer) -> None:
    (_, w), *_ = await connect(vnc.port)
    w.write(struct.pack(">BBxxI", 4, 1, 0x61))  # KeyEvent 'a' down
    w.write(struct.pack(">BBHH", 5, 1, 10, 20))  # PointerEvent
    w.write(struct.pack(">BBHII", 255, 0, 0, 0x61, 0x1E))  # QEMU extended key 'a' up
    w.write(struct.pack(">BxxxI", 6, 5) + b"hello")  # ClientCutText
    events = await vnc.wait_for_events(lambda evs: len(evs) >= 4, timeout=TIMEOUT)
    assert events == [
        KeyEvent(True, 0x61),
        PointerEvent(1, 10, 20),
        ExtendedKeyEvent(False, 0x61, 0x1E),
        CutText("hello"),
    ]
    w.close()


async def test_wait_for_events_times_out(vnc: DemoVncServer) -> None:
    with pytest.raises(TimeoutError):
        await vnc.wait_for_events(lambda evs: bool(evs), timeout=0.05)


async def test_wrong_password_fails_with_the_servers_reason(vnc: DemoVncServer) -> None:
    (r, w), ev = await authenticate(vnc.port, "wrong")
    assert ev == rfb.AuthFailed("Authentication failed")
    async with asyncio.timeout(TIMEOUT):
        assert await r.read() == b""  # and the server hangs up
    w.close()


async def test_random_password_when_none_given() -> None:
    a, b = DemoVncServer(), DemoVncServer()
    assert 0 < len(a.password) <= 8  # VNC authentication uses only 8 bytes
    assert a.password != b.password
    await a.start()
    try:
        (_, w), ev = await authenticate(a.port, a.password)
        assert isinstance(ev, rfb.Authenticated)
        w.close()
    finally:
        await a.close()


async def test_qemu_extended_key_event_is_acknowledged(vnc: DemoVncServer) -> None:
    (r, w), *_ = await connect(vnc.port)
    w.write(struct.pack(">BxHii", 2, 2, 0, -258))  # SetEncodings: Raw, QEMU extended key event
    [(_, _, _, _, enc, _)] = await read_update(r)
    assert enc == -258
    w.close()


async def test_set_pixel_format_as_novnc_asks_swaps_red_and_blue(vnc: DemoVncServer) -> None:
    (r, w), *_ = await connect(vnc.port)
    w.write(fbur(False, 0, 0, 1, 1))
    [(*_, native)] = await read_update(r)
    # noVNC: 32 bpp, depth 24, little endian, true colour, max 255, shifts red 0, green 8, blue 16.
    w.write(b"\x00\x00\x00\x00" + struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16))
    w.write(fbur(False, 0, 0, 1, 1))
    [(*_, converted)] = await read_update(r)
    assert native[3] == converted[3] == 0 and native[0] != native[2]
    assert converted[:3] == native[2::-1]
    w.close()


async def test_set_pixel_format_16bpp_closes(vnc: DemoVncServer) -> None:
    (r, w), *_ = await connect(vnc.port)
    w.write(b"\x00\x00\x00\x00" + struct.pack(">BBBBHHHBBB3x", 16, 16, 0, 1, 31, 63, 31, 11, 5, 0))
    async with asyncio.timeout(TIMEOUT):
        assert await r.read() == b""
    w.close()


async def test_many_clients_at_once_and_close_ends_them(vnc: DemoVncServer) -> None:
    async def one() -> Stream:
        (r, w), *_ = await connect(vnc.port)
        for _ in range(20):  # many small messages, then an update that proves they were read
            w.write(struct.pack(">BBHH", 5, 0, 1, 1))
        w.write(fbur(False, 0, 0, 16, 16))
        [(*_, pixels)] = await read_update(r)
        assert len(pixels) == 16 * 16 * 4
        return r, w

    streams = await asyncio.gather(*(one() for _ in range(20)))
    await vnc.wait_for_events(lambda evs: len(evs) >= 400, timeout=TIMEOUT)
    await vnc.close()
    async with asyncio.timeout(TIMEOUT):
        for r, w in streams:
            assert await r.read() == b""
            w.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", vnc.port)
