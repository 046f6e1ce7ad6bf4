"""The console page in a real browser: Debian's chromium driven by Playwright, the proxy on loopback,
real QEMU and the embedded demo VNC server behind it (issue 4; DESIGN.md 5 and 8).

Playwright's own browser downloads are never used (`playwright install` is not run): the tests
launch /usr/bin/chromium, which scripts/setup-page.sh installs from Debian.

Every test runs twice: over plain HTTP and over HTTPS (`listen.tls`). Over HTTPS the browser trusts
the proxy's development CA the way a user would, through an NSS database (certutil, from Debian's
libnss3-tools) in a temporary $HOME/.pki/nssdb, never with --ignore-certificate-errors; the pages
are opened as https://localhost:PORT so that the name matches the development certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from harness import Proxy, free_port, running_proxy
from playwright.async_api import ConsoleMessage, Error, Page, Response, WebSocket, async_playwright
from playwright.async_api import expect as pw_expect

from consoleproxy.tools.demo import CutText, DemoVncServer, ExtendedKeyEvent, KeyEvent

pytestmark = pytest.mark.integration  # Chromium (Playwright), certutil

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # loopback only, whatever the environment's proxy settings
]
TIMEOUT_MS = 20_000

# X11 keysyms
SHIFT_L, CONTROL_L, ALT_L, SUPER_L, DELETE, F1 = 0xFFE1, 0xFFE3, 0xFFE9, 0xFFEB, 0xFFFF, 0xFFBE

# The page's messages for the refusals tested here (novnc_static/i18n.js), complete in each language.
MESSAGES = {
    ("en", 4002): "The console link has expired. Open the console again from the management portal "
    "to get a new link.",
    ("en", 4003): "This console link has already been used; each link works only once. Open the "
    "console again from the management portal.",
    ("en", 4010): "The virtual machine's host could not be reached. Try again later, or contact your "
    "administrator.",
    ("en", 4001): "The console link is not valid. Open the console again from the management portal.",
    ("ko", 4002): "콘솔 링크가 만료되었습니다. 관리 화면에서 콘솔을 다시 열어 새 링크를 받으십시오.",
    ("ko", 4003): "이 콘솔 링크는 이미 사용되었습니다. 링크는 한 번만 사용할 수 있으니 관리 화면에서 "
    "콘솔을 다시 여십시오.",
    ("ko", 4010): "가상 머신의 호스트에 연결할 수 없습니다. 잠시 후 다시 시도하거나 관리자에게 문의하십시오.",
    ("ko", 4001): "콘솔 링크가 올바르지 않습니다. 관리 화면에서 콘솔을 다시 여십시오.",
}
HANGUL = re.compile(r"[\uac00-\ud7a3\u3131-\u318e]")
LATIN = re.compile(r"[A-Za-z]")


# --- HTTPS: the development CA, trusted through an NSS database ------------------------------


class NssTrust:
    """A temporary HOME (one per test session) whose $HOME/.pki/nssdb trusts the development CAs.

    Each TLS proxy starts with an empty store in its test's tmp_path, so it makes its own development
    CA; that CA is added here before the test launches chromium, which reads the database at start.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.db = f"sql:{home / '.pki' / 'nssdb'}"
        self.trusted: set[str] = set()
        self.certutil = require_tool("certutil", "libnss3-tools")
        (home / ".pki" / "nssdb").mkdir(parents=True)
        self._run("-N", "--empty-password")

    def _run(self, *args: str) -> str:
        out = subprocess.run([self.certutil, "-d", self.db, *args], capture_output=True, text=True,
                             timeout=30, check=False)
        assert out.returncode == 0, f"certutil {args}: {out.stdout}{out.stderr}"
        return out.stdout

    def trust(self, ca: Path) -> None:
        """Add ``ca`` as a trusted CA for TLS servers ("C,,"), once."""
        digest = hashlib.sha256(ca.read_bytes()).hexdigest()
        if digest in self.trusted:
            return
        nick = "consoleproxy-test" if not self.trusted else f"consoleproxy-test-{digest[:12]}"
        self._run("-A", "-t", "C,,", "-n", nick, "-i", str(ca))
        assert nick in self._run("-L")
        self.trusted.add(digest)


@pytest.fixture(scope="session")
def nss_trust(tmp_path_factory: pytest.TempPathFactory) -> NssTrust:
    return NssTrust(tmp_path_factory.mktemp("home"))


@dataclass
class Web:
    """How a test serves the page: plain HTTP, or HTTPS with the CA trusted by the browser."""

    tmp_path: Path
    nss: NssTrust | None

    @contextlib.asynccontextmanager
    async def proxy(self) -> AsyncIterator[Proxy]:
        if self.nss is None:
            async with running_proxy(self.tmp_path) as p:
                yield p
            return
        async with running_proxy(self.tmp_path, listen={"tls": True}) as p:
            assert p.server.dev_ca is not None, "TLS with an empty store must make a development CA"
            self.nss.trust(p.server.dev_ca)
            yield p

    def browser(
        self, p: Proxy, locale: str = "en-US", **context: Any
    ) -> contextlib.AbstractAsyncContextManager[Browser]:
        return browser(p, locale, home=self.nss.home if self.nss is not None else None, **context)


