"""The sans-I/O RFB handshakes (protocol.rfb, rfb_server, rfb_client), fed byte strings (no sockets)."""

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
    ClientReady,
    LimitExceeded,
    Probed,
    RFBError,
    RFBStateError,
    StartTLS,
    VersionError,
    vnc_auth_response,
)
from consoleproxy.protocol.rfb_client import ClientHandshake
from consoleproxy.protocol.rfb_server import ServerHandshake, ServerHandshakeState

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
