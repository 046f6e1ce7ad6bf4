"""The down direction takes turns on uvloop: a console whose read filled the buffer reads again
only after every other ready console had its read (libuv reads one socket up to 32 times per
callback). asyncio's loops read each ready socket once per turn: no pause there. Runs on both."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from consoleproxy.net.relay import READ_SIZE, _Backend


class FakeTransport:
    def __init__(self) -> None:
        self.reading = True
        self.calls: list[str] = []
        self.written = 0

    def pause_reading(self) -> None:
        self.reading = False
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.reading = True
        self.calls.append("resume")

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def write(self, data: Any) -> None:
        self.written += len(data)

    def writelines(self, data: Any) -> None:
        for d in data:
            self.write(d)


def _backend(browser_slow: bool = False) -> tuple[_Backend, FakeTransport, Any]:
    relay: Any = SimpleNamespace(
        ended=False,
        session=SimpleNamespace(bytes_down=0, last_activity=0.0),
        ws_transport=FakeTransport(),
        ws_fd=-1,  # no socket: frames go through the transport's write
        ws_keeps_views=True,  # a plain transport
        client=SimpleNamespace(writing_paused=browser_slow),
        recorder=None,  # not recorded
        end=lambda why: None,
    )
    vnc = FakeTransport()
    return _Backend(relay, vnc), vnc, relay  # type: ignore[arg-type]


def _read(b: _Backend, n: int) -> None:
    buf = b.get_buffer(-1)
    b.buffer_updated(min(n, len(buf)))


def _on_uvloop() -> bool:
    return not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)


async def test_a_full_read_pauses_until_the_next_turn_on_uvloop() -> None:
    b, vnc, relay = _backend()
    _read(b, READ_SIZE)
    assert relay.ws_transport.written == READ_SIZE + 10  # the frame went out
    if not _on_uvloop():
        assert vnc.calls == [] and vnc.reading  # asyncio: nothing to do
        return
    assert vnc.calls == ["pause"] and not vnc.reading
    await asyncio.sleep(0)  # the loop's next turn
    assert vnc.calls == ["pause", "resume"] and vnc.reading


async def test_a_partial_read_does_not_pause() -> None:
    b, vnc, _ = _backend()
    _read(b, 4096)
    await asyncio.sleep(0)
    assert vnc.calls == [] and vnc.reading


async def test_a_slow_browser_pauses_until_it_drains_not_for_a_turn() -> None:
    b, vnc, relay = _backend(browser_slow=True)
    _read(b, READ_SIZE)
    for _ in range(3):
        await asyncio.sleep(0)
    assert vnc.calls == ["pause"] and not vnc.reading  # still waiting for the browser's drain
    relay.client.writing_paused = False
    b.browser_drained()  # the browser transport's resume_writing
    assert vnc.calls == ["pause", "resume"] and vnc.reading


async def test_no_resume_after_the_relay_ended() -> None:
    b, vnc, relay = _backend()
    b._turns = True  # as on uvloop
    _read(b, READ_SIZE)
    relay.ended = True
    await asyncio.sleep(0)
    assert vnc.calls == ["pause"]