@pytest.fixture(params=["plain", "tls"])
def web(request: pytest.FixtureRequest, tmp_path: Path) -> Web:
    require_tool("chromium", "chromium")
    if request.param == "plain":
        return Web(tmp_path, None)
    return Web(tmp_path, request.getfixturevalue("nss_trust"))


def origin(p: Proxy) -> str:
    """The page's origin: https://localhost (a name on the development certificate) over TLS."""
    if p.server.cfg.listen.tls:
        return f"https://localhost:{p.port}"
    return f"http://127.0.0.1:{p.port}"


def ws_origin(p: Proxy) -> str:
    return "ws" + origin(p).removeprefix("http")


# --- the browser ------------------------------------------------------------------------------


@dataclass
class Browser:
    """One page, with what it logged and requested."""

    page: Page
    origin: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def _response(self, resp: Response) -> None:
        if resp.status >= 400:
            self.errors.append(f"HTTP {resp.status} for {resp.url}")

    def _websocket(self, ws: WebSocket) -> None:
        self.websockets.append(ws.url)

    def assert_clean(self) -> None:
        """No console errors, no page errors, nothing fetched from outside the proxy's origin."""
        assert not self.errors, self.errors
        # data:/blob: URLs (noVNC's cursor image) never leave the browser.
        outside = [u for u in self.requests if not u.startswith(self.origin + "/")
                   and not u.startswith(("data:", "blob:"))]
        assert not outside, f"requests outside {self.origin}: {outside}"
        ws_origin = "ws" + self.origin.removeprefix("http") + "/"
        assert all(u.startswith(ws_origin) for u in self.websockets), self.websockets

    async def status(self) -> str:
        return (await self.page.locator("#status").text_content() or "").strip()

    async def wait_state(self, state: str) -> None:
        """Wait (bounded) until the page leaves loading/connecting; it must then be ``state``."""
        status = self.page.locator("#status")
        await pw_expect(status).not_to_have_attribute(
            "data-state", re.compile(r"^(loading|connecting)$"), timeout=TIMEOUT_MS
        )
        got = await status.get_attribute("data-state")
        assert got == state, f"page is {got!r}, not {state!r}: {await self.status()!r} " + (
            await self.page.locator("#status-reason").text_content() or ""
        )


@contextlib.asynccontextmanager
async def browser(
    p: Proxy, locale: str = "en-US", home: Path | None = None, **context: Any
) -> AsyncIterator[Browser]:
    """Chromium on a page of ``p``; with ``home`` as HOME (whose .pki/nssdb holds the trust);
    ``context``: Playwright context options (a phone's viewport, touch) over the desktop default."""
    chromium = require_tool("chromium", "chromium")
    env = {**os.environ, "HOME": str(home)} if home is not None else None
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, env=env,
                                     timeout=30_000)
        try:
            options: dict[str, Any] = {"viewport": {"width": 1100, "height": 640}, **context}
            ctx = await b.new_context(locale=locale, **options)
            page = await ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            br = Browser(page, origin(p))
            page.on("console", br._console)
            page.on("pageerror", lambda exc: br.errors.append(f"pageerror: {exc}"))
            page.on("request", lambda req: br.requests.append(req.url))
            page.on("response", br._response)
            page.on("websocket", br._websocket)
            yield br
            await ctx.close()
        finally:
            await b.close()


# The page as its load event saw it (Playwright's goto returns after that event): its language, and
# each element with an id, its text and whether it is disabled. Text read after goto may have been
# put in the page's language just in time, or not yet; what the load event saw is one or the other.
AT_LOAD = """
window.addEventListener("load", () => {
    const els = {};
    for (const el of document.querySelectorAll("[id]")) {
        els[el.id] = {text: el.textContent, disabled: Boolean(el.disabled)};
    }
    window.__atLoad = {lang: document.documentElement.lang, els};
});
"""


async def at_load(page: Page, url: str) -> dict[str, Any]:
    """Open ``url``; what its load event saw (AT_LOAD)."""
    await page.add_init_script(AT_LOAD)
    await page.goto(url)
    handle = await page.wait_for_function("() => window.__atLoad", polling=50)
    got: dict[str, Any] = await handle.json_value()
    return got


def console_url(p: Proxy, token: str, **params: str) -> str:
    query = "&".join([f"token={token}", *(f"{k}={v}" for k, v in params.items())])
    return f"{origin(p)}/console?{query}"


CANVAS_NOT_UNIFORM = """() => {
    const c = document.querySelector('#screen canvas');
    if (!c || !c.width || !c.height) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 4; i < d.length; i += 4) {
        if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) {
            return {width: c.width, height: c.height};
        }
    }
    return false;
}"""


# --- the demo VNC server's record -------------------------------------------------------------


@contextlib.asynccontextmanager
async def demo_server() -> AsyncIterator[DemoVncServer]:
    demo = DemoVncServer()
    await demo.start()
    try:
        yield demo
    finally:
        await demo.close()


