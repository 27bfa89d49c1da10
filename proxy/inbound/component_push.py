"""A platform's pushes from WeChat (DESIGN.md, "Third-party platforms"):
verify tickets and authorization events, forwarded unchanged by the
platform's public callback to `POST /sidecar/component/event`. Each push is
checked (msg_signature), decrypted (WeChat's AES scheme), its appid checked,
and only then acted on through the platform's credentials.

A push is taken once: its timestamp must be within PUSH_WINDOW_S of now, a
copy of one already taken is refused on every replica (the memory lives in
the store), and state only moves forward: a verify ticket older than the
stored one, or an `unauthorized` older than the account's last
authorization, is answered `success` and ignored.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

from ..config import App
from ..credentials import TokenManager
from ..credentials.platform import AuthorizationFailed, Platform
from ..credentials.store import StoreUnavailable
from ..http.replies import sidecar_error
from ..http.server import BodyError, Reply, Request, http_date, query_values
from ..wechat.crypto import MessageCrypto
from .envelope import REPLAYED, PushRefused, check_window, first_time, open_encrypted, parse_xml, replay_keys

log = logging.getLogger("proxy.forward")

# A push is a few hundred bytes of XML; anything longer is not one.
MAX_PUSH_BYTES = 64 * 1024

COMPONENT_EVENT_PATH = "/sidecar/component/event"

PUSH_INFO_TYPES = ("component_verify_ticket", "authorized", "updateauthorized", "unauthorized")


class ComponentPushes:
    """The push intake of every platform app, by app name."""

    def __init__(self, platforms: dict[str, Platform], wall: Callable[[], float] = time.time):
        self.platforms = platforms
        self.wall = wall
        self.crypto = {name: MessageCrypto(p.app.msg_token, p.app.encoding_aes_key, p.app.appid)
                       for name, p in platforms.items() if p.app.msg_token and p.app.encoding_aes_key}

    async def handle(self, request: Request, app: App, manager: TokenManager, path: str) -> Reply:
        """WeChat's push, forwarded by the platform's public callback."""
        if request.method != "POST":
            return sidecar_error(405, f"{path} answers POST only", outcome="bad_request")
        try:
            body = await request.read()
        except BodyError as exc:
            return sidecar_error(exc.status, exc.why, outcome="bad_request")
        try:
            info = await self.take(self.platforms[app.name], request.query, body)
        except PushRefused as exc:
            log.warning("push refused: %s", exc.why, extra={"event": "push_refused", "app": app.name})
            return sidecar_error(exc.status, exc.why, outcome="forbidden" if exc.status == 403 else "bad_request")
        log.info("push taken: %s", info, extra={"event": "push", "app": app.name})
        return Reply(200, [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Date", http_date())], b"success")

    async def take(self, platform: Platform, raw_query: str, body: bytes) -> str:
        """A push from WeChat, forwarded unchanged: check, decrypt, act, once.
        Returns the InfoType (with " (stale)" when older than what is stored);
        raises PushRefused and changes nothing when the push is not WeChat's
        for this platform, or was taken already."""
        app = platform.app
        crypto = self.crypto.get(app.name)
        if crypto is None:
            raise PushRefused(404, f"app {app.name} takes no pushes: set token and encoding_aes_key")
        if len(body) > MAX_PUSH_BYTES:
            raise PushRefused(413, f"push over {MAX_PUSH_BYTES} bytes")
        params = {name: (query_values(raw_query, name) or [""])[0]
                  for name in ("msg_signature", "timestamp", "nonce")}
        if not all(params.values()):
            raise PushRefused(400, "push without msg_signature, timestamp and nonce in the query")
        timestamp = params["timestamp"]
        try:
            check_window(timestamp, self.wall())
        except PushRefused:
            _count(platform, "refused")
            raise
        try:
            message, encrypt = open_encrypted(crypto, body, params["msg_signature"], timestamp, params["nonce"])
        except PushRefused as exc:
            if exc.status == 403:
                _count(platform, "refused")
            raise
        fields = parse_xml(message, "decrypted push")
        if fields.get("AppId", app.appid) != app.appid:
            raise PushRefused(403, "push names another platform in AppId")
        created = fields.get("CreateTime", "")
        created_at = int(created) if created.isascii() and created.isdigit() and len(created) <= 12 else int(timestamp)
        # (timestamp, nonce) or signature seen: a replay
        seen = replay_keys(f"component:{app.name}", timestamp, params["nonce"],
                           f"{params['msg_signature']}\n{encrypt}")
        try:
            first = await first_time(platform.store, seen)
        except StoreUnavailable as exc:
            raise PushRefused(503, f"store unavailable: {exc}") from None
        if not first:
            _count(platform, "replayed")
            raise PushRefused(403, REPLAYED)
        info = fields.get("InfoType", "")
        try:
            taken = await _act(platform, info, fields, created_at)
        except PushRefused as exc:
            if exc.status >= 500:           # not taken after all: WeChat's retry must get through
                with contextlib.suppress(StoreUnavailable):
                    for key in seen:
                        await platform.store.release_claim(key)
            raise
        _count(platform, (info if info in PUSH_INFO_TYPES else "other") if taken else "stale")
        return info if taken else f"{info} (stale: older than the state stored, ignored)"


def _count(platform: Platform, push: str) -> None:
    platform.pushes[push] = platform.pushes.get(push, 0) + 1


async def _act(platform: Platform, info: str, fields: dict[str, str], created: int) -> bool:
    """Act on a push; False when it is older than the state stored (ignored)."""
    try:
        if info == "component_verify_ticket":
            ticket = fields.get("ComponentVerifyTicket", "")
            if not ticket or not ticket.isprintable():
                raise PushRefused(400, "component_verify_ticket push without a ticket")
            return await platform.store_verify_ticket(ticket, created)
        if info in ("authorized", "updateauthorized"):
            code = fields.get("AuthorizationCode", "")
            if not code:
                raise PushRefused(400, f"{info} push without AuthorizationCode")
            appid = fields.get("AuthorizerAppid", "")
            if appid and not await platform.authorization_moves_forward(appid, info, created):
                return False
            await platform.query_auth(code)
        elif info == "unauthorized":
            appid = fields.get("AuthorizerAppid", "")
            if not appid:
                raise PushRefused(400, "unauthorized push without AuthorizerAppid")
            if not await platform.authorization_moves_forward(appid, info, created):
                return False
            await platform.remove(appid)
            logging.getLogger("proxy.platform").info(
                "authorizer %s revoked the authorization", appid,
                extra={"event": "authorizer_removed", "app": platform.app.name})
        return True
    except AuthorizationFailed as exc:
        raise PushRefused(exc.status, exc.why) from None
    except StoreUnavailable as exc:
        raise PushRefused(503, f"store unavailable: {exc}") from None
