"""The sans-I/O RFB handshakes and the client message filter, driven with byte strings (no sockets)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consoleproxy.errors import ConsoleProxyError
from consoleproxy.protocol import rfb
from consoleproxy.protocol.rfb import (
    Authenticated,
    AuthFailed,
    ClientHandshake,
    ClientMessageFilter,
    ClientReady,
    LimitExceeded,
    Probed,
    RFBError,
    RFBStateError,
    ServerHandshake,
    ServerHandshakeState,
    StartTLS,
    VersionError,
    vnc_auth_response,
)

V33, V37, V38 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"
CHALLENGE = bytes(range(16))
OK = struct.pack(">I", 0)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def rstring(text: bytes) -> bytes:
    return u32(len(text)) + text


Chunker = Callable[[bytes], Sequence[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def run_server(
    segments: Sequence[bytes],
    password: str | None = None,
    *,
    allow_tls: bool = True,
    chunker: Chunker = whole,
) -> tuple[ServerHandshake, bytes, list[rfb.Event]]:
    """Feed the VNC server's transcript; a new segment starts after each StartTLS (TLS is faked)."""
    hs = ServerHandshake(password, allow_tls=allow_tls)
    out, events = b"", []
    for seg in segments:
        for chunk in chunker(seg):
            hs.receive_data(chunk)
            out += hs.data_to_send()
            for ev in hs.events():
                events.append(ev)
                if isinstance(ev, StartTLS):
                    hs.tls_started()
                    out += hs.data_to_send()
    return hs, out, events


# -- DES ---------------------------------------------------------------------------------------


def test_vnc_auth_des_vector() -> None:
    assert vnc_auth_response("secret", bytes(range(16))).hex() == "ee22539f33a5983ec12f9c2edbc995dd"


def test_vnc_auth_uses_only_eight_password_bytes_and_pads() -> None:
    assert vnc_auth_response("secret12", CHALLENGE) == vnc_auth_response("secret12-ignored", CHALLENGE)
    assert vnc_auth_response("secret", CHALLENGE) != vnc_auth_response("secret1", CHALLENGE)
    with pytest.raises(ValueError):
        vnc_auth_response("x", b"short")


# -- ServerHandshake: versions -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("announced", "answer", "state"),
    [
        (V33, V33, ServerHandshakeState.SECURITY_TYPE_33),
        (b"RFB 003.004\n", V33, ServerHandshakeState.SECURITY_TYPE_33),
        (b"RFB 003.005\n", V33, ServerHandshakeState.SECURITY_TYPE_33),
        (b"RFB 003.006\n", V33, ServerHandshakeState.SECURITY_TYPE_33),
        (V37, V37, ServerHandshakeState.SECURITY_TYPES),
        (V38, V38, ServerHandshakeState.SECURITY_TYPES),
        (b"RFB 003.889\n", V38, ServerHandshakeState.SECURITY_TYPES),  # Apple Remote Desktop
        (b"RFB 004.001\n", V38, ServerHandshakeState.SECURITY_TYPES),  # RealVNC 4+
    ],
)
def test_server_version_is_answered_with_min_of_server_and_38(
    announced: bytes, answer: bytes, state: ServerHandshakeState
) -> None:
    hs, out, events = run_server([announced])
    assert out == answer
    assert hs.state is state and events == []


@pytest.mark.parametrize(
    "announced",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 400 ", b"RFB 003.00x\n", b"RFB 003.008\r", b"RFB 002.000\n"],
)
def test_bad_server_version_is_version_error(announced: bytes) -> None:
    with pytest.raises(VersionError):
        run_server([announced])


def test_non_rfb_server_is_detected_before_twelve_bytes() -> None:
    hs = ServerHandshake(None)
    with pytest.raises(VersionError, match="does not speak RFB"):
        hs.receive_data(b"SSH")


def test_rfb_errors_are_console_proxy_errors() -> None:
    assert issubclass(RFBError, ConsoleProxyError)
    assert issubclass(VersionError, RFBError) and issubclass(LimitExceeded, RFBError)


