"""No module of consoleproxy/ uses a name with a leading underscore that belongs to another package.

Such a name is private to its owner: the next release may rename it (aiohttp 3.13 dropped
``RequestHandler._data_received_cb``, and every console ended with 1011). The rule, checked on the
AST of every module, without type inference:

- ``from x import _y``, ``from x._y import z``, ``import x._y``: ``x`` not ours is a violation;
- ``base._name`` (load, store or delete), ``getattr``/``setattr``/``hasattr``/``delattr`` with a
  literal ``"_name"``: a violation when the chain starts at a name imported from another package
  (``asyncio.constants._SendfileMode``); on ``self``/``cls`` unless the package defines ``_name``
  somewhere (a mixin may live in another module); on any other object unless *this module* defines
  ``_name`` (a function, class or variable, a ``self._name``/``cls._name`` assignment, a class-body
  field, a ``__slots__`` entry). So ``other._keys`` in our own ``__eq__`` is fine, while
  ``site._server`` (aiohttp's) and ``server._page_dirs`` (another module's private) are not;
- a class of ours that defines, in its body, a private name one of its foreign base classes has
  (overriding aiohttp's ``_post_start``), checked on the imported class; such a name counts as
  foreign everywhere in the package.

Without type inference some forms slip through: a foreign private spelled exactly like a private
of the same module, one set on ``self`` in a subclass of a foreign class (``self._parser = None``),
and a ``getattr`` whose name is a variable.

Dunder (``__x__``) and sunder (``_x_``, enum hooks) names are public protocol, and so are the few
documented underscore APIs in ``DOCUMENTED``. There is no allowlist: issue 17 removed the last
of them (aiohttp's WebSocket and request-handler internals, asyncio's SSL buffer, StreamReader's
buffer, BaseSite's attributes).
"""

from __future__ import annotations

import ast
import asyncio
import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "consoleproxy"

# Underscore names the standard library documents as public API.
DOCUMENTED = frozenset({
    "_exit",  # os._exit
    "_asdict", "_replace", "_fields", "_make", "_field_defaults",  # collections.namedtuple
})

ATTR_BUILTINS = frozenset({"getattr", "setattr", "hasattr", "delattr"})

# Not visible to this checker, removed by the same part: ConsoleWebSocket's self._parser /
# "_payload_parser" (17a).


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    name: str
    form: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.form} {self.name}"


def is_private(name: str) -> bool:
    if not name.startswith("_") or name in DOCUMENTED:
        return False
    if name.startswith("__") and name.endswith("__"):
        return False  # dunder
    return not (len(name) > 2 and name.endswith("_") and not name.startswith("__"))  # sunder


def own_private_names(trees: Iterable[ast.Module]) -> frozenset[str]:
    """Every underscore name the package itself defines."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                strings = (c for c in ast.walk(node.value) if isinstance(c, ast.Constant))
                names.update(c.value for c in strings if isinstance(c.value, str))
    return frozenset(n for n in names if n.startswith("_"))


def foreign_names(tree: ast.Module, package: str) -> frozenset[str]:
    """Names this module binds to another package's modules or objects by importing them."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != package:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if (node.module or "").split(".")[0] != package:
                names.update(alias.asname or alias.name for alias in node.names)
    return frozenset(names)


def chain_root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def class_body_privates(tree: ast.Module) -> dict[str, tuple[int, frozenset[str]]]:
    """Top-level class name -> (line, the private names its body defines)."""
    out: dict[str, tuple[int, frozenset[str]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        names: set[str] = set()
        for n in node.body:
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(n.name)
            elif isinstance(n, ast.Assign | ast.AnnAssign):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        out[node.name] = (node.lineno, frozenset(n for n in names if is_private(n)))
    return out


def foreign_overrides(cls: type, names: Iterable[str], package: str = "consoleproxy") -> list[str]:
    """Those of ``names`` that a base class of ``cls`` from another package also has."""
    foreign = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] != package and b is not object]
    return sorted(n for n in names if any(hasattr(b, n) for b in foreign))


def overrides(module: str, tree: ast.Module, namespace: object) -> Iterator[Violation]:
    for cls_name, (line, names) in class_body_privates(tree).items():
        cls = getattr(namespace, cls_name, None)
        if isinstance(cls, type):
            for name in foreign_overrides(cls, names):
                yield Violation(module, line, name, f"{cls_name} overrides a foreign base's")


def violations(
    module: str,
    tree: ast.Module,
    own: frozenset[str],
    package: str = "consoleproxy",
    foreign_privates: frozenset[str] = frozenset(),
) -> Iterator[Violation]:
    """``own``: the package's private names; ``foreign_privates``: those of them that override a
    foreign base's (found by :func:`overrides`)."""
    foreign = foreign_names(tree, package)
    own_here = own_private_names([tree]) - foreign_privates
    own = own - foreign_privates

    def attribute(node: ast.AST, base: ast.expr, name: str, form: str) -> Iterator[Violation]:
        if not is_private(name):
            return
        if chain_root(base) in foreign:
            ok = False
        elif isinstance(base, ast.Name) and base.id in ("self", "cls"):
            ok = name in own
        else:
            ok = name in own_here
        if not ok:
            yield Violation(module, getattr(node, "lineno", 0), name, form)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] != package and any(is_private(p) for p in parts):
                    yield Violation(module, node.lineno, alias.name, "import")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            parts = (node.module or "").split(".")
            if parts[0] == package:
                continue
            if any(is_private(p) for p in parts):
                yield Violation(module, node.lineno, node.module or "", "from-import of module")
            for alias in node.names:
                if is_private(alias.name):
                    yield Violation(module, node.lineno, alias.name, f"from {node.module} import")
        elif isinstance(node, ast.Attribute):
            yield from attribute(node, node.value, node.attr, "attribute")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ATTR_BUILTINS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            yield from attribute(node, node.args[0], node.args[1].value, f"{node.func.id}()")


