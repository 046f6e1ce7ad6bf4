// The recording player (player.html): parses a recording (consoleproxy/recording_format.py) and
// plays its server-to-browser bytes into a view-only noVNC, at 1x/2x/4x/8x, with a timeline.
//
// noVNC talks to a channel object instead of a WebSocket: the channel plays the VNC server's
// side of the RFB handshake (version 3.8, security None, then a ServerInit) and then hands noVNC
// the recorded bytes as their time comes. What noVNC sends is dropped.
//
// Seeking: a recording whose header says ``seekable`` was made with encodings that carry no
// state from update to update, and its KEYFRAME records say where in the bytes down a full
// update starts (and the screen size then). Seeking starts a fresh noVNC at the last such
// keyframe before the target, with a ServerInit of that size, and fast-forwards from there
// (decoding is fast, no waiting); seeking forward within what is shown just feeds forward.
// Without keyframes (an older or non-seekable recording, with Tight or ZRLE state running from
// the start) the player decodes from the start. ``fed`` counts the bytes given to noVNC since it
// was started, ``startOffset`` where in the bytes down it was started (tests read both).

import { pickLanguage, translator } from "./i18n.js";

// noVNC's core is imported, not statically: its browser checks end in a top-level await (an H.264
// decoder probe), which would hold this whole module, the page's language and its Load button
// included, until after the page's load event. Fetched at once, awaited only to play.
const novnc = import("/recordings-novnc/core/rfb.js");
let RFB = null;

const $ = (id) => document.getElementById(id);
const MAGIC = "CPREC01\n";
const KIND = { DOWN: 1, KEY: 2, KEY_REDACTED: 3, POINTER: 4, CLIPBOARD: 5, CLIPBOARD_REDACTED: 6, KEYFRAME: 7 };
const FEED_PIECE = 1 << 20; // bytes per message to noVNC (its receive queue grows to fit)

class RecordingError extends Error {}

// The page's language, as the console page picks it: ?language=ko|en, else the browser's.
const params = new URLSearchParams(location.search);
const lang = pickLanguage(params.get("language") || "",
                          navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language]);
const tr = translator(lang);
const t = (key, vars) => tr(`player.${key}`, vars);

function translatePage() {
    document.documentElement.lang = lang;
    for (const el of document.querySelectorAll("[data-i18n]")) {
        el.textContent = t(el.dataset.i18n);
    }
    for (const el of document.querySelectorAll("[data-i18n-aria]")) {
        el.setAttribute("aria-label", t(el.dataset.i18nAria));
    }
}
translatePage();

// --- the format ------------------------------------------------------------------------------

let crcTable = null;
function crc32(bytes) {
    if (!crcTable) {
        crcTable = new Uint32Array(256);
        for (let n = 0; n < 256; n++) {
            let c = n;
            for (let k = 0; k < 8; k++) {
                c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1;
            }
            crcTable[n] = c >>> 0;
        }
    }
    let crc = 0xFFFFFFFF;
    for (let i = 0; i < bytes.length; i++) {
        crc = crcTable[(crc ^ bytes[i]) & 0xFF] ^ (crc >>> 8);
    }
    return (crc ^ 0xFFFFFFFF) >>> 0;
}