def key_events(events: list[Any]) -> list[tuple[int, bool]]:
    """(keysym, down) of every key event the demo server got, plain or QEMU extended."""
    return [(ev.keysym, ev.down) for ev in events if isinstance(ev, KeyEvent | ExtendedKeyEvent)]


async def wait_keys(demo: DemoVncServer, count: int, within: float = 10) -> list[tuple[int, bool]]:
    """Wait (bounded) until the demo server has recorded ``count`` key events; return them."""
    events = await demo.wait_for_events(lambda evs: len(key_events(evs)) >= count, within)
    return key_events(events)


def press(keysym: int) -> list[tuple[int, bool]]:
    return [(keysym, True), (keysym, False)]


def shifted(keysym: int) -> list[tuple[int, bool]]:
    return [(SHIFT_L, True), *press(keysym), (SHIFT_L, False)]


# "Hello, 세상! 123" typed for a US guest (novnc_static/typing.js): 세 and 상 cannot be typed on a US
# layout, so the page lists them and, on "Type the rest", types the others, ASCII with the shifted
# keysym inside Shift_L.
HELLO_KEYS = [
    *shifted(ord("H")), *press(ord("e")), *press(ord("l")), *press(ord("l")), *press(ord("o")),
    *press(ord(",")), *press(ord(" ")),
    *shifted(ord("!")), *press(ord(" ")), *press(ord("1")), *press(ord("2")), *press(ord("3")),
]


# --- tests ------------------------------------------------------------------------------------


async def test_page_shows_qemu_screen(web: Web) -> None:
    from test_real_vnc import qemu

    async with qemu(web.tmp_path) as port, web.proxy() as p, web.browser(p) as br:
        token = p.token(port=port, name="web-01")
        await br.page.goto(console_url(p, token, language="en", name="web-01"))
        await br.wait_state("connected")
        assert await br.status() == "Connected to web-01"
        assert await br.page.title() == "web-01 — Console"
        # SeaBIOS' text screen: the canvas shows more than one colour.
        handle = await br.page.wait_for_function(CANVAS_NOT_UNIFORM, polling=100, timeout=45_000)
        size = await handle.json_value()
        assert size["width"] > 0 and size["height"] > 0
        ARTIFACTS.mkdir(exist_ok=True)
        await br.page.screenshot(path=str(ARTIFACTS / "page-qemu.png"))
        # Actual size: the canvas is shown pixel for pixel.
        await br.page.select_option("#display-mode", "native")
        await br.page.wait_for_function(
            "() => { const c = document.querySelector('#screen canvas');"
            " return c.clientWidth === c.width && c.clientHeight === c.height; }",
            polling=100,
        )
        br.assert_clean()


async def test_type_text_and_key_buttons_reach_the_server(web: Web) -> None:
    async with demo_server() as demo, web.proxy() as p, web.browser(p) as br:
        await br.page.goto(console_url(p, p.token(port=demo.port, password=demo.password),
                                       language="en"))
        await br.wait_state("connected")
        page = br.page

        # "Type text" for a US guest: what a US layout cannot type is listed before anything is
        # sent, and typed only on "Type the rest", without those characters.
        await page.click("#toggle-type")
        await pw_expect(page.locator("#type-layout")).to_have_value("us")  # English page, new browser
        await page.fill("#type-text", "Hello, 세상! 123")
        await page.click("#type-send")
        await pw_expect(page.locator("#type-untypable")).to_have_text(
            "These characters cannot be typed with the English (US) layout and will be skipped: 세 상"
        )
        assert key_events(demo.events) == []
        await page.click("#type-anyway")
        got = await wait_keys(demo, len(HELLO_KEYS))
        assert got == HELLO_KEYS
        # The demo server asks for QEMU extended key events: every key carries its scan code
        # (Shift_L 0x2a, H 0x23, 1 0x02).
        typed = [ev for ev in demo.events if isinstance(ev, KeyEvent | ExtendedKeyEvent)]
        assert [(ev.keysym, ev.keycode) for ev in typed[:2]] == [(SHIFT_L, 0x2A), (ord("H"), 0x23)]
        assert [(ev.keysym, ev.keycode) for ev in typed[16:18]] == [(SHIFT_L, 0x2A), (ord("!"), 0x02)]
        assert all(type(ev) is ExtendedKeyEvent for ev in typed)
        await pw_expect(page.locator("#type-result")).to_have_text("Typed 12 characters.")
        await pw_expect(page.locator("#type-untypable")).to_be_hidden()
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "page-demo-type-text.png"))

        # Ctrl-Alt-Del: the three keys down, then up in reverse order.
        n = len(got)
        await page.click("#send-cad")
        got = await wait_keys(demo, n + 6)
        assert got[n:] == [(CONTROL_L, True), (ALT_L, True), (DELETE, True),
                           (DELETE, False), (ALT_L, False), (CONTROL_L, False)]

        # Ctrl-Alt-F2 from the menu.
        n = len(got)
        await page.click("#fkeys-menu summary")
        await page.click("#send-caf2")
        got = await wait_keys(demo, n + 6)
        assert got[n:] == [(CONTROL_L, True), (ALT_L, True), (F1 + 1, True),
                           (F1 + 1, False), (ALT_L, False), (CONTROL_L, False)]

        # Sticky Win: down on the first press, up on the second.
        n = len(got)
        await page.click("#sticky-win")
        await pw_expect(page.locator("#sticky-win")).to_have_attribute("aria-pressed", "true")
        await page.click("#sticky-win")
        await pw_expect(page.locator("#sticky-win")).to_have_attribute("aria-pressed", "false")
        got = await wait_keys(demo, n + 2)
        assert got[n:] == [(SUPER_L, True), (SUPER_L, False)]

        # Clipboard panel: the text goes out as ClientCutText.
        await page.click("#toggle-clipboard")
        await page.fill("#clipboard-text", "copied text")
        await page.click("#clipboard-send")
        await demo.wait_for_events(lambda evs: CutText("copied text") in evs, 10)
        await pw_expect(page.locator("#clipboard-result")).to_have_text("Sent to the VM clipboard.")
        br.assert_clean()


