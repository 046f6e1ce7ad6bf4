"""The browser side of a console's WebSocket after the opening handshake, sans I/O (RFC 6455).

``Connection`` is one connection's state machine, the way ``websockets.protocol.Protocol`` is:
bytes in (``receive_data``, ``receive_eof``) give events and bytes to send out (``outgoing``);
the asyncio layer (``browser.py``) writes those bytes, closes the transport when ``state`` is
``CLOSED`` and arms a timer only when ``send_close`` asks for one. It owns every WebSocket rule
of the console path:

- parsing (``FrameParser``): a client's frames must be masked (else 1002); a text message is
  1003 (RFB is binary); a message longer than ``max_message`` is 1009, checked from the frame
  headers before the payload arrives; malformed frames and close payloads are 1002 (1007 for a
  close reason that is not UTF-8). A violation raises ``FrameError`` with the code to close with.
- pings are answered (the pong goes to ``outgoing``); ``heartbeat`` decides when we ping a
  silent browser and when one that does not answer is dead.
- the close handshake, both ways: our close frame (``send_close``), then the browser's reply
  ends the connection, or ``close_timeout`` seconds; the browser's close frame is answered by
  ours and the connection ends at once.

Data events are ``bytes``: the unmasked payload of a binary message, in pieces as they arrive
(nothing is buffered but a frame header), then ``END_OF_MESSAGE`` after a message's last piece;
``Ping``, ``Pong`` and ``Close`` are reported as well. ``frame_header`` and ``frame`` make the
frames a server sends (unmasked, final).

Unmasking uses websockets' C ``apply_mask`` (its public ``speedups`` module; the pure-Python
``websockets.utils.apply_mask`` when the extension is not built). Measured (timeit, one 256 KiB
read, the dev machine): 36 µs with the C one (6.7 GiB/s; aiohttp's helper, used before, 57 µs
with its copy), 3.3 ms with the pure-Python one (~90x slower).
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from consoleproxy.errors import ConsoleProxyError

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = [
    "BINARY",
    "CLOSE",
    "CLOSED",
    "CLOSE_TIMEOUT",
    "CLOSING",
    "END_OF_MESSAGE",
    "OPEN",
    "PING",
    "PING_FRAME",
    "PONG",
    "TEXT",
    "Beat",
    "Close",
    "Connection",
    "Event",
    "FrameError",
    "FrameParser",
    "Ping",
    "Pong",
    "close_frame",
    "close_reason",
    "frame",
    "frame_header",
]


class FrameError(ConsoleProxyError):
    """The client broke the WebSocket protocol; ``code`` is the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Ping(NamedTuple):
    payload: bytes


class Pong(NamedTuple):
    payload: bytes


class Close(NamedTuple):
    code: int | None  # None: the client sent no status code
    reason: str


class _EndOfMessage:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = _EndOfMessage()

Event = bytes | Ping | Pong | Close | _EndOfMessage

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_H2 = struct.Struct(">BB").pack
_H4 = struct.Struct(">BBH").pack
_H10 = struct.Struct(">BBQ").pack
# Close codes a peer may send (RFC 6455 7.4.1, 7.4.2): 1000-1003, 1007-1011, 3000-4999.
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011))


def frame_header(length: int, opcode: int = BINARY) -> bytes:
    """Header of one final, unmasked frame (what a server sends) of ``length`` payload bytes
    (RFC 6455 5.2); the relay writes it and a view of its read buffer in one writev(2)."""
    if length < 126:
        return _H2(0x80 | opcode, length)
    if length < 65536:
        return _H4(0x80 | opcode, 126, length)
    return _H10(0x80 | opcode, 127, length)


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """One final, unmasked frame, e.g. a pong, a close or a text message."""
    return frame_header(len(payload), opcode) + payload


# A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455 5.5: control frames <= 125).
MAX_CLOSE_REASON = 123


def close_reason(text: str) -> bytes:
    """``text`` as a close reason: UTF-8, cut at a character boundary to fit, '...' marking a cut."""
    data = text.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON:
        return data
    return data[: MAX_CLOSE_REASON - 3].decode("utf-8", "ignore").encode() + b"..."


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """A server's close frame: status ``code`` and a reason from ``close_reason``."""
    return frame(CLOSE, _U16.pack(code) + reason[:MAX_CLOSE_REASON])


PING_FRAME = frame(PING)


