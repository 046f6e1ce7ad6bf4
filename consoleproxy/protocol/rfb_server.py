"""Our side of the RFB handshake with the VNC server (RFC 6143 sections 7.1 and 7.2): we are its RFB client.

``ServerHandshake`` negotiates the version (3.3, 3.7 or 3.8), picks a security type (None, VNC
authentication, or VeNCrypt with TLS, RFC 6143 sections 7.2.1 and 7.2.2 and the VeNCrypt extension
of the community RFB specification) and ends with ``Authenticated`` or ``AuthFailed``; what follows
(ServerInit) is relayed. The name follows the class: the handshake *with* the server.

``ServerHandshake(..., probe=True)`` is the probe of ``consoleproxy diagnose``: it never
authenticates. It stops (``Probed``) after the security types, unless VeNCrypt is offered: then it
negotiates VeNCrypt 0.2 to read the subtypes and, when an X.509 subtype is offered, asks for TLS
(``StartTLS``) so the glue can read the certificate, and stops once ``tls_started()`` is called.

Sans-I/O: ``receive_data()``, ``data_to_send()``, ``events()`` (``rfb`` says how the versions
differ and the invariant the states keep).
"""

from __future__ import annotations

import struct
from enum import Enum, auto

from consoleproxy.protocol.rfb import (
    MAX_REASON_LENGTH,
    MAX_SECURITY_TYPES,
    VERSION_LENGTH,
    VNC_CHALLENGE_LENGTH,
    Authenticated,
    AuthFailed,
    HandshakeOutputs,
    LimitExceeded,
    Probed,
    RecvBuffer,
    RFBError,
    RFBStateError,
    SecurityType,
    StartTLS,
    VeNCryptSubtype,
    VersionError,
    check_version_prefix,
    decode_reason,
    format_version,
    parse_version,
    vnc_auth_response,
)

__all__ = ["X509_SUBTYPES", "ServerHandshake", "ServerHandshakeState"]

# In preference order: certificate-checked TLS first, VNC authentication inside TLS only with a
# password (see ``ServerHandshake._choose_vencrypt``).
_VENCRYPT_PREFERENCE = (
    VeNCryptSubtype.X509_VNC,
    VeNCryptSubtype.X509_NONE,
    VeNCryptSubtype.TLS_VNC,
    VeNCryptSubtype.TLS_NONE,
)
_VENCRYPT_WITH_VNC_AUTH = frozenset({VeNCryptSubtype.X509_VNC, VeNCryptSubtype.TLS_VNC})

X509_SUBTYPES = (260, 261, 262, 264)
"""VeNCrypt subtypes with a server certificate, in the probe's order (X509None, X509Vnc, X509Plain,
X509SASL): the TLS* ones are anonymous Diffie-Hellman, and None first so that a probe never has to
answer a VNC challenge."""


class ServerHandshakeState(Enum):
    """What the handshake with the VNC server waits for next."""

    VERSION = auto()  # the server's ProtocolVersion
    SECURITY_TYPE_33 = auto()  # 3.3: the server's U32 security type
    SECURITY_TYPES = auto()  # 3.7+: U8 count and the list of security types
    VNC_CHALLENGE = auto()  # 16-byte VNC authentication challenge
    VENCRYPT_VERSION = auto()  # VeNCrypt: the server's version (2 bytes)
    VENCRYPT_VERSION_ACK = auto()  # VeNCrypt: U8 0 = our version accepted
    VENCRYPT_SUBTYPES = auto()  # VeNCrypt: U8 count and U32 subtypes
    VENCRYPT_SUBTYPE_ACK = auto()  # VeNCrypt: U8 1 = our subtype accepted
    TLS_HANDSHAKE = auto()  # StartTLS emitted; waiting for tls_started()
    SECURITY_RESULT = auto()  # U32 status (3.8 failure: reason string follows)
    AUTHENTICATED = auto()  # done; further bytes belong to the relay
    FAILED = auto()  # AuthFailed emitted; the glue closes the connection
    PROBED = auto()  # probe mode: Probed emitted; the glue closes the connection


