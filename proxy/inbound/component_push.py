"""A platform's pushes from WeChat (DESIGN.md, "Third-party platforms"):
verify tickets and authorization events, forwarded unchanged by the
platform's public callback to `POST /sidecar/component/event`. Each push is
checked (msg_signature), decrypted (WeChat's AES scheme), its appid checked,
and only then acted on through the platform's credentials.
"""
from __future__ import annotations

import logging

from ..config import App
from ..credentials import TokenManager
from ..credentials.platform import AuthorizationFailed, Platform
from ..credentials.store import StoreUnavailable
from ..http.replies import sidecar_error
from ..http.server import BodyError, Reply, Request, http_date, query_values
from ..wechat.crypto import CryptoError, MessageCrypto

log = logging.getLogger("proxy.forward")

# A push is a few hundred bytes of XML; anything longer is not one.
MAX_PUSH_BYTES = 64 * 1024

COMPONENT_EVENT_PATH = "/sidecar/component/event"

PUSH_INFO_TYPES = ("component_verify_ticket", "authorized", "updateauthorized", "unauthorized")


class PushRefused(Exception):
    """A push not taken: HTTP status and a reason safe to log and answer."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status, self.why = status, why


def parse_xml(data: bytes, what: str) -> dict[str, str]:
    """The child elements of a flat WeChat XML document, by tag. Declarations
    (<!DOCTYPE, <!ENTITY) are refused before parsing: no entity expansion."""
    if b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
        raise PushRefused(400, f"{what}: XML declarations are not accepted")
    import xml.etree.ElementTree as ElementTree  # only platforms taking pushes parse XML
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        raise PushRefused(400, f"{what} is not XML") from None
    return {child.tag: (child.text or "").strip() for child in root}


class ComponentPushes:
    """The push intake of every platform app, by app name."""

    def __init__(self, platforms: dict[str, Platform]):
        self.platforms = platforms
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
        """A push from WeChat, forwarded unchanged: check, decrypt, act.
        Returns the InfoType; raises PushRefused and changes nothing when the
        push is not WeChat's for this platform."""
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
        encrypt = parse_xml(body, "push body").get("Encrypt")
        if not encrypt:
            raise PushRefused(400, "push body has no Encrypt element")
        if not crypto.check_signature(params["msg_signature"], params["timestamp"], params["nonce"], encrypt):
            _count(platform, "refused")
            raise PushRefused(403, "push signature does not match (msg_signature)")
        try:
            message, appid = crypto.decrypt(encrypt)
        except CryptoError as exc:
            raise PushRefused(400, f"push does not decrypt: {exc}") from None
        if appid != app.appid:
            _count(platform, "refused")
            raise PushRefused(403, "push was encrypted for another appid")
        fields = parse_xml(message, "decrypted push")
        if fields.get("AppId", appid) != app.appid:
            raise PushRefused(403, "push names another platform in AppId")
        info = fields.get("InfoType", "")
        await _act(platform, info, fields)
        _count(platform, info if info in PUSH_INFO_TYPES else "other")
        return info


def _count(platform: Platform, push: str) -> None:
    platform.pushes[push] = platform.pushes.get(push, 0) + 1


async def _act(platform: Platform, info: str, fields: dict[str, str]) -> None:
    try:
        if info == "component_verify_ticket":
            ticket = fields.get("ComponentVerifyTicket", "")
            if not ticket or not ticket.isprintable():
                raise PushRefused(400, "component_verify_ticket push without a ticket")
            await platform.store_verify_ticket(ticket)
        elif info in ("authorized", "updateauthorized"):
            code = fields.get("AuthorizationCode", "")
            if not code:
                raise PushRefused(400, f"{info} push without AuthorizationCode")
            await platform.query_auth(code)
        elif info == "unauthorized":
            appid = fields.get("AuthorizerAppid", "")
            if not appid:
                raise PushRefused(400, "unauthorized push without AuthorizerAppid")
            await platform.remove(appid)
            logging.getLogger("proxy.platform").info(
                "authorizer %s revoked the authorization", appid,
                extra={"event": "authorizer_removed", "app": platform.app.name})
    except AuthorizationFailed as exc:
        raise PushRefused(exc.status, exc.why) from None
    except StoreUnavailable as exc:
        raise PushRefused(503, f"store unavailable: {exc}") from None
