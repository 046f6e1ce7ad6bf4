"""Command line: token keyrings, console tokens and console URLs (``keys generate``,
``token issue|inspect``, ``url``; DESIGN.md sections 3 and 5)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from consoleproxy.errors import HostnameError
from consoleproxy.tools.cli_args import UsageError

__all__ = [
    "cmd_keys_generate",
    "cmd_token_inspect",
    "cmd_token_issue",
    "cmd_url",
    "console_url",
    "issue_from_args",
    "load_keyring",
]


def load_keyring(path: str) -> object:
    from consoleproxy.policy.tokens import Keyring

    try:
        return Keyring.load(path)
    except FileNotFoundError:
        raise UsageError(
            f"keyring {path!r} not found (create one with 'consoleproxy keys generate --out {path}')"
        ) from None


def issue_from_args(args: argparse.Namespace) -> list[str]:
    from consoleproxy.policy.tokens import Keyring, issue

    keyring = load_keyring(args.keys)
    assert isinstance(keyring, Keyring)
    password = None
    if args.password_file is not None:
        password = args.password_file.read_text(encoding="utf-8").rstrip("\r\n")
    try:
        return [
            issue(
                keyring,
                host=args.host,
                port=args.port,
                vm=args.vm,
                password=password,
                name=args.name,
                ttl=args.ttl,
                client_ip=args.client_ip,
                view_only=args.view_only,
                max_duration=args.max_duration,
                lang_key_release=args.lang_key_release,
            )
            for _ in range(getattr(args, "count", 1))
        ]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from consoleproxy.policy.tokens import Keyring

    out = Path(args.out)
    if out.exists() and not args.force:
        if not args.rotate:
            raise UsageError(f"{out} exists; use --rotate to add a new issuing key or --force")
        ring = Keyring.load(out).rotate()
    else:
        ring = Keyring.generate(args.count)
    ring.save(out)
    print(f"wrote {out} ({len(ring.keys)} key(s); issuing kid {ring.keys[0][0]})")
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    for token in issue_from_args(args):
        print(token)
    return 0


def cmd_token_inspect(args: argparse.Namespace) -> int:
    from consoleproxy.policy.tokens import Keyring, decode

    keyring = load_keyring(args.keys)
    assert isinstance(keyring, Keyring)
    token = args.token if args.token != "-" else sys.stdin.read().strip()  # noqa: S105 - "-" means stdin
    claims = decode(keyring, token)
    print(json.dumps(claims.masked_dict(), indent=2, sort_keys=True))
    return 0


def console_url(
    token: str,
    *,
    public_ip: str | None = None,
    fqdn: str | None = None,
    domain_suffix: str | None = None,
    port: int = 443,
) -> str:
    """The console URL a browser opens, in wildcard form or FQDN form (DESIGN.md 5)."""
    from consoleproxy.protocol.hostnames import hostname_for_ip, normalize_suffix

    if fqdn:
        host = normalize_suffix(fqdn)
    elif public_ip and domain_suffix:
        host = hostname_for_ip(public_ip, domain_suffix)
    elif public_ip:
        host = public_ip
    else:
        raise UsageError("give --public-ip (with --domain-suffix for the a-b-c-d form) or --fqdn")
    netloc = host if port == 443 else f"{host}:{port}"
    return f"https://{netloc}/console?token={token}"


def cmd_url(args: argparse.Namespace) -> int:
    if not args.token and (args.host is None or args.port is None):
        raise UsageError("give --token, or --host and --vnc-port to issue one")
    tokens = [args.token] if args.token else issue_from_args(args)
    try:
        for token in tokens:
            print(
                console_url(
                    token,
                    public_ip=args.public_ip,
                    fqdn=args.fqdn,
                    domain_suffix=args.domain_suffix,
                    port=args.listen_port,
                )
            )
    except HostnameError as exc:
        raise UsageError(str(exc)) from None
    return 0
