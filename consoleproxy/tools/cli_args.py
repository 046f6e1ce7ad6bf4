"""Command line: argument checks shared by every command group (DESIGN.md section 3).

The argparse types here turn a bad value into one line that names it (argparse adds the
argument); ``UsageError`` is the same for checks made after parsing. Both end in exit 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

__all__ = [
    "EXIT_USAGE",
    "UsageError",
    "diag_host",
    "existing_file",
    "ip",
    "ipv4",
    "port",
    "port_or_zero",
    "positive_int",
    "recording_id",
    "seconds",
    "unix_time",
    "worker_count",
]

EXIT_USAGE = 2


class UsageError(Exception):
    """Raised by argument checks after parsing; printed as one line, exit 2."""


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1-65535")
    return value


def port_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else port(text)


def worker_count(text: str) -> int:
    from consoleproxy.tools.workers import MAX_WORKERS

    if text.strip() == "auto":
        return len(os.sched_getaffinity(0))
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{value} workers is more than {MAX_WORKERS}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a readable file")
    return p


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 600:
        raise argparse.ArgumentTypeError(f"{value:g} s is outside 0.1-600")
    return value


def unix_time(text: str) -> str:
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a Unix time in seconds, got {text!r}") from None
    return text


def recording_id(text: str) -> str:
    from consoleproxy.recordings.recording_store import BadRecordingId, check_id

    try:
        return check_id(text)
    except BadRecordingId as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def diag_host(text: str) -> str:
    from consoleproxy.tools.diagnose import BadDiagnosticTarget, validate_host

    try:
        return validate_host(text)
    except BadDiagnosticTarget as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
