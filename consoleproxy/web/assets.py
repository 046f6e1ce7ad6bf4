"""Where the console page and noVNC are served from when ``[page]`` names no directory.

A source checkout serves its own ``novnc_static/`` and ``node_modules/@novnc/novnc/`` (what
``make setup`` installs), so an edit to the page shows at once. An installed wheel has no checkout
beside it: it serves the copies that the build put into the package (``consoleproxy/webassets/``,
see ``buildsupport/consoleproxy_build.py``).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # consoleproxy/ (this module is in consoleproxy/web/)
CHECKOUT = PACKAGE.parent
WEBASSETS = PACKAGE / "webassets"


def default_page_dirs() -> tuple[Path, Path]:
    """(page directory, noVNC directory): the checkout's when there is one, else the package's."""
    if (CHECKOUT / "novnc_static" / "console.html").is_file():
        return CHECKOUT / "novnc_static", CHECKOUT / "node_modules" / "@novnc" / "novnc"
    return WEBASSETS / "page", WEBASSETS / "novnc"