# -- ServerHandshake: security None and the SecurityResult rules per version -------------------


def test_38_none_waits_for_security_result() -> None:
    hs, out, events = run_server([V38 + b"\x01\x01"])
    assert out == V38 + b"\x01"
    assert events == [] and hs.state is ServerHandshakeState.SECURITY_RESULT
    hs.receive_data(OK + b"SERVERINIT")
    assert hs.events() == [Authenticated((3, 8))]
    assert hs.leftover() == b"SERVERINIT"
    assert hs.data_to_send() == b""


def test_37_none_has_no_security_result() -> None:
    # Bytes after the type list are the ServerInit: they must not be read as a SecurityResult.
    server_init = struct.pack(">HH", 0, 0) + bytes(16) + rstring(b"vm")
    hs, out, events = run_server([V37 + b"\x01\x01" + server_init])
    assert out == V37 + b"\x01"
    assert events == [Authenticated((3, 7))]
    assert hs.leftover() == server_init


def test_33_none_has_no_security_result_and_no_choice_byte() -> None:
    hs, out, events = run_server([V33 + u32(1) + b"\x00\x00\x00\x00rest"])
    assert out == V33
    assert events == [Authenticated((3, 3))]
    assert hs.leftover() == b"\x00\x00\x00\x00rest"


def test_none_is_preferred_even_with_a_password() -> None:
    _, out, events = run_server([V38 + b"\x02\x02\x01" + OK], password="pw")
    assert out == V38 + b"\x01"
    assert events == [Authenticated((3, 8))]


# -- ServerHandshake: VNC authentication -------------------------------------------------------


@pytest.mark.parametrize(("version", "v"), [(V37, (3, 7)), (V38, (3, 8))])
def test_vnc_auth_success(version: bytes, v: tuple[int, int]) -> None:
    hs, out, events = run_server([version + b"\x01\x02" + CHALLENGE + OK + b"after"], password="pw")
    assert out == version + b"\x02" + vnc_auth_response("pw", CHALLENGE)
    assert events == [Authenticated(v)]
    assert hs.leftover() == b"after"


def test_vnc_auth_success_33() -> None:
    _, out, events = run_server([V33 + u32(2) + CHALLENGE + OK], password="pw")
    assert out == V33 + vnc_auth_response("pw", CHALLENGE)
    assert events == [Authenticated((3, 3))]


def test_vnc_auth_failure_38_carries_the_servers_reason() -> None:
    hs, _, events = run_server(
        [V38 + b"\x01\x02" + CHALLENGE + u32(1) + rstring(b"Authentication failed")], password="bad"
    )
    assert events == [AuthFailed("Authentication failed")]
    assert hs.state is ServerHandshakeState.FAILED


def test_vnc_auth_failure_38_waits_for_the_whole_reason() -> None:
    hs, _, _ = run_server([V38 + b"\x01\x02" + CHALLENGE + u32(1) + u32(6) + b"Aut"], password="bad")
    assert hs.events() == []
    hs.receive_data(b"h!!")
    assert hs.events() == [AuthFailed("Auth!!")]


@pytest.mark.parametrize("prefix", [V33 + u32(2), V37 + b"\x01\x02"])
def test_vnc_auth_failure_before_38_has_no_reason_string(prefix: bytes) -> None:
    # What follows the status is not a reason (the server just closes); it must not be parsed.
    _, _, events = run_server([prefix + CHALLENGE + u32(1) + rstring(b"not a reason")], password="bad")
    assert events == [AuthFailed("authentication failed")]


def test_vnc_auth_too_many_attempts_33() -> None:
    _, _, events = run_server([V33 + u32(2) + CHALLENGE + u32(2)], password="bad")
    assert events == [AuthFailed("authentication failed: too many attempts")]


