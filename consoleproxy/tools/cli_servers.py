"""Command line: the commands that run until stopped (``serve``, ``demo``, ``dns serve``)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from consoleproxy.errors import HostnameError
from consoleproxy.tools.cli_args import UsageError

__all__ = ["cmd_demo", "cmd_dns_serve", "cmd_serve", "use_loop"]


def use_loop(name: str) -> None:
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
    use_loop(args.loop)
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
