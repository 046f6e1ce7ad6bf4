"""CloudStack / Mold console tokens: a codec beside the native one (issue 9).

A CloudStack (or Mold) management server builds console URLs itself and encrypts a
``ConsoleProxyClientParam`` JSON object into the ``token`` query parameter. This module decrypts
such tokens with the management server's key material and turns them into the native
:class:`~consoleproxy.policy.tokens.Claims`, so the rest of the proxy does not know where a token came
from.

Facts taken from Apache CloudStack's sources (read, not copied):

* Key material (``ConsoleProxyPasswordBasedEncryptor.KeyIVPair``): the JSON
  ``{"base64EncodedKeyBytes": ..., "base64EncodedIvBytes": ...}``; the management server writes
  URL-safe base64 without padding and reads it with commons-codec, which takes both alphabets.
* 4.18+ cipher (``AeadBase64Encryptor`` over Tink's ``AesGcmJce``): AES-GCM whose key is
  SHA-256 of the key bytes, the IV bytes as associated data, output the standard base64 of
  12-byte nonce || ciphertext || 16-byte tag.
* Older cipher: AES/CBC/PKCS5Padding with the key bytes as key and the IV bytes as IV, output the
  URL-safe base64 of the ciphertext (unauthenticated: only the JSON parse catches tampering).
* A third, authenticated CBC form is accepted when an auth key is configured: URL-safe base64 of
  a random IV || ciphertext || HMAC-SHA256(auth key, IV || ciphertext).
* Ticket (``ConsoleAccessManagerImpl.genAccessTicket``): standard base64 of
  HmacSHA512(``security.hash.key`` as bytes, "host=<h>&port=<p>&sid=<sid>&tag=<tag>&session=<uuid>"
  immediately followed by the decimal minutes since the epoch). ``sid`` is the VM's VNC password
  (the same value as ``clientHostPassword``), ``tag`` the VM uuid (``clientTag``), ``host`` the
  parsed VNC host (``clientHostAddress``) and ``port`` the VNC port as a decimal string. Java
  string concatenation turns a null into ``"null"``; :func:`ticket` does the same for ``None``.

Fields that need a transport this proxy does not implement (``websocketUrl`` for VMware 7+ VNC
over WebSocket, ``hypervHost`` for Hyper-V RDP, ``clientTunnelUrl``/``clientTunnelSession`` for
the XenServer tunnel) make a token invalid rather than being ignored: connecting to
``clientHostAddress`` instead would fail in a confusing way. Other unknown fields are ignored,
because CloudStack adds fields between releases (unlike native tokens, whose unknown claims are
refused).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from consoleproxy.errors import ConsoleProxyError, Forbidden, TokenAlreadyUsed, TokenExpired, TokenInvalid
from consoleproxy.policy.keyfiles import json_document, load_key_file, strict_json
from consoleproxy.policy.replay import ReplayStore
from consoleproxy.policy.tokens import Claims
from consoleproxy.protocol.addresses import parse_ip, same_ip

__all__ = [
    "CLAIMS_TTL",
    "FORMS",
    "MAX_TOKEN_BYTES",
    "REPLAY_TTL",
    "CloudStackKeyError",
    "CloudStackKeys",
    "CloudStackValidator",
    "check_ticket",
    "decrypt",
    "encrypt_cbc",
    "encrypt_cbc_hmac",
    "encrypt_gcm",
    "ticket",
    "to_claims",
]

# CloudStack tokens are larger than native ones (long field names, base64 of JSON); still refuse
# before any decoding so a hostile URL cannot make the proxy chew on megabytes.
MAX_TOKEN_BYTES = 16 * 1024
FORMS: tuple[str, ...] = ("gcm", "cbc", "cbc-hmac")
# CloudStack tokens carry no expiry; the ticket (one or two minutes) gives freshness. The claims'
# exp only bounds how long the proxy treats the decoded token as current.
CLAIMS_TTL = 300
# How long a sessionUuid is remembered as used.
REPLAY_TTL = 600

_GCM_NONCE = 12
_GCM_TAG = 16
_BLOCK = 16
_HMAC_LEN = 32
_AES_KEY_SIZES = (16, 24, 32)
_B64 = re.compile(r"[A-Za-z0-9+/]*")
# Fields naming a transport this proxy does not implement; a token using one is refused.
_UNSUPPORTED = {
    "websocketUrl": "VNC over WebSocket (VMware 7 and later)",
    "hypervHost": "Hyper-V RDP consoles",
    "clientTunnelUrl": "the XenServer console tunnel",
    "clientTunnelSession": "the XenServer console tunnel",
}


class CloudStackKeyError(ConsoleProxyError):
    """The CloudStack key/IV file is wrong; the message is one line, without key bytes."""


def _b64decode(text: str) -> bytes:
    """Base64 in either alphabet, padding optional; only the canonical encoding of some bytes.

    commons-codec (CloudStack's decoder) takes both alphabets and missing padding. Refusing
    non-canonical strings (unused low bits set in the last character) means every changed
    character changes the decoded bytes.
    """
    body = text.translate(str.maketrans("-_", "+/"))
    stripped = body.rstrip("=")
    if not _B64.fullmatch(stripped) or len(stripped) % 4 == 1:
        raise ValueError("not base64")
    if body != stripped and (len(body) - len(stripped) > 2 or len(body) % 4 != 0):
        raise ValueError("bad base64 padding")
    try:
        data = base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if base64.b64encode(data).decode("ascii").rstrip("=") != stripped:
        raise ValueError("not canonical base64")
    return data


def _b64decode_key(text: str) -> bytes:
    """Lenient decoding for the key file (not attacker input): both alphabets, any padding."""
    body = "".join(text.split()).translate(str.maketrans("-_", "+/")).rstrip("=")
    if not _B64.fullmatch(body) or len(body) % 4 == 1:
        raise ValueError("not base64")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


# --- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class CloudStackKeys:
    """The management server's ``security.encryption.key`` / ``security.encryption.iv`` bytes.

    ``auth_key`` enables the authenticated CBC form. ``repr`` never shows key bytes.
    """

    key_bytes: bytes
    iv_bytes: bytes
    auth_key: bytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key_bytes, bytes) or len(self.key_bytes) not in _AES_KEY_SIZES:
            size = len(self.key_bytes) if isinstance(self.key_bytes, bytes) else "not"
            raise CloudStackKeyError(f"encryption key is {size} bytes, expected 16 (or 24 or 32)")
        if not isinstance(self.iv_bytes, bytes) or len(self.iv_bytes) != _BLOCK:
            size = len(self.iv_bytes) if isinstance(self.iv_bytes, bytes) else "not"
            raise CloudStackKeyError(f"encryption IV is {size} bytes, expected 16")
        if self.auth_key is not None and (not isinstance(self.auth_key, bytes) or len(self.auth_key) < 16):
            raise CloudStackKeyError("auth key must be at least 16 bytes")

    def __repr__(self) -> str:
        return f"CloudStackKeys(key={len(self.key_bytes)} bytes, auth_key={self.auth_key is not None})"

    def dumps(self) -> str:
        """The management server's JSON form (URL-safe base64 without padding)."""
        doc = {
            "base64EncodedKeyBytes": base64.urlsafe_b64encode(self.key_bytes).rstrip(b"=").decode("ascii"),
            "base64EncodedIvBytes": base64.urlsafe_b64encode(self.iv_bytes).rstrip(b"=").decode("ascii"),
        }
        return json.dumps(doc) + "\n"

    @classmethod
    def generate(cls, *, auth_key: bool = False) -> CloudStackKeys:
        """Fresh random keys (tests and demos; production keys come from the management server)."""
        return cls(
            secrets.token_bytes(16), secrets.token_bytes(16), secrets.token_bytes(32) if auth_key else None
        )

    @classmethod
    def loads(cls, text: str, *, auth_key: bytes | None = None) -> CloudStackKeys:
        """Parse the key/IV JSON; every defect raises :class:`CloudStackKeyError`."""
        doc = json_document(text, "key file", CloudStackKeyError)
        if not isinstance(doc, dict):
            raise CloudStackKeyError("key file is not a JSON object")
        values: dict[str, bytes] = {}
        for name in ("base64EncodedKeyBytes", "base64EncodedIvBytes"):
            value = doc.get(name)
            if value is None:
                raise CloudStackKeyError(f'key file has no "{name}"')
            if not isinstance(value, str):
                raise CloudStackKeyError(f'"{name}" is not a string')
            try:
                values[name] = _b64decode_key(value)
            except ValueError:
                raise CloudStackKeyError(f'"{name}" is not base64') from None
        return cls(values["base64EncodedKeyBytes"], values["base64EncodedIvBytes"], auth_key)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, auth_key: bytes | None = None) -> CloudStackKeys:
        """Read a key/IV JSON file; unreadable or wrong files raise :class:`CloudStackKeyError`."""
        try:
            return load_key_file(path, lambda text: cls.loads(text, auth_key=auth_key), CloudStackKeyError)
        except FileNotFoundError:
            raise CloudStackKeyError(f"{os.fspath(path)}: no such file") from None