async def test_refusals_in_korean_and_english(web: Web) -> None:
    async with web.proxy() as p, web.browser(p) as br:
        dead_port = free_port()  # nothing listens there: the proxy answers 4010
        for lang in ("ko", "en"):
            expired = p.token(port=dead_port, ttl=60, now=int(time.time()) - 3600)
            fresh = p.token(port=dead_port)
            cases = [(expired, 4002), (fresh, 4010), (fresh, 4003)]  # the 2nd use of `fresh`
            for token, code in cases:
                await br.page.goto(console_url(p, token, language=lang))
                await br.wait_state("disconnected")
                text = await br.status()
                assert text == MESSAGES[(lang, code)], (lang, code, text)
                assert await br.page.locator("#status").get_attribute("data-code") == str(code)
                # One language only: no Latin letters in Korean, no Hangul in English.
                assert not (LATIN if lang == "ko" else HANGUL).search(text), text
                # The server's reason is shown beneath, labelled in the page's language.
                reason = br.page.locator("#status-reason")
                await pw_expect(reason).to_be_visible()
                label = "서버가 보낸 상세 내용: " if lang == "ko" else "Details from the server: "
                assert (await reason.text_content() or "").startswith(label)
                assert await br.page.evaluate("document.documentElement.lang") == lang
                if (lang, code) == ("ko", 4002):
                    ARTIFACTS.mkdir(exist_ok=True)
                    await br.page.screenshot(path=str(ARTIFACTS / "page-expired-ko.png"))
        br.assert_clean()


async def test_cloudstack_path_and_raw_query(web: Web) -> None:
    async with demo_server() as demo, web.proxy() as p, web.browser(p, locale="ko-KR") as br:
        token = p.token(port=demo.port, password=demo.password)
        base = f"{origin(p)}/resource/noVNC/vnc.html"
        await br.page.goto(f"{base}?autoconnect=true&port={p.port}&token={token}&show_dot=true")
        await br.wait_state("connected")
        # No language= here: the browser's (ko-KR) picks Korean.
        assert (await br.status()).endswith("연결됨")
        assert br.websockets[-1] == f"{ws_origin(p)}/websockify?token={token}&resume=1"

        # CloudStack tokens carry "+", "/" and "=": forwarded exactly as in the page's URL, with
        # extra=; the proxy refuses this one as invalid (4001) and the page says so.
        fake, extra = "AbC+dEf/gh+i==", "x+y/z="
        await br.page.goto(f"{base}?autoconnect=true&port={p.port}&token={fake}&extra={extra}"
                           "&language=en")
        await br.wait_state("disconnected")
        assert br.websockets[-1] == f"{ws_origin(p)}/websockify?token={fake}&extra={extra}&resume=1"
        assert await br.status() == MESSAGES[("en", 4001)]
        br.assert_clean()


async def test_view_only_hides_input_controls(web: Web) -> None:
    async with demo_server() as demo, web.proxy() as p, web.browser(p) as br:
        token = p.token(port=demo.port, password=demo.password, view_only=True, name="ro-vm")
        await br.page.goto(console_url(p, token, language="en", view_only="1", name="ro-vm"))
        await br.wait_state("connected")
        assert await br.status() == "Connected to ro-vm (view only)"
        page = br.page
        for sel in ("#send-cad", "#fkeys-menu", "#sticky-ctrl", "#sticky-alt", "#sticky-win",
                    "#toggle-type", "#clipboard-send"):
            await pw_expect(page.locator(sel)).to_be_hidden()
        # Viewing controls stay.
        for sel in ("#display-mode", "#toggle-clipboard", "#toggle-help"):
            await pw_expect(page.locator(sel)).to_be_visible()
        await page.click("#toggle-help")
        await pw_expect(page.locator("#help-viewonly")).to_be_visible()
        assert await page.evaluate("document.body.classList.contains('view-only')")
        br.assert_clean()


