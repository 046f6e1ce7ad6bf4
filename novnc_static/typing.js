// Text -> key strokes for "Type text": per guest keyboard layout, and Korean on a 2-set (dubeolsik)
// keyboard. Pure code (no DOM, no noVNC): tests/js/typing.test.mjs runs it in node.
//
// A stroke is the list of [keysym, code, down] events of one key, modifiers included, so a paced
// sender can pause or stop between strokes without leaving Shift or AltGr held. `code` is the DOM
// KeyboardEvent.code of the physical key; noVNC turns it into the key's scan code and sends a QEMU
// extended key event (RFB QEMU client message 255, subtype 0), which QEMU types as that physical key
// whatever the keysym. The keysym is the character's (for servers that only read keysyms).
//
// Layouts (the guest's keyboard layout, chosen in the dialog): us, ko, de, fr, ja, uk.
// - Each layout maps a character to a key and its modifiers: Shift (ShiftLeft) and AltGr
//   (AltRight, keysym ISO_Level3_Shift). Capital letters assume Caps Lock is off.
// - Dead keys (de ^ ´ `, fr ^ ¨ and AltGr ~ ` as on Windows) are typed as the key and then Space,
//   which gives the accent itself. Where a layout has a non-dead key for the character, that wins.
// - A character a layout cannot type is returned in `untypable` (the page lists them before
//   sending) and skipped.
// Korean (layout "ko" only; a Korean keyboard has US key positions):
// - Hangul syllables U+AC00..U+D7A3 are split into initial, medial and final jamo; each jamo is
//   typed on its dubeolsik key at the US position (ㅂㅈㄷㄱㅅ on q w e r t, ...). Compound vowels
//   (ㅘ = ㅗ ㅏ) and final clusters (ㄺ = ㄹ ㄱ) are typed as their two keys; ㄲ ㄸ ㅃ ㅆ ㅉ ㅒ ㅖ
//   with Shift. The guest's IME composes the syllables again.
// - Compatibility jamo (U+3131..U+318E as far as dubeolsik has them) are typed the same way. Next to
//   other Hangul they would merge into a syllable in the IME, so the composition is committed
//   first with two 한/영 (Lang1) presses.
// - The guest IME's mode (English or Korean, chosen in the dialog) is followed: 한/영 (Lang1,
//   press and release) before Hangul when the IME is in English, and before a Latin letter when
//   it is in Korean (digits, punctuation, space and Enter type the same in both). At the end the
//   IME is toggled back to the mode it started in.

export const LAYOUTS = ["us", "ko", "de", "fr", "ja", "uk"];

export const XK = {
    Shift_L: 0xffe1,
    ISO_Level3_Shift: 0xfe03, // AltGr
    Hangul: 0xff31, // 한/영
    Hangul_Hanja: 0xff34, // 한자
    Return: 0xff0d,
    Tab: 0xff09,
};

// The Korean keys as QEMU extended key events: DOM codes Lang1/Lang2 (QEMU key codes 0x72/0x71).
export const LANG1 = [XK.Hangul, "Lang1"];
export const LANG2 = [XK.Hangul_Hanja, "Lang2"];

// One press and release of a key (the 한/영 and 한자 buttons send these).
export function tap([keysym, code]) {
    return [[keysym, code, true], [keysym, code, false]];
}

// --- layouts -------------------------------------------------------------------------------------

// Per key: [plain, Shift, AltGr, Shift+AltGr]; "" = nothing. A trailing "*" marks a dead key.
const QWERTY = "qwertyuiopasdfghjklzxcvbnm";

function letters(swaps = {}) {
    const keys = {};
    for (const ch of QWERTY) {
        keys["Key" + ch.toUpperCase()] = [ch, ch.toUpperCase()];
    }
    for (const [code, ch] of Object.entries(swaps)) {
        keys[code] = [ch, ch.toUpperCase()];
    }
    return keys;
}

