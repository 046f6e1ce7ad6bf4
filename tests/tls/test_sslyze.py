"""sslyze against the public TLS listener with a real root/intermediate/leaf chain uploaded.

The scan runs in a worker thread (sslyze blocks) while the proxy keeps serving in the test's loop.
Assertions are made on sslyze's JSON output, as an operator's compliance check would read it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from certutil_helpers import make_chain
from harness import running_proxy

# sslyze is a declared test dependency (pyproject's `test` extra): no skipping.
from sslyze import (
    CertificateInfoExtraArgument,
    ScanCommand,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResultAsJson,
    SslyzeOutputAsJson,
)
from test_tls_proxy import HOST, install_chain

SCAN_TIMEOUT = 180
# sslyze loads its bundled Mozilla/Apple stores too; one of their roots has a non-positive serial
pytestmark = pytest.mark.filterwarnings(
    "ignore:Parsed a serial number:cryptography.utils.CryptographyDeprecationWarning"
)

LEGACY = ["ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"]
COMMANDS = {
    ScanCommand.SSL_2_0_CIPHER_SUITES,
    ScanCommand.SSL_3_0_CIPHER_SUITES,
    ScanCommand.TLS_1_0_CIPHER_SUITES,
    ScanCommand.TLS_1_1_CIPHER_SUITES,
    ScanCommand.TLS_1_2_CIPHER_SUITES,
    ScanCommand.TLS_1_3_CIPHER_SUITES,
    ScanCommand.TLS_COMPRESSION,
    ScanCommand.CERTIFICATE_INFO,
}
WEAK = ("RC4", "3DES", "DES_CBC", "_CBC_", "NULL", "_anon_", "EXPORT", "MD5", "IDEA", "SEED", "CAMELLIA")


def scan(port: int, ca_file: Path, out: Path) -> dict[str, Any]:
    """Run the scan commands against 127.0.0.1:port with SNI ``HOST``; return the JSON document."""
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=HOST, port=port, ip_address="127.0.0.1"),
        scan_commands=COMMANDS,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)
        ),
    )
    started = dt.datetime.now(dt.UTC)
    scanner = Scanner()
    scanner.queue_scans([request])
    results = list(scanner.get_results())
    doc = SslyzeOutputAsJson(
        server_scan_results=[ServerScanResultAsJson.model_validate(r) for r in results],
        invalid_server_strings=[],
        date_scans_started=started,
        date_scans_completed=dt.datetime.now(dt.UTC),
    )
    text = doc.model_dump_json(indent=2)
    out.write_text(text)
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def accepted(result: dict[str, Any], command: str) -> list[str]:
    attempt = result["scan_result"][command]
    assert attempt["status"] == "COMPLETED", (
        command,
        attempt.get("error_reason"),
        attempt.get("error_trace"),
    )
    return [s["cipher_suite"]["name"] for s in attempt["result"]["accepted_cipher_suites"]]


async def test_sslyze_scan_of_the_tls_listener(tmp_path: Path) -> None:
    # A scanner opens hundreds of connections from one address in seconds: the per-source
    # connection rate limit (listener.py) would refuse most of them.
    lim = {"connections_per_ip_per_second": 0, "max_handshakes_per_ip": 0}
    async with running_proxy(tmp_path, listen={"tls": True}, limits=lim) as p:
        chain = make_chain()
        await install_chain(p, chain)
        ca_file = tmp_path / "test-root.pem"
        ca_file.write_text(chain.root.pem)
        out = tmp_path / "sslyze.json"  # kept for inspection on failure
        async with asyncio.timeout(SCAN_TIMEOUT):
            doc = await asyncio.to_thread(scan, p.port, ca_file, out)

    (result,) = doc["server_scan_results"]
    assert result["scan_status"] == "COMPLETED", result.get("connectivity_error_trace")
    assert result["server_location"]["hostname"] == HOST
    assert result["server_location"]["ip_address"] == "127.0.0.1"

    # legacy protocols: nothing accepted at all
    for command in LEGACY:
        assert accepted(result, command) == [], command

    # TLS 1.2: forward secrecy (ECDHE) and AEAD only
    tls12 = accepted(result, "tls_1_2_cipher_suites")
    assert tls12, "TLS 1.2 should be offered for older browsers"
    for name in tls12:
        assert name.startswith("TLS_ECDHE_"), name
        assert "_GCM_" in name or "CHACHA20_POLY1305" in name, name
        assert not any(w in name for w in WEAK), name

    # TLS 1.3 supported
    tls13 = accepted(result, "tls_1_3_cipher_suites")
    assert tls13, "TLS 1.3 not supported"
    assert all(n.startswith("TLS_AES_") or n.startswith("TLS_CHACHA20_") for n in tls13), tls13

    # no TLS compression (CRIME)
    comp = result["scan_result"]["tls_compression"]
    assert comp["status"] == "COMPLETED", comp.get("error_trace")
    assert comp["result"]["supports_compression"] is False

    # the chain sent is complete: leaf + intermediate, in order, without the root; it validates
    # against our test root for the SNI name (sslyze 6 checks the name as part of path validation)
    info = result["scan_result"]["certificate_info"]
    assert info["status"] == "COMPLETED", info.get("error_trace")
    deployments = info["result"]["certificate_deployments"]
    assert deployments
    for dep in deployments:
        received = dep["received_certificate_chain"]
        assert [c["subject"]["rfc4514_string"] for c in received] == [
            "CN=*.consoleproxy.company.com",
            "CN=Test Intermediate CA",
        ]
        assert dep["received_chain_has_valid_order"] is True
        custom = [r for r in dep["path_validation_results"] if r["trust_store"]["path"] == str(ca_file)]
        assert len(custom) == 1, [r["trust_store"] for r in dep["path_validation_results"]]
        assert custom[0]["was_validation_successful"] is True, custom[0]["validation_error"]
        verified = custom[0]["verified_certificate_chain"]
        assert [c["subject"]["rfc4514_string"] for c in verified] == [
            "CN=*.consoleproxy.company.com",
            "CN=Test Intermediate CA",
            "CN=Test Root CA",
        ]
        assert dep["received_chain_contains_anchor_certificate"] is False
