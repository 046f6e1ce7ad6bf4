"""Drop-in for CloudStack/Mold: a token made by Java (as the management server makes it), opened
at CloudStack's page path in Chromium, through the proxy, to real QEMU."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from harness import Proxy, expect_close, running_proxy
from test_page import CANVAS_NOT_UNIFORM, browser, origin
from test_real_vnc import qemu

from consoleproxy.policy.cloudstack import CloudStackKeys

pytestmark = pytest.mark.integration  # Java, QEMU, Chromium


def java_token(tmp_path: Path, keys: CloudStackKeys, fields: dict[str, Any], form: str = "gcm") -> str:
    javac = require_tool("javac", "default-jdk-headless")
    java = require_tool("java", "default-jdk-headless")
    classes = tmp_path / "classes"
    if not (classes / "CloudStackToken.class").exists():
        src = Path(__file__).parents[1] / "java" / "CloudStackToken.java"
        subprocess.run([javac, "-d", str(classes), str(src)], check=True, capture_output=True, timeout=120)
    k = base64.urlsafe_b64encode(keys.key_bytes).decode()
    iv = base64.urlsafe_b64encode(keys.iv_bytes).decode()
    r = subprocess.run(
        [java, "-cp", str(classes), "CloudStackToken", form, k, iv, json.dumps(fields)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.stdout.strip()


def cs_sections(tmp_path: Path, keys: CloudStackKeys) -> dict[str, dict[str, Any]]:
    keyiv = tmp_path / "keyiv.json"
    keyiv.write_text(keys.dumps())
    return {
        "tokens": {"format": "cloudstack"},
        "cloudstack": {"key_iv_file": str(keyiv), "check_extra": True},
    }


def fields_for(port: int, password: str | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "clientHostAddress": "127.0.0.1",
        "clientHostPort": port,
        "clientTag": "0b9f6c2e-vm",
        "clientDisplayName": "i-2-7-VM",
        "sessionUuid": str(uuid.uuid4()),
        "extraSecurityToken": "extra-123",
        "locale": "en",
    }
    if password is not None:
        out["clientHostPassword"] = password
    out.update(kw)
    return out


async def test_java_token_through_the_page_to_qemu(tmp_path: Path) -> None:
    keys = CloudStackKeys.generate()
    async with (
        qemu(tmp_path, password="cs-pw") as port,
        running_proxy(tmp_path, **cs_sections(tmp_path, keys)) as p,
    ):
        fields = fields_for(port, "cs-pw")
        token = java_token(tmp_path, keys, fields)
        async with browser(p) as br:
            url = (
                f"{origin(p)}/resource/noVNC/vnc.html?autoconnect=true&show_dot=true"
                f"&port={p.port}&token={token}&extra=extra-123&language=en"
            )
            await br.page.goto(url)
            await br.wait_state("connected")
            await br.page.wait_for_function(CANVAS_NOT_UNIFORM, polling=100, timeout=45_000)
            br.assert_clean()
        # the same sessionUuid again: 4003
        code, _ = await expect_close(ws_url(p, token, "extra-123"))
        assert code == 4003


def ws_url(p: Proxy, token: str, extra: str | None = None) -> str:
    url = p.url(token)
    return url + (f"&extra={extra}" if extra is not None else "")


async def test_refusals(tmp_path: Path) -> None:
    keys = CloudStackKeys.generate()
    async with running_proxy(tmp_path, **cs_sections(tmp_path, keys)) as p:
        token = java_token(tmp_path, keys, fields_for(5900))
        tampered = token[:8] + ("A" if token[8] != "A" else "B") + token[9:]
        assert (await expect_close(ws_url(p, tampered, "extra-123")))[0] == 4001
        code, reason = await expect_close(ws_url(p, token, "wrong"))
        assert code == 4004 and "extra" in reason
        cbc = java_token(tmp_path, keys, fields_for(5900), form="cbc")
        code, reason = await expect_close(ws_url(p, cbc, "nope"))
        assert code == 4004  # decrypted (CBC form accepted), then refused for its extra token


async def test_page_port_and_websocket_port(tmp_path: Path) -> None:
    """CloudStack's layout: the page on one port (443), the WebSocket on another (8443, port=)."""
    from test_page import demo_server

    keys = CloudStackKeys.generate()
    sections = cs_sections(tmp_path, keys)
    async with demo_server() as demo, running_proxy(tmp_path, listen={"ports": [0, 0]}, **sections) as p:
        page_port, ws_port = p.server.public_ports
        assert page_port != ws_port
        token = java_token(tmp_path, keys, fields_for(demo.port, demo.password))
        async with browser(p) as br:
            await br.page.goto(
                f"http://127.0.0.1:{page_port}/resource/noVNC/vnc.html?autoconnect=true"
                f"&port={ws_port}&token={token}&extra=extra-123&language=en"
            )
            await br.wait_state("connected")
            assert br.websockets[-1] == (f"ws://127.0.0.1:{ws_port}/websockify?token={token}&extra=extra-123&resume=1")
