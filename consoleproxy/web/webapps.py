"""The public HTTP applications (aiohttp): the console page, static files, health, and the plain
HTTP port that redirects to HTTPS and answers ACME http-01 challenges.

The console's WebSocket handler and the health handlers are the server's; this module only routes
to them and serves files, with the headers the page needs (its URL holds the token).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from consoleproxy.config import Config
from consoleproxy.policy.acme_policy import ChallengeRecords
from consoleproxy.web import pagefiles
from consoleproxy.web.assets import default_page_dirs

__all__ = ["PAGE_HEADERS", "Handler", "bind_admin", "page_dirs", "page_handler", "public_app", "redirect_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the token is in the URL
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; "
    "img-src 'self' data: blob:; style-src 'self'; frame-ancestors 'none'",
}


def page_dirs(cfg: Config) -> tuple[Path, Path]:
    """Our page's static folder and noVNC's: ``[page]``, else the installed ones."""
    default_static, default_novnc = default_page_dirs()
    pg = cfg.page
    static = cfg.path(pg.static_dir) if pg.static_dir else default_static
    novnc = cfg.path(pg.novnc_dir) if pg.novnc_dir else default_novnc
    return static, novnc


def page_handler(cfg: Callable[[], Config]) -> Handler:
    """The console page; ``cfg`` is read per request (a reload may change nothing here, but the
    page may be installed after start)."""

    async def handle_page(request: web.Request) -> web.StreamResponse:
        page = page_dirs(cfg())[0] / "console.html"
        if not page.is_file():
            return web.Response(status=503, text=f"console page not installed ({page} missing)\n")
        # Never loop.sendfile (aiohttp's FileResponse): it fails on our TLS transport (pagefiles).
        return await pagefiles.file_response(request, page, headers=PAGE_HEADERS)

    return handle_page


def public_app(
    cfg: Config, *, websocket: Handler, healthz: Handler, readyz: Handler, page: Handler
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app.router.add_get("/websockify", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    static, novnc = page_dirs(cfg)
    # The console page, at our path and at CloudStack's (its query parameters are read by
    # the page's script, not here).
    app.router.add_get("/console", page)
    app.router.add_get("/resource/noVNC/vnc.html", page)
    if static.is_dir():
        pagefiles.add_static(app.router, "/static/", static)  # never loop.sendfile: see pagefiles
    if novnc.is_dir():
        pagefiles.add_static(app.router, "/novnc/", novnc)
    return app


def redirect_app(challenges: ChallengeRecords | None, https_port: Callable[[], int]) -> web.Application:
    """Plain HTTP that only sends browsers to the HTTPS listener (same host, path, query)."""

    async def acme_http01(request: web.Request) -> web.Response:
        # RFC 8555 8.3: the key authorization as the body, for the CA's validation request.
        answer = challenges.http(request.match_info["token"]) if challenges else None
        if answer is None:
            raise web.HTTPNotFound()
        return web.Response(text=answer, content_type="application/octet-stream")

    async def redirect(request: web.Request) -> web.Response:
        host = request.url.raw_host or "localhost"
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        port = https_port()
        netloc = host if port == 443 else f"{host}:{port}"
        raise web.HTTPMovedPermanently(f"https://{netloc}{request.raw_path}")

    app = web.Application(client_max_size=1024)
    app.router.add_get("/.well-known/acme-challenge/{token}", acme_http01)
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


async def bind_admin(runner: web.AppRunner, host: str, port: int) -> list[socket.socket]:
    """Serve ``runner`` (the admin app) on ``host``:``port``, one socket per address the host
    has (as ``loop.create_server`` does); returns the sockets, so their ports can be read
    without reaching into aiohttp's site."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
        for sock in socks:
            await web.SockSite(runner, sock).start()
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