class FrameParser:
    """Client-to-server frames -> events. One per connection; not reusable after ``FrameError``."""

    __slots__ = (
        "_control", "_fin", "_head", "_in_message", "_mask", "_max", "_msg_len", "_opcode", "_remaining",
        "control_seen",
    )

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        self._head = b""  # a frame header not complete yet
        self._remaining = 0  # payload bytes of the current frame still to come
        self._mask = b""  # the current frame's mask, rotated to the next payload byte
        self._opcode = CONT
        self._fin = False
        self._control = bytearray()  # a control frame's payload (at most 125 bytes)
        self._in_message = False  # between a non-final binary frame and its final continuation
        self._msg_len = 0
        self.control_seen = False  # set when a feed's events include a control frame's

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        events: list[Event] = []
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._remaining:
                k = min(self._remaining, n - i)
                self._payload(view[i : i + k], events)
                i += k
                continue
            if self._head:
                # Join a split header with what follows (at most 14 bytes are needed).
                head = self._head + bytes(view[i : i + 14])
                used = self._header(head, events)
                if used == 0:
                    self._head = head
                    break
                i += used - len(self._head)  # the rest of ``used`` was held from before
                self._head = b""
                continue
            used = self._header(view[i : i + 14], events)
            if used == 0:
                self._head = bytes(view[i:])
                break
            i += used
        return events

    def _header(self, h: bytes | memoryview, events: list[Event]) -> int:
        """Parse one frame header from ``h``; returns its length, or 0 if ``h`` is too short."""
        if len(h) < 2:
            return 0
        b0, b1 = h[0], h[1]
        if not b1 & 0x80:
            raise FrameError(1002, "client frames must be masked (RFC 6455 5.1)")
        if b0 & 0x70:
            raise FrameError(1002, "reserved bits set (no extension was negotiated)")
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            if len(h) < 8:
                return 0
            (length,) = _U16.unpack_from(h, 2)
            pos = 4
        elif length == 127:
            if len(h) < 14:
                return 0
            (length,) = _U64.unpack_from(h, 2)
            pos = 10
            if length >> 63:
                raise FrameError(1002, "frame length has its top bit set")
        elif len(h) < 6:
            return 0
        fin = bool(b0 & 0x80)
        opcode = b0 & 0x0F
        if opcode >= 0x8:
            if opcode not in (CLOSE, PING, PONG):
                raise FrameError(1002, f"unknown control opcode {opcode:#x}")
            if not fin:
                raise FrameError(1002, "control frames must not be fragmented")
            if length > 125:
                raise FrameError(1002, f"control frame of {length} bytes (at most 125)")
            self._control.clear()
        elif opcode == TEXT:
            raise FrameError(1003, "text frames are not accepted (RFB is binary)")
        elif opcode == BINARY:
            if self._in_message:
                raise FrameError(1002, "a new message started before the previous one ended")
            self._msg_len = 0
        elif opcode == CONT:
            if not self._in_message:
                raise FrameError(1002, "continuation frame without a message to continue")
        else:
            raise FrameError(1002, f"unknown data opcode {opcode:#x}")
        if opcode < 0x8:
            self._msg_len += length
            if self._msg_len > self._max:
                raise FrameError(1009, f"message longer than {self._max} bytes")
            self._in_message = not fin
        self._opcode = opcode
        self._fin = fin
        self._mask = bytes(h[pos : pos + 4])
        self._remaining = length
        if length == 0:
            self._frame_done(events)
        return pos + 4

    def _payload(self, chunk: memoryview, events: list[Event]) -> None:
        mask = self._mask
        data = apply_mask(chunk, mask)  # one copy: ``chunk`` may be a view of a shared buffer
        k = len(data) & 3
        if k:  # the next byte of this frame uses the mask from position k on
            self._mask = mask[k:] + mask[:k]
        self._remaining -= len(data)
        if self._opcode >= 0x8:
            self._control += data
        else:
            events.append(data)
        if not self._remaining:
            self._frame_done(events)

    def _frame_done(self, events: list[Event]) -> None:
        op = self._opcode
        if op < 0x8:
            if self._fin:
                events.append(END_OF_MESSAGE)
            return
        payload = bytes(self._control)
        self.control_seen = True
        if op == PING:
            events.append(Ping(payload))
        elif op == PONG:
            events.append(Pong(payload))
        else:
            events.append(_close(payload))


