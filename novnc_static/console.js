// The console page: noVNC's RFB core plus our own viewer (status, keys, Type text, clipboard,
// display modes, full screen, view-only), in Korean and English. Loaded as an ES module; the page's
// CSP forbids inline scripts and styles, and nothing is loaded from outside the proxy.
//
// Query parameters (read from the RAW location.search: "+" stays "+", because CloudStack tokens
// are base64 with "+", "/" and "="; the token and extra values are forwarded to /websockify
// exactly as they appear in the page's URL):
//   token      the console token (required)
//   extra      CloudStack's extra security token, forwarded as &extra=
//   port       WebSocket port on the page's host (default: the page's own port)
//   autoconnect  "false"/"0" shows a Connect button instead of connecting at once
//   language   ko | en (else the browser's preferred language; English when neither)
//   name       the VM name for the title (else the VNC server's desktop name)
//   view_only=1 | viewonly=true   hide input controls and send no input
//   show_dot   show a dot when the remote cursor is invisible
//   log        noVNC log level (error|warn|info|debug|none; default warn)

import { initLogging } from "/novnc/core/util/logging.js";
import { pickLanguage, translator } from "./i18n.js";
import { XK, ctrlAltF } from "./keys.js";
import { LANG1, LANG2, LAYOUTS, planTyping, tap } from "./typing.js";

// noVNC's core is imported, not statically: its browser checks end in a top-level await (an H.264
// decoder probe), which would hold this whole module, the page's language included, until after
// the page's load event. Fetched at once; the console connects when it is there.
const novnc = import("/novnc/core/rfb.js");
let RFB = null;

// Close codes the proxy sends on purpose (DESIGN.md 8); each has its own message.
const KNOWN_CODES = [4001, 4002, 4003, 4004, 4005, 4008, 4010, 4011, 4012, 4013, 1001, 1000, 1006];
const MAX_TYPE_CHARS = 20000; // the textarea's maxlength too
// Typing is paced (keys per second, chosen in the dialog) and waits while the WebSocket has more
// than this much unsent: a long paste neither blocks the page nor floods the guest.
const TYPE_TICK_MS = 50;
const TYPE_MAX_BUFFERED = 16 * 1024;
const STORE = "consoleproxy."; // localStorage keys: remembered per browser
// Resume (DESIGN 10): closes after which the console comes back with its resume ticket (a lost
// connection, a drain or shutdown, a proxy busy for a moment). Any other code ends it: 4001-4004,
// 4005 (ticket refused), 4011, 4012 (idle, lifetime), 4013 (administrator, replaced), 1000.
const RESUMABLE_CODES = [1001, 1005, 1006, 1011, 1012, 1013, 1014, 4008];
// Backoff with jitter: the n-th retry waits min(cap, base * 2^n) times 0.5-1.5, so the users of
// a lost proxy come back spread out instead of all in one second.
const RESUME_BASE_MS = 250;
const RESUME_CAP_MS = 8000;
const RESUME_MAX_TRIES = 30;

// --- query parameters ------------------------------------------------------------------------

export function rawParams(search) {
    const out = new Map();
    const q = search.startsWith("?") ? search.slice(1) : search;
    for (const part of q.split("&")) {
        if (!part) {
            continue;
        }
        const i = part.indexOf("=");
        const key = i < 0 ? part : part.slice(0, i);
        const value = i < 0 ? "" : part.slice(i + 1);
        if (!out.has(key)) { // the first occurrence wins, as on the server
            out.set(key, value);
        }
    }
    return out;
}

function decode(v) {
    try {
        return decodeURIComponent(v); // "+" is left alone
    } catch (e) {
        return v;
    }
}

function truthy(v) {
    return v !== undefined && ["1", "true", "yes", "on"].includes(decode(v).toLowerCase());
}

function falsy(v) {
    return v !== undefined && ["0", "false", "no", "off"].includes(decode(v).toLowerCase());
}

const params = rawParams(window.location.search);
const lang = pickLanguage(params.has("language") ? decode(params.get("language")) : "",
                          navigator.languages && navigator.languages.length ?
                              navigator.languages : [navigator.language]);