@pytest.mark.parametrize("password", [None, ""])
def test_vnc_auth_required_without_password(password: str | None) -> None:
    hs, out, events = run_server([V38 + b"\x01\x02"], password=password)
    assert events == [AuthFailed("VNC server requires a password but the token has none")]
    assert out == V38  # nothing chosen: the server gets no security type byte
    hs.receive_data(b"ignored after failure")
    assert hs.events() == []


def test_vnc_auth_required_without_password_33() -> None:
    _, _, events = run_server([V33 + u32(2)], password=None)
    assert events == [AuthFailed("VNC server requires a password but the token has none")]


def test_vnc_auth_preferred_over_vencrypt_with_password() -> None:
    _, out, _ = run_server([V38 + b"\x02\x13\x02"], password="pw")
    assert out == V38 + b"\x02"


def test_no_supported_security_type() -> None:
    _, _, events = run_server([V38 + b"\x02\x05\x10"], password="pw")
    assert len(events) == 1 and isinstance(events[0], AuthFailed)
    assert "no supported security type" in events[0].reason


def test_33_unknown_security_type_is_protocol_error() -> None:
    with pytest.raises(RFBError, match=r"3\.3 security type"):
        run_server([V33 + u32(16)], password="pw")


# -- ServerHandshake: connection failures and limits -------------------------------------------


def test_zero_security_types_with_reason() -> None:
    _, _, events = run_server([V38 + b"\x00" + rstring(b"too many connections")])
    assert events == [AuthFailed("too many connections")]


def test_33_security_type_zero_with_reason() -> None:
    _, _, events = run_server([V33 + u32(0) + rstring(b"go away")])
    assert events == [AuthFailed("go away")]


def test_oversized_reason_is_limit_error_before_it_arrives() -> None:
    hs = ServerHandshake(None)
    with pytest.raises(LimitExceeded, match="4097"):
        hs.receive_data(V38 + b"\x00" + u32(rfb.MAX_REASON_LENGTH + 1))


def test_oversized_security_result_reason_is_limit_error() -> None:
    with pytest.raises(LimitExceeded):
        run_server([V38 + b"\x01\x01" + u32(1) + u32(10**9)])


def test_reason_at_the_limit_is_accepted() -> None:
    reason = b"x" * rfb.MAX_REASON_LENGTH
    _, _, events = run_server([V38 + b"\x00" + rstring(reason)])
    assert events == [AuthFailed(reason.decode())]


def test_too_many_security_types_is_limit_error() -> None:
    with pytest.raises(LimitExceeded):
        run_server([V38 + bytes([rfb.MAX_SECURITY_TYPES + 1])])


# -- ServerHandshake: VeNCrypt -----------------------------------------------------------------


def vencrypt_offer(*subtypes: int) -> bytes:
    return b"\x00\x02" + b"\x00" + bytes([len(subtypes)]) + b"".join(u32(s) for s in subtypes)


def test_vencrypt_x509vnc_to_starttls_then_inner_vnc_auth() -> None:
    hs = ServerHandshake("pw")
    hs.receive_data(V38 + b"\x01\x13")
    assert hs.data_to_send() == V38 + b"\x13"
    hs.receive_data(b"\x00\x02")
    assert hs.data_to_send() == b"\x00\x02"
    hs.receive_data(b"\x00" + b"\x05" + b"".join(u32(s) for s in (256, 257, 258, 260, 261)))
    assert hs.data_to_send() == u32(261)  # X509Vnc: certificate-checked TLS, and we have a password
    assert hs.events() == []
    hs.receive_data(b"\x01")
    assert hs.events() == [StartTLS()]
    assert hs.data_to_send() == b""
    assert hs.state is ServerHandshakeState.TLS_HANDSHAKE
    hs.tls_started()
    hs.receive_data(CHALLENGE)
    assert hs.data_to_send() == vnc_auth_response("pw", CHALLENGE)
    hs.receive_data(OK)
    assert hs.events() == [Authenticated((3, 8))]
    assert (hs.security_type, hs.vencrypt_subtype) == (19, 261)