const US_PUNCT = {
    Backquote: ["`", "~"], Digit1: ["1", "!"], Digit2: ["2", "@"], Digit3: ["3", "#"],
    Digit4: ["4", "$"], Digit5: ["5", "%"], Digit6: ["6", "^"], Digit7: ["7", "&"],
    Digit8: ["8", "*"], Digit9: ["9", "("], Digit0: ["0", ")"], Minus: ["-", "_"], Equal: ["=", "+"],
    BracketLeft: ["[", "{"], BracketRight: ["]", "}"], Backslash: ["\\", "|"],
    Semicolon: [";", ":"], Quote: ["'", "\""], Comma: [",", "<"], Period: [".", ">"],
    Slash: ["/", "?"], Space: [" ", " "],
};

const US = { ...letters(), ...US_PUNCT };

const TABLES = {
    us: US,
    ko: US,
    uk: {
        ...US,
        Backquote: ["`", "¬", "¦"], Digit2: ["2", "\""], Digit3: ["3", "£"], Digit4: ["4", "$", "€"],
        Quote: ["'", "@"], Backslash: ["#", "~"], IntlBackslash: ["\\", "|"],
    },
    de: {
        ...letters({ KeyY: "z", KeyZ: "y" }),
        KeyQ: ["q", "Q", "@"], KeyE: ["e", "E", "€"], KeyM: ["m", "M", "µ"],
        Backquote: ["^*", "°"], Digit1: ["1", "!"], Digit2: ["2", "\"", "²"], Digit3: ["3", "§", "³"],
        Digit4: ["4", "$"], Digit5: ["5", "%"], Digit6: ["6", "&"], Digit7: ["7", "/", "{"],
        Digit8: ["8", "(", "["], Digit9: ["9", ")", "]"], Digit0: ["0", "=", "}"],
        Minus: ["ß", "?", "\\"], Equal: ["´*", "`*"],
        BracketLeft: ["ü", "Ü"], BracketRight: ["+", "*", "~"],
        Semicolon: ["ö", "Ö"], Quote: ["ä", "Ä"], Backslash: ["#", "'"],
        IntlBackslash: ["<", ">", "|"], Comma: [",", ";"], Period: [".", ":"], Slash: ["-", "_"],
        Space: [" ", " "],
    },
    fr: {
        ...letters({ KeyQ: "a", KeyA: "q", KeyW: "z", KeyZ: "w" }),
        KeyE: ["e", "E", "€"],
        Backquote: ["²"], Digit1: ["&", "1"], Digit2: ["é", "2", "~*"], Digit3: ["\"", "3", "#"],
        Digit4: ["'", "4", "{"], Digit5: ["(", "5", "["], Digit6: ["-", "6", "|"],
        Digit7: ["è", "7", "`*"], Digit8: ["_", "8", "\\"], Digit9: ["ç", "9", "^"],
        Digit0: ["à", "0", "@"], Minus: [")", "°", "]"], Equal: ["=", "+", "}"],
        BracketLeft: ["^*", "¨*"], BracketRight: ["$", "£", "¤"],
        Semicolon: ["m", "M"], Quote: ["ù", "%"], Backslash: ["*", "µ"],
        IntlBackslash: ["<", ">"], KeyM: [",", "?"], Comma: [";", "."], Period: [":", "/"],
        Slash: ["!", "§"], Space: [" ", " "],
    },
    ja: {
        ...letters(),
        Digit1: ["1", "!"], Digit2: ["2", "\""], Digit3: ["3", "#"], Digit4: ["4", "$"],
        Digit5: ["5", "%"], Digit6: ["6", "&"], Digit7: ["7", "'"], Digit8: ["8", "("],
        Digit9: ["9", ")"], Digit0: ["0"], Minus: ["-", "="], Equal: ["^", "~"],
        IntlYen: ["\\", "|"], BracketLeft: ["@", "`"], BracketRight: ["[", "{"],
        Semicolon: [";", "+"], Quote: [":", "*"], Backslash: ["]", "}"],
        Comma: [",", "<"], Period: [".", ">"], Slash: ["/", "?"], IntlRo: ["\\", "_"],
        Space: [" ", " "],
    },
};

