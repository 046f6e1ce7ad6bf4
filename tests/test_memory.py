"""Freed memory goes back to the OS after consoles end (consoleproxy/memory.py, issue 24)."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable
from pathlib import Path

from harness import RFBClient, connect_echo, echo_backend, running_proxy, tcp_server

from consoleproxy.net.memory import TRIM_EVERY, Trimmer, malloc_trim


class FakeTrim:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pad: int) -> int:
        self.calls.append(pad)
        return 1


def test_a_trim_after_every_batch_of_ended_consoles() -> None:
    fake = FakeTrim()
    t = Trimmer(fake, every=4)
    for _ in range(3):
        t.ended()
    assert fake.calls == []
    t.ended()
    assert fake.calls == [0]  # pad 0: give back all that can be given back
    assert t.pending == 0
    for _ in range(7):
        t.ended()
    assert fake.calls == [0, 0] and t.pending == 3


def test_the_tail_of_a_burst_is_trimmed_once_no_console_ended_for_a_pass() -> None:
    fake = FakeTrim()
    t = Trimmer(fake, every=100)
    t.tick()
    assert fake.calls == []  # nothing ended: nothing to give back
    t.ended()
    t.ended()
    t.tick()  # consoles ended during this pass: the burst may go on
    assert fake.calls == []
    t.ended()
    t.tick()
    assert fake.calls == []
    t.tick()  # a whole pass without an end: the burst is over
    assert fake.calls == [0]
    t.tick()
    assert fake.calls == [0]  # once


def test_without_malloc_trim_nothing_is_counted_or_called() -> None:
    t = Trimmer(None, every=1)
    assert not t.enabled
    for _ in range(3):
        t.ended()
        t.tick()
    assert t.pending == 0 and t.trims == 0


def test_glibc_has_malloc_trim_and_it_runs() -> None:
    trim = malloc_trim()
    if platform.libc_ver()[0] == "glibc":
        assert trim is not None
        assert trim(0) in (0, 1)  # 1: memory was released, 0: none could be
    else:
        assert trim is None or trim(0) in (0, 1)
    assert TRIM_EVERY > 1


async def test_the_server_trims_after_consoles_end(tmp_path: Path) -> None:
    """Consoles relayed and ended, and one refused, reach the server's trimmer: a trim after the
    batch; then the tail's, once the sweeper sees a pass without an end."""
    fake = FakeTrim()

    async def until(cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not cond():
                await asyncio.sleep(0.02)

    async with (
        running_proxy(tmp_path, limits={"ping_interval_seconds": 1}) as p,  # a sweeper pass every 0.1 s
        tcp_server(echo_backend) as port,
    ):
        trimmer = p.server.trimmer = Trimmer(fake, every=3)
        ticks = trimmer.tick
        trimmer.tick = lambda: None  # type: ignore[method-assign]  # the batch alone first
        for i in range(2):
            async with RFBClient.connect(p.url(p.token(port=port, vm=f"vm-{i}"))) as c:
                await connect_echo(c)
        await until(lambda: trimmer.pending == 2)  # counted when the browser's connection is gone
        assert fake.calls == []
        async with RFBClient.connect(p.url("not-a-token")) as c:
            assert await c.close_code() == 4001
        await until(lambda: bool(fake.calls))
        assert fake.calls == [0] and trimmer.pending == 0
        async with RFBClient.connect(p.url(p.token(port=port, vm="vm-2"))) as c:
            await connect_echo(c)
        await until(lambda: trimmer.pending == 1)
        trimmer.tick = ticks  # type: ignore[method-assign]
        await until(lambda: len(fake.calls) == 2)
        assert trimmer.pending == 0