@pytest.mark.parametrize(("version", "v"), [(V37, (3, 7)), (V38, (3, 8))])
def test_vencrypt_none_subtype_always_has_security_result(version: bytes, v: tuple[int, int]) -> None:
    # Even in 3.7, VeNCrypt's None subtypes end with a SecurityResult (unlike plain None).
    hs, out, events = run_server([version + b"\x01\x13" + vencrypt_offer(258, 257, 261, 260) + b"\x01"])
    assert out.endswith(u32(260))  # no password: X509None over the *Vnc ones
    assert events == [StartTLS()]
    assert hs.state is ServerHandshakeState.SECURITY_RESULT
    hs.receive_data(OK)
    assert hs.events() == [Authenticated(v)]


def test_vencrypt_tls_none_when_it_is_all_there_is() -> None:
    _, out, events = run_server([V38 + b"\x01\x13" + vencrypt_offer(257) + b"\x01", OK], password="pw")
    assert out.endswith(u32(257))
    assert events == [StartTLS(), Authenticated((3, 8))]


def test_vencrypt_data_before_tls_is_protocol_error() -> None:
    hs = ServerHandshake("pw")
    with pytest.raises(RFBError, match="before the TLS handshake"):
        hs.receive_data(V38 + b"\x01\x13" + vencrypt_offer(261) + b"\x01" + CHALLENGE)
    hs = ServerHandshake("pw")
    hs.receive_data(V38 + b"\x01\x13" + vencrypt_offer(261) + b"\x01")
    with pytest.raises(RFBError):
        hs.receive_data(b"x")


def test_tls_started_out_of_order_is_state_error() -> None:
    with pytest.raises(RFBStateError):
        ServerHandshake("pw").tls_started()


@pytest.mark.parametrize(
    ("transcript", "password", "allow_tls", "reason"),
    [
        (b"\x01\x13" + vencrypt_offer(258, 261), None, True, "requires a password"),
        (b"\x01\x13" + vencrypt_offer(256, 259, 262), "pw", True, "no supported VeNCrypt subtype"),
        (b"\x01\x13\x00\x01", "pw", True, "VeNCrypt 0.1"),
        (b"\x01\x13\x00\x02\x01", "pw", True, "refused VeNCrypt version"),
        (b"\x01\x13" + vencrypt_offer(261) + b"\x00", "pw", True, "refused VeNCrypt subtype 261"),
        (b"\x01\x13", "pw", False, "TLS (VeNCrypt)"),
    ],
)
def test_vencrypt_failures(transcript: bytes, password: str | None, allow_tls: bool, reason: str) -> None:
    _, _, events = run_server([V38 + transcript], password=password, allow_tls=allow_tls)
    assert len(events) == 1 and isinstance(events[0], AuthFailed)
    assert reason in events[0].reason


# -- ServerHandshake: any split gives the same result ------------------------------------------

SERVER_SCENARIOS: list[tuple[list[bytes], str | None]] = [
    ([V33 + u32(1) + b"init"], None),
    ([V33 + u32(2) + CHALLENGE + OK + b"init"], "pw"),
    ([V33 + u32(2) + CHALLENGE + u32(1)], "pw"),
    ([V37 + b"\x01\x01" + b"init"], None),
    ([V37 + b"\x02\x01\x02" + CHALLENGE + OK + b"init"], "pw"),
    ([V38 + b"\x02\x02\x01" + OK + b"init"], None),
    ([V38 + b"\x01\x02" + CHALLENGE + u32(1) + rstring(b"Authentication failed")], "pw"),
    ([V38 + b"\x00" + rstring(b"no")], None),
    ([b"RFB 003.889\n\x01\x02" + CHALLENGE + OK], "pw"),
    ([V38 + b"\x01\x13" + vencrypt_offer(257, 258, 260, 261) + b"\x01", CHALLENGE + OK + b"init"], "pw"),
    ([V37 + b"\x01\x13" + vencrypt_offer(257) + b"\x01", OK + b"init"], None),
]