// layout -> Map(char -> {code, shift, altgr, dead})
const KEYMAPS = new Map();

function keymap(layout) {
    let map = KEYMAPS.get(layout);
    if (map) {
        return map;
    }
    const table = TABLES[layout];
    if (!table) {
        throw new Error(`unknown keyboard layout ${layout}`);
    }
    map = new Map();
    for (const [code, levels] of Object.entries(table)) {
        levels.forEach((entry, level) => {
            if (!entry) {
                return;
            }
            const dead = entry.length > 1 && entry.endsWith("*");
            const ch = dead ? entry.slice(0, -1) : entry;
            const prev = map.get(ch);
            if (prev && !(prev.dead && !dead)) {
                return; // the first key wins, unless it is dead and this one is not
            }
            map.set(ch, { code, shift: level % 2 === 1, altgr: level >= 2, dead });
        });
    }
    map.set("\n", { code: "Enter", shift: false, altgr: false, dead: false, keysym: XK.Return });
    map.set("\t", { code: "Tab", shift: false, altgr: false, dead: false, keysym: XK.Tab });
    KEYMAPS.set(layout, map);
    return map;
}

function keysymOf(ch) {
    const cp = ch.codePointAt(0);
    return cp <= 0xff ? cp : (0x01000000 | cp) >>> 0; // Latin-1, else the X11 Unicode keysym
}

// The stroke of one key with its modifiers.
function stroke(keysym, code, shift, altgr) {
    const ev = [];
    if (shift) {
        ev.push([XK.Shift_L, "ShiftLeft", true]);
    }
    if (altgr) {
        ev.push([XK.ISO_Level3_Shift, "AltRight", true]);
    }
    ev.push([keysym, code, true], [keysym, code, false]);
    if (altgr) {
        ev.push([XK.ISO_Level3_Shift, "AltRight", false]);
    }
    if (shift) {
        ev.push([XK.Shift_L, "ShiftLeft", false]);
    }
    return ev;
}

// The strokes that type `ch` on `layout`, or null when it has no key for it.
export function strokesForChar(layout, ch) {
    const k = keymap(layout).get(ch);
    if (!k) {
        return null;
    }
    const keysym = k.keysym ?? keysymOf(ch);
    const out = [stroke(keysym, k.code, k.shift, k.altgr)];
    if (k.dead) {
        out.push(stroke(0x20, "Space", false, false));
    }
    return out;
}

// --- Hangul on dubeolsik ---------------------------------------------------------------------

// Jamo -> the US key(s) of dubeolsik: lower case plain, upper case with Shift.
const JAMO_KEYS = {
    "ㄱ": "r", "ㄲ": "R", "ㄴ": "s", "ㄷ": "e", "ㄸ": "E", "ㄹ": "f", "ㅁ": "a", "ㅂ": "q", "ㅃ": "Q",
    "ㅅ": "t", "ㅆ": "T", "ㅇ": "d", "ㅈ": "w", "ㅉ": "W", "ㅊ": "c", "ㅋ": "z", "ㅌ": "x", "ㅍ": "v",
    "ㅎ": "g",
    "ㅏ": "k", "ㅐ": "o", "ㅑ": "i", "ㅒ": "O", "ㅓ": "j", "ㅔ": "p", "ㅕ": "u", "ㅖ": "P", "ㅗ": "h",
    "ㅛ": "y", "ㅜ": "n", "ㅠ": "b", "ㅡ": "m", "ㅣ": "l",
    // compound vowels: two keys
    "ㅘ": "hk", "ㅙ": "ho", "ㅚ": "hl", "ㅝ": "nj", "ㅞ": "np", "ㅟ": "nl", "ㅢ": "ml",
    // final consonant clusters: two keys
    "ㄳ": "rt", "ㄵ": "sw", "ㄶ": "sg", "ㄺ": "fr", "ㄻ": "fa", "ㄼ": "fq", "ㄽ": "ft", "ㄾ": "fx",
    "ㄿ": "fv", "ㅀ": "fg", "ㅄ": "qt",
};

