"""One version everywhere (issue 18; DESIGN.md 10): `consoleproxy --version`, the installed package
metadata, the README's changelog, the image's tag and label, and the page's package.json agree.

consoleproxy/__init__.py is the one place the version is written; pyproject.toml reads it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from consoleproxy import __version__

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_cli_prints_the_package_version() -> None:
    out = subprocess.run([sys.executable, "-m", "consoleproxy", "--version"], capture_output=True,
                         text=True, timeout=30, check=True)
    assert out.stdout.strip() == f"consoleproxy {__version__}"


def test_installed_metadata_is_the_package_version() -> None:
    assert version("consoleproxy") == __version__, "stale install: make setup (pip install -e .) again"


def test_pyproject_takes_the_version_from_the_package() -> None:
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "consoleproxy.__version__"}


def test_changelog_newest_release_is_the_package_version() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    changelog = readme.split("\n## Changelog\n", 1)[1].split("\n## ", 1)[0]
    releases = re.findall(r"^- (\d+\.\d+\.\d+) — ", changelog, re.M)
    assert releases, "no numbered entry in the changelog"
    newest = max(releases, key=lambda v: tuple(map(int, v.split("."))))
    assert newest == __version__, f"changelog's newest release {newest}, package {__version__}"


def test_image_tag_and_label_are_the_package_version() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    tags = re.findall(r"consoleproxy:(\d+\.\d+\.\d+)", dockerfile)
    assert tags and set(tags) == {__version__}, tags
    assert f'org.opencontainers.image.version="{__version__}"' in dockerfile
    for doc in ("docs/deploy.md", "docs/upgrade.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert set(re.findall(r"consoleproxy:(\d+\.\d+\.\d+)", text)) <= {__version__}, doc


def test_page_package_json_is_the_package_version() -> None:
    assert json.loads((ROOT / "package.json").read_text())["version"] == __version__
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert lock["version"] == lock["packages"][""]["version"] == __version__
