"""The callbacks listener (DESIGN.md, "Pushes from WeChat to apps"): the one
port meant to face the internet. Push intake only: no forwarding, no admin,
no local answers; any other path is 404; bodies over 1 MiB are 413. Its own
access lines (method, path, status, duration; never a query or a body: the
query carries signatures, the body the message)."""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

from aiohttp import web

from ..http.server import json_error_body
from .component_push import ComponentPushes
from .envelope import PushRefused
from .messages import MessageIntake
from .pay_notify import PayNotifications

log = logging.getLogger("proxy.callbacks")

# A push is a few KiB; WeChat's largest (a news article event) well under a
# MiB. Bigger bodies are refused before they are read whole (DESIGN.md).
MAX_PUSH_BYTES = 1024 * 1024

PUSH_ROOT = "/wechat/"


def callback_error(status: int, why: str) -> web.Response:
    return web.Response(status=status, body=json_error_body(why),
                        headers={"Content-Type": "application/json; charset=utf-8"})


class CallbacksListener:
    def __init__(self, intake: Callable[[], MessageIntake], component: Callable[[], ComponentPushes],
                 platforms: Callable[[], dict], count: Callable[[str, str], None],
                 pay: Callable[[], "PayNotifications | None"] = lambda: None):
        # Looked up per push: a reload replaces them.
        self.intake, self.component, self.platforms, self.count = intake, component, platforms, count
        self.pay = pay

    async def pay_notification(self, request: web.Request) -> web.Response:
        """WeChat Pay's notifications (pay_notify.py)."""
        notifications = self.pay()
        name = request.match_info["merchant"]
        if notifications is None:
            return callback_error(404, "no WeChat Pay merchants are configured")
        if request.method != "POST":
            return callback_error(405, "WeChat Pay notifications are POST")
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = await notifications.take(name, headers, body)
        return web.Response(status=answer.status, body=answer.body or None,
                            content_type="application/json" if answer.body else None)

    @web.middleware
    async def access(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        started = time.monotonic()
        try:
            response = await handler(request)
        except web.HTTPRequestEntityTooLarge:
            response = callback_error(413, f"push body over {MAX_PUSH_BYTES} bytes")
        except web.HTTPException as exc:
            response = callback_error(exc.status, exc.reason.lower())
        log.info("%s %s -> %d", request.method, request.path[:256], response.status,
                 extra={"event": "callback", "method": request.method, "path": request.path[:256],
                        "status": response.status, "duration_s": round(time.monotonic() - started, 4)})
        return response

    async def push(self, request: web.Request) -> web.Response:
        name = request.match_info["app"]
        authorizer = request.match_info.get("authorizer")
        query = dict(request.query)
        platform = self.platforms().get(name)
        if platform is not None and authorizer is None:
            # A platform's authorization events (InfoType): the platform intake.
            if request.method != "POST":
                return callback_error(405, "a platform's event URL takes POST only")
            body = await request.read()
            try:
                await self.component().take(platform, request.query_string, body)
            except PushRefused as exc:
                log.warning("push refused: %s", exc.why, extra={"event": "push_refused", "app": name})
                return callback_error(exc.status, exc.why)
            return web.Response(body=b"success", content_type="text/plain")
        intake = self.intake()
        account = intake.account(name, authorizer)
        if account is None:
            return callback_error(404, f"no push intake at {request.path[:128]}")
        try:
            if request.method == "GET":
                answer = intake.verify_url(account, query)
                self.count(name, "verified")
                return web.Response(body=answer, content_type="text/plain")
            if request.method != "POST":
                return callback_error(405, "pushes are POST, URL verification GET")
            body = await request.read()
            reply, content_type = await intake.take(account, query, body)
        except PushRefused as exc:
            self.count(name, "refused")
            log.warning("push refused: %s", exc.why, extra={"event": "push_refused", "app": name})
            return callback_error(exc.status, exc.why)
        return web.Response(body=reply, headers={"Content-Type": content_type})

    async def not_here(self, request: web.Request) -> web.Response:
        return callback_error(404, f"no push intake at {request.path[:128]}: this port takes WeChat's pushes only")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.access], client_max_size=MAX_PUSH_BYTES)
        app.router.add_route("*", "/wechat/{app}", self.push)
        app.router.add_route("*", "/wechat/{app}/{authorizer}", self.push)
        app.router.add_route("*", "/pay/{merchant}", self.pay_notification)
        app.router.add_route("*", "/{tail:.*}", self.not_here)
        return app
