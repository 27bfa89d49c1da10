"""A platform app's side of a proxied call (DESIGN.md, "Third-party
platforms"): which credential the call carries (an authorizer's token as
access_token, the component token as component_access_token, or none), and
the answers the platform's own endpoints get from the sidecar itself.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Awaitable, Callable

from ..config import App
from ..credentials import TokenManager
from ..credentials.platform import AUTHORIZER_APPID_RE, Platform
from ..credentials.store import StoreUnavailable
from ..http.replies import local_reply, sidecar_error
from ..http.server import BodyError, Reply, Request
from .replies import SIDECAR_ROOT, held

log = logging.getLogger("proxy.forward")

# A local answer: given the call, its app, the manager of the credential the
# call is for and the path, a reply, or None to forward the call after all.
Handler = Callable[[Request, App, TokenManager, str], Awaitable["Reply | None"]]

COMPONENT_ROOT = "/cgi-bin/component/"
QUERY_AUTH_PATH = "/cgi-bin/component/api_query_auth"


class PlatformCalls:
    def __init__(self, platforms: dict[str, Platform], token_answers: dict[str, Handler],
                 no_token_prefixes: tuple[str, ...], push_answers: dict[str, Handler] | None = None):
        self.platforms = platforms
        # /cgi-bin/token and the like, answered with an authorizer's token.
        self.token_answers = token_answers
        self.no_token_prefixes = no_token_prefixes
        self.local: dict[str, Handler] = {
            "/cgi-bin/component/api_component_token": self.component_token,
            "/cgi-bin/component/api_authorizer_token": self.authorizer_token,
            **(push_answers or {}),     # /sidecar/component/event: the inbound side's intake
        }

    async def route(self, request: Request, platform: Platform, path: str
                    ) -> tuple[TokenManager | None, str, str, Handler | None] | Reply:
        """A platform app's call: for an authorizer (X-WeChat-Authorizer or
        the path prefix /<app>/<authorizer appid>/), with the component token
        (/cgi-bin/component/...), one of the platform's own endpoints, or a
        pass-through; anything else lacks the account it is for."""
        named = request.noted.get(b"x-wechat-authorizer")
        appid = named.decode("latin-1").strip() if named is not None else None
        if appid is None:
            first, slash, rest = path[1:].partition("/")
            if AUTHORIZER_APPID_RE.match(first):
                appid, path = first, "/" + rest
        if appid is not None:
            try:
                manager = await platform.authorizer(appid)
            except StoreUnavailable as exc:
                return sidecar_error(503, f"authorizer {appid[:64]!r}: {exc}")
            if manager is None:
                return sidecar_error(404, f"unknown authorizer {appid[:64]!r} for platform app {platform.app.name} "
                                          "(authorized accounts register through the authorized push, "
                                          "api_query_auth or POST /admin/authorizers)", outcome="bad_request")
            return manager, path, "access_token", self.token_answers.get(path)
        component = platform.component
        local = self.local.get(path)
        if local is not None or path.startswith(COMPONENT_ROOT):
            return component, path, "component_access_token", local
        if path.startswith(SIDECAR_ROOT) or path.startswith(self.no_token_prefixes):
            return None, path, "", None   # a pass-through, or the 404 of an unknown /sidecar/ path
        return sidecar_error(400, f"a call for platform app {platform.app.name} names the authorized account: "
                                  "header X-WeChat-Authorizer: <appid> or the path prefix "
                                  f"/{platform.app.name}/<authorizer appid>/ (component calls go to "
                                  "/cgi-bin/component/...)", outcome="bad_request")

    async def register_from(self, platform: Platform, reply: Reply) -> None:
        """api_query_auth was forwarded: its answer registers the authorizer."""
        if reply.status != 200 or not reply.body:
            return
        try:
            data = json.loads(reply.body)
            await platform.register_answer(data)
        except (ValueError, RecursionError, MemoryError):
            return
        except StoreUnavailable as exc:
            log.error("api_query_auth answered but the authorizer could not be registered: %s", exc,
                      extra={"event": "store_error", "app": platform.app.name})

    @staticmethod
    async def component_token(request: Request, app: App, manager: TokenManager, path: str) -> Reply | None:
        """api_component_token answered from the managed component token."""
        if request.method != "POST":
            return None
        if request.body_exists:
            try:
                await request.read()
            except BodyError as exc:
                return sidecar_error(exc.status, exc.why, outcome="bad_request")
        token = await held(manager)
        if isinstance(token, Reply):
            return token
        left = max(1, int(token.remaining(time.monotonic())))
        return local_reply(json.dumps({"component_access_token": token.value, "expires_in": left}).encode())

    async def authorizer_token(self, request: Request, app: App, manager: TokenManager, path: str) -> Reply | None:
        """api_authorizer_token answered from the authorizer's managed token:
        an SDK's refresh never spends (or races for) the refresh token."""
        if request.method != "POST":
            return None
        try:
            data = json.loads(await request.read() or b"{}")
        except BodyError as exc:
            return sidecar_error(exc.status, exc.why, outcome="bad_request")
        except ValueError:
            data = None
        except (RecursionError, MemoryError):
            return sidecar_error(400, "the JSON body nests too deeply", outcome="bad_request")
        appid = data.get("authorizer_appid") if isinstance(data, dict) else None
        if not isinstance(appid, str) or not appid:
            return sidecar_error(400, "api_authorizer_token needs authorizer_appid in its JSON body",
                                 outcome="bad_request")
        try:
            authorizer = await self.platforms[app.name].authorizer(appid)
        except StoreUnavailable as exc:
            return sidecar_error(503, f"authorizer {appid[:64]!r}: {exc}")
        if authorizer is None:
            return sidecar_error(404, f"unknown authorizer {appid[:64]!r} for platform app {app.name}",
                                 outcome="bad_request")
        token = await held(authorizer)
        if isinstance(token, Reply):
            return token
        left = max(1, int(token.remaining(time.monotonic())))
        answer: dict[str, Any] = {"authorizer_access_token": token.value, "expires_in": left}
        given = data.get("authorizer_refresh_token")       # echoed: the sidecar keeps the real one
        if isinstance(given, str):
            answer["authorizer_refresh_token"] = given
        return local_reply(json.dumps(answer).encode())
