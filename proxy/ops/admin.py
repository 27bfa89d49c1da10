"""The admin port: liveness, readiness, the per-app view and the passive
refresh interface. Nothing here ever answers a token or a secret."""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import time
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from ..config import is_loopback
from ..credentials import RefreshThrottled, TokenUnavailable
from ..credentials.kinds import kinds_for
from ..credentials.platform import authorizer_status
from ..credentials.store import StoreUnavailable
from ..http.callers import Callers
from ..http.server import json_error_body
from .history import SAMPLE_EVERY_S, History
from .metrics import CONTENT_TYPE
from .status import sample
from .status import status as status_view
from .status_page import PAGE

if TYPE_CHECKING:
    from ..config import Config
    from ..credentials import TokenManager
    from ..credentials.platform import Platform
    from .metrics import Metrics


class Sidecar(Protocol):
    """What the admin routes read of the running sidecar (server.Sidecar),
    named here so that this module does not import the server that serves it."""
    config: "Config"
    managers: "dict[str, TokenManager]"
    platforms: "dict[str, Platform]"
    metrics: "Metrics"

    def waiting_for_ticket(self, name: str) -> bool: ...

    def push_status(self, name: str) -> "dict[str, object] | None": ...


# Answered to anyone who reaches the port, whatever Host they name: probes
# and scrapers carry no secret, and the kubelet may name the pod's address.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# Authorizers imported by one POST /admin/authorizers, and listed per page.
MAX_IMPORT = 100_000
MAX_PAGE = 1000


# The classic Prometheus text format, which every Prometheus version scrapes.
METRICS_CONTENT_TYPE = CONTENT_TYPE


