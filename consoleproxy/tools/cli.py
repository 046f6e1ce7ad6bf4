"""Command line (DESIGN.md section 3).

Bad arguments exit 2 with one line that names the command and what is wrong; so does a bad
configuration. Operational failures (a file that cannot be written, a server that cannot bind)
exit 1 with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from consoleproxy import __version__
from consoleproxy.errors import ConfigError, ConsoleError, ConsoleProxyError, HostnameError

if TYPE_CHECKING:
    from consoleproxy.tls.certstore import CertStore

EXIT_USAGE = 2


class UsageError(Exception):
    """Raised by argument checks after parsing; printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1-65535")
    return value


def _port_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _port(text)


def _worker_count(text: str) -> int:
    from consoleproxy.tools.workers import MAX_WORKERS

    if text.strip() == "auto":
        return len(os.sched_getaffinity(0))
    value = _positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{value} workers is more than {MAX_WORKERS}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def _existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a readable file")
    return p


# --- keys / token / url ---------------------------------------------------------------------


def _add_token_args(p: argparse.ArgumentParser, *, port_flag: str = "--port", required: bool = True) -> None:
    p.add_argument("--host", required=required, help="hypervisor address of the VM's VNC server")
    p.add_argument(
        port_flag, dest="port", required=required, type=_port, help="VNC port on the hypervisor"
    )
    p.add_argument("--password-file", type=_existing_file, help="file holding the VNC password")
    p.add_argument("--vm", default="", help="VM id (used for per-VM limits and the audit log)")
    p.add_argument("--name", help="VM name shown in the page title")
    p.add_argument("--ttl", type=_positive_int, default=60, help="seconds the token is valid (60)")
    p.add_argument("--client-ip", type=_ip, help="bind the token to this browser address")
    p.add_argument("--view-only", action="store_true", help="drop keyboard and mouse input")
    p.add_argument("--max-duration", type=_positive_int, help="session lifetime cap in seconds")
    p.add_argument(
        "--lang-key-release",
        choices=("send", "drop"),
        help="send or drop the release of the Korean 한/영 and 한자 keys (default: [input] of the proxy)",
    )
    p.add_argument("--keys", default="keys.json", help="keyring file (keys.json)")


def _load_keyring(path: str) -> object:
    from consoleproxy.policy.tokens import Keyring

    try:
        return Keyring.load(path)
    except FileNotFoundError:
        raise UsageError(
            f"keyring {path!r} not found (create one with 'consoleproxy keys generate --out {path}')"
        ) from None


def _issue_from_args(args: argparse.Namespace) -> list[str]:
    from consoleproxy.policy.tokens import Keyring, issue

    keyring = _load_keyring(args.keys)
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
    for token in _issue_from_args(args):
        print(token)
    return 0


def cmd_token_inspect(args: argparse.Namespace) -> int:
    from consoleproxy.policy.tokens import Keyring, decode

    keyring = _load_keyring(args.keys)
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
    tokens = [args.token] if args.token else _issue_from_args(args)
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


# --- servers -------------------------------------------------------------------------------


