"""Native tokens (DESIGN.md 7): JWE dir/A256GCM round trip, tamper, expiry, single use, keyrings.

Clocks are injected; nothing sleeps and nothing opens a socket.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import stat
import string
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from consoleproxy.errors import (
    ConsoleError,
    Forbidden,
    TokenAlreadyUsed,
    TokenExpired,
    TokenInvalid,
)
from consoleproxy.policy.replay import MemoryReplayStore, ReplayStoreFull
from consoleproxy.policy.tokens import (
    MAX_TOKEN_BYTES,
    Claims,
    Keyring,
    KeyringError,
    TokenValidator,
    b64url_decode,
    decode,
    issue,
)

B64URL = string.ascii_letters + string.digits + "-_"
NOW = 1_700_000_000
VECTORS = Path(__file__).parents[1] / "vectors" / "tokens.json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def craft(
    key: bytes,
    header: dict[str, Any],
    payload: bytes,
    *,
    iv: bytes | None = None,
    encrypted_key: str = "",
) -> str:
    """The language-neutral construction of docs/management-server.md, with plain AES-GCM."""
    protected = b64url(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    iv = secrets.token_bytes(12) if iv is None else iv
    sealed = AESGCM(key).encrypt(iv, payload, protected.encode("ascii"))  # AAD: the header as sent
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return ".".join([protected, encrypted_key, b64url(iv), b64url(ciphertext), b64url(tag)])


def claims_json(**over: Any) -> bytes:
    d: dict[str, Any] = {"host": "10.0.0.5", "port": 5901, "vm": "vm-1", "exp": NOW + 60, "iat": NOW,
                         "jti": "j1"}
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def validator(ring: Keyring, clock: Clock, **kw: Any) -> TokenValidator:
    # the store shares the validator's clock, as in production (both time.time)
    return TokenValidator(ring, MemoryReplayStore(clock=clock), clock=clock, **kw)


@pytest.fixture
def ring() -> Keyring:
    return Keyring.generate()


# --- round trip --------------------------------------------------------------------------------


def test_round_trip_exact_claims(ring: Keyring) -> None:
    token = issue(ring, host="10.0.0.5", port=5901, vm="vm-7", password="pw", name="web 01", ttl=90,
                  client_ip="203.0.113.7", view_only=True, max_duration=600, now=NOW)
    claims = decode(ring, token)
    assert claims == Claims(host="10.0.0.5", port=5901, vm="vm-7", exp=NOW + 90, iat=NOW, jti=claims.jti,
                            password="pw", name="web 01", client_ip="203.0.113.7", view_only=True,
                            max_duration=600)
    assert len(claims.jti) >= 22  # 128 random bits


def test_round_trip_minimal_omits_unset_fields(ring: Keyring) -> None:
    claims = decode(ring, issue(ring, host="h.example", port=5900, now=NOW))
    assert claims.to_dict() == {"host": "h.example", "port": 5900, "vm": "", "exp": NOW + 60, "iat": NOW,
                                "jti": claims.jti}
    assert Claims.from_dict(claims.to_dict()) == claims


def test_header_is_dir_a256gcm_with_issuing_kid(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1)
    assert token.startswith("ey")
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "dir", "enc": "A256GCM", "kid": ring.keys[0][0]}
    parts = token.split(".")
    assert parts[1] == "" and len(base64.urlsafe_b64decode(parts[2] + "==")) == 12


def test_jti_unique(ring: Keyring) -> None:
    assert len({decode(ring, issue(ring, host="h", port=1)).jti for _ in range(50)}) == 50


def test_repr_and_str_mask_password(ring: Keyring) -> None:
    claims = decode(ring, issue(ring, host="h", port=1, password="hunter2"))
    assert "hunter2" not in repr(claims) and "hunter2" not in str(claims) and "***" in repr(claims)
    assert claims.masked_dict()["password"] == "***"
    assert claims.password == "hunter2"
    assert "password" not in decode(ring, issue(ring, host="h", port=1)).masked_dict()


def test_keyring_repr_hides_keys(ring: Keyring) -> None:
    assert b64url(ring.keys[0][1]) not in repr(ring) and ring.keys[0][0] in repr(ring)


# --- tampering ---------------------------------------------------------------------------------


async def test_flipping_any_single_character_is_invalid(ring: Keyring) -> None:
    token = issue(ring, host="10.0.0.5", port=5901, vm="vm-1", password="pw", now=NOW)
    v = validator(ring, Clock(NOW), single_use=False)
    assert (await v.validate(token)).host == "10.0.0.5"
    tried = 0
    for i, original in enumerate(token):
        # every other base64url character, including the ones that differ only in the unused low
        # bits of a segment's last character (a lenient base64 decoder maps those to the same bytes)
        for c in B64URL:
            if c == original:
                continue
            flipped = token[:i] + c + token[i + 1:]
            with pytest.raises(TokenInvalid) as bad:
                await v.validate(flipped)
            assert bad.value.close_code == 4001, (i, c)
            tried += 1
    assert tried == len(token) * 64 - sum(ch in B64URL for ch in token)


def test_wrong_key_same_kid_fails_decryption(ring: Keyring) -> None:
    kid = ring.keys[0][0]
    other = Keyring([(kid, secrets.token_bytes(32))])
    with pytest.raises(TokenInvalid, match=r"decryption failed \(tampered or wrong key\)"):
        decode(other, issue(ring, host="h", port=1))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"alg": "A256KW", "enc": "A256GCM"}, "unsupported alg/enc"),
        ({"alg": "RSA-OAEP", "enc": "A256GCM"}, "unsupported alg/enc"),
        ({"alg": "none", "enc": "A256GCM"}, "unsupported alg/enc"),
        ({"enc": "A256GCM"}, "unsupported alg/enc"),
        ({"alg": "dir", "enc": "A128GCM"}, "unsupported alg/enc"),
        ({"alg": "dir", "enc": "A256CBC-HS512"}, "unsupported alg/enc"),
        ({"alg": "dir"}, "unsupported alg/enc"),
        ({"alg": "dir", "enc": "A256GCM", "zip": "DEF"}, "unsupported header parameter 'zip'"),
        ({"alg": "dir", "enc": "A256GCM", "crit": ["exp"]}, "unsupported header parameter 'crit'"),
        ({"alg": "dir", "enc": "A256GCM", "kid": None}, "no key id"),
        ({"alg": "dir", "enc": "A256GCM", "kid": 7}, "kid) is not a string"),
        ({"alg": "dir", "enc": "A256GCM", "kid": "nope"}, "unknown key id 'nope'"),
    ],
)
def test_crafted_headers_rejected(ring: Keyring, header: dict[str, Any], message: str) -> None:
    kid, key = ring.keys[0]
    header = {"kid": kid, **header}
    if header["kid"] is None:
        del header["kid"]
    # correctly encrypted and authenticated under this header: only the explicit checks refuse it
    token = craft(key, header, claims_json())
    with pytest.raises(TokenInvalid, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(ring, token)


def test_crafted_token_with_allowed_header_is_accepted(ring: Keyring) -> None:
    kid, key = ring.keys[0]
    token = craft(key, {"alg": "dir", "enc": "A256GCM", "kid": kid, "typ": "JWT"}, claims_json())
    assert decode(ring, token).jti == "j1"


def test_encrypted_key_must_be_empty(ring: Keyring) -> None:
    kid, key = ring.keys[0]
    token = craft(key, {"alg": "dir", "enc": "A256GCM", "kid": kid}, claims_json(), encrypted_key="AAAA")
    with pytest.raises(TokenInvalid, match="encrypted key must be empty"):
        decode(ring, token)


def test_iv_must_be_96_bits(ring: Keyring) -> None:
    kid, key = ring.keys[0]
    token = craft(key, {"alg": "dir", "enc": "A256GCM", "kid": kid}, claims_json(), iv=bytes(16))
    with pytest.raises(TokenInvalid, match="IV must be 96 bits"):
        decode(ring, token)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "claims are not JSON"),
        (b"\xff\xfe", "claims are not JSON"),
        (b'{"port": NaN}', "claims are not JSON"),
        (b'{"jti": "a", "jti": "b"}', "claims are not JSON"),
        (b"[1, 2]", "claims are not a JSON object"),
        (claims_json(port="5901"), "claim 'port'"),
        (claims_json(port=True), "claim 'port'"),
        (claims_json(port=0), "claim 'port'"),
        (claims_json(port=65536), "claim 'port'"),
        (claims_json(host=""), "claim 'host'"),
        (claims_json(host="a b"), "claim 'host'"),
        (claims_json(host=5), "claim 'host'"),
        (claims_json(vm=None), "claim 'vm'"),
        (claims_json(vm=...), "claim 'vm' is missing"),
        (claims_json(exp="1"), "claim 'exp'"),
        (claims_json(exp=1.5), "claim 'exp'"),
        (claims_json(exp=False), "claim 'exp'"),
        (claims_json(iat=-1), "claim 'iat'"),
        (claims_json(exp=NOW - 1), "claim 'exp' is before 'iat'"),
        (claims_json(jti=""), "claim 'jti'"),
        (claims_json(jti=...), "claim 'jti' is missing"),
        (claims_json(password=1), "claim 'password'"),
        (claims_json(name=["x"]), "claim 'name'"),
        (claims_json(client_ip="nope"), "claim 'client_ip'"),
        (claims_json(view_only="yes"), "claim 'view_only'"),
        (claims_json(view_only=1), "claim 'view_only'"),
        (claims_json(max_duration=0), "claim 'max_duration'"),
        (claims_json(max_duration=True), "claim 'max_duration'"),
        (claims_json(lang_key_release="Drop"), "claim 'lang_key_release' must be \"send\" or \"drop\""),
        (claims_json(lang_key_release=True), "claim 'lang_key_release'"),
        (claims_json(lang_key_release=["drop"]), "claim 'lang_key_release'"),
        (claims_json(nbf=NOW), "unknown claim 'nbf'"),
    ],
)
def test_bad_claims_rejected(ring: Keyring, payload: bytes, message: str) -> None:
    kid, key = ring.keys[0]
    with pytest.raises(TokenInvalid, match=message):
        decode(ring, craft(key, {"alg": "dir", "enc": "A256GCM", "kid": kid}, payload))


def test_null_optional_claims_mean_unset(ring: Keyring) -> None:
    kid, key = ring.keys[0]
    payload = claims_json(password=None, name=None, client_ip=None, view_only=None, max_duration=None)
    claims = decode(ring, craft(key, {"alg": "dir", "enc": "A256GCM", "kid": kid}, payload))
    assert (claims.password, claims.name, claims.client_ip, claims.view_only, claims.max_duration) == (
        None, None, None, False, None)


@pytest.mark.parametrize("value", ["send", "drop", None])
def test_lang_key_release_claim_round_trips(ring: Keyring, value: str | None) -> None:
    claims = decode(ring, issue(ring, host="h", port=5900, lang_key_release=value, now=NOW))
    assert claims.lang_key_release == value
    assert ("lang_key_release" in claims.to_dict()) is (value is not None)
    kid, key = ring.keys[0]
    payload = claims_json(lang_key_release=value)
    crafted = craft(key, {"alg": "dir", "enc": "A256GCM", "kid": kid}, payload)
    assert decode(ring, crafted).lang_key_release == value


def _token_of_length(ring: Keyring, target: int) -> str | None:
    kid, key = ring.keys[0]
    header = {"alg": "dir", "enc": "A256GCM", "kid": kid}
    for n in range(target * 3 // 4 - 400, target * 3 // 4):
        token = craft(key, header, claims_json(name="x" * n))
        if len(token) == target:
            return token
    return None


def test_oversize_rejected_before_parsing(ring: Keyring) -> None:
    at_limit = _token_of_length(ring, MAX_TOKEN_BYTES)
    assert at_limit is not None
    assert decode(ring, at_limit).name is not None  # 8 KiB exactly is fine
    over = _token_of_length(ring, MAX_TOKEN_BYTES + 2)
    assert over is not None
    with pytest.raises(TokenInvalid, match="larger than 8 KiB"):
        decode(ring, over)  # authentic, but too big
    with pytest.raises(TokenInvalid, match="larger than 8 KiB"):
        decode(ring, "A" * 10_000_000)


def test_issue_refuses_oversize(ring: Keyring) -> None:
    with pytest.raises(ValueError, match="limit is 8192"):
        issue(ring, host="h", port=1, name="x" * 8000)


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "a.b.c.d.e.f", "....", "ey.x.y.z.w", "eyJhbGciOiJkaXIifQ....", " . . . . ",
     "e\u00e9.a.b.c.d", "eyJ!.a.b.c.d"],
)
def test_garbage_is_invalid(ring: Keyring, token: str) -> None:
    with pytest.raises(TokenInvalid):
        decode(ring, token)


def test_non_string_token_is_invalid(ring: Keyring) -> None:
    with pytest.raises(TokenInvalid, match="not a JWE compact token"):
        decode(ring, b"abc")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_random_text_only_raises_token_invalid(text: str) -> None:
    ring = Keyring([("k1", bytes(32))])
    with pytest.raises(TokenInvalid):
        decode(ring, text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=B64URL, max_size=60), min_size=5, max_size=5))
def test_random_jwe_shaped_text_only_raises_token_invalid(parts: list[str]) -> None:
    ring = Keyring([("k1", bytes(32))])
    parts[0] = b64url(b'{"alg":"dir","enc":"A256GCM","kid":"k1"}') if parts[0].startswith("A") else parts[0]
    with pytest.raises(TokenInvalid):
        decode(ring, ".".join(parts))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["alg", "enc", "kid", "zip", "typ", "x"]), json_values),
       st.dictionaries(st.sampled_from(["host", "port", "vm", "exp", "iat", "jti", "password", "name",
                                        "client_ip", "view_only", "max_duration", "lang_key_release",
                                        "y"]), json_values))
def test_random_authentic_headers_and_claims_only_raise_token_invalid(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    key = bytes(32)
    ring = Keyring([("k1", key)])
    try:
        claims_out = decode(ring, craft(key, header, json.dumps(claims).encode()))
    except TokenInvalid:
        return
    assert Claims.from_dict(claims) == claims_out  # accepted only if it really is a valid set


# --- validation: expiry, future iat, single use, client address --------------------------------


async def test_expired_after_ttl_plus_skew_and_not_before(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1, ttl=60, now=NOW)
    edge = validator(ring, Clock(NOW + 60 + 30), skew_seconds=30)
    assert (await edge.validate(token)).exp == NOW + 60  # exactly at exp + skew: still valid
    late = validator(ring, Clock(NOW + 60 + 30 + 0.001), skew_seconds=30)
    with pytest.raises(TokenExpired) as expired:
        await late.validate(token)
    assert expired.value.close_code == 4002


async def test_skew_zero_expires_right_after_exp(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1, ttl=60, now=NOW)
    assert await validator(ring, Clock(NOW + 60), skew_seconds=0).validate(token)
    with pytest.raises(TokenExpired):
        await validator(ring, Clock(NOW + 61), skew_seconds=0).validate(token)


async def test_issued_in_the_future_is_invalid(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1, ttl=600, now=NOW)
    assert await validator(ring, Clock(NOW - 30), skew_seconds=30).validate(token)
    with pytest.raises(TokenInvalid, match="issued in the future") as bad:
        await validator(ring, Clock(NOW - 31), skew_seconds=30).validate(token)
    assert bad.value.close_code == 4001


async def test_second_validation_is_already_used(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1, now=NOW)
    clock = Clock(NOW)
    v = validator(ring, clock)
    await v.validate(token)
    with pytest.raises(TokenAlreadyUsed) as used:
        await v.validate(token)
    assert used.value.close_code == 4003
    # still refused right up to the last instant it would otherwise be accepted
    clock.now = NOW + 60 + 30
    with pytest.raises(TokenAlreadyUsed):
        await v.validate(token)


async def test_single_use_off_allows_reuse(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1, now=NOW)
    v = validator(ring, Clock(NOW), single_use=False)
    await v.validate(token)
    await v.validate(token)


class SpyStore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    async def add(self, key: str, expires_at: float) -> bool:
        self.calls.append((key, expires_at))
        return True

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def test_replay_store_gets_jti_until_exp_plus_skew(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1, ttl=60, now=NOW)
    spy = SpyStore()
    claims = await TokenValidator(ring, spy, skew_seconds=30, clock=lambda: NOW).validate(token)
    assert spy.calls == [(claims.jti, NOW + 90)]


async def test_refused_token_does_not_burn_its_jti(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1, ttl=60, client_ip="203.0.113.7", now=NOW)
    clock = Clock(NOW + 1000)
    spy = SpyStore()
    v = TokenValidator(ring, spy, clock=clock)
    with pytest.raises(TokenExpired):
        await v.validate(token, client_ip="203.0.113.7")
    clock.now = NOW
    with pytest.raises(Forbidden):
        await v.validate(token, client_ip="198.51.100.1")
    assert spy.calls == []  # neither refusal reached the store
    await v.validate(token, client_ip="203.0.113.7")
    assert len(spy.calls) == 1


async def test_full_replay_store_refuses_with_close_code(ring: Keyring) -> None:
    clock = Clock(NOW)
    v = TokenValidator(ring, MemoryReplayStore(max_entries=1, clock=clock), clock=clock)
    await v.validate(issue(ring, host="h", port=1, now=NOW))
    with pytest.raises(ReplayStoreFull) as full:
        await v.validate(issue(ring, host="h", port=1, now=NOW))
    assert isinstance(full.value, ConsoleError) and full.value.close_code == 4008


@pytest.mark.parametrize(
    ("bound", "peer", "ok"),
    [
        ("203.0.113.7", "203.0.113.7", True),
        ("203.0.113.7", "::ffff:203.0.113.7", True),  # dual-stack socket form of the same peer
        ("2001:db8::1", "2001:0db8:0:0::1", True),  # same address, different spelling
        ("203.0.113.7", "203.0.113.8", False),
        ("2001:db8::1", "2001:db8::2", False),
        ("203.0.113.7", "unknown", False),  # what the server reports without a peer address
        ("203.0.113.7", "", False),
    ],
)
async def test_client_ip_binding(ring: Keyring, bound: str, peer: str, ok: bool) -> None:
    token = issue(ring, host="h", port=1, client_ip=bound, now=NOW)
    v = validator(ring, Clock(NOW))
    if ok:
        assert (await v.validate(token, client_ip=peer)).client_ip == bound
    else:
        with pytest.raises(Forbidden, match="client address does not match the token") as no:
            await v.validate(token, client_ip=peer)
        assert no.value.close_code == 4004


async def test_unbound_token_accepts_any_client(ring: Keyring) -> None:
    token = issue(ring, host="h", port=1, now=NOW)
    assert await validator(ring, Clock(NOW)).validate(token, client_ip="198.51.100.9")


# --- keyrings: rotation and removal ------------------------------------------------------------


async def test_rotation_old_key_validates_first_key_issues() -> None:
    old = Keyring.generate()
    old_token = issue(old, host="h", port=1, now=NOW)
    new = old.rotate()
    assert len(new) == 2 and new.keys[1] == old.keys[0] and new.keys[0][0] != old.keys[0][0]
    assert new.issuing == new.keys[0]
    assert await validator(new, Clock(NOW)).validate(old_token)  # older key still in the ring
    new_token = issue(new, host="h", port=1, now=NOW)
    header = json.loads(base64.urlsafe_b64decode(new_token.split(".")[0] + "=="))
    assert header["kid"] == new.keys[0][0]  # the first key issues
    with pytest.raises(TokenInvalid, match="unknown key id"):
        decode(old, new_token)


async def test_removed_key_is_invalid() -> None:
    ring = Keyring.generate().rotate()
    old_kid = ring.keys[1][0]
    token = issue(Keyring([ring.keys[1]]), host="h", port=1, now=NOW)
    assert decode(ring, token)
    trimmed = ring.without(old_kid)
    assert trimmed.kids == [ring.keys[0][0]]
    with pytest.raises(TokenInvalid, match=f"unknown key id '{old_kid}'") as bad:
        await validator(trimmed, Clock(NOW)).validate(token)
    assert bad.value.close_code == 4001


async def test_validator_keyring_is_replaceable() -> None:
    a, b = Keyring.generate(), Keyring.generate()
    v = validator(a, Clock(NOW))
    token = issue(b, host="h", port=1, now=NOW)
    with pytest.raises(TokenInvalid):
        await v.validate(token)  # refused before the replay store: the jti is not burnt
    v.keyring = b
    assert await v.validate(token)


def test_without_errors() -> None:
    ring = Keyring.generate()
    with pytest.raises(KeyringError, match="only key"):
        ring.without(ring.keys[0][0])
    with pytest.raises(KeyringError, match="no key with kid 'zz'"):
        ring.rotate().without("zz")


def test_generate() -> None:
    ring = Keyring.generate(3)
    assert len(ring) == 3 and len(set(ring.kids)) == 3
    for kid, key in ring.keys:
        assert len(kid) == 8 and all(c in string.hexdigits for c in kid)
        assert len(key) == 32
    assert len({key for _, key in ring.keys}) == 3
    with pytest.raises(KeyringError):
        Keyring.generate(0)


# --- keyring files -----------------------------------------------------------------------------


def test_save_load_round_trip_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("old")
    path.chmod(0o644)
    old_umask = os.umask(0)  # even with a permissive umask the file is private
    try:
        ring = Keyring.generate(2)
        ring.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load(path) == ring
    assert Keyring.load(str(path)).kids == ring.kids
    assert os.listdir(tmp_path) == ["keys.json"]  # no temp file left behind
    doc = json.loads(path.read_text())
    assert doc == {"keys": [{"kid": kid, "k": b64url(key)} for kid, key in ring.keys]}
    assert Keyring.loads(ring.dumps()) == ring


def test_save_failure_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.json"
    ring = Keyring.generate()
    ring.save(path)

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        Keyring.generate().save(path)
    assert Keyring.load(path) == ring
    assert os.listdir(tmp_path) == ["keys.json"]


def test_load_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Keyring.load(tmp_path / "nope.json")


GOOD_K = b64url(bytes(range(32)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "keyring is not JSON (line 1 column 2)"),
        ("", "keyring is not JSON"),
        ("[]", 'keyring has no "keys" list'),
        ('{"kids": []}', 'keyring has no "keys" list'),
        ('{"keys": {}}', 'keyring has no "keys" list'),
        ('{"keys": []}', 'keyring "keys" list is empty'),
        ('{"keys": ["x"]}', 'keyring entry 0 is not an object with string "kid" and "k"'),
        (f'{{"keys": [{{"kid": "a", "k": "{GOOD_K}"}}, {{"k": "{GOOD_K}"}}]}}', "keyring entry 1 is not"),
        (f'{{"keys": [{{"kid": "a", "k": "{GOOD_K}"}}, {{"kid": "a", "k": "{GOOD_K}"}}]}}',
         "duplicate kid 'a' in keyring"),
        (f'{{"keys": [{{"kid": "a", "k": "{b64url(bytes(31))}"}}]}}', "key 'a' is 31 bytes, expected 32"),
        (f'{{"keys": [{{"kid": "a", "k": "{b64url(bytes(33))}"}}]}}', "key 'a' is 33 bytes, expected 32"),
        ('{"keys": [{"kid": "a", "k": "!!!!"}]}', "key 'a' is not base64url without padding"),
        (f'{{"keys": [{{"kid": "a", "k": "{GOOD_K}="}}]}}', "key 'a' is not base64url without padding"),
        ('{"keys": [{"kid": "a", "k": "AAAA+AAA"}]}', "key 'a' is not base64url without padding"),
        (f'{{"keys": [{{"kid": "", "k": "{GOOD_K}"}}]}}', "kid '' must be 1-128 printable ASCII"),
        (f'{{"keys": [{{"kid": "a b", "k": "{GOOD_K}"}}]}}', "kid 'a b' must be 1-128 printable ASCII"),
    ],
)
def test_bad_keyring_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KeyringError) as err:
        Keyring.loads(text)
    assert message in str(err.value)
    path = tmp_path / "k.json"
    path.write_text(text)
    with pytest.raises(KeyringError) as err:
        Keyring.load(path)
    assert str(err.value) == f"{path}: {message}" or (str(err.value).startswith(f"{path}: {message}"))
    assert "\n" not in str(err.value)
    assert GOOD_K not in str(err.value)  # never echo key material


# --- issue argument checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"port": 0}, "port 0 is outside 1-65535"),
        ({"port": 65536}, "port 65536 is outside 1-65535"),
        ({"port": True}, "outside 1-65535"),
        ({"ttl": 0}, "ttl must be a positive"),
        ({"ttl": -5}, "ttl must be a positive"),
        ({"client_ip": "nope"}, "client_ip 'nope' is not an IP address"),
        ({"host": ""}, "host must be a non-empty string"),
        ({"max_duration": 0}, "max_duration must be a positive"),
        ({"lang_key_release": "off"}, "lang_key_release must be 'send' or 'drop', got 'off'"),
        ({"host": "a b"}, "claim 'host'"),
    ],
)
def test_issue_rejects_bad_arguments(ring: Keyring, kw: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"host": "h", "port": 5900, **kw}
    with pytest.raises(ValueError, match=message):
        issue(ring, **args)


# --- stored vector and the language-neutral construction ---------------------------------------


def test_stored_vector_decodes_to_stored_claims() -> None:
    doc = json.loads(VECTORS.read_text())
    ring = Keyring.loads(json.dumps(doc["keyring"]))
    claims = decode(ring, doc["token"])
    assert claims.to_dict() == doc["claims"]
    assert claims.view_only and claims.password and claims.max_duration  # every optional field set
    assert claims.exp == 4102444800


def test_management_server_aesgcm_construction_decodes(ring: Keyring) -> None:
    """The exact construction of docs/management-server.md ("plain AES-GCM") is accepted."""
    kid, key = ring.keys[0]
    # --- as in the document ---
    header = {"alg": "dir", "enc": "A256GCM", "kid": kid}
    protected = base64.urlsafe_b64encode(
        json.dumps(header, separators=(",", ":")).encode()).rstrip(b"=").decode("ascii")
    now = NOW
    claims = {"host": "10.0.0.5", "port": 5901, "vm": "vm-42", "iat": now, "exp": now + 60,
              "jti": secrets.token_urlsafe(16), "password": "s3cret"}
    iv = secrets.token_bytes(12)
    sealed = AESGCM(key).encrypt(iv, json.dumps(claims).encode("utf-8"), protected.encode("ascii"))
    ciphertext, tag = sealed[:-16], sealed[-16:]

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    token = f"{protected}..{b64(iv)}.{b64(ciphertext)}.{b64(tag)}"
    # --- end ---
    got = decode(ring, token)
    assert got.to_dict() == claims


def test_keyring_file_from_doc_loads(tmp_path: Path) -> None:
    """The keyring the document tells operators to write by hand is accepted."""
    key = secrets.token_bytes(32)
    k = base64.urlsafe_b64encode(key).rstrip(b"=").decode()
    text = json.dumps({"keys": [{"kid": "2024-06", "k": k}]})
    ring = Keyring.loads(text)
    assert ring.issuing == ("2024-06", key)


def test_b64url_decode_is_canonical_only() -> None:
    assert b64url_decode("AA") == b"\x00"
    # unused low bits set, impossible length, padding, the standard (not URL) alphabet
    for bad in ("AB", "AAB", "A", "AA==", "A+", "A/"):
        with pytest.raises(ValueError):
            b64url_decode(bad)


def test_doc_example_runs_and_decodes() -> None:
    """The plain AES-GCM block of docs/management-server.md, run as written, yields a valid token."""
    doc = (Path(__file__).parents[2] / "docs" / "management-server.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    example = next(b for b in blocks if "AESGCM" in b)
    scope: dict[str, Any] = {}
    exec(compile(example, "management-server.md", "exec"), scope)
    vector_ring = Keyring.loads(json.dumps(json.loads(VECTORS.read_text())["keyring"]))
    claims = decode(vector_ring, scope["token"])
    assert claims.to_dict() == scope["claims"]
    header = json.loads(base64.urlsafe_b64decode(scope["protected"] + "=="))
    assert header["kid"] == vector_ring.keys[0][0]


def test_joserfc_tokens_decode_and_ours_open_with_joserfc(ring: Keyring) -> None:
    """decode() does the AES-GCM step itself; both directions must agree with the JOSE library."""
    from joserfc import jwe
    from joserfc.jwk import OctKey

    kid, key = ring.keys[0]
    claims = {"host": "10.0.0.5", "port": 5901, "vm": "vm-7", "iat": NOW, "exp": NOW + 60, "jti": "j-lib"}
    for header in ({"alg": "dir", "enc": "A256GCM", "kid": kid},
                   {"kid": kid, "enc": "A256GCM", "typ": "JWT", "cty": "JSON", "alg": "dir"}):
        theirs = jwe.encrypt_compact(header, json.dumps(claims).encode(), OctKey.import_key(key))
        assert decode(ring, theirs).to_dict() == claims
    ours = issue(ring, host="10.0.0.9", port=5900, vm="vm-8", now=NOW)
    opened = jwe.decrypt_compact(ours, OctKey.import_key(key), algorithms=["dir", "A256GCM"])
    assert opened.plaintext is not None
    assert json.loads(opened.plaintext)["vm"] == "vm-8"
    assert decode(ring, ours).vm == "vm-8"
