"""The console WebSocket's state machine (wsframes.Connection) and opening handshake (browser.py),
byte by byte, without sockets: the handshake's 101 or refusal, pings and pongs, the close
handshake both ways and its timeout decision, the heartbeat's decisions and the caps."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import logging
import struct
from typing import Any

import pytest
from test_wsframes import BIN, CLOSE, PING, PONG, TEXT, client_frame
from websockets.server import ServerProtocol

from consoleproxy.net.browser import (
    HANDSHAKE_QUEUE,
    NOTICE_PROTOCOL,
    BrowserClosed,
    BrowserConnection,
    is_console_request,
)
from consoleproxy.protocol.wsframes import (
    CLOSED,
    CLOSING,
    END_OF_MESSAGE,
    OPEN,
    PING_FRAME,
    Beat,
    Close,
    Connection,
    FrameError,
    Ping,
    close_frame,
    frame,
    frame_header,
)

KEY = base64.b64encode(b"0123456789abcdef").decode()
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
ACCEPT = base64.b64encode(hashlib.sha1((KEY + GUID).encode()).digest()).decode()


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack(">H", code) + reason


# --- wsframes.Connection ------------------------------------------------------------------------


def test_a_ping_is_answered_with_a_pong_of_its_payload_and_a_pong_is_not() -> None:
    c = Connection(1 << 20)
    events = c.receive_data(client_frame(PING, b"hi") + client_frame(BIN, b"x"), now=1.0)
    assert events == [Ping(b"hi"), b"x", END_OF_MESSAGE]
    assert c.outgoing == [frame(PONG, b"hi")] == [b"\x8a\x02hi"]
    c.outgoing.clear()
    c.receive_data(client_frame(PONG, b"hb"), now=2.0)
    assert c.outgoing == []


def test_we_close_first_then_the_browser_answers() -> None:
    c = Connection(1 << 20, close_timeout=7.0)
    assert c.send_close(4001, b"bye") == 7.0  # arm a timer for the reply
    assert c.state is CLOSING
    assert c.outgoing == [close_frame(4001, b"bye")] == [b"\x88\x05\x0f\xa1bye"]
    assert c.send_close(1000) is None and len(c.outgoing) == 1, "one close frame only"
    assert c.send_text(b"late") == b"" and c.send_binary(b"late") == b"", "nothing after our close"
    c.receive_data(client_frame(BIN, b"in flight"), now=1.0)  # data before the reply: read, not an error
    assert c.state is CLOSING
    c.receive_data(client_frame(CLOSE, close_payload(4001)), now=1.0)
    assert c.state is CLOSED  # the transport closes now
    assert c.close_timed_out() is False, "the timer finds the connection ended: no abort"


def test_the_browser_closes_first_and_our_reply_ends_the_connection() -> None:
    c = Connection(1 << 20)
    events = c.receive_data(client_frame(CLOSE, close_payload(1001, b"away")), now=1.0)
    assert events == [Close(1001, "away")]
    assert c.peer_closed and c.state is OPEN  # the owner answers, with its own code
    assert c.send_close(1000) is None  # no timer: nothing more is awaited
    assert c.state is CLOSED
    assert c.outgoing == [close_frame(1000)]
    assert c.receive_data(client_frame(BIN, b"after close"), now=2.0) == [], "nothing after a close"


def test_an_unanswered_close_times_out() -> None:
    c = Connection(1 << 20, close_timeout=0.5)
    assert c.send_close(1001, b"shutting down") == 0.5
    assert c.close_timed_out() is True  # abort the transport
    assert c.state is CLOSED
    assert c.close_timed_out() is False


def test_a_protocol_error_closes_with_its_code_at_once() -> None:
    c = Connection(100)
    with pytest.raises(FrameError) as info:
        c.receive_data(client_frame(BIN, bytes(101)), now=1.0)
    assert info.value.code == 1009  # the cap, from the header
    assert c.send_close(info.value.code, b"too long") is None  # no reply awaited from a broken stream
    assert c.state is CLOSED and c.outgoing == [close_frame(1009, b"too long")]
    assert c.receive_data(client_frame(BIN, b"x"), now=2.0) == []


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(TEXT, b"t"), 1003),
        (client_frame(BIN, b"x", mask=None), 1002),
        (client_frame(CLOSE, close_payload(1000, b"\xff")), 1007),
    ],
)
def test_violations_carry_their_close_codes(data: bytes, code: int) -> None:
    with pytest.raises(FrameError) as info:
        Connection(1 << 20).receive_data(data, now=0.0)
    assert info.value.code == code


def test_a_protocol_error_while_closing_ends_the_connection() -> None:
    c = Connection(1 << 20)
    c.send_close(1000)
    with pytest.raises(FrameError):
        c.receive_data(client_frame(TEXT, b"t"), now=1.0)
    assert c.state is CLOSED


def test_eof_ends_the_connection_and_nothing_is_sent_to_it() -> None:
    c = Connection(1 << 20)
    c.receive_eof()
    assert c.state is CLOSED
    assert c.send_close(1000) is None and c.outgoing == []


def test_heartbeat_pings_a_silent_browser_and_gives_up_after_half_the_interval() -> None:
    c = Connection(1 << 20, now=100.0)
    assert c.heartbeat(109.0, 10.0) is Beat.IDLE  # heard 9 s ago
    assert c.heartbeat(110.0, 10.0) is Beat.PING
    assert c.heartbeat(114.9, 10.0) is Beat.IDLE  # the pong has half the interval
    assert c.heartbeat(115.0, 10.0) is Beat.DEAD
    assert PING_FRAME == b"\x89\x00"


def test_any_bytes_answer_the_heartbeat_ping() -> None:
    c = Connection(1 << 20, now=0.0)
    assert c.heartbeat(10.0, 10.0) is Beat.PING
    c.receive_data(client_frame(BIN, b"k"), now=12.0)  # a key press, not a pong
    assert c.heartbeat(16.0, 10.0) is Beat.IDLE
    assert c.heartbeat(22.0, 10.0) is Beat.PING


def test_no_heartbeat_once_closing() -> None:
    c = Connection(1 << 20, now=0.0)
    c.send_close(1000)
    assert c.heartbeat(100.0, 10.0) is Beat.IDLE


def test_frame_is_frame_header_and_payload() -> None:
    for n in (0, 125, 126, 65535, 65536):
        payload = bytes(n)
        assert frame(BIN, payload) == frame_header(n) + payload
    assert frame_header(5) == b"\x82\x05"
    assert frame_header(300) == b"\x82\x7e\x01\x2c"
    assert frame_header(70_000)[:2] == b"\x82\x7f"
    assert frame(TEXT, b"ok") == b"\x81\x02ok"


# --- the opening handshake (browser.py) ----------------------------------------------------------


class FakeTransport:
    """What BrowserConnection uses of a transport, recording what it is asked to do."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.protocol: Any = None
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 50000) if name == "peername" else default


