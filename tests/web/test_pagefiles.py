"""pagefiles: the page and static files without loop.sendfile (pure parts, then over the public
TLS listener, where aiohttp's FileResponse could not send on our transport)."""

from __future__ import annotations

import os
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from harness import running_proxy

from consoleproxy.web.assets import default_page_dirs
from consoleproxy.web.pagefiles import RangeNotSatisfiable, byte_range, content_type, etag, not_modified


def test_content_types() -> None:
    assert content_type("rfb.js") == "text/javascript; charset=utf-8"
    assert content_type("console.HTML") == "text/html; charset=utf-8"
    assert content_type("console.css") == "text/css; charset=utf-8"
    assert content_type("favicon.svg") == "image/svg+xml; charset=utf-8"
    assert content_type("logo.png") == "image/png"
    assert content_type("noext") == "application/octet-stream"


def test_byte_ranges() -> None:
    assert byte_range(None, 100) is None
    assert byte_range("bytes=0-9", 100) == (0, 10)
    assert byte_range("bytes=90-", 100) == (90, 100)
    assert byte_range("bytes=-10", 100) == (90, 100)
    assert byte_range("bytes=-500", 100) == (0, 100)
    assert byte_range("bytes=95-200", 100) == (95, 100)  # clipped to the end
    for ignored in ("items=0-1", "bytes=0-1,5-6", "bytes=x-1", "bytes=5-2", "bytes=5"):
        assert byte_range(ignored, 100) is None, ignored  # the whole file
    for unsatisfiable in ("bytes=100-", "bytes=-0", "bytes=500-600"):
        with pytest.raises(RangeNotSatisfiable):
            byte_range(unsatisfiable, 100)


def test_validators(tmp_path: Path) -> None:
    f = tmp_path / "a.js"
    f.write_bytes(b"x" * 10)
    st = f.stat()
    tag = etag(st)
    assert tag.startswith('"') and f"{st.st_size:x}" in tag
    assert not_modified({"If-None-Match": tag}, tag, st.st_mtime)
    assert not_modified({"If-None-Match": f'"other", W/{tag}'}, tag, st.st_mtime)
    assert not not_modified({"If-None-Match": '"other"'}, tag, st.st_mtime)
    since = formatdate(st.st_mtime + 5, usegmt=True)
    assert not_modified({"If-Modified-Since": since}, tag, st.st_mtime)
    assert not not_modified({"If-Modified-Since": formatdate(st.st_mtime - 5, usegmt=True)}, tag, st.st_mtime)
    assert not not_modified({"If-Modified-Since": "not a date"}, tag, st.st_mtime)
    # If-None-Match wins: a changed file is sent even when the date says otherwise
    assert not not_modified({"If-None-Match": '"other"', "If-Modified-Since": since}, tag, st.st_mtime)


async def test_page_and_static_files_over_the_tls_listener(tmp_path: Path) -> None:
    """The files are sent on our TLS transport: whole, by range, and 304 for a current copy; no way
    out of the directory. (Behind the PROXY protocol, on the wrapper transport:
    test_listener.test_v2_header_then_tls fetches the page and rfb.js.)"""
    listen = {"tls": True}
    _, novnc = default_page_dirs()
    rfb = (novnc / "core" / "rfb.js").read_bytes()
    async with running_proxy(tmp_path, listen=listen) as p, aiohttp.ClientSession() as http:
        ssl = p.client_ssl
        assert ssl is not None
        async with http.get(p.http_base + "/novnc/core/rfb.js", ssl=ssl) as r:
            assert r.status == 200 and await r.read() == rfb
            assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
            tag = r.headers["ETag"]
            assert r.headers["Last-Modified"]
        rfb_url = p.http_base + "/novnc/core/rfb.js"
        async with http.get(rfb_url, ssl=ssl, headers={"If-None-Match": tag}) as r:
            assert r.status == 304 and await r.read() == b""
        async with http.get(rfb_url, ssl=ssl, headers={"Range": "bytes=10-19"}) as r:
            assert r.status == 206 and await r.read() == rfb[10:20]
            assert r.headers["Content-Range"] == f"bytes 10-19/{len(rfb)}"
        async with http.get(p.http_base + "/console?token=x", ssl=ssl) as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert b"<html" in (await r.read()).lower()
        for bad in ("/static/../../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml", "/novnc/core",
                    "/static/.hidden", "/static/nope.js"):
            async with http.get(p.http_base + bad, ssl=ssl) as r:
                assert r.status == 404, bad


async def test_a_symlink_out_of_the_directory_is_not_served(tmp_path: Path) -> None:
    static = tmp_path / "static"
    static.mkdir()
    (static / "console.html").write_text("<html>page</html>")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, static / "link.txt")
    async with (
        running_proxy(tmp_path, page={"static_dir": str(static)}) as p,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(p.http_base + "/static/link.txt") as r:
            assert r.status == 404
        async with http.get(p.http_base + "/console") as r:
            assert r.status == 200 and await r.text() == "<html>page</html>"