const t = translator(lang);
const viewOnly = truthy(params.get("view_only")) || truthy(params.get("viewonly")) ||
    truthy(params.get("view-only"));
const vmNameParam = params.has("name") ? decode(params.get("name")) : "";
const logLevel = params.has("log") ? decode(params.get("log")) : "warn";
try {
    initLogging(logLevel);
} catch (e) {
    initLogging("warn");
}

// The WebSocket URL: same host as the page, ws: for http and wss: for https, on `port` if given.
export function websocketUrl(loc, p) {
    const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
    let port = loc.port;
    if (p.has("port") && p.get("port") !== "") {
        port = decode(p.get("port"));
        if (!/^[0-9]{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
            return null;
        }
    }
    const defaultPort = scheme === "wss:" ? "443" : "80";
    const hostPort = loc.hostname + (port && port !== defaultPort ? ":" + port : "");
    let url = `${scheme}//${hostPort}/websockify?token=${p.get("token")}`;
    if (p.has("extra") && p.get("extra") !== "") {
        url += `&extra=${p.get("extra")}`;
    }
    return url + "&resume=1"; // ask for resume tickets (text messages noVNC ignores)
}

// The URL of a resume: no token, and the ticket goes in the first message, never in a URL
// (access logs, history). `after` is the close code that broke the console (for the metric).
export function resumeUrl(tokenUrl, after) {
    return tokenUrl.replace(/\/websockify\?.*$/, `/websockify?resume=1&after=${Number(after) || 0}`);
}

// The wait before resume attempt `n` (0-based): exponential, capped, jittered by `rand` in [0, 1).
export function resumeDelay(n, rand) {
    return Math.min(RESUME_CAP_MS, RESUME_BASE_MS * 2 ** n) * (0.5 + rand);
}

// --- page elements -----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const statusBox = $("status-box");
const statusEl = $("status");
const reasonEl = $("status-reason");
const screen = $("screen");
const displayMode = $("display-mode");

function translatePage() {
    document.documentElement.lang = lang;
    for (const el of document.querySelectorAll("[data-i18n]")) {
        el.textContent = t(el.dataset.i18n);
    }
    for (const el of document.querySelectorAll("[data-i18n-title]")) {
        el.title = t(el.dataset.i18nTitle);
    }
    $("toolbar").setAttribute("aria-label", lang === "ko" ? "콘솔 조작" : "Console controls");
    screen.setAttribute("aria-label", lang === "ko" ? "원격 화면" : "Remote screen");
}

// Buttons that send input work only while connected.
const INPUT_BUTTONS = "#keys button, #type-send, #type-anyway, #clipboard-send";

function setStatus(state, key, vars, reason) {
    for (const el of document.querySelectorAll(INPUT_BUTTONS)) {
        el.disabled = state !== "connected";
    }
    $("fkeys-menu").classList.toggle("disabled", state !== "connected");
    if (state !== "connected") {
        $("fkeys-menu").removeAttribute("open");
    }
    statusBox.dataset.state = state;
    statusEl.dataset.state = state;
    statusEl.dataset.key = key;
    statusEl.textContent = t(key, vars);
    document.body.dataset.state = state;
    if (reason) {
        reasonEl.textContent = t("status.reason", { reason });
        reasonEl.hidden = false;
    } else {
        reasonEl.textContent = "";
        reasonEl.hidden = true;
    }
}

function setTitle(name) {
    document.title = name ? t("title.vm", { name }) : t("title");
}

// --- the connection ------------------------------------------------------------------------------

let rfb = null;
let socket = null; // our WebSocket under noVNC (its bufferedAmount paces typing)
let closeInfo = null;
// The latest resume ticket: in this page's memory only (no storage, no URL).
let ticket = null;
let resumeTries = 0;
let resumeTimer = null;
let desktopName = "";
let connected = false;

function vmName() {
    return vmNameParam || desktopName;
}

function showConnected() {
    const name = vmName();
    const key = "status.connected" + (viewOnly ? ".viewonly" : "") + (name ? ".vm" : "");
    setStatus("connected", key, { name });
    setTitle(name);
}

function showClosed(info, clean) {
    if (info === null) {
        setStatus("disconnected", clean ? "close.1000" : "close.1006");
        return;
    }
    const code = info.code;
    const key = KNOWN_CODES.includes(code) ? "close." + code : "close.generic";
    setStatus("disconnected", key, { code }, info.reason);
    statusEl.dataset.code = String(code);
}

// Resume after `info` (the close that ended the console), or false when it must not come back.
function scheduleResume(info) {
    const code = info === null ? 1006 : info.code;
    if (ticket === null || !RESUMABLE_CODES.includes(code) || resumeTries >= RESUME_MAX_TRIES) {
        return false;
    }
    setStatus("reconnecting", "status.reconnecting");
    const delay = resumeDelay(resumeTries, Math.random());
    resumeTries += 1;
    resumeTimer = setTimeout(() => {
        resumeTimer = null;
        connect(code);
    }, delay);
    return true;
}

// `after`: the close code of the console being resumed with `ticket`; undefined for a token.
function connect(after) {
    const token = params.get("token");
    if (!token) {
        setStatus("error", "status.notoken");
        return;
    }
    const tokenUrl = websocketUrl(window.location, params);
    if (tokenUrl === null) {
        setStatus("error", "status.badport");
        return;
    }
    const resuming = after !== undefined && ticket !== null;
    const url = resuming ? resumeUrl(tokenUrl, after) : tokenUrl;
    $("connect").hidden = true;
    if (!resuming) {
        setStatus("connecting", "status.connecting");
    }
    closeInfo = null;
    connected = false;

    // Our own WebSocket, so its close code and reason (DESIGN 8) reach the page: noVNC's
    // "disconnect" event does not carry them. This listener runs before noVNC's onclose.
    let ws;
    try {
        // "consoleproxy.notice": the proxy may tell this page (a text message before RFB) that
        // the session is recorded; the proxy still picks "binary".
        ws = new WebSocket(url, ["binary", "consoleproxy.notice"]);
    } catch (e) {
        setStatus("error", "status.nowebsocket", null, e.message);
        return;
    }
    socket = ws;
    $("recording-notice").hidden = true;
    if (resuming) {
        const sent = ticket;
        ws.addEventListener("open", () => ws.send(new TextEncoder().encode(sent)));
    }
    ws.addEventListener("message", (e) => {
        // noVNC reads only binary messages; the proxy's text ones are ours. A notice starts with
        // "consoleproxy:" (only "consoleproxy:recorded" so far; others are ignored); everything
        // else is a resume ticket ("cpr1.…", base64url and dots: never a ':').
        if (typeof e.data !== "string") {
            return;
        }
        if (e.data.startsWith("consoleproxy:")) {
            if (e.data === "consoleproxy:recorded") {
                $("recording-notice").hidden = false;
            }
        } else {
            ticket = e.data;
        }
    });
    ws.addEventListener("close", (e) => {
        closeInfo = { code: e.code, reason: e.reason };
        if (!connected && (e.code >= 4000 || e.code === 1001)) {
            // The proxy refused on purpose and the page explains why; noVNC would also log its
            // generic "Failed when connecting" as a console error. Restored on "disconnect".
            initLogging("none");
            setTimeout(() => initLogging(logLevel), 0);
        }
    });

    rfb = new RFB(screen, ws, { shared: true });
    rfb.viewOnly = viewOnly;
    rfb.showDotCursor = truthy(params.get("show_dot"));
    rfb.background = "#282828";
    applyDisplayMode();

    rfb.addEventListener("connect", () => {
        connected = true;
        resumeTries = 0;
        showConnected();
        updateRemoteResizeOption();
        if (!viewOnly) {
            rfb.focus({ preventScroll: true });
        }
    });
    rfb.addEventListener("disconnect", (e) => {
        connected = false;
        try {
            initLogging(logLevel);
        } catch (err) {
            initLogging("warn");
        }
        releaseSticky(false);
        stopTyping(false);
        rfb = null;
        if (!scheduleResume(closeInfo)) {
            ticket = null;
            showClosed(closeInfo, e.detail.clean);
        }
    });
    rfb.addEventListener("desktopname", (e) => {
        desktopName = e.detail.name || "";
        if (connected) {
            showConnected();
        } else {
            setTitle(vmName());
        }
    });
    rfb.addEventListener("securityfailure", (e) => {
        setStatus("error", "status.security", null, e.detail.reason || "");
    });
    rfb.addEventListener("credentialsrequired", () => {
        // The proxy offers only security None to the browser; a password prompt means we are
        // not talking to the proxy.
        setStatus("error", "status.security");
        rfb.disconnect();
    });
    rfb.addEventListener("clipboard", (e) => {
        $("clipboard-text").value = e.detail.text;
        $("clipboard-result").textContent = t("clip.received");
    });
}

// --- keys ----------------------------------------------------------------------------------------

function sendEvents(events) {
    if (!rfb || !connected || viewOnly) {
        return false;
    }
    for (const [keysym, code, down] of events) {
        rfb.sendKey(keysym, code, down);
    }
    return true;
}

const sticky = {
    "sticky-ctrl": [XK.Control_L, "ControlLeft"],
    "sticky-alt": [XK.Alt_L, "AltLeft"],
    "sticky-win": [XK.Super_L, "MetaLeft"],
};

function releaseSticky(send) {
    for (const id of Object.keys(sticky)) {
        const btn = $(id);
        if (btn.getAttribute("aria-pressed") === "true") {
            if (send) {
                const [keysym, code] = sticky[id];
                sendEvents([[keysym, code, false]]);
            }
            btn.setAttribute("aria-pressed", "false");
        }
    }
}

function refocus() {
    if (rfb && connected && !viewOnly) {
        rfb.focus({ preventScroll: true });
    }
}

function setupKeys() {
    $("send-cad").addEventListener("click", () => {
        if (rfb && connected) {
            rfb.sendCtrlAltDel();
        }
        refocus();
    });
    const menu = $("fkeys-menu");
    const items = $("fkeys");
    for (let n = 1; n <= 12; n++) {
        const b = document.createElement("button");
        b.type = "button";
        b.id = "send-caf" + n;
        b.textContent = "Ctrl+Alt+F" + n;
        b.addEventListener("click", () => {
            sendEvents(ctrlAltF(n));
            menu.removeAttribute("open");
            refocus();
        });
        items.appendChild(b);
    }
    document.addEventListener("click", (e) => { // a click elsewhere closes the menu
        if (menu.open && !menu.contains(e.target)) {
            menu.removeAttribute("open");
        }
    });
    for (const id of Object.keys(sticky)) {
        $(id).addEventListener("click", () => {
            const btn = $(id);
            const down = btn.getAttribute("aria-pressed") !== "true";
            const [keysym, code] = sticky[id];
            if (sendEvents([[keysym, code, down]])) {
                btn.setAttribute("aria-pressed", down ? "true" : "false");
            }
            refocus();
        });
    }
    $("send-hanyeong").addEventListener("click", () => {
        sendLangKey(LANG1);
        refocus();
    });
    $("send-hanja").addEventListener("click", () => {
        sendEvents(tap(LANG2));
        refocus();
    });
    $("clipboard-send").addEventListener("click", () => {
        if (rfb && connected && !viewOnly) {
            rfb.clipboardPasteFrom($("clipboard-text").value);
            $("clipboard-result").textContent = t("clip.sent");
        }
    });
}

// --- Korean keys, IME hint ------------------------------------------------------------------------

// The physical 한/영 and 한자 keys, whatever `code` the browser reports for them; with "Right Alt
// is 한/영" also Right Alt and Right Ctrl. They are sent as Lang1/Lang2 press and release at once
// (a Korean keyboard sends no release) and kept from noVNC, which would send them as they came.
function langKeyFor(e) {
    if (e.code === "Lang1" || e.code === "HangulMode" || e.key === "HangulMode") {
        return LANG1;
    }
    if (e.code === "Lang2" || e.code === "HanjaMode" || e.key === "HanjaMode") {
        return LANG2;
    }
    if ($("ralt-hangul").checked) {
        if (e.code === "AltRight") {
            return LANG1;
        }
        if (e.code === "ControlRight") {
            return LANG2;
        }
    }
    return null;
}

// 한/영 or 한자, press and release. 한/영 flips the guest IME's mode, so the Type text dialog's
// "input mode right now" follows it.
function sendLangKey(key) {
    if (sendEvents(tap(key)) && key === LANG1) {
        const ime = $("type-ime");
        ime.value = ime.value === "ko" ? "en" : "ko";
        clearPending();
    }
}

let imeHintTimer = null;

function showImeHint() {
    $("ime-hint").hidden = false;
    clearTimeout(imeHintTimer);
    imeHintTimer = setTimeout(() => { $("ime-hint").hidden = true; }, 10000);
}

function setupKoreanKeys() {
    // Capture phase on the screen's container: runs before noVNC's listeners on its canvas.
    screen.addEventListener("keydown", (e) => {
        const key = langKeyFor(e);
        if (key !== null) {
            e.preventDefault();
            e.stopPropagation();
            if (!e.repeat) {
                sendLangKey(key);
            }
            return;
        }
        if (e.key === "Process" || e.keyCode === 229) {
            showImeHint(); // the local IME is composing: its keys never reach the guest as keys
        }
    }, true);
    screen.addEventListener("keyup", (e) => {
        if (langKeyFor(e) !== null) {
            e.preventDefault();
            e.stopPropagation();
        }
    }, true);
    screen.addEventListener("compositionstart", showImeHint, true);
    $("ime-hint-close").addEventListener("click", () => {
        $("ime-hint").hidden = true;
        refocus();
    });
    const ralt = $("ralt-hangul");
    ralt.checked = localStorage.getItem(STORE + "rightAltHangul") === "1";
    ralt.addEventListener("change", () => {
        localStorage.setItem(STORE + "rightAltHangul", ralt.checked ? "1" : "0");
    });
}

// --- Type text: layouts, Korean, pacing -----------------------------------------------------------

let typing = null; // the job in progress: {plan, next, korean, timer, paused, credit}
let pendingPlan = null; // a plan with untypable characters, waiting for "Type the rest"

function typeOptions() {
    return { layout: $("type-layout").value, korean: $("type-ime").value === "ko" };
}

function showImeRow() {
    $("type-ime-row").hidden = $("type-layout").value !== "ko";
}

function setupTypeDialog() {
    const layout = $("type-layout");
    const saved = localStorage.getItem(STORE + "typeLayout");
    layout.value = LAYOUTS.includes(saved) ? saved : (lang === "ko" ? "ko" : "us");
    const rate = $("type-rate");
    const savedRate = localStorage.getItem(STORE + "typeRate");
    if (savedRate && [...rate.options].some((o) => o.value === savedRate)) {
        rate.value = savedRate;
    }
    showImeRow();
    layout.addEventListener("change", () => {
        localStorage.setItem(STORE + "typeLayout", layout.value);
        showImeRow();
        clearPending();
    });
    $("type-ime").addEventListener("change", clearPending);
    $("type-text").addEventListener("input", clearPending);
    rate.addEventListener("change", () => localStorage.setItem(STORE + "typeRate", rate.value));

    $("type-send").addEventListener("click", () => {
        if (typing) {
            return;
        }
        let text = $("type-text").value.slice(0, MAX_TYPE_CHARS);
        if ($("type-enter").checked) {
            text += "\n";
        }
        const plan = planTyping(text, typeOptions());
        if (plan.untypable.length) {
            // Listed before anything is sent; nothing is dropped silently.
            const name = layout.options[layout.selectedIndex].textContent;
            const note = $("type-untypable");
            const chars = plan.untypable.map(shownChar).join(" ");
            note.textContent = t("type.untypable", { layout: name, chars });
            note.hidden = false;
            pendingPlan = plan;
            $("type-anyway").hidden = plan.strokes.length === 0;
            return;
        }
        startTyping(plan);
    });
    $("type-anyway").addEventListener("click", () => {
        if (pendingPlan && !typing) {
            const plan = pendingPlan;
            clearPending();
            startTyping(plan);
        }
    });
    $("type-pause").addEventListener("click", () => {
        if (!typing) {
            return;
        }
        typing.paused = !typing.paused;
        $("type-pause").textContent = t(typing.paused ? "type.resume" : "type.pause");
        if (typing.paused) {
            clearTimeout(typing.timer);
            showProgress("type.paused");
        } else {
            typing.timer = setTimeout(typeTick, 0);
        }
    });
    $("type-cancel").addEventListener("click", () => stopTyping(true));
}

// A character as the untypable list shows it: invisible ones (controls, odd spaces) as U+XXXX.
function shownChar(ch) {
    if (/^[\p{C}\p{Z}]$/u.test(ch)) {
        return "U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    }
    return ch;
}

function clearPending() {
    pendingPlan = null;
    $("type-untypable").hidden = true;
    $("type-anyway").hidden = true;
}

function showProgress(key) {
    const { plan, next } = typing;
    const progress = $("type-progress");
    progress.max = Math.max(plan.strokes.length, 1);
    progress.value = next;
    $("type-result").textContent = t(key, { done: next, total: plan.strokes.length });
}

function startTyping(plan) {
    if (!rfb || !connected || viewOnly) {
        return;
    }
    if (plan.strokes.length === 0) {
        $("type-result").textContent = t("type.nothing");
        return;
    }
    typing = { plan, next: 0, korean: typeOptions().korean, timer: null, paused: false, credit: 0 };
    $("type-send").disabled = true;
    $("type-pause").textContent = t("type.pause");
    $("type-progress-row").hidden = false;
    showProgress("type.progress");
    typing.timer = setTimeout(typeTick, 0);
}

// Sends what the chosen speed allows since the last tick, whole strokes only.
function typeTick() {
    const job = typing;
    if (!job || job.paused) {
        return;
    }
    const rate = Number($("type-rate").value) || 100;
    job.credit = Math.min(job.credit + rate * TYPE_TICK_MS / 1000, Math.max(rate, 1));
    if (socket && socket.bufferedAmount > TYPE_MAX_BUFFERED) {
        job.credit = Math.min(job.credit, 1); // the network is behind: wait for it
    } else {
        while (job.credit >= 1 && job.next < job.plan.strokes.length) {
            if (!sendEvents(job.plan.strokes[job.next])) {
                stopTyping(false);
                return;
            }
            job.next++;
            job.credit -= 1;
        }
    }
    if (job.next >= job.plan.strokes.length) {
        typing = null;
        $("type-progress-row").hidden = true;
        $("type-send").disabled = !connected;
        $("type-result").textContent = t("type.sent", { count: job.plan.typed });
        return;
    }
    showProgress("type.progress");
    job.timer = setTimeout(typeTick, TYPE_TICK_MS);
}

// Stops typing between strokes (no key is left held); with `report`, on the user's request, the
// guest IME is switched back to the mode it was in when typing started.
function stopTyping(report) {
    const job = typing;
    if (!job) {
        return;
    }
    clearTimeout(job.timer);
    typing = null;
    const modes = job.plan.modes;
    if (report && job.next > 0 && modes[job.next - 1] !== job.korean) {
        sendEvents(tap(LANG1));
    }
    $("type-progress-row").hidden = true;
    $("type-send").disabled = !connected;
    if (report) {
        $("type-result").textContent = t("type.cancelled", { done: job.next, total: job.plan.strokes.length });
    }
}

// --- on-screen keyboard (touch devices) -----------------------------------------------------------

// A hidden text input: focusing it brings up the device's keyboard; what is typed into it is sent
// to the console at once (with the Type text dialog's layout), then the input is emptied. Keys
// that put no text into an input (Enter, Backspace) are sent from keydown.
const OSK_KEYS = {
    Enter: [XK.Return, "Enter"],
    Backspace: [0xff08, "Backspace"],
    Tab: [XK.Tab, "Tab"],
    Escape: [0xff1b, "Escape"],
    ArrowLeft: [0xff51, "ArrowLeft"],
    ArrowUp: [0xff52, "ArrowUp"],
    ArrowRight: [0xff53, "ArrowRight"],
    ArrowDown: [0xff54, "ArrowDown"],
};

function setupOnScreenKeyboard() {
    const input = $("osk-input");
    const button = $("osk");
    let composing = false;
    const flush = () => {
        const text = input.value;
        input.value = "";
        if (text) {
            const plan = planTyping(text, typeOptions());
            for (const stroke of plan.strokes) {
                sendEvents(stroke);
            }
        }
    };
    button.addEventListener("click", () => {
        if (document.activeElement === input) {
            input.blur();
            return;
        }
        input.focus({ preventScroll: true });
    });
    input.addEventListener("focus", () => button.setAttribute("aria-pressed", "true"));
    input.addEventListener("blur", () => button.setAttribute("aria-pressed", "false"));
    input.addEventListener("compositionstart", () => { composing = true; });
    input.addEventListener("compositionend", () => {
        composing = false;
        flush();
    });
    input.addEventListener("input", () => {
        if (!composing) {
            flush();
        }
    });
    input.addEventListener("keydown", (e) => {
        const key = OSK_KEYS[e.key];
        if (key && !composing) {
            e.preventDefault();
            sendEvents(tap(key));
        }
    });
}

// --- display, panels, full screen ---------------------------------------------------------------

function applyDisplayMode() {
    const mode = displayMode.value;
    document.body.classList.toggle("native", mode === "native");
    if (!rfb) {
        return;
    }
    rfb.scaleViewport = mode === "fit";
    rfb.clipViewport = false;
    rfb.resizeSession = mode === "remote";
}

// Remote resize needs the server's ExtendedDesktopSize support (noVNC learns it from the
// first framebuffer update); the option is enabled once noVNC knows.
function updateRemoteResizeOption() {
    const opt = displayMode.querySelector('option[value="remote"]');
    // eslint-disable-next-line no-underscore-dangle
    const supported = !!(rfb && rfb._supportsSetDesktopSize) && !viewOnly;
    opt.disabled = !supported;
    if (!supported && displayMode.value === "remote") {
        displayMode.value = "fit";
        applyDisplayMode();
    }
}

function setupPanels() {
    const toggles = document.querySelectorAll(".panel-toggle");
    for (const btn of toggles) {
        btn.addEventListener("click", () => {
            const panel = $(btn.getAttribute("aria-controls"));
            const open = panel.hidden;
            for (const other of toggles) {
                $(other.getAttribute("aria-controls")).hidden = true;
                other.setAttribute("aria-expanded", "false");
            }
            panel.hidden = !open;
            btn.setAttribute("aria-expanded", open ? "true" : "false");
        });
    }
    displayMode.addEventListener("change", () => {
        applyDisplayMode();
        refocus();
    });
    displayMode.addEventListener("focus", updateRemoteResizeOption);
    displayMode.addEventListener("pointerdown", updateRemoteResizeOption);
    updateRemoteResizeOption();

    const fs = $("fullscreen");
    if (!document.fullscreenEnabled) {
        fs.hidden = true;
    }
    fs.addEventListener("click", () => {
        if (document.fullscreenElement) {
            document.exitFullscreen().catch(() => {});
        } else {
            document.documentElement.requestFullscreen().catch(() => {});
        }
        refocus();
    });
    document.addEventListener("fullscreenchange", () => {
        fs.setAttribute("aria-pressed", document.fullscreenElement ? "true" : "false");
    });
}

// --- start ---------------------------------------------------------------------------------------

function main() {
    translatePage();
    setTitle(vmNameParam);
    if (viewOnly) {
        document.body.classList.add("view-only");
        $("help-viewonly").hidden = false;
    }
    setupKeys();
    setupKoreanKeys();
    setupTypeDialog();
    setupOnScreenKeyboard();
    setupPanels();
    $("connect").addEventListener("click", () => connect());
    setStatus("loading", "status.loading"); // input buttons off until connected, as in every state
    novnc.then(
        (m) => {
            RFB = m.default;
            if (falsy(params.get("autoconnect"))) {
                $("connect").hidden = false;
                setStatus("ready", "status.ready");
            } else {
                connect();
            }
        },
        // The viewer's code did not load (a proxy restarted mid-load, a network error): say so,
        // rather than "Loading…" for ever.
        (e) => setStatus("error", "status.noviewer", null, e.message),
    );
}

main();
