"""The package's layout rule: no class over 300 lines, no module over 600, unless it says why.

A module (or class) may be longer when its docstring has a line starting
``Longer than <N> lines because <reason>`` (the marker; ``<N>`` is the limit it exceeds): a
reader then sees at the top why it is one piece. ``KNOWN`` lists the modules and classes that
were over the limit when the rule came in (issue 17), each with the reason it is not split yet;
the list may only shrink: an entry that is no longer needed fails the test too, so it gets removed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "consoleproxy"
MAX_CLASS_LINES = 300
MAX_MODULE_LINES = 600
MARKER = re.compile(r"^\s*Longer than \d+ lines because \S", re.M)

# "module.py" or "module.py:Class" -> why it is over the limit today.
KNOWN: dict[str, str] = {
    "tls/acme_orders.py:AcmeManager": "one renewal state machine; issue 17 split certstore, not ACME",
    "config.py": "the whole configuration schema, one dataclass a section",
}


def _sizes() -> dict[str, tuple[int, bool]]:
    """Every module and class over its limit -> (lines, has the marker)."""
    over: dict[str, tuple[int, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        name = path.relative_to(PACKAGE).as_posix()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            over[name] = (lines, bool(MARKER.search(ast.get_docstring(tree) or "")))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    over[f"{name}:{node.name}"] = (size, bool(MARKER.search(ast.get_docstring(node) or "")))
    return over


def test_no_long_module_or_class_without_a_reason() -> None:
    unexplained = {
        where: lines for where, (lines, marked) in _sizes().items() if not marked and where not in KNOWN
    }
    assert not unexplained, (
        f"over {MAX_MODULE_LINES} lines (module) or {MAX_CLASS_LINES} (class), split it or say why "
        f"in its docstring ('Longer than N lines because ...'): {unexplained}"
    )


def test_known_exceptions_are_still_needed() -> None:
    over = _sizes()
    stale = sorted(where for where in KNOWN if where not in over or over[where][1])
    assert not stale, f"no longer over the limit (or explained in its docstring): drop from KNOWN: {stale}"


def test_the_marker_is_read_from_docstrings() -> None:
    assert MARKER.search("Text.\n\nLonger than 600 lines because the pipeline is still here.\n")
    assert not MARKER.search("It is longer than it should be.")
    assert not MARKER.search("Longer than 600 lines.")


def _private_reads_of_the_server(path: Path) -> list[str]:
    """``server._x``, ``s._x``, ``self.server._x`` and ``getattr(…, "_x")`` in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            v = node.value
            if (isinstance(v, ast.Name) and v.id in ("server", "s")) or (
                isinstance(v, ast.Attribute) and v.attr == "server"
            ):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            names = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            if names and isinstance(names[0], str) and names[0].startswith("_"):
                found.append(f"{path.name}:{node.lineno} getattr {names[0]}")
    return found


def test_admin_and_health_use_the_control_interface() -> None:
    """They reach the server through control.ProxyControl (mypy checks the types), never its
    private attributes."""
    modules = ("web/admin.py", "web/health.py")
    found = [hit for name in modules for hit in _private_reads_of_the_server(PACKAGE / name)]
    assert not found, found