export function parseRecording(buffer) {
    const bytes = new Uint8Array(buffer);
    const view = new DataView(buffer);
    const total = bytes.length;
    if (total < MAGIC.length + 4) {
        throw new RecordingError(`truncated: ${total} bytes, shorter than the file header`);
    }
    if (new TextDecoder("latin1").decode(bytes.subarray(0, MAGIC.length)) !== MAGIC) {
        throw new RecordingError("not a consoleproxy recording (bad magic at offset 0)");
    }
    const headerLength = view.getUint32(MAGIC.length);
    let offset = MAGIC.length + 4;
    if (offset + headerLength > total) {
        throw new RecordingError("truncated in the header");
    }
    let header;
    try {
        header = JSON.parse(new TextDecoder().decode(bytes.subarray(offset, offset + headerLength)));
    } catch (e) {
        throw new RecordingError(`the header at offset ${offset} is not JSON`);
    }
    offset += headerLength;
    const downs = [];
    const events = [];
    const seekPoints = [];
    let downBytes = 0;
    let trailer = null;
    let lastMs = 0;
    while (offset < total) {
        if (total - offset < 13) {
            throw new RecordingError(`truncated at offset ${offset}: shorter than a block header`);
        }
        const tag = String.fromCharCode(bytes[offset]);
        const length = view.getUint32(offset + 1);
        const crc = view.getUint32(offset + 5);
        const ms = view.getUint32(offset + 9);
        const start = offset + 13;
        if (tag !== "C" && tag !== "E") {
            throw new RecordingError(`bad block tag at offset ${offset}`);
        }
        if (start + length > total) {
            throw new RecordingError(`truncated at offset ${offset}: the block needs ${length} bytes, ${total - start} remain`);
        }
        const payload = bytes.subarray(start, start + length);
        if (crc32(payload.subarray(0, 4096)) !== crc) { // the first 4 KiB (recording_format.py)
            throw new RecordingError(`checksum mismatch in the block at offset ${offset}`);
        }
        if (tag === "E") {
            trailer = JSON.parse(new TextDecoder().decode(payload));
            trailer.end_ms = Math.max(ms, lastMs);
            if (start + length !== total) {
                throw new RecordingError(`bytes after the end block at offset ${offset}`);
            }
            break;
        }
        let i = start;
        const stop = start + length;
        while (i < stop) {
            if (stop - i < 9) {
                throw new RecordingError(`a record at offset ${i} is cut short`);
            }
            const kind = bytes[i];
            const rms = view.getUint32(i + 1);
            const rlen = view.getUint32(i + 5);
            i += 9;
            if (i + rlen > stop) {
                throw new RecordingError(`record at offset ${i - 9} overruns its chunk`);
            }
            const data = bytes.subarray(i, i + rlen);
            i += rlen;
            lastMs = Math.max(lastMs, rms);
            if (kind === KIND.DOWN) {
                downs.push({ ms: rms, data, at: downBytes });
                downBytes += data.length;
            } else if (kind >= KIND.KEY && kind <= KIND.KEYFRAME) {
                events.push(describe(kind, rms, data));
                if (kind === KIND.KEYFRAME && data.length === 28) {
                    const kv = new DataView(data.buffer, data.byteOffset, 28);
                    seekPoints.push({
                        ms: rms,
                        offset: kv.getUint32(0) * 2 ** 32 + kv.getUint32(4),
                        width: kv.getUint16(8),
                        height: kv.getUint16(10),
                        pixelFormat: data.slice(12, 28),
                    });
                }
            } else {
                throw new RecordingError(`unknown record kind ${kind} at offset ${i - 9 - rlen}`);
            }
        }
        offset = stop;
    }
    if (!trailer) {
        throw new RecordingError("truncated: no end block (the recording was cut off)");
    }
    const serverInit = downs.length && downs[0].data.length >= 24 ? downs[0].data : null;
    return {
        header, downs, events, endMs: trailer.end_ms, complete: trailer.complete, reason: trailer.incomplete_reason,
        // Seek points only where decoding can start there (see the top of this file).
        seekPoints: header.seekable === true && serverInit ? seekPoints.filter((k) => k.offset < downBytes) : [],
        serverInit,
    };
}

function describe(kind, ms, data) {
    const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
    const dir = (down) => t(down ? "ev.down" : "ev.up");
    switch (kind) {
    case KIND.KEY: {
        const sym = v.getUint32(1);
        const ch = sym >= 0x20 && sym < 0x7F ? ` '${String.fromCharCode(sym)}'` : "";
        return { ms, kind: "key", text: t("ev.key", { dir: dir(data[0]), sym: `0x${sym.toString(16)}${ch}` }) };
    }
    case KIND.KEY_REDACTED:
        return { ms, kind: "key", text: t("ev.key.redacted", { dir: dir(data[0]) }) };
    case KIND.POINTER:
        return { ms, kind: "pointer", text: t("ev.pointer", { x: v.getUint16(1), y: v.getUint16(3), mask: data[0] }) };
    case KIND.CLIPBOARD:
        return { ms, kind: "clipboard", text: t("ev.clipboard", { n: data.length, text: new TextDecoder("latin1").decode(data).slice(0, 40) }) };
    case KIND.CLIPBOARD_REDACTED:
        return { ms, kind: "clipboard", text: t("ev.clipboard.redacted", { n: v.getUint32(0) }) };
    default:
        return { ms, kind: "keyframe", text: t("ev.keyframe") };
    }
}