def upgrade(path: str = "/websockify?token=abc", extra: str = "", *, key: str = KEY) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: console.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def open_console(head: bytes, rest: bytes = b"") -> tuple[BrowserConnection, FakeTransport, Any]:
    t = FakeTransport()
    conn = BrowserConnection(t, 1 << 20)  # type: ignore[arg-type]
    return conn, t, conn.start(head, rest)


def response_head(t: FakeTransport) -> tuple[str, dict[str, str]]:
    head = bytes(t.written).split(b"\r\n\r\n", 1)[0].decode()
    status, *lines = head.split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ("", None),  # noVNC 1.2 and later
        ("Sec-WebSocket-Protocol: binary\r\n", "binary"),
        (f"Sec-WebSocket-Protocol: binary, {NOTICE_PROTOCOL}\r\n", "binary"),  # our page
        (f"Sec-WebSocket-Protocol: {NOTICE_PROTOCOL}\r\n", NOTICE_PROTOCOL),
        ("Sec-WebSocket-Protocol: chat\r\n", None),  # continue without one, as aiohttp did
    ],
)
def test_the_upgrade_is_accepted_with_a_101(offered: str, chosen: str | None) -> None:
    conn, t, request = open_console(upgrade(extra=offered + "X-Forwarded-For: 203.0.113.9\r\n"))
    status, headers = response_head(t)
    assert status == "HTTP/1.1 101 Switching Protocols"
    assert headers["sec-websocket-accept"] == ACCEPT
    assert headers["upgrade"].lower() == "websocket"
    assert headers.get("sec-websocket-protocol") == chosen
    assert request.subprotocol == chosen
    assert "sec-websocket-extensions" not in headers, "no compression: RFB is compressed already"
    assert t.protocol is conn and not t.closed
    assert request.path == "/websockify" and request.query_string == "token=abc"
    assert request.host == "console.example"
    assert request.headers.get_all("X-Forwarded-For") == ["203.0.113.9"]
    assert request.transport.get_extra_info("peername") == ("192.0.2.7", 50000)
    assert (NOTICE_PROTOCOL in request.offered_subprotocols()) == (NOTICE_PROTOCOL in offered)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (upgrade().replace(b"Upgrade: websocket\r\n", b""), 426),
        (upgrade().replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), 400),
        (upgrade(key="short"), 400),
        (upgrade().replace(b"Connection: Upgrade\r\n", b"Connection: keep-alive\r\n"), 426),
    ],
)
def test_a_bad_upgrade_is_refused_with_an_http_status_and_closed(head: bytes, status: int) -> None:
    _, t, request = open_console(head)
    assert request is None
    assert response_head(t)[0].startswith(f"HTTP/1.1 {status} ")
    assert t.closed and t.protocol is None, "never becomes a WebSocket"


