// Fixed key combinations of the toolbar (Ctrl+Alt+F1…F12, sticky modifiers) as X11 keysyms with
// the DOM `code` of their key, so noVNC can send QEMU extended key events with the scan code.
// Typing text (layouts, Korean) lives in typing.js.

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
