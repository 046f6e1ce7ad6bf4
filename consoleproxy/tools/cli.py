"""Command line (DESIGN.md section 3): the argparse tree of every subcommand, and ``main``.

Bad arguments exit 2 with one line that names the command and what is wrong; so does a bad
configuration. Operational failures (a file that cannot be written, a server that cannot bind)
exit 1 with one line. The handlers live in one module a command group: ``cli_tokens`` (keys,
token, url), ``cli_servers`` (serve, demo, dns serve), ``cli_certs`` (the certificate store),
``cli_admin`` (certs acme, through the admin API), ``cli_recordings``, ``cli_network``
(loadbalancer haproxy, diagnose); ``cli_args`` holds the argument types and ``UsageError``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from consoleproxy import __version__
from consoleproxy.errors import ConfigError, ConsoleError, ConsoleProxyError
from consoleproxy.tools import cli_args
from consoleproxy.tools.cli_admin import cmd_certs_acme
from consoleproxy.tools.cli_args import EXIT_USAGE, UsageError
from consoleproxy.tools.cli_certs import (
    cmd_certs_import,
    cmd_certs_list,
    cmd_certs_rollback,
    cmd_certs_verify,
)
from consoleproxy.tools.cli_network import cmd_diagnose, cmd_loadbalancer_haproxy
from consoleproxy.tools.cli_recordings import (
    cmd_recordings_export,
    cmd_recordings_list,
    cmd_recordings_play_url,
)
from consoleproxy.tools.cli_servers import cmd_demo, cmd_dns_serve, cmd_serve
from consoleproxy.tools.cli_tokens import cmd_keys_generate, cmd_token_inspect, cmd_token_issue, cmd_url

__all__ = ["EXIT_USAGE", "UsageError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _add_token_args(p: argparse.ArgumentParser, *, port_flag: str = "--port", required: bool = True) -> None:
    p.add_argument("--host", required=required, help="hypervisor address of the VM's VNC server")
    p.add_argument(
        port_flag, dest="port", required=required, type=cli_args.port, help="VNC port on the hypervisor"
    )
    p.add_argument("--password-file", type=cli_args.existing_file, help="file holding the VNC password")
    p.add_argument("--vm", default="", help="VM id (used for per-VM limits and the audit log)")
    p.add_argument("--name", help="VM name shown in the page title")
    p.add_argument("--ttl", type=cli_args.positive_int, default=60, help="seconds the token is valid (60)")
    p.add_argument("--client-ip", type=cli_args.ip, help="bind the token to this browser address")
    p.add_argument("--view-only", action="store_true", help="drop keyboard and mouse input")
    p.add_argument("--max-duration", type=cli_args.positive_int, help="session lifetime cap in seconds")
    p.add_argument(
        "--lang-key-release",
        choices=("send", "drop"),
        help="send or drop the release of the Korean 한/영 and 한자 keys (default: [input] of the proxy)",
    )
    p.add_argument("--keys", default="keys.json", help="keyring file (keys.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="consoleproxy", description="Console proxy: noVNC in the browser, VNC behind.")
    parser.add_argument("--version", action="version", version=f"consoleproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", help="configuration file (consoleproxy.toml)")
    p.add_argument(
        "--workers",
        type=cli_args.worker_count,
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
        "--port", type=cli_args.port_or_zero, default=8443, help="public port (8443; 0 = any free)"
    )
    p.add_argument("--address", default="127.0.0.1", help="public address (127.0.0.1)")
    p.add_argument("--state-dir", default="demo-state", help="where the demo keeps its files")
    p.set_defaults(func=cmd_demo)

    keys = sub.add_parser("keys", help="token keyrings").add_subparsers(
        dest="keys_command", required=True, parser_class=_Parser
    )
    p = keys.add_parser("generate", help="write a new keyring (kid -> 256-bit key)")
    p.add_argument("--out", default="keys.json", help="keyring file to write (keys.json)")
    p.add_argument("--count", type=cli_args.positive_int, default=1, help="number of keys (1)")
    p.add_argument("--rotate", action="store_true", help="add a new issuing key to an existing ring")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_keys_generate)

    token = sub.add_parser("token", help="console tokens").add_subparsers(
        dest="token_command", required=True, parser_class=_Parser
    )
    p = token.add_parser("issue", help="print a token for one VM console")
    _add_token_args(p)
    p.add_argument("--count", type=cli_args.positive_int, default=1, help="print N tokens, one a line")
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
    where.add_argument("--public-ip", type=cli_args.ipv4, help="the proxy's public IPv4 address")
    where.add_argument("--fqdn", help="the proxies' common name (load-balanced mode)")
    p.add_argument("--domain-suffix", help="wildcard suffix, e.g. '*.consoleproxy.company.com'")
    p.add_argument("--port", dest="listen_port", type=cli_args.port, default=443, help="public port (443)")
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
        "--id", required=True, type=cli_args.positive_int, help="1 root, 2.. intermediates, server last"
    )
    p.add_argument("--certificate", required=True, type=cli_args.existing_file, help="PEM certificate file")
    p.add_argument("--private-key", type=cli_args.existing_file, help="PKCS#8 key file (server item only)")
    p.add_argument("--passphrase-file", type=cli_args.existing_file, help="passphrase of an encrypted key")
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
        p.add_argument("--timeout", type=cli_args.seconds, default=300.0, help="seconds to wait (300)")
        p.set_defaults(func=cmd_certs_acme)

    rec = sub.add_parser("recordings", help="console recordings in [recording] store").add_subparsers(
        dest="recordings_command", required=True, parser_class=_Parser
    )
    p = rec.add_parser("list", help="list recordings (filters: --vm, --user, --client-ip, --since, --until)")
    p.add_argument("--config", help="configuration file (consoleproxy.toml)")
    p.add_argument("--vm", help="only this VM")
    p.add_argument("--user", help="only this user")
    p.add_argument("--client-ip", help="only this client address")
    p.add_argument("--since", type=cli_args.unix_time, help="started at or after this Unix time")
    p.add_argument("--until", type=cli_args.unix_time, help="started at or before this Unix time")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recordings_list)
    p = rec.add_parser("export", help="check a recording and copy it to a file")
    p.add_argument("id", metavar="ID", type=cli_args.recording_id)
    p.add_argument("--out", required=True, help="file to write (not overwritten)")
    p.add_argument("--config", help="configuration file (consoleproxy.toml)")
    p.set_defaults(func=cmd_recordings_export)
    p = rec.add_parser("play-url", help="print the playback page's URL on the admin listener")
    p.add_argument("id", metavar="ID", type=cli_args.recording_id)
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
    p.add_argument("--check-interval-ms", type=cli_args.positive_int, default=2000,
                   help="health-check interval (2000)")
    p.add_argument("--stats", metavar="ADDR:PORT", help="also serve HAProxy's stats page here")
    p.add_argument("--maxconn", type=cli_args.positive_int,
                   help="HAProxy's global maxconn (default: from its file-descriptor limit)")
    p.set_defaults(func=cmd_loadbalancer_haproxy)

    p = sub.add_parser("diagnose", help="probe a hypervisor's VNC port: connect time, RFB version, security")
    p.add_argument(
        "host", metavar="HOST", type=cli_args.diag_host, help="IP address or host name of the VNC server"
    )
    p.add_argument("port", metavar="PORT", type=cli_args.port, help="its VNC port")
    p.add_argument("--ping", action="store_true", help="also run ping (iputils)")
    p.add_argument("--traceroute", action="store_true", help="also run traceroute")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timeout", type=cli_args.seconds, default=5.0, help="seconds for each step (5)")
    p.add_argument(
        "--ca-file", type=cli_args.existing_file, help="CA to check the VNC server's TLS certificate"
    )
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
