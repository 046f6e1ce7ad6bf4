"""Recording policy: whether a console is recorded, and what of its input a recording keeps.

Pure: values in, values out. ``[recording] keys``:

- ``"redact"`` (default): a key press or release is kept as "a key" (its direction), never which
  key; pointer events are kept; clipboard text sent into the VM is kept as its length only.
- ``"full"``: keys (keysym and QEMU key code) and clipboard text are kept.
- ``"none"``: no input at all.
"""

from __future__ import annotations

import struct

from consoleproxy.recordings import recording_format as fmt

__all__ = ["KEYS_POLICIES", "input_record", "should_record"]

KEYS_POLICIES = ("redact", "full", "none")
_KEY_EVENT, _POINTER_EVENT, _CLIENT_CUT_TEXT, _QEMU = 4, 5, 6, 255


def should_record(enabled: bool, claim: bool | None, vm: str, vms: list[str] | tuple[str, ...]) -> bool:
    """The token's ``record`` claim wins; else a VM listed in ``[recording] vms`` is recorded
    (CloudStack tokens carry no claim); else ``[recording] enabled``."""
    if claim is not None:
        return claim
    if vm and vm in vms:
        return True
    return enabled


def input_record(policy: str, ms: int, message: bytes) -> bytes | None:
    """The record (recording_format) for one whole client input message, or None to keep nothing.

    ``message`` is what rfb_messages.ClientMessageFilter hands its observer: a KeyEvent, QEMU extended key
    event, PointerEvent or ClientCutText, whole.
    """
    if policy == "none" or not message:
        return None
    t = message[0]
    if t == _KEY_EVENT and len(message) >= 8:
        down = message[1]
        if policy != "full":
            return fmt.record(fmt.KEY_REDACTED, ms, bytes((down,)))
        (keysym,) = struct.unpack_from(">I", message, 4)
        return fmt.record(fmt.KEY, ms, struct.pack(">BII", down, keysym, 0))
    if t == _QEMU and len(message) >= 12:
        down, keysym, keycode = struct.unpack_from(">HII", message, 2)
        if policy != "full":
            return fmt.record(fmt.KEY_REDACTED, ms, bytes((1 if down else 0,)))
        return fmt.record(fmt.KEY, ms, struct.pack(">BII", 1 if down else 0, keysym, keycode))
    if t == _POINTER_EVENT and len(message) >= 6:
        mask, x, y = struct.unpack_from(">BHH", message, 1)
        return fmt.record(fmt.POINTER, ms, struct.pack(">BHH", mask, x, y))
    if t == _CLIENT_CUT_TEXT and len(message) >= 8:
        (length,) = struct.unpack_from(">i", message, 4)
        text = message[8:]
        if policy != "full":
            return fmt.record(fmt.CLIPBOARD_REDACTED, ms, struct.pack(">I", abs(length)))
        return fmt.record(fmt.CLIPBOARD, ms, text)
    return None
