"""Diagnostics (consoleproxy/diagnose.py): input checks, the sans-I/O RFB probe, real QEMU, ping.

Bad hosts are refused before anything runs: the tests replace process and socket creation with
functions that fail the test if called.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import require_tool
from harness import free_port, rfb38_none_handshake, running_proxy, tcp_server
from test_real_vnc import qemu
from test_vencrypt import qemu_tls

import consoleproxy.tools.diagnose as diagnose_mod
from consoleproxy.net import vncconn
from consoleproxy.protocol.rfb import LimitExceeded, VersionError
from consoleproxy.protocol.rfb_server import ServerHandshakeState
from consoleproxy.tools import cli
from consoleproxy.tools.diagnose import (
    BadDiagnosticTarget,
    RFBProbe,
    diagnose,
    ping_argv,
    probe,
    run_tool,
    traceroute_argv,
    validate_host,
    validate_port,
)

BAD_HOSTS = [
    "1.2.3.4; rm -rf /",
    "`reboot`",
    "$(reboot)",
    "10.0.0.1 -c 100000",
    "host\nname",
    "1.2.3.4\n",
    "-c",
    "--help",
    "a" * 254,
    "",
    "a..b",
    "host_name",
    "fe80::1%eth0",
    "exämple.com",
    "x|y",
    "a&&b",
    "-leading.example.com",
]


# --- input validation -------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["10.0.0.5", "::1", "2001:db8::5", "kvm-01.example.com", "localhost", "h."])
def test_good_hosts(host: str) -> None:
    assert validate_host(host) == host


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_bad_hosts_raise_a_named_error(host: str) -> None:
    with pytest.raises(BadDiagnosticTarget):
        validate_host(host)


def test_bad_host_messages_say_what_is_wrong() -> None:
    with pytest.raises(BadDiagnosticTarget, match="character ';'"):
        validate_host("1.2.3.4; rm -rf /")
    with pytest.raises(BadDiagnosticTarget, match="starts with '-'"):
        validate_host("-c")
    with pytest.raises(BadDiagnosticTarget, match="at most 253"):
        validate_host("a" * 254)


@pytest.mark.parametrize("port", [0, 65536, -1, "59o0", "", None, True, 5900.0, "1" * 30])
def test_bad_ports(port: Any) -> None:
    with pytest.raises(BadDiagnosticTarget, match="port"):
        validate_port(port)


def test_tool_argv_is_a_vector_with_the_host_last() -> None:
    assert ping_argv("10.0.0.5") == ["ping", "-n", "-c", "3", "-W", "2", "10.0.0.5"]
    assert traceroute_argv("kvm-01")[-1] == "kvm-01"
    with pytest.raises(BadDiagnosticTarget):
        ping_argv("1.2.3.4; id")


@pytest.fixture
def nothing_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connect or process start fails the test."""

    def boom(*a: Any, **kw: Any) -> Any:
        raise AssertionError(f"something ran: {a!r}")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", boom)
    monkeypatch.setattr(asyncio, "open_connection", boom)
    monkeypatch.setattr(vncconn, "open_connection", boom)  # the probe's connect
    monkeypatch.setattr(subprocess, "Popen", boom)
    monkeypatch.setattr(diagnose_mod, "run_tool", boom)
    monkeypatch.setattr(diagnose_mod, "probe", boom)


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_cli_rejects_bad_hosts_with_exit_2(
    host: str, nothing_may_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # "--" makes argparse pass a leading-dash host to our check instead of reading it as an option.
    with pytest.raises(SystemExit) as exc:
        cli.main(["diagnose", "--ping", "--traceroute", "--", host, "5900"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diagnose" in err and "HOST" in err, err


def test_cli_rejects_option_like_hosts_and_bad_ports(
    nothing_may_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["diagnose", "-c", "5900"], ["diagnose", "10.0.0.5", "99999"], ["diagnose", "10.0.0.5"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


async def test_diagnose_function_validates_before_running(nothing_may_run: None) -> None:
    with pytest.raises(BadDiagnosticTarget):
        await diagnose("1.2.3.4; rm -rf /", 5900, ping=True)


async def _post(p: Any, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=p.admin_headers) as http:
        kw: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with http.post(p.admin + "/api/diagnostics", **kw) as r:
            return r.status, await r.json()


async def test_admin_rejects_bad_input_with_400(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*a: Any, **kw: Any) -> Any:
        raise AssertionError("diagnose ran for bad input")

    monkeypatch.setattr(diagnose_mod, "diagnose", boom)
    manual = {"basic_interval_minutes": 0, "advanced_interval_minutes": 0}
    async with running_proxy(tmp_path, health=manual) as p:
        for host in BAD_HOSTS:
            status, body = await _post(p, {"host": host, "port": 5900, "ping": True})
            assert status == 400 and "host" in body["error"], (host, body)
        for bad in ({"host": "10.0.0.5"}, {"host": "10.0.0.5", "port": "x"}, {"host": 5, "port": 5900},
                    {"host": "10.0.0.5", "port": 5900, "ping": "yes"}, ["10.0.0.5", 5900]):
            status, body = await _post(p, bad)
            assert status == 400 and body["error"], (bad, body)
        status, body = await _post(p, None, raw=b"{not json")
        assert status == 400 and "JSON" in body["error"]


# --- the sans-I/O probe -----------------------------------------------------------------------


def _feed(machine: RFBProbe, *chunks: bytes) -> bytes:
    sent = b""
    for c in chunks:
        machine.receive_data(c)
        sent += machine.data_to_send()
    return sent


def test_probe_38_security_types_byte_by_byte() -> None:
    m = RFBProbe()
    data = b"RFB 003.008\n" + b"\x02\x01\x02"
    sent = _feed(m, *(data[i : i + 1] for i in range(len(data))))
    assert sent == b"RFB 003.008\n"  # never picks a security type: nothing to authenticate
    assert m.done and m.server_version == (3, 8) and m.security_types == (1, 2)


def test_probe_33_and_refusal() -> None:
    m = RFBProbe()
    _feed(m, b"RFB 003.003\n", struct.pack(">I", 2))
    assert m.done and m.security_types == (2,)
    m = RFBProbe()
    _feed(m, b"RFB 003.008\n", b"\x00" + struct.pack(">I", 12) + b"too many VMs")
    assert m.done and m.refused == "too many VMs"


def test_probe_vencrypt_up_to_tls() -> None:
    m = RFBProbe()
    subtypes = b"\x02" + struct.pack(">II", 257, 261)
    sent = _feed(m, b"RFB 003.008\n", b"\x01\x13", b"\x00\x02", b"\x00", subtypes)
    assert sent == b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + struct.pack(">I", 261)
    assert m.vencrypt_subtypes == (257, 261) and m.state is ServerHandshakeState.VENCRYPT_SUBTYPE_ACK
    _feed(m, b"\x01")
    assert m.wants_tls and m.tls_subtype == 261


def test_probe_vencrypt_without_x509_stops() -> None:
    m = RFBProbe()
    _feed(m, b"RFB 003.008\n", b"\x01\x13", b"\x00\x02", b"\x00", b"\x01" + struct.pack(">I", 257))
    assert m.done and m.vencrypt_subtypes == (257,) and "no X.509" in (m.note or "")


def test_probe_rejects_non_rfb_and_huge_lists() -> None:
    with pytest.raises(VersionError, match="does not speak RFB"):
        RFBProbe().receive_data(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(LimitExceeded):
        _feed(RFBProbe(), b"RFB 003.008\n", b"\x01\x13", b"\x00\x02", b"\x00", b"\xff")


# --- against servers ------------------------------------------------------------------------


async def test_probe_closed_port_is_a_clear_failure() -> None:
    port = free_port(20000, 30000)
    report = await probe("127.0.0.1", port)
    assert not report.ok and report.error == f"cannot connect to 127.0.0.1:{port}: Connection refused"


@pytest.mark.integration
def test_cli_closed_port_exits_1() -> None:
    port = free_port(20000, 30000)
    run = subprocess.run([sys.executable, "-m", "consoleproxy", "diagnose", "127.0.0.1", str(port)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "FAILED: cannot connect" in run.stdout and "refused" in run.stdout


async def test_probe_fake_server() -> None:
    async with tcp_server(rfb38_none_handshake) as port:
        report = await probe("127.0.0.1", port)
    assert report.ok and report.rfb_version == "3.8"
    assert report.security_types == [{"id": 1, "name": "None"}]
    assert report.connect_seconds is not None and report.connect_seconds >= 0


@pytest.mark.integration
async def test_qemu_without_password(tmp_path: Path) -> None:
    async with qemu(tmp_path) as port:
        report = await diagnose("127.0.0.1", port)
    assert report.ok and report.rfb_version == "3.8", report
    assert [t["name"] for t in report.security_types] == ["None"]


@pytest.mark.integration
async def test_qemu_with_password_through_the_cli(tmp_path: Path) -> None:
    async with qemu(tmp_path, password="diag-pw") as port:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consoleproxy", "diagnose", "127.0.0.1", str(port), "--json",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    report = json.loads(out)
    assert report["rfb_version"] == "3.8"
    assert report["security_types"] == [{"id": 2, "name": "VNC Authentication"}]


@pytest.mark.integration
async def test_qemu_through_the_admin_api(tmp_path: Path) -> None:
    async with qemu(tmp_path) as port, running_proxy(tmp_path) as p:
        status, body = await _post(p, {"host": "127.0.0.1", "port": port})
    assert status == 200 and body["ok"] and body["rfb_version"] == "3.8", body
    assert body["security_types"][0]["name"] == "None"


@pytest.mark.integration
async def test_qemu_vencrypt_certificate(tmp_path: Path) -> None:
    async with qemu_tls(tmp_path) as (port, ca_file):
        trusted = await diagnose("127.0.0.1", port, ca_file=ca_file)
        untrusted = await diagnose("127.0.0.1", port)
    for r in (trusted, untrusted):
        assert r.ok and [t["name"] for t in r.security_types] == ["VeNCrypt"], r
        assert r.vencrypt_version == "0.2" and r.vencrypt_subtypes == [{"id": 260, "name": "X509None"}]
        assert r.certificate is not None and r.certificate["subject"] == "CN=localhost"
        assert "127.0.0.1" in r.certificate["names"] and r.certificate["days_left"] >= 0
    assert trusted.certificate is not None and trusted.certificate["trusted"] is True
    assert untrusted.certificate is not None and untrusted.certificate["trusted"] is False
    assert untrusted.certificate["verify_error"]


@pytest.mark.integration
async def test_ping_localhost_with_real_ping() -> None:
    require_tool("ping", "iputils-ping")
    result = await run_tool(ping_argv("127.0.0.1", count=1), time_limit=20)
    assert result.exit_code == 0, result.output
    assert "127.0.0.1" in result.output and " 0% packet loss" in result.output


@pytest.mark.integration
async def test_diagnose_with_ping_and_traceroute(tmp_path: Path) -> None:
    require_tool("ping", "iputils-ping")
    require_tool("traceroute", "traceroute")
    async with tcp_server(rfb38_none_handshake) as port:
        report = await diagnose("127.0.0.1", port, ping=True, traceroute=True)
    assert report.ok
    assert report.ping is not None and report.ping.exit_code == 0
    assert report.traceroute is not None and report.traceroute.exit_code == 0
    assert "127.0.0.1" in report.traceroute.output
