"""WeChat Pay API v3 calls through the sidecar (DESIGN.md, "WeChat Pay (API
v3)"): the app sends plain JSON to `/v3/...` (the first merchant),
`/<merchant>/v3/...` or with `X-WeChat-Merchant`; the sidecar signs exactly
the bytes it sends (the app's Authorization replaced, no access_token ever
added), verifies the answer by its serial before the app sees it (502 and
nothing relayed when it does not hold), and relays the `Wechatpay-*` headers.
Bill files are streamed unverified: WeChat Pay does not sign them. It also
answers the pay parameters pages need and encrypts sensitive fields.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from ..config import Config
from ..credentials.pay import PayMerchant, SignatureInvalid
from ..http.client import UpstreamError, UpstreamTimeout
from ..http.replies import local_reply, sidecar_error
from ..http.server import BodyError, Reply, Request, query_values
from ..wechat import pay as wxpay
from .pools import HOP_BY_HOP_BYTES, Pools
from .replies import named

# An answer is verified whole: WeChat Pay's JSON answers are small; a bigger
# one is not an answer the sidecar can vouch for.
MAX_ANSWER_BYTES = 4 * 1024 * 1024

# Unsigned by WeChat Pay (wechat-pay-notes.md §9): streamed, the app checks the hash.
UNSIGNED_DOWNLOADS = ("/v3/billdownload/file",)

PAY_ROOT = "/v3/"
LOCAL_ROOT = "/sidecar/pay/"

# The app's headers that never go to WeChat Pay: the hop-by-hop ones and ours,
# and the app's own Authorization (the sidecar signs).
DROPPED = HOP_BY_HOP_BYTES | {b"authorization", b"x-wechat-merchant"}


class PayCalls:
    def __init__(self, config: Config, merchants: dict[str, PayMerchant], pools: Pools):
        self.config, self.merchants, self.pools = config, merchants, pools
        self.first = next(iter(merchants.values()))

    def route(self, path: str, request: Request) -> tuple[PayMerchant, str] | Reply | None:
        """(merchant, path) for a Pay call or a pay answer; None: not Pay's."""
        first, _, rest = path[1:].partition("/")
        merchant = self.merchants.get(first)
        if merchant is not None and ("/" + rest).startswith((PAY_ROOT, LOCAL_ROOT)):
            return merchant, "/" + rest
        if not path.startswith((PAY_ROOT, LOCAL_ROOT)):
            return None
        given = request.header(b"x-wechat-merchant")
        if given is None and path.startswith(LOCAL_ROOT):
            values = query_values(request.query, "merchant")
            given = values[0] if values else None
        if given is not None:
            found = named(self.merchants, given, "merchant")
            return found if isinstance(found, Reply) else (found, path)
        return self.first, path

    async def handle(self, request: Request, merchant: PayMerchant, path: str) -> Reply:
        m = merchant.merchant
        if not m.allow.allows(path):
            return sidecar_error(403, f"{path[:256]} is not in merchant {m.name}'s allow list", outcome="denied")
        if path.startswith(LOCAL_ROOT):
            return await self.local(request, merchant, path[len(LOCAL_ROOT):])
        try:
            body = await request.read() if request.body_exists else b""
        except BodyError as exc:
            return sidecar_error(exc.status, exc.why, outcome="bad_request")
        target = f"{path}?{request.query}" if request.query else path
        pool = self.pools.pool(m.upstream)
        headers = [(k, v) for k, v in request.raw_headers if k.lower() not in DROPPED]
        if not any(k.lower() == b"accept" for k, _ in headers):
            headers.append((b"Accept", b"application/json"))
        # The signature covers exactly what is sent: the pool's base path, the
        # target, the body.
        authorization = merchant.authorization(request.method, pool.base_path + target, body)
        headers.append((b"Authorization", authorization.encode("ascii")))
        try:
            resp = await self.pools.request(pool, request.method, target, headers, body)
        except UpstreamTimeout:
            return sidecar_error(504, f"WeChat Pay timed out after {self.config.upstream.timeout_s:g} s")
        except UpstreamError as exc:
            return sidecar_error(502, str(exc))
        if path in UNSIGNED_DOWNLOADS and 200 <= resp.status < 300:
            return await self._stream(request, resp)
        try:
            data = resp.whole_body(MAX_ANSWER_BYTES)
            if data is None:
                data = await resp.read_up_to(MAX_ANSWER_BYTES, self.config.upstream.timeout_s)
                if not resp.at_eof():
                    return sidecar_error(502, f"WeChat Pay's answer is over {MAX_ANSWER_BYTES} bytes: not verified, "
                                              "not relayed")
        except UpstreamError as exc:
            return sidecar_error(502, str(exc))
        finally:
            resp.release()
        answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in resp.relay_headers
                          if k[:10].lower() == b"wechatpay-"}
        serial = answer_headers.get("wechatpay-serial", "").strip().upper()
        try:
            merchant.verify(answer_headers, data, await merchant.keys_knowing(serial))
        except SignatureInvalid as exc:
            return sidecar_error(502, f"WeChat Pay's answer does not verify ({exc}): not relayed",
                                 outcome="upstream_unreachable")
        return Reply(resp.status, resp.relay_headers, data)

    async def _stream(self, request: Request, resp: Any) -> Reply:
        """A bill file: streamed through as it comes, never held whole."""
        timeout = self.config.upstream.timeout_s
        try:
            request.start(resp.status, resp.relay_headers, resp.content_length)
            while chunk := await resp.read_chunk(timeout):
                await request.write(chunk)
            request.finish()
        except (UpstreamError, ConnectionResetError):
            request.abort()
        finally:
            resp.release()
        return Reply(resp.status)

    # ------------------------------------------------------------ local answers

    async def local(self, request: Request, merchant: PayMerchant, name: str) -> Reply:
        m = merchant.merchant
        now, nonce = str(int(time.time())), secrets.token_hex(16)
        if name in ("jsapi", "app") and request.method == "GET":
            appid = (query_values(request.query, "appid") or [""])[0]
            prepay_id = (query_values(request.query, "prepay_id") or [""])[0]
            if not appid or not prepay_id or len(appid) > 64 or len(prepay_id) > 128 \
                    or not (appid + prepay_id).isprintable():
                return sidecar_error(400, f"/sidecar/pay/{name} needs appid and prepay_id", outcome="bad_request")
            if name == "jsapi":
                package = f"prepay_id={prepay_id}"
                answer: dict[str, Any] = {"appId": appid, "timeStamp": now, "nonceStr": nonce, "package": package,
                                          "signType": "RSA", "paySign": merchant.sign(appid, now, nonce, package)}
            else:
                answer = {"appid": appid, "partnerid": m.mchid, "prepayid": prepay_id, "package": "Sign=WXPay",
                          "noncestr": nonce, "timestamp": now, "sign": merchant.sign(appid, now, nonce, prepay_id)}
            return local_reply(json.dumps(answer).encode())
        if name == "encrypt" and request.method == "POST":
            try:
                data = json.loads(await request.read() or b"{}")
            except BodyError as exc:
                return sidecar_error(exc.status, exc.why, outcome="bad_request")
            except (ValueError, RecursionError):
                data = None
            plain = data.get("plaintext") if isinstance(data, dict) else None
            if not isinstance(plain, list) or not plain or len(plain) > 100 or \
                    not all(isinstance(p, str) and len(p.encode()) <= 190 for p in plain):
                return sidecar_error(400, '/sidecar/pay/encrypt takes {"plaintext": ["...", ...]} (up to 100 '
                                          "strings of at most 190 bytes: RSA-OAEP with a 2048-bit key)",
                                     outcome="bad_request")
            key = merchant.encryption_key()
            if key is None:
                await merchant.refetch_certificates("a sensitive field to encrypt and no WeChat Pay key held")
                key = merchant.encryption_key()
            if key is None:
                return sidecar_error(503, f"merchant {m.name} holds no WeChat Pay certificate or public key yet")
            serial, public_key = key
            return local_reply(json.dumps({"serial": serial,
                                           "ciphertext": [wxpay.oaep_encrypt(public_key, p) for p in plain]}).encode())
        return sidecar_error(404, f"no sidecar endpoint /sidecar/pay/{name[:64]} for {request.method}",
                             outcome="bad_request")
