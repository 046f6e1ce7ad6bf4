"""Session registry and limits (DESIGN.md 4 ``[limits]``).

The registry is the one place that knows every open console: limits are checked and a slot is
reserved in one synchronous call (no ``await`` between check and insert), so two consoles racing
for the last slot cannot both win.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from consoleproxy.errors import SessionLimit

__all__ = ["Registry", "Session", "SessionCloser"]

# CloudStack's load report numbers its clients; one counter per process.
_numbers = itertools.count(1)


class SessionCloser(Protocol):
    def __call__(self, code: int, reason: str) -> None: ...


@dataclass(eq=False, slots=True)  # slots: one per open console, ~40% smaller than with a __dict__
class Session:
    """One console. Byte counters and ``last_activity`` are updated by the relay."""

    vm: str
    client_ip: str
    host: str
    port: int
    name: str | None = None
    view_only: bool = False
    max_duration: float | None = None
    session_uuid: str | None = None
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    number: int = field(default_factory=lambda: next(_numbers))
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    # Set by the server once the relay runs; asks the relay to end with a close code.
    closer: SessionCloser | None = None
    end_reason: str | None = None
    # The ID of this console's recording (recording.py), when it is recorded.
    recording: str | None = None
    # Resume (resume.py): the chain id and generation, the sealed ticket body (no password in
    # the clear) and when the last ticket went out (monotonic). None when resume is off.
    resume_id: str | None = None
    resume_gen: int = 0
    resume_body: str | None = None
    ticket_sent: float = 0.0

    def close(self, code: int, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        if self.closer is not None:
            self.closer(code, reason)

    def last_activity_wall(self) -> float:
        """``last_activity`` as Unix time (it is kept monotonic so clock steps cannot fake idleness)."""
        return self.started + (self.last_activity - self.started_mono)

    def cloudstack_status(self) -> dict[str, Any]:
        """One entry of CloudStack's ``/cmd/getstatus`` ``connections`` list (times in ms)."""
        return {
            "id": self.number,
            "clientInfo": self.client_ip,
            "host": self.host,
            "port": self.port,
            "tag": self.vm,
            "createTime": int(self.started * 1000),
            "lastUsedTime": int(self.last_activity_wall() * 1000),
            "sessionUuid": self.session_uuid or self.id,
        }

    def info(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "id": self.id,
            "vm": self.vm,
            "name": self.name,
            "client_ip": self.client_ip,
            "target": f"{self.host}:{self.port}",
            "started": self.started,
            "idle_seconds": round(now - self.last_activity, 3),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "view_only": self.view_only,
            **({"recording": self.recording} if self.recording else {}),
        }


class Registry:
    """Open sessions with the limits of ``[limits]``.

    ``per_vm_policy``: ``share`` (several viewers of one VM, up to ``max_per_vm`` when set),
    ``replace`` (the newest wins; older ones are closed with 4013, as CloudStack does) or
    ``reject`` (a VM already viewed refuses new consoles).
    """

    def __init__(
        self,
        *,
        max_sessions: int,
        max_per_vm: int = 0,
        per_vm_policy: str = "share",
        max_per_client_ip: int = 0,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_per_vm = max_per_vm
        self.per_vm_policy = per_vm_policy
        self.max_per_client_ip = max_per_client_ip
        self._sessions: dict[str, Session] = {}
        self._by_vm: dict[str, set[Session]] = {}
        self._by_ip: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def at_capacity(self) -> bool:
        return len(self._sessions) >= self.max_sessions

    def add(self, session: Session) -> list[Session]:
        """Admit ``session`` or raise SessionLimit; returns sessions to close (``replace``)."""
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimit(f"the proxy has reached its limit of {self.max_sessions} consoles")
        if self.max_per_client_ip and self._by_ip.get(session.client_ip, 0) >= self.max_per_client_ip:
            raise SessionLimit(
                f"client {session.client_ip} has reached its limit of {self.max_per_client_ip} consoles"
            )
        to_close: list[Session] = []
        if session.vm:
            current = self._by_vm.get(session.vm, set())
            if current:
                if self.per_vm_policy == "reject":
                    raise SessionLimit(f"VM {session.vm} already has an open console")
                if self.per_vm_policy == "replace":
                    to_close = list(current)
                elif self.max_per_vm and len(current) >= self.max_per_vm:
                    raise SessionLimit(
                        f"VM {session.vm} has reached its limit of {self.max_per_vm} consoles"
                    )
            self._by_vm.setdefault(session.vm, set()).add(session)
        self._sessions[session.id] = session
        self._by_ip[session.client_ip] = self._by_ip.get(session.client_ip, 0) + 1
        return to_close

    def remove(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        if session.vm:
            group = self._by_vm.get(session.vm)
            if group is not None:
                group.discard(session)
                if not group:
                    del self._by_vm[session.vm]
        n = self._by_ip.get(session.client_ip, 0) - 1
        if n > 0:
            self._by_ip[session.client_ip] = n
        else:
            self._by_ip.pop(session.client_ip, None)