// --- the channel noVNC reads from --------------------------------------------------------------

class PlaybackChannel {
    constructor(serverInitReady) {
        this.binaryType = "arraybuffer";
        this.protocol = "binary";
        this.readyState = "open";
        this.onopen = null;
        this.onmessage = null;
        this.onclose = null;
        this.onerror = null;
        this._stage = 0;
        this._ready = serverInitReady;
    }

    send(data) {
        // The server's side of the handshake, one step per message from noVNC; answered in a
        // later task, as a socket would (noVNC is still in its own message handler here).
        if (this._stage === 0) { // noVNC's version
            this._stage = 1;
            setTimeout(() => this.deliver(Uint8Array.of(1, 1)), 0); // one security type: None
        } else if (this._stage === 1) { // its choice
            this._stage = 2;
            setTimeout(() => this.deliver(Uint8Array.of(0, 0, 0, 0)), 0); // SecurityResult: OK
        } else if (this._stage === 2) { // ClientInit
            this._stage = 3;
            setTimeout(this._ready, 0);
        } // after that: noVNC's requests, dropped
    }

    close() {
        if (this.readyState === "closed") {
            return;
        }
        this.readyState = "closed";
        setTimeout(() => this.onclose && this.onclose({ code: 1000, reason: "", wasClean: true }), 0);
    }

    start() {
        this.deliver(new TextEncoder().encode("RFB 003.008\n"));
    }

    deliver(bytes) {
        if (this.readyState !== "open" || !this.onmessage) {
            return;
        }
        for (let i = 0; i < bytes.length; i += FEED_PIECE) {
            const piece = bytes.slice(i, i + FEED_PIECE); // a copy: noVNC keeps its own queue
            this.onmessage({ data: piece.buffer });
        }
    }
}

// --- the player --------------------------------------------------------------------------------

// A ServerInit for a noVNC started at seek point ``k``: its size; the pixel format the browser
// had set (the recorded ServerInit's when none); the recorded desktop name.
function serverInitAt(rec, k) {
    const init = rec.serverInit;
    const out = new Uint8Array(init.length);
    out.set(init);
    const v = new DataView(out.buffer);
    v.setUint16(0, k.width);
    v.setUint16(2, k.height);
    if (k.pixelFormat.some((b) => b !== 0)) {
        out.set(k.pixelFormat, 4);
    }
    return out;
}

// Server-to-client message types a keyframe's offset may start with (RFC 6143 7.6): a
// FramebufferUpdate, or a Bell or ServerCutText that came before it.
const MESSAGE_STARTS = new Set([0, 2, 3]);

class Player {
    constructor(rec) {
        this.rec = rec;
        this.speed = 1;
        this.playing = false;
        this.playhead = 0; // ms of the recording shown
        this.next = 0; // index of the next DOWN record to feed
        this.rfb = null;
        this.channel = null;
        this.fed = 0; // bytes given to this noVNC (the recorded ones, from startOffset)
        this.startOffset = 0; // where in the bytes down this noVNC started
        this.start_ = null; // the seek point it started at (null: the start)
        this._timer = null;
        this._wall = 0;
        this.state = "loading";
    }

    // The last usable seek point at or before ``ms`` (null: start from the beginning).
    _pointBefore(ms) {
        let best = null;
        for (const k of this.rec.seekPoints) {
            if (k.ms > ms) {
                break;
            }
            if (!k.bad && MESSAGE_STARTS.has(this._byteAt(k.offset))) {
                best = k;
            }
        }
        return best;
    }

