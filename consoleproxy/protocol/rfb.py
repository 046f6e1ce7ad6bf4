"""What both RFB handshakes of RFC 6143 (section 7.1 handshaking messages, 7.2 security types) share.

The proxy sits between two RFB connections and drives each one only as far as the end of the
security handshake (the SecurityResult of section 7.1.3); the initialisation messages of section 7.3
(ClientInit, ServerInit) and everything after them are relayed unchanged. The protocol package
holds RFB in four modules, one concern each:

* ``rfb`` (this module): the vocabulary both handshakes speak: limits, security types, the errors
  (``RFBError`` and its subclasses), the events, ProtocolVersion parsing, VNC authentication's DES
  response (``vnc_auth_response``, section 7.2.2), the receive buffer and ``HandshakeOutputs``.
* ``rfb_server``: ``ServerHandshake``, our handshake with the hypervisor's VNC server (we are its
  RFB client), with VNC authentication, VeNCrypt and the probe mode of ``consoleproxy diagnose``.
* ``rfb_client``: ``ClientHandshake``, our handshake with the browser (we are its RFB server):
  version 3.8 and the single security type None, so the VNC password never reaches the browser.
* ``rfb_messages``: the messages after the handshake that the proxy reads: the browser's
  client-to-server messages (``ClientMessageFilter``) and ServerInit's name length.

Like the handshakes of python-websockets and h11, the state machines never touch a socket: the
glue feeds bytes with ``receive_data()``, writes what ``data_to_send()`` returns and acts on
``events()``. A protocol violation raises ``RFBError`` (or a subclass) naming the rule broken.

Version differences the handshakes handle (RFC 6143 sections 7.1.2, 7.1.3, 7.2.1 and Appendix A):

* 3.3: the server picks the security type and sends it as a U32; 0 means failure and a reason
  string follows. With None there is no SecurityResult; a failed SecurityResult has no reason.
* 3.7: the server offers a list (U8 count, count 0 = failure + reason string); the client answers
  with one byte. With None there is still no SecurityResult; a failed one has no reason.
* 3.8: like 3.7, but a SecurityResult always follows (also for None), and a failed one carries a
  reason string.
* VeNCrypt (type 19): the SecurityResult always follows its inner authentication, whatever the
  version, as in QEMU, TigerVNC and libvncserver.

Invariant for both state machines: a method checks ``state`` before it acts and assigns the next
state in the same synchronous call, so a state always describes what the next input must be.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from consoleproxy.errors import ConsoleProxyError

__all__ = [
    "MAX_REASON_LENGTH",
    "MAX_SECURITY_TYPES",
    "MAX_VENCRYPT_SUBTYPES",
    "VERSION_LENGTH",
    "VNC_CHALLENGE_LENGTH",
    "AuthFailed",
    "Authenticated",
    "ClientEvent",
    "ClientReady",
    "Event",
    "HandshakeOutputs",
    "LimitExceeded",
    "Probed",
    "RFBError",
    "RFBStateError",
    "RecvBuffer",
    "SecurityType",
    "ServerEvent",
    "StartTLS",
    "VeNCryptSubtype",
    "VersionError",
    "check_version_prefix",
    "decode_reason",
    "format_version",
    "parse_version",
    "vnc_auth_response",
]

# -- limits ------------------------------------------------------------------------------------

MAX_REASON_LENGTH = 4096
"""Longest failure reason string accepted from a VNC server (bytes). A real server's reason is one
line; a longer one is treated as a protocol violation instead of being buffered."""

MAX_SECURITY_TYPES = 64
"""Most security types a server may offer. The U8 count bounds memory at 255 bytes anyway; no real
server offers more than a handful, so a longer list is treated as garbage."""

MAX_VENCRYPT_SUBTYPES = 64
"""Most VeNCrypt subtypes a server may offer (each 4 bytes, so at most 256 bytes buffered)."""

VERSION_LENGTH = 12  # "RFB xxx.yyy\n"
_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
VNC_CHALLENGE_LENGTH = 16  # VNC authentication's challenge and response


class SecurityType(IntEnum):
    """Security types of RFC 6143 section 7.2 (and VeNCrypt, registered by IANA) that we know."""

    INVALID = 0
    NONE = 1
    VNC_AUTH = 2
    VENCRYPT = 19


class VeNCryptSubtype(IntEnum):
    """VeNCrypt 0.2 subtypes. Plain, SASL and the ``*Plain`` ones are not supported."""

    PLAIN = 256
    TLS_NONE = 257
    TLS_VNC = 258
    TLS_PLAIN = 259
    X509_NONE = 260
    X509_VNC = 261
    X509_PLAIN = 262


# -- errors ------------------------------------------------------------------------------------


class RFBError(ConsoleProxyError):
    """The peer broke a rule of the RFB protocol; the message names the rule."""


class VersionError(RFBError):
    """The ProtocolVersion message is malformed or names a version we cannot speak."""


class LimitExceeded(RFBError):
    """A length field exceeds one of this module's bounds (reason string, type list, cut text)."""


