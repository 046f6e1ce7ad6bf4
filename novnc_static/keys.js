// Text -> key events for "Type text" (and the fixed key combinations of the toolbar).
//
// The mapping (tested in tests/test_page.py against the demo VNC server's record):
// - Printable ASCII is typed as on a US keyboard. Each character is sent with its own X11 keysym
//   (for ASCII the keysym is the character code) and the DOM `code` of the US key that produces
//   it, so noVNC can send a QEMU extended key event with that key's scan code. Characters that
//   need Shift on a US keyboard (A-Z and ~!@#$%^&*()_+{}|:"<>?) are wrapped in Shift_L down/up,
//   and the keysym sent is the shifted one ("!" is 0x21, not "1"), as an X11 keyboard does; a
//   scan-code server (QEMU) sees Shift + the key, a keysym server sees the shifted keysym.
// - "\n" (or "\r\n", or "\r") is Return (0xff0d, key Enter), "\t" is Tab (0xff09).
// - Latin-1 characters outside ASCII (U+00A0..U+00FF) use the keysym equal to the code point;
//   every other character (for example Korean) uses the X11 Unicode keysym 0x01000000 | code
//   point. Both are sent without a key code, so noVNC sends a plain RFB KeyEvent (the server
//   must map the keysym; guests with a US layout may not type them). The page says so.
// - Other control characters are skipped.

export const XK = {
    Shift_L: 0xffe1,
    Control_L: 0xffe3,
    Alt_L: 0xffe9,
    Super_L: 0xffeb,
    Return: 0xff0d,
    Tab: 0xff09,
    Delete: 0xffff,
    F1: 0xffbe, // F1..F12 are consecutive
};

const UNSHIFTED = {
    "`": "Backquote", "-": "Minus", "=": "Equal", "[": "BracketLeft", "]": "BracketRight",
    "\\": "Backslash", ";": "Semicolon", "'": "Quote", ",": "Comma", ".": "Period", "/": "Slash",
    " ": "Space",
};

const SHIFTED = {
    "~": "Backquote", "!": "Digit1", "@": "Digit2", "#": "Digit3", "$": "Digit4", "%": "Digit5",
    "^": "Digit6", "&": "Digit7", "*": "Digit8", "(": "Digit9", ")": "Digit0", "_": "Minus",
    "+": "Equal", "{": "BracketLeft", "}": "BracketRight", "|": "Backslash", ":": "Semicolon",
    "\"": "Quote", "<": "Comma", ">": "Period", "?": "Slash",
};

// One character -> {keysym, code, shift} or null (skipped).
export function keyForChar(ch) {
    const cp = ch.codePointAt(0);
    if (ch === "\n" || ch === "\r") {
        return { keysym: XK.Return, code: "Enter", shift: false };
    }
    if (ch === "\t") {
        return { keysym: XK.Tab, code: "Tab", shift: false };
    }
    if (cp >= 0x61 && cp <= 0x7a) { // a-z
        return { keysym: cp, code: "Key" + ch.toUpperCase(), shift: false };
    }
    if (cp >= 0x41 && cp <= 0x5a) { // A-Z
        return { keysym: cp, code: "Key" + ch, shift: true };
    }
    if (cp >= 0x30 && cp <= 0x39) { // 0-9
        return { keysym: cp, code: "Digit" + ch, shift: false };
    }
    if (ch in UNSHIFTED) {
        return { keysym: cp, code: UNSHIFTED[ch], shift: false };
    }
    if (ch in SHIFTED) {
        return { keysym: cp, code: SHIFTED[ch], shift: true };
    }
    if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0)) {
        return null; // other control characters
    }
    if (cp <= 0xff) {
        return { keysym: cp, code: null, shift: false }; // Latin-1: keysym == code point
    }
    return { keysym: (0x01000000 | cp) >>> 0, code: null, shift: false }; // X11 Unicode keysym
}

// Text -> list of [keysym, code, down]; "\r\n" counts as one Return.
export function keyEventsForText(text) {
    const events = [];
    const normalized = text.replace(/\r\n/g, "\n");
    for (const ch of normalized) { // iterates code points (surrogate pairs stay whole)
        const k = keyForChar(ch);
        if (k === null) {
            continue;
        }
        if (k.shift) {
            events.push([XK.Shift_L, "ShiftLeft", true]);
        }
        events.push([k.keysym, k.code, true]);
        events.push([k.keysym, k.code, false]);
        if (k.shift) {
            events.push([XK.Shift_L, "ShiftLeft", false]);
        }
    }
    return events;
}

// Ctrl+Alt+F<n> as key events.
export function ctrlAltF(n) {
    const f = XK.F1 + (n - 1);
    return [
        [XK.Control_L, "ControlLeft", true],
        [XK.Alt_L, "AltLeft", true],
        [f, "F" + n, true],
        [f, "F" + n, false],
        [XK.Alt_L, "AltLeft", false],
        [XK.Control_L, "ControlLeft", false],
    ];
}

// Count of characters that keyEventsForText types (for the "typed N characters" note).
export function typedCount(text) {
    let n = 0;
    for (const ch of text.replace(/\r\n/g, "\n")) {
        if (keyForChar(ch) !== null) {
            n++;
        }
    }
    return n;
}