def _close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise FrameError(1002, "close frame with a 1-byte payload")
    (code,) = _U16.unpack_from(payload)
    if code not in _VALID_CLOSE and not 3000 <= code <= 4999:
        raise FrameError(1002, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(1007, "close reason is not UTF-8") from None
    return Close(code, reason)


# How long a browser has to answer our close frame before its connection is cut (aiohttp's
# WebSocketResponse default, which the console path kept when it stopped using aiohttp).
CLOSE_TIMEOUT = 10.0

# Connection states (RFC 6455 4.1, 7): OPEN from the 101 on; CLOSING once our close frame is
# out and the browser's is awaited; CLOSED: the transport is to be closed (nothing more is read).
OPEN, CLOSING, CLOSED = "open", "closing", "closed"


class Beat(enum.Enum):
    """What ``Connection.heartbeat`` asks of the asyncio layer."""

    IDLE = "idle"  # nothing to do
    PING = "ping"  # write ``PING_FRAME``
    DEAD = "dead"  # our ping went unanswered: cut the connection (abort)


class Connection:
    """One browser WebSocket connection from its 101 on: bytes in, events and bytes out.

    After ``receive_data`` (or any other call) the caller writes ``outgoing`` (a list it then
    clears, usually empty: a pong, a close reply) and closes the transport once ``state`` is
    ``CLOSED``.
    """

    __slots__ = (
        "_parser", "close_timeout", "failed", "heard", "outgoing", "peer_closed", "ping_sent", "state",
    )

    def __init__(self, max_message: int, *, now: float = 0.0, close_timeout: float | None = None) -> None:
        self._parser = FrameParser(max_message)
        self.state = OPEN
        self.outgoing: list[bytes] = []
        self.failed: FrameError | None = None  # the browser broke the protocol: nothing more is parsed
        self.peer_closed = False  # the browser's close frame (or EOF) has arrived
        self.close_timeout = CLOSE_TIMEOUT if close_timeout is None else close_timeout
        self.heard = now  # the last bytes from the browser (the heartbeat's clock)
        self.ping_sent = 0.0

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """The browser's bytes -> events. Raises ``FrameError`` on a violation: the caller then
        sends ``send_close(exc.code, ...)``, after which the connection ends at once."""
        self.heard = now
        if self.failed is not None or self.peer_closed:
            return []  # nothing may follow a close frame (RFC 6455 5.5.1); a broken stream is not read
        parser = self._parser
        try:
            events = parser.feed(data)
        except FrameError as exc:
            self.failed = exc
            if self.state is CLOSING:
                self.state = CLOSED  # no reply to wait for from a broken stream
            raise
        if not parser.control_seen:
            return events  # the relay's usual read: message pieces only, nothing to look at
        parser.control_seen = False
        for ev in events:
            if type(ev) is bytes or ev is END_OF_MESSAGE:
                continue
            if isinstance(ev, Ping):
                if self.state is OPEN:
                    self.outgoing.append(frame(PONG, ev.payload))
            elif isinstance(ev, Close):
                self.peer_closed = True
                if self.state is CLOSING:
                    self.state = CLOSED  # the reply to our close frame: the handshake is complete
                # OPEN: the owner answers with send_close (its code), then the connection ends.
                break
        return events

    def receive_eof(self) -> None:
        """The browser's end of the TCP stream: nothing to send a close frame to any more."""
        self.peer_closed = True
        self.state = CLOSED

    def send_close(self, code: int, reason: bytes = b"") -> float | None:
        """Queue our close frame (once). Returns the seconds to wait for the browser's reply
        (then call ``close_timed_out``), or None when the connection ends now (``state`` is
        ``CLOSED``: the browser closed first, broke the protocol, or we closed already)."""
        if self.state is not OPEN:
            return None
        self.outgoing.append(close_frame(code, reason))
        if self.peer_closed or self.failed is not None:
            self.state = CLOSED
            return None
        self.state = CLOSING
        return self.close_timeout

    def close_timed_out(self) -> bool:
        """The timer ``send_close`` asked for has run out: True if the connection must be cut
        (abort; the browser never answered), False if it ended meanwhile."""
        if self.state is CLOSING:
            self.state = CLOSED
            return True
        return False

    def lost(self) -> None:
        """The transport is gone."""
        self.state = CLOSED

    def heartbeat(self, now: float, interval: float) -> Beat:
        """Ping a browser silent for ``interval`` s; a browser that sends nothing within
        ``interval / 2`` s of our ping is dead (aiohttp's heartbeat rule). Any bytes count as
        an answer, not only the pong."""
        if self.state is not OPEN:
            return Beat.IDLE
        sent = self.ping_sent
        if sent > self.heard:  # our ping is unanswered: nothing read since it went out
            return Beat.DEAD if now - sent >= interval / 2 else Beat.IDLE
        if now - self.heard >= interval:
            self.ping_sent = now
            return Beat.PING
        return Beat.IDLE

    def send_text(self, text: bytes) -> bytes:
        """A text message's frame, or b"" once closing (nothing may follow our close frame)."""
        return frame(TEXT, text) if self.state is OPEN else b""

    def send_binary(self, data: bytes) -> bytes:
        return frame(BINARY, data) if self.state is OPEN else b""