class RFBStateError(RFBError):
    """The caller used a state machine out of order (for example ``accept()`` before ``ClientReady``)."""


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authenticated:
    """The VNC server accepted us; what follows is ServerInit, after the browser's ClientInit."""

    server_version: tuple[int, int]  # the version in use, i.e. min(server's, 3.8)


@dataclass(frozen=True)
class AuthFailed:
    """The VNC server refused us, or we cannot satisfy its security; ``reason`` is for humans."""

    reason: str


@dataclass(frozen=True)
class StartTLS:
    """Wrap the connection to the VNC server in TLS now, then call ``tls_started()``."""


@dataclass(frozen=True)
class ClientReady:
    """The browser finished its part of the security handshake; call ``accept()`` or ``reject()``."""

    version: tuple[int, int]


@dataclass(frozen=True)
class Probed:
    """Probe mode: the probe has read what it came for; ``note`` says why it stopped early."""

    note: str | None = None


ServerEvent = Authenticated | AuthFailed | StartTLS | Probed
ClientEvent = ClientReady
Event = ServerEvent | ClientEvent

# -- helpers -----------------------------------------------------------------------------------


def parse_version(data: bytes) -> tuple[int, int]:
    """Parse a 12-byte ProtocolVersion message (RFC 6143 section 7.1.1) into (major, minor)."""
    m = _VERSION_RE.fullmatch(data)
    if m is None:
        raise VersionError(f"ProtocolVersion must be 'RFB xxx.yyy\\n', got {data[:VERSION_LENGTH]!r}")
    return int(m.group(1)), int(m.group(2))


def format_version(version: tuple[int, int]) -> bytes:
    return b"RFB %03d.%03d\n" % version


def check_version_prefix(buf: bytes | bytearray) -> None:
    """Fail early on a peer that does not speak RFB at all (an HTTP or SSH server, say)."""
    head = bytes(buf[:4])
    if not b"RFB ".startswith(head):
        raise VersionError(f"peer does not speak RFB: first bytes are {head!r}")


def _reverse_bits(b: int) -> int:
    return int(f"{b:08b}"[::-1], 2)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """DES-encrypt the 16-byte VNC authentication challenge (RFC 6143 section 7.2.2).

    The key is the password's first 8 bytes (UTF-8, which is ASCII for the passwords hypervisors
    generate), NUL-padded, with the bits of each byte reversed (VNC's historical DES quirk). Each
    8-byte half of the challenge is encrypted on its own (ECB).
    """
    if len(challenge) != VNC_CHALLENGE_LENGTH:
        raise ValueError(f"VNC challenge must be 16 bytes, not {len(challenge)}")
    key = bytes(_reverse_bits(b) for b in password.encode("utf-8")[:8].ljust(8, b"\x00"))
    # Triple DES with K1 = K2 = K3 is single DES.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305 (the protocol's)
    return encryptor.update(challenge) + encryptor.finalize()


class RecvBuffer:
    """Bytes received but not yet parsed, with all-or-nothing reads (also ``diagnose.RFBProbe``'s)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def __len__(self) -> int:
        return len(self.data)

    def take(self, n: int) -> bytes | None:
        if len(self.data) < n:
            return None
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    def take_string(self, offset: int, limit: int, what: str) -> bytes | None:
        """Take ``offset`` bytes, a U32 length and that many bytes; return the string part."""
        if len(self.data) < offset + 4:
            return None
        (n,) = struct.unpack_from(">I", self.data, offset)
        if n > limit:
            raise LimitExceeded(f"{what} is {n} bytes long; at most {limit} are accepted")
        if len(self.data) < offset + 4 + n:
            return None
        out = bytes(self.data[offset + 4 : offset + 4 + n])
        del self.data[: offset + 4 + n]
        return out

    def take_vencrypt_subtypes(self) -> tuple[int, ...] | None:
        """A VeNCrypt subtype list (U8 count, then that many U32), at most MAX_VENCRYPT_SUBTYPES."""
        if not self.data:
            return None
        count = self.data[0]
        if count > MAX_VENCRYPT_SUBTYPES:
            raise LimitExceeded(
                f"VNC server offers {count} VeNCrypt subtypes; at most {MAX_VENCRYPT_SUBTYPES} are accepted"
            )
        raw = self.take(1 + 4 * count)
        return None if raw is None else struct.unpack_from(f">{count}I", raw, 1)

    def drain(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


def decode_reason(raw: bytes, default: str) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text or default


# -- what both handshakes hand the glue --------------------------------------------------------


class HandshakeOutputs:
    """What both handshakes hand the glue: bytes to write, events, and bytes past the handshake.

    Each getter drains, so the glue can call it after every ``receive_data``.
    """

    def __init__(self, initial: bytes = b"") -> None:
        self._out = bytearray(initial)
        self._events: list[Event] = []
        self._leftover = bytearray()

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def events(self) -> list[Event]:
        """Events since the last call."""
        ev, self._events = self._events, []
        return ev

    def leftover(self) -> bytes:
        """Bytes received after the handshake ended; they belong to the relay."""
        out = bytes(self._leftover)
        self._leftover.clear()
        return out
