"""WeChat Pay notifications on the callbacks listener at `/pay/<merchant>`
(DESIGN.md, "WeChat Pay (API v3)"): the signature verified by its serial
(a bad one is 401 and nothing is delivered), the timestamp within 300 s,
`resource` decrypted (AEAD_AES_256_GCM with the APIv3 key), and the result
POSTed to the merchant's `notify_to` as JSON with `X-WeChat-Notification-Id`.
The app's 2xx is a 204 to WeChat Pay; anything else a 500 `{"code": "FAIL"}`
so WeChat Pay sends it again on its own schedule (wechat-pay-notes.md §6).
An id already delivered is acknowledged without a second delivery, for 24 h,
through the store (one delivery for the fleet).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

import aiohttp

from ..credentials import TokenStore
from ..credentials.pay import PayMerchant, SignatureInvalid
from ..credentials.store import StoreUnavailable
from ..wechat import pay as wxpay

log = logging.getLogger("proxy.pay")

# WeChat Pay re-sends a notification for 24 h 4 min (§6): remembered that long.
DELIVERED_FOR_S = 24 * 3600 + 300
# A notification being delivered is held this long; a copy arriving meanwhile is told to come back.
IN_FLIGHT_S = 60.0
DELIVERY_TIMEOUT_S = 10.0


class Answer:
    def __init__(self, status: int, code: str = "", message: str = ""):
        self.status = status
        self.body = json.dumps({"code": code, "message": message}).encode() if code else b""


class PayNotifications:
    def __init__(self, merchants: dict[str, PayMerchant], store: TokenStore,
                 session: Callable[[], aiohttp.ClientSession | None], count: Callable[[str, str], None]):
        self.merchants, self.store, self.session, self.count = merchants, store, session, count

    async def take(self, name: str, headers: dict[str, str], body: bytes) -> Answer:
        merchant = self.merchants.get(name)
        if merchant is None:
            return Answer(404, "NOT_FOUND", f"no merchant {name[:64]!r}")
        m = merchant.merchant
        serial = headers.get("wechatpay-serial", "").strip().upper()
        try:
            merchant.verify(headers, body, await merchant.keys_knowing(serial))
        except SignatureInvalid as exc:
            log.warning("pay notification refused: %s", exc, extra={"event": "pay_notify_refused", "app": name})
            self.count(name, "refused")
            return Answer(401, "FAIL", f"signature: {exc}")
        try:
            note = json.loads(body)
            resource = note["resource"]
            plain = wxpay.aead_decrypt(m.apiv3_key, resource["nonce"], resource.get("associated_data", ""),
                                       resource["ciphertext"])
            decrypted = json.loads(plain)
            note_id = str(note["id"])
        except (ValueError, KeyError, TypeError, RecursionError, wxpay.PayCryptoError) as exc:
            log.error("pay notification for %s cannot be read: %s", name, str(exc)[:200],
                      extra={"event": "pay_notify_unreadable", "app": name})
            return Answer(500, "FAIL", "the notification cannot be decrypted (APIv3 key?)")
        if not m.notify_to:
            return Answer(500, "FAIL", f"merchant {name} has no notify_to")
        key = f"{m.mchid}:{note_id}"
        try:
            if await self.store.get_value_ttl(f"paynotified:{key}"):
                self.count(name, "duplicate")
                return Answer(204)                       # delivered already: acknowledged, not delivered again
            if not await self.store.claim_once(f"paynotify:{key}", IN_FLIGHT_S):
                return Answer(500, "FAIL", "this notification is being delivered; send it again later")
        except StoreUnavailable as exc:
            return Answer(500, "FAIL", f"store unavailable: {exc}")
        delivered = await self._deliver(m.notify_to, note_id, {
            "id": note_id, "create_time": note.get("create_time"), "event_type": note.get("event_type"),
            "resource_type": note.get("resource_type"), "summary": note.get("summary"), "resource": decrypted})
        try:
            if delivered is None:
                await self.store.set_value_ttl(f"paynotified:{key}", "1", DELIVERED_FOR_S)
            await self.store.release_claim(f"paynotify:{key}")
        except StoreUnavailable:
            pass
        if delivered is not None:
            self.count(name, "failed")
            return Answer(500, "FAIL", delivered)
        self.count(name, "delivered")
        return Answer(204)

    async def _deliver(self, url: str, note_id: str, payload: dict[str, Any]) -> str | None:
        """None when the app took it (2xx), else why not."""
        session = self.session()
        if session is None:
            return "the sidecar is stopping"
        try:
            async with session.post(url, json=payload, headers={"X-WeChat-Notification-Id": note_id},
                                    timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S),
                                    allow_redirects=False) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"the app could not be reached ({exc.__class__.__name__})"
        return None if 200 <= status < 300 else f"the app answered HTTP {status}"
