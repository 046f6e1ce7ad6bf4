"""The admin listener (DESIGN.md 5): metrics, sessions, and later certificates, drain, health.

It never shares a port with the public listener. Every request needs the bearer key from
``[admin] key_file``, compared in constant time; the key is created (0600) on first start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from consoleproxy.errors import ConfigError
from consoleproxy.metrics import CONTENT_TYPE_LATEST
from consoleproxy.protocol.addresses import parse_ip
from consoleproxy.reload import ReloadError
from consoleproxy.tls.certchain import Item
from consoleproxy.tls.certpem import CertificateError

if TYPE_CHECKING:
    from consoleproxy.control import ProxyControl

__all__ = ["admin_app", "load_or_create_admin_key", "startup_admin_key"]


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


def _is_loopback(address: str) -> bool:
    if address.lower() in ("localhost", "localhost."):
        return True
    try:
        return parse_ip(address.strip("[]")).is_loopback  # ::ffff:127.0.0.1 too
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def startup_admin_key(address: str, path: Path) -> str:
    """The admin key for a listener on ``address``; ConfigError when it cannot be used safely.

    On loopback a missing key file is created. On any other address the operator must provide
    it: a key made silently on a public listener would be a key nobody knows is exposed.
    """
    if not _is_loopback(address) and not path.is_file():
        raise ConfigError(
            f"[admin] key_file {str(path)!r} does not exist, and [admin] address {address!r} is "
            "not loopback: create the key first (e.g. `head -c 32 /dev/urandom | base64 > "
            f"{path}; chmod 600 {path}`) or set [admin] address = \"127.0.0.1\""
        )
    try:
        return load_or_create_admin_key(path)
    except ValueError as exc:
        raise ConfigError(f"[admin] key_file: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"[admin] key_file {str(path)!r}: {exc.strerror or exc}") from None


def _text(fields: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise KeyError(f"field {name!r} is required")
        return ""
    if not isinstance(value, str | int):
        raise ValueError(f"field {name!r} must be text")
    return str(value)


# GET paths of the playback page and its files: served without the bearer key (no secrets).
PLAYER_PREFIXES = ("/recordings/", "/recordings-static/", "/recordings-novnc/")


def _static_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "novnc_static"


def admin_app(server: ProxyControl, key: str) -> web.Application:
    expected = f"Bearer {key}".encode()

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method == "GET" and request.path.startswith(PLAYER_PREFIXES):
            # The playback page and its scripts hold no secret: the page asks for the key and
            # sends it as the bearer header to the API (a key never goes into a URL).
            return await handler(request)
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

    async def reload(request: web.Request) -> web.Response:
        # What SIGHUP does (reload.py); on the loop, so the swap never races a console's handshake.
        try:
            result = server.reload()
        except ReloadError as exc:
            return web.json_response({"error": str(exc), "changed": []}, status=422)
        return web.json_response(result.as_json())

    async def certificates_list(request: web.Request) -> web.Response:
        if server.certstore is None:
            return web.json_response({"error": "TLS is off on this proxy"}, status=404)
        items = await asyncio.to_thread(server.certstore.list)
        return web.json_response({"certificates": items, "problem": server.certificate_problem})

    async def certificates_upload(request: web.Request) -> web.Response:
        """CloudStack's uploadCustomCertificate fields, as JSON or URL-encoded form."""
        store = server.certstore
        if store is None:
            return web.json_response({"error": "TLS is off on this proxy"}, status=404)
        fields: dict[str, Any]
        if request.content_type == "application/json":
            try:
                fields = await request.json()
            except ValueError:
                return web.json_response({"error": "body is not JSON"}, status=400)
            if not isinstance(fields, dict):
                return web.json_response({"error": "body must be a JSON object"}, status=400)
        else:
            fields = dict(await request.post())
        try:
            item = Item(
                name=_text(fields, "name"),
                id=int(_text(fields, "id")),
                certificate=_text(fields, "certificate"),
                private_key=_text(fields, "privatekey", required=False) or None,
                domain_suffix=_text(fields, "domainsuffix", required=False) or None,
            )
        except (KeyError, ValueError) as exc:
            return web.json_response({"error": str(exc).strip("'\"")}, status=400)
        passphrase = _text(fields, "passphrase", required=False) or None
        try:
            result = await asyncio.to_thread(store.import_item, item, passphrase)
        except CertificateError as exc:
            return web.json_response({"error": str(exc), "item": exc.item}, status=400)
        body = dataclasses.asdict(result)
        if result.status == "live":
            try:
                body["serving"] = server.reload_certificates()
            except CertificateError as exc:
                return web.json_response({"error": str(exc), "item": item.name}, status=500)
        return web.json_response(body)

    async def acme_status(request: web.Request) -> web.Response:
        if server.acme is None:
            return web.json_response({"error": "[acme] is not enabled on this proxy"}, status=404)
        return web.json_response(server.acme.status())

    async def acme_renew(request: web.Request) -> web.Response:
        """Order now, whatever the schedule; 200 when a certificate went live, 502 naming the error."""
        if server.acme is None:
            return web.json_response({"error": "[acme] is not enabled on this proxy"}, status=404)
        status = await server.acme.renew_now()
        if status["waiting_for_other_instance"]:
            return web.json_response(status, status=409)  # the other instance's bundle will arrive
        ok = status["last_result"] == "issued" and not status["failures"]
        return web.json_response(status, status=200 if ok else 502)

    async def health(request: web.Request) -> web.Response:
        """Last results of every check; ``?fresh=true`` runs basic and advanced checks now."""
        fresh = request.query.get("fresh", "false").lower()
        if fresh not in ("true", "false", "1", "0"):
            error = f"fresh must be true or false, got {fresh[:20]!r}"
            return web.json_response({"error": error}, status=400)
        if fresh in ("true", "1"):
            await server.health.run_all()
        results = [r.to_dict() for r in server.health.last_results()]
        ok = all(r["success"] for r in results)
        return web.json_response({"success": ok, "fresh": fresh in ("true", "1"), "results": results})

    async def diagnostics(request: web.Request) -> web.Response:
        """JSON {host, port, ping?, traceroute?}: probe a VNC server from this proxy."""
        from consoleproxy.tools.diagnose import BadDiagnosticTarget, diagnose, validate_host, validate_port

        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object {host, port}"}, status=400)
        try:
            host, port = validate_host(body.get("host")), validate_port(body.get("port"))
            flags = {k: body.get(k, False) for k in ("ping", "traceroute")}
            for k, v in flags.items():
                if not isinstance(v, bool):
                    raise BadDiagnosticTarget(f"{k} must be true or false")
        except BadDiagnosticTarget as exc:
            return web.json_response({"error": str(exc)}, status=400)
        t = server.cfg.targets
        report = await diagnose(
            host, port, ping=flags["ping"], traceroute=flags["traceroute"],
            time_limit=server.cfg.limits.connect_timeout_seconds,
            ca_file=server.cfg.path(t.vnc_ca_file) if t.vnc_ca_file else None,
        )
        return web.json_response(report.to_dict())

    async def getstatus(request: web.Request) -> web.Response:
        """CloudStack's console-proxy load report, so its management server can balance."""
        removed = server.take_removed_sessions()
        return web.json_response(
            {
                "connections": [s.cloudstack_status() for s in server.registry],
                "removedSessions": removed,
            }
        )

    async def recordings_list(request: web.Request) -> web.Response:
        from consoleproxy.recordings.recording_store import matches

        keys = ("vm", "user", "client_ip", "resume_id", "since", "until")
        filters = {k: v for k, v in request.query.items() if k in keys}
        for key in ("since", "until"):
            if key in filters:
                try:
                    float(filters[key])
                except ValueError:
                    error = f"{key} must be a Unix time, got {filters[key][:30]!r}"
                    return web.json_response({"error": error}, status=400)
        recs = server.recordings
        items = await asyncio.to_thread(recs.store.entries) if recs.store.dir.is_dir() else []
        body: dict[str, Any] = {}
        if recs.remote is not None:  # uploaded ones, beside those still in the spool
            local = {m["id"] for m in items}
            try:
                items += [m for m in await recs.remote.entries() if m.get("id") not in local]
            except Exception as exc:  # the store is down: say so, list what is here
                body["store_error"] = f"the object store cannot be reached: {exc}"
        body["recordings"] = sorted((m for m in items if matches(m, filters)), key=lambda m: str(m.get("id")))
        return web.json_response(body)

    def _recording_path(request: web.Request) -> tuple[str, Path | None] | web.Response:
        """The ID and its local file (None: not here; in S3 mode it may be in the bucket)."""
        from consoleproxy.recordings.recording_store import BadRecordingId

        rid = request.match_info["id"]
        try:
            path = server.recordings.store.path(rid)
        except BadRecordingId as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if not path.exists():
            if server.recordings.remote is None:
                return web.json_response({"error": f"no recording {rid!r}"}, status=404)
            return rid, None
        return rid, path

    async def recordings_get(request: web.Request) -> web.StreamResponse:
        """The recording's file, checked first: a damaged one is a 422 naming the damage."""
        from consoleproxy.recordings.recording_format import RecordingCorrupt
        from consoleproxy.recordings.recording_store import check_file

        found = _recording_path(request)
        if isinstance(found, web.Response):
            return found
        rid, path = found
        if rid in server.recordings.active:
            return web.json_response({"error": f"recording {rid} is still being recorded"}, status=409)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{rid}.cprec"',
        }
        if path is not None:
            try:
                await asyncio.to_thread(check_file, path)
            except RecordingCorrupt as exc:
                return web.json_response({"error": f"recording {rid} is damaged: {exc}"}, status=422)
            return web.FileResponse(path, headers=headers)
        # In the bucket: fetched into the spool (streamed), checked, sent, removed.
        remote = server.recordings.remote
        assert remote is not None
        await asyncio.to_thread(server.recordings.store.ensure)
        tmp = server.recordings.store.dir / f".fetch-{rid}-{secrets.token_hex(4)}"
        try:
            try:
                if not await remote.fetch(rid, tmp):
                    return web.json_response({"error": f"no recording {rid!r}"}, status=404)
            except Exception as exc:
                return web.json_response({"error": f"the object store cannot be reached: {exc}"}, status=503)
            try:
                await asyncio.to_thread(check_file, tmp)
            except RecordingCorrupt as exc:
                return web.json_response({"error": f"recording {rid} is damaged: {exc}"}, status=422)
            resp = web.StreamResponse(headers=headers)
            resp.content_length = (await asyncio.to_thread(tmp.stat)).st_size
            await resp.prepare(request)
            f = await asyncio.to_thread(open, tmp, "rb")
            try:
                while chunk := await asyncio.to_thread(f.read, 1024 * 1024):
                    await resp.write(chunk)
            finally:
                f.close()
            await resp.write_eof()
            return resp
        finally:
            await asyncio.to_thread(tmp.unlink, True)

    async def recordings_delete(request: web.Request) -> web.Response:
        found = _recording_path(request)
        if isinstance(found, web.Response):
            return found
        rid, _ = found
        if rid in server.recordings.active:
            return web.json_response({"error": f"recording {rid} is still being recorded"}, status=409)
        deleted = await asyncio.to_thread(server.recordings.store.delete, rid)
        if server.recordings.remote is not None:
            try:
                deleted = await server.recordings.remote.delete(rid) or deleted
            except Exception as exc:
                return web.json_response({"error": f"the object store cannot be reached: {exc}"}, status=503)
        if not deleted:
            return web.json_response({"error": f"no recording {rid!r}"}, status=404)
        return web.json_response({"deleted": rid})

    async def player_page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(_static_dir() / "player.html", headers={"Cache-Control": "no-store"})

    app = web.Application(middlewares=[auth], client_max_size=1024 * 1024)
    app.router.add_get("/api/recordings", recordings_list)
    app.router.add_get("/api/recordings/{id}", recordings_get)
    app.router.add_delete("/api/recordings/{id}", recordings_delete)
    app.router.add_get("/recordings/{id}", player_page)
    static_dir = _static_dir()
    if static_dir.is_dir():
        app.router.add_static("/recordings-static/", static_dir, append_version=False)
    novnc = server.page_dirs()[1]
    if novnc.is_dir():
        app.router.add_static("/recordings-novnc/", novnc, append_version=False)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/sessions", sessions)
    app.router.add_delete("/api/sessions/{id}", kill)
    app.router.add_post("/api/drain", drain)
    app.router.add_post("/api/reload", reload)
    app.router.add_get("/cmd/getstatus", getstatus)
    app.router.add_get("/api/certificates", certificates_list)
    app.router.add_post("/api/certificates", certificates_upload)
    app.router.add_get("/api/certificates/acme", acme_status)
    app.router.add_post("/api/certificates/acme/renew", acme_renew)
    app.router.add_get("/api/health", health)
    app.router.add_post("/api/diagnostics", diagnostics)
    return app
