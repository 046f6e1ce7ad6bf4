"""The admin listener (DESIGN.md 5): metrics, sessions, and later certificates, drain, health.

It never shares a port with the public listener. Every request needs the bearer key from
``[admin] key_file``, compared in constant time; the key is created (0600) on first start.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .metrics import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .server import ProxyServer

__all__ = ["admin_app", "load_or_create_admin_key"]


def load_or_create_admin_key(path: Path) -> str:
    """Read the bearer key, or create a random one readable only by the owner."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
        return key
    if len(key) < 16:
        raise ValueError(f"admin key in {path} is shorter than 16 characters")
    return key


def admin_app(server: ProxyServer, key: str) -> web.Application:
    expected = f"Bearer {key}".encode()

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {"error": "missing or wrong bearer key"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=server.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def sessions(request: web.Request) -> web.Response:
        return web.json_response({"sessions": [s.info() for s in server.registry]})

    async def kill(request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        if not server.kill(sid):
            return web.json_response({"error": f"no session {sid!r}"}, status=404)
        return web.json_response({"killed": sid})

    async def drain(request: web.Request) -> web.Response:
        started = server.start_drain()
        return web.json_response(
            {
                "draining": True,
                "already": not started,
                "sessions": len(server.registry),
                "grace_seconds": server.cfg.drain.grace_seconds,
                "deadline_seconds": server.cfg.drain.deadline_seconds,
            }
        )

    app = web.Application(middlewares=[auth], client_max_size=1024 * 1024)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/sessions", sessions)
    app.router.add_delete("/api/sessions/{id}", kill)
    app.router.add_post("/api/drain", drain)
    return app
