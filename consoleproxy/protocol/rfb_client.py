"""Our side of the RFB handshake with the browser (RFC 6143 sections 7.1 and 7.2): we are its RFB server.

``ClientHandshake`` offers noVNC version 3.8 and the single security type None, so the VNC
password never reaches the browser; it answers 3.3 and 3.7 clients too. The verdict waits for the
handshake with the VNC server (``rfb_server``): ``ClientReady``, then ``accept()`` or
``reject(reason)``. Sans-I/O: ``receive_data()``, ``data_to_send()``, ``events()`` (``rfb``
says how the versions differ and the invariant the states keep).
"""

from __future__ import annotations

import struct
from enum import Enum, auto

from consoleproxy.protocol.rfb import (
    MAX_REASON_LENGTH,
    VERSION_LENGTH,
    ClientReady,
    HandshakeOutputs,
    RecvBuffer,
    RFBError,
    RFBStateError,
    SecurityType,
    VersionError,
    check_version_prefix,
    format_version,
    parse_version,
)

__all__ = ["ClientHandshake", "ClientHandshakeState"]


class ClientHandshakeState(Enum):
    """What the handshake with the browser waits for next."""

    VERSION = auto()  # the browser's ProtocolVersion
    SECURITY_CHOICE = auto()  # 3.7+: the browser's U8 security type
    READY = auto()  # ClientReady emitted; waiting for accept() or reject()
    ACCEPTED = auto()  # done; further bytes (ClientInit first) belong to the relay
    REJECTED = auto()  # failure queued; the glue closes the connection


class ClientHandshake(HandshakeOutputs):
    """Server side of the RFB handshake towards the browser: version 3.8, security None only.

    The outcome of the backend handshake is only known later, so the result is deferred:

    * 3.8: types [None]; after the browser's choice, ``ClientReady``; ``accept()`` queues
      SecurityResult 0, ``reject(reason)`` SecurityResult 1 with the reason.
    * 3.7: types [None]; after the choice, ``ClientReady``. None has no SecurityResult in 3.7, so
      ``accept()`` queues nothing and ``reject()`` cannot tell the client anything in-band (the
      WebSocket close reason carries it).
    * 3.3: the server names the type, and 0 (failure + reason) is allowed, so ``ClientReady`` comes
      right after the version; ``accept()`` queues type None (1), ``reject(reason)`` type 0 with
      the reason.
    """

    def __init__(self) -> None:
        self.state = ClientHandshakeState.VERSION
        self.version: tuple[int, int] | None = None
        self._buf = RecvBuffer()
        super().__init__(format_version((3, 8)))

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the browser."""
        C = ClientHandshakeState
        if self.state in (C.READY, C.ACCEPTED):
            # 3.7 clients send ClientInit right after their choice: it is the relay's.
            self._leftover += data
            return
        if self.state is C.REJECTED:
            return
        self._buf.data += data
        if self.state is C.VERSION:
            check_version_prefix(self._buf.data)
            raw = self._buf.take(VERSION_LENGTH)
            if raw is None:
                return
            self._on_version(parse_version(raw))
        if self.state is C.SECURITY_CHOICE:
            raw = self._buf.take(1)
            if raw is None:
                return
            if raw[0] != SecurityType.NONE:
                raise RFBError(f"client chose security type {raw[0]}, but only None (1) was offered")
            self._ready()
        self._leftover += self._buf.drain()

    def _on_version(self, version: tuple[int, int]) -> None:
        major, minor = version
        if major != 3 or not 3 <= minor <= 8:
            raise VersionError(
                f"client asked for RFB {major}.{minor}; a client may not ask for more than 3.8 offered"
            )
        if minor == 8:
            self.version = (3, 8)
        elif minor == 7:
            self.version = (3, 7)
        else:
            self.version = (3, 3)  # 3.5 and friends mean 3.3 (RFC 6143 7.1.1)
        if self.version == (3, 3):
            self._ready()
        else:
            self._out += b"\x01" + bytes([SecurityType.NONE])
            self.state = ClientHandshakeState.SECURITY_CHOICE

    def _ready(self) -> None:
        assert self.version is not None
        self.state = ClientHandshakeState.READY
        self._events.append(ClientReady(self.version))

    def accept(self) -> None:
        """The VNC server accepted us: let the browser proceed to ClientInit."""
        self._check_ready("accept")
        if self.version == (3, 3):
            self._out += struct.pack(">I", SecurityType.NONE)
        elif self.version == (3, 8):
            self._out += struct.pack(">I", 0)
        # 3.7 + None: no SecurityResult.
        self.state = ClientHandshakeState.ACCEPTED

    def reject(self, reason: str) -> None:
        """The backend handshake failed: queue the in-band failure the client's version allows."""
        self._check_ready("reject")
        raw = reason.encode("utf-8")[:MAX_REASON_LENGTH]
        if self.version == (3, 3):
            self._out += struct.pack(">II", SecurityType.INVALID, len(raw)) + raw
        elif self.version == (3, 8):
            self._out += struct.pack(">II", 1, len(raw)) + raw
        self.state = ClientHandshakeState.REJECTED
        self._leftover.clear()

    def _check_ready(self, what: str) -> None:
        if self.state is not ClientHandshakeState.READY:
            raise RFBStateError(f"{what}() called in state {self.state.name}, not READY")
