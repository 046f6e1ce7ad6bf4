// Unit tests of novnc_static/typing.js (run by tests/test_typing_js.py: node --test).
// Expected key sequences are written out here as key names, expanded by this file's own table,
// not by the module under test.
import assert from "node:assert/strict";
import { test } from "node:test";

import { LAYOUTS, hangulKeys, planEvents, planTyping, strokesForChar } from "../../novnc_static/typing.js";

const SHIFT = [0xffe1, "ShiftLeft"];
const ALTGR = [0xfe03, "AltRight"];
const LANG1 = [0xff31, "Lang1"];

const down = ([sym, code]) => [sym, code, true];
const up = ([sym, code]) => [sym, code, false];
const tap = (k) => [down(k), up(k)];

// "d" -> KeyD with keysym "d"; "R" -> Shift + KeyR with keysym "R"; "Lang1" -> 한/영; "Space".
function us(spec) {
    const out = [];
    for (const item of spec.split(" ")) {
        if (item === "Lang1") {
            out.push(...tap(LANG1));
        } else if (item === "Space") {
            out.push(...tap([0x20, "Space"]));
        } else if (/^[a-z]$/.test(item)) {
            out.push(...tap([item.codePointAt(0), "Key" + item.toUpperCase()]));
        } else if (/^[A-Z]$/.test(item)) {
            out.push(down(SHIFT), ...tap([item.codePointAt(0), "Key" + item]), up(SHIFT));
        } else {
            throw new Error("bad spec item " + item);
        }
    }
    return out;
}

// "Z+KeyY" = Shift + KeyY typing "Z"; "@!KeyQ" = AltGr + KeyQ typing "@"; "e=KeyE" plain.
function keys(...items) {
    const out = [];
    for (const item of items) {
        const m = /^(.+?)([=+!])(\w+)$/u.exec(item);
        const [, ch, mod, code] = m;
        const k = [ch.codePointAt(0), code];
        if (mod === "+") {
            out.push(down(SHIFT), ...tap(k), up(SHIFT));
        } else if (mod === "!") {
            out.push(down(ALTGR), ...tap(k), up(ALTGR));
        } else {
            out.push(...tap(k));
        }
    }
    return out;
}

const events = (text, opts) => planEvents(planTyping(text, opts));

// The word table: dubeolsik keys at US positions.
const WORDS = [
    ["안녕하세요", "d k s s u d g k t p d y"],
    ["닭", "e k f r"], // final cluster ㄺ = ㄹ ㄱ
    ["읽다", "d l f r e k"],
    ["값", "r k q t"], // ㅄ = ㅂ ㅅ
    ["뷁", "q n p f r"], // ㅞ = ㅜ ㅔ, ㄺ = ㄹ ㄱ
    ["왜", "d h o"], // ㅙ = ㅗ ㅐ
    ["의사", "d m l t k"], // ㅢ = ㅡ ㅣ
    ["까떡빠쌀짜얘예", "R k E j r Q k T k f W k d O d P"], // Shift: ㄲ ㄸ ㅃ ㅆ ㅉ ㅒ ㅖ
];

for (const [word, spec] of WORDS) {
    test(`${word}: exact dubeolsik key sequence inside 한/영 toggles`, () => {
        assert.equal([...word].map(hangulKeys).join(""), spec.replaceAll(" ", ""));
        assert.deepEqual(events(word, { layout: "ko", korean: false }), us(`Lang1 ${spec} Lang1`));
        // The guest IME already in Korean mode: no toggles at all.
        assert.deepEqual(events(word, { layout: "ko", korean: true }), us(spec));
    });
}

test("mixed Korean and English switches mode where it changes, and back at the end", () => {
    assert.deepEqual(events("안녕하세요 abc", { layout: "ko" }),
                     us("Lang1 d k s s u d g k t p d y Space Lang1 a b c"));
    assert.deepEqual(events("abc 안녕", { layout: "ko", korean: true }),
                     us("Lang1 a b c Space Lang1 d k s s u d"));
    // Digits and punctuation need no switch: they type the same in both modes.
    const plan = planTyping("값1,000", { layout: "ko" });
    assert.deepEqual(planEvents(plan), [
        ...us("Lang1 r k q t"), ...keys("1=Digit1", ",=Comma", "0=Digit0", "0=Digit0", "0=Digit0"),
        ...us("Lang1"),
    ]);
    assert.equal(plan.typed, 6);
    assert.deepEqual(plan.untypable, []);
});

test("standalone jamo are committed apart from neighbouring Hangul", () => {
    // ㅋㅋ would merge with 하 (or with each other) in the IME: Lang1 twice commits first.
    assert.deepEqual(events("하ㅋㅋ", { layout: "ko" }), us("Lang1 g k Lang1 Lang1 z Lang1 Lang1 z Lang1"));
    assert.deepEqual(events("ㅘ", { layout: "ko" }), us("Lang1 h k Lang1"));
});

