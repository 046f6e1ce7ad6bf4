"""Recording consoles through the proxy (demo VNC server behind it): what is stored, keyframes,
a slow disk, the admin API."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import Proxy, RFBClient, running_proxy

from consoleproxy.recordings import recording, recording_writer
from consoleproxy.recordings import recording_format as fmt
from consoleproxy.tools.demo import DemoVncServer, KeyEvent

PASSWORD = "Tr0ub4dor&3-xyzzy"


@asynccontextmanager
async def demo() -> AsyncIterator[DemoVncServer]:
    d = DemoVncServer(width=320, height=200)
    await d.start()
    try:
        yield d
    finally:
        await d.close()


def rec_config(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return {"enabled": True, "store": f"file://{tmp_path / 'rec'}", **kw}


async def wait_for(cond: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    """Poll ``cond`` (bounded); its first truthy value."""
    async with asyncio.timeout(timeout):
        while True:
            value = cond()
            if value:
                return value
            await asyncio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover


async def finished(p: Proxy, vm: str = "vm-1") -> dict[str, Any]:
    """The one finished recording of ``vm`` (its metadata), waiting for the writer (bounded)."""
    store = p.server.recordings.store

    def done() -> dict[str, Any] | None:
        for m in store.entries():
            if m.get("vm") == vm and m.get("state") != "recording":
                return m
        return None

    meta: dict[str, Any] = await wait_for(done, "the recording was not finished")
    return meta


async def type_text(c: RFBClient, text: str) -> None:
    for ch in text:
        for down in (1, 0):
            await c.send(struct.pack(">BBxxI", 4, down, ord(ch)))


async def record_typing(tmp_path: Path, keys: str) -> tuple[bytes, DemoVncServer, dict[str, Any]]:
    async with demo() as d, running_proxy(tmp_path, recording=rec_config(tmp_path, keys=keys)) as p:
        async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password))) as c:
            await c.handshake()
            await c.send(b"\x02\x00\x00\x01\x00\x00\x00\x00")  # SetEncodings: Raw
            await c.request_update()
            await c.read_raw_update()
            await type_text(c, PASSWORD)
            await d.wait_for_events(
                lambda evs: sum(isinstance(e, KeyEvent) for e in evs) == 2 * len(PASSWORD)
            )
        meta = await finished(p)
        path = p.server.recordings.store.path(meta["id"])
        return path.read_bytes(), d, meta


def keysyms(data: bytes) -> list[int]:
    return [struct.unpack(">BII", r.data)[1] for r in fmt.records(data) if r.kind == fmt.KEY]


async def test_redact_stores_no_typed_keysym(tmp_path: Path) -> None:
    data, d, meta = await record_typing(tmp_path, "redact")
    assert meta["state"] == "complete" and meta["keys"] == "redact"
    # The password reached the VM...
    typed = "".join(chr(e.keysym) for e in d.events if isinstance(e, KeyEvent) and e.down)
    assert typed == PASSWORD
    # ...and the stored bytes hold neither its text nor any of its key events.
    assert PASSWORD.encode() not in data
    for ch in set(PASSWORD):
        assert struct.pack(">BBxxI", 4, 1, ord(ch)) not in data
        assert struct.pack(">BII", 1, ord(ch), 0) not in data
    assert keysyms(data) == []
    redacted = [r for r in fmt.records(data) if r.kind == fmt.KEY_REDACTED]
    assert [r.data for r in redacted] == [b"\x01", b"\x00"] * len(PASSWORD)  # "a key", not which
    # The recording starts with the ServerInit the browser got: 320x200, the desktop's name.
    first = next(fmt.records(data))
    assert first.kind == fmt.DOWN and first.data[:4] == struct.pack(">HH", 320, 200)


async def test_full_stores_the_keysyms(tmp_path: Path) -> None:
    data, _, meta = await record_typing(tmp_path, "full")
    assert meta["keys"] == "full"
    downs = [k for i, k in enumerate(keysyms(data)) if i % 2 == 0]
    assert "".join(map(chr, downs)) == PASSWORD


async def test_none_stores_no_input_and_claim_overrides_enabled(tmp_path: Path) -> None:
    async with demo() as d, running_proxy(tmp_path, recording=rec_config(tmp_path, keys="none")) as p:
        # record=false: this console is not recorded although [recording] enabled is.
        async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password, vm="vm-off",
                                                   record=False))) as c:
            await c.handshake()
        async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password))) as c:
            await c.handshake()
            await type_text(c, "abc")
            await c.send(struct.pack(">BBHH", 5, 1, 10, 20))  # PointerEvent
            await d.wait_for_events(lambda evs: len(evs) >= 7)
        meta = await finished(p)
        data = p.server.recordings.store.path(meta["id"]).read_bytes()
        assert {r.kind for r in fmt.records(data)} == {fmt.DOWN}
        assert [m["vm"] for m in p.server.recordings.store.entries()] == ["vm-1"]
    # The claim turns recording on where the configuration has it off.
    async with demo() as d, running_proxy(
        tmp_path / "2", recording=rec_config(tmp_path / "2", enabled=False)
    ) as p:
        async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password, record=True))) as c:
            await c.handshake()
        assert (await finished(p))["state"] == "complete"


async def test_keyframes_are_full_updates_listed_in_the_index(tmp_path: Path) -> None:
    """A due keyframe makes the browser's next (incremental) request a full one; the index's
    seek point names where its reply starts in the bytes down, so a player can start there."""
    cfg = rec_config(tmp_path, keyframe_interval_seconds=1)
    async with demo() as d, running_proxy(tmp_path, recording=cfg) as p:
        async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password))) as c:
            await c.handshake()
            await c.send(struct.pack(">BxH3i", 2, 3, 7, 16, 0))  # SetEncodings: Tight, ZRLE, Raw
            rec = await wait_for(lambda: next(iter(p.server.recordings.active.values()), None), "recording")
            # The audit view of the session names its recording.
            async with aiohttp.ClientSession() as http, http.get(
                p.admin + "/api/sessions", headers=p.admin_headers
            ) as resp:
                (s,) = (await resp.json())["sessions"]
                assert s["recording"] == rec.rid
            incremental = struct.pack(">BBHHHH", 3, 1, 0, 0, 320, 200)
            for _ in range(2):
                await wait_for(lambda: rec.keyframe_pending, "a keyframe due")
                await c.send(incremental)  # nothing changed on the demo's screen: a full update
                pixels = await c.read_raw_update()  # came only because the proxy asked for one
                assert len(pixels) == 320 * 200 * 4
            assert len(rec.seek_points) >= 2
        meta = await finished(p)
        data = p.server.recordings.store.path(meta["id"]).read_bytes()
        idx = fmt.scan(data)
        assert len(idx.keyframes) >= 2 and idx.complete and idx.header["seekable"] is True
        assert [k.ms for k in idx.seek_points] == idx.keyframes
        # At each seek point's offset in the bytes down starts a whole-screen Raw update.
        down = b"".join(r.data for r in fmt.records(data) if r.kind == fmt.DOWN)
        for point in idx.seek_points:
            assert (point.width, point.height) == (320, 200)
            assert down[point.offset : point.offset + 16] == struct.pack(">BxHHHHHi", 0, 1, 0, 0, 320, 200, 0)


def o_direct_works(d: Path) -> bool:
    try:
        fd = os.open(d / "o-direct-probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


async def test_a_streaming_console_is_read_into_its_recording_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big reads go straight into the recording's buffer (Recorder.read_buffer, no copy), and with
    O_DIRECT its blocks go to the disk from there; what is stored is still exactly what the
    browser got."""
    lent: list[int] = []
    read_buffer = recording.Recorder.read_buffer

    def counting(self: recording.Recorder) -> memoryview | None:
        view = read_buffer(self)
        if view is not None:
            lent.append(len(view))
        return view

    monkeypatch.setattr(recording.Recorder, "read_buffer", counting)
    d = DemoVncServer(width=1024, height=768)
    await d.start()
    try:
        async with running_proxy(tmp_path, recording=rec_config(tmp_path)) as p:
            async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password))) as c:
                await c.handshake()
                await c.send(b"\x02\x00\x00\x01\x00\x00\x00\x00")  # SetEncodings: Raw
                got = []
                for _ in range(4):
                    await c.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 1024, 768))
                    got.append(await c.read_raw_update())
            meta = await finished(p)
            data = p.server.recordings.store.path(meta["id"]).read_bytes()
            writer = p.server.recordings.writer
            assert writer is not None
            # Where the store has O_DIRECT (ext4 here; not tmpfs) the blocks went from the buffers.
            direct = writer.direct_bytes
    finally:
        await d.close()
    assert meta["state"] == "complete" and lent
    if o_direct_works(tmp_path):
        assert direct > 0
    down = b"".join(r.data for r in fmt.records(data) if r.kind == fmt.DOWN)
    (name_length,) = struct.unpack_from(">I", down, 20)
    at = 24 + name_length
    head = struct.pack(">BxHHHHHi", 0, 1, 0, 0, 1024, 768, 0)
    for pixels in got:
        assert down[at : at + 16] == head
        assert down[at + 16 : at + 16 + len(pixels)] == pixels
        at += 16 + len(pixels)
    assert at == len(down)


