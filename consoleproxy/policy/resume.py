"""Resume tickets: a console that lost its WebSocket comes back without a new token (DESIGN 10).

A ticket is the proxy's own credential, never a token: ``cpr1.<kid>.<iv>.<ciphertext+tag>``
(base64url, four dot-separated parts where a JWE has five), AES-256-GCM with a key derived from
the keyring key ``kid`` by HKDF-SHA256 with a label of its own, and the part label as associated
data. A token cannot be opened as a ticket nor a ticket as a token: different key, different
associated data, different shape.

A ticket has two layers, so that a running console keeps no VNC password in memory:

* the **body** (:class:`TicketBody`, sealed once per connection by :func:`seal_body`): the target
  and password, the VM, the options, the original token's client address binding, the console's
  first start (lifetime counts from it), the resume chain id ``sid`` and its generation ``gen``;
* the **ticket** (:func:`issue_ticket`): the sealed body plus an expiry ``exp``. The proxy sends
  a fresh one every third of the window, so a ticket in the page is never older than that.

Single use (:func:`used_key`): one key a generation, ``resume:<sid>:<gen>``, goes into the
shared replay store when a resume has reached the VNC server (before any RFB to the page), and
when a console ends in a way that must not come back (administrator, replaced, idle, lifetime,
the VNC server closed). Every ticket a connection
was given shares its generation, so refreshed tickets do not add chances: a generation resumes
once, on any instance.

Delivery (the asyncio glue in ``net/console.py``): a page that asks with ``&resume=1`` gets each ticket
as a WebSocket *text* message on the console's own connection, after the RFB handshake. noVNC
reads only binary messages (a text message is an empty byte array to it: ignored), our page
reads the text ones. To resume, the page opens ``/websockify?resume=1&after=<close code>`` and
sends the ticket's ASCII bytes as its first message (binary, as everything the proxy reads from
a browser: its frame parser refuses text). So a ticket never appears in a URL
(access logs, proxies, history), never in a cookie, and is held in the page's memory only. It
needs no extra endpoint that a load balancer could send to another instance.

Everything here is pure: values in, a value or a :class:`~consoleproxy.errors.ResumeRefused`
out (close code 4005, with a reason that says which rule refused it, never the ticket).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consoleproxy.errors import ResumeRefused
from consoleproxy.policy.tokens import LANG_KEY_RELEASE, Keyring, b64url_decode, b64url_encode
from consoleproxy.protocol.addresses import same_ip

__all__ = [
    "MAX_TICKET_BYTES",
    "TicketBody",
    "issue_ticket",
    "new_resume_id",
    "open_ticket",
    "seal_body",
    "used_key",
]

PREFIX = "cpr1"
# Far above a real ticket (~400 characters with a long VM name and password); checked before
# anything is decoded, so a hostile first message costs nothing.
MAX_TICKET_BYTES = 4096
_IV = 12
_LABEL_BODY = b"consoleproxy resume body v1"
_LABEL_TICKET = b"consoleproxy resume ticket v1"
_MAX_TIME = 2**53


def new_resume_id() -> str:
    """A console's resume chain id (128 random bits)."""
    return secrets.token_urlsafe(16)


def used_key(sid: str, gen: int) -> str:
    """The replay store key that marks generation ``gen`` of chain ``sid`` as used."""
    return f"resume:{sid}:{gen}"