async def test_strings_complete_in_both_languages(web: Web) -> None:
    """Every string exists in Korean and English, and the help explains scan codes."""
    async with web.proxy() as p, web.browser(p) as br:
        await br.page.goto(f"{origin(p)}/console?language=en")  # no token
        await br.wait_state("error")
        keys = await br.page.evaluate(
            "import('/static/i18n.js').then(m => [Object.keys(m.STRINGS.en).sort(),"
            " Object.keys(m.STRINGS.ko).sort(), m.STRINGS.en['help.keyboard']])"
        )
        en, ko, help_text = keys
        assert en == ko
        for code in (4001, 4002, 4003, 4004, 4008, 4010, 4011, 4012, 4013, 1001):
            assert f"close.{code}" in en
        assert "close.generic" in en
        assert "scan code" in help_text and "QEMU" in help_text
        assert "token" in await br.status()
        br.assert_clean()


async def test_https_page_fails_without_the_trusted_ca(tmp_path: Path, nss_trust: NssTrust) -> None:
    """The trust is real: the same HTTPS page fails in a browser whose HOME has no NSS database,
    and loads in one whose NSS database trusts the development CA."""
    require_tool("chromium", "chromium")
    web = Web(tmp_path, nss_trust)
    untrusting = tmp_path / "fresh-home"
    untrusting.mkdir()
    async with web.proxy() as p:
        url = f"{origin(p)}/console?language=en"
        assert url.startswith("https://localhost:")
        async with browser(p, home=untrusting) as br:
            with pytest.raises(Error, match=r"net::ERR_CERT_AUTHORITY_INVALID"):
                await br.page.goto(url)
        async with web.browser(p) as br:
            resp = await br.page.goto(url)
            assert resp is not None and resp.ok
            await br.wait_state("error")  # loaded: no token, the page says so
            br.assert_clean()


# --- Korean, layouts, the on-screen keyboard (issue 20) ------------------------------------------

XK_HANGUL, XK_HANGUL_HANJA = 0xFF31, 0xFF34
LANG1, LANG2 = 0x72, 0x71  # QEMU key codes (XT) of Lang1 (한/영) and Lang2 (한자)
# XT scan codes of the US key positions used below.
XT = {
    "q": 0x10, "w": 0x11, "e": 0x12, "r": 0x13, "t": 0x14, "y": 0x15, "u": 0x16, "i": 0x17, "o": 0x18,
    "p": 0x19, "a": 0x1E, "s": 0x1F, "d": 0x20, "f": 0x21, "g": 0x22, "h": 0x23, "j": 0x24, "k": 0x25,
    "l": 0x26, "z": 0x2C, "x": 0x2D, "c": 0x2E, "v": 0x2F, "b": 0x30, "n": 0x31, "m": 0x32,
    " ": 0x39, "shift": 0x2A, "lang1": LANG1,
}


def scancodes(events: list[Any]) -> list[tuple[int, bool]]:
    """(scan code, down) of the QEMU extended key events; a plain KeyEvent fails the test."""
    keys = [ev for ev in events if isinstance(ev, KeyEvent | ExtendedKeyEvent)]
    assert all(isinstance(ev, ExtendedKeyEvent) for ev in keys), keys
    return [(ev.keycode, ev.down) for ev in keys if isinstance(ev, ExtendedKeyEvent)]


def taps(*names: str) -> list[tuple[int, bool]]:
    out: list[tuple[int, bool]] = []
    for name in names:
        out += [(XT[name], True), (XT[name], False)]
    return out


# "안녕하세요 abc" to a Korean guest whose IME is in English: 한/영, the dubeolsik keys of
# 안 (d k s) 녕 (s u d) 하 (g k) 세 (t p) 요 (d y), Space (same in both modes), 한/영, a b c.
ANNYEONG_ABC = [
    *taps("lang1", "d", "k", "s", "s", "u", "d", "g", "k", "t", "p", "d", "y", " "),
    *taps("lang1", "a", "b", "c"),
]
# "Zeyz" to a German guest: Z and Y swap places on QWERTZ.
ZEYZ_DE = [(XT["shift"], True), *taps("y"), (XT["shift"], False), *taps("e", "z", "y")]


