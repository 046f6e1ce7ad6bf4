"""Command line: the network around the proxy — the load balancer in front of it (``loadbalancer
haproxy``) and the hypervisors' VNC ports behind it (``diagnose``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from consoleproxy.tools.cli_args import UsageError

__all__ = ["cmd_diagnose", "cmd_loadbalancer_haproxy"]


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


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Probe a VNC server from here; exit 0 when it answered RFB, 1 when not."""
    from consoleproxy.tools.diagnose import diagnose, format_report

    report = asyncio.run(
        diagnose(args.host, args.port, ping=args.ping, traceroute=args.traceroute,
                 time_limit=args.timeout, ca_file=args.ca_file)
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1