async def test_slow_disk_makes_the_recording_incomplete_not_the_console_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_write = recording_writer._write_all

    def stuck(fd: int, *parts: bytes | bytearray) -> None:
        gate.wait(30)
        real_write(fd, *parts)

    monkeypatch.setattr(recording_writer, "_write_all", stuck)
    monkeypatch.setattr(recording, "MAX_BACKLOG", 600_000)
    monkeypatch.setattr(recording, "FLUSH_BYTES", 200_000)  # a chunk per screen
    async with demo() as d, running_proxy(tmp_path, recording=rec_config(tmp_path)) as p:
        try:
            async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password))) as c:
                await c.handshake()
                await c.send(b"\x02\x00\x00\x01\x00\x00\x00\x00")
                # 256 KiB a screen: the writer, stuck, falls behind; the console keeps going.
                for _ in range(6):
                    await c.request_update()
                    assert len(await c.read_raw_update()) == 320 * 200 * 4
                rec = next(iter(p.server.recordings.active.values()))
                assert rec.incomplete_reason is not None and "slow disk" in rec.incomplete_reason
        finally:
            gate.set()
        meta = await finished(p)
        assert meta["state"] == "incomplete" and "slow disk" in meta["incomplete_reason"]
        idx = fmt.scan(p.server.recordings.store.path(meta["id"]).read_bytes())
        assert not idx.complete and idx.closed  # still a readable file, marked incomplete
        text = p.server.metrics.render().decode()
        assert "consoleproxy_recordings_incomplete_total 1.0" in text
        assert "consoleproxy_recordings_active 0.0" in text


