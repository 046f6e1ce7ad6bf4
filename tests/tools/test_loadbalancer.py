"""The HAProxy configuration generator, checked by real `haproxy -c`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

from consoleproxy.tools.cli import main
from consoleproxy.tools.loadbalancer import Backend, haproxy_config, parse_backend


def _check(cfg: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    haproxy = require_tool("haproxy", "haproxy")
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    return subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.integration
def test_passthrough_config_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadbalancer", "haproxy", "--fqdn", "console.company.com",
                 "--backend", "10.0.0.5:443", "--backend", "10.0.0.6:443", "--backend", "[2001:db8::7]:443",
                 "--stats", "127.0.0.1:8404"]) == 0
    cfg = capsys.readouterr().out
    r = _check(cfg, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mode tcp" in cfg and "balance leastconn" in cfg
    assert cfg.count("send-proxy-v2") == 3 and "uri /readyz" in cfg
    assert "server proxy3 [2001:db8::7]:443" in cfg


@pytest.mark.integration
def test_http_config_is_valid(tmp_path: Path) -> None:
    openssl = require_tool("openssl", "openssl")
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2",
                    "-subj", "/CN=console.company.com"], check=True, capture_output=True)
    pem = tmp_path / "haproxy.pem"
    pem.write_text(crt.read_text() + key.read_text())
    cfg = haproxy_config(fqdn="console.company.com", backends=[Backend("10.0.0.5", 8080)], mode="http",
                         certificate=str(pem))
    r = _check(cfg, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mode http" in cfg and "timeout tunnel 1h" in cfg and "option forwardfor" in cfg


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--fqdn", "c.example", "--backend", "nohost"], "must be HOST:PORT"),
        (["--fqdn", "c.example", "--backend", "h:99999"], "port outside 1-65535"),
        (["--fqdn", "c.example", "--backend", "a b:443"], "characters HAProxy would misread"),
        (["--fqdn", "", "--backend", "h:1"], "fqdn"),
        (["--fqdn", "c.example"], "--backend"),
        (["--fqdn", "c.example", "--backend", "h:1", "--mode", "udp"], "invalid choice"),
    ],
)
def test_bad_arguments(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(["loadbalancer", "haproxy", *argv]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_parse_backend() -> None:
    assert parse_backend("10.0.0.5:443") == Backend("10.0.0.5", 443)
    assert parse_backend("[::1]:8443") == Backend("::1", 8443)


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("haproxy-passthrough.cfg", []),
        ("haproxy-http.cfg", ["--mode", "http"]),
    ],
)
def test_examples_are_what_the_generator_prints(
    name: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """loadbalancer/*.cfg are the generator's output, so the guide's examples cannot drift."""
    port = "8080" if argv else "443"
    backends = [a for i in (11, 12, 13) for a in ("--backend", f"10.0.0.{i}:{port}")]
    assert main(["loadbalancer", "haproxy", *argv, "--fqdn", "console.company.com", *backends,
                 "--stats", "127.0.0.1:8404"]) == 0
    example = Path(__file__).parents[2] / "loadbalancer" / name
    assert capsys.readouterr().out == example.read_text()