@dataclass(frozen=True, repr=False)
class TicketBody:
    """What a resume needs to open the console again. ``repr`` masks the password."""

    sid: str
    gen: int
    host: str
    port: int
    vm: str
    started: int  # Unix time of the console's first start: lifetime and max_duration count from it
    password: str | None = None
    name: str | None = None
    client_ip: str | None = None  # the original token's binding; None = any address
    view_only: bool = False
    max_duration: int | None = None
    lang_key_release: str | None = None
    session_uuid: str | None = None  # CloudStack's sessionUuid: its load report keeps the console's
    record: bool | None = None  # the token's ``record`` claim: a resumed console is recorded as before

    def __repr__(self) -> str:
        return f"TicketBody(sid={self.sid!r}, gen={self.gen}, vm={self.vm!r}, target={self.host}:{self.port})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "sid": self.sid, "gen": self.gen, "host": self.host, "port": self.port,
            "vm": self.vm, "started": self.started,
        }
        for key in ("password", "name", "client_ip", "max_duration", "lang_key_release", "session_uuid"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        if self.view_only:
            d["view_only"] = True
        if self.record is not None:
            d["record"] = self.record
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TicketBody:
        """Check every field's type (the body was sealed by us, but a key can leak)."""
        known = {"sid", "gen", "host", "port", "vm", "started", "password", "name", "client_ip",
                 "view_only", "max_duration", "lang_key_release", "session_uuid", "record"}
        if set(d) - known or not {"sid", "gen", "host", "port", "vm", "started"} <= set(d):
            raise ResumeRefused("resume ticket invalid")
        sid, gen, host, port, vm, started = (d[k] for k in ("sid", "gen", "host", "port", "vm", "started"))
        ok = (
            isinstance(sid, str) and 0 < len(sid) <= 64
            and _nat(gen) and isinstance(host, str) and 0 < len(host) <= 255
            and _nat(port) and 1 <= port <= 65535 and isinstance(vm, str) and _nat(started)
            and all(d.get(k) is None or isinstance(d[k], str)
                    for k in ("password", "name", "client_ip", "session_uuid"))
            and isinstance(d.get("view_only", False), bool)
            and (d.get("max_duration") is None or (_nat(d["max_duration"]) and d["max_duration"] > 0))
            and d.get("lang_key_release") in (None, *LANG_KEY_RELEASE)
            and (d.get("record") is None or isinstance(d["record"], bool))
        )
        if ok and d.get("client_ip") is not None:
            try:
                ipaddress.ip_address(d["client_ip"])
            except ValueError:
                ok = False
        if not ok:
            raise ResumeRefused("resume ticket invalid")
        return cls(
            sid=sid, gen=gen, host=host, port=port, vm=vm, started=started,
            password=d.get("password"), name=d.get("name"), client_ip=d.get("client_ip"),
            view_only=d.get("view_only", False), max_duration=d.get("max_duration"),
            lang_key_release=d.get("lang_key_release"), session_uuid=d.get("session_uuid"),
            record=d.get("record"),
        )


def _nat(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_TIME


@functools.lru_cache(maxsize=32)
def _cipher(key: bytes, label: bytes) -> AESGCM:
    """The ticket key of one keyring key: HKDF keeps it apart from the token key it comes from."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)
    return AESGCM(derived)


def _seal(keyring: Keyring, label: bytes, plaintext: bytes) -> str:
    kid, key = keyring.issuing
    kid_b64 = b64url_encode(kid.encode("ascii"))
    iv = os.urandom(_IV)
    head = f"{PREFIX}.{kid_b64}"
    ct = _cipher(key, label).encrypt(iv, plaintext, head.encode("ascii") + b"." + label)
    return f"{head}.{b64url_encode(iv)}.{b64url_encode(ct)}"


def _open(keyring: Keyring, label: bytes, text: str) -> bytes:
    bad = ResumeRefused("resume ticket invalid")
    if not isinstance(text, str) or len(text) > MAX_TICKET_BYTES:
        raise bad
    parts = text.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise bad
    try:
        kid = b64url_decode(parts[1]).decode("ascii")
        iv = b64url_decode(parts[2])
        ct = b64url_decode(parts[3])
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    key = keyring.get(kid)
    if key is None or len(iv) != _IV or len(ct) < 16:
        raise bad
    head = f"{PREFIX}.{parts[1]}".encode("ascii")
    try:
        return _cipher(key, label).decrypt(iv, ct, head + b"." + label)
    except InvalidTag:
        raise bad from None


def _json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise ResumeRefused("resume ticket invalid") from None


def seal_body(keyring: Keyring, body: TicketBody) -> str:
    """The inner layer, sealed once per connection; a running console keeps only this string."""
    return _seal(keyring, _LABEL_BODY, json.dumps(body.to_dict(), separators=(",", ":")).encode())


def issue_ticket(keyring: Keyring, sealed_body: str, *, exp: int) -> str:
    """A ticket for ``sealed_body`` that resumes until Unix time ``exp``."""
    doc = {"exp": exp, "body": sealed_body}
    return _seal(keyring, _LABEL_TICKET, json.dumps(doc, separators=(",", ":")).encode())


def open_ticket(keyring: Keyring, text: str, *, now: float, client_ip: str) -> TicketBody:
    """The body of an acceptable ticket, or :class:`ResumeRefused` naming the rule it broke.

    Checks, in order: authenticity (either layer), the window (``exp``), then the original
    token's address binding against ``client_ip``. Single use is the caller's (the shared store).
    """
    doc = _json(_open(keyring, _LABEL_TICKET, text))
    if not isinstance(doc, dict) or set(doc) != {"exp", "body"} or not _nat(doc["exp"]) or (
        not isinstance(doc["body"], str)
    ):
        raise ResumeRefused("resume ticket invalid")
    if now > doc["exp"]:
        raise ResumeRefused("resume ticket expired: the resume window is over")
    inner = _json(_open(keyring, _LABEL_BODY, doc["body"]))
    if not isinstance(inner, dict):
        raise ResumeRefused("resume ticket invalid")
    body = TicketBody.from_dict(inner)
    if body.client_ip is not None and not same_ip(body.client_ip, client_ip):
        raise ResumeRefused("resume not allowed from this address")
    return body


