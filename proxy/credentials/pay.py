"""A WeChat Pay merchant's credentials (DESIGN.md, "WeChat Pay (API v3)"):
its private key (signs requests and pay parameters), its APIv3 key (decrypts
certificates and notification resources), WeChat Pay's public key when
configured, and the platform certificates, held by the one credential engine
like a token: fetched at start (or, beside a public key, when a serial no
key knows turns up), every 12 hours, again on an unknown serial at most once
a minute, shared through the store (one download for the fleet). Which key
verifies is chosen by serial, so certificates and a public key work side by
side during a migration (wechat-pay-notes.md §3-§4).
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from typing import Any

from ..config import App, Merchant
from ..wechat import pay as wxpay
from .fetchers import Fetched, FetchError
from .manager import TokenManager, TokenUnavailable
from .policy import FailureKind

log = logging.getLogger("proxy.pay")

# Certificates are fetched again this often (WeChat Pay: "on a schedule
# shorter than 12 h", a new one joins the list 24 h before a switch, §3).
CERTIFICATES_EVERY_S = 12 * 3600.0

# An answer or notification signed with a serial no key knows: the
# certificates are fetched again, at most this often (DESIGN.md).
UNKNOWN_SERIAL_REFETCH_S = 60.0

# Answers and notifications more than this far from now are refused (§2).
SIGNATURE_WINDOW_S = 300


_NONE: dict[str, Any] = {}     # no certificates (one object, so keys() can cache on it)


class SignatureInvalid(Exception):
    """An answer or notification that does not verify: why, safe to show."""


def certificates_app(merchant: Merchant) -> App:
    """The engine holds a merchant's certificates as an App's credential."""
    return App(name=f"{merchant.name}/certificates", appid=merchant.mchid, secret="", token_api="pay_certificates",
               refresh_before_s=600.0, upstream=merchant.upstream, min_refresh_interval_s=UNKNOWN_SERIAL_REFETCH_S)


class CertificateFetcher:
    """`GET /v3/certificates`, signed; the answer verified with the
    certificate it names and each certificate decrypted with the APIv3 key."""
    api = "pay_certificates"

    def __init__(self, pay: "PayMerchant", session: Any, timeout_s: float):
        self.pay, self.session, self.timeout_s = pay, session, timeout_s

    async def fetch(self, force: bool = False) -> Fetched:
        import aiohttp
        merchant = self.pay.merchant
        url = "/v3/certificates"
        headers = {"Authorization": self.pay.authorization("GET", url, b""), "Accept": "application/json",
                   "User-Agent": "wechat-token-sidecar"}
        try:
            async with self.session.get(merchant.upstream + url, headers=headers, allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                body = await resp.content.read(1024 * 1024)
                status, answer_headers = resp.status, {k.lower(): v for k, v in resp.headers.items()}
        except asyncio.TimeoutError:
            raise FetchError(FailureKind.TRANSIENT, None, "pay certificates: timed out") from None
        except aiohttp.ClientError as exc:
            raise FetchError(FailureKind.TRANSIENT, None, f"pay certificates: {exc.__class__.__name__}") from None
        if status != 200:
            code = ""
            try:
                code = str(json.loads(body).get("code", ""))
            except (ValueError, AttributeError, RecursionError):
                pass
            kind = FailureKind.CREDENTIAL if status in (401, 403, 404) else FailureKind.TRANSIENT
            raise FetchError(kind, None, f"pay certificates: HTTP {status} {code}".rstrip())
        try:
            data = json.loads(body)
            certificates = {}
            for item in data["data"]:
                enc = item["encrypt_certificate"]
                pem = wxpay.aead_decrypt(merchant.apiv3_key, enc["nonce"], enc.get("associated_data", ""),
                                         enc["ciphertext"])
                expires = datetime.datetime.fromisoformat(item["expire_time"]).timestamp()
                certificates[str(item["serial_no"]).upper()] = {"pem": pem.decode(), "expires": expires}
        except (ValueError, KeyError, TypeError, wxpay.PayCryptoError, RecursionError) as exc:
            raise FetchError(FailureKind.TRANSIENT, None, f"pay certificates: unreadable answer ({exc})"[:300]) from None
        keys = {serial: wxpay.load_public_key(c["pem"].encode()) for serial, c in certificates.items()}
        try:
            self.pay.verify(answer_headers, body, keys)
        except SignatureInvalid as exc:
            raise FetchError(FailureKind.TRANSIENT, None, f"pay certificates: {exc}") from None
        now = time.time()
        kept = {s: c for s, c in certificates.items() if c["expires"] > now}       # expired ones dropped
        log.info("WeChat Pay platform certificates for %s: %s", merchant.name, ", ".join(sorted(kept)),
                 extra={"event": "pay_certificates", "app": merchant.name})
        return Fetched(value=json.dumps(kept, sort_keys=True), expires_in=CERTIFICATES_EVERY_S)


class PayMerchant:
    def __init__(self, merchant: Merchant):
        self.merchant = merchant
        self.private_key = wxpay.load_private_key(merchant.private_key_pem)
        self.public_key = wxpay.load_public_key(merchant.public_key_pem) if merchant.public_key_pem else None
        self.certificates: TokenManager | None = None
        self._parsed: tuple[str, dict[str, Any], dict[str, Any]] | None = None   # (value, keys, info)
        self._refetched_at = -UNKNOWN_SERIAL_REFETCH_S
        self._keys: tuple[dict[str, Any], dict[str, Any]] | None = None

    # -- signing

    def authorization(self, method: str, url: str, body: bytes) -> str:
        m = self.merchant
        return wxpay.authorization(self.private_key, m.mchid, m.serial_no, method, url, body, int(time.time()))

    def sign(self, *lines: str) -> str:
        return wxpay.sign(self.private_key, wxpay.message(*lines))

    # -- keys by serial

    def _certificates(self) -> tuple[dict[str, Any], dict[str, Any]]:
        token = self.certificates.current() if self.certificates is not None else None
        if token is None:
            return _NONE, _NONE
        if self._parsed is None or self._parsed[0] != token.value:
            info = json.loads(token.value)
            keys = {serial: wxpay.load_public_key(c["pem"].encode()) for serial, c in info.items()}
            self._parsed = (token.value, keys, info)
        return self._parsed[1], self._parsed[2]

    def keys(self) -> dict[str, Any]:
        """Every key by serial: made once per certificate list, not per call."""
        certificates = self._certificates()[0]
        if self._keys is None or self._keys[0] is not certificates:
            keys = dict(certificates)
            if self.public_key is not None:
                keys[self.merchant.public_key_id.upper()] = self.public_key  # type: ignore[union-attr]
            self._keys = (certificates, keys)
        return self._keys[1]

    async def keys_knowing(self, serial: str) -> dict[str, Any]:
        """The keys, with the certificates fetched again first when `serial`
        is one none of them knows (at most once a minute)."""
        keys = self.keys()
        if serial not in keys:
            await self.refetch_certificates(f"WeChat Pay serial {serial[:40]} is not one of {self.merchant.name}'s keys")
            keys = self.keys()
        return keys

    async def refetch_certificates(self, why: str) -> None:
        """Fetch the platform certificates again, at most once a minute (a
        lazy manager, beside a public key, starts here)."""
        now = time.monotonic()
        if self.certificates is None or (now - self._refetched_at < UNKNOWN_SERIAL_REFETCH_S
                                         and self.certificates.current() is not None):
            return
        self._refetched_at = now
        log.info("%s: fetching the certificates", why, extra={"event": "pay_unknown_serial", "app": self.merchant.name})
        try:
            self.certificates.ask()
            held = self.certificates.current()
            if held is None:
                await self.certificates.get()
            else:
                await self.certificates.invalidate(held.value)
        except TokenUnavailable as exc:
            log.warning("WeChat Pay certificates unavailable: %s", exc,
                        extra={"event": "pay_certificates_failed", "app": self.merchant.name})

    def encryption_key(self) -> tuple[str, Any] | None:
        """(serial, key) for sensitive fields: the public key, else the
        certificate that expires last (§7)."""
        if self.public_key is not None:
            return self.merchant.public_key_id, self.public_key  # type: ignore[return-value]
        keys, info = self._certificates()
        if not keys:
            return None
        serial = max(info, key=lambda s: info[s]["expires"])
        return serial, keys[serial]

    def verify(self, headers: dict[str, str], body: bytes, keys: dict[str, Any] | None = None) -> str:
        """Check a Wechatpay-Signature (lower-case header names); the serial used."""
        serial = headers.get("wechatpay-serial", "").strip().upper()
        timestamp = headers.get("wechatpay-timestamp", "")
        nonce = headers.get("wechatpay-nonce", "")
        signature = headers.get("wechatpay-signature", "")
        if not (serial and timestamp and nonce and signature):
            raise SignatureInvalid("not signed (Wechatpay-Signature, -Serial, -Timestamp, -Nonce)")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > SIGNATURE_WINDOW_S:
            raise SignatureInvalid(f"Wechatpay-Timestamp more than {SIGNATURE_WINDOW_S} s from now")
        keys = self.keys() if keys is None else keys
        key = keys.get(serial)
        if key is None and self.public_key is not None and serial == (self.merchant.public_key_id or "").upper():
            key = self.public_key
        if key is None:
            raise SignatureInvalid(f"Wechatpay-Serial {serial[:40]} names no key this merchant holds")
        if not wxpay.verify(key, wxpay.answer_message(timestamp, nonce, body), signature):
            raise SignatureInvalid("Wechatpay-Signature does not verify")
        return serial

    def status(self) -> dict[str, Any]:
        """Serials and expiry, never key material."""
        _, info = self._certificates()
        now = time.time()
        return {"name": self.merchant.name, "mchid": self.merchant.mchid,
                "public_key_id": self.merchant.public_key_id,
                "certificates": [{"serial": s, "expires_in_days": round((c["expires"] - now) / 86400, 1)}
                                 for s, c in sorted(info.items())]}

    async def close(self) -> None:
        if self.certificates is not None:
            await self.certificates.close()