@pytest.mark.parametrize(("segments", "password"), SERVER_SCENARIOS)
def test_server_handshake_fed_one_byte_at_a_time(segments: list[bytes], password: str | None) -> None:
    hs1, out1, ev1 = run_server(segments, password)
    hs2, out2, ev2 = run_server(segments, password, chunker=bytewise)
    assert (out1, ev1, hs1.leftover(), hs1.state) == (out2, ev2, hs2.leftover(), hs2.state)
    assert any(isinstance(e, Authenticated | AuthFailed) for e in ev1)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=st.sampled_from(SERVER_SCENARIOS), data=st.data())
def test_server_handshake_any_split(scenario: tuple[list[bytes], str | None], data: st.DataObject) -> None:
    segments, password = scenario

    def random_split(b: bytes) -> list[bytes]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(b)), max_size=8)))
        return [b[i:j] for i, j in zip([0, *cuts], [*cuts, len(b)], strict=True)]

    expected = run_server(segments, password)
    got = run_server(segments, password, chunker=random_split)
    assert (expected[1], expected[2], expected[0].leftover()) == (got[1], got[2], got[0].leftover())


# -- fuzz: only RFBError ------------------------------------------------------------------------


def _drive_server(chunks: list[bytes], password: str | None) -> None:
    hs = ServerHandshake(password)
    for chunk in chunks:
        hs.receive_data(chunk)
        hs.data_to_send()
        for ev in hs.events():
            if isinstance(ev, StartTLS):
                hs.tls_started()


@settings(max_examples=500)
@given(
    prefix=st.sampled_from([b"", V33, V37, V38, V38 + b"\x01\x13\x00\x02\x00", b"RFB 003.889\n"]),
    chunks=st.lists(st.binary(max_size=40), max_size=6),
    password=st.sampled_from([None, "pw"]),
)
def test_server_handshake_fuzz_raises_only_rfb_error(
    prefix: bytes, chunks: list[bytes], password: str | None
) -> None:
    try:
        _drive_server([prefix, *chunks], password)
    except RFBError:
        pass


@settings(max_examples=500)
@given(
    prefix=st.sampled_from([b"", V33, V37, V38, b"RFB 003.005\n"]),
    chunks=st.lists(st.binary(max_size=40), max_size=6),
    accept=st.booleans(),
)
def test_client_handshake_fuzz_raises_only_rfb_error(
    prefix: bytes, chunks: list[bytes], accept: bool
) -> None:
    hs = ClientHandshake()
    try:
        for chunk in [prefix, *chunks]:
            hs.receive_data(chunk)
            hs.data_to_send()
            if hs.events():
                hs.accept() if accept else hs.reject("no")
    except RFBError:
        pass


# -- ClientHandshake ----------------------------------------------------------------------------


def test_client_38_accept() -> None:
    hs = ClientHandshake()
    assert hs.data_to_send() == V38
    hs.receive_data(V38)
    assert hs.data_to_send() == b"\x01\x01"  # one security type: None
    assert hs.events() == []
    hs.receive_data(b"\x01")
    assert hs.events() == [ClientReady((3, 8))]
    assert hs.data_to_send() == b""  # the result waits for the VNC server's verdict
    hs.accept()
    assert hs.data_to_send() == OK
    hs.receive_data(b"\x01")  # ClientInit
    assert hs.leftover() == b"\x01"


def test_client_38_reject_sends_reason() -> None:
    hs = ClientHandshake()
    hs.receive_data(V38 + b"\x01")
    hs.data_to_send()
    hs.reject("Authentication failed")
    assert hs.data_to_send() == u32(1) + rstring(b"Authentication failed")


def test_client_37_accept_sends_no_security_result() -> None:
    hs = ClientHandshake()
    hs.data_to_send()
    hs.receive_data(V37)
    assert hs.data_to_send() == b"\x01\x01"
    hs.receive_data(b"\x01\x00")  # a 3.7 client sends ClientInit right after its choice
    assert hs.events() == [ClientReady((3, 7))]
    hs.accept()
    assert hs.data_to_send() == b""
    assert hs.leftover() == b"\x00"


