"""The build backend of consoleproxy: setuptools, plus the console page and noVNC inside the package.

A wheel must serve a working console on a machine without node or npm, so before setuptools builds
an sdist or a wheel, `prepare_assets` fills ``consoleproxy/webassets/`` (git-ignored, never
committed) with:

- ``page/``: our console page, a copy of ``novnc_static/``;
- ``novnc/``: noVNC's ``core/`` and ``vendor/`` with its licence, from the npm tarball of the exact
  version that ``package-lock.json`` pins, fetched with ``npm pack`` (or left in ``build/novnc/`` by
  the Dockerfile's node stage) and checked against the lock's ``integrity`` (sha512) before
  anything is unpacked;
- ``ASSETS.json``: the noVNC version and integrity the copy came from.

An sdist carries ``webassets/`` already, so a wheel builds from it without npm: the copy is reused
when its ``ASSETS.json`` names the lock's integrity. Anything missing (npm absent, a tarball that
does not match the lock, a file the page needs) raises ``AssetError`` and the build fails; a wheel
that would answer 503 is never made. Editable installs (``pip install -e``) serve the checkout's
``novnc_static/`` and ``node_modules/`` directly and skip all this.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools

ROOT = Path(__file__).resolve().parent.parent
NOVNC = "@novnc/novnc"
# What the page loads (novnc_static/console.js imports /novnc/core/rfb.js, which imports vendor/pako).
REQUIRED = ("page/console.html", "page/console.js", "page/i18n.js", "novnc/core/rfb.js",
            "novnc/vendor/pako/lib/zlib/inflate.js", "novnc/LICENSE.txt")
# Parts of the npm tarball copied into the package (docs and README stay out).
NOVNC_PARTS = ("core/", "vendor/", "LICENSE.txt", "AUTHORS", "package.json")


class AssetError(RuntimeError):
    """The console page or noVNC cannot be put into the package; the message says what to do."""


def locked_novnc(root: Path) -> tuple[str, str]:
    """(version, integrity) of noVNC in ``package-lock.json``."""
    lock_file = root / "package-lock.json"
    try:
        lock = json.loads(lock_file.read_text(encoding="utf-8"))
        entry = lock["packages"][f"node_modules/{NOVNC}"]
        return str(entry["version"]), str(entry["integrity"])
    except (OSError, ValueError, KeyError) as exc:
        raise AssetError(f"{lock_file}: no locked {NOVNC} version and integrity ({exc})") from exc


def check_integrity(tarball: Path, integrity: str) -> None:
    """Raise unless ``tarball`` has the lock's ``sha512-<base64>`` integrity."""
    algo, _, expected = integrity.partition("-")
    if algo != "sha512":
        raise AssetError(f"package-lock.json: integrity {integrity!r} is not sha512")
    got = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if got != expected:
        raise AssetError(f"{tarball.name}: sha512-{got} does not match package-lock.json's {integrity}")


def fetch_novnc(version: str, integrity: str, dest: Path, prefetched: Path | None = None) -> None:
    """npm pack the locked tarball (or take ``prefetched``, the Dockerfile's node stage's), check it
    against the lock, unpack its parts into ``dest``."""
    if prefetched is not None and prefetched.is_file():
        check_integrity(prefetched, integrity)
        unpack_novnc(prefetched, dest)
        return
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(
            f"npm is needed to fetch {NOVNC} {version} (package-lock.json) into the wheel: "
            "apt-get install npm, or build the wheel from an sdist that carries it"
        )
    with tempfile.TemporaryDirectory(prefix="consoleproxy-novnc-") as tmp:
        out = subprocess.run(
            [npm, "pack", f"{NOVNC}@{version}", "--json", "--prefer-offline", "--pack-destination", tmp],
            capture_output=True, text=True, check=False, timeout=300, cwd=tmp,
        )
        if out.returncode != 0:
            raise AssetError(f"npm pack {NOVNC}@{version} failed: {out.stderr.strip()[-500:]}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise AssetError(f"npm pack {NOVNC}@{version} left {len(tarballs)} tarballs, not one")
        check_integrity(tarballs[0], integrity)
        unpack_novnc(tarballs[0], dest)


def unpack_novnc(tarball: Path, dest: Path) -> None:
    """The parts of the (checked) npm tarball the page needs, into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="consoleproxy-novnc-") as tmp:
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.removeprefix("package/").startswith(NOVNC_PARTS)]
            for m in members:  # checked here too: Python before 3.11.4 has no extraction filter
                parts = Path(m.name).parts
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in parts:
                    raise AssetError(f"{tarball.name}: unexpected member {m.name!r}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)  # noqa: S202 (members checked above)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(Path(tmp) / "package", dest)


def prepare_assets(root: Path = ROOT) -> Path:
    """Fill ``root/consoleproxy/webassets`` and check it; return its path (see the module docstring)."""
    assets = root / "consoleproxy" / "webassets"
    version, integrity = locked_novnc(root)
    stamp = assets / "ASSETS.json"
    try:
        fresh = json.loads(stamp.read_text(encoding="utf-8")).get("novnc_integrity") == integrity
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        # build/novnc/: where the Dockerfile's node stage leaves the tarball (the wheel stage has no npm).
        prefetched = root / "build" / "novnc" / f"novnc-novnc-{version}.tgz"
        fetch_novnc(version, integrity, assets / "novnc", prefetched)
    page_src = root / "novnc_static"
    if page_src.is_dir():  # a checkout: the page as it is now (an sdist has only webassets/page)
        shutil.rmtree(assets / "page", ignore_errors=True)
        shutil.copytree(page_src, assets / "page")
    missing = [name for name in REQUIRED if not (assets / name).is_file()]
    if missing:
        raise AssetError(f"the console page's assets are incomplete in {assets}: "
                         f"missing {', '.join(missing)}")
    stamp.write_text(json.dumps({"novnc_version": version, "novnc_integrity": integrity}) + "\n",
                     encoding="utf-8")
    return assets


# --- PEP 517 hooks: setuptools', with the assets prepared first ---------------------------------

get_requires_for_build_wheel = _setuptools.get_requires_for_build_wheel
get_requires_for_build_sdist = _setuptools.get_requires_for_build_sdist
get_requires_for_build_editable = _setuptools.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _setuptools.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_editable = _setuptools.build_editable


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    prepare_assets()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    prepare_assets()
    return _setuptools.build_sdist(sdist_directory, config_settings)
