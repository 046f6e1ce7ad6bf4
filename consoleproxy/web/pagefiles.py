"""The console page and its static files, served from memory-sized reads instead of ``sendfile``.

The public listener hands aiohttp our own transports (tlstransport.TLSTransport,
listener.ClientAddressTransport). aiohttp's FileResponse and ``add_static`` send with
``loop.sendfile``, which accepts only the event loop's own transports; so the public app serves
its few small files (the page, its scripts, noVNC's modules: all well under 1 MiB) as ordinary
responses, read in a worker thread. The same content types, ``ETag``/``Last-Modified`` with
``304 Not Modified``, and single byte ranges (``206``/``416``) as aiohttp's handler.

``file_headers``/``byte_range``/``content_type`` are pure (values in, values out); ``file_response``
and ``add_static`` are the aiohttp glue.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import stat
from collections.abc import Mapping
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path

from aiohttp import web

__all__ = ["add_static", "byte_range", "content_type", "etag", "file_response", "not_modified"]

# Types a browser must see exactly (module scripts are refused under nosniff otherwise), whatever
# the system's mime.types says.
_TYPES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
    ".svg": "image/svg+xml", ".json": "application/json", ".wasm": "application/wasm",
}


def content_type(name: str) -> str:
    """The Content-Type of a file by its name; text types in UTF-8."""
    ext = os.path.splitext(name)[1].lower()
    kind = _TYPES.get(ext) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/json", "image/svg+xml"):
        kind += "; charset=utf-8"
    return kind


def etag(st: os.stat_result) -> str:
    """A strong validator from the modification time and size (as aiohttp's static handler)."""
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'


def not_modified(headers: Mapping[str, str], tag: str, mtime: float) -> bool:
    """True when the client's copy is current (If-None-Match wins over If-Modified-Since)."""
    inm = headers.get("If-None-Match")
    if inm is not None:
        return inm.strip() == "*" or tag in [t.strip().removeprefix("W/") for t in inm.split(",")]
    ims = headers.get("If-Modified-Since")
    if ims:
        try:
            since = parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
        return int(mtime) <= since
    return False


class RangeNotSatisfiable(Exception):
    """A Range header no part of the file satisfies (416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single ``bytes=`` range; None serves the whole file.

    Several ranges, or a unit other than bytes, are ignored (the whole file, as RFC 9110 allows);
    a syntactically valid range past the end raises RangeNotSatisfiable.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first:  # the last N bytes
            n = int(last)
            if n <= 0:
                raise RangeNotSatisfiable(header)
            return max(0, size - n), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    if end <= start:
        return None
    return start, min(end, size)


def _read(path: Path, start: int, end: int) -> bytes:
    with path.open("rb") as f:
        f.seek(start)
        return f.read(end - start)


async def file_response(
    request: web.BaseRequest, path: Path, headers: Mapping[str, str] | None = None
) -> web.StreamResponse:
    """``path`` as a response (404 when it is not a regular file), with validators and ranges."""
    try:
        st = await asyncio.to_thread(path.stat)
    except (OSError, ValueError):
        raise web.HTTPNotFound() from None
    if not stat.S_ISREG(st.st_mode):
        raise web.HTTPNotFound()
    tag = etag(st)
    out = {
        **(headers or {}),
        "ETag": tag,
        "Last-Modified": formatdate(st.st_mtime, usegmt=True),
        "Accept-Ranges": "bytes",
    }
    if not_modified(request.headers, tag, st.st_mtime):
        return web.Response(status=304, headers=out)
    try:
        span = byte_range(request.headers.get("Range"), st.st_size)
    except RangeNotSatisfiable:
        return web.Response(status=416, headers={**out, "Content-Range": f"bytes */{st.st_size}"})
    start, end = span if span is not None else (0, st.st_size)
    body = await asyncio.to_thread(_read, path, start, end)
    out["Content-Type"] = content_type(path.name)
    if span is None:
        return web.Response(body=body, headers=out)
    out["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{st.st_size}"
    return web.Response(status=206, body=body, headers=out)


def add_static(router: web.UrlDispatcher, prefix: str, directory: Path) -> None:
    """Serve the files under ``directory`` at ``prefix`` (GET and HEAD; no listings, no symlinks
    out of the directory, no dot-files)."""
    root = directory.resolve()

    async def handle(request: web.Request) -> web.StreamResponse:
        rel = request.match_info["filename"]
        parts = rel.split("/")
        if not rel or "\x00" in rel or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise web.HTTPNotFound()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise web.HTTPNotFound()
        return await file_response(request, path)

    router.add_get(prefix.rstrip("/") + "/{filename:.+}", handle)