def test_client_37_reject_sends_nothing_in_band() -> None:
    hs = ClientHandshake()
    hs.data_to_send()
    hs.receive_data(V37 + b"\x01")
    hs.data_to_send()
    hs.reject("no")
    assert hs.data_to_send() == b""


@pytest.mark.parametrize("version", [V33, b"RFB 003.005\n"])
def test_client_33_server_names_the_type_after_the_verdict(version: bytes) -> None:
    hs = ClientHandshake()
    hs.data_to_send()
    hs.receive_data(version)
    assert hs.events() == [ClientReady((3, 3))]
    assert hs.data_to_send() == b""
    hs.accept()
    assert hs.data_to_send() == u32(1)


def test_client_33_reject_is_type_zero_with_reason() -> None:
    hs = ClientHandshake()
    hs.data_to_send()
    hs.receive_data(V33)
    hs.reject("VNC server: Authentication failed")
    assert hs.data_to_send() == u32(0) + rstring(b"VNC server: Authentication failed")


def test_client_choice_other_than_none_is_protocol_error() -> None:
    hs = ClientHandshake()
    with pytest.raises(RFBError, match="only None"):
        hs.receive_data(V38 + b"\x02")


@pytest.mark.parametrize("version", [b"RFB 003.009\n", b"RFB 004.000\n", b"RFB 003.002\n", b"GET / HTTP/1.1"])
def test_client_bad_version(version: bytes) -> None:
    with pytest.raises(VersionError):
        ClientHandshake().receive_data(version)


def test_client_accept_out_of_order_is_state_error() -> None:
    hs = ClientHandshake()
    with pytest.raises(RFBStateError):
        hs.accept()
    hs.receive_data(V38 + b"\x01")
    hs.accept()
    with pytest.raises(RFBStateError):
        hs.accept()
    with pytest.raises(RFBStateError):
        hs.reject("late")


@pytest.mark.parametrize("transcript", [V33 + b"\x01", V37 + b"\x01\x01", V38 + b"\x01\x01extra"])
def test_client_handshake_fed_one_byte_at_a_time(transcript: bytes) -> None:
    def run(chunks: Sequence[bytes]) -> tuple[bytes, list[rfb.Event], bytes]:
        hs = ClientHandshake()
        out, events = hs.data_to_send(), []
        for c in chunks:
            hs.receive_data(c)
            out += hs.data_to_send()
            for ev in hs.events():
                events.append(ev)
                hs.accept()
                out += hs.data_to_send()
        return out, events, hs.leftover()

    assert run([transcript]) == run(bytewise(transcript))


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
        f.feed(struct.pack(">BxxxI", 6, rfb.DEFAULT_MAX_CUT_TEXT + 1))


