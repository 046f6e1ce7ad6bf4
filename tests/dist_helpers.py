"""Building and installing consoleproxy the way an operator does: from a fresh copy of the source,
into a new virtualenv whose PATH holds nothing but the virtualenv (no node, npm or compiler).

Used by tests/install/test_wheel.py and tests/install/test_image.py. Installing the wheel fetches its
dependencies from PyPI (pip's cache makes a second run fast).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 600


def fresh_source(dest: Path) -> Path:
    """Copy what a fresh clone of this working tree holds (tracked and new files, nothing ignored:
    no node_modules/, no consoleproxy/webassets/, no .venv/) into ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():  # a file deleted in the working tree is still "cached"
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; fail with its output when it fails."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def bare_env(path: str, **extra: str) -> dict[str, str]:
    """An environment with only ``path`` on PATH, no CONSOLEPROXY_* settings, pip quiet."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONSOLEPROXY_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=path, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def system_python() -> Path:
    """The interpreter our .venv was made from (a venv made from a venv's python links to it)."""
    v = sys.version_info
    return Path(sys.base_prefix) / "bin" / f"python{v.major}.{v.minor}"


def new_venv(where: Path, *wheels: Path) -> Path:
    """A new virtualenv at ``where`` (the system Python, no site packages) with ``wheels`` installed
    by its own pip, with nothing but the virtualenv on PATH. Returns its bin directory."""
    run([str(system_python()), "-m", "venv", str(where)], cwd=where.parent)
    bindir = where / "bin"
    run([str(bindir / "pip"), "install", "-q", *map(str, wheels)], cwd=where.parent,
        env=bare_env(str(bindir)))
    return bindir
