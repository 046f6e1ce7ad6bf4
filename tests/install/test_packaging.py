"""What ships beside the package (issue 18): the certs/ store folder and the systemd unit."""

from __future__ import annotations

import configparser
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

from consoleproxy.config import load_config
from consoleproxy.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "consoleproxy@.service"


@pytest.mark.integration
def test_certs_is_the_default_store_and_keeps_every_secret_out_of_git() -> None:
    assert load_config(env={}).tls.store == "certs" and (ROOT / "certs").is_dir()
    samples = ["certs/items/server.json", "certs/live/_.consoleproxy.company.com",
               "certs/bundles/_.x-1/key.pem", "certs/dev-ca.key", "certs/previous/x", "certs/any.pem"]
    kept = ["certs/README.md", "certs/.gitignore"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *samples, *kept],
                         cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert out.stdout.split() == samples, out.stdout
    readme = (ROOT / "certs" / "README.md").read_text(encoding="utf-8")
    for part in ("items/", "bundles/", "live/", "previous/", "rollback", "Back up"):
        assert part in readme, part


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_systemd_unit_serves_reloads_and_drains() -> None:
    svc = unit()["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "/opt/consoleproxy/%i/bin/consoleproxy"
    args = build_parser().parse_args(argv[1:])
    assert args.config == "/etc/consoleproxy/consoleproxy.toml"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID" and svc["KillSignal"] == "SIGTERM"
    assert svc["User"] not in ("root", "0")
    # systemd must wait longer than a drain may take before it kills the process.
    assert float(svc["TimeoutStopSec"]) > load_config(env={}).drain.deadline_seconds


@pytest.mark.integration
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    # The installed layout, with ExecStart pointing at this interpreter's consoleproxy.
    script = Path(sys.executable).parent / "consoleproxy"
    copy = tmp_path / "consoleproxy@0.3.0.service"
    copy.write_text(UNIT.read_text().replace("/opt/consoleproxy/%i/bin/consoleproxy", str(script)))
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