def test_server_init_name_length_bounded() -> None:
    fixed = struct.pack(">HH", 800, 600) + bytes(16)
    assert rfb.server_init_name_length(fixed + struct.pack(">I", 4)) == 4
    assert rfb.server_init_name_length(fixed + struct.pack(">I", rfb.MAX_NAME_LENGTH)) == rfb.MAX_NAME_LENGTH
    with pytest.raises(rfb.LimitExceeded, match="desktop name is 4294967295 bytes"):
        rfb.server_init_name_length(fixed + struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(rfb.RFBError, match="24 bytes"):
        rfb.server_init_name_length(fixed)


# -- ClientMessageFilter: dropping the release of Lang1 (한/영) and Lang2 (한자) ------------------

LANG1, LANG2 = rfb.LANG1_KEYCODE, rfb.LANG2_KEYCODE
XK_HANGUL, XK_HANGUL_HANJA = rfb.LANG1_KEYSYM, rfb.LANG2_KEYSYM


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


# -- ServerHandshake: probe mode (consoleproxy diagnose) ----------------------------------------


def probe(
    data: bytes, *, probe_tls: bool = True, chunker: Chunker = whole
) -> tuple[ServerHandshake, bytes, list[rfb.Event]]:
    hs = ServerHandshake("ignored in probe mode", probe=True, probe_tls=probe_tls)
    out, events = b"", []
    for chunk in chunker(data):
        hs.receive_data(chunk)
        out += hs.data_to_send()
        events += hs.events()
    return hs, out, events


@pytest.mark.parametrize("chunker", [whole, bytewise])
def test_probe_stops_after_the_security_types_without_choosing(chunker: Chunker) -> None:
    hs, out, events = probe(V38 + b"\x02\x01\x02", chunker=chunker)
    assert out == V38  # never picks a type: nothing is authenticated, no challenge answered
    assert events == [Probed(None)] and hs.state is ServerHandshakeState.PROBED
    assert hs.security_types == (1, 2) and hs.server_version == (3, 8)
    hs.receive_data(b"more")  # ignored once probed
    assert hs.data_to_send() == b"" and hs.events() == []


def test_probe_33_reports_the_servers_type_even_vnc_auth() -> None:
    hs, out, events = probe(V33 + u32(2))
    assert out == V33 and events == [Probed(None)] and hs.security_types == (2,)


def test_probe_refusal_keeps_the_servers_reason() -> None:
    hs, _, events = probe(V38 + b"\x00" + rstring(b"too many VMs"))
    assert events == [AuthFailed("too many VMs")] and hs.refused == "too many VMs"
    hs, _, events = probe(V33 + u32(0) + rstring(b"busy"))
    assert hs.refused == "busy"


def test_probe_vencrypt_up_to_tls_then_probed() -> None:
    hs, out, events = probe(V38 + b"\x01\x13" + vencrypt_offer(257, 261) + b"\x01")
    assert out == V38 + b"\x13" + b"\x00\x02" + u32(261)  # X509, for the certificate
    assert events == [StartTLS()]
    assert hs.vencrypt_version == (0, 2) and hs.vencrypt_subtypes == (257, 261)
    hs.tls_started()
    assert hs.events() == [Probed(None)] and hs.data_to_send() == b""


def test_probe_vencrypt_stops_without_x509_or_when_not_asked() -> None:
    hs, out, events = probe(V38 + b"\x01\x13" + vencrypt_offer(257))
    assert events == [Probed("no X.509 subtype: no certificate to show")]
    assert hs.probe_note == "no X.509 subtype: no certificate to show"
    hs, out, events = probe(V38 + b"\x01\x13" + vencrypt_offer(260), probe_tls=False)
    assert events == [Probed(None)] and not out.endswith(u32(260))


def test_probe_vencrypt_refusals_are_notes_not_failures() -> None:
    _, _, events = probe(V38 + b"\x01\x13" + b"\x00\x01")
    assert events == [Probed("VNC server speaks VeNCrypt 0.1; 0.2 is required")]
    _, _, events = probe(V38 + b"\x01\x13" + b"\x00\x02\x01")
    assert events == [Probed("VNC server refused VeNCrypt version 0.2")]
    _, _, events = probe(V38 + b"\x01\x13" + vencrypt_offer(260) + b"\x00")
    assert events == [Probed("VNC server refused VeNCrypt subtype 260")]


def test_probe_keeps_the_handshakes_limits() -> None:
    with pytest.raises(VersionError):
        probe(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(LimitExceeded):
        probe(V38 + b"\x01\x13" + b"\x00\x02\x00\xff")


def test_normal_mode_records_the_vencrypt_offer_too() -> None:
    hs, _, _ = run_server([V38 + b"\x01\x13" + vencrypt_offer(257, 260) + b"\x01", OK])
    assert hs.vencrypt_version == (0, 2) and hs.vencrypt_subtypes == (257, 260) and hs.refused is None
    hs, _, events = run_server([V38 + b"\x01\x13" + b"\x00\x01"])
    assert events == [AuthFailed("VNC server speaks VeNCrypt 0.1; 0.2 is required")]
