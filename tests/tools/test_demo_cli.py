"""`consoleproxy demo` (what `make run` starts): prints a URL whose token reaches the demo screen."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import sys
from pathlib import Path

import pytest
from harness import RFBClient

pytestmark = pytest.mark.integration  # a consoleproxy demo subprocess


async def test_demo_prints_a_working_url(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSOLEPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        "-m",
        "consoleproxy",
        "demo",
        "--port",
        "0",
        "--state-dir",
        str(tmp_path / "state"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    url = ca = None
    try:
        async with asyncio.timeout(30):
            while url is None or ca is None:
                line = (await proc.stdout.readline()).decode()
                assert line, "demo exited before printing its URL"
                if m := re.search(r"(https://\S+/console\?token=\S+)", line):
                    url = m.group(1)
                if m := re.search(r"Development CA \(trust it in your browser\): (\S+)", line):
                    ca = m.group(1)
        m = re.match(r"https://(localhost):(\d+)/console\?token=(\S+)$", url)
        assert m, url
        ctx = ssl.create_default_context(cafile=ca)
        ws_url = f"wss://localhost:{m.group(2)}/websockify?token={m.group(3)}"
        async with RFBClient.connect(ws_url, ssl=ctx) as c:
            await c.handshake()
            assert (c.width, c.height, c.name) == (720, 400, b"consoleproxy demo")
            await c.request_update()
            pixels = await c.read_raw_update()
            assert len(set(pixels[i : i + 4] for i in range(0, len(pixels), 4))) > 1
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