test("Hangul has no keys on other layouts: listed, not typed", () => {
    for (const layout of ["us", "de", "fr", "ja", "uk"]) {
        const plan = planTyping("a안녕a", { layout });
        assert.deepEqual(plan.untypable, ["안", "녕"], layout);
        assert.equal(plan.typed, 2);
    }
});

test("Zeyz to a German guest: the keys of a German keyboard (QWERTZ)", () => {
    assert.deepEqual(events("Zeyz", { layout: "de" }),
                     keys("Z+KeyY", "e=KeyE", "y=KeyZ", "z=KeyY"));
    assert.deepEqual(events("Zeyz", { layout: "us" }),
                     keys("Z+KeyZ", "e=KeyE", "y=KeyY", "z=KeyZ"));
});

test("AltGr, Shift and dead keys per layout", () => {
    const cases = [
        ["de", "@", keys("@!KeyQ")],
        ["de", "ß?", keys("ß=Minus", "?+Minus")], ["de", "\\|", keys("\\!Minus", "|!IntlBackslash")],
        ["de", "^", [...keys("^=Backquote"), ...tap([0x20, "Space"])]],
        ["de", "`", [...keys("`+Equal"), ...tap([0x20, "Space"])]],
        ["fr", "aqzw1", keys("a=KeyQ", "q=KeyA", "z=KeyW", "w=KeyZ", "1+Digit1")],
        ["fr", "^", keys("^!Digit9")], // the non-dead AltGr key wins over the dead one
        ["fr", "m,", keys("m=Semicolon", ",=KeyM")],
        ["uk", "@\"£#~\\", keys("@+Quote", "\"+Digit2", "£+Digit3", "#=Backslash", "~+Backslash",
                                 "\\=IntlBackslash")],
        ["ja", "@_:\\", keys("@=BracketLeft", "_+IntlRo", ":=Quote", "\\=IntlYen")],
        ["ko", "\\|", keys("\\=Backslash", "|+Backslash")],
    ];
    for (const [layout, text, want] of cases) {
        assert.deepEqual(events(text, { layout }), want, `${layout} ${text}`);
    }
    // € on de: AltGr+E with the X11 Unicode keysym.
    assert.deepEqual(strokesForChar("de", "€"), [[down(ALTGR), ...tap([0x10020ac, "KeyE"]), up(ALTGR)]]);
});

test("Enter, Tab and CRLF", () => {
    assert.deepEqual(events("a\r\nb\tc\rd", { layout: "us" }), [
        ...us("a"), ...tap([0xff0d, "Enter"]), ...us("b"), ...tap([0xff09, "Tab"]), ...us("c"),
        ...tap([0xff0d, "Enter"]), ...us("d"),
    ]);
});

test("characters a layout cannot type are listed once, in order", () => {
    const plan = planTyping("ç a ç ü ß 😀", { layout: "us" });
    assert.deepEqual(plan.untypable, ["ç", "ü", "ß", "😀"]);
    assert.equal(plan.typed, 6); // a and five spaces
    assert.deepEqual(planTyping("ü", { layout: "de" }).untypable, []);
    assert.deepEqual(planTyping("ç", { layout: "fr" }).untypable, []);
});

test("every layout is known; an unknown one is an error", () => {
    assert.deepEqual(LAYOUTS, ["us", "ko", "de", "fr", "ja", "uk"]);
    for (const layout of LAYOUTS) {
        assert.equal(planTyping("Hello 123", { layout }).untypable.length, 0, layout);
    }
    assert.throws(() => planTyping("x", { layout: "xx" }), /unknown keyboard layout xx/);
});

test("each stroke releases what it pressed (a paced sender may stop between strokes)", () => {
    const plan = planTyping("Ab@ 안녕 ÄÖ~", { layout: "ko" });
    for (const s of planTyping("Ab@ÄÖ~|{", { layout: "de" }).strokes.concat(plan.strokes)) {
        const held = new Set();
        for (const [sym, code, isDown] of s) {
            if (isDown) {
                held.add(code);
            } else {
                assert.ok(held.delete(code), `release of ${code} without press`);
            }
        }
        assert.equal(held.size, 0);
    }
    assert.equal(plan.strokes.length, plan.modes.length);
    assert.equal(plan.modes.at(-1), false); // back to English at the end
});

test("10,000 characters plan in one pass", () => {
    const text = "안녕하세요 abcdefghi ".repeat(625);
    assert.equal([...text].length, 10000);
    const plan = planTyping(text, { layout: "ko" });
    assert.equal(plan.typed, 10000);
    // per repetition: 한/영, 12 Hangul keys, Space, 한/영, 9 letters, Space
    assert.equal(plan.strokes.length, 625 * 25);
});