async def test_admin_api_list_download_delete_and_damage(tmp_path: Path) -> None:
    async with demo() as d, running_proxy(tmp_path, recording=rec_config(tmp_path)) as p:
        for vm in ("vm-a", "vm-b"):
            async with RFBClient.connect(p.url(p.token(port=d.port, password=d.password, vm=vm))) as c:
                await c.handshake()
            await finished(p, vm)
        store = p.server.recordings.store
        h = p.admin_headers
        async with aiohttp.ClientSession() as http:
            async with http.get(p.admin + "/api/recordings", params={"vm": "vm-b"}, headers=h) as r:
                (item,) = (await r.json())["recordings"]
                assert item["vm"] == "vm-b" and item["client_ip"] == "127.0.0.1"
            async with http.get(p.admin + "/api/recordings", params={"since": "soon"}, headers=h) as r:
                assert r.status == 400 and "since must be a Unix time" in (await r.json())["error"]
            async with http.get(p.admin + "/api/recordings", params={"since": "9999999999"}, headers=h) as r:
                assert (await r.json())["recordings"] == []
            async with http.get(p.admin + "/api/recordings") as r:
                assert r.status == 401
            rid = item["id"]
            async with http.get(f"{p.admin}/api/recordings/{rid}", headers=h) as r:
                assert r.status == 200
                assert await r.read() == store.path(rid).read_bytes()
            async with http.get(f"{p.admin}/api/recordings/..%2Fadmin.key", headers=h) as r:
                assert r.status in (400, 404)
            async with http.get(f"{p.admin}/api/recordings/20200101T000000Z-0000000000000000",
                                headers=h) as r:
                assert r.status == 404
            # A truncated file: a clear error, at once.
            path = store.path(rid)
            path.write_bytes(path.read_bytes()[:-7])
            async with http.get(f"{p.admin}/api/recordings/{rid}", headers=h) as r:
                assert r.status == 422
                body = await r.json()
                assert f"recording {rid} is damaged: truncated" in body["error"]
            async with http.delete(f"{p.admin}/api/recordings/{rid}", headers=h) as r:
                assert (await r.json()) == {"deleted": rid}
            async with http.delete(f"{p.admin}/api/recordings/{rid}", headers=h) as r:
                assert r.status == 404
        assert [m["vm"] for m in store.entries()] == ["vm-a"]
        assert not list((tmp_path / "rec").glob(f"{rid}*"))
        json.dumps(store.entries())  # listable as JSON


