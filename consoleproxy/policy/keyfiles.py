"""What the two token formats share: reading their key files, strict JSON, safe excerpts.

tokens.py (our keyring) and cloudstack.py (the management server's key/IV file) read a small
JSON file of secrets and decode attacker-chosen JSON; each error names the file, never a key
byte, and quotes attacker input only cut short. Pure code but for :func:`load_key_file`'s read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from consoleproxy.errors import ConsoleProxyError

__all__ = ["json_document", "load_key_file", "short", "strict_json"]

T = TypeVar("T")


def short(value: object) -> str:
    """repr() of an attacker-chosen value, cut so it cannot flood a log line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for key, value in pairs:
        if key in d:
            raise ValueError(f"duplicate key {short(key)}")
        d[key] = value
    return d


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes) -> Any:
    """JSON as RFC 8259 means it: UTF-8, no NaN/Infinity, no duplicate member names. Any defect,
    nesting too deep included, raises ``ValueError``."""
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_document(text: str, what: str, error: type[ConsoleProxyError]) -> Any:
    """A key file's JSON; not JSON raises ``error`` naming ``what`` and where it broke."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not JSON (line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError):
        raise error(f"{what} is not JSON") from None


def load_key_file(
    path: str | os.PathLike[str], parse: Callable[[str], T], error: type[ConsoleProxyError]
) -> T:
    """Read a UTF-8 key file and ``parse`` it; a defect raises ``error`` prefixed with the path.

    A missing file raises ``FileNotFoundError``: each caller words that itself (the CLI names
    the command that creates the keyring)."""
    name = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except UnicodeDecodeError:
        raise error(f"{name}: not UTF-8 text") from None
    except OSError as exc:
        raise error(f"{name}: cannot read ({exc.strerror})") from None
    try:
        return parse(text)
    except error as exc:
        raise error(f"{name}: {exc}") from None
