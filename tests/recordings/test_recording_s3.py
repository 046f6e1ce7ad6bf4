"""S3 mode against a real S3-compatible server process (moto's standalone ``moto_server``), started
by the test: recordings upload from the spool; with the store stopped mid-session the recording
completes locally and uploads when the store returns, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from harness import RFBClient, free_port, running_proxy, stop_program

from consoleproxy.recordings import recording_format as fmt
from consoleproxy.tools.demo import DemoVncServer

pytestmark = pytest.mark.integration

BUCKET = "consoles"


def moto_binary() -> str:
    found = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(found).exists():
        pytest.fail("moto_server is missing: pip install 'moto[server]' (the test extra)")
    return found


@contextlib.contextmanager
def moto(port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([moto_binary(), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_program(proc)


async def s3_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait (bounded) until the server answers, then create the bucket (a new server is empty)."""
    from aiobotocore.session import get_session

    async with asyncio.timeout(30):
        while True:
            assert proc.poll() is None, "moto_server exited"
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
    async with get_session().create_client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                                           region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=BUCKET)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "HTTP_PROXY", "HTTPS_PROXY",
                 "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


@contextlib.asynccontextmanager
async def demo() -> AsyncIterator[DemoVncServer]:
    d = DemoVncServer()
    await d.start()
    try:
        yield d
    finally:
        await d.close()


async def until(cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.1)


async def test_store_outage_mid_session_loses_nothing(tmp_path: Path, aws_env: None) -> None:
    port = free_port(20000, 29999)
    spool = tmp_path / "spool"
    rec = {"enabled": True, "store": f"s3://{BUCKET}/recordings", "s3_endpoint": f"http://127.0.0.1:{port}",
           "s3_region": "us-east-1", "spool_dir": str(spool)}
    log = tmp_path / "moto.log"
    async with demo() as d, running_proxy(tmp_path, recording=rec) as p:
        remote = p.server.recordings.remote
        assert remote is not None
        store = p.server.recordings.store
        with moto(port, log) as proc:
            await s3_ready(port, proc)
            # A first console uploads while the store is up.
            async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password, vm="vm-up"))) as c:
                await c.handshake()
            await until(lambda: remote.uploaded == 1, "first upload")
            assert not list(spool.glob("*.cprec")), "an uploaded recording leaves the spool"
            async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password, vm="vm-out"))) as c:
                await c.handshake()
                await c.send(b"\x02\x00\x00\x01\x00\x00\x00\x00")  # Raw: 720x400x4 a screen
                await c.request_update()
                await c.read_raw_update()
                proc.terminate()  # the store stops mid-session
                proc.wait(10)
                for _ in range(8):  # ~9 MiB more: a multipart upload of two parts later
                    await c.request_update()
                    await c.read_raw_update()
        # The console ended with the store down: the recording completed in the spool...
        (meta,) = [m for m in store.entries() if m["vm"] == "vm-out"]
        await until(lambda: store.meta(meta["id"])["state"] == "complete", "finished locally")
        rid = meta["id"]
        local = store.path(rid).read_bytes()
        assert fmt.scan(local).complete and len(local) > 9 * 2**20
        await until(lambda: remote.failures >= 1, "an upload attempt failing during the outage")
        assert store.path(rid).exists(), "kept while the store is down"
        # ...and uploads when the store returns (a new, empty server on the same port).
        with moto(port, log) as proc:
            await s3_ready(port, proc)
            remote.wake()
            await until(lambda: remote.uploaded == 2, "upload after the outage", timeout=60)
            assert not store.path(rid).exists()
            h = p.admin_headers
            async with aiohttp.ClientSession() as http:
                async with http.get(p.admin + "/api/recordings", params={"vm": "vm-out"}, headers=h) as r:
                    body = await r.json()
                    assert [m["id"] for m in body["recordings"]] == [rid] and "store_error" not in body
                async with http.get(f"{p.admin}/api/recordings/{rid}", headers=h) as r:
                    assert r.status == 200
                    assert await r.read() == local  # nothing lost: byte for byte
                async with http.delete(f"{p.admin}/api/recordings/{rid}", headers=h) as r:
                    assert r.status == 200
                async with http.get(f"{p.admin}/api/recordings/{rid}", headers=h) as r:
                    assert r.status == 404
