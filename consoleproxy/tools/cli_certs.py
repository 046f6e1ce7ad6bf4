"""Command line: the TLS certificate store on disk (``certs import|list|verify|rollback``;
DESIGN.md section 6). ``certs acme`` asks the running proxy instead: see ``cli_admin``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from consoleproxy.tools.cli_args import UsageError

if TYPE_CHECKING:
    from consoleproxy.tls.certstore import CertStore

__all__ = ["cmd_certs_import", "cmd_certs_list", "cmd_certs_rollback", "cmd_certs_verify", "open_store"]


def open_store(args: argparse.Namespace) -> CertStore:
    from consoleproxy.tls.certstore import CertStore

    return CertStore(args.store)


def cmd_certs_import(args: argparse.Namespace) -> int:
    from consoleproxy.tls.certchain import Item

    store = open_store(args)
    passphrase = None
    if args.passphrase_file is not None:
        passphrase = args.passphrase_file.read_text(encoding="utf-8").rstrip("\r\n")
    item = Item(
        name=args.name,
        id=args.id,
        certificate=args.certificate.read_text(encoding="utf-8", errors="replace"),
        private_key=(
            args.private_key.read_text(encoding="utf-8", errors="replace") if args.private_key else None
        ),
        domain_suffix=args.domain_suffix,
    )
    result = store.import_item(item, passphrase)
    for w in result.warnings:
        sys.stderr.write(f"warning: {w}\n")
    print(result.message)
    return 0


def cmd_certs_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    print(json.dumps(store.list(), indent=1))
    return 0


def cmd_certs_verify(args: argparse.Namespace) -> int:
    store = open_store(args)
    keys = list(store.live_bundles())
    if not keys:
        raise UsageError(f"no live certificate bundle in {args.store}")
    for key in keys:
        bundle = store.verify(key)
        print(f"{key}: ok, names {', '.join(bundle.names)}, valid until {bundle.not_after.isoformat()}")
        for w in bundle.warnings:
            print(f"  warning: {w}")
    return 0


def cmd_certs_rollback(args: argparse.Namespace) -> int:
    store = open_store(args)
    meta = store.rollback(args.key)
    print(f"rolled back: {json.dumps(meta)}")
    print("reload a running proxy with SIGHUP")
    return 0
