"""The wheel and sdist serve consoles on their own (issue 18): built from a fresh copy of the
source, installed into a new virtualenv without node on PATH, `consoleproxy demo` shows the demo
screen in Chromium; a build that cannot get the page or noVNC fails instead of making a wheel that
answers 503.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import require_tool
from dist_helpers import ROOT, bare_env, fresh_source, new_venv, run
from playwright.async_api import async_playwright
from playwright.async_api import expect as pw_expect
from test_page import CANVAS_NOT_UNIFORM, CHROMIUM_ARGS, TIMEOUT_MS, NssTrust

sys.path.insert(0, str(ROOT / "buildsupport"))
import consoleproxy_build

pytestmark = pytest.mark.integration  # npm, PyPI, chromium


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel) made by `python -m build` from a fresh copy: sdist first, the wheel from it."""
    require_tool("npm", "npm")
    src = fresh_source(tmp_path_factory.mktemp("src"))
    run([sys.executable, "-m", "build", "--outdir", "dist", "."], cwd=src)
    sdists = list((src / "dist").glob("consoleproxy-*.tar.gz"))
    wheels = list((src / "dist").glob("consoleproxy-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list((src / "dist").iterdir())
    return sdists[0], wheels[0]


def test_wheel_and_sdist_carry_the_page_and_the_locked_novnc(dist: tuple[Path, Path]) -> None:
    sdist, wheel = dist
    version, integrity = consoleproxy_build.locked_novnc(ROOT)
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in consoleproxy_build.REQUIRED:
        assert f"consoleproxy/webassets/{need}" in names, need
    page = {p.relative_to(ROOT / "novnc_static").as_posix() for p in (ROOT / "novnc_static").rglob("*")
            if p.is_file()}
    assert {f"consoleproxy/webassets/page/{p}" for p in page} <= names
    stamp = zipfile.ZipFile(wheel).read("consoleproxy/webassets/ASSETS.json").decode()
    assert version in stamp and integrity in stamp
    assert not any("/docs/" in n for n in names)  # only what the page loads, and the licence
    with tarfile.open(sdist) as tar:
        snames = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"consoleproxy/webassets/novnc/core/rfb.js", "buildsupport/consoleproxy_build.py",
            "package-lock.json", "novnc_static/console.html"} <= snames


def test_wheel_and_sdist_carry_the_licence_and_its_spdx_expression(dist: tuple[Path, Path]) -> None:
    """Apache-2.0 asks that its text go with every copy: the wheel's metadata names it (PEP 639)
    and both carry the text."""
    sdist, wheel = dist
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        headers = zf.read(meta).decode().split("\n\n", 1)[0].splitlines()
        assert "License-Expression: Apache-2.0" in headers
        assert "License-File: LICENSE" in headers
        assert zf.read(meta.replace("METADATA", "licenses/LICENSE")).decode() == licence
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/LICENSE"))
        got = tar.extractfile(member)
        assert got is not None and got.read().decode() == licence


def test_wheel_builds_from_the_sdist_without_npm(dist: tuple[Path, Path], tmp_path: Path) -> None:
    sdist, _ = dist
    # Only our interpreter's directory on PATH: no npm, no node (pip builds in isolation).
    env = bare_env(str(Path(sys.executable).parent))
    assert shutil.which("npm", path=env["PATH"]) is None
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(sdist)],
        cwd=tmp_path, env=env)
    (wheel,) = tmp_path.glob("consoleproxy-*.whl")
    assert "consoleproxy/webassets/novnc/core/rfb.js" in zipfile.ZipFile(wheel).namelist()


def test_build_without_npm_or_assets_fails_loudly(tmp_path: Path) -> None:
    src = fresh_source(tmp_path / "src")
    env = bare_env(str(Path(sys.executable).parent))
    out = run_failing([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "out"), "."],
                      cwd=src, env=env)
    assert "npm is needed to fetch @novnc/novnc" in out
    assert not list(tmp_path.rglob("consoleproxy-*.whl"))