@pytest.mark.integration
async def test_korean_keys_and_layout_typing_reach_the_server(web: Web) -> None:
    async with demo_server() as demo, web.proxy() as p, web.browser(p, locale="ko-KR") as br:
        page = br.page
        await page.goto(console_url(p, p.token(port=demo.port, password=demo.password)))
        await br.wait_state("connected")
        assert (await br.status()).endswith("연결됨")

        # The 한/영 and 한자 buttons: Lang1 / Lang2 as QEMU extended key events, press and release.
        await pw_expect(page.locator("#send-hanyeong")).to_have_text("한/영")
        await pw_expect(page.locator("#send-hanja")).to_have_text("한자")
        await page.click("#send-hanyeong")
        await page.click("#send-hanja")
        await wait_keys(demo, 4)
        keys = [ev for ev in demo.events if isinstance(ev, KeyEvent | ExtendedKeyEvent)]
        assert keys == [ExtendedKeyEvent(True, XK_HANGUL, LANG1), ExtendedKeyEvent(False, XK_HANGUL, LANG1),
                        ExtendedKeyEvent(True, XK_HANGUL_HANJA, LANG2),
                        ExtendedKeyEvent(False, XK_HANGUL_HANJA, LANG2)]

        # The physical 한/영 key, whatever code the browser reports: a Korean keyboard sends only a
        # keydown, and the guest gets press and release at once. With "Right Alt is 한/영", Right
        # Alt is 한/영 and Right Ctrl is 한자 (noVNC alone would send Right Alt 0xb8 and Right Ctrl
        # 0x9d), their keyups swallowed. The 한자 button last: nothing else reached the guest.
        await page.click("#toggle-type")
        await page.check("#ralt-hangul")
        await page.focus("#screen canvas")
        n = len(scancodes(demo.events))
        for code, key, types in (("Lang1", "HangulMode", ["keydown"]),
                                 ("HangulMode", "HangulMode", ["keydown"]),
                                 ("AltRight", "Alt", ["keydown", "keyup"]),
                                 ("ControlRight", "Control", ["keydown", "keyup"])):
            await page.evaluate(
                """([code, key, types]) => {
                    const c = document.querySelector('#screen canvas');
                    for (const type of types) {
                        const init = {code, key, bubbles: true, cancelable: true};
                        c.dispatchEvent(new KeyboardEvent(type, init));
                    }
                }""",
                [code, key, types],
            )
        await page.click("#send-hanja")
        await wait_keys(demo, n + 10)
        lang2 = [(LANG2, True), (LANG2, False)]
        assert scancodes(demo.events)[n:] == [*taps("lang1", "lang1", "lang1"), *lang2, *lang2]

        # Type text in Korean: layout ko (the default for a Korean page). The dialog's idea of the
        # guest IME's mode followed the four 한/영 presses (not 한자): English, as at the start.
        await pw_expect(page.locator("#type-layout")).to_have_value("ko")
        await pw_expect(page.locator("#type-ime")).to_have_value("en")
        n = len(scancodes(demo.events))
        await page.click("#send-hanyeong")
        await pw_expect(page.locator("#type-ime")).to_have_value("ko")
        await wait_keys(demo, n + 2)
        await page.select_option("#type-ime", "en")
        await page.fill("#type-text", "안녕하세요 abc")
        n = len(scancodes(demo.events))
        await page.click("#type-send")
        await wait_keys(demo, n + len(ANNYEONG_ABC))
        assert scancodes(demo.events)[n:] == ANNYEONG_ABC
        await pw_expect(page.locator("#type-result")).to_have_text("9개 문자를 입력했습니다.")

        # A German guest: "Zeyz" on QWERTZ keys; the layout is remembered by the browser.
        await page.select_option("#type-layout", "de")
        await pw_expect(page.locator("#type-ime-row")).to_be_hidden()
        await page.fill("#type-text", "Zeyz")
        n = len(scancodes(demo.events))
        await page.click("#type-send")
        await wait_keys(demo, n + len(ZEYZ_DE))
        assert scancodes(demo.events)[n:] == ZEYZ_DE
        # Hangul has no keys on a German layout: listed (invisible ones by code), nothing sent.
        await page.fill("#type-text", "ü 한\u00a0")
        await page.click("#type-send")
        await pw_expect(page.locator("#type-untypable")).to_have_text(
            "독일어 배열로는 다음 문자를 입력할 수 없어 건너뜁니다: 한 U+00A0")  # no-break space

        # While the local IME composes (key "Process", keyCode 229), a hint says what to do.
        await page.evaluate(
            """() => document.querySelector('#screen canvas').dispatchEvent(
                new KeyboardEvent('keydown', {key: 'Process', keyCode: 229, bubbles: true}))"""
        )
        await pw_expect(page.locator("#ime-hint")).to_be_visible()
        assert "한/영" in (await page.locator("#ime-hint-text").text_content() or "")

        await page.goto(console_url(p, p.token(port=demo.port, password=demo.password)))  # single use
        await br.wait_state("connected")
        await pw_expect(page.locator("#type-layout")).to_have_value("de")
        await pw_expect(page.locator("#ralt-hangul")).to_be_checked()
        ARTIFACTS.mkdir(exist_ok=True)
        await page.click("#toggle-type")
        await page.screenshot(path=str(ARTIFACTS / "page-korean-type-text.png"))
        br.assert_clean()


