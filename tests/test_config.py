from pathlib import Path

import pytest

from consoleproxy.config import ConfigError, load_config, parse_port_range


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "consoleproxy.toml"
    p.write_text(text)
    return p


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg.listen.ports == [443] and cfg.listen.tls is True
    assert cfg.admin.address == "127.0.0.1" and cfg.admin.port == 8001
    assert cfg.tokens.skew_seconds == 30
    assert cfg.limits.per_vm_policy == "share"


def test_file_and_env_override(tmp_path: Path) -> None:
    p = write(tmp_path, '[limits]\nmax_sessions = 50\n[targets]\nallowed_cidrs = ["192.168.0.0/16"]\n')
    cfg = load_config(p, env={"CONSOLEPROXY_LIMITS_MAX_SESSIONS": "7", "CONSOLEPROXY_LISTEN_TLS": "false"})
    assert cfg.limits.max_sessions == 7
    assert cfg.listen.tls is False
    assert cfg.targets.allowed_cidrs == ["192.168.0.0/16"]


def test_env_list_forms() -> None:
    a = load_config(env={"CONSOLEPROXY_LISTEN_PORTS": "443,8443"})
    b = load_config(env={"CONSOLEPROXY_LISTEN_PORTS": "[443, 8443]"})
    assert a.listen.ports == b.listen.ports == [443, 8443]


def test_relative_paths_anchor_at_config_dir(tmp_path: Path) -> None:
    p = write(tmp_path, '[tokens]\nkeyring = "k.json"\n')
    cfg = load_config(p, env={})
    assert cfg.path(cfg.tokens.keyring) == tmp_path.resolve() / "k.json"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[limits]\nmax_sessions = 0\n", "[limits] max_sessions: expected a number >= 1, got 0"),
        ('[limits]\nmax_sessions = "ten"\n', "[limits] max_sessions: expected an integer, got 'ten'"),
        ("[limits]\nmax_session = 3\n", "[limits] unknown key 'max_session'"),
        ("[limitz]\n", "unknown section [limitz]"),
        ('[limits]\nper_vm_policy = "steal"\n', "expected one of 'share', 'replace', 'reject'"),
        ('[targets]\nallowed_cidrs = ["10.0.0.0/33"]\n', "bad entry '10.0.0.0/33'"),
        ('[targets]\nports = "6000-5900"\n', "[targets] ports"),
        ("[listen]\nports = [70000]\n", "[listen] ports"),
        ("[listen]\ntls = 1\n", "[listen] tls: expected true or false, got 1"),
        ("[dns]\nlisten = \"53\"\n", "[dns] listen: expected ADDRESS:PORT"),
        ('[input]\nlang_key_release = "swallow"\n',
         "[input] lang_key_release: expected one of 'send', 'drop', got 'swallow'"),
        ("[input]\nlang_key_release = true\n", "[input] lang_key_release: expected"),
        ("[limits\n", "not valid TOML"),
        ("limits = 3\n", "[limits] must be a table"),
        ('[tls]\ndomain_suffix = "a.b"\nfqdn = "c.d"\n', "domain_suffix or fqdn, not both"),
    ],
)
def test_bad_file_values(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    msg = str(info.value)
    assert needle in msg
    assert str(p) in msg  # names the file
    assert "\n" not in msg  # one line


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CONSOLEPROXY_LIMITS_MAX_SESSIONS": "x"}, "environment CONSOLEPROXY_LIMITS_MAX_SESSIONS"),
        ({"CONSOLEPROXY_LISTEN_TLS": "maybe"}, "expected true or false"),
        ({"CONSOLEPROXY_NOPE_X": "1"}, "unknown section 'nope'"),
        ({"CONSOLEPROXY_LIMITS_NOPE": "1"}, "unknown key 'nope'"),
    ],
)
def test_bad_env(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(env=env)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "none.toml", env={})


def test_port_range() -> None:
    assert parse_port_range("5900-5901,443") == (range(5900, 5902), range(443, 444))
    for bad in ("", "a-b", "0-5", "5-", "70000"):
        with pytest.raises(ValueError):
            parse_port_range(bad)


def test_input_lang_key_release_default_file_and_env(tmp_path: Path) -> None:
    assert load_config(env={}).input.lang_key_release == "send"
    p = write(tmp_path, '[input]\nlang_key_release = "drop"\n')
    assert load_config(p, env={}).input.lang_key_release == "drop"
    env = {"CONSOLEPROXY_INPUT_LANG_KEY_RELEASE": "send"}
    assert load_config(p, env=env).input.lang_key_release == "send"
    with pytest.raises(ConfigError, match=r"CONSOLEPROXY_INPUT_LANG_KEY_RELEASE.*one of 'send', 'drop'"):
        load_config(env={"CONSOLEPROXY_INPUT_LANG_KEY_RELEASE": "Drop"})
