"""The client-message filter and ServerInit's name bound (protocol.rfb_messages), driven with byte
strings (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consoleproxy.protocol import rfb_messages
from consoleproxy.protocol.rfb import LimitExceeded, RFBError
from consoleproxy.protocol.rfb_messages import ClientMessageFilter


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


# -- ClientMessageFilter ------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32s = st.integers(0, 0xFFFFFFFF)


def _msg(kind: str, body: bytes, is_input: bool) -> tuple[str, bytes, bool]:
    return kind, body, is_input


MESSAGES = st.one_of(
    st.binary(min_size=19, max_size=19).map(lambda b: _msg("SetPixelFormat", b"\x00" + b, False)),
    st.lists(st.integers(-(2**31), 2**31 - 1).filter(lambda e: e != -316), max_size=20).map(
        lambda es: _msg(
            "SetEncodings",
            struct.pack(">BxH", 2, len(es)) + b"".join(struct.pack(">i", e) for e in es),
            False,
        )
    ),
    st.tuples(st.booleans(), u16, u16, u16, u16).map(
        lambda t: _msg("FramebufferUpdateRequest", struct.pack(">BBHHHH", 3, *t), False)
    ),
    st.tuples(st.booleans(), u32s).map(lambda t: _msg("KeyEvent", struct.pack(">BBxxI", 4, *t), True)),
    st.tuples(st.integers(0, 0x7F), u16, u16).map(
        lambda t: _msg("PointerEvent", struct.pack(">BBHH", 5, *t), True)
    ),
    st.binary(max_size=300).map(lambda b: _msg("ClientCutText", struct.pack(">BxxxI", 6, len(b)) + b, True)),
    st.binary(min_size=4, max_size=300).map(
        lambda b: _msg("ClientCutText(extended)", struct.pack(">Bxxxi", 6, -len(b)) + b, True)
    ),
    st.tuples(u16, u32s, u32s).map(lambda t: _msg("QEMU key", struct.pack(">BBHII", 255, 0, *t), True)),
    st.sampled_from([0, 1]).map(lambda op: _msg("QEMU audio", struct.pack(">BBH", 255, 1, op), False)),
    st.tuples(st.integers(0, 5), st.integers(1, 2), u32s).map(
        lambda t: _msg("QEMU audio format", struct.pack(">BBHBBI", 255, 1, 2, *t), False)
    ),
    st.binary(min_size=9, max_size=9).map(lambda b: _msg("EnableContinuousUpdates", b"\x96" + b, False)),
    st.tuples(u32s, st.binary(max_size=64)).map(
        lambda t: _msg("ClientFence", struct.pack(">BxxxIB", 248, t[0], len(t[1])) + t[1], False)
    ),
    st.sampled_from([2, 3, 4]).map(lambda code: _msg("xvp", bytes([250, 0, 1, code]), True)),
    st.lists(st.binary(min_size=16, max_size=16), max_size=4).map(
        lambda ss: _msg("SetDesktopSize", struct.pack(">BxHHBx", 251, 800, 600, len(ss)) + b"".join(ss), True)
    ),
    st.tuples(st.booleans(), st.binary(max_size=60)).map(
        lambda t: _msg(
            "gii",
            bytes([253, 0x81 if t[0] else 0x01]) + struct.pack(">H" if t[0] else "<H", len(t[1])) + t[1],
            True,
        )
    ),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(c % (len(data) + 1) for c in cuts)
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _filter(chunks: list[bytes], view_only: bool) -> tuple[bytes, ClientMessageFilter]:
    f = ClientMessageFilter(view_only=view_only)
    return b"".join(f.feed(c) for c in chunks), f


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(MESSAGES, max_size=25), cuts=st.lists(st.integers(0, 10**6), max_size=30))
def test_filter_passes_everything_byte_exact_without_view_only(
    msgs: list[tuple[str, bytes, bool]], cuts: list[int]
) -> None:
    stream = b"\x01" + b"".join(m for _, m, _ in msgs)
    out, f = _filter(_split(stream, cuts), view_only=False)
    assert out == stream
    assert f.dropped == 0


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(MESSAGES, max_size=25), cuts=st.lists(st.integers(0, 10**6), max_size=30))
def test_filter_view_only_drops_exactly_the_input(
    msgs: list[tuple[str, bytes, bool]], cuts: list[int]
) -> None:
    stream = b"\x01" + b"".join(m for _, m, _ in msgs)
    expected = b"\x01" + b"".join(m for _, m, is_input in msgs if not is_input)
    out, f = _filter(_split(stream, cuts), view_only=True)
    assert out == expected
    assert f.dropped == sum(is_input for _, _, is_input in msgs)


def test_filter_view_only_examples() -> None:
    key = struct.pack(">BBxxI", 4, 1, 0x61)
    pointer = struct.pack(">BBHH", 5, 1, 10, 20)
    fbur = struct.pack(">BBHHHH", 3, 0, 0, 0, 720, 400)
    f = ClientMessageFilter(view_only=True)
    assert f.feed(b"\x01" + key + pointer + fbur) == b"\x01" + fbur
    # A message split across feeds: nothing of a dropped one leaks, a passed one is exact.
    assert f.feed(key[:3]) == b""
    assert f.feed(key[3:] + fbur[:5]) == fbur[:5]
    assert f.feed(fbur[5:]) == fbur[5:]


def test_filter_extended_mouse_buttons_pointer_is_seven_bytes_once_requested() -> None:
    fbur = struct.pack(">BBHHHH", 3, 0, 0, 0, 1, 1)
    ext_pointer = struct.pack(">BBHHB", 5, 0x81, 1, 2, 1)  # bit 7: extended form, one more byte
    f = ClientMessageFilter(view_only=True)
    encodings = struct.pack(">BxHii", 2, 2, 0, -316)
    assert f.feed(b"\x01" + encodings[:9]) == b"\x01" + encodings[:9]  # split inside an encoding
    assert f.feed(encodings[9:] + ext_pointer + fbur) == encodings[9:] + fbur
    # Without -316 requested, bit 7 is an old client's button 8 in a 6-byte message.
    g = ClientMessageFilter(view_only=True, expect_client_init=False)
    assert g.feed(struct.pack(">BBHH", 5, 0x80, 1, 2) + fbur) == fbur


@pytest.mark.parametrize(
    "message",
    [b"\x07abc", b"\xff\x02", struct.pack(">BBH", 255, 1, 3), b"\x10"],
    ids=["type 7", "QEMU subtype 2", "QEMU audio op 3", "type 16"],
)
def test_filter_unknown_message_is_protocol_error(message: bytes) -> None:
    with pytest.raises(RFBError):
        ClientMessageFilter(view_only=True, expect_client_init=False).feed(message)


@pytest.mark.parametrize("length", [1025, -1025])
def test_filter_cut_text_over_the_limit(length: int) -> None:
    f = ClientMessageFilter(view_only=False, max_cut_text=1024, expect_client_init=False)
    with pytest.raises(LimitExceeded, match="1025"):
        f.feed(struct.pack(">Bxxxi", 6, length))


def test_filter_cut_text_at_the_limit_is_streamed() -> None:
    f = ClientMessageFilter(view_only=False, max_cut_text=1024, expect_client_init=False)
    msg = struct.pack(">BxxxI", 6, 1024) + b"t" * 1024
    assert f.feed(msg[:500]) + f.feed(msg[500:]) == msg
    assert len(f._header) == 0  # bodies are streamed, not held


def test_filter_default_cut_text_limit_is_one_mib() -> None:
    f = ClientMessageFilter(view_only=True, expect_client_init=False)
    with pytest.raises(LimitExceeded):
        f.feed(struct.pack(">BxxxI", 6, rfb_messages.DEFAULT_MAX_CUT_TEXT + 1))


def test_server_init_name_length_bounded() -> None:
    fixed = struct.pack(">HH", 800, 600) + bytes(16)
    assert rfb_messages.server_init_name_length(fixed + struct.pack(">I", 4)) == 4
    longest = rfb_messages.MAX_NAME_LENGTH
    assert rfb_messages.server_init_name_length(fixed + struct.pack(">I", longest)) == longest
    with pytest.raises(LimitExceeded, match="desktop name is 4294967295 bytes"):
        rfb_messages.server_init_name_length(fixed + struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(RFBError, match="24 bytes"):
        rfb_messages.server_init_name_length(fixed)


# -- ClientMessageFilter: dropping the release of Lang1 (한/영) and Lang2 (한자) ------------------

LANG1, LANG2 = rfb_messages.LANG1_KEYCODE, rfb_messages.LANG2_KEYCODE
XK_HANGUL, XK_HANGUL_HANJA = rfb_messages.LANG1_KEYSYM, rfb_messages.LANG2_KEYSYM


def qemu_key(down: int, keysym: int, keycode: int) -> bytes:
    return struct.pack(">BBHII", 255, 0, down, keysym, keycode)


def key_event(down: int, keysym: int) -> bytes:
    return struct.pack(">BBxxI", 4, down, keysym)


def is_lang_release(message: bytes) -> bool:
    """The reference: which whole messages the option must drop (decoded here, not by the filter)."""
    if message[0] == 255 and message[1] == 0:
        down, _sym, code = struct.unpack(">HII", message[2:])
        return down == 0 and code in (0x72, 0x71)
    if message[0] == 4:
        (sym,) = struct.unpack(">I", message[4:])
        return message[1] == 0 and sym in (0xFF31, 0xFF34)
    return False


def test_lang_keycodes_are_qemus() -> None:
    # QEMU's qcodes lang1/lang2 as XT numbers (keycodemapdb; noVNC's xtscancodes.js "Lang1": 0x72,
    # "Lang2": 0x71); the keysyms are X11's XK_Hangul and XK_Hangul_Hanja.
    assert (LANG1, LANG2, XK_HANGUL, XK_HANGUL_HANJA) == (0x72, 0x71, 0xFF31, 0xFF34)


def test_filter_drops_only_the_lang_releases_byte_level() -> None:
    press1, release1 = qemu_key(1, XK_HANGUL, LANG1), qemu_key(0, XK_HANGUL, LANG1)
    press2, release2 = qemu_key(1, XK_HANGUL_HANJA, LANG2), qemu_key(0, XK_HANGUL_HANJA, LANG2)
    a_down, a_up = qemu_key(1, 0x61, 0x1E), qemu_key(0, 0x61, 0x1E)
    plain_down, plain_up = key_event(1, XK_HANGUL), key_event(0, XK_HANGUL)
    fbur = struct.pack(">BBHHHH", 3, 0, 0, 0, 8, 8)
    f = ClientMessageFilter(view_only=False, drop_lang_release=True)
    stream = b"\x01" + press1 + release1 + a_down + a_up + press2 + release2 + plain_down + plain_up + fbur
    assert f.feed(stream) == b"\x01" + press1 + a_down + a_up + press2 + plain_down + fbur
    assert (f.dropped, f.lang_releases_dropped) == (3, 3)
    # Near misses pass: a release of another key with the Hangul keysym, a Lang key code pressed
    # with another down-flag value, set-2 make codes (0xF2/0xF1) and the E0-prefixed forms.
    near = [qemu_key(0, XK_HANGUL, 0x38), qemu_key(2, 0, LANG1), qemu_key(0, 0, 0xF2),
            qemu_key(0, 0, 0xF1), qemu_key(0, 0, 0xE072), qemu_key(0, 0, 0x72 | 0x80),
            key_event(0, 0xFF32), key_event(2, XK_HANGUL_HANJA)]
    assert f.feed(b"".join(near)) == b"".join(near)
    # Without the option the same stream passes byte for byte.
    g = ClientMessageFilter(view_only=False)
    assert g.feed(stream) == stream


def test_filter_lang_release_split_anywhere_is_held_then_dropped() -> None:
    release = qemu_key(0, XK_HANGUL, LANG1)
    other = qemu_key(0, 0x62, 0x30)
    for cut in range(1, 12):
        f = ClientMessageFilter(view_only=False, drop_lang_release=True, expect_client_init=False)
        assert f.feed(release[:cut]) == b""
        assert f.feed(release[cut:] + other[:cut]) == b""  # the other's key code is not known yet
        assert f.feed(other[cut:]) == other
        assert f.lang_releases_dropped == 1


def test_filter_view_only_and_lang_release_together() -> None:
    f = ClientMessageFilter(view_only=True, drop_lang_release=True, expect_client_init=False)
    fbur = struct.pack(">BBHHHH", 3, 0, 0, 0, 8, 8)
    assert f.feed(qemu_key(0, XK_HANGUL, LANG1) + qemu_key(1, 0x61, 0x1E) + fbur) == fbur
    assert (f.dropped, f.lang_releases_dropped) == (2, 0)  # dropped as input first


LANG_MESSAGES = st.one_of(
    st.tuples(
        st.sampled_from([0, 1, 2, 0x100]),
        st.sampled_from([0, XK_HANGUL, XK_HANGUL_HANJA, 0x61, 0xFFE9]),
        st.sampled_from([LANG1, LANG2, 0xF1, 0xF2, 0x38, 0xB8, 0xE072, 0x1D, 0, 0x72_00]),
    ).map(lambda t: qemu_key(*t)),
    st.tuples(st.sampled_from([0, 1, 0x80]), st.sampled_from([XK_HANGUL, XK_HANGUL_HANJA, 0xFF32, 0x61])).map(
        lambda t: key_event(*t)
    ),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    msgs=st.lists(st.one_of(MESSAGES.map(lambda m: m[1]), LANG_MESSAGES), max_size=30),
    cuts=st.lists(st.integers(0, 10**6), max_size=40),
)
def test_filter_lang_release_drops_exactly_those_releases_any_split(
    msgs: list[bytes], cuts: list[int]
) -> None:
    """Fuzzed: across arbitrary splits of the client byte stream, the output is the input without
    exactly the Lang1/Lang2 releases, and those only."""
    stream = b"\x01" + b"".join(msgs)
    expected = b"\x01" + b"".join(m for m in msgs if not is_lang_release(m))
    f = ClientMessageFilter(view_only=False, drop_lang_release=True)
    out = b"".join(f.feed(c) for c in _split(stream, cuts))
    assert out == expected
    assert f.lang_releases_dropped == f.dropped == sum(map(is_lang_release, msgs))
    assert len(f._header) == 0  # nothing held back at a message boundary
