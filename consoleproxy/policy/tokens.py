"""Native console tokens (DESIGN.md section 7; refusals use the close codes of section 8).

A token is a JWE in compact serialization (RFC 7516 section 7.1) with the protected header
``{"alg": "dir", "enc": "A256GCM", "kid": ...}``: the keyring's 256-bit key encrypts a JSON object
of claims directly with AES-256-GCM. ``docs/management-server.md`` describes the profile for
management servers written in other languages.

* :class:`Keyring` -- the ordered keys; the first issues, all validate (rotation).
* :func:`issue` -- mint a token.
* :func:`decode` -- decrypt and check the claims' types only (``consoleproxy token inspect``).
* :class:`TokenValidator` -- :func:`decode` plus expiry, client address binding and single use.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc import jwe
from joserfc.jwk import OctKey

from consoleproxy.atomicfile import write_atomic
from consoleproxy.errors import ConsoleProxyError, Forbidden, TokenAlreadyUsed, TokenExpired, TokenInvalid
from consoleproxy.policy.keyfiles import json_document, load_key_file, short, strict_json
from consoleproxy.policy.replay import ReplayStore
from consoleproxy.protocol.addresses import normalized_ip, same_ip

__all__ = [
    "ALG",
    "ENC",
    "KEY_BYTES",
    "LANG_KEY_RELEASE",
    "MAX_TOKEN_BYTES",
    "Claims",
    "Keyring",
    "KeyringError",
    "TokenValidator",
    "b64url_decode",
    "b64url_encode",
    "decode",
    "issue",
]

ALG = "dir"
ENC = "A256GCM"
KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
# Refuse before any parsing so a hostile URL cannot make the proxy decode megabytes.
MAX_TOKEN_BYTES = 8 * 1024

# Header parameters a token may carry; anything else (notably "zip" and "crit") changes how the
# token must be processed, so it is refused rather than ignored.
_ALLOWED_HEADER = frozenset({"alg", "enc", "kid", "typ", "cty"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_KID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII without spaces: safe in logs and JSON


class KeyringError(ConsoleProxyError):
    """A keyring file or keyring operation is wrong; the message is one line, without key bytes."""


# --- base64url ---------------------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of :func:`b64url_encode`: only the canonical encoding of some bytes.

    Lenient decoders ignore the unused low bits of the last character, so two different strings
    would decode to the same bytes; refusing them means a changed character always changes the
    token's meaning (and so fails authentication).
    """
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if b64url_encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


# --- claims ------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    # bool is an int subclass; a JSON true must not pass as port 1.
    return isinstance(value, int) and not isinstance(value, bool)


_REQUIRED = ("host", "port", "vm", "exp", "iat", "jti")
_OPTIONAL = (
    "password", "name", "client_ip", "view_only", "max_duration", "lang_key_release", "record",
)
LANG_KEY_RELEASE = ("send", "drop")  # values of the claim and of [input] lang_key_release
_KNOWN = frozenset(_REQUIRED + _OPTIONAL)
_MAX_TIME = 2**53  # JavaScript-safe integers; far beyond any real date