@pytest.mark.integration
async def test_long_paste_is_paced_with_progress_pause_and_cancel(web: Web) -> None:
    text = ("abc def ghi\n" * 834)[:10_000]
    keysyms = [0xFF0D if ch == "\n" else ord(ch) for ch in text]
    async with demo_server() as demo, web.proxy() as p, web.browser(p) as br:
        page = br.page
        await page.goto(console_url(p, p.token(port=demo.port, password=demo.password), language="en"))
        await br.wait_state("connected")
        await page.click("#toggle-type")
        await page.select_option("#type-layout", "us")
        await page.select_option("#type-rate", "500")
        await page.fill("#type-text", text)
        await page.click("#type-send")
        await pw_expect(page.locator("#type-progress-row")).to_be_visible()
        await wait_keys(demo, 100)
        # The page answers while it types, and the text goes out paced, not all at once.
        await page.click("#type-pause")
        await pw_expect(page.locator("#type-pause")).to_have_text("Resume")
        result = page.locator("#type-result")
        await pw_expect(result).to_have_text(re.compile(r"^Paused after \d+ of 10000 keys\.$"))
        paused_at = int((await result.text_content() or "").split()[2])
        assert 50 <= paused_at < 10_000
        assert int(await page.locator("#type-progress").get_attribute("value") or -1) == paused_at
        got = await wait_keys(demo, 2 * paused_at)
        assert got == [(k, down) for k in keysyms[:paused_at] for down in (True, False)]

        await page.click("#type-pause")  # resume
        await wait_keys(demo, 2 * paused_at + 20)
        await page.click("#type-cancel")
        await pw_expect(result).to_have_text(re.compile(r"^Cancelled after \d+ of 10000 keys\.$"))
        cancelled_at = int((await result.text_content() or "").split()[2])
        assert paused_at < cancelled_at < 10_000
        await pw_expect(page.locator("#type-progress-row")).to_be_hidden()
        # A marker after the cancel: what came before it is exactly the first keys, each released.
        await page.click("#send-hanja")
        got = await wait_keys(demo, 2 * cancelled_at + 2)
        assert got == [(k, down) for k in keysyms[:cancelled_at] for down in (True, False)] + [
            (XK_HANGUL_HANJA, True), (XK_HANGUL_HANJA, False)]
        br.assert_clean()


PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
         "device_scale_factor": 3}


@pytest.mark.integration
async def test_phone_toolbar_and_on_screen_keyboard(web: Web) -> None:
    async with demo_server() as demo, web.proxy() as p, web.browser(p, locale="ko-KR", **PHONE) as br:
        page = br.page
        await page.goto(console_url(p, p.token(port=demo.port, password=demo.password)))
        await br.wait_state("connected")
        # Phone width: every control of the toolbar is on the screen, nothing scrolls sideways.
        shown = """() => [...document.querySelectorAll('#bar button, #bar select, #bar summary')]
            .filter(el => el.offsetParent !== null && !el.closest('details:not([open]) > div'))
            .map(el => {
                const r = el.getBoundingClientRect();
                return [el.id || el.textContent, r.left, r.right];
            })"""
        boxes = await page.evaluate(shown)
        assert len(boxes) >= 12, boxes
        assert all(left >= 0 and right <= 390 for _, left, right in boxes), boxes
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await page.tap("#fkeys-menu summary")  # the Ctrl+Alt+F… menu fits too
        boxes = await page.evaluate(shown)
        assert len([b for b in boxes if str(b[0]).startswith("send-caf")]) == 12
        assert all(left >= 0 and right <= 390 for _, left, right in boxes), boxes
        await page.tap("#fkeys-menu summary")

        # The keyboard button focuses the hidden input (a phone shows its keyboard for it).
        await pw_expect(page.locator("#osk")).to_have_text("키보드")
        await page.tap("#osk")
        await pw_expect(page.locator("#osk")).to_have_attribute("aria-pressed", "true")
        assert await page.evaluate("document.activeElement.id") == "osk-input"
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "page-phone.png"))

        # Typed text goes to the console key by key; Enter and Backspace as keys; Hangul from
        # the phone's keyboard with the 한/영 toggles (the Type text layout is ko on a Korean page).
        await page.keyboard.type("ls -la")
        await page.keyboard.press("Enter")
        await page.keyboard.press("Backspace")
        await page.keyboard.insert_text("한")
        want = [*taps("l", "s", " "), (0x0C, True), (0x0C, False), *taps("l", "a"),
                (0x1C, True), (0x1C, False), (0x0E, True), (0x0E, False),
                *taps("lang1", "g", "k", "s", "lang1")]
        await wait_keys(demo, len(want))
        assert scancodes(demo.events) == want
        assert await page.locator("#osk-input").input_value() == ""
        br.assert_clean()


@pytest.mark.integration
async def test_proxy_drops_the_lang_releases_of_the_page_for_a_drop_token(web: Web) -> None:
    """With the token's lang_key_release "drop", the guest gets the presses of 한/영 and 한자 from
    the page's buttons and no release, and every other key as it was sent."""
    async with demo_server() as demo, web.proxy() as p, web.browser(p) as br:
        page = br.page
        token = p.token(port=demo.port, password=demo.password, lang_key_release="drop")
        await page.goto(console_url(p, token, language="en"))
        await br.wait_state("connected")
        await page.click("#send-hanyeong")
        await page.click("#send-hanja")
        await page.click("#sticky-win")  # a marker: press and release of Win both pass
        await page.click("#sticky-win")
        await wait_keys(demo, 4)
        assert scancodes(demo.events) == [(LANG1, True), (LANG2, True), (0xDB, True), (0xDB, False)]
        br.assert_clean()


# --- resume (DESIGN 10) -------------------------------------------------------------------------


