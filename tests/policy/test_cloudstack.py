"""CloudStack / Mold console tokens (issue 9): the three cipher forms, field mapping, the checks the
Java proxy makes (source IP, extra security token, ticket, single use) and interoperability with
tokens and tickets made by javax.crypto in tests/java/CloudStackToken.java.

Clocks are injected; nothing sleeps and nothing opens a socket (the Java test runs ``java``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from consoleproxy.errors import (
    ConsoleProxyError,
    Forbidden,
    TokenAlreadyUsed,
    TokenExpired,
    TokenInvalid,
)
from consoleproxy.policy.cloudstack import (
    CLAIMS_TTL,
    MAX_TOKEN_BYTES,
    CloudStackKeyError,
    CloudStackKeys,
    CloudStackValidator,
    check_ticket,
    decrypt,
    encrypt_cbc,
    encrypt_cbc_hmac,
    encrypt_gcm,
    ticket,
    to_claims,
)
from consoleproxy.policy.replay import MemoryReplayStore

JAVA_SRC = Path(__file__).parents[1] / "java" / "CloudStackToken.java"
NOW = 1_700_000_123.5
MINUTE = int(NOW // 60)
HASH_KEY = "hash-key-from-security.hash.key"
KEYS = CloudStackKeys(bytes(range(16)), bytes(range(100, 116)), auth_key=bytes(range(200, 232)))
STD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
URLSAFE = STD[:-2] + "-_"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fields(**over: Any) -> dict[str, Any]:
    """A ConsoleProxyClientParam-shaped object with a valid ticket for MINUTE."""
    session = over.pop("sessionUuid", str(uuid.uuid4()))
    d: dict[str, Any] = {
        "clientHostAddress": "10.0.0.7",
        "clientHostPort": 5901,
        "clientHostPassword": "vncpass1",
        "clientTag": "3f1a9c2e-0000-4000-8000-000000000001",
        "clientDisplayName": "web-1",
        "sessionUuid": session,
        "sourceIP": "192.0.2.10",
        "locale": "en-us",
    }
    d["ticket"] = ticket(HASH_KEY, "10.0.0.7", 5901, "vncpass1", d["clientTag"], session, MINUTE)
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def make(form: str, f: dict[str, Any], keys: CloudStackKeys = KEYS) -> str:
    if form == "gcm":
        return encrypt_gcm(keys, f)
    if form == "cbc":
        return encrypt_cbc(keys, f)
    return encrypt_cbc_hmac(keys, f)


def validator(**kw: Any) -> CloudStackValidator:
    clock = kw.pop("clock", lambda: NOW)
    return CloudStackValidator(KEYS, MemoryReplayStore(clock=clock), clock=clock, **kw)


FORM_NAMES = ["gcm", "cbc", "cbc-hmac"]


# --- keys --------------------------------------------------------------------------------------


def test_keys_loads_urlsafe_without_padding() -> None:
    key, iv = bytes([0xFB] * 16), bytes([0xFF] * 15 + [0x3E])
    text = json.dumps({"base64EncodedKeyBytes": b64u(key), "base64EncodedIvBytes": b64u(iv)})
    assert "-" in text or "_" in text
    keys = CloudStackKeys.loads(text)
    assert (keys.key_bytes, keys.iv_bytes, keys.auth_key) == (key, iv, None)
    assert CloudStackKeys.loads(keys.dumps()) == keys


def test_keys_loads_standard_base64_with_padding() -> None:
    key, iv = bytes([0xFB] * 16), bytes([0xFF] * 16)
    text = json.dumps(
        {
            "base64EncodedKeyBytes": base64.b64encode(key).decode(),
            "base64EncodedIvBytes": base64.b64encode(iv).decode(),
        }
    )
    keys = CloudStackKeys.loads(text, auth_key=b"a" * 32)
    assert (keys.key_bytes, keys.iv_bytes, keys.auth_key) == (key, iv, b"a" * 32)


def test_keys_repr_hides_bytes() -> None:
    assert bytes(range(16)).hex() not in repr(KEYS)
    assert "\\x00" not in repr(KEYS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"base64EncodedIvBytes": "AAAAAAAAAAAAAAAAAAAAAA"}', 'no "base64EncodedKeyBytes"'),
        ('{"base64EncodedKeyBytes": "AAAAAAAAAAAAAAAAAAAAAA"}', 'no "base64EncodedIvBytes"'),
        ('{"base64EncodedKeyBytes": 5, "base64EncodedIvBytes": "AAAAAAAAAAAAAAAAAAAAAA"}', "not a string"),
        ('{"base64EncodedKeyBytes": "!!!", "base64EncodedIvBytes": "AAAAAAAAAAAAAAAAAAAAAA"}', "not base64"),
        (
            '{"base64EncodedKeyBytes": "AAAA", "base64EncodedIvBytes": "AAAAAAAAAAAAAAAAAAAAAA"}',
            "key is 3 bytes",
        ),
        (
            '{"base64EncodedKeyBytes": "AAAAAAAAAAAAAAAAAAAAAA", "base64EncodedIvBytes": "AAAA"}',
            "IV is 3 bytes",
        ),
    ],
)
def test_keys_loads_errors(text: str, message: str) -> None:
    with pytest.raises(CloudStackKeyError, match=message) as info:
        CloudStackKeys.loads(text)
    assert isinstance(info.value, ConsoleProxyError)


def test_keys_short_auth_key_refused() -> None:
    with pytest.raises(CloudStackKeyError, match="auth key"):
        CloudStackKeys(bytes(16), bytes(16), auth_key=b"short")


def test_keys_load_file(tmp_path: Path) -> None:
    path = tmp_path / "cs.json"
    path.write_text(KEYS.dumps())
    assert CloudStackKeys.load(path) == CloudStackKeys(KEYS.key_bytes, KEYS.iv_bytes)
    with pytest.raises(CloudStackKeyError, match="no such file"):
        CloudStackKeys.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(CloudStackKeyError, match=r"bad\.json: key file has no"):
        CloudStackKeys.load(bad)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CloudStackKeyError, match="not UTF-8"):
        CloudStackKeys.load(binary)


# --- decrypt -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORM_NAMES)
def test_round_trip(form: str) -> None:
    f = fields()
    assert decrypt(KEYS, make(form, f)) == f


def test_gcm_token_is_standard_base64_of_nonce_ct_tag() -> None:
    f = fields()
    token = encrypt_gcm(KEYS, f, nonce=bytes(12))
    raw = base64.b64decode(token)
    assert raw[:12] == bytes(12)
    assert len(raw) == 12 + len(json.dumps(f, separators=(",", ":"))) + 16


def test_forms_are_configurable() -> None:
    token = encrypt_gcm(KEYS, fields())
    with pytest.raises(TokenInvalid, match="cbc: "):
        decrypt(KEYS, token, forms=("cbc",))
    with pytest.raises(ValueError, match="unknown CloudStack token form"):
        decrypt(KEYS, token, forms=("ecb",))
    with pytest.raises(ValueError, match="at least one"):
        decrypt(KEYS, token, forms=())


def test_cbc_hmac_needs_auth_key() -> None:
    token = encrypt_cbc_hmac(KEYS, fields())
    no_auth = CloudStackKeys(KEYS.key_bytes, KEYS.iv_bytes)
    with pytest.raises(TokenInvalid, match="no auth key configured"):
        decrypt(no_auth, token, forms=("cbc-hmac",))


def test_plus_turned_into_space_and_percent_encoding_accepted() -> None:
    f = fields()
    token = next(t for t in (encrypt_gcm(KEYS, f) for _ in range(200)) if "+" in t)
    assert decrypt(KEYS, token.replace("+", " ")) == f
    encoded = token.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    assert decrypt(KEYS, encoded) == f


def test_padding_optional() -> None:
    for n in range(3):
        f = fields(clientDisplayName="x" * n)
        token = encrypt_gcm(KEYS, f)
        if token.endswith("="):
            break
    assert token.endswith("=")
    assert decrypt(KEYS, token.rstrip("=")) == f
    with pytest.raises(TokenInvalid, match="not base64"):
        decrypt(KEYS, token + "===")


def test_oversized_token_refused_before_decoding() -> None:
    with pytest.raises(TokenInvalid, match="16 KiB"):
        decrypt(KEYS, "A" * (MAX_TOKEN_BYTES + 4))


def test_big_but_allowed_token() -> None:
    f = fields(clientDisplayName="x" * 9000)
    token = encrypt_gcm(KEYS, f)
    assert 8 * 1024 < len(token) <= MAX_TOKEN_BYTES
    assert decrypt(KEYS, token) == f


@pytest.mark.parametrize("form", FORM_NAMES)
def test_wrong_key_is_4001(form: str) -> None:
    other = CloudStackKeys(bytes(16), bytes(16), auth_key=bytes(32))
    with pytest.raises(TokenInvalid, match="tampered or wrong key") as info:
        decrypt(KEYS, make(form, fields(), other))
    assert info.value.close_code == 4001


@pytest.mark.parametrize("form", FORM_NAMES)
def test_tampered_token_is_4001_at_every_position(form: str) -> None:
    alphabet = STD if form == "gcm" else URLSAFE
    token = make(form, fields())
    for i, c in enumerate(token):
        if c == "=":
            continue
        for repl in (alphabet[(alphabet.index(c) + 1) % 64], alphabet[(alphabet.index(c) + 33) % 64]):
            with pytest.raises(TokenInvalid) as info:
                decrypt(KEYS, token[:i] + repl + token[i + 1 :])
            assert info.value.close_code == 4001


@pytest.mark.parametrize("form", FORM_NAMES)
def test_truncated_token_is_4001(form: str) -> None:
    token = make(form, fields())
    for n in (0, 4, 16, 24, len(token) - 4):
        with pytest.raises(TokenInvalid):
            decrypt(KEYS, token[:n])


def test_decrypted_but_not_an_object() -> None:
    nonce = bytes(12)
    sealed = AESGCM(hashlib.sha256(KEYS.key_bytes).digest()).encrypt(nonce, b"[1,2]", KEYS.iv_bytes)
    with pytest.raises(TokenInvalid, match="not a JSON object"):
        decrypt(KEYS, base64.b64encode(nonce + sealed).decode())


def test_error_messages_never_quote_the_token() -> None:
    token = encrypt_gcm(KEYS, fields())
    bad = token[:40] + ("A" if token[40] != "A" else "B") + token[41:]
    with pytest.raises(TokenInvalid) as info:
        decrypt(KEYS, bad)
    assert bad[:20] not in str(info.value)


# --- to_claims ---------------------------------------------------------------------------------


def test_to_claims_maps_fields() -> None:
    f = fields()
    claims = to_claims(f, now=NOW)
    assert claims.host == "10.0.0.7"
    assert claims.port == 5901
    assert claims.password == "vncpass1"
    assert claims.vm == f["clientTag"]
    assert claims.name == "web-1"
    assert claims.jti == f["sessionUuid"]
    assert claims.iat == int(NOW)
    assert claims.exp == int(NOW) + CLAIMS_TTL == int(NOW) + 300
    assert claims.client_ip is None  # source IP check off
    assert to_claims(f, now=NOW, check_source_ip=True).client_ip == "192.0.2.10"
    assert "vncpass1" not in repr(claims)


def test_to_claims_port_as_string_and_optional_fields() -> None:
    claims = to_claims(
        fields(clientHostPort="5902", clientHostPassword=None, clientDisplayName=None), now=NOW
    )
    assert (claims.port, claims.password, claims.name) == (5902, None, None)


def test_to_claims_jti_from_token_hash_when_no_session() -> None:
    f = fields(sessionUuid=None)
    f.pop("sessionUuid", None)
    a = to_claims(f, now=NOW, token="tok-a")
    b = to_claims(f, now=NOW, token="tok-b")
    assert a.jti.startswith("sha256:") and a.jti != b.jti
    assert to_claims(f, now=NOW).jti.startswith("sha256:")


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"clientHostAddress": None}, "clientHostAddress"),
        ({"clientHostAddress": ""}, "clientHostAddress"),
        ({"clientHostAddress": "a b"}, "clientHostAddress"),
        ({"clientHostAddress": 7}, "clientHostAddress"),
        ({"clientHostPort": 0}, "clientHostPort"),
        ({"clientHostPort": 70000}, "clientHostPort"),
        ({"clientHostPort": True}, "clientHostPort"),
        ({"clientHostPort": "59o1"}, "clientHostPort"),
        ({"clientHostPort": 5901.0}, "clientHostPort"),
        ({"clientTag": None}, "clientTag"),
        ({"clientTag": 5}, "clientTag"),
        ({"clientHostPassword": 1234}, "clientHostPassword"),
        ({"clientDisplayName": ["x"]}, "clientDisplayName"),
        ({"sessionUuid": ""}, "sessionUuid"),
        ({"sessionUuid": 5}, "sessionUuid"),
        ({"ticket": 5}, "ticket"),
        ({"extraSecurityToken": {}}, "extraSecurityToken"),
        ({"websocketUrl": "wss://esx:443/ticket/x"}, "websocketUrl"),
        ({"hypervHost": "hv1"}, "hypervHost"),
        ({"clientTunnelUrl": "https://xen/console"}, "clientTunnelUrl"),
    ],
)
def test_to_claims_bad_field_named(over: dict[str, Any], field: str) -> None:
    f = fields()
    for k, v in over.items():
        if v is None:
            f.pop(k, None)
        else:
            f[k] = v
    if "clientHostPort" in over and over["clientHostPort"] is None:
        f.pop("clientHostPort")
    with pytest.raises(TokenInvalid, match=f"'{field}'"):
        to_claims(f, now=NOW)


def test_to_claims_missing_port() -> None:
    f = fields()
    del f["clientHostPort"]
    with pytest.raises(TokenInvalid, match="'clientHostPort' is missing"):
        to_claims(f, now=NOW)


def test_to_claims_bad_source_ip_only_matters_with_check() -> None:
    f = fields(sourceIP="not-an-ip")
    assert to_claims(f, now=NOW).client_ip is None
    with pytest.raises(TokenInvalid, match="'sourceIP'"):
        to_claims(f, now=NOW, check_source_ip=True)


# --- ticket ------------------------------------------------------------------------------------


def test_ticket_is_base64_hmac_sha512() -> None:
    t = ticket(HASH_KEY, "h", 5900, "sid", "tag", "uuid", 123)
    assert len(base64.b64decode(t, validate=True)) == 64
    assert t != ticket(HASH_KEY, "h", 5900, "sid", "tag", "uuid", 124)
    assert t != ticket("other", "h", 5900, "sid", "tag", "uuid", 123)
    # Java's string concatenation writes null as "null"
    assert ticket(HASH_KEY, "h", 1, None, "t", None, 1) == ticket(HASH_KEY, "h", 1, "null", "t", "null", 1)


def _check(value: str, now: float) -> None:
    check_ticket(HASH_KEY, value, host="h", port=5900, sid="s", tag="t", session_uuid="u", now=now)


def test_check_ticket_window() -> None:
    m = MINUTE
    _check(ticket(HASH_KEY, "h", 5900, "s", "t", "u", m), NOW)
    _check(ticket(HASH_KEY, "h", 5900, "s", "t", "u", m - 1), NOW)
    for stale in (m - 2, m - 60, m + 1):
        with pytest.raises(TokenExpired) as info:
            _check(ticket(HASH_KEY, "h", 5900, "s", "t", "u", stale), NOW)
        assert info.value.close_code == 4002
    with pytest.raises(TokenExpired):
        _check("garbage", NOW)


# --- validator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORM_NAMES)
async def test_validate_round_trip(form: str) -> None:
    f = fields()
    claims = await validator(hash_key=HASH_KEY).validate(make(form, f), client_ip="192.0.2.99", extra=None)
    assert (claims.host, claims.port, claims.jti) == ("10.0.0.7", 5901, f["sessionUuid"])


async def test_reused_session_uuid_is_4003() -> None:
    v = validator()
    f = fields()
    await v.validate(encrypt_gcm(KEYS, f), client_ip=None, extra=None)
    # a different token (new nonce, even another form) with the same sessionUuid is a replay
    for token in (encrypt_gcm(KEYS, f), encrypt_cbc(KEYS, f)):
        with pytest.raises(TokenAlreadyUsed) as info:
            await v.validate(token, client_ip=None, extra=None)
        assert info.value.close_code == 4003


async def test_token_without_session_uuid_is_single_use_by_hash() -> None:
    v = validator()
    f = fields()
    del f["sessionUuid"]
    token = encrypt_gcm(KEYS, f)
    await v.validate(token, client_ip=None, extra=None)
    with pytest.raises(TokenAlreadyUsed):
        await v.validate(token, client_ip=None, extra=None)


async def test_extra_security_token() -> None:
    f = fields(extraSecurityToken="s3cr3t-extra")
    v = validator(check_extra=True)
    for wrong in ("other", "", None, "s3cr3t-extra "):
        with pytest.raises(Forbidden, match="extra security token does not match") as info:
            await v.validate(encrypt_gcm(KEYS, f), client_ip=None, extra=wrong)
        assert info.value.close_code == 4004
    await v.validate(encrypt_gcm(KEYS, f), client_ip=None, extra="s3cr3t-extra")
    # check off: ignored
    await validator().validate(encrypt_gcm(KEYS, fields(extraSecurityToken="x")), client_ip=None, extra="y")
    # check on but the token carries none: nothing to compare
    await validator(check_extra=True).validate(encrypt_gcm(KEYS, fields()), client_ip=None, extra="y")


async def test_source_ip_check() -> None:
    f = fields(sourceIP="192.0.2.10")
    on = validator(check_source_ip=True)
    for wrong in ("192.0.2.11", None, "junk"):
        with pytest.raises(Forbidden, match="source IP does not match") as info:
            await on.validate(encrypt_gcm(KEYS, f), client_ip=wrong, extra=None)
        assert info.value.close_code == 4004
    claims = await on.validate(encrypt_gcm(KEYS, f), client_ip="::ffff:192.0.2.10", extra=None)
    assert claims.client_ip == "192.0.2.10"
    off = validator()
    claims = await off.validate(encrypt_gcm(KEYS, fields()), client_ip="198.51.100.1", extra=None)
    assert claims.client_ip is None


async def test_stale_ticket_is_4002_and_window_accepted() -> None:
    def with_ticket(minute: int) -> dict[str, Any]:
        f = fields()
        f["ticket"] = ticket(HASH_KEY, "10.0.0.7", 5901, "vncpass1", f["clientTag"], f["sessionUuid"], minute)
        return f

    v = validator(hash_key=HASH_KEY)
    await v.validate(encrypt_gcm(KEYS, with_ticket(MINUTE)), client_ip=None, extra=None)
    await v.validate(encrypt_gcm(KEYS, with_ticket(MINUTE - 1)), client_ip=None, extra=None)
    stale = with_ticket(MINUTE - 2)
    with pytest.raises(TokenExpired) as info:
        await v.validate(encrypt_gcm(KEYS, stale), client_ip=None, extra=None)
    assert info.value.close_code == 4002
    # the refusal did not burn the sessionUuid: a fresh ticket for it is still accepted
    fresh = dict(stale)
    fresh["ticket"] = ticket(
        HASH_KEY, "10.0.0.7", 5901, "vncpass1", stale["clientTag"], stale["sessionUuid"], MINUTE
    )
    await v.validate(encrypt_gcm(KEYS, fresh), client_ip=None, extra=None)
    # no hash key configured: the ticket is not checked
    await validator().validate(encrypt_gcm(KEYS, with_ticket(MINUTE - 10)), client_ip=None, extra=None)
    # wrong hash key configured: refused like a stale ticket
    with pytest.raises(TokenExpired):
        await validator(hash_key="other").validate(encrypt_gcm(KEYS, fields()), client_ip=None, extra=None)


async def test_ticket_uses_port_as_sent_string() -> None:
    f = fields(clientHostPort="5901")
    await validator(hash_key=HASH_KEY).validate(encrypt_gcm(KEYS, f), client_ip=None, extra=None)


async def test_keys_replaceable() -> None:
    v = validator()
    other = CloudStackKeys(bytes(16), bytes(16))
    token = encrypt_gcm(other, fields())
    with pytest.raises(TokenInvalid):
        await v.validate(token, client_ip=None, extra=None)
    v.keys = other
    await v.validate(token, client_ip=None, extra=None)


# --- property tests ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_random_text_only_token_invalid(text: str) -> None:
    try:
        decrypt(KEYS, text)
    except TokenInvalid:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=STD + URLSAFE[-2:] + "= %", min_size=20, max_size=400))
def test_random_base64ish_only_token_invalid(text: str) -> None:
    try:
        decrypt(KEYS, text)
    except TokenInvalid:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(
    [
        "clientHostAddress",
        "clientHostPort",
        "clientHostPassword",
        "clientTag",
        "clientDisplayName",
        "sessionUuid",
        "sourceIP",
        "ticket",
        "extraSecurityToken",
        "websocketUrl",
        "other",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values), st.booleans())
def test_random_fields_only_token_invalid(d: dict[str, Any], check_ip: bool) -> None:
    try:
        to_claims(d, now=NOW, check_source_ip=check_ip)
    except TokenInvalid:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(field_names, json_values))
async def test_random_fields_in_valid_token_only_token_errors(d: dict[str, Any]) -> None:
    v = validator(hash_key=HASH_KEY, check_source_ip=True, check_extra=True)
    try:
        await v.validate(encrypt_gcm(KEYS, d), client_ip="192.0.2.10", extra="x")
    except (TokenInvalid, TokenExpired, Forbidden):
        pass


# --- interoperability with javax.crypto --------------------------------------------------------


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    javac = require_tool("javac", "default-jdk-headless")
    require_tool("java", "default-jdk-headless")
    out = tmp_path_factory.mktemp("java")
    subprocess.run([javac, "-d", str(out), str(JAVA_SRC)], check=True, capture_output=True, timeout=120)
    return out


def java(classes: Path, *args: str) -> str:
    proc = subprocess.run(
        ["java", "-cp", str(classes), "CloudStackToken", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip()


@pytest.mark.integration
@pytest.mark.parametrize("form", FORM_NAMES)
async def test_java_made_tokens_decrypt(java_classes: Path, form: str) -> None:
    f = fields(clientDisplayName="vm ünïcødé ✓", extraSecurityToken="xtra")
    doc = json.dumps(f, ensure_ascii=False)
    key_b64, iv_b64 = b64u(KEYS.key_bytes), b64u(KEYS.iv_bytes)
    args = [form, key_b64, iv_b64, doc]
    if form == "cbc-hmac":
        assert KEYS.auth_key is not None
        args.append(b64u(KEYS.auth_key))
    token = java(java_classes, *args)
    if form == "gcm":
        raw = base64.b64decode(token, validate=True)  # standard alphabet, padded
        assert len(raw) == 12 + len(doc.encode()) + 16
    assert decrypt(KEYS, token) == f
    v = validator(hash_key=HASH_KEY, check_source_ip=True, check_extra=True)
    claims = await v.validate(token, client_ip="192.0.2.10", extra="xtra")
    assert (claims.host, claims.port, claims.password, claims.vm) == (
        "10.0.0.7",
        5901,
        "vncpass1",
        f["clientTag"],
    )
    assert claims.name == "vm ünïcødé ✓"
    assert claims.jti == f["sessionUuid"]


@pytest.mark.integration
def test_java_made_ticket_matches(java_classes: Path) -> None:
    session = str(uuid.uuid4())
    expected = java(java_classes, "ticket", HASH_KEY, "10.1.2.3", "5903", "pw", "tag-1", session, str(MINUTE))
    assert ticket(HASH_KEY, "10.1.2.3", 5903, "pw", "tag-1", session, MINUTE) == expected
    check_ticket(
        HASH_KEY, expected, host="10.1.2.3", port=5903, sid="pw", tag="tag-1", session_uuid=session, now=NOW
    )
