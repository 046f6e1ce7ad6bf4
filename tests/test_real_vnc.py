"""Real VNC servers behind the proxy: QEMU (without and with a password) and TigerVNC's Xvnc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from harness import Proxy, RFBClient, expect_close, free_port, running_proxy, stop_program

pytestmark = pytest.mark.integration  # QEMU, Xvnc


async def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}"
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            w.close()
            return


@contextlib.contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_program(proc)


@contextlib.asynccontextmanager
async def qemu(tmp_path: Path, password: str | None = None) -> AsyncIterator[int]:
    binary = require_tool("qemu-system-x86_64", "qemu-system-x86")
    port = free_port()
    vnc = f"127.0.0.1:{port - 5900}"
    args = [binary, "-machine", "accel=tcg", "-display", "none", "-nodefaults", "-vga", "std"]
    if password is not None:
        args += ["-object", f"secret,id=pw,data={password}"]
        vnc += ",password-secret=pw"
    args += ["-vnc", vnc, "-m", "64"]
    with _process(args, tmp_path / "qemu.log") as proc:
        await wait_port(port, proc)
        yield port


async def open_qemu_console(
    p: Proxy, port: int, password: str | None = None, timeout: float = 60
) -> tuple[int, int, bytes]:
    """Through the proxy: handshake, wait for 720x400, request a full update, return pixels."""
    async with asyncio.timeout(timeout):
        while True:
            async with RFBClient.connect(p.url(p.token(port=port, password=password))) as c:
                await c.handshake()
                if (c.width, c.height) != (720, 400):
                    await asyncio.sleep(0.2)
                    continue
                await c.send(b"\x02\x00\x00\x01\x00\x00\x00\x00")  # SetEncodings: Raw only
                # Non-incremental request: QEMU answers with the whole screen.
                await c.request_update()
                pixels = await c.read_raw_update()
                return c.width, c.height, pixels


def _not_uniform(pixels: bytes) -> bool:
    first = pixels[:4]
    return any(pixels[i : i + 4] != first for i in range(0, len(pixels), 4))


async def test_qemu_without_password(tmp_path: Path) -> None:
    async with qemu(tmp_path) as port, running_proxy(tmp_path) as p:
        w, h, pixels = await open_qemu_console(p, port)
        assert (w, h) == (720, 400)
        assert len(pixels) == 720 * 400 * 4
        assert _not_uniform(pixels), "QEMU's text screen should show the BIOS messages"


async def test_qemu_with_password(tmp_path: Path) -> None:
    async with qemu(tmp_path, password="qemu-pw") as port, running_proxy(tmp_path) as p:
        w, h, pixels = await open_qemu_console(p, port, password="qemu-pw")
        assert (w, h) == (720, 400) and _not_uniform(pixels)
        code, reason = await expect_close(p.url(p.token(port=port, password="wrong")))
        assert code == 4011
        assert "VNC server" in reason and len(reason) > len("VNC server: ")
        code, reason = await expect_close(p.url(p.token(port=port)))
        assert code == 4011 and "password" in reason


async def test_xvnc_with_vncauth(tmp_path: Path) -> None:
    xvnc = require_tool("Xvnc", "tigervnc-standalone-server")
    vncpasswd = require_tool("vncpasswd", "tigervnc-tools")
    pwfile = tmp_path / "passwd"
    pwfile.write_bytes(
        subprocess.run([vncpasswd, "-f"], input=b"xvnc-pw\n", capture_output=True, check=True).stdout
    )
    os.chmod(pwfile, 0o600)
    port = free_port()
    display = next(d for d in range(50, 200) if not Path(f"/tmp/.X11-unix/X{d}").exists())
    args = [
        xvnc, f":{display}", "-rfbport", str(port), "-interface", "127.0.0.1", "-nolisten", "tcp",
        "-SecurityTypes", "VncAuth", "-PasswordFile", str(pwfile), "-geometry", "640x480",
        "-desktop", "xvnc-test",
    ]
    with _process(args, tmp_path / "xvnc.log") as proc:
        await wait_port(port, proc)
        async with running_proxy(tmp_path) as p:
            async with RFBClient.connect(p.url(p.token(port=port, password="xvnc-pw"))) as c:
                await c.handshake()
                assert (c.width, c.height) == (640, 480)
                assert c.name == b"xvnc-test"
                await c.send(b"\x02\x00\x00\x01\x00\x00\x00\x00")  # SetEncodings: Raw only
                await c.request_update()
                pixels = await c.read_raw_update()
                assert len(pixels) == 640 * 480 * 4
            code, _ = await expect_close(p.url(p.token(port=port, password="nope")))
            assert code == 4011

