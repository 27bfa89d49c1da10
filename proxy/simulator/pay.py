"""WeChat Pay API v3, as wechat-pay-notes.md describes it, for the tests and
the demo: its own platform keys (certificates it serves encrypted with each
merchant's APIv3 key, rotated on demand; or public-key mode), requests'
signatures checked with the merchant's public key (401 SIGN_ERROR signed
like any answer), every answer signed by the key the request's
Wechatpay-Serial names or the newest certificate, a few order and refund
endpoints (closing an order answers a signed 204), an unsigned bill file,
and notifications sent signed with the resource encrypted."""
from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import time
from typing import Any

from aiohttp import web

from ..wechat import pay as wxpay
from .core import SimCore

CERT_DAYS = 5 * 365


def _certificate(serial: int) -> tuple[Any, str]:
    """A platform key pair and its self-issued certificate (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA (simulated)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS)).sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


class PayApis(SimCore):
    def pay_setup(self) -> None:
        if getattr(self, "pay_merchants", None) is None:
            self.pay_merchants: dict[str, dict[str, Any]] = {}     # mchid -> public key, serial, apiv3 key
            self.pay_certificates: list[dict[str, Any]] = []        # serial (hex), key, pem, expire (epoch)
            self.pay_public_key: tuple[str, Any, str] | None = None  # (PUB_KEY_ID_..., private key, public PEM)
            self.pay_requests: list[dict[str, Any]] = []            # every request as received, for the tests
            self.pay_orders: dict[str, dict[str, Any]] = {}
            self.pay_certificate_downloads = 0
            self.pay_tamper = False                                 # corrupt answers after signing
            self.pay_sign_with: str | None = None                   # force a serial (e.g. an unknown one)
            self.pay_new_certificate()

    def pay_register_merchant(self, mchid: str, merchant_public_pem: bytes, serial_no: str, apiv3_key: bytes) -> None:
        self.pay_setup()
        self.pay_merchants[mchid] = {"key": wxpay.load_public_key(merchant_public_pem), "serial": serial_no.upper(),
                                     "apiv3": apiv3_key}

    def pay_new_certificate(self) -> str:
        """A new platform certificate joins (a rotation); the newest signs."""
        number = secrets.randbits(64) | 1 << 63
        key, pem = _certificate(number)
        serial = format(number, "X")
        self.pay_certificates.append({"serial": serial, "key": key, "pem": pem,
                                      "expire": time.time() + CERT_DAYS * 86400})
        return serial

    def pay_use_public_key(self) -> tuple[str, bytes]:
        """Public-key mode: (PUB_KEY_ID_..., the public key PEM a merchant downloads)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        self.pay_setup()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        key_id = "PUB_KEY_ID_" + "".join(secrets.choice("0123456789") for _ in range(28))
        self.pay_public_key = (key_id, key, pem.decode())
        return key_id, pem

    # ------------------------------------------------------------ answers

    def _pay_signed(self, status: int, payload: Any, serial_hint: str = "") -> web.Response:
        body = b"" if payload is None else json.dumps(payload).encode()
        timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
        serial = self.pay_sign_with
        if serial is None:
            if self.pay_public_key is not None and (serial_hint == self.pay_public_key[0] or not self.pay_certificates):
                serial = self.pay_public_key[0]
            else:
                serial = self.pay_certificates[-1]["serial"]
        key = (self.pay_public_key[1] if self.pay_public_key and serial == self.pay_public_key[0]
               else next((c["key"] for c in self.pay_certificates if c["serial"] == serial), None))
        signature = wxpay.sign(key, wxpay.answer_message(timestamp, nonce, body)) if key is not None else "bogus"
        if self.pay_tamper:
            body = body.replace(b"SUCCESS", b"REFUND!") if b"SUCCESS" in body else body + b" "
        headers = {"Wechatpay-Timestamp": timestamp, "Wechatpay-Nonce": nonce, "Wechatpay-Signature": signature,
                   "Wechatpay-Serial": serial, "Wechatpay-Signature-Type": wxpay.SCHEME,
                   "Request-ID": secrets.token_hex(12)}
        if status == 204:
            return web.Response(status=204, headers=headers)
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    def _pay_error(self, status: int, code: str, message: str, serial_hint: str = "") -> web.Response:
        return self._pay_signed(status, {"code": code, "message": message}, serial_hint)

    async def _pay_authorized(self, request: web.Request) -> tuple[str, bytes] | web.Response:
        """(mchid, body) of a request whose signature holds, else the 401."""
        self.pay_setup()
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        hint = request.headers.get("Wechatpay-Serial", "")
        self.pay_requests.append({"method": request.method, "url": request.path_qs, "body": body,
                                  "authorization": auth, "headers": dict(request.headers)})
        scheme, _, params = auth.partition(" ")
        fields = dict(part.split("=", 1) for part in params.split(",") if "=" in part)
        fields = {k.strip(): v.strip().strip('"') for k, v in fields.items()}
        merchant = self.pay_merchants.get(fields.get("mchid", ""))
        if scheme != wxpay.SCHEME or merchant is None or fields.get("serial_no", "").upper() != merchant["serial"]:
            return self._pay_error(401, "SIGN_ERROR", "unknown merchant or serial_no", hint)
        timestamp = fields.get("timestamp", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
            return self._pay_error(401, "SIGN_ERROR", "timestamp expired", hint)
        signed = f"{request.method}\n{request.path_qs}\n{timestamp}\n{fields.get('nonce_str', '')}\n".encode() \
            + body + b"\n"
        if not wxpay.verify(merchant["key"], signed, fields.get("signature", "")):
            return self._pay_error(401, "SIGN_ERROR", "signature does not verify", hint)
        return fields["mchid"], body

    async def pay_certificates_api(self, request: web.Request) -> web.Response:
        checked = await self._pay_authorized(request)
        if isinstance(checked, web.Response):
            return checked
        mchid, _ = checked
        if not self.pay_certificates:
            return self._pay_error(404, "NOT_FOUND", "certificate does not exist")
        self.pay_certificate_downloads += 1
        apiv3 = self.pay_merchants[mchid]["apiv3"]
        data = []
        for cert in self.pay_certificates:
            nonce = secrets.token_hex(6)
            data.append({"serial_no": cert["serial"],
                         "effective_time": datetime.datetime.fromtimestamp(cert["expire"] - CERT_DAYS * 86400,
                                                                           datetime.timezone.utc).isoformat(),
                         "expire_time": datetime.datetime.fromtimestamp(cert["expire"],
                                                                        datetime.timezone.utc).isoformat(),
                         "encrypt_certificate": {"algorithm": "AEAD_AES_256_GCM", "nonce": nonce,
                                                 "associated_data": "certificate",
                                                 "ciphertext": wxpay.aead_encrypt(apiv3, nonce, "certificate",
                                                                                  cert["pem"].encode())}})
        return self._pay_signed(200, {"data": data})

    async def pay_jsapi_order(self, request: web.Request) -> web.Response:
        checked = await self._pay_authorized(request)
        if isinstance(checked, web.Response):
            return checked
        mchid, body = checked
        hint = request.headers.get("Wechatpay-Serial", "")
        try:
            order = json.loads(body)
            out_trade_no = order["out_trade_no"]
        except (ValueError, KeyError, TypeError):
            return self._pay_error(400, "PARAM_ERROR", "out_trade_no is required", hint)
        prepay_id = "wx" + secrets.token_hex(15)
        self.pay_orders[out_trade_no] = {**order, "mchid": mchid, "prepay_id": prepay_id, "trade_state": "NOTPAY",
                                         "transaction_id": str(4200000000 + len(self.pay_orders))}
        return self._pay_signed(200, {"prepay_id": prepay_id}, hint)

    async def _pay_order(self, request: web.Request) -> tuple[dict[str, Any], str] | web.Response:
        """(the order the path names, the request's serial hint) of a signed
        request, else the 401 or the signed 404."""
        checked = await self._pay_authorized(request)
        if isinstance(checked, web.Response):
            return checked
        hint = request.headers.get("Wechatpay-Serial", "")
        order = self.pay_orders.get(request.match_info["out_trade_no"])
        if order is None:
            return self._pay_error(404, "ORDER_NOT_EXIST", "order does not exist", hint)
        return order, hint

    async def pay_query_order(self, request: web.Request) -> web.Response:
        found = await self._pay_order(request)
        if isinstance(found, web.Response):
            return found
        order, hint = found
        return self._pay_signed(200, {k: order[k] for k in ("mchid", "out_trade_no", "transaction_id", "trade_state")
                                      if k in order}, hint)

    async def pay_close_order(self, request: web.Request) -> web.Response:
        """Closing an unpaid order: 204 No Content, signed over the empty body."""
        found = await self._pay_order(request)
        if isinstance(found, web.Response):
            return found
        order, hint = found
        if order.get("trade_state") == "SUCCESS":
            return self._pay_error(400, "ORDERPAID", "order paid", hint)
        order["trade_state"] = "CLOSED"
        return self._pay_signed(204, None, hint)

    async def pay_refund(self, request: web.Request) -> web.Response:
        checked = await self._pay_authorized(request)
        if isinstance(checked, web.Response):
            return checked
        _, body = checked
        refund = json.loads(body or b"{}")
        return self._pay_signed(200, {"refund_id": "5030" + secrets.token_hex(8), "out_refund_no":
                                      refund.get("out_refund_no"), "status": "PROCESSING"},
                                request.headers.get("Wechatpay-Serial", ""))

    def pay_bill_bytes(self) -> bytes:
        return b"".join(b"`2026-12-05 10:00:%02d,`wx0000,`ORDER%06d,`SUCCESS,`0.01\r\n" % (i % 60, i)
                        for i in range(20000))

    async def pay_tradebill(self, request: web.Request) -> web.Response:
        checked = await self._pay_authorized(request)
        if isinstance(checked, web.Response):
            return checked
        bill = self.pay_bill_bytes()
        host = request.headers.get("Host", "api.mch.weixin.qq.com")
        return self._pay_signed(200, {"hash_type": "SHA1", "hash_value": hashlib.sha1(bill).hexdigest(),
                                      "download_url": f"http://{host}/v3/billdownload/file?token=SIMBILL"})

    async def pay_bill_file(self, request: web.Request) -> web.StreamResponse:
        """Signed request, unsigned answer (§9): the file's bytes as they are."""
        checked = await self._pay_authorized(request)
        if isinstance(checked, web.Response):
            return checked
        return web.Response(body=self.pay_bill_bytes(), content_type="application/octet-stream")

    # ------------------------------------------------------------ notifications

    def pay_notification(self, mchid: str, out_trade_no: str, note_id: str | None = None,
                         serial: str | None = None) -> tuple[dict[str, str], bytes]:
        """(headers, body) of a TRANSACTION.SUCCESS notification as WeChat Pay sends it."""
        self.pay_setup()
        apiv3 = self.pay_merchants[mchid]["apiv3"]
        transaction = {"mchid": mchid, "out_trade_no": out_trade_no, "transaction_id": "4200000123456789",
                       "trade_state": "SUCCESS", "amount": {"total": 1, "currency": "CNY"}}
        nonce = secrets.token_hex(6)
        body = json.dumps({"id": note_id or secrets.token_hex(16), "create_time": "2026-12-06T10:00:00+08:00",
                           "resource_type": "encrypt-resource", "event_type": "TRANSACTION.SUCCESS",
                           "summary": "支付成功", "resource": {
                               "original_type": "transaction", "algorithm": "AEAD_AES_256_GCM",
                               "ciphertext": wxpay.aead_encrypt(apiv3, nonce, "transaction",
                                                                json.dumps(transaction).encode()),
                               "associated_data": "transaction", "nonce": nonce}}).encode()
        if serial is None:
            serial = self.pay_public_key[0] if self.pay_public_key and not self.pay_certificates \
                else self.pay_certificates[-1]["serial"]
        key = (self.pay_public_key[1] if self.pay_public_key and serial == self.pay_public_key[0]
               else next(c["key"] for c in self.pay_certificates if c["serial"] == serial))
        timestamp, sig_nonce = str(int(time.time())), secrets.token_hex(16)
        headers = {"Wechatpay-Timestamp": timestamp, "Wechatpay-Nonce": sig_nonce, "Wechatpay-Serial": serial,
                   "Wechatpay-Signature": wxpay.sign(key, wxpay.answer_message(timestamp, sig_nonce, body)),
                   "Wechatpay-Signature-Type": wxpay.SCHEME, "Content-Type": "application/json"}
        return headers, body

    async def ctl_pay_notify(self, request: web.Request) -> web.Response:
        """POST /_sim/pay/notify?mchid=..&out_trade_no=..[&url=..]: WeChat Pay notifies the merchant."""
        import aiohttp
        self.pay_setup()
        mchid = request.query.get("mchid") or next(iter(self.pay_merchants), "")
        url = request.query.get("url") or self.settings.pay_notify_url
        if mchid not in self.pay_merchants or not url:
            return web.json_response({"error": "unknown mchid, or no url (?url= or settings.pay_notify_url)"},
                                     status=400)
        headers, body = self.pay_notification(mchid, request.query.get("out_trade_no", "DEMO"))
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.read()
                return web.json_response({"status": resp.status, "answer": answer.decode("utf-8", "replace")})

    def pay_routes(self, app: web.Application) -> None:
        app.router.add_route("POST", "/_sim/pay/notify", self.ctl_pay_notify)
        app.router.add_route("GET", "/v3/certificates", self.pay_certificates_api)
        app.router.add_route("POST", "/v3/pay/transactions/jsapi", self.pay_jsapi_order)
        app.router.add_route("GET", "/v3/pay/transactions/out-trade-no/{out_trade_no}", self.pay_query_order)
        app.router.add_route("POST", "/v3/pay/transactions/out-trade-no/{out_trade_no}/close", self.pay_close_order)
        app.router.add_route("POST", "/v3/refund/domestic/refunds", self.pay_refund)
        app.router.add_route("GET", "/v3/bill/tradebill", self.pay_tradebill)
        app.router.add_route("GET", "/v3/billdownload/file", self.pay_bill_file)
