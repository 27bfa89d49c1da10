"""The admin port: liveness, readiness, the per-app view and the passive
refresh interface. Nothing here ever answers a token or a secret."""
from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING

from aiohttp import web

from .config import is_loopback
from .httpserver import json_error_body
from .metrics import CONTENT_TYPE
from .tokens import TokenUnavailable
from .tokens.store import StoreUnavailable

if TYPE_CHECKING:
    from .server import Sidecar


# The classic Prometheus text format, which every Prometheus version scrapes.
METRICS_CONTENT_TYPE = CONTENT_TYPE


def admin_error(status: int, why: str) -> web.Response:
    """The admin port's errors, in the same JSON shape as the proxy port's."""
    return web.Response(status=status, body=json_error_body(why),
                        headers={"Content-Type": "application/json; charset=utf-8"})


class AdminRoutes:
    def __init__(self, sidecar: "Sidecar"):
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
            answers.append(status)
        return web.json_response({"apps": answers})

    async def refresh(self, request: web.Request) -> web.Response:
        admin = self.sidecar.config.admin
        if admin.token:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {admin.token}".encode()):
                return admin_error(401, "admin token required (Authorization: Bearer ...)")
        elif not is_loopback(admin.host):
            return admin_error(403, "admin.token is empty and admin listens beyond loopback: "
                                      "POST refused; set admin.token")
        name = request.query.get("app") or self.sidecar.config.apps[0].name
        manager = self.sidecar.managers.get(name)
        if manager is None:
            return admin_error(404, f"unknown app {name[:64]!r}")
        try:
            token = await manager.refresh_now()
        except TokenUnavailable as exc:
            return admin_error(503, str(exc))
        return web.json_response({"app": name, "expires_in": int(token.remaining(time.monotonic())),
                                  "refreshed": True})

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self.sidecar.metrics.render()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/admin/apps", self.apps)
        app.router.add_post("/admin/refresh", self.refresh)
        return app
