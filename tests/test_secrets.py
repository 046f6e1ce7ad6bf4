"""No secret leaks: the VNC password, the token, the keyring key and the admin key never appear in
any log record (every logger at DEBUG), on stdout/stderr, or in the admin API's bodies.

A whole console runs through the proxy to the demo VNC server with the right password, then one
with a wrong password, then one with a tampered token; everything the process says is collected
and searched. ``consoleproxy token inspect`` must show the password masked.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from harness import Proxy, RFBClient, expect_close, running_proxy

from consoleproxy.policy.tokens import b64url_encode
from consoleproxy.tools.demo import DemoVncServer

PASSWORD = "Qz7-vK2w"  # VNC authentication uses 8 bytes; all 8 are distinctive
WRONG_PASSWORD = "Xr4_mN9p"
VM = "vm-secret-test"
CLIENT_LOGGERS = ("websockets.client",)  # the test's RFB client, not the proxy


def tamper(token: str) -> str:
    """Flip one base64url character in the middle of the token (keeps its shape)."""
    i = len(token) // 2
    while token[i] == ".":
        i += 1
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


def record_text(record: logging.LogRecord) -> str:
    """Everything a handler could emit for a record: message, args, extras, exception, stack."""
    parts = [record.getMessage(), repr(record.msg), repr(record.args), repr(vars(record))]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts)


def assert_absent(haystack: str, secrets: dict[str, str], where: str) -> None:
    for label, secret in secrets.items():
        assert secret not in haystack, f"{label} leaked in {where}"


async def admin_get(p: Proxy, path: str) -> str:
    async with aiohttp.ClientSession(headers=p.admin_headers) as http:
        async with http.get(p.admin + path) as r:
            assert r.status == 200, path
            return await r.text()


async def test_no_secret_in_logs_output_or_admin_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger that propagates
    # also write every record to stderr, formatted as an operator's handler would, so capfd sees
    # what a deployment's log output would contain (and stderr is not trivially empty)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    to_stderr.addFilter(lambda r: not r.name.startswith(CLIENT_LOGGERS))
    logging.getLogger().addHandler(to_stderr)
    vnc = DemoVncServer(password=PASSWORD)
    await vnc.start()
    bodies: dict[str, str] = {}
    try:
        async with running_proxy(tmp_path) as p:
            token = p.token(port=vnc.port, password=PASSWORD, vm=VM)
            wrong = p.token(port=vnc.port, password=WRONG_PASSWORD, vm=VM)
            bad = tamper(token)
            key = p.keyring.issuing[1]
            admin_key = p.server.admin_key

            # 1. the whole console: handshake, a frame, input; admin API read while it is open
            async with RFBClient.connect(p.url(token)) as c:
                await c.handshake()
                assert (c.width, c.height) == (vnc.width, vnc.height)
                await c.request_update()
                assert await c.read_raw_update()
                await c.send(b"\x04\x01\x00\x00\x00\x00\x00\x61")  # KeyEvent 'a' down
                await vnc.wait_for_events(lambda evs: len(evs) >= 1, timeout=10)
                bodies["sessions (open)"] = await admin_get(p, "/api/sessions")
                bodies["metrics (open)"] = await admin_get(p, "/metrics")

            # 2. wrong VNC password: the backend refuses, the proxy reports it
            code, reason = await expect_close(p.url(wrong))
            assert code == 4011, (code, reason)
            assert WRONG_PASSWORD not in reason and PASSWORD not in reason

            # 3. tampered token: refused before any backend connection
            code, reason = await expect_close(p.url(bad))
            assert code is not None and code >= 4000, (code, reason)
            assert bad not in reason and token not in reason

            bodies["sessions (after)"] = await admin_get(p, "/api/sessions")
            bodies["metrics (after)"] = await admin_get(p, "/metrics")
    finally:
        logging.getLogger().removeHandler(to_stderr)
        await vnc.close()

    secrets = {
        "VNC password": PASSWORD,
        "VNC wrong password": WRONG_PASSWORD,
        "token": token,
        "wrong-password token": wrong,
        "tampered token": bad,
        "keyring key (base64url)": b64url_encode(key),
        "keyring key (base64url, padded)": b64url_encode(key) + "=",
        "keyring key (hex)": key.hex(),
        "admin key": admin_key,
    }
    # the strings searched for are real secrets, not something trivially absent
    for label, secret in secrets.items():
        assert len(secret) >= 8, label
    assert len(key) >= 16 and len(token) > 40 and len(admin_key) >= 16
    assert bad != token and len({token, wrong, bad}) == 3

    # the captured text is substantial and describes the sessions, so a leak would show
    # The test's own WebSocket client (the browser's side) logs its request line, token included,
    # at DEBUG: that is a positive control showing the search finds a token in the capture. Only
    # the proxy's side is held to the no-secrets rule.
    client_side = [r for r in caplog.records if r.name.startswith(CLIENT_LOGGERS)]
    assert any(token in record_text(r) for r in client_side), "positive control: client logs the URL"
    records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    logs = "\n".join(record_text(r) for r in records)
    assert records and logs.strip()
    names = {r.name for r in records}
    assert {"consoleproxy", "consoleproxy.audit"} <= names, names
    assert any(r.name.startswith("consoleproxy") for r in records)
    assert VM in logs, "the audit log should name the VM: the capture would see claims if they leaked"
    assert str(vnc.port) in logs
    out, err = capfd.readouterr()
    assert_absent(logs, secrets, "log records")
    assert_absent(out, secrets, "stdout")
    assert_absent(err, secrets, "stderr")
    assert VM in err and "consoleproxy" in err, "stderr should hold the formatted log records"

    sessions_open = json.loads(bodies["sessions (open)"])
    (info,) = sessions_open["sessions"]
    assert info["vm"] == VM
    assert "consoleproxy_sessions_total" in bodies["metrics (after)"]
    for where, body in bodies.items():
        assert body.strip(), where
        assert_absent(body, secrets, f"admin {where}")


@pytest.mark.integration
def test_token_inspect_masks_the_password(tmp_path: Path) -> None:
    from consoleproxy.policy.tokens import Keyring, issue

    keyring = Keyring.generate()
    keys = tmp_path / "keys.json"
    keyring.save(keys)
    token = issue(keyring, host="127.0.0.1", port=5901, vm=VM, password=PASSWORD)
    key = keyring.issuing[1]
    proc = subprocess.run(
        [sys.executable, "-m", "consoleproxy", "token", "inspect", "--keys", str(keys), token],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    claims = json.loads(proc.stdout)
    # the command really decrypted the token (so the password was in hand) and masked it
    assert claims["vm"] == VM and claims["port"] == 5901
    assert claims["password"] == "***"
    everything = proc.stdout + proc.stderr
    for secret in (PASSWORD, token, b64url_encode(key), key.hex()):
        assert len(secret) >= 8
        assert secret not in everything

    # from standard input as well
    proc = subprocess.run(
        [sys.executable, "-m", "consoleproxy", "token", "inspect", "--keys", str(keys), "-"],
        cwd=tmp_path,
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["password"] == "***"
    assert PASSWORD not in proc.stdout + proc.stderr
