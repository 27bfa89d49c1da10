"""The admin port: liveness, readiness, the per-app view and the passive
refresh interface. Nothing here ever answers a token or a secret."""
from __future__ import annotations

import hmac
import math
import time
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from .config import is_loopback
from .credentials import kinds_for
from .httpserver import json_error_body
from .metrics import CONTENT_TYPE
from .tokens import RefreshThrottled, TokenUnavailable
from .tokens.store import StoreUnavailable

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics
    from .tokens import TokenManager


class Sidecar(Protocol):
    """What the admin routes read of the running sidecar (server.Sidecar),
    named here so that this module does not import the server that serves it."""
    config: "Config"
    managers: "dict[str, TokenManager]"
    metrics: "Metrics"


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

    async def healthz(self, request: web.Request) -> web.Response:
        # Liveness: the event loop answers. Never depends on WeChat or a store.
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        missing = {name: m.state.unavailable_reason(time.monotonic())
                   for name, m in self.sidecar.managers.items() if m.current() is None}
        if missing:
            return web.json_response({"status": "not ready", "apps": missing}, status=503)
        # Still ready while a valid token is served, but say what is failing.
        warnings = {name: f"last fetch failed: {m.state.last_failure.describe()}"
                    for name, m in self.sidecar.managers.items()
                    if m.state.failures and m.state.last_failure is not None}
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
            answers.append(status)
        return web.json_response({"apps": answers})

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Every /admin/ endpoint, GET included, needs the bearer when
        admin.token is set (/admin/apps names appids and failure reasons);
        without a token, changes are refused beyond loopback. Probes
        (/healthz, /readyz) and scrapers (/metrics) carry no secret."""
        if request.path.startswith("/admin/"):
            admin = self.sidecar.config.admin      # read per request: a reload may change it
            if admin.token:
                if not bearer_matches(request.headers.get("Authorization"), admin.token):
                    response = admin_error(401, "admin token required (Authorization: Bearer ...)")
                    response.headers["WWW-Authenticate"] = 'Bearer realm="wechat-token-sidecar"'
                    return response
            elif request.method not in ("GET", "HEAD") and not is_loopback(admin.host):
                return admin_error(403, "admin.token is empty and admin listens beyond loopback: "
                                        f"{request.method} refused; set admin.token")
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
        app = web.Application(middlewares=[self.guard])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/admin/apps", self.apps)
        app.router.add_post("/admin/refresh", self.refresh)
        return app
