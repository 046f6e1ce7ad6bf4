"""The recording player in Chromium (issue 19): a console to real QEMU through the proxy, recorded,
played back on the admin listener; and a synthetic 10-minute recording to seek in.

The live frame is taken in the browser at the moment its WebSocket closes (the proxy ends the
console, so every byte it sent, and recorded, arrived before its close frame and was drawn).
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import require_tool
from harness import Proxy, running_proxy
from test_page import Browser, at_load, browser, console_url

from consoleproxy.recordings import recording_format as fmt
from consoleproxy.recordings.recording_store import FileStore, new_id

pytestmark = pytest.mark.integration

PASSWORD = "Hunter2-qemu"

# Keeps every WebSocket the page opens, and the canvas as it is when the socket closes.
CAPTURE_ON_CLOSE = """
(() => {
    const Native = window.WebSocket;
    window.WebSocket = function (url, protocols) {
        const ws = new Native(url, protocols);
        ws.addEventListener("close", () => {
            const c = document.querySelector("#screen canvas");
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            crypto.subtle.digest("SHA-256", d).then((h) => {
                window.__lastFrame = {
                    width: c.width, height: c.height,
                    sha: Array.from(new Uint8Array(h)).map((b) => b.toString(16).padStart(2, "0")).join(""),
                };
            });
        });
        return ws;
    };
    window.WebSocket.prototype = Native.prototype;
    Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
})();
"""

CANVAS_SHA = """async () => {
    const c = document.querySelector("#screen canvas");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    const h = await crypto.subtle.digest("SHA-256", d);
    return {width: c.width, height: c.height,
            sha: Array.from(new Uint8Array(h)).map((b) => b.toString(16).padStart(2, "0")).join("")};
}"""


async def open_player(br: Browser, p: Proxy, rid: str, query: str = "") -> None:
    await br.page.goto(f"{p.admin}/recordings/{rid}{query}")
    await br.page.fill("#key", p.server.admin_key or "")
    await br.page.click("#load")
    status = br.page.locator("#status")
    await status.wait_for()
    await br.page.wait_for_function(
        "() => !['key', 'loading'].includes(document.querySelector('#status').dataset.state)", polling=50
    )


def assert_clean(br: Browser, p: Proxy) -> None:
    """No errors; nothing fetched from outside the console's and the admin listener's origins."""
    assert not br.errors, br.errors
    outside = [u for u in br.requests if not u.startswith((br.origin + "/", p.admin + "/", "data:", "blob:"))]
    assert not outside, outside


async def wait_playing(br: Browser) -> None:
    status = br.page.locator("#status")
    state = await status.get_attribute("data-state")
    assert state in ("playing", "ended"), f"{state}: {await status.inner_text()} {br.errors}"


async def test_playback_ends_on_the_live_consoles_last_frame(tmp_path: Path) -> None:
    from test_real_vnc import qemu

    require_tool("chromium", "chromium")
    rec = {"enabled": True, "store": f"file://{tmp_path / 'rec'}", "keyframe_interval_seconds": 2}
    async with qemu(tmp_path) as port, running_proxy(tmp_path, recording=rec) as p, browser(p) as br:
        await br.page.add_init_script(CAPTURE_ON_CLOSE)
        await br.page.goto(console_url(p, p.token(port=port, name="rec-01"), language="en"))
        await br.wait_state("connected")
        notice = br.page.locator("#recording-notice")
        assert await notice.is_visible()
        await br.page.wait_for_function(
            "() => { const c = document.querySelector('#screen canvas');"
            " return c && c.width === 720 && c.height === 400; }", polling=100, timeout=45_000)
        await br.page.focus("#screen canvas")
        await br.page.keyboard.type(PASSWORD)  # typed in the page: kept as redacted key events
        await br.page.mouse.click(100, 100)
        # Keyframes while the page runs: noVNC's first full request, then one the proxy made of
        # its next request after 2 s (the screen changes as the password is typed and clicked).
        recorder = next(iter(p.server.recordings.active.values()))
        rid = recorder.rid
        async with asyncio.timeout(20):
            while len(recorder.seek_points) < 2:
                await br.page.mouse.move(100 + len(recorder.seek_points), 120)
                await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http:
            async with http.get(p.admin + "/api/sessions", headers=p.admin_headers) as r:
                (s,) = (await r.json())["sessions"]
            async with http.delete(f"{p.admin}/api/sessions/{s['id']}", headers=p.admin_headers) as r:
                assert r.status == 200
        live = await (await br.page.wait_for_function("() => window.__lastFrame", polling=50)).json_value()
        assert (live["width"], live["height"]) == (720, 400)
        meta = await wait_finished(p, rid)
        assert meta["state"] == "complete"
        # The password typed in the page is nowhere in the stored bytes (keys = "redact").
        data = p.server.recordings.store.path(rid).read_bytes()
        assert PASSWORD.encode() not in data
        for ch in set(PASSWORD):
            # The key messages noVNC sent (QEMU extended key event, KeyEvent), as they would appear.
            for msg in (struct.pack(">BBHI", 255, 0, 1, ord(ch)), struct.pack(">BBxxI", 4, 1, ord(ch))):
                assert msg not in data, (ch, msg)
        kinds = [r.kind for r in fmt.records(data)]
        assert fmt.KEY not in kinds and kinds.count(fmt.KEY_REDACTED) >= 2 * len(PASSWORD)

        await open_player(br, p, rid)
        await wait_playing(br)
        await br.page.select_option("#speed", "8")
        await br.page.evaluate("() => window.player.seek(window.player.rec.endMs)")
        await br.page.wait_for_selector("#status[data-state='ended']")
        played = await br.page.evaluate(CANVAS_SHA)
        assert played == live, "the player's last frame differs from the live console's"
        # It decoded from the last keyframe, not from the start: QEMU's stream (with the
        # encodings the proxy left the page) decodes from a keyframe in its middle.
        idx = fmt.scan(data)
        assert idx.header["seekable"] is True and len(idx.seek_points) >= 2
        started = await br.page.evaluate("() => window.player.startOffset")
        assert started == idx.seek_points[-1].offset > idx.seek_points[0].offset
        # The input track: redacted keys and the click.
        track = await br.page.locator("#track").inner_text()
        assert "key down (redacted)" in track and "pointer" in track and PASSWORD not in track
        assert_clean(br, p)


async def wait_finished(p: Proxy, rid: str) -> dict[str, Any]:
    async with asyncio.timeout(15):
        while True:
            m = p.server.recordings.store.meta(rid)
            if m is not None and m.get("state") != "recording":
                return m
            await asyncio.sleep(0.05)


# --- a synthetic 10-minute recording -------------------------------------------------------------

W, H = 64, 60
SERVER_INIT = struct.pack(">HHBBBBHHHBBBxxx", W, H, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0) + \
    struct.pack(">I", 5) + b"synth"


def colour(second: int) -> tuple[int, int, int]:
    return (second * 7) % 256, (second * 13) % 256, (second * 29) % 256


def update(second: int) -> bytes:
    """What the screen gets at ``second``: at each whole minute (a keyframe) a full Raw update
    of one colour; in the other seconds only row ``second % 60``, in a colour of its own. The
    screen at a second is the keyframe's colour with the rows painted since over it: it depends
    on every update since the keyframe, not on the last one alone."""
    r, g, b = colour(second)
    row = second % 60
    y, h = (0, H) if row == 0 else (row, 1)
    return struct.pack(">BxHHHHHi", 0, 1, 0, y, W, h, 0) + bytes((b, g, r, 0)) * (W * h)


def synthetic_recording(
    store: FileStore, minutes: int = 10, *, seekable: bool = True, misplaced: int = -1
) -> tuple[str, list[int]]:
    """A recording as the proxy writes it (a Raw update every second, a keyframe every 60 s, the
    first at 0 s: noVNC's first request is a full one); and each second's offset in the bytes down."""
    rid = new_id()
    meta = {"id": rid, "vm": "synthetic", "client_ip": "127.0.0.1", "started": time.time(), "keys": "redact",
            "seekable": seekable}
    store.ensure()
    out = bytearray(fmt.header(meta))
    index = fmt.Index(header=meta)
    offsets = []
    down = 0
    for minute in range(minutes):
        recs = bytearray()
        for s in range(minute * 60, minute * 60 + 60):
            if s == 0:
                recs += fmt.record(fmt.DOWN, 0, SERVER_INIT)
                down += len(SERVER_INIT)
            if s % 60 == 0:
                # ``misplaced``: a keyframe whose offset is inside its update's pixels (a bug)
                wrong = 16 + 1 if s == misplaced else 0  # green: 13 * s % 256, not a message type
                recs += fmt.keyframe(s * 1000, down + wrong, W, H, None)
                index.keyframes.append(s * 1000)
            offsets.append(down)
            u = update(s)
            recs += fmt.record(fmt.DOWN, s * 1000 + 1, u)
            down += len(u)
        index.chunks.append((len(out), minute * 60_000))
        out += fmt.chunk(recs, minute * 60_000)
    offsets.append(down)
    index.end_ms = minutes * 60_000
    index.complete = True
    out += fmt.end(index)
    (store.dir / f"{rid}.cprec").write_bytes(out)
    store.write_meta(rid, {**meta, "state": "complete"})
    return rid, offsets


def expected_sha(second: int) -> str:
    # getImageData is RGBA with alpha 255.
    key = second - second % 60
    rows = [colour(key + y) if 0 < y <= second - key else colour(key) for y in range(H)]
    return hashlib.sha256(b"".join(bytes((*c, 255)) * W for c in rows)).hexdigest()


async def seek_and_check(br: Browser, second: int) -> dict[str, int]:
    """Seek to ``second`` + 0.5 s; the right frame within 1 s; what the player fed its decoder."""
    t0 = await br.page.evaluate("() => performance.now()")
    await br.page.evaluate(f"() => window.player.seek({second * 1000 + 500})")
    shown = f"async () => (await ({CANVAS_SHA})()).sha === '{expected_sha(second)}'"
    await br.page.wait_for_function(shown, polling=20, timeout=5_000)
    elapsed = await br.page.evaluate("() => performance.now()") - t0
    assert elapsed < 1000, f"seeking to {second} s took {elapsed:.0f} ms"
    fed: dict[str, int] = await br.page.evaluate(
        "() => ({fed: window.player.fed, start: window.player.startOffset})"
    )
    return fed


async def test_seeking_in_a_ten_minute_recording(tmp_path: Path) -> None:
    """The player starts a fresh decoder at the keyframe before the target and feeds it only
    the bytes from there: ``fed`` is exactly the bytes from that keyframe to the target."""
    require_tool("chromium", "chromium")
    rec = {"store": f"file://{tmp_path / 'rec'}"}
    async with running_proxy(tmp_path, recording=rec) as p, browser(p) as br:
        rid, offsets = synthetic_recording(p.server.recordings.store)
        await open_player(br, p, rid)
        await wait_playing(br)
        await br.page.click("#play")  # pause
        await br.page.wait_for_selector("#status[data-state='paused']")
        assert await br.page.evaluate("() => window.player.rec.endMs") == 600_000
        # The middle, back to the start, forward again, the end: each starts at its keyframe.
        # (310 after 301: forward past no keyframe, the same decoder fed on.)
        for second in (300, 30, 301, 310, 599):
            got = await seek_and_check(br, second)
            key = second - second % 60
            assert got == {"start": offsets[key], "fed": offsets[second + 1] - offsets[key]}, second
        keyframes = await br.page.locator("#track li.keyframe").count()
        assert keyframes == 10
        assert_clean(br, p)
        # Not seekable (the browser's encodings were left as they were): from the start.
        rid, offsets = synthetic_recording(p.server.recordings.store, minutes=2, seekable=False)
        await br.page.goto("about:blank")
        await open_player(br, p, rid)
        await wait_playing(br)
        got = await seek_and_check(br, 90)
        assert got == {"start": 0, "fed": offsets[91]}
        assert_clean(br, p)
        # A keyframe whose offset starts no server message is passed over for the one before.
        rid, offsets = synthetic_recording(p.server.recordings.store, minutes=3, misplaced=120)
        await br.page.goto("about:blank")
        await open_player(br, p, rid)
        await wait_playing(br)
        got = await seek_and_check(br, 130)
        assert got == {"start": offsets[60], "fed": offsets[131] - offsets[60]}
        assert_clean(br, p)


KO = ("녹화를 불러오려면 관리자 키를 입력하십시오.", "불러오기", "재생 중", "일시 정지",
      "전체 화면 갱신 (키프레임)", "이 녹화를 재생할 수 없습니다: ")
EN = ("Enter the admin key to load the recording.", "Load", "Playing", "Pause",
      "full update (keyframe)", "Cannot play this recording: ")


@pytest.mark.parametrize(
    ("locale", "query", "texts"),
    [("ko-KR", "", KO), ("ko-KR", "?language=en", EN), ("en-US", "?language=ko", KO), ("en-US", "", EN)],
)
async def test_player_in_korean_and_english(
    tmp_path: Path, locale: str, query: str, texts: tuple[str, ...]
) -> None:
    """The player picks its language as the console page does: ?language=, else the browser's."""
    require_tool("chromium", "chromium")
    key, load, playing, pause, keyframe, refused = texts
    rec = {"store": f"file://{tmp_path / 'rec'}"}
    async with running_proxy(tmp_path, recording=rec) as p, browser(p, locale) as br:
        rid, _ = synthetic_recording(p.server.recordings.store, minutes=2)
        # In its language by the load event (not just in time for the reads after goto: noVNC's
        # top-level await once held the page's script back past it), its Load button usable.
        got = await at_load(br.page, f"{p.admin}/recordings/{rid}{query}")
        lang = "ko" if "녹화" in key else "en"
        assert (got["lang"], got["els"]["status"]["text"]) == (lang, key)
        assert got["els"]["load"] == {"text": load, "disabled": False}
        assert await br.page.locator("#status").inner_text() == key
        assert await br.page.locator("#load").inner_text() == load
        assert await br.page.evaluate("document.documentElement.lang") == lang
        await open_player(br, p, rid, query)
        await wait_playing(br)
        assert await br.page.locator("#status").inner_text() == playing
        assert await br.page.locator("#play").inner_text() == pause
        assert await br.page.locator("#track li.keyframe").first.inner_text() == f"0:00 {keyframe}"
        assert_clean(br, p)
        await br.page.goto(f"{p.admin}/recordings/19700101T000000Z-0000000000000000{query}")
        await br.page.fill("#key", p.server.admin_key or "")
        await br.page.click("#load")
        error = br.page.locator("#status[data-state='error']")
        await error.wait_for()
        assert (await error.inner_text()).startswith(refused)
        br.errors.clear()  # the 404 itself is logged by the browser


async def test_damaged_recording_is_a_clear_error_in_the_player(tmp_path: Path) -> None:
    require_tool("chromium", "chromium")
    rec = {"store": f"file://{tmp_path / 'rec'}"}
    async with running_proxy(tmp_path, recording=rec) as p, browser(p) as br:
        store = p.server.recordings.store
        rid, _ = synthetic_recording(store, minutes=1)
        path = store.path(rid)
        path.write_bytes(path.read_bytes()[:-100])
        await open_player(br, p, rid)
        status = br.page.locator("#status[data-state='error']")
        await status.wait_for()
        text = await status.inner_text()
        assert text.startswith("Cannot play this recording: recording") and "damaged: truncated" in text
        br.errors.clear()  # the 422 itself is logged by the browser


async def test_recorded_notice_in_korean_and_english_only_when_recorded(tmp_path: Path) -> None:
    from consoleproxy.tools.demo import DemoVncServer

    require_tool("chromium", "chromium")
    demo = DemoVncServer()
    await demo.start()
    rec = {"enabled": True, "store": f"file://{tmp_path / 'rec'}"}
    try:
        async with running_proxy(tmp_path, recording=rec) as p:
            for lang, locale, text in (("ko", "ko-KR", "이 세션은 녹화되고 있습니다."),
                                       ("en", "en-US", "This session is recorded.")):
                async with browser(p, locale) as br:
                    await br.page.goto(console_url(p, p.token(port=demo.port, password=demo.password),
                                                   language=lang))
                    await br.wait_state("connected")
                    notice = br.page.locator("#recording-notice")
                    assert await notice.is_visible() and await notice.inner_text() == text
            async with browser(p) as br:  # record=false: no notice
                token = p.token(port=demo.port, password=demo.password, record=False)
                await br.page.goto(console_url(p, token, language="en"))
                await br.wait_state("connected")
                assert not await br.page.locator("#recording-notice").is_visible()
                br.assert_clean()
    finally:
        await demo.close()


async def test_undecodable_screen_data_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    """A well-formed file whose screen bytes noVNC cannot parse (an unknown server message)."""
    require_tool("chromium", "chromium")
    rec = {"store": f"file://{tmp_path / 'rec'}"}
    async with running_proxy(tmp_path, recording=rec) as p, browser(p) as br:
        store = p.server.recordings.store
        store.ensure()
        rid = new_id()
        meta = {"id": rid, "vm": "bad", "started": time.time(), "keys": "redact"}
        recs = fmt.record(fmt.DOWN, 0, SERVER_INIT) + fmt.record(fmt.DOWN, 500, b"\x77garbage")
        index = fmt.Index(header=meta, chunks=[(0, 0)], end_ms=2000, complete=True)
        (store.dir / f"{rid}.cprec").write_bytes(fmt.header(meta) + fmt.chunk(recs, 0) + fmt.end(index))
        store.write_meta(rid, {**meta, "state": "complete"})
        await open_player(br, p, rid)
        status = br.page.locator("#status[data-state='error']")
        await status.wait_for(timeout=10_000)
        assert "could not be decoded at 0:00" in await status.inner_text()


# Every text message each of the page's WebSockets got, per socket, in order.
KEEP_TEXTS = """
(() => {
    const Native = window.WebSocket;
    window.__texts = [];
    window.WebSocket = function (url, protocols) {
        const ws = new Native(url, protocols);
        const mine = [];
        window.__texts.push(mine);
        ws.addEventListener("message", (e) => { if (typeof e.data === "string") mine.push(e.data); });
        return ws;
    };
    window.WebSocket.prototype = Native.prototype;
    Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
})();
"""


async def test_recorded_console_shows_the_notice_and_resumes_into_a_linked_recording(tmp_path: Path) -> None:
    """Both text messages on one console: the notice (before RFB) and the resume tickets (after
    it). The page shows the notice, keeps the ticket, and after a cut connection resumes; the
    resumed console is recorded again (the token's record claim travels in the ticket) in a
    recording of its own, linked to the first by resume_id."""
    from test_page import RECORD_STATES, cutter, demo_server

    require_tool("chromium", "chromium")
    rec = {"enabled": False, "store": f"file://{tmp_path / 'rec'}"}  # recorded by the claim only
    async with demo_server() as demo, running_proxy(tmp_path, recording=rec) as p, cutter(p.port) as hop, \
            browser(p, "en-US") as br:
        br.origin = f"http://127.0.0.1:{hop.port}"
        await br.page.add_init_script(KEEP_TEXTS)
        token = p.token(port=demo.port, password=demo.password, record=True)
        await br.page.goto(f"{br.origin}/console?token={token}&language=en")
        await br.wait_state("connected")
        notice = br.page.locator("#recording-notice")
        assert await notice.is_visible()
        # the ticket arrives right behind ServerInit: wait (bounded) until the page has it
        await br.page.wait_for_function("() => window.__texts[0].length >= 2", polling=50, timeout=5000)
        (first,) = list(p.server.registry)
        first_rid = first.recording
        assert first_rid is not None
        await br.page.evaluate(RECORD_STATES)
        hop.cut()
        await br.page.wait_for_function(
            """() => { const s = window.__states, i = s.indexOf('status.reconnecting');
                       return i >= 0 && s.slice(i).some(k => k.startsWith('status.connected')); }""",
            polling=50, timeout=10000,
        )
        texts = await br.page.evaluate("window.__texts")
        assert len(texts) == 2
        for got in texts:  # the notice first, then tickets only
            assert got[0] == "consoleproxy:recorded" and got[1:]
            assert all(t.startswith("cpr1.") for t in got[1:])
        assert await notice.is_visible()  # hidden on reconnecting, shown again by the resumed socket
        (session,) = list(p.server.registry)
        assert session.resume_gen == 1 and session.recording is not None and session.recording != first_rid
        store = p.server.recordings.store
        async with asyncio.timeout(10):  # the cut console's recording is finished off the loop
            while (m := store.meta(first_rid)) is None or m.get("state") == "recording":
                await asyncio.sleep(0.05)
        again = store.meta(session.recording)
        assert again is not None
        assert (m["resume_id"], m["resume_gen"]) == (session.resume_id, 0)
        assert (again["resume_id"], again["resume_gen"]) == (session.resume_id, 1)
        br.assert_clean()