def run_failing(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode != 0, f"{cmd} succeeded; it should have failed:\n{out.stdout}"
    return out.stdout + out.stderr


def test_tarball_that_does_not_match_the_lock_is_refused(tmp_path: Path) -> None:
    tarball = tmp_path / "novnc-novnc-1.7.0.tgz"
    tarball.write_bytes(b"not the locked tarball")
    good = "sha512-" + base64.b64encode(hashlib.sha512(b"not the locked tarball").digest()).decode()
    consoleproxy_build.check_integrity(tarball, good)
    _, locked = consoleproxy_build.locked_novnc(ROOT)
    with pytest.raises(consoleproxy_build.AssetError, match=r"does not match package-lock\.json"):
        consoleproxy_build.check_integrity(tarball, locked)
    with pytest.raises(consoleproxy_build.AssetError, match="not sha512"):
        consoleproxy_build.check_integrity(tarball, "sha1-abc")


def test_incomplete_assets_fail_the_build(tmp_path: Path) -> None:
    src = fresh_source(tmp_path / "src")
    assets = consoleproxy_build.prepare_assets(src)  # npm (the test machine has it)
    (assets / "novnc" / "core" / "rfb.js").unlink()
    (src / "novnc_static" / "console.js").unlink()
    with pytest.raises(consoleproxy_build.AssetError, match=r"missing page/console\.js, novnc/core/rfb\.js"):
        consoleproxy_build.prepare_assets(src)


@contextlib.asynccontextmanager
async def demo(bindir: Path, cwd: Path) -> AsyncIterator[tuple[str, Path]]:
    """`consoleproxy demo` of the installed wheel, run from ``cwd``: (console URL, development CA)."""
    proc = await asyncio.create_subprocess_exec(
        str(bindir / "consoleproxy"), "demo", "--port", "0", cwd=cwd,
        env=bare_env(str(bindir), PYTHONUNBUFFERED="1"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    url = ca = None
    seen = []
    try:
        async with asyncio.timeout(60):
            while url is None or ca is None:
                line = (await proc.stdout.readline()).decode()
                assert line, f"demo exited before printing its URL: {seen}"
                seen.append(line)
                if m := re.search(r"(https://\S+/console\?token=\S+)", line):
                    url = m.group(1)
                if m := re.search(r"Development CA \(trust it in your browser\): (\S+)", line):
                    ca = Path(m.group(1))
        yield url, ca
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await proc.wait()


async def test_installed_wheel_serves_the_demo_console_in_chromium(
    dist: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    chromium = require_tool("chromium", "chromium")
    _, wheel = dist
    venv = tmp_path_factory.mktemp("venv") / "venv"
    bindir = await asyncio.to_thread(new_venv, venv, wheel)
    assert shutil.which("node", path=str(bindir)) is None and shutil.which("npm", path=str(bindir)) is None
    out = run([str(bindir / "consoleproxy"), "--version"], cwd=venv, env=bare_env(str(bindir)))
    assert out.stdout.split() == ["consoleproxy", consoleproxy_version()]
    workdir = tmp_path_factory.mktemp("from-tmp")  # under /tmp, far from any checkout
    nss = NssTrust(tmp_path_factory.mktemp("home"))
    async with demo(bindir, workdir) as (url, ca):
        assert (workdir / "demo-state").is_dir()
        nss.trust(ca)
        async with async_playwright() as pw:
            b = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS,
                                         env={**os.environ, "HOME": str(nss.home)}, timeout=30_000)
            try:
                page = await (await b.new_context(locale="en-US")).new_page()
                page.set_default_timeout(TIMEOUT_MS)
                failed: list[str] = []
                page.on("response",
                        lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
                await page.goto(url)
                status = page.locator("#status")
                await pw_expect(status).to_have_attribute("data-state", "connected", timeout=TIMEOUT_MS)
                await page.wait_for_function(CANVAS_NOT_UNIFORM, timeout=TIMEOUT_MS)
                assert not failed, failed
            finally:
                await b.close()


def consoleproxy_version() -> str:
    from consoleproxy import __version__

    return __version__