class Cutter:
    """A TCP hop between the browser and the proxy whose connections the test cuts (RST, no
    close frame), as a lost network or a dead balancer path would."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.port = 0

    async def _link(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        self.links.append((w, uw))

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            b.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    def cut(self) -> None:
        for browser_side, proxy_side in self.links:
            proxy_side.transport.abort()
            browser_side.transport.abort()
        self.links.clear()


@contextlib.asynccontextmanager
async def cutter(target: int) -> AsyncIterator[Cutter]:
    c = Cutter(target)
    server = await asyncio.start_server(c._link, "127.0.0.1", 0)
    c.port = server.sockets[0].getsockname()[1]
    try:
        yield c
    finally:
        c.cut()
        server.close()


# Every status key the page shows, in order (a MutationObserver: "reconnecting" may be short).
RECORD_STATES = """() => {
    window.__states = [];
    const el = document.getElementById('status');
    new MutationObserver(() => window.__states.push(el.dataset.key))
        .observe(el, {attributes: true, attributeFilter: ['data-key']});
}"""


async def test_console_comes_back_after_a_cut_connection(tmp_path: Path) -> None:
    async with demo_server() as demo, running_proxy(tmp_path) as p, cutter(p.port) as hop, \
            browser(p, locale="ko-KR") as br:
        br.origin = f"http://127.0.0.1:{hop.port}"
        token = p.token(port=demo.port, password=demo.password)
        await br.page.goto(f"{br.origin}/console?token={token}")
        await br.wait_state("connected")
        await br.page.evaluate(RECORD_STATES)
        hop.cut()
        # "Reconnecting", then back within 5 s (the bound), without a new token. (The
        # page's status is still "connected" until it sees the cut: wait for the sequence.)
        await br.page.wait_for_function(
            """() => { const s = window.__states, i = s.indexOf('status.reconnecting');
                       return i >= 0 && s.slice(i).some(k => k.startsWith('status.connected')); }""",
            polling=50, timeout=5000,
        )
        states = await br.page.evaluate("window.__states")
        assert states[0] == "status.reconnecting" and states[-1].startswith("status.connected"), states
        await pw_expect(br.page.locator("#status")).to_have_attribute("data-state", "connected")
        first, again = br.websockets
        assert first.endswith(f"?token={token}&resume=1")
        assert again == f"ws://127.0.0.1:{hop.port}/websockify?resume=1&after=1006"  # no ticket in it
        (session,) = list(p.server.registry)
        assert session.resume_gen == 1
        # The resumed console carries input to the VM.
        n = len(key_events(demo.events))
        await br.page.keyboard.press("a")
        assert (await wait_keys(demo, n + 2))[n:] == press(ord("a"))
        br.assert_clean()


async def test_page_is_in_its_language_when_loaded(tmp_path: Path) -> None:
    """?language=ko in an English browser: Korean by the load event, not later (noVNC's core,
    whose module ends in a top-level await, no longer holds the page's own script back)."""
    async with running_proxy(tmp_path) as p, browser(p, "en-US") as br:
        got = await at_load(br.page, console_url(p, "x", autoconnect="false", language="ko"))
        assert (got["lang"], got["els"]["status"]["text"]) == ("ko", "콘솔을 불러오는 중입니다…")
        assert got["els"]["toggle-help"]["text"] == "도움말"
        await br.wait_state("ready")
        assert await br.status() == "준비되었습니다. 연결 버튼을 눌러 콘솔을 여십시오."
        br.assert_clean()


@pytest.mark.parametrize(("language", "text"), [
    ("en", "The console viewer could not be loaded. Reload the page to try again."),
    ("ko", "콘솔 화면 프로그램을 불러오지 못했습니다. 페이지를 새로 고쳐 다시 시도하십시오."),
])
async def test_a_viewer_that_fails_to_load_is_a_clear_error(tmp_path: Path, language: str, text: str) -> None:
    """noVNC's core is imported after the page's own script: if that fails (the proxy went away
    mid-load), the page says so instead of showing "Loading…" for ever."""
    async with running_proxy(tmp_path) as p, browser(p, "en-US") as br:
        await br.page.route("**/novnc/core/rfb.js", lambda route: route.abort())
        await br.page.goto(console_url(p, "x", language=language))
        await br.wait_state("error")
        assert await br.status() == text
        assert await br.page.locator("#connect").is_hidden()
        # The aborted fetch is the browser's own console error (logged twice); nothing else.
        assert br.errors and set(br.errors) == {"console: Failed to load resource: net::ERR_FAILED"}


async def test_reconnecting_text_in_korean_and_english(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as p, browser(p) as br:
        await br.page.goto(console_url(p, "x", autoconnect="false", language="ko"))
        texts = await br.page.evaluate("""async () => {
            const { STRINGS } = await import('/static/i18n.js');
            return [STRINGS.ko['status.reconnecting'], STRINGS.en['status.reconnecting'],
                    STRINGS.ko['close.4005'], STRINGS.en['close.4005']];
        }""")
        assert texts[0] == "연결이 끊어졌습니다. 다시 연결하는 중입니다…"
        assert texts[1] == "Connection lost. Reconnecting…"
        assert HANGUL.search(texts[2]) and not LATIN.search(texts[2])
        assert "reconnect" in texts[3] and not HANGUL.search(texts[3])