def test_not_http_at_all_is_closed_without_an_answer() -> None:
    _, t, request = open_console(b"\x16\x03\x01 not a request\r\n\r\n")
    assert request is None and t.closed


def test_the_console_path_is_recognised_from_the_request_line() -> None:
    assert is_console_request(upgrade())
    assert is_console_request(b"GET /websockify HTTP/1.1\r\n\r\n")
    assert not is_console_request(b"GET /websockify2 HTTP/1.1\r\n\r\n")
    assert not is_console_request(b"POST /websockify HTTP/1.1\r\n\r\n")
    assert not is_console_request(b"GET /console?token=x HTTP/1.1\r\n\r\n")
    assert not is_console_request(b"GET /healthz HTTP/1.1\r\n\r\n")


async def test_frames_sent_behind_the_upgrade_are_messages_in_order() -> None:
    rest = client_frame(BIN, b"RFB 003.008\n") + client_frame(PING, b"p") + client_frame(BIN, b"\x01")
    conn, t, _ = open_console(upgrade(), rest)
    assert await conn.receive() == b"RFB 003.008\n"
    assert await conn.receive() == b"\x01"
    assert bytes(t.written).endswith(frame(PONG, b"p"))


async def test_the_browser_closing_in_the_handshake_is_answered_and_ends_receive() -> None:
    conn, t, _ = open_console(upgrade(), client_frame(BIN, b"a") + client_frame(CLOSE, close_payload(1000)))
    assert await conn.receive() == b"a"  # what came before the close
    with pytest.raises(BrowserClosed):
        await conn.receive()
    assert bytes(t.written).endswith(close_frame(1000)) and t.closed


async def test_a_protocol_error_in_the_handshake_is_closed_with_its_code() -> None:
    conn, t, _ = open_console(upgrade(), client_frame(TEXT, b"hello"))
    assert close_frame(1003, b"text frames are not accepted (RFB is binary)") in bytes(t.written)
    assert t.closed
    with pytest.raises(BrowserClosed):
        await conn.receive()


async def test_refusing_waits_for_the_reply_then_closes() -> None:
    conn, t, _ = open_console(upgrade())
    conn.close(4001, b"token invalid")
    assert bytes(t.written).endswith(close_frame(4001, b"token invalid"))
    assert not t.closed  # waiting for the browser's close frame
    conn.data_received(client_frame(CLOSE, close_payload(4001)))
    assert t.closed and not t.aborted


async def test_a_browser_sending_too_much_in_the_handshake_is_paused() -> None:
    conn, t, _ = open_console(upgrade())
    conn.data_received(client_frame(BIN, bytes(HANDSHAKE_QUEUE + 1)))
    assert not t.reading
    await conn.receive()
    assert t.reading
    conn.data_received(client_frame(BIN, bytes(HANDSHAKE_QUEUE + 1)))
    assert not t.reading
    conn.close(4001, b"token invalid")
    assert t.reading, "a refused browser's close reply must be read"


async def test_send_after_close_raises() -> None:
    conn, t, _ = open_console(upgrade())
    await conn.send_bytes(b"RFB 003.008\n")
    assert bytes(t.written).endswith(frame(BIN, b"RFB 003.008\n"))
    conn.close(1000, b"")
    with pytest.raises(BrowserClosed):
        await conn.send_str("late")
    await asyncio.sleep(0)


def test_the_handshake_never_logs_the_token_even_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        open_console(upgrade("/websockify?token=SECRET-TOKEN"))
        open_console(upgrade("/websockify?token=SECRET-TOKEN", key="short"))
    assert "SECRET-TOKEN" not in caplog.text


def test_the_handshake_leaves_nothing_for_the_cycle_collector() -> None:
    """websockets' ServerProtocol holds a generator suspended in its own method: kept, it would
    keep the protocol and the request until a full collection (thousands of idle consoles)."""
    gc.collect()
    gc.disable()
    try:
        for head in (upgrade(), upgrade(key="short"), b"junk\r\n\r\n"):
            open_console(head)
            assert not [o for o in gc.get_objects() if isinstance(o, ServerProtocol)]
    finally:
        gc.enable()
