"""Command line: commands that ask the running proxy through its admin API (``certs acme
status|renew-now``), with the one HTTP client they share ([admin] address, port and key_file)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from consoleproxy.tools.cli_args import UsageError

__all__ = ["admin_call", "cmd_certs_acme"]


def admin_call(args: argparse.Namespace, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One request to the running proxy's admin API ([admin] address, port and key_file)."""
    import urllib.error
    import urllib.request

    from consoleproxy.config import load_config

    cfg = load_config(args.config) if args.config else load_config()
    a = cfg.admin
    key_path = cfg.path(a.key_file)
    try:
        key = key_path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the admin key {key_path}: {exc.strerror or exc}") from None
    host = a.address if a.address not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    req = urllib.request.Request(
        f"http://{host}:{a.port}{path}", method=method, headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:  # noqa: S310 (http to our admin)
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {"error": f"HTTP {exc.code}"}
        return exc.code, body
    except (urllib.error.URLError, TimeoutError) as exc:
        raise UsageError(f"the proxy's admin API on {host}:{a.port} does not answer: {exc}") from None


def cmd_certs_acme(args: argparse.Namespace) -> int:
    """status: the renewal state; renew-now: order now and wait for the result."""
    if args.acme_command == "status":
        code, body = admin_call(args, "GET", "/api/certificates/acme")
    else:
        code, body = admin_call(args, "POST", "/api/certificates/acme/renew")
    print(json.dumps(body, indent=1))
    if code == 404:
        raise UsageError(str(body.get("error", "[acme] is not enabled on the proxy")))
    return 0 if code == 200 else 1
