"""Pushes from WeChat to apps, on the callbacks listener (DESIGN.md, "Pushes
from WeChat to apps"): verified, decrypted, deduplicated and delivered, so
that apps never hold the message token or the AES key.

    /wechat/<app>                      an app's messages and events (Official
                                       Account, Mini Program, WeCom); a platform
                                       app's InfoType pushes
    /wechat/<platform>/<authorizer>    an authorized account's ($APPID$ URL)

Every push: verify (timestamp window, signature or msg_signature, receive id)
-> decrypt -> take once (message id, shared through the store) -> deliver ->
reply (encrypted and signed when the push was). WeChat waits 5 s and then
retries three times (push notes §6): an app slower than reply_within_s gets
WeChat answered `success` while delivery goes on, and WeChat's retry of a
message already delivered gets the first reply.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..config import App, Config
from ..credentials import TokenStore
from ..credentials.platform import AUTHORIZER_APPID_RE
from ..credentials.store import StoreUnavailable
from ..wechat.crypto import MessageCrypto
from .component_push import ComponentPushes
from .delivery import Delivery, Failed, Message
from .envelope import (
    REPLAYED,
    PushRefused,
    check_plain_signature,
    check_window,
    first_time,
    is_json,
    open_ciphertext,
    open_encrypted,
    parse_message,
    replay_keys,
)

log = logging.getLogger("proxy.push")

# WeChat retries within about 15 s; a message is remembered as taken (and its
# reply kept for those retries) for 5 minutes, through the store, so every
# replica agrees (DESIGN.md).
DEDUPE_S = 300.0

SUCCESS = b"success"


@dataclass(frozen=True)
class Account:
    """Whose push it is, and how it is checked."""
    app: App
    appid: str                    # X-WeChat-Appid: the app's, or the authorizer's
    token: str
    crypto: MessageCrypto | None  # None: plaintext mode only (no encoding_aes_key)
    wecom: bool


class MessageIntake:
    def __init__(self, config: Config, store: TokenStore, delivery: Delivery, component: ComponentPushes,
                 count: Callable[[str, str], None], wall: Callable[[], float] = time.time):
        self.store, self.delivery, self.component = store, delivery, component
        self.count = count              # (app, result) -> wts_pushes_total
        self.wall = wall
        self.apps = {app.name: app for app in config.apps}
        self.crypto: dict[str, MessageCrypto] = {}
        for app in config.apps:
            if app.push is not None and app.push.encoding_aes_key:
                self.crypto[app.name] = MessageCrypto(app.push.token, app.push.encoding_aes_key, app.appid)
        self._late: set[asyncio.Task[None]] = set()

    def account(self, name: str, authorizer: str | None) -> Account | None:
        app = self.apps.get(name)
        if app is None or app.push is None:
            return None
        if authorizer is not None:
            if app.token_api != "component" or not AUTHORIZER_APPID_RE.match(authorizer):
                return None
            # An authorized account's pushes: the platform's token and key, and
            # the platform's appid as receive id (push notes §4).
            return Account(app, authorizer, app.push.token, self.crypto.get(app.name), False)
        return Account(app, app.appid, app.push.token, self.crypto.get(app.name), app.token_api == "wecom")

    # ------------------------------------------------------------ URL verification (GET)

    def verify_url(self, account: Account, query: dict[str, str]) -> bytes:
        timestamp, nonce, echostr = query.get("timestamp", ""), query.get("nonce", ""), query.get("echostr", "")
        if not (timestamp and nonce and echostr):
            raise PushRefused(400, "URL verification needs timestamp, nonce and echostr")
        if account.wecom:
            # WeCom: msg_signature over the four values; the answer is the decrypted echostr.
            assert account.crypto is not None
            return open_ciphertext(account.crypto, echostr, query.get("msg_signature", ""), timestamp, nonce,
                                   "echostr")
        check_plain_signature(account.token, query.get("signature", ""), timestamp, nonce)
        return echostr.encode()

    # ------------------------------------------------------------ pushes (POST)

    async def take(self, account: Account, query: dict[str, str], body: bytes) -> tuple[bytes, str]:
        """The answer for WeChat (a reply, or `success`) and its content type."""
        app = account.app
        timestamp, nonce = query.get("timestamp", ""), query.get("nonce", "")
        if not nonce:
            raise PushRefused(400, "push without nonce in the query")
        check_window(timestamp, self.wall())
        encrypted = account.wecom or query.get("encrypt_type", "") == "aes"
        if encrypted:
            if account.crypto is None:
                raise PushRefused(400, f"app {app.name} has no encoding_aes_key: encrypted pushes cannot be read")
            msg_signature = query.get("msg_signature", "")
            message, encrypt = open_encrypted(account.crypto, body, msg_signature, timestamp, nonce)
            signed = f"{msg_signature}\n{encrypt}"
        else:
            check_plain_signature(account.token, query.get("signature", ""), timestamp, nonce)
            message, signed = body, query.get("signature", "")
        as_json = is_json(message)
        fields = parse_message(message, "push")
        msg_id = message_id(fields, message)
        key = f"{app.name}:{account.appid}:{msg_id}"
        try:
            # A (timestamp, nonce) or a signature seen before is a replay,
            # refused on every replica, whatever the body (a plaintext push's
            # signature does not cover it). WeChat's own retries come with a
            # new timestamp and nonce, and meet the message-id dedupe below.
            if not await first_time(self.store, replay_keys(app.name, timestamp, nonce, signed)):
                self.count(app.name, "replayed")
                raise PushRefused(403, REPLAYED)
            if not await self.store.claim_once(f"push:{key}", DEDUPE_S):
                # WeChat's retry of a message taken already (on any replica):
                # the first reply if there was one, else success.
                self.count(app.name, "duplicate")
                kept = await self.store.get_value_ttl(f"pushreply:{key}")
                reply = base64.b64decode(kept) if kept else SUCCESS
                return self._answer(account, reply, encrypted, timestamp, nonce, as_json)
        except StoreUnavailable as exc:
            raise PushRefused(503, f"store unavailable: {exc}") from None
        deliver = Message(app.name, account.appid, msg_id, message, as_json, app.push.deliver_to)  # type: ignore[union-attr]
        reply = await self._deliver(deliver, app.push.reply_within_s, key)  # type: ignore[union-attr]
        return self._answer(account, reply, encrypted, timestamp, nonce, as_json)

    async def _deliver(self, message: Message, within: float, key: str) -> bytes:
        """The app's reply if it comes within `within` s; else `success`,
        with delivery going on (and redelivery if the app is down)."""
        task = asyncio.ensure_future(self._attempt(message, key))
        try:
            return await asyncio.wait_for(asyncio.shield(task), within)
        except asyncio.TimeoutError:
            self.count(message.app, "late")
            log.warning("push %s: the app did not answer within %.1f s; WeChat was answered success and "
                        "delivery goes on", message.msg_id, within, extra={"event": "push_late", "app": message.app})
            self._late.add(task)           # type: ignore[arg-type]
            task.add_done_callback(self._late.discard)
            return SUCCESS

    async def _attempt(self, message: Message, key: str) -> bytes:
        try:
            reply = await self.delivery.attempt(message)
        except Failed as exc:
            self.delivery.failed(message, str(exc))
            log.warning("push %s: %s; it will be delivered again", message.msg_id, exc,
                        extra={"event": "push_queued", "app": message.app})
            self.delivery.enqueue(message)
            return SUCCESS
        self.count(message.app, "delivered")
        reply = reply.strip()
        if reply and reply != SUCCESS:
            await self.keep_reply(key, reply)
        return reply or SUCCESS

    async def keep_reply(self, key: str, reply: bytes) -> None:
        try:
            await self.store.set_value_ttl(f"pushreply:{key}", base64.b64encode(reply).decode(), DEDUPE_S)
        except StoreUnavailable:
            pass                                         # WeChat's retry then gets success: no reply, no error

    def _answer(self, account: Account, reply: bytes, encrypted: bool, timestamp: str, nonce: str,
                as_json: bool) -> tuple[bytes, str]:
        if not reply or reply == SUCCESS:
            return SUCCESS, "text/plain; charset=utf-8"
        content_type = "application/json" if as_json else "text/xml; charset=utf-8"
        if encrypted and account.crypto is not None:
            # The reply of an encrypted push is encrypted and signed; the
            # nonce echoes the push's, the timestamp is now (push notes §5).
            return account.crypto.reply(reply, str(int(self.wall())), nonce, as_json), content_type
        return reply, content_type

    async def close(self) -> None:
        for task in list(self._late):
            task.cancel()


def message_id(fields: dict[str, Any], message: bytes) -> str:
    """MsgId for messages; for events FromUserName + CreateTime + Event plus a
    short digest of the message, so two events of one second stay apart
    (push notes §6: WeCom batch approvals, media-check callbacks)."""
    msg_id = fields.get("MsgId", fields.get("msgid"))
    if isinstance(msg_id, (int, str)) and str(msg_id).strip() and not isinstance(msg_id, bool):
        return str(msg_id).strip()
    digest = hashlib.sha256(message).hexdigest()[:12]
    parts = (fields.get("FromUserName", ""), fields.get("CreateTime", ""), fields.get("Event", ""))
    return "-".join(str(p) for p in parts) + f"-{digest}"