    // Index of the DOWN record holding byte ``offset`` of the bytes down.
    _downAt(offset) {
        const downs = this.rec.downs;
        let lo = 0;
        let hi = downs.length - 1;
        while (lo < hi) {
            const mid = (lo + hi + 1) >> 1;
            if (downs[mid].at <= offset) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        return lo;
    }

    _byteAt(offset) {
        const d = this.rec.downs[this._downAt(offset)];
        return d.data[offset - d.at];
    }

    // A fresh noVNC (its handshake done) at seek point ``k``, or at time 0 when ``k`` is null;
    // resolves when it is ready for bytes.
    _restart(k = null) {
        const old = this.rfb;
        this.rfb = null;
        if (old) {
            old.disconnect();
        }
        // Each noVNC gets a box of its own: the old one removes its canvas from its box later.
        const box = document.createElement("div");
        $("screen").replaceChildren(box);
        this.next = 0;
        this.playhead = 0;
        this.fed = 0;
        this.startOffset = 0;
        this.start_ = k;
        return new Promise((resolve) => {
            const channel = new PlaybackChannel(() => {
                if (k) {
                    // Past the recorded ServerInit: a fresh one, then the bytes from the keyframe.
                    channel.deliver(serverInitAt(this.rec, k));
                    const i = this._downAt(k.offset);
                    const d = this.rec.downs[i];
                    const rest = d.data.subarray(k.offset - d.at);
                    this.next = i + 1;
                    this.playhead = k.ms;
                    this.startOffset = k.offset;
                    this.fed = rest.length;
                    channel.deliver(rest);
                }
                resolve();
            });
            this.channel = channel;
            const rfb = new RFB(box, channel, { shared: true });
            this.rfb = rfb;
            rfb.viewOnly = true;
            rfb.addEventListener("disconnect", () => {
                if (this.rfb !== rfb) {
                    return;
                }
                if (this.start_) {
                    // Started at a keyframe noVNC could not decode from: never again, and the
                    // same time from an earlier one (or the start).
                    this.start_.bad = true;
                    this.seek(this.playhead, true);
                    return;
                }
                // noVNC gave up on the bytes (damaged screen data): say so, stop, never hang.
                this.playing = false;
                clearTimeout(this._timer);
                this.state = "error";
                fail(t("error.decode", { time: fmtTime(this.playhead) }));
            });
            this.rfb.background = "#1e1e1e";
            setTimeout(() => channel.start(), 0);
        });
    }

    // Feed every DOWN record up to ``ms`` in one go.
    _feedTo(ms) {
        const downs = this.rec.downs;
        let end = this.next;
        let size = 0;
        while (end < downs.length && downs[end].ms <= ms) {
            size += downs[end].data.length;
            end++;
        }
        if (end > this.next) {
            const joined = new Uint8Array(size);
            let at = 0;
            for (let i = this.next; i < end; i++) {
                joined.set(downs[i].data, at);
                at += downs[i].data.length;
            }
            this.next = end;
            this.fed += size;
            this.channel.deliver(joined);
        }
        this.playhead = Math.min(Math.max(ms, this.playhead), this.rec.endMs);
        this._show();
    }

    async start() {
        await this._restart();
        this._feedTo(0);
        this.play();
    }

    play() {
        if (this.playhead >= this.rec.endMs) {
            this._setState("ended");
            return;
        }
        this.playing = true;
        this._wall = performance.now();
        this._setState("playing");
        this._tick();
    }

    pause() {
        this.playing = false;
        clearTimeout(this._timer);
        this._setState(this.playhead >= this.rec.endMs ? "ended" : "paused");
    }

    _tick() {
        if (!this.playing) {
            return;
        }
        const now = performance.now();
        const target = this.playhead + (now - this._wall) * this.speed;
        this._wall = now;
        this._feedTo(target);
        if (this.playhead >= this.rec.endMs) {
            this.playing = false;
            this._setState("ended");
            return;
        }
        this._timer = setTimeout(() => this._tick(), 40);
    }

    async seek(ms, again = false) {
        ms = Math.max(0, Math.min(ms, this.rec.endMs));
        const was = this.playing || (again && this._wasPlaying);
        this._wasPlaying = was;
        this.playing = false;
        clearTimeout(this._timer);
        this._setState("seeking");
        const k = this._pointBefore(ms);
        // Forward within what this noVNC shows, past the keyframe: go on feeding. Else start
        // afresh at the keyframe (or the start) and fast-forward.
        const onward = !again && ms >= this.playhead && (!k || k.ms <= this.playhead);
        if (!onward) {
            await this._restart(k);
        }
        this._feedTo(ms);
        if (was) {
            this.play();
        } else {
            this._setState(ms >= this.rec.endMs ? "ended" : "paused");
        }
    }

    _setState(state) {
        if (this.state === "error") {
            return; // the error stays shown
        }
        this.state = state;
        const status = $("status");
        status.dataset.state = state;
        status.textContent = t(`status.${state}`);
        $("play").textContent = t(state === "playing" ? "btn.pause" : "btn.play");
    }

    _show() {
        const ms = Math.floor(this.playhead);
        $("timeline").value = String(ms);
        $("clock").textContent = `${fmtTime(ms)} / ${fmtTime(this.rec.endMs)}`;
        for (const li of $("track").children) {
            li.classList.toggle("past", Number(li.dataset.ms) <= ms);
        }
    }
}

function fmtTime(ms) {
    const s = Math.floor(ms / 1000);
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function fail(message) {
    const status = $("status");
    status.dataset.state = "error";
    status.textContent = message;
}

async function load(key) {
    const id = decodeURIComponent(location.pathname.split("/").pop());
    const status = $("status");
    status.dataset.state = "loading";
    status.textContent = t("status.loading");
    let resp;
    try {
        resp = await fetch(`/api/recordings/${encodeURIComponent(id)}`, {
            headers: { Authorization: `Bearer ${key}` },
            cache: "no-store",
        });
    } catch (e) {
        fail(t("error.fetch", { reason: e.message }));
        return;
    }
    if (!resp.ok) {
        let message = `HTTP ${resp.status}`;
        try {
            message = (await resp.json()).error || message;
        } catch (e) { /* not JSON */ }
        fail(resp.status === 401 ? t("error.key") : t("error.play", { reason: message }));
        return;
    }
    let rec;
    try {
        rec = parseRecording(await resp.arrayBuffer());
    } catch (e) {
        fail(t(e instanceof RecordingError ? "error.damaged" : "error.play", { reason: e.message }));
        return;
    }
    $("key-form").hidden = true;
    $("controls").hidden = false;
    const h = rec.header;
    $("info").textContent = t("info", {
        id: h.id, vm: h.vm || "?", name: h.name ? ` (${h.name})` : "", client: h.client_ip || "?",
        started: new Date(h.started * 1000).toISOString(), keys: h.keys,
    }) + (rec.complete ? "" : t("info.incomplete", { reason: rec.reason || t("info.cutoff") }));
    document.title = t("title.vm", { vm: h.vm || h.id });
    const track = $("track");
    for (const ev of rec.events) {
        const li = document.createElement("li");
        li.dataset.ms = String(ev.ms);
        li.className = ev.kind;
        li.textContent = `${fmtTime(ev.ms)} ${ev.text}`;
        li.addEventListener("click", () => player.seek(ev.ms));
        track.append(li);
    }
    $("timeline").max = String(rec.endMs);
    try {
        RFB = (await novnc).default;
    } catch (e) {
        fail(t("error.play", { reason: e.message }));
        return;
    }
    const player = new Player(rec);
    window.player = player;
    $("play").addEventListener("click", () => (player.playing ? player.pause() : player.play()));
    $("speed").addEventListener("change", (e) => { player.speed = Number(e.target.value); });
    $("timeline").addEventListener("change", (e) => player.seek(Number(e.target.value)));
    await player.start();
}

$("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    load($("key").value.trim());
});
// Disabled in the HTML until now: a submit before this handler would reload the page without
// its query (and so without ?language=).
$("load").disabled = false;