def _use_loop(name: str) -> None:
    """``serve --loop``: uvloop when installed unless ``asyncio`` is asked for (bench/README.md has
    both measured); the supervisor passes the choice to its workers."""
    if name == "asyncio":
        return
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        if name == "uvloop":
            raise UsageError("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_serve(args: argparse.Namespace) -> int:
    from consoleproxy.config import load_config
    from consoleproxy.lifecycle import run_forever

    cfg = load_config(args.config)
    _use_loop(args.loop)
    if args.worker_index is not None:
        from consoleproxy.tools.workers import worker_config

        try:
            cfg = worker_config(cfg, args.worker_index)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return asyncio.run(run_forever(cfg, worker_index=args.worker_index))
    if args.workers > 1:
        from consoleproxy.tools.workers import Supervisor

        return asyncio.run(Supervisor(args.config, args.workers, cfg, loop=args.loop).run())
    return asyncio.run(run_forever(cfg))


def cmd_demo(args: argparse.Namespace) -> int:
    from consoleproxy.tools.demo_app import run_demo

    return asyncio.run(run_demo(state_dir=Path(args.state_dir), port=args.port, host=args.address))


def cmd_dns_serve(args: argparse.Namespace) -> int:
    from consoleproxy.config import load_config
    from consoleproxy.net.dns import DnsSettings, parse_listen, serve_forever

    cfg = load_config(args.config) if args.config else load_config()
    zone = args.zone or cfg.dns.zone
    listen = args.listen or cfg.dns.listen
    try:
        parse_listen(listen)
        settings = DnsSettings(
            zone=zone,
            listen=listen,
            ttl=cfg.dns.ttl,
            nameservers=tuple(cfg.dns.nameservers),
            apex_addresses=tuple(cfg.dns.apex_addresses),
            public_ranges=tuple(cfg.dns.public_ranges),
            rate_limit_qps=cfg.dns.rate_limit_qps,
        )
    except (ValueError, HostnameError) as exc:
        raise UsageError(str(exc)) from None
    asyncio.run(serve_forever(settings))
    return 0


def _store(args: argparse.Namespace) -> CertStore:
    from consoleproxy.tls.certstore import CertStore

    return CertStore(args.store)


def cmd_certs_import(args: argparse.Namespace) -> int:
    from consoleproxy.tls.certchain import Item

    store = _store(args)
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
    store = _store(args)
    print(json.dumps(store.list(), indent=1))
    return 0


def cmd_certs_verify(args: argparse.Namespace) -> int:
    store = _store(args)
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
    store = _store(args)
    meta = store.rollback(args.key)
    print(f"rolled back: {json.dumps(meta)}")
    print("reload a running proxy with SIGHUP")
    return 0


def _recording_store(args: argparse.Namespace) -> tuple[Any, Any]:
    """The configuration and the local recording store it names (``[recording] store``)."""
    from consoleproxy.config import load_config
    from consoleproxy.recordings.recording_store import FileStore, parse_store

    cfg = load_config(args.config) if args.config else load_config()
    url = parse_store(cfg.recording.store)
    if url.scheme != "file":
        raise UsageError(f"[recording] store {cfg.recording.store!r} is not a local directory")
    return cfg, FileStore(Path(url.path))


def cmd_recordings_list(args: argparse.Namespace) -> int:
    from consoleproxy.recordings.recording_store import matches

    _, store = _recording_store(args)
    filters = {k: v for k in ("vm", "user", "client_ip", "since", "until") if (v := getattr(args, k, None))}
    items = [m for m in (store.entries() if store.dir.is_dir() else []) if matches(m, filters)]
    if args.json:
        print(json.dumps(items, indent=1))
        return 0
    for m in items:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(m.get("started", 0))))
        print(f"{m['id']}  {started}Z  vm={m.get('vm') or '-'}  client={m.get('client_ip') or '-'}  "
              f"{m.get('state')}  {m.get('size', 0)} bytes")
    return 0


def cmd_recordings_export(args: argparse.Namespace) -> int:
    import shutil

    from consoleproxy.recordings.recording_store import check_file

    _, store = _recording_store(args)
    path = store.path(args.id)
    if not path.exists():
        raise UsageError(f"no recording {args.id} in {store.dir}")
    if path.name.endswith(".part"):
        raise UsageError(f"recording {args.id} is still being recorded")
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out} exists; not overwritten")
    check_file(path)  # a damaged recording: RecordingCorrupt names where
    shutil.copyfile(path, out)
    print(f"{args.id} -> {out} ({out.stat().st_size} bytes)")
    return 0


def cmd_recordings_play_url(args: argparse.Namespace) -> int:
    from consoleproxy.recordings.recording_store import check_id

    cfg, _ = _recording_store(args)
    check_id(args.id)
    host = cfg.admin.address
    if ":" in host:
        host = f"[{host}]"
    # The page asks for the admin key itself; it never goes into the URL.
    print(f"http://{host}:{cfg.admin.port}/recordings/{args.id}")
    return 0
def _admin_call(args: argparse.Namespace, method: str, path: str) -> tuple[int, dict[str, Any]]:
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
        code, body = _admin_call(args, "GET", "/api/certificates/acme")
    else:
        code, body = _admin_call(args, "POST", "/api/certificates/acme/renew")
    print(json.dumps(body, indent=1))
    if code == 404:
        raise UsageError(str(body.get("error", "[acme] is not enabled on the proxy")))
    return 0 if code == 200 else 1