# --- decryption --------------------------------------------------------------------------------


def _parse_json(plaintext: bytes) -> dict[str, Any]:
    """Strict JSON object (UTF-8, no NaN, no duplicate names) or ``ValueError``."""
    data = strict_json(plaintext)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return data


def _cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    if not ciphertext or len(ciphertext) % _BLOCK:
        raise ValueError("ciphertext is not a whole number of AES blocks")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise ValueError("bad padding") from None


def _cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def _try_gcm(keys: CloudStackKeys, raw: bytes) -> bytes:
    if len(raw) < _GCM_NONCE + _GCM_TAG:
        raise ValueError("too short")
    aead = AESGCM(hashlib.sha256(keys.key_bytes).digest())
    try:
        return aead.decrypt(raw[:_GCM_NONCE], raw[_GCM_NONCE:], keys.iv_bytes)
    except InvalidTag:
        raise ValueError("authentication failed") from None


def _try_cbc_hmac(keys: CloudStackKeys, raw: bytes) -> bytes:
    if keys.auth_key is None:
        raise ValueError("no auth key configured")
    if len(raw) < _BLOCK + _BLOCK + _HMAC_LEN:
        raise ValueError("too short")
    body, mac = raw[:-_HMAC_LEN], raw[-_HMAC_LEN:]
    expected = hmac.new(keys.auth_key, body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise ValueError("HMAC mismatch")
    return _cbc_decrypt(keys.key_bytes, body[:_BLOCK], body[_BLOCK:])


def _normalise(token: object) -> str:
    if not isinstance(token, str):
        raise TokenInvalid("CloudStack token is not a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenInvalid(f"CloudStack token is larger than {MAX_TOKEN_BYTES // 1024} KiB")
    if not token:
        raise TokenInvalid("CloudStack token is empty")
    # CloudStack puts the token into the URL unencoded and our server parses the query raw, so
    # "+", "/" and "=" normally arrive as they are. Something in between may still have
    # percent-encoded it (base64 never contains "%") or form-decoded it ("+" became a space).
    if "%" in token:
        try:
            token = urllib.parse.unquote(token, errors="strict")
        except UnicodeDecodeError:
            raise TokenInvalid("CloudStack token is not base64") from None
    return token.replace(" ", "+")


def _check_forms(forms: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(forms)
    if not chosen:
        raise ValueError("at least one CloudStack token form must be enabled")
    for form in chosen:
        if form not in FORMS:
            raise ValueError(f"unknown CloudStack token form {form!r} (known: {', '.join(FORMS)})")
    return chosen


def decrypt(keys: CloudStackKeys, token: str, *, forms: Iterable[str] = FORMS) -> dict[str, Any]:
    """Decrypt a CloudStack console token into its JSON object, trying ``forms`` in order.

    Every failure raises :class:`TokenInvalid` naming what went wrong per form, never quoting the
    token. An unknown form name raises ``ValueError`` (a configuration error, not a bad token).
    """
    chosen = _check_forms(forms)
    text = _normalise(token)
    try:
        raw = _b64decode(text)
    except (ValueError, UnicodeError):
        raise TokenInvalid("CloudStack token is not base64") from None
    reasons: list[str] = []
    for form in chosen:
        try:
            if form == "gcm":
                plaintext = _try_gcm(keys, raw)
            elif form == "cbc":
                plaintext = _cbc_decrypt(keys.key_bytes, keys.iv_bytes, raw)
            else:
                plaintext = _try_cbc_hmac(keys, raw)
        except ValueError as exc:
            reasons.append(f"{form}: {exc}")
            continue
        try:
            return _parse_json(plaintext)
        except (ValueError, UnicodeError):
            if form == "cbc":
                # Unauthenticated: a wrong key or a tampered token usually shows up only here.
                reasons.append(f"{form}: decrypted data is not a JSON object")
                continue
            raise TokenInvalid(f"CloudStack token ({form}) decrypted but is not a JSON object") from None
    raise TokenInvalid("CloudStack token does not decrypt (tampered or wrong key): " + "; ".join(reasons))


def _dump(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(fields), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encrypt_gcm(keys: CloudStackKeys, fields: Mapping[str, Any], *, nonce: bytes | None = None) -> str:
    """FOR TESTS: a 4.18+ token (standard base64 of nonce || ciphertext || tag)."""
    nonce = secrets.token_bytes(_GCM_NONCE) if nonce is None else nonce
    sealed = AESGCM(hashlib.sha256(keys.key_bytes).digest()).encrypt(nonce, _dump(fields), keys.iv_bytes)
    return base64.b64encode(nonce + sealed).decode("ascii")


def encrypt_cbc(keys: CloudStackKeys, fields: Mapping[str, Any]) -> str:
    """FOR TESTS: a pre-4.18 token (URL-safe base64, no padding, of the CBC ciphertext)."""
    data = _cbc_encrypt(keys.key_bytes, keys.iv_bytes, _dump(fields))
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encrypt_cbc_hmac(keys: CloudStackKeys, fields: Mapping[str, Any], *, iv: bytes | None = None) -> str:
    """FOR TESTS: the authenticated CBC form (URL-safe base64 of IV || ciphertext || HMAC)."""
    if keys.auth_key is None:
        raise ValueError("keys have no auth key")
    iv = secrets.token_bytes(_BLOCK) if iv is None else iv
    body = iv + _cbc_encrypt(keys.key_bytes, iv, _dump(fields))
    mac = hmac.new(keys.auth_key, body, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")


# --- fields -> claims --------------------------------------------------------------------------


def _opt_str(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise TokenInvalid(f"CloudStack field '{name}' must be a string")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool):
        port = -1
    elif isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        port = int(value)
    else:
        port = -1
    if not 1 <= port <= 65535:
        raise TokenInvalid("CloudStack field 'clientHostPort' must be a port number in 1-65535")
    return port


def to_claims(
    fields: Mapping[str, Any],
    *,
    now: float,
    token: str | None = None,
    check_source_ip: bool = False,
) -> Claims:
    """Map a decrypted ``ConsoleProxyClientParam`` onto native claims; bad fields -> TokenInvalid.

    ``jti`` is ``sessionUuid``, or (when absent) ``sha256:`` and a hash of ``token`` (or of the
    fields when no token is given). ``client_ip`` is ``sourceIP`` only with ``check_source_ip``.
    """
    if not isinstance(fields, Mapping):
        raise TokenInvalid("CloudStack token is not a JSON object")
    for field, what in _UNSUPPORTED.items():
        if fields.get(field) not in (None, ""):
            raise TokenInvalid(f"CloudStack field '{field}' is set: {what} is not supported")

    host = fields.get("clientHostAddress")
    if host is None:
        raise TokenInvalid("CloudStack field 'clientHostAddress' is missing")
    if (
        not isinstance(host, str)
        or not host
        or len(host) > 255
        or not host.isprintable()
        or any(c.isspace() for c in host)
    ):
        raise TokenInvalid("CloudStack field 'clientHostAddress' must be a host name or address")
    if "clientHostPort" not in fields:
        raise TokenInvalid("CloudStack field 'clientHostPort' is missing")
    port = _port(fields["clientHostPort"])
    tag = fields.get("clientTag")
    if tag is None:
        raise TokenInvalid("CloudStack field 'clientTag' is missing")
    if not isinstance(tag, str):
        raise TokenInvalid("CloudStack field 'clientTag' must be a string")
    password = _opt_str(fields, "clientHostPassword")
    display_name = _opt_str(fields, "clientDisplayName")
    for other in ("ticket", "extraSecurityToken", "locale"):
        _opt_str(fields, other)

    session = _opt_str(fields, "sessionUuid")
    if session is not None:
        if not session or len(session) > 256:
            raise TokenInvalid("CloudStack field 'sessionUuid' must be 1-256 characters")
        jti = session
    else:
        source = token.encode("utf-8") if token is not None else _dump(fields)
        jti = "sha256:" + hashlib.sha256(source).hexdigest()

    client_ip: str | None = None
    source_ip = _opt_str(fields, "sourceIP")
    if check_source_ip and source_ip:
        try:
            client_ip = str(parse_ip(source_ip.strip()))
        except ValueError:
            raise TokenInvalid("CloudStack field 'sourceIP' is not an IP address") from None

    if not isinstance(now, int | float) or isinstance(now, bool) or now != now:
        raise ValueError("now must be a number of seconds")
    iat = int(now)
    return Claims(
        host=host,
        port=port,
        vm=tag,
        exp=iat + CLAIMS_TTL,
        iat=iat,
        jti=jti,
        password=password,
        name=display_name,
        client_ip=client_ip,
    )


# --- ticket ------------------------------------------------------------------------------------


def _java_str(value: object) -> str:
    """String concatenation as Java does it: null becomes "null"."""
    return "null" if value is None else str(value)


def ticket(
    hash_key: str,
    host: str | None,
    port: int | str | None,
    sid: str | None,
    tag: str | None,
    session_uuid: str | None,
    minute: int,
) -> str:
    """CloudStack's console access ticket for ``minute`` (minutes since the epoch).

    ``sid`` is the VM's VNC password (``clientHostPassword`` in the token), ``tag`` the VM uuid.
    """
    params = (
        f"host={_java_str(host)}&port={_java_str(port)}&sid={_java_str(sid)}"
        f"&tag={_java_str(tag)}&session={_java_str(session_uuid)}"
    )
    mac = hmac.new(hash_key.encode("utf-8"), params.encode("utf-8") + str(minute).encode("ascii"), "sha512")
    return base64.b64encode(mac.digest()).decode("ascii")


def check_ticket(
    hash_key: str,
    value: str,
    *,
    host: str | None,
    port: int | str | None,
    sid: str | None,
    tag: str | None,
    session_uuid: str | None,
    now: float,
) -> None:
    """Accept a ticket made in the current or the previous minute; otherwise TokenExpired.

    A ticket made with another hash key cannot be told from an old one; the message says both.
    """
    minute = int(now // 60)
    given = value.encode("utf-8")
    ok = False
    for m in (minute, minute - 1):
        expected = ticket(hash_key, host, port, sid, tag, session_uuid, m).encode("ascii")
        ok |= hmac.compare_digest(given, expected)
    if not ok:
        raise TokenExpired(
            "CloudStack console ticket is stale (older than the previous minute) "
            "or was made with another hash key"
        )


# --- validation --------------------------------------------------------------------------------


class CloudStackValidator:
    """The console path's check of a CloudStack token, shaped like ``TokenValidator``.

    Order: decrypt, map the fields, source IP, extra security token, ticket, then single use, so a
    refused token never burns its ``sessionUuid``. ``keys`` may be replaced at any time.
    """

    def __init__(
        self,
        keys: CloudStackKeys,
        replay: ReplayStore,
        *,
        hash_key: str = "",
        check_source_ip: bool = False,
        check_extra: bool = False,
        forms: Iterable[str] = FORMS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.replay = replay
        self.hash_key = hash_key
        self.check_source_ip = check_source_ip
        self.check_extra = check_extra
        self.forms = _check_forms(forms)
        self._clock = clock

    async def validate(self, token: str, *, client_ip: str | None, extra: str | None) -> Claims:
        """Return the claims of an acceptable token or raise a ``TokenError``/``Forbidden``.

        ``client_ip`` is the browser's address, ``extra`` the ``extra`` query parameter.
        """
        fields = decrypt(self.keys, token, forms=self.forms)
        now = self._clock()
        claims = to_claims(fields, now=now, token=token, check_source_ip=self.check_source_ip)

        if self.check_source_ip and claims.client_ip is not None:
            if client_ip is None or not same_ip(client_ip, claims.client_ip):
                raise Forbidden("source IP does not match")

        expected_extra = fields.get("extraSecurityToken")
        if self.check_extra and expected_extra:
            given = (extra or "").encode("utf-8")
            if not extra or not hmac.compare_digest(given, str(expected_extra).encode("utf-8")):
                raise Forbidden("extra security token does not match")

        value = fields.get("ticket")
        if self.hash_key and value:
            check_ticket(
                self.hash_key,
                str(value),
                host=claims.host,
                port=claims.port,
                sid=claims.password,
                tag=claims.vm,
                session_uuid=fields.get("sessionUuid"),
                now=now,
            )

        if not await self.replay.add(f"cs:{claims.jti}", now + REPLAY_TTL):
            raise TokenAlreadyUsed()
        return claims
