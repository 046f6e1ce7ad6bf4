"""The command line: real subprocess runs for the contract, in-process runs for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import starts_program

from consoleproxy.errors import TokenAlreadyUsed, TokenExpired, TokenInvalid
from consoleproxy.policy.replay import MemoryReplayStore
from consoleproxy.policy.tokens import Keyring, TokenValidator
from consoleproxy.tools.cli import main
from consoleproxy.tools.cli_tokens import console_url

CLI = [sys.executable, "-m", "consoleproxy"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
@starts_program  # the consoleproxy CLI, as a subprocess
def keys(tmp_path: Path) -> Path:
    r = run("keys", "generate", "--out", "k.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "k.json"
    assert path.stat().st_mode & 0o777 == 0o600
    return path


@pytest.mark.integration
async def test_token_issue_validates_to_exact_claims(tmp_path: Path, keys: Path) -> None:
    before = int(time.time())
    r = run("token", "issue", "--host", "10.0.0.5", "--port", "5901", "--ttl", "60", "--keys", "k.json",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert "\n" not in token

    now = [time.time()]
    v = TokenValidator(Keyring.load(keys), MemoryReplayStore(), skew_seconds=30, clock=lambda: now[0])
    claims = v_claims = await v.validate(token)
    assert (claims.host, claims.port) == ("10.0.0.5", 5901)
    assert before <= claims.iat <= int(time.time())
    assert claims.exp == claims.iat + 60
    assert claims.password is None and claims.client_ip is None and not claims.view_only
    assert claims.lang_key_release is None
    # a second validation of the same token: 4003
    with pytest.raises(TokenAlreadyUsed) as used:
        await v.validate(token)
    assert used.value.close_code == 4003
    # after ttl + skew: 4002 (fresh store, so single use does not mask expiry)
    later = TokenValidator(Keyring.load(keys), MemoryReplayStore(), skew_seconds=30,
                           clock=lambda: v_claims.exp + 31)
    with pytest.raises(TokenExpired) as expired:
        await later.validate(token)
    assert expired.value.close_code == 4002
    # flipping any one character: 4001 (every position is covered in test_tokens.py)
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    with pytest.raises(TokenInvalid) as bad:
        await TokenValidator(Keyring.load(keys), MemoryReplayStore()).validate(flipped)
    assert bad.value.close_code == 4001


@pytest.mark.integration
def test_token_issue_count_and_inspect_masks_password(tmp_path: Path, keys: Path) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    r = run("token", "issue", "--host", "10.0.0.5", "--port", "5901", "--count", "3",
            "--password-file", "pw", "--vm", "vm-1", "--keys", "k.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tokens = r.stdout.split()
    assert len(tokens) == 3 and len(set(tokens)) == 3
    r = run("token", "inspect", tokens[0], "--keys", "k.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["host"] == "10.0.0.5" and shown["vm"] == "vm-1"
    assert shown["password"] == "***" and "hunter2" not in r.stdout


@pytest.mark.integration
def test_url_wildcard_and_fqdn(tmp_path: Path, keys: Path) -> None:
    r = run("url", "--public-ip", "203.0.113.7", "--domain-suffix", "*.consoleproxy.company.com",
            "--host", "10.0.0.5", "--vnc-port", "5901", "--keys", "k.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("https://203-0-113-7.consoleproxy.company.com/console?token=ey")
    r = run("url", "--fqdn", "console.company.com", "--token", "T", "--port", "8443", cwd=tmp_path)
    assert r.stdout.strip() == "https://console.company.com:8443/console?token=T"


def test_console_url_function() -> None:
    assert console_url("T", public_ip="203.0.113.7", domain_suffix="*.consoleproxy.company.com") == (
        "https://203-0-113-7.consoleproxy.company.com/console?token=T"
    )
    assert console_url("T", fqdn="Console.Company.com") == "https://console.company.com/console?token=T"


@pytest.mark.integration
def test_keys_rotate(tmp_path: Path, keys: Path) -> None:
    first = Keyring.load(keys).keys[0][0]
    assert main(["keys", "generate", "--out", str(keys), "--rotate"]) == 0
    ring = Keyring.load(keys)
    assert len(ring.keys) == 2 and ring.keys[1][0] == first


@pytest.mark.integration
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["token", "issue", "--host", "h", "--port", "0"], "port 0 is outside 1-65535"),
        (["token", "issue", "--host", "h", "--port", "x"], "'x' is not a port number"),
        (["token", "issue", "--port", "5900"], "the following arguments are required: --host"),
        (["token", "issue", "--host", "h", "--port", "5900", "--ttl", "0"], "0 must be at least 1"),
        (["token", "issue", "--host", "h", "--port", "5900", "--client-ip", "nope"], "'nope' is not an IP"),
        (["token", "issue", "--host", "h", "--port", "5900", "--password-file", "/nonexistent"],
         "is not a readable file"),
        (["token", "issue", "--host", "h", "--port", "5900", "--keys", "/nonexistent.json"],
         "keyring '/nonexistent.json' not found"),
        (["url", "--public-ip", "1.2.3.4", "--fqdn", "x"], "not allowed with argument"),
        (["url", "--public-ip", "1.2.3.999", "--token", "T"], "'1.2.3.999' is not an IPv4 address"),
        (["url", "--public-ip", "1.2.3.4", "--domain-suffix", "*.", "--token", "T"], "suffix is empty"),
        (["url", "--public-ip", "1.2.3.4"], "give --token, or --host and --vnc-port"),
        (["token", "inspect", "garbage", "--keys", "KEYS"], "token invalid" ),
        (["serve", "--config", "/nonexistent.toml"], "cannot read configuration"),
        (["frobnicate"], "invalid choice"),
        (["dns", "serve", "--listen", "nope", "--zone", "a.b"], "nope"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], needle: str, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(keys) if a == "KEYS" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert needle.lower() in err.lower(), err


@pytest.mark.integration
async def test_token_issue_lang_key_release(tmp_path: Path, keys: Path) -> None:
    r = run("token", "issue", "--host", "10.0.0.5", "--port", "5901", "--lang-key-release", "drop",
            "--keys", "k.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    v = TokenValidator(Keyring.load(keys), MemoryReplayStore(), skew_seconds=30)
    assert (await v.validate(r.stdout.strip())).lang_key_release == "drop"
    bad = run("token", "issue", "--host", "10.0.0.5", "--port", "5901", "--lang-key-release", "off",
              "--keys", "k.json", cwd=tmp_path)
    assert bad.returncode == 2
    assert "--lang-key-release: invalid choice: 'off'" in bad.stderr