class ServerHandshake(HandshakeOutputs):
    """Client side of the RFB handshake towards the hypervisor's VNC server.

    ``password`` is the VNC password from the token (None or "" when it has none). With
    ``allow_tls`` the VeNCrypt TLS subtypes may be chosen; the glue then performs the TLS
    handshake on ``StartTLS`` and calls ``tls_started()``.

    Security type preference: None when offered (nothing to authenticate, so a stale password in
    a token does not matter), else VNC authentication when we have a password, else VeNCrypt.

    With ``probe`` (see the module docstring) it never authenticates and ends with ``Probed``, or
    ``AuthFailed`` when the server refuses the connection (``refused`` holds its reason);
    ``probe_tls=False`` stops before TLS even when an X.509 subtype is offered.

    Memory: at most one partial handshake message is buffered, bounded by ``MAX_REASON_LENGTH``.
    """

    def __init__(
        self, password: str | None, *, allow_tls: bool = True, probe: bool = False, probe_tls: bool = True
    ) -> None:
        self.state = ServerHandshakeState.VERSION
        self._password = None if probe else password or None
        self._allow_tls = allow_tls
        self._probe = probe
        self._probe_tls = probe_tls
        self._buf = RecvBuffer()
        super().__init__()
        #: The version the server announced, as sent (e.g. (3, 889) for Apple).
        self.server_version: tuple[int, int] | None = None
        #: The version in use: (3, 3), (3, 7) or (3, 8).
        self.version: tuple[int, int] | None = None
        #: Security types the server offered (3.3: the one it chose).
        self.security_types: tuple[int, ...] = ()
        #: The security type in use, and the VeNCrypt subtype when it is VeNCrypt.
        self.security_type: int | None = None
        self.vencrypt_subtype: int | None = None
        #: The VeNCrypt version the server announced, and the subtypes it offered.
        self.vencrypt_version: tuple[int, int] | None = None
        self.vencrypt_subtypes: tuple[int, ...] = ()
        #: The server's own reason when it refused the connection (security type 0 / count 0).
        self.refused: str | None = None
        #: Probe mode: why the probe stopped early (None when it read all it could).
        self.probe_note: str | None = None

    # public interface

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the VNC server (plaintext, after TLS when TLS is on)."""
        st = self.state
        if st is ServerHandshakeState.AUTHENTICATED:
            self._leftover += data
            return
        if st in (ServerHandshakeState.FAILED, ServerHandshakeState.PROBED) or not data:
            return
        if st is ServerHandshakeState.TLS_HANDSHAKE:
            raise RFBError("VNC server sent RFB data before the VeNCrypt TLS handshake")
        self._buf.data += data
        while self._step():
            pass
        if self.state is ServerHandshakeState.AUTHENTICATED:
            self._leftover += self._buf.drain()
        elif self.state in (ServerHandshakeState.FAILED, ServerHandshakeState.PROBED):
            self._buf.drain()
        elif self.state is ServerHandshakeState.TLS_HANDSHAKE and len(self._buf):
            raise RFBError("VNC server sent data after its VeNCrypt ack, before the TLS handshake")

    def tls_started(self) -> None:
        """The glue finished the TLS handshake; continue with VeNCrypt's inner authentication."""
        if self.state is not ServerHandshakeState.TLS_HANDSHAKE:
            raise RFBStateError(f"tls_started() called in state {self.state.name}, not TLS_HANDSHAKE")
        if self._probe:
            self._probed()  # the glue has the certificate now; nothing is authenticated
        elif self.vencrypt_subtype in _VENCRYPT_WITH_VNC_AUTH:
            self.state = ServerHandshakeState.VNC_CHALLENGE
        else:
            self.state = ServerHandshakeState.SECURITY_RESULT

    # internals

    def _fail(self, reason: str) -> bool:
        self.state = ServerHandshakeState.FAILED
        self._events.append(AuthFailed(reason))
        return False

    def _refuse(self, raw: bytes) -> bool:
        """The server refused the connection with a reason string (security type 0 / count 0)."""
        self.refused = decode_reason(raw, "VNC server refused the connection")
        return self._fail(self.refused)

    def _probed(self, note: str | None = None) -> bool:
        self.state = ServerHandshakeState.PROBED
        self.probe_note = note
        self._events.append(Probed(note))
        return False

    def _vencrypt_stop(self, reason: str) -> bool:
        """VeNCrypt cannot go on: a failure, or in probe mode the end of what can be read."""
        return self._probed(reason) if self._probe else self._fail(reason)

    def _succeed(self) -> bool:
        assert self.version is not None
        self.state = ServerHandshakeState.AUTHENTICATED
        self._events.append(Authenticated(self.version))
        return False

    def _step(self) -> bool:
        """Parse one message if it is complete; return whether to try the next one."""
        S = ServerHandshakeState
        st, buf = self.state, self._buf
        if st is S.VERSION:
            check_version_prefix(buf.data)
            raw = buf.take(VERSION_LENGTH)
            if raw is None:
                return False
            return self._on_version(parse_version(raw))
        if st is S.SECURITY_TYPE_33:
            if len(buf) < 4:
                return False
            (stype,) = struct.unpack_from(">I", buf.data)
            if stype == SecurityType.INVALID:
                reason = buf.take_string(4, MAX_REASON_LENGTH, "connection failure reason")
                if reason is None:
                    return False
                return self._refuse(reason)
            buf.take(4)
            self.security_types = (stype,)
            if self._probe:
                return self._probed()
            if stype == SecurityType.NONE:
                self.security_type = stype
                return self._succeed()  # 3.3 + None: no SecurityResult
            if stype == SecurityType.VNC_AUTH:
                if self._password is None:
                    return self._fail("VNC server requires a password but the token has none")
                self.security_type = stype
                self.state = S.VNC_CHALLENGE
                return True
            raise RFBError(f"RFB 3.3 security type must be 0, 1 or 2, got {stype}")
        if st is S.SECURITY_TYPES:
            if len(buf) < 1:
                return False
            count = buf.data[0]
            if count == 0:
                reason = buf.take_string(1, MAX_REASON_LENGTH, "connection failure reason")
                if reason is None:
                    return False
                return self._refuse(reason)
            if count > MAX_SECURITY_TYPES:
                raise LimitExceeded(
                    f"VNC server offers {count} security types; at most {MAX_SECURITY_TYPES} are accepted"
                )
            raw = buf.take(1 + count)
            if raw is None:
                return False
            self.security_types = tuple(raw[1:])
            return self._choose_security()
        if st is S.VNC_CHALLENGE:
            challenge = buf.take(VNC_CHALLENGE_LENGTH)
            if challenge is None:
                return False
            assert self._password is not None
            self._out += vnc_auth_response(self._password, challenge)
            self.state = S.SECURITY_RESULT
            return True
        if st is S.VENCRYPT_VERSION:
            raw = buf.take(2)
            if raw is None:
                return False
            self.vencrypt_version = (raw[0], raw[1])
            if self.vencrypt_version < (0, 2):
                return self._vencrypt_stop(f"VNC server speaks VeNCrypt {raw[0]}.{raw[1]}; 0.2 is required")
            self._out += b"\x00\x02"
            self.state = S.VENCRYPT_VERSION_ACK
            return True
        if st is S.VENCRYPT_VERSION_ACK:
            raw = buf.take(1)
            if raw is None:
                return False
            if raw[0] != 0:
                return self._vencrypt_stop("VNC server refused VeNCrypt version 0.2")
            self.state = S.VENCRYPT_SUBTYPES
            return True
        if st is S.VENCRYPT_SUBTYPES:
            subtypes = buf.take_vencrypt_subtypes()
            if subtypes is None:
                return False
            self.vencrypt_subtypes = subtypes
            return self._probe_vencrypt(subtypes) if self._probe else self._choose_vencrypt(subtypes)
        if st is S.VENCRYPT_SUBTYPE_ACK:
            raw = buf.take(1)
            if raw is None:
                return False
            if raw[0] != 1:
                return self._vencrypt_stop(f"VNC server refused VeNCrypt subtype {self.vencrypt_subtype}")
            self.state = S.TLS_HANDSHAKE
            self._events.append(StartTLS())
            return False
        if st is S.SECURITY_RESULT:
            if len(buf) < 4:
                return False
            (status,) = struct.unpack_from(">I", buf.data)
            if status == 0:
                buf.take(4)
                return self._succeed()
            if self.version == (3, 8):
                reason = buf.take_string(4, MAX_REASON_LENGTH, "SecurityResult failure reason")
                if reason is None:
                    return False
                return self._fail(decode_reason(reason, "authentication failed"))
            buf.take(4)  # 3.3 and 3.7: no reason string; the server closes
            if status == 2:
                return self._fail("authentication failed: too many attempts")
            return self._fail("authentication failed")
        return False  # AUTHENTICATED, FAILED, TLS_HANDSHAKE: nothing to parse

    def _on_version(self, announced: tuple[int, int]) -> bool:
        major, minor = announced
        self.server_version = announced
        if major < 3:
            raise VersionError(f"VNC server announced RFB {major}.{minor}; 3.3 or later is required")
        if major > 3 or minor >= 8:
            version = (3, 8)  # newer (e.g. Apple's 3.889, RealVNC's 4.x) speak 3.8 to 3.8 clients
        elif minor == 7:
            version = (3, 7)
        else:
            version = (3, 3)  # 3.5 and other odd minors must be read as 3.3 (RFC 6143 7.1.1)
        self.version = version
        self._out += format_version(version)
        self.state = (
            ServerHandshakeState.SECURITY_TYPE_33
            if version == (3, 3)
            else ServerHandshakeState.SECURITY_TYPES
        )
        return True

    def _choose_security(self) -> bool:
        offered = self.security_types
        if self._probe:
            if SecurityType.VENCRYPT not in offered:
                return self._probed()  # nothing more to read without authenticating
            choice = SecurityType.VENCRYPT
        elif SecurityType.NONE in offered:
            choice = SecurityType.NONE
        elif SecurityType.VNC_AUTH in offered and self._password is not None:
            choice = SecurityType.VNC_AUTH
        elif SecurityType.VENCRYPT in offered and self._allow_tls:
            choice = SecurityType.VENCRYPT
        elif SecurityType.VNC_AUTH in offered:
            return self._fail("VNC server requires a password but the token has none")
        elif SecurityType.VENCRYPT in offered:
            return self._fail("VNC server requires TLS (VeNCrypt), which is disabled for VNC servers")
        else:
            return self._fail(f"VNC server offers no supported security type (offered: {list(offered)})")
        self.security_type = choice
        self._out.append(choice)
        S = ServerHandshakeState
        if choice == SecurityType.NONE:
            if self.version == (3, 8):
                self.state = S.SECURITY_RESULT
                return True
            return self._succeed()  # 3.7 + None: straight to initialisation, no SecurityResult
        self.state = S.VNC_CHALLENGE if choice == SecurityType.VNC_AUTH else S.VENCRYPT_VERSION
        return True

    def _probe_vencrypt(self, offered: tuple[int, ...]) -> bool:
        usable = [s for s in X509_SUBTYPES if s in offered]
        if not usable or not self._probe_tls:
            return self._probed(None if usable else "no X.509 subtype: no certificate to show")
        self.vencrypt_subtype = usable[0]
        self._out += struct.pack(">I", usable[0])
        self.state = ServerHandshakeState.VENCRYPT_SUBTYPE_ACK
        return True

    def _choose_vencrypt(self, offered: tuple[int, ...]) -> bool:
        usable = [
            s
            for s in _VENCRYPT_PREFERENCE
            if s in offered and (self._password is not None or s not in _VENCRYPT_WITH_VNC_AUTH)
        ]
        if not usable:
            if any(s in offered for s in _VENCRYPT_WITH_VNC_AUTH):
                return self._fail("VNC server requires a password but the token has none")
            return self._fail(f"VNC server offers no supported VeNCrypt subtype (offered: {list(offered)})")
        self.vencrypt_subtype = usable[0]
        self._out += struct.pack(">I", usable[0])
        self.state = ServerHandshakeState.VENCRYPT_SUBTYPE_ACK
        return True
