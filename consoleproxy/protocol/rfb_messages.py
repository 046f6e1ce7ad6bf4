"""The messages after the RFB handshake (RFC 6143 sections 7.3 and 7.5) that the proxy reads.

The proxy relays everything after the security handshake, but it frames the browser's
client-to-server messages and reads one field of the VNC server's ServerInit:

* ``ClientMessageFilter``: parses the browser's client-to-server messages (section 7.5 and the
  common extensions) so that a view-only console can drop input without losing message framing,
  and so that the release of the Korean Lang1 (한/영) and Lang2 (한자) keys can be dropped for
  guests whose hypervisor turns that release into a second press (``[input] lang_key_release``).
* ``seekable_encodings``: a SetEncodings rewritten to the encodings a recording's player can start
  decoding at a keyframe (``STATELESS_ENCODINGS``).
* ``server_init_name_length``: the desktop name's length from ServerInit, checked against
  ``MAX_NAME_LENGTH`` before anything is relayed.

Sans-I/O like the handshakes (``rfb_server``, ``rfb_client``): bytes in, bytes out, and
``RFBError`` (``rfb``) or ``LimitExceeded`` naming the rule a message broke.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from consoleproxy.protocol.rfb import LimitExceeded, RFBError

__all__ = [
    "DEFAULT_MAX_CUT_TEXT",
    "LANG1_KEYCODE",
    "LANG1_KEYSYM",
    "LANG2_KEYCODE",
    "LANG2_KEYSYM",
    "MAX_NAME_LENGTH",
    "MAX_SET_ENCODINGS",
    "SERVER_INIT_FIXED",
    "STATELESS_ENCODINGS",
    "ClientMessageFilter",
    "seekable_encodings",
    "server_init_name_length",
]

# -- limits ------------------------------------------------------------------------------------

# A desktop name longer than this is not a name; the page shows it as the tab's title.
MAX_NAME_LENGTH = 4096
SERVER_INIT_FIXED = 24  # width, height, pixel format, name length

DEFAULT_MAX_CUT_TEXT = 1024 * 1024
"""Default bound of one ClientCutText message from the browser (bytes). The filter streams cut
text without buffering it, so this bounds what the VNC server is asked to buffer, not us."""

LANG1_KEYCODE = 0x72
"""QEMU key code (XT scan code, as in QEMU's and noVNC's keycode tables) of Lang1, the Korean
한/영 key (Linux KEY_HANGEUL, browser ``code`` "Lang1"). A Korean PS/2 keyboard sends only its make
code (set 2: 0xF2) and never a release."""
LANG2_KEYCODE = 0x71
"""QEMU key code of Lang2, the Korean 한자 key (Linux KEY_HANJA, set 2 make code 0xF1, no release)."""
LANG1_KEYSYM = 0xFF31  # XK_Hangul: what a keysym-only client sends for 한/영
LANG2_KEYSYM = 0xFF34  # XK_Hangul_Hanja: the same for 한자

# -- client-to-server message types ------------------------------------------------------------

_KEY_EVENT = 4
_POINTER_EVENT = 5
_CLIENT_CUT_TEXT = 6
_SET_ENCODINGS = 2
_SET_PIXEL_FORMAT = 0
_FB_UPDATE_REQUEST = 3
_QEMU = 255
_XVP = 250
_SET_DESKTOP_SIZE = 251
_GII = 253
_EXTENDED_MOUSE_BUTTONS = -316
_OBSERVED = frozenset((_KEY_EVENT, _POINTER_EVENT, _CLIENT_CUT_TEXT))  # and QEMU key (checked)
_HEADER_PEEK = 20  # the longest prefix any message needs to know its length (a whole SetPixelFormat)

# Encodings whose rectangles decode on their own, whatever came before (RFC 6143 7.7; TRLE 7.7.5):
# Raw, CopyRect, RRE, CoRRE, Hextile, TRLE. Left out: zlib (6), Tight (7), ZlibHex (8), ZRLE (16)
# and ZYWRLE (17) keep zlib streams from rectangle to rectangle; JPEG (21) may leave out its tables
# and reuse earlier ones; H.264 (50) needs its earlier frames.
STATELESS_ENCODINGS = frozenset((0, 1, 2, 4, 5, 15))
# Pseudo-encodings (negative) carry no pixel data and pass, but TightPNG (-260): Tight's decoder.
_STATEFUL_PSEUDO = frozenset((-260,))
MAX_SET_ENCODINGS = 4 + 4 * 0xFFFF


def seekable_encodings(message: bytes) -> bytes:
    """A whole SetEncodings with only the encodings a player can start decoding anywhere in
    (``STATELESS_ENCODINGS`` and the pseudo-encodings but TightPNG), in the client's order."""
    if len(message) < 4 or message[0] != _SET_ENCODINGS:
        raise RFBError("not a SetEncodings message")
    (count,) = struct.unpack_from(">H", message, 2)
    if len(message) != 4 + 4 * count:
        raise RFBError(f"SetEncodings of {count} encodings is {len(message)} bytes, not {4 + 4 * count}")
    encodings = struct.unpack_from(f">{count}i", message, 4)
    kept = [e for e in encodings if (e in STATELESS_ENCODINGS if e >= 0 else e not in _STATEFUL_PSEUDO)]
    return struct.pack(f">BxH{len(kept)}i", _SET_ENCODINGS, len(kept), *kept)

