#!/usr/bin/env python3
"""Print a pip constraints file that pins every dependency of pyproject.toml to its lower bound.

`make test-lowest` installs the package with these constraints, so the lower bounds that
pyproject.toml promises are the versions the console-path tests run on (issues 17 and 18);
``--check`` then confirms that the interpreter running it has exactly those versions.
Covered: [project] dependencies and the `uvloop` extra (what an operator installs). The test tools
of the `test` extra are not pinned: they are how we test, not what we ship. A dependency without a
">=" lower bound is an error, so a new one cannot slip past the lowest-versions run.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOWER = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;.*)?$")


def lower_bounds(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"].get("uvloop", [])]
    pins: dict[str, str] = {}
    for spec in specs:
        m = LOWER.match(spec)
        bound = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", m.group(2)) if m else None
        if not m or not bound:
            raise SystemExit(f"lowest-constraints: {spec!r} has no '>=' lower bound in {pyproject}")
        pins[m.group(1).lower()] = bound.group(1)
    return pins


def check() -> int:
    """Exit non-zero unless this interpreter has exactly the lower bounds installed."""
    from importlib.metadata import PackageNotFoundError, version

    wrong = []
    for name, low in sorted(lower_bounds(ROOT / "pyproject.toml").items()):
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "not installed"
        if have.split("+")[0] != low and have not in (f"{low}.0", f"{low}.0.0"):
            wrong.append(f"{name} {have} (lower bound {low})")
        else:
            print(f"lowest-constraints: {name} {have}")
    for line in wrong:
        print(f"lowest-constraints: wrong version: {line}", file=sys.stderr)
    return 1 if wrong else 0


def main() -> int:
    if sys.argv[1:] == ["--check"]:
        return check()
    for name, version in sorted(lower_bounds(ROOT / "pyproject.toml").items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