def admin_error(status: int, why: str) -> web.Response:
    """The admin port's errors, in the same JSON shape as the proxy port's."""
    return web.Response(status=status, body=json_error_body(why),
                        headers={"Content-Type": "application/json; charset=utf-8"})


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, the scheme in any case (RFC 9110
    §11.1), compared in constant time. Anything else, non-ASCII bytes
    included, is simply not a match."""
    if not header:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    try:
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
    except UnicodeError:
        return False
    return hmac.compare_digest(given_bytes, token.encode("utf-8"))


class AdminRoutes:
    def __init__(self, sidecar: Sidecar):
        self.sidecar = sidecar
        self.history = History()
        self._callers: "tuple[object, Callers] | None" = None   # built for the admin config in force

    # ------------------------------------------------------------ the status page

    def page_response(self, status: int = 200) -> web.Response:
        """The status page; its script allowed by a nonce, nothing loaded from
        anywhere, no framing, no referrer (the fragment may hold the token)."""
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        response = web.Response(status=status, text=PAGE.replace("<script>", f'<script nonce="{nonce}">', 1),
                                content_type="text/html", charset="utf-8",
                                headers={"Content-Security-Policy": csp, "Cache-Control": "no-store",
                                         "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                                         "X-Content-Type-Options": "nosniff"})
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="wechat-token-sidecar"'
        return response

    async def page(self, request: web.Request) -> web.Response:
        return self.page_response()

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await status_view(self.history, self.sidecar), headers={"Cache-Control": "no-store"})

    async def _sampling(self, app: web.Application):  # type: ignore[no-untyped-def]
        """The page's history fills while nobody looks: a sample every SAMPLE_EVERY_S."""
        async def run() -> None:
            while True:
                sample(self.history, self.sidecar)
                await asyncio.sleep(SAMPLE_EVERY_S)
        task = asyncio.create_task(run(), name="status-history")
        yield
        task.cancel()

    async def healthz(self, request: web.Request) -> web.Response:
        # Liveness: the event loop answers. Never depends on WeChat or a store.
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        sidecar = self.sidecar
        missing = {name: m.state.unavailable_reason(time.monotonic())
                   for name, m in sidecar.managers.items()
                   if m.current() is None and not sidecar.waiting_for_ticket(name)}
        if missing:
            return web.json_response({"status": "not ready", "apps": missing}, status=503)
        # Still ready while a valid token is served, but say what is failing.
        # A platform that never had a verify ticket is ready: its pod must be
        # to receive the push that brings one.
        warnings = {name: ("waiting for the first component_verify_ticket push" if sidecar.waiting_for_ticket(name)
                           else f"last fetch failed: {m.state.last_failure.describe()}")
                    for name, m in sidecar.managers.items()
                    if sidecar.waiting_for_ticket(name) or (m.state.failures and m.state.last_failure is not None)}
        return web.json_response({"status": "ready", **({"warnings": warnings} if warnings else {})})

    async def apps(self, request: web.Request) -> web.Response:
        answers = []
        for manager in self.sidecar.managers.values():
            status = manager.status()
            try:
                status["fetches_today"] = await manager.store.fetches_today(manager.app.store_key)
            except StoreUnavailable as exc:
                status["fetches_today"] = None
                status["store"] = str(exc)
            # Tickets and other credentials, once asked for: state, never the value.
            status["credentials"] = {kind: {k: v for k, v in dependent.status().items()
                                            if k not in ("name", "appid", "token_api")}
                                     for kind, dependent in manager.dependents.items()}
            platform = self.sidecar.platforms.get(manager.name)
            if platform is not None:
                status["platform"] = await platform.status()
            pushes = self.sidecar.push_status(manager.name)
            if pushes is not None:
                status["pushes"] = pushes
            answers.append(status)
        return web.json_response({"apps": answers})

    # ------------------------------------------------------------ Open Platform

    def _platform(self, request: web.Request) -> "Platform | web.Response":
        name = request.query.get("app") or next(iter(self.sidecar.platforms), "")
        platform = self.sidecar.platforms.get(name)
        if platform is None:
            platforms = ", ".join(self.sidecar.platforms) or "none configured"
            return admin_error(404, f"no platform app {name[:64]!r} (token_api: component apps: {platforms})")
        return platform

    async def _platform_and_body(self, request: web.Request) -> "tuple[Platform, dict] | web.Response":  # type: ignore[type-arg]
        platform = self._platform(request)
        if isinstance(platform, web.Response):
            return platform
        if request.content_type != "application/json":
            # A web page can send text/plain without a preflight; never JSON.
            return admin_error(415, "the body must be sent as Content-Type: application/json")
        try:
            data = json.loads(await request.read())
        except (ValueError, RecursionError):
            return admin_error(400, "the body must be JSON")
        if not isinstance(data, dict):
            return admin_error(400, "the body must be a JSON object")
        return platform, data

    async def verify_ticket(self, request: web.Request) -> web.Response:
        given = await self._platform_and_body(request)
        if isinstance(given, web.Response):
            return given
        platform, data = given
        ticket = data.get("component_verify_ticket")
        if not isinstance(ticket, str) or not ticket or not ticket.isprintable() or len(ticket) > 1024:
            return admin_error(400, "component_verify_ticket must be a non-empty string")
        try:
            await platform.store_verify_ticket(ticket)
        except StoreUnavailable as exc:
            return admin_error(503, str(exc))
        return web.json_response({"app": platform.app.name, "stored": True})

    async def import_authorizers(self, request: web.Request) -> web.Response:
        """One authorizer ({"authorizer_appid", "authorizer_refresh_token"})
        or many ({"authorizers": [...]}) from an existing platform's database."""
        given = await self._platform_and_body(request)
        if isinstance(given, web.Response):
            return given
        platform, data = given
        items = data.get("authorizers", [data]) if "authorizers" in data else [data]
        if not isinstance(items, list) or not 0 < len(items) <= MAX_IMPORT:
            return admin_error(400, f"authorizers must be a list of 1 to {MAX_IMPORT} entries")
        entries: dict[str, str] = {}
        for index, item in enumerate(items):
            appid = item.get("authorizer_appid") if isinstance(item, dict) else None
            refresh = item.get("authorizer_refresh_token") if isinstance(item, dict) else None
            if not (isinstance(appid, str) and 0 < len(appid) <= 64 and appid.isprintable()
                    and isinstance(refresh, str) and 0 < len(refresh) <= 1024 and refresh.isprintable()):
                return admin_error(400, f"entry {index}: needs authorizer_appid and authorizer_refresh_token "
                                        "(non-empty strings); nothing was imported")
            entries[appid] = refresh
        try:
            await platform.register(entries)
        except StoreUnavailable as exc:
            return admin_error(503, f"{exc}; import again: entries already stored are simply overwritten")
        return web.json_response({"app": platform.app.name, "imported": len(entries)})

    async def list_authorizers(self, request: web.Request) -> web.Response:
        platform = self._platform(request)
        if isinstance(platform, web.Response):
            return platform
        try:
            cursor = int(request.query.get("cursor", "0"))
            count = min(MAX_PAGE, max(1, int(request.query.get("count", "100"))))
        except ValueError:
            return admin_error(400, "cursor and count are numbers")
        try:
            next_cursor, appids = await platform.store.registry_page(platform.app.appid, cursor, count)
            total = await platform.store.registry_count(platform.app.appid)
        except StoreUnavailable as exc:
            return admin_error(503, str(exc))
        now = time.monotonic()
        page = []
        for appid in appids:
            manager = platform.managers.peek(appid)      # listing does not make it recently used
            page.append(authorizer_status(manager, appid, now) if manager is not None
                        else {"authorizer_appid": appid, "cached": False})
        return web.json_response({"app": platform.app.name, "authorizers": total,
                                  "cached": len(platform.managers), "page": page, "next_cursor": next_cursor})

    async def delete_authorizer(self, request: web.Request) -> web.Response:
        platform = self._platform(request)
        if isinstance(platform, web.Response):
            return platform
        appid = request.query.get("authorizer_appid", "")
        if not appid:
            return admin_error(400, "authorizer_appid is required")
        try:
            removed = await platform.remove(appid)
        except StoreUnavailable as exc:
            return admin_error(503, str(exc))
        if not removed:
            return admin_error(404, f"authorizer {appid[:64]!r} is not registered with {platform.app.name}")
        return web.json_response({"app": platform.app.name, "removed": appid})

    def refuse_web_pages(self, request: web.Request) -> web.Response | None:
        """What a web page could make a browser send (DESIGN.md, "Admin
        port"): a foreign Host (probes and scrapers excepted), a cross-site
        Origin or Sec-Fetch-Site. The names served follow a reload."""
        admin = self.sidecar.config.admin
        if self._callers is None or self._callers[0] is not admin:
            self._callers = (admin, Callers("admin port", (admin.host, *admin.allowed_hosts), ip_literals=True,
                                            serves="loopback names, IP literals, admin.host and admin.allowed_hosts"))
        headers = request.headers
        why = self._callers[1].refusal(None if request.path in OPEN_PATHS else headers.get("Host"),
                                       headers.get("Origin"), headers.get("Sec-Fetch-Site"))
        return None if why is None else admin_error(403, why)

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Every /admin/ endpoint, GET included, needs the bearer when
        admin.token is set (/admin/apps names appids and failure reasons);
        without a token, /admin/ is served to loopback callers only, and
        changes are refused outright when admin listens beyond loopback.
        Probes (/healthz, /readyz) and scrapers (/metrics) carry no secret."""
        refused = self.refuse_web_pages(request)
        if refused is not None:
            return refused
        if request.path.startswith("/admin/") or request.path == "/":
            admin = self.sidecar.config.admin      # read per request: a reload may change it
            if admin.token:
                if not bearer_matches(request.headers.get("Authorization"), admin.token):
                    if request.path == "/" and request.method == "GET":
                        # The page, in its 401 state: a browser navigation carries no
                        # bearer; the page takes it from #token=... or its form.
                        return self.page_response(401)
                    response = admin_error(401, "admin token required (Authorization: Bearer ...)")
                    response.headers["WWW-Authenticate"] = 'Bearer realm="wechat-token-sidecar"'
                    return response
            elif request.method not in ("GET", "HEAD") and not is_loopback(admin.host):
                return admin_error(403, "admin.token is empty and admin listens beyond loopback: "
                                        f"{request.method} refused; set admin.token")
            elif not is_loopback(request.remote or ""):
                return admin_error(403, "admin.token is empty: / and /admin/ answer loopback callers only "
                                        "(set admin.token to reach it from elsewhere)")
        return await handler(request)

    async def refresh(self, request: web.Request) -> web.Response:
        name = request.query.get("app") or self.sidecar.config.apps[0].name
        manager = self.sidecar.managers.get(name)
        if manager is None:
            return admin_error(404, f"unknown app {name[:64]!r}")
        credential = request.query.get("credential", "token")
        if credential != "token":
            known = kinds_for(manager.app)
            if credential not in known:
                return admin_error(400, f"unknown credential {credential[:64]!r} for app {name}; "
                                        f"one of token, {', '.join(known)}")
            # A credential never asked for is made now; refresh_now then joins
            # its first fetch, so the refresh asked for is that one fetch.
            manager = manager.credential(credential)
        try:
            token = await manager.refresh_now()
        except RefreshThrottled as exc:
            # The token is still served: not an outage, a "not yet".
            response = admin_error(429, str(exc))
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            return response
        except TokenUnavailable as exc:
            return admin_error(503, str(exc))
        return web.json_response({"app": name, "credential": credential,
                                  "expires_in": int(token.remaining(time.monotonic())), "refreshed": True})

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self.sidecar.metrics.render()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    def app(self) -> web.Application:
        # An import of many authorizers is one POST: up to ~100,000 entries.
        app = web.Application(middlewares=[self.guard], client_max_size=32 * 1024 * 1024)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/", self.page)
        app.router.add_get("/admin/status", self.status)
        app.cleanup_ctx.append(self._sampling)
        app.router.add_get("/admin/apps", self.apps)
        app.router.add_post("/admin/refresh", self.refresh)
        app.router.add_post("/admin/component/verify_ticket", self.verify_ticket)
        app.router.add_post("/admin/authorizers", self.import_authorizers)
        app.router.add_get("/admin/authorizers", self.list_authorizers)
        app.router.add_delete("/admin/authorizers", self.delete_authorizer)
        return app