# Fixed-length messages: type -> total length.
_FIXED = {
    0: 20,  # SetPixelFormat
    3: 10,  # FramebufferUpdateRequest
    _KEY_EVENT: 8,
    150: 10,  # EnableContinuousUpdates
    _XVP: 4,
}


def _is_lang_release(h: bytes) -> bool:
    """Whether the whole message at the start of ``h`` releases Lang1 (한/영) or Lang2 (한자)."""
    if h[0] == _KEY_EVENT:
        (keysym,) = struct.unpack_from(">I", h, 4)
        return h[1] == 0 and keysym in (LANG1_KEYSYM, LANG2_KEYSYM)
    if h[0] == _QEMU and h[1] == 0:
        down, _keysym, keycode = struct.unpack_from(">HII", h, 2)
        return down == 0 and keycode in (LANG1_KEYCODE, LANG2_KEYCODE)
    return False


def server_init_name_length(fixed: bytes) -> int:
    """The name length from ServerInit's fixed part (RFC 6143 7.3.2), checked against our bound.

    A VNC server that announces a huge name would make the browser buffer it; the proxy refuses
    it before relaying anything.
    """
    if len(fixed) != SERVER_INIT_FIXED:
        raise RFBError(f"ServerInit's fixed part is {SERVER_INIT_FIXED} bytes, got {len(fixed)}")
    (length,) = struct.unpack_from(">I", fixed, 20)
    if length > MAX_NAME_LENGTH:
        raise LimitExceeded(f"ServerInit desktop name is {length} bytes (at most {MAX_NAME_LENGTH})")
    return int(length)