def test_cli_list_export_play_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from consoleproxy.recordings.recording_store import FileStore, new_id
    from consoleproxy.tools.cli import main

    store_dir = tmp_path / "rec"
    conf = tmp_path / "c.toml"
    conf.write_text(f'[recording]\nstore = "file://{store_dir}"\n[admin]\naddress = "::1"\nport = 9444\n')
    store = FileStore(store_dir)
    store.ensure()
    rid = new_id(1_700_000_000)
    meta = {"id": rid, "vm": "vm-7", "client_ip": "10.0.0.9", "started": 1_700_000_000}
    body = fmt.header(meta) + fmt.chunk(fmt.record(fmt.DOWN, 0, b"init"), 0) + fmt.end(fmt.Index(header=meta))
    fd = store.create(rid, body, {**meta, "state": "recording"})
    store.finish(rid, fd, {**meta, "state": "complete"})

    assert main(["recordings", "list", "--config", str(conf), "--vm", "vm-7"]) == 0
    out = capsys.readouterr().out
    assert rid in out and "vm=vm-7" in out and "client=10.0.0.9" in out and "complete" in out
    assert main(["recordings", "list", "--config", str(conf), "--vm", "other", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    out_file = tmp_path / "out.cprec"
    assert main(["recordings", "export", rid, "--out", str(out_file), "--config", str(conf)]) == 0
    assert out_file.read_bytes() == store.path(rid).read_bytes()
    assert main(["recordings", "export", rid, "--out", str(out_file), "--config", str(conf)]) == 2
    assert "exists; not overwritten" in capsys.readouterr().err
    assert main(["recordings", "play-url", rid, "--config", str(conf)]) == 0
    assert capsys.readouterr().out.strip() == f"http://[::1]:9444/recordings/{rid}"
    # Bad input: a damaged recording, an unknown one, a malformed ID, a bad time.
    store.path(rid).write_bytes(store.path(rid).read_bytes()[:-3])
    assert main(["recordings", "export", rid, "--out", str(tmp_path / "x"), "--config", str(conf)]) == 2
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "x").exists()
    other = new_id(0)
    assert main(["recordings", "export", other, "--out", str(tmp_path / "y"), "--config", str(conf)]) == 2
    assert f"no recording {other}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recordings", "play-url", "../../etc/passwd", "--config", str(conf)])
    assert "not a recording ID" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recordings", "list", "--since", "yesterday", "--config", str(conf)])
    assert "a Unix time in seconds" in capsys.readouterr().err