@dataclass(frozen=True, repr=False)
class Claims:
    """The decrypted content of a token. ``repr`` masks the password."""

    host: str
    port: int
    vm: str
    exp: int
    iat: int
    jti: str
    password: str | None = None
    name: str | None = None
    client_ip: str | None = None
    view_only: bool = False
    max_duration: int | None = None
    # "send" or "drop": overrides [input] lang_key_release for this console; None = the config's.
    lang_key_release: str | None = None
    # Record this console (true) or not (false) whatever [recording] enabled says; None = config's.
    record: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire form: required claims always, optional ones only when set."""
        d: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "vm": self.vm,
            "exp": self.exp,
            "iat": self.iat,
            "jti": self.jti,
        }
        if self.password is not None:
            d["password"] = self.password
        if self.name is not None:
            d["name"] = self.name
        if self.client_ip is not None:
            d["client_ip"] = self.client_ip
        if self.view_only:
            d["view_only"] = True
        if self.max_duration is not None:
            d["max_duration"] = self.max_duration
        if self.lang_key_release is not None:
            d["lang_key_release"] = self.lang_key_release
        if self.record is not None:
            d["record"] = self.record
        return d

    def masked_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the password replaced by ``"***"``, for display."""
        d = self.to_dict()
        if "password" in d:
            d["password"] = "***"  # noqa: S105 - a mask, not a secret
        return d

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.masked_dict().items())
        return f"Claims({fields})"

    __str__ = __repr__

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Claims:
        """Build claims from decrypted JSON, checking every type; raises :class:`TokenInvalid`.

        Unknown claims are refused: a claim this proxy does not understand may be a restriction
        the issuer relies on, and ignoring it would fail open.
        """
        if not isinstance(d, Mapping):
            raise TokenInvalid("claims are not a JSON object")
        for key in d:
            if key not in _KNOWN:
                raise TokenInvalid(f"unknown claim {short(key)}")
        for key in _REQUIRED:
            if key not in d:
                raise TokenInvalid(f"claim '{key}' is missing")

        host = d["host"]
        if not isinstance(host, str) or not host or len(host) > 255 or not host.isprintable() or (
            any(c.isspace() for c in host)
        ):
            raise TokenInvalid("claim 'host' must be a non-empty host name or address")
        port = d["port"]
        if not (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
            raise TokenInvalid("claim 'port' must be an integer in 1-65535")
        vm = d["vm"]
        if not isinstance(vm, str):
            raise TokenInvalid("claim 'vm' must be a string")
        times: dict[str, int] = {}
        for key in ("exp", "iat"):
            value = d[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_TIME):
                raise TokenInvalid(f"claim '{key}' must be an integer number of seconds since 1970")
            times[key] = value
        if times["exp"] < times["iat"]:
            raise TokenInvalid("claim 'exp' is before 'iat'")
        jti = d["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise TokenInvalid("claim 'jti' must be a non-empty string of at most 256 characters")

        # Optional claims: absent or JSON null mean "not set" (issuers in other languages often
        # serialise unset fields as null).
        password = d.get("password")
        if password is not None and not isinstance(password, str):
            raise TokenInvalid("claim 'password' must be a string")
        name = d.get("name")
        if name is not None and not isinstance(name, str):
            raise TokenInvalid("claim 'name' must be a string")
        client_ip = d.get("client_ip")
        if client_ip is not None:
            if not isinstance(client_ip, str):
                raise TokenInvalid("claim 'client_ip' must be a string")
            if normalized_ip(client_ip) is None:
                raise TokenInvalid("claim 'client_ip' is not an IP address")
        view_only = d.get("view_only")
        if view_only is None:
            view_only = False
        if not isinstance(view_only, bool):
            raise TokenInvalid("claim 'view_only' must be true or false")
        max_duration = d.get("max_duration")
        if max_duration is not None and not (
            isinstance(max_duration, int) and not isinstance(max_duration, bool) and max_duration > 0
        ):
            raise TokenInvalid("claim 'max_duration' must be a positive integer (seconds)")
        lang_key_release = d.get("lang_key_release")
        if lang_key_release is not None and (
            not isinstance(lang_key_release, str) or lang_key_release not in LANG_KEY_RELEASE
        ):
            raise TokenInvalid("claim 'lang_key_release' must be \"send\" or \"drop\"")
        record = d.get("record")
        if record is not None and not isinstance(record, bool):
            raise TokenInvalid("claim 'record' must be true or false")

        return cls(
            host=host,
            port=port,
            vm=vm,
            exp=times["exp"],
            iat=times["iat"],
            jti=jti,
            password=password,
            name=name,
            client_ip=client_ip,
            view_only=view_only,
            max_duration=max_duration,
            lang_key_release=lang_key_release,
            record=record,
        )


# --- keyring -----------------------------------------------------------------------------------


class Keyring:
    """Ordered ``(kid, key)`` pairs: the first key issues, every key validates.

    Immutable: :meth:`rotate` and :meth:`without` return new keyrings, so a validator can swap its
    ``keyring`` attribute on reload without a lock.
    """

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        pairs = tuple(keys)
        if not pairs:
            raise KeyringError("keyring has no keys")
        seen: set[str] = set()
        for kid, key in pairs:
            if not isinstance(kid, str) or not _KID.fullmatch(kid):
                raise KeyringError(f"kid {short(kid)} must be 1-128 printable ASCII characters")
            if kid in seen:
                raise KeyringError(f"duplicate kid {kid!r} in keyring")
            seen.add(kid)
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                size = len(key) if isinstance(key, bytes) else "not"
                raise KeyringError(f"key {kid!r} is {size} bytes, expected {KEY_BYTES}")
        self.keys: tuple[tuple[str, bytes], ...] = pairs
        self._by_kid = dict(pairs)
        self._ciphers: dict[str, AESGCM] = {}

    def __repr__(self) -> str:
        return f"Keyring(kids={self.kids!r})"  # never the key bytes

    def __len__(self) -> int:
        return len(self.keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyring):
            return NotImplemented
        return self.keys == other.keys

    def __hash__(self) -> int:
        return hash(self.keys)

    @property
    def kids(self) -> list[str]:
        return [kid for kid, _ in self.keys]

    @property
    def issuing(self) -> tuple[str, bytes]:
        """The ``(kid, key)`` that new tokens are encrypted with."""
        return self.keys[0]

    def get(self, kid: str) -> bytes | None:
        return self._by_kid.get(kid)

    def cipher(self, kid: str) -> AESGCM | None:
        """The AES-GCM cipher of key ``kid``, made once per keyring (it costs a key schedule)."""
        c = self._ciphers.get(kid)
        if c is None:
            key = self._by_kid.get(kid)
            if key is None:
                return None
            c = self._ciphers[kid] = AESGCM(key)
        return c

    @staticmethod
    def _new_kid(taken: Iterable[str] = ()) -> str:
        taken = set(taken)
        while True:
            kid = secrets.token_hex(4)
            if kid not in taken:
                return kid

    @classmethod
    def generate(cls, count: int = 1) -> Keyring:
        """``count`` fresh random keys with random 8-hex-digit kids."""
        if count < 1:
            raise KeyringError(f"key count must be at least 1, got {count}")
        kids: list[str] = []
        for _ in range(count):
            kids.append(cls._new_kid(kids))
        return cls((kid, secrets.token_bytes(KEY_BYTES)) for kid in kids)

    def rotate(self) -> Keyring:
        """A new keyring whose first (issuing) key is fresh, followed by the current keys."""
        kid = self._new_kid(self.kids)
        return Keyring(((kid, secrets.token_bytes(KEY_BYTES)), *self.keys))

    def without(self, kid: str) -> Keyring:
        """A new keyring without ``kid``; tokens issued with it stop validating."""
        if kid not in self._by_kid:
            raise KeyringError(f"no key with kid {kid!r} in keyring")
        if len(self.keys) == 1:
            raise KeyringError(f"cannot remove {kid!r}: it is the only key")
        return Keyring(pair for pair in self.keys if pair[0] != kid)

    # serialisation

    def dumps(self) -> str:
        doc = {"keys": [{"kid": kid, "k": b64url_encode(key)} for kid, key in self.keys]}
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def loads(cls, text: str) -> Keyring:
        """Parse the keyring file format; every defect raises :class:`KeyringError`."""
        doc = json_document(text, "keyring", KeyringError)
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise KeyringError('keyring has no "keys" list')
        entries = doc["keys"]
        if not entries:
            raise KeyringError('keyring "keys" list is empty')
        pairs: list[tuple[str, bytes]] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or not isinstance(
                entry.get("k"), str
            ):
                raise KeyringError(f'keyring entry {i} is not an object with string "kid" and "k"')
            kid, k = entry["kid"], entry["k"]
            try:
                key = b64url_decode(k)
            except ValueError:
                raise KeyringError(f"key {short(kid)} is not base64url without padding") from None
            pairs.append((kid, key))
        return cls(pairs)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a keyring file. A missing file raises ``FileNotFoundError`` (the CLI explains it)."""
        return load_key_file(path, cls.loads, KeyringError)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically with mode 0600: a temp file in the same directory, then rename.

        The file is created 0600 (never briefly world-readable) and a reader sees either the old
        keyring or the new one, never a partial file.
        """
        write_atomic(path, self.dumps().encode("utf-8"), mode=0o600)


# --- issue and decode --------------------------------------------------------------------------


def issue(
    keyring: Keyring,
    *,
    host: str,
    port: int,
    vm: str = "",
    password: str | None = None,
    name: str | None = None,
    ttl: int = 60,
    client_ip: str | None = None,
    view_only: bool = False,
    max_duration: int | None = None,
    lang_key_release: str | None = None,
    record: bool | None = None,
    now: int | None = None,
) -> str:
    """Mint a token with the keyring's first key. Bad arguments raise ``ValueError``."""
    if not isinstance(host, str) or not host:
        raise ValueError("host must be a non-empty string")
    if not _is_int(port) or not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    if not _is_int(ttl) or ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
    if client_ip is not None:
        if normalized_ip(client_ip) is None:
            raise ValueError(f"client_ip {client_ip!r} is not an IP address")
    if max_duration is not None and (not _is_int(max_duration) or max_duration <= 0):
        raise ValueError(f"max_duration must be a positive number of seconds, got {max_duration}")
    if lang_key_release is not None and lang_key_release not in LANG_KEY_RELEASE:
        raise ValueError(f"lang_key_release must be 'send' or 'drop', got {lang_key_release!r}")
    iat = int(time.time()) if now is None else now
    claims = Claims(
        host=host,
        port=port,
        vm=vm,
        exp=iat + ttl,
        iat=iat,
        jti=secrets.token_urlsafe(16),
        password=password,
        name=name,
        client_ip=client_ip,
        view_only=view_only,
        max_duration=max_duration,
        lang_key_release=lang_key_release,
        record=record,
    )
    try:
        Claims.from_dict(claims.to_dict())  # the same checks decode applies: never mint a dud
    except TokenInvalid as exc:
        raise ValueError(str(exc)) from None
    kid, key = keyring.issuing
    payload = json.dumps(claims.to_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    token = jwe.encrypt_compact(
        {"alg": ALG, "enc": ENC, "kid": kid},
        payload,
        OctKey.import_key(key),
        algorithms=[ALG, ENC],
    )
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"token would be {len(token)} bytes; the limit is {MAX_TOKEN_BYTES}")
    return token


def _parse_header(segment: str) -> dict[str, Any]:
    try:
        header = strict_json(b64url_decode(segment))
    except (ValueError, RecursionError):
        raise TokenInvalid("protected header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise TokenInvalid("protected header is not a JSON object")
    return header


def decode(keyring: Keyring, token: str) -> Claims:
    """Decrypt ``token`` and check its claims' types; no expiry, address or replay checks.

    Every failure is a :class:`TokenInvalid` whose message says what is wrong without quoting
    the token.
    """
    if not isinstance(token, str):
        raise TokenInvalid("not a JWE compact token")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenInvalid(f"token is larger than {MAX_TOKEN_BYTES // 1024} KiB")
    parts = token.split(".")
    if len(parts) != 5 or not all(_B64URL.fullmatch(p) for p in parts):
        raise TokenInvalid("not a JWE compact token")
    header_b64, encrypted_key, iv_b64, ciphertext_b64, tag_b64 = parts

    header = _parse_header(header_b64)
    alg, enc = header.get("alg"), header.get("enc")
    if alg != ALG or enc != ENC:
        raise TokenInvalid(f"unsupported alg/enc {short(alg)}/{short(enc)} (only {ALG}/{ENC})")
    for name in header:
        if name not in _ALLOWED_HEADER:
            raise TokenInvalid(f"unsupported header parameter {short(name)}")
    kid = header.get("kid")
    if kid is None:
        raise TokenInvalid("protected header has no key id (kid)")
    if not isinstance(kid, str):
        raise TokenInvalid("key id (kid) is not a string")
    cipher = keyring.cipher(kid)
    if cipher is None:
        raise TokenInvalid(f"unknown key id {short(kid)}")
    if encrypted_key:
        raise TokenInvalid("encrypted key must be empty with alg dir")
    try:
        iv = b64url_decode(iv_b64)
        ciphertext = b64url_decode(ciphertext_b64)
        tag = b64url_decode(tag_b64)
    except ValueError:
        raise TokenInvalid("not a JWE compact token (bad base64url)") from None
    if len(iv) != IV_BYTES or len(tag) != TAG_BYTES:
        raise TokenInvalid("IV must be 96 bits and tag 128 bits")

    # With alg "dir", no "zip" and no "crit" (all refused above) a JWE is plain AES-GCM whose
    # additional data is the protected header as sent (RFC 7516 5.2 steps 14-15): decrypt it with
    # the key's cached cipher instead of letting joserfc parse the whole token a second time
    # (a third of a console's token cost). joserfc still issues tokens, and the tests open
    # joserfc's tokens here and ours with joserfc.
    try:
        plaintext = cipher.decrypt(iv, ciphertext + tag, header_b64.encode("ascii"))
    except InvalidTag:
        raise TokenInvalid("decryption failed (tampered or wrong key)") from None

    try:
        data = strict_json(plaintext)
    except (ValueError, RecursionError):
        raise TokenInvalid("claims are not JSON") from None
    if not isinstance(data, dict):
        raise TokenInvalid("claims are not a JSON object")
    return Claims.from_dict(data)


# --- validation --------------------------------------------------------------------------------


class TokenValidator:
    """The console path's token check: decrypt, expiry, client address, then single use.

    The order matters: a token refused for expiry or address never reaches the replay store, so a
    refusal does not burn its ``jti``. The replay store's clock must agree with ``clock``.
    ``keyring`` may be replaced at any time (keyring reload); the next validation uses it.
    """

    def __init__(
        self,
        keyring: Keyring,
        replay: ReplayStore,
        *,
        skew_seconds: int = 30,
        single_use: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if skew_seconds < 0:
            raise ValueError(f"skew_seconds must not be negative, got {skew_seconds}")
        self.keyring = keyring
        self.replay = replay
        self.skew_seconds = skew_seconds
        self.single_use = single_use
        self._clock = clock

    async def validate(self, token: str, *, client_ip: str | None = None) -> Claims:
        """Return the claims of an acceptable token or raise a ``TokenError``/``Forbidden``.

        ``client_ip`` is the browser's address; when the token is bound to an address and
        ``client_ip`` is given, they must be equal (an unparseable ``client_ip`` never is).
        """
        claims = decode(self.keyring, token)
        now = self._clock()
        if now > claims.exp + self.skew_seconds:
            raise TokenExpired()
        if claims.iat > now + self.skew_seconds:
            raise TokenInvalid("token issued in the future (check the issuer's clock)")
        if claims.client_ip is not None and client_ip is not None:
            if not same_ip(client_ip, claims.client_ip):
                raise Forbidden("client address does not match the token")
        if self.single_use and not await self.replay.add(claims.jti, claims.exp + self.skew_seconds):
            raise TokenAlreadyUsed()
        return claims