class ClientMessageFilter:
    """Frames the browser's client-to-server messages (RFC 6143 7.3.1, 7.5 and extensions).

    ``feed(data)`` returns the bytes to forward to the VNC server. With ``view_only`` the input
    messages are dropped: KeyEvent, PointerEvent, ClientCutText, QEMU extended key events, and
    the ones that change the VM rather than the view: xvp (shutdown/reboot/reset), SetDesktopSize
    and gii (injected input devices). Everything else passes byte for byte, and without
    ``view_only`` everything does.

    An unknown message type raises ``RFBError``: its length cannot be known, so framing would be
    lost. Message bodies are streamed, never buffered: memory per console is a header of at most
    16 bytes. ``max_cut_text`` bounds one ClientCutText (either sign of the extended-clipboard
    length); a longer one raises ``LimitExceeded``.

    PointerEvent is 6 bytes, or 7 with bit 7 of the button mask set once the client has asked for
    the ExtendedMouseButtons pseudo-encoding (-316) in SetEncodings: noVNC masks bit 7 until the
    server confirms the extension, and sets it on every extended event after that.

    With ``drop_lang_release`` the release of Lang1 (한/영) and Lang2 (한자) is dropped, and nothing
    else: a QEMU extended key event (255, subtype 0) whose down-flag is 0 and whose key code is
    ``LANG1_KEYCODE`` or ``LANG2_KEYCODE``, and a plain KeyEvent (4) whose down-flag is 0 and whose
    keysym is ``LANG1_KEYSYM`` or ``LANG2_KEYSYM`` (QEMU maps those keysyms to the same keys). A real
    Korean keyboard has no release for these keys; QEMU before its 2023 fix ("ps2: Don't send key
    release event for Lang1, Lang2 keys") sent one anyway, which Windows reads as a second press.
    Deciding needs the whole 12-byte extended key event (8-byte KeyEvent), so at most that much is
    held between feeds.

    ``observer`` (the recorder, recording.py) is called with every whole input message the filter
    forwards: KeyEvent, QEMU extended key event, PointerEvent, and ClientCutText with its text
    (bounded by ``max_cut_text``). To hand over whole messages it holds a split key or pointer
    message (at most 12 bytes) between feeds, as ``drop_lang_release`` does.

    ``lenient`` (a recorded console that neither drops input nor Lang releases): a message that
    cannot be framed does not end the console; from there on every byte passes unframed, and
    nothing more is observed (recording must never break a console).

    ``on_request`` (the recorder) gets each whole FramebufferUpdateRequest and returns the bytes
    to forward in its place (a keyframe turns the browser's incremental request into a full one).
    The last SetPixelFormat is kept in ``pixel_format`` (its 16-byte format), for the recorder.
    With ``seekable`` each SetEncodings is forwarded as ``seekable_encodings`` makes it: the VNC
    server then sends nothing a player could not start decoding at a keyframe. That message is
    held whole (at most ``MAX_SET_ENCODINGS`` bytes, about 20 in practice) to rewrite its count.
    """

    def __init__(
        self,
        *,
        view_only: bool = True,
        max_cut_text: int = DEFAULT_MAX_CUT_TEXT,
        expect_client_init: bool = True,
        drop_lang_release: bool = False,
        observer: Callable[[bytes], None] | None = None,
        lenient: bool = False,
        on_request: Callable[[bytes], bytes] | None = None,
        seekable: bool = False,
    ) -> None:
        self.view_only = view_only
        self.on_request = on_request
        self.seekable = seekable
        self.pixel_format: bytes | None = None
        self._encodings: bytearray | None = None  # a SetEncodings being collected (seekable)
        self.lenient = lenient
        self.unframed = False  # lenient, after a message that could not be framed
        self.observer = observer
        self._cut: bytearray | None = None  # a ClientCutText being collected for the observer
        self.drop_lang_release = drop_lang_release
        self.max_cut_text = max_cut_text
        self.dropped = 0  # messages dropped so far (input of a view-only console, Lang releases)
        self.lang_releases_dropped = 0
        self._client_init = expect_client_init
        self._header = bytearray()  # start of a message whose length is not known yet
        self._remaining = 0  # bytes of the current message still to pass or drop
        self._dropping = False
        self._scan_encodings = False  # the current message is SetEncodings
        self._enc_partial = bytearray()
        self._enc_skip = 0
        self._extended_mouse = False

    def feed(self, data: bytes) -> bytes:
        if self.unframed:
            return bytes(data)
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                k = min(self._remaining, n - i)
                if self._encodings is not None:
                    self._encodings += data[i : i + k]
                    i += k
                    self._remaining -= k
                    if not self._remaining:
                        message, self._encodings = seekable_encodings(bytes(self._encodings)), None
                        self._scan_encodings, self._enc_skip = True, 4
                        self._enc_partial.clear()
                        self._scan(message)
                        self._scan_encodings = False
                        out += message
                    continue
                if not self._dropping:
                    chunk = data[i : i + k]
                    out += chunk
                    if self._scan_encodings:
                        self._scan(chunk)
                    if self._cut is not None:
                        self._cut += chunk
                i += k
                self._remaining -= k
                if not self._remaining and self._cut is not None:
                    cut, self._cut = self._cut, None
                    self._observe(bytes(cut))
                continue
            if self._client_init:
                out += data[i : i + 1]  # ClientInit: the shared flag
                self._client_init = False
                i += 1
                continue
            held = bytes(self._header)
            peek = held + data[i : i + _HEADER_PEEK]
            try:
                total = self._message_length(peek)
            except RFBError:
                if not self.lenient:
                    raise
                self.unframed = True
                self.observer = None
                self._header.clear()
                out += held
                out += data[i:]
                break
            if total is None:
                self._header += data[i:]
                break
            self._header.clear()
            mtype = peek[0]
            drop = self.view_only and self._is_input(peek)
            if not drop and self.drop_lang_release and _is_lang_release(peek):
                drop = True
                self.lang_releases_dropped += 1
            self._dropping = drop
            if drop:
                self.dropped += 1
            elif mtype == _FB_UPDATE_REQUEST and self.on_request is not None:
                out += self.on_request(bytes(peek[:total]))  # whole: _message_length waited
                i += total - len(held)
                continue
            elif mtype == _SET_PIXEL_FORMAT and self.on_request is not None:
                self.pixel_format = bytes(peek[4:total])
                out += peek[:total]
                i += total - len(held)
                continue
            elif mtype == _SET_ENCODINGS and self.seekable:
                self._encodings = bytearray(held)
                self._remaining = total - len(held)
                continue
            else:
                out += held
            self._remaining = total - len(held)
            if not drop and self.observer is not None and (
                mtype in _OBSERVED or (mtype == _QEMU and peek[1] == 0)
            ):
                whole = peek[:total]
                if len(whole) == total:
                    self._remaining = 0
                    self._scan_encodings = False
                    out += data[i : i + total - len(held)]
                    i += total - len(held)
                    self._observe(whole)
                    continue
                self._cut = bytearray(held)  # a long ClientCutText: the rest follows
            self._scan_encodings = mtype == _SET_ENCODINGS and not drop
            if self._scan_encodings:
                self._enc_partial.clear()
                self._enc_skip = 4  # type, padding, count
                self._scan(held)
        return bytes(out)

    @property
    def at_message_boundary(self) -> bool:
        """Whether the next byte starts a client message: one may be inserted here."""
        return not (self._remaining or self._header or self._client_init or self.unframed)

    def _observe(self, message: bytes) -> None:
        assert self.observer is not None
        self.observer(message)

    def _scan(self, chunk: bytes) -> None:
        """Watch SetEncodings for ExtendedMouseButtons (it changes the PointerEvent length)."""
        if self._enc_skip:
            k = min(self._enc_skip, len(chunk))
            chunk = chunk[k:]
            self._enc_skip -= k
        self._enc_partial += chunk
        whole = len(self._enc_partial) // 4 * 4
        for (enc,) in struct.iter_unpack(">i", self._enc_partial[:whole]):
            if enc == _EXTENDED_MOUSE_BUTTONS:
                self._extended_mouse = True
        del self._enc_partial[:whole]

    @staticmethod
    def _is_input(h: bytes) -> bool:
        t = h[0]
        if t in (_KEY_EVENT, _POINTER_EVENT, _CLIENT_CUT_TEXT, _XVP, _SET_DESKTOP_SIZE, _GII):
            return True
        return t == _QEMU and h[1] == 0

    def _message_length(self, h: bytes) -> int | None:
        """Total length of the message starting at ``h``; None when more bytes are needed."""
        t = h[0]
        fixed = _FIXED.get(t)
        if fixed is not None:
            if self.on_request is not None and t in (_SET_PIXEL_FORMAT, _FB_UPDATE_REQUEST):
                return None if len(h) < fixed else fixed  # handed over, or kept, whole
            if t == _KEY_EVENT and (self.drop_lang_release or self.observer) and len(h) < fixed:
                return None  # the keysym decides whether it is a Lang release; the observer sees it
            return fixed
        if t == _POINTER_EVENT:
            if len(h) < 2:
                return None
            n = 7 if self._extended_mouse and h[1] & 0x80 else 6
            return None if self.observer is not None and len(h) < n else n
        if t == _SET_ENCODINGS:
            if len(h) < 4:
                return None
            (count,) = struct.unpack_from(">H", h, 2)
            return 4 + 4 * int(count)
        if t == _CLIENT_CUT_TEXT:
            if len(h) < 8:
                return None
            (length,) = struct.unpack_from(">i", h, 4)
            size = abs(int(length))  # negative: extended clipboard, abs() bytes follow
            if size > self.max_cut_text:
                raise LimitExceeded(
                    f"ClientCutText of {size} bytes exceeds the limit of {self.max_cut_text} bytes"
                )
            return 8 + size
        if t == _QEMU:
            if len(h) < 2:
                return None
            if h[1] == 0:
                if (self.drop_lang_release or self.observer) and len(h) < 12:
                    return None  # the key code decides whether it is a Lang release
                return 12  # extended key event
            if h[1] == 1:
                if len(h) < 4:
                    return None
                (op,) = struct.unpack_from(">H", h, 2)
                if op in (0, 1):
                    return 4  # audio enable / disable
                if op == 2:
                    return 10  # audio set format
                raise RFBError(f"unknown QEMU audio operation {op}")
            raise RFBError(f"unknown QEMU client message subtype {h[1]}")
        if t == 248:  # ClientFence
            if len(h) < 9:
                return None
            return 9 + h[8]
        if t == _SET_DESKTOP_SIZE:
            if len(h) < 7:
                return None
            return 8 + 16 * h[6]
        if t == _GII:
            if len(h) < 4:
                return None
            fmt = ">H" if h[1] & 0x80 else "<H"  # bit 7 of endian-and-sub-type: big endian
            (length,) = struct.unpack_from(fmt, h, 2)
            return 4 + int(length)
        raise RFBError(f"unknown client message type {t}: cannot frame it")