def package_modules() -> dict[str, ast.Module]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): ast.parse(
            path.read_text(encoding="utf-8"), filename=str(path)
        )
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_no_module_uses_another_packages_private_names() -> None:
    trees = package_modules()
    assert len(trees) > 30, "the walk found too few modules: is PACKAGE right?"
    own = own_private_names(trees.values())
    found = [
        v
        for module, tree in trees.items()
        if not module.endswith(".__main__")  # importing it runs the CLI; it defines no class
        for v in overrides(module, tree, importlib.import_module(module))
    ]
    overridden = frozenset(v.name for v in found)
    for module, tree in trees.items():
        found += violations(module, tree, own, foreign_privates=overridden)
    assert not found, "private names of other packages (use a public API):\n" + "\n".join(map(str, found))


# --- the checker itself ------------------------------------------------------------------------

OWN_SOURCE = '''
from __future__ import annotations
import dataclasses
from collections import namedtuple
from . import rfb
from .tokens import _short, Keyring

class Ring:
    __slots__ = ("_slot",)
    _field: int = 0

    def __init__(self) -> None:
        self._keys = []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and other._keys == self._keys and other._slot is None

    @classmethod
    def make(cls) -> Ring:
        return cls._build()

def _build() -> None:
    _local = rfb._helper(_short(1), Keyring._new_kid())
    p = namedtuple("P", "a")(1)._replace(a=2)
    getattr(Ring(), "_keys")
    os._exit(0)
    return dataclasses.fields(p).__class__
'''


def check(source: str) -> list[str]:
    tree = ast.parse(source)
    own = own_private_names([tree, ast.parse(OWN_SOURCE)])
    return [f"{v.form} {v.name}" for v in violations("m", tree, own)]


def test_checker_allows_our_own_private_names() -> None:
    # rfb._helper and Keyring._new_kid are another module's: allowed when that module defines them.
    assert check(OWN_SOURCE + "\ndef _helper(): pass\ndef _new_kid(): pass\n") == []


def test_checker_refuses_another_modules_private_attribute() -> None:
    assert check("def f(server):\n    return server._page_dirs") == ["attribute _page_dirs"]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from aiohttp._websocket.helpers import websocket_mask",
            ["from-import of module aiohttp._websocket.helpers"],
        ),
        ("from asyncio.constants import _SendfileMode", ["from asyncio.constants import _SendfileMode"]),
        ("import asyncio._private", ["import asyncio._private"]),
        ("import asyncio\nasyncio.transports._FlowControlMixin", ["attribute _FlowControlMixin"]),
        # A foreign root is a violation even for a name we also define.
        ("import ssl\nssl._keys", ["attribute _keys"]),
        ("from aiohttp import web\nweb.BaseSite(r)._server", ["attribute _server"]),
        ("def f(site):\n    return site._server", ["attribute _server"]),
        ("class W(Base):\n    def f(self):\n        super()._post_start(r)", ["attribute _post_start"]),
        ("def f(t):\n    t._ssl_protocol._ssl_buffer = b",
         ["attribute _ssl_buffer", "attribute _ssl_protocol"]),
        ("def f(r):\n    return getattr(r, '_buffer', b'')", ["getattr() _buffer"]),
        ("def f(h):\n    setattr(h, '_reading_paused', False)", ["setattr() _reading_paused"]),
        ("def f(h):\n    return hasattr(h, '_manager')", ["hasattr() _manager"]),
        # self is no shield for a private the package never defines: a foreign base class's.
        ("class T(Base):\n    def f(self):\n        return self._protocol_paused",
         ["attribute _protocol_paused"]),
    ],
)
def test_checker_catches_each_form(source: str, expected: list[str]) -> None:
    assert sorted(check(source)) == sorted(expected)


def test_checker_allows_dunder_and_sunder_names() -> None:
    assert check("import enum\nx = enum.Enum.__members__\ny = enum.Enum._missing_\nz = obj.__dict__") == []


class OverridesFlowControl(asyncio.Transport):
    _extra: ClassVar[dict[str, object]] = {}  # asyncio.BaseTransport's private slot

    def _mine(self) -> None:
        pass


def test_checker_catches_overriding_a_foreign_bases_private() -> None:
    import sys

    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    found = [f"{v.form} {v.name}" for v in overrides("t", tree, sys.modules[__name__])]
    assert found == ["OverridesFlowControl overrides a foreign base's _extra"]
    # ... and then the name counts as foreign, even where the module defines it.
    tree = ast.parse("def f(t):\n    return t._extra\nclass A:\n    _extra = 1")
    extra = frozenset({"_extra"})
    found = [v.name for v in violations("t", tree, extra, foreign_privates=extra)]
    assert found == ["_extra"]