def cmd_loadbalancer_haproxy(args: argparse.Namespace) -> int:
    from consoleproxy.tools.loadbalancer import haproxy_config, parse_backend

    try:
        backends = [parse_backend(b) for b in args.backend]
        text = haproxy_config(
            fqdn=args.fqdn,
            backends=backends,
            mode=args.mode,
            bind=args.bind,
            certificate=args.certificate,
            check_interval_ms=args.check_interval_ms,
            stats_bind=args.stats,
            maxconn=args.maxconn,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(text)
    return 0


def _diag_host(text: str) -> str:
    from consoleproxy.tools.diagnose import BadDiagnosticTarget, validate_host

    try:
        return validate_host(text)
    except BadDiagnosticTarget as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 600:
        raise argparse.ArgumentTypeError(f"{value:g} s is outside 0.1-600")
    return value


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Probe a VNC server from here; exit 0 when it answered RFB, 1 when not."""
    from consoleproxy.tools.diagnose import diagnose, format_report

    report = asyncio.run(
        diagnose(args.host, args.port, ping=args.ping, traceroute=args.traceroute,
                 time_limit=args.timeout, ca_file=args.ca_file)
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


# --- parser --------------------------------------------------------------------------------


def _unix_time(text: str) -> str:
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a Unix time in seconds, got {text!r}") from None
    return text


def _recording_id(text: str) -> str:
    from consoleproxy.recordings.recording_store import BadRecordingId, check_id

    try:
        return check_id(text)
    except BadRecordingId as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="consoleproxy", description="Console proxy: noVNC in the browser, VNC behind.")
    parser.add_argument("--version", action="version", version=f"consoleproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", help="configuration file (consoleproxy.toml)")
    p.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        help="processes sharing the public ports (SO_REUSEPORT); 'auto' = one per CPU (default 1)",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "auto"),
        default="auto",
        help="event loop: auto (default) = uvloop when installed, else asyncio; uvloop (must be "
        "installed); asyncio",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="proxy + demo VNC server + development keyring; prints a URL")
    p.add_argument(
        "--port", type=_port_or_zero, default=8443, help="public port (8443; 0 = any free)"
    )
    p.add_argument("--address", default="127.0.0.1", help="public address (127.0.0.1)")
    p.add_argument("--state-dir", default="demo-state", help="where the demo keeps its files")
    p.set_defaults(func=cmd_demo)

    keys = sub.add_parser("keys", help="token keyrings").add_subparsers(
        dest="keys_command", required=True, parser_class=_Parser
    )
    p = keys.add_parser("generate", help="write a new keyring (kid -> 256-bit key)")
    p.add_argument("--out", default="keys.json", help="keyring file to write (keys.json)")
    p.add_argument("--count", type=_positive_int, default=1, help="number of keys (1)")
    p.add_argument("--rotate", action="store_true", help="add a new issuing key to an existing ring")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_keys_generate)

    token = sub.add_parser("token", help="console tokens").add_subparsers(
        dest="token_command", required=True, parser_class=_Parser
    )
    p = token.add_parser("issue", help="print a token for one VM console")
    _add_token_args(p)
    p.add_argument("--count", type=_positive_int, default=1, help="print N tokens, one a line")
    p.set_defaults(func=cmd_token_issue)
    p = token.add_parser("inspect", help="decrypt a token and show its claims (password masked)")
    p.add_argument("token", help="the token, or - to read it from standard input")
    p.add_argument("--keys", default="keys.json", help="keyring file (keys.json)")
    p.set_defaults(func=cmd_token_inspect)

    # In `url`, --port is the public port of the URL (DESIGN 3), so the VNC port is --vnc-port.
    p = sub.add_parser("url", help="print a full console URL (issues a token unless --token)")
    _add_token_args(p, port_flag="--vnc-port", required=False)
    p.add_argument("--token", help="use this token instead of issuing one")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--public-ip", type=_ipv4, help="the proxy's public IPv4 address")
    where.add_argument("--fqdn", help="the proxies' common name (load-balanced mode)")
    p.add_argument("--domain-suffix", help="wildcard suffix, e.g. '*.consoleproxy.company.com'")
    p.add_argument("--port", dest="listen_port", type=_port, default=443, help="public port (443)")
    p.set_defaults(func=cmd_url)

    dns = sub.add_parser("dns", help="DNS responder for a-b-c-d names").add_subparsers(
        dest="dns_command", required=True, parser_class=_Parser
    )
    p = dns.add_parser("serve", help="run only the DNS responder")
    p.add_argument("--zone", help="zone (the domain suffix without '*.')")
    p.add_argument("--listen", help="ADDRESS:PORT (0.0.0.0:53)")
    p.add_argument("--config", help="configuration file for the [dns] section")
    p.set_defaults(func=cmd_dns_serve)

    certs = sub.add_parser("certs", help="the TLS certificate store").add_subparsers(
        dest="certs_command", required=True, parser_class=_Parser
    )
    p = certs.add_parser("import", help="add or replace one item (root, intermediate or server)")
    p.add_argument("--store", default="certs", help="store directory (certs)")
    p.add_argument("--name", required=True, help="item name, e.g. root1, intermed1, server")
    p.add_argument(
        "--id", required=True, type=_positive_int, help="1 root, 2.. intermediates, server last"
    )
    p.add_argument("--certificate", required=True, type=_existing_file, help="PEM certificate file")
    p.add_argument("--private-key", type=_existing_file, help="PKCS#8 key file (server item only)")
    p.add_argument("--passphrase-file", type=_existing_file, help="passphrase of an encrypted key")
    p.add_argument("--domain-suffix", help="'*.consoleproxy.company.com' or an FQDN (server item)")
    p.set_defaults(func=cmd_certs_import)
    for verb, func, text in (
        ("list", cmd_certs_list, "show items and live bundles (never keys)"),
        ("verify", cmd_certs_verify, "check every live bundle"),
        ("rollback", cmd_certs_rollback, "restore the previous bundle"),
    ):
        p = certs.add_parser(verb, help=text)
        p.add_argument("--store", default="certs", help="store directory (certs)")
        if verb == "rollback":
            p.add_argument("--key", help="which bundle (its suffix or FQDN) when there are several")
        p.set_defaults(func=func)
    acme = certs.add_parser("acme", help="automatic certificates ([acme]) of the running proxy")
    acme_sub = acme.add_subparsers(dest="acme_command", required=True, parser_class=_Parser)
    for verb, text in (
        ("status", "names, live certificate, last result and error, next attempt"),
        ("renew-now", "order a certificate now and wait for the result (exit 1 when it failed)"),
    ):
        p = acme_sub.add_parser(verb, help=text)
        p.add_argument("--config", help="configuration file: where the admin API listens, its key")
        p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds to wait (300)")
        p.set_defaults(func=cmd_certs_acme)

    rec = sub.add_parser("recordings", help="console recordings in [recording] store").add_subparsers(
        dest="recordings_command", required=True, parser_class=_Parser
    )
    p = rec.add_parser("list", help="list recordings (filters: --vm, --user, --client-ip, --since, --until)")
    p.add_argument("--config", help="configuration file (consoleproxy.toml)")
    p.add_argument("--vm", help="only this VM")
    p.add_argument("--user", help="only this user")
    p.add_argument("--client-ip", help="only this client address")
    p.add_argument("--since", type=_unix_time, help="started at or after this Unix time")
    p.add_argument("--until", type=_unix_time, help="started at or before this Unix time")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recordings_list)
    p = rec.add_parser("export", help="check a recording and copy it to a file")
    p.add_argument("id", metavar="ID", type=_recording_id)
    p.add_argument("--out", required=True, help="file to write (not overwritten)")
    p.add_argument("--config", help="configuration file (consoleproxy.toml)")
    p.set_defaults(func=cmd_recordings_export)
    p = rec.add_parser("play-url", help="print the playback page's URL on the admin listener")
    p.add_argument("id", metavar="ID", type=_recording_id)
    p.add_argument("--config", help="configuration file (consoleproxy.toml)")
    p.set_defaults(func=cmd_recordings_play_url)

    lb = sub.add_parser("loadbalancer", help="load-balancer configuration").add_subparsers(
        dest="lb_command", required=True, parser_class=_Parser
    )
    p = lb.add_parser("haproxy", help="print an HAProxy configuration for several proxies")
    p.add_argument("--fqdn", required=True, help="the one name browsers use")
    p.add_argument("--backend", action="append", required=True, metavar="HOST:PORT",
                   help="a proxy instance (repeat for each)")
    p.add_argument("--mode", choices=("passthrough", "http"), default="passthrough",
                   help="passthrough: proxies terminate TLS (PROXY v2); http: HAProxy does")
    p.add_argument("--bind", default="*:443", help="HAProxy's listening address (*:443)")
    p.add_argument("--certificate", default="/etc/haproxy/certs/consoleproxy.pem",
                   help="PEM with key and chain, for --mode http")
    p.add_argument("--check-interval-ms", type=_positive_int, default=2000,
                   help="health-check interval (2000)")
    p.add_argument("--stats", metavar="ADDR:PORT", help="also serve HAProxy's stats page here")
    p.add_argument("--maxconn", type=_positive_int,
                   help="HAProxy's global maxconn (default: from its file-descriptor limit)")
    p.set_defaults(func=cmd_loadbalancer_haproxy)

    p = sub.add_parser("diagnose", help="probe a hypervisor's VNC port: connect time, RFB version, security")
    p.add_argument("host", metavar="HOST", type=_diag_host, help="IP address or host name of the VNC server")
    p.add_argument("port", metavar="PORT", type=_port, help="its VNC port")
    p.add_argument("--ping", action="store_true", help="also run ping (iputils)")
    p.add_argument("--traceroute", action="store_true", help="also run traceroute")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds for each step (5)")
    p.add_argument("--ca-file", type=_existing_file, help="CA to check the VNC server's TLS certificate")
    p.set_defaults(func=cmd_diagnose)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    prog = "consoleproxy " + " ".join(
        str(v)
        for k in (
            "command", "keys_command", "token_command", "dns_command", "lb_command", "certs_command",
            "recordings_command",
            "acme_command",
        )
        if (v := getattr(args, k, None))
    )
    try:
        return func(args)
    except UsageError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except ConfigError as exc:
        sys.stderr.write(f"{prog}: configuration error: {exc}\n")
        return EXIT_USAGE
    except ConsoleError as exc:
        sys.stderr.write(f"{prog}: error: {exc.reason}: {exc}\n")
        return EXIT_USAGE
    except ConsoleProxyError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