const INITIALS = "ㄱㄲㄴㄷㄸㄹㅁㅂㅃㅅㅆㅇㅈㅉㅊㅋㅌㅍㅎ";
const MEDIALS = "ㅏㅐㅑㅒㅓㅔㅕㅖㅗㅘㅙㅚㅛㅜㅝㅞㅟㅠㅡㅢㅣ";
const FINALS = ["", ..."ㄱㄲㄳㄴㄵㄶㄷㄹㄺㄻㄼㄽㄾㄿㅀㅁㅂㅄㅅㅆㅇㅈㅊㅋㅌㅍㅎ"];

export function isSyllable(ch) {
    const cp = ch.codePointAt(0);
    return cp >= 0xac00 && cp <= 0xd7a3;
}

export function isJamo(ch) {
    return Object.hasOwn(JAMO_KEYS, ch);
}

// A syllable or compatibility jamo -> its dubeolsik keys as US characters ("닭" -> "ekfr"); null
// for anything else.
export function hangulKeys(ch) {
    if (isJamo(ch)) {
        return JAMO_KEYS[ch];
    }
    if (!isSyllable(ch)) {
        return null;
    }
    const s = ch.codePointAt(0) - 0xac00;
    const initial = INITIALS[Math.floor(s / 588)];
    const medial = MEDIALS[Math.floor((s % 588) / 28)];
    const final = FINALS[s % 28];
    return JAMO_KEYS[initial] + JAMO_KEYS[medial] + (final ? JAMO_KEYS[final] : "");
}

function hangulStrokes(ch) {
    const out = [];
    for (const key of hangulKeys(ch)) {
        const lower = key.toLowerCase();
        out.push(stroke(key.codePointAt(0), "Key" + lower.toUpperCase(), key !== lower, false));
    }
    return out;
}

function isLatinLetter(ch) {
    return /^[A-Za-z]$/.test(ch);
}

// --- the plan --------------------------------------------------------------------------------------

// Text -> {strokes, modes, untypable, typed}:
//   strokes    list of strokes (each a list of [keysym, code, down])
//   modes      per stroke, whether the guest IME is in Korean mode after it (for a clean stop)
//   untypable  the distinct characters the layout cannot type, in order of appearance (skipped)
//   typed      how many characters the strokes type
// options: layout (default "us"); korean: whether the guest IME starts in Korean mode (layout ko).
export function planTyping(text, { layout = "us", korean = false } = {}) {
    keymap(layout); // unknown layout: throws here
    const strokes = [];
    const modes = [];
    const untypable = [];
    let typed = 0;
    let mode = korean;
    let prevHangul = false; // the previous typed character was Hangul (still composing)
    let prevJamo = false;
    const push = (list) => {
        for (const s of list) {
            strokes.push(s);
            modes.push(mode);
        }
    };
    const toggle = () => {
        mode = !mode;
        push([tap(LANG1)]);
    };
    const korean_ = layout === "ko";
    for (const ch of text.replace(/\r\n?/g, "\n")) { // code points; "\r\n" is one Enter
        if (korean_ && hangulKeys(ch) !== null) {
            const jamo = isJamo(ch);
            if (!mode) {
                toggle();
            } else if (prevHangul && (jamo || prevJamo)) {
                toggle(); // commit the composition: a standalone jamo would merge
                toggle();
            }
            push(hangulStrokes(ch));
            typed++;
            prevHangul = true;
            prevJamo = jamo;
            continue;
        }
        const keys = strokesForChar(layout, ch);
        if (keys === null) {
            if (!untypable.includes(ch)) {
                untypable.push(ch);
            }
            continue;
        }
        if (korean_ && mode && isLatinLetter(ch)) {
            toggle();
        }
        push(keys);
        typed++;
        prevHangul = false;
        prevJamo = false;
    }
    if (mode !== korean) {
        toggle(); // leave the guest IME as it was
    }
    return { strokes, modes, untypable, typed };
}

// All events of a plan, in order (tests, short texts).
export function planEvents(plan) {
    return plan.strokes.flat();
}
