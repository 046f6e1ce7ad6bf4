"""relay.write_buffers: one writev(2) when the transport holds nothing, the transport otherwise.

Real sockets (a socketpair) and asyncio's own transport: the bytes must arrive complete and in
order whether the socket takes all, part or none of a write, and errors must reach the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consoleproxy.net.relay import MAX_IOV, socket_fd, write_buffers


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


@contextlib.asynccontextmanager
async def _pair(sndbuf: int | None = None) -> AsyncIterator[tuple[asyncio.Transport, _Sink, socket.socket]]:
    """Our transport on one end of a socketpair, the raw peer socket on the other; both closed after."""
    ours, peer = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    loop = asyncio.get_running_loop()
    transport, proto = await loop.connect_accepted_socket(_Sink, ours)
    peer.setblocking(False)
    try:
        yield transport, proto, peer
    finally:
        transport.close()
        peer.close()


async def _read_all(peer: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(peer, 1 << 20), 10)
        assert chunk, f"peer closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def _pieces(count: int, size: int) -> list[bytes]:
    # Each piece says its own index, so a reordering or a lost piece shows in the comparison.
    return [struct.pack(">I", i) * (size // 4) for i in range(count)]


async def test_everything_fits_goes_in_one_writev() -> None:
    async with _pair() as (transport, _, peer):
        fd = socket_fd(transport)
        assert fd == transport.get_extra_info("socket").fileno()
        bufs = [b"\x82\x05", memoryview(b"hello"), bytearray(b"!")]
        write_buffers(transport, fd, bufs)
        assert transport.get_write_buffer_size() == 0  # the socket took it all, nothing buffered
        assert await _read_all(peer, 8) == b"\x82\x05hello!"


async def test_partial_writes_leave_the_rest_to_the_transport_in_order() -> None:
    # A small socket buffer: writev takes part of the first call, the rest goes to the transport;
    # later calls see a non-empty transport buffer and queue behind it.
    async with _pair(sndbuf=16 * 1024) as (transport, proto, peer):
        fd = socket_fd(transport)
        first = _pieces(8, 64 * 1024)
        write_buffers(transport, fd, first)
        assert transport.get_write_buffer_size() > 0, "the socket took 512 KiB at once"
        assert proto.paused  # the transport's flow control sees what it buffered
        # Make room in the socket without letting the loop run: the transport still holds the
        # rest of the first call, so the second must queue behind it, not jump ahead by writev.
        head = peer.recv(64 * 1024)
        assert head
        second = _pieces(3, 40 * 1024)
        write_buffers(transport, fd, second)
        want = b"".join(first) + b"".join(second)
        assert head + await _read_all(peer, len(want) - len(head)) == want


async def test_many_small_pieces_are_joined_not_truncated() -> None:
    async with _pair() as (transport, _, peer):
        bufs = _pieces(MAX_IOV * 3 + 1, 8)
        write_buffers(transport, socket_fd(transport), bufs)
        want = b"".join(bufs)
        assert await _read_all(peer, len(want)) == want


async def test_empty_pieces_are_harmless() -> None:
    async with _pair() as (transport, _, peer):
        write_buffers(transport, socket_fd(transport), [b"", b"ab", b"", bytearray(), b"c"])
        assert await _read_all(peer, 3) == b"abc"
        assert transport.get_write_buffer_size() == 0


async def test_a_write_error_reaches_the_protocol_not_the_caller() -> None:
    async with _pair() as (transport, proto, peer):
        # The peer resets the connection: writev fails with EPIPE/ECONNRESET.
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        for _ in range(3):  # the first write after a reset may still be accepted by the kernel
            write_buffers(transport, socket_fd(transport), [b"x" * 65536])
            await asyncio.sleep(0)
        exc = await asyncio.wait_for(proto.lost, 10)
        assert isinstance(exc, OSError)


async def test_no_direct_writes_to_a_closing_transport() -> None:
    async with _pair() as (transport, _, peer):
        transport.close()
        write_buffers(transport, socket_fd(transport), [b"late"])
        peer.settimeout(5)
        assert await asyncio.to_thread(peer.recv, 16) == b""  # closed, and "late" never sent


class _FakeTLS:
    """What asyncio's TLS transport answers: an SSL object, and the TCP socket under it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"ssl_object": object(), "socket": self.sock}.get(name, default)


def test_a_tls_transport_is_never_written_to_directly() -> None:
    with socket.socket() as sock:
        assert socket_fd(_FakeTLS(sock)) == -1  # type: ignore[arg-type]


def test_no_socket_no_fd() -> None:
    class _NoSocket:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    assert socket_fd(_NoSocket()) == -1  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, 1 << 20])
async def test_large_single_buffers_round_trip(size: int) -> None:
    async with _pair(sndbuf=32 * 1024) as (transport, _, peer):
        data = os.urandom(size)
        write_buffers(transport, socket_fd(transport), [b"H", memoryview(data)])
        assert await _read_all(peer, size + 1) == b"H" + data
