"""WeChat Pay API v3 through the sidecar (proxy/outbound/pay_calls.py,
proxy/credentials/pay.py, proxy/inbound/pay_notify.py) against the
simulator's Pay server. Keys are made per run; what the sidecar signs is
checked here with `cryptography` against the merchant's public key, not with
the code under test."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from proxy import config as config_mod

from ..conftest import free_port, sidecar_yaml
from ..credentials.test_redis_store import spawn_replicas

MCHID, SERIAL = "1900000109", "5157F09EFDC096DE15EBE81A47057A72"
APIV3 = b"0123456789abcdefghijklmnopqrstuv"


@pytest.fixture(scope="module")
def merchant_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def keys(tmp_path, merchant_key):
    private = tmp_path / "apiclient_key.pem"
    private.write_bytes(merchant_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    apiv3 = tmp_path / "apiv3.key"
    apiv3.write_bytes(APIV3 + b"\n")
    return private, apiv3


class Notified:
    def __init__(self):
        self.got: list[tuple[dict, dict]] = []
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.json()))
        return web.Response(status=self.status)


@pytest.fixture
async def app_side():
    notified = Notified()
    app = web.Application()
    app.router.add_post("/pay/notify", notified.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    notified.url = f"http://127.0.0.1:{runner.addresses[0][1]}/pay/notify"
    yield notified
    await runner.cleanup()


def pay_yaml(sim, keys, merchant_extra: str = "", notify_to: str = "", top: str = "", **kw) -> str:
    private, apiv3 = keys
    notify = f', notify_to: "{notify_to}"' if notify_to else ""
    text = sidecar_yaml(sim.url, top="callbacks: {host: 127.0.0.1, port: 0}\n" + top, **kw)
    return text + (f"merchants:\n  - {{name: acme, mchid: \"{MCHID}\", serial_no: {SERIAL}, "
                   f"private_key_file: {private}, apiv3_key_file: {apiv3}, upstream: \"{sim.url}\"{notify}"
                   f"{merchant_extra}}}\n")


async def start(make_sidecar, sim, keys, merchant_key, **kw):
    sim.pay_register_merchant(MCHID, merchant_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), SERIAL, APIV3)
    running = await make_sidecar(pay_yaml(sim, keys, **kw))
    running.callbacks = f"http://127.0.0.1:{running.callbacks_port}"
    return running


def verify_authorization(merchant_key, recorded: dict) -> dict[str, str]:
    """The Authorization the simulator received, checked independently."""
    scheme, _, params = recorded["authorization"].partition(" ")
    assert scheme == "WECHATPAY2-SHA256-RSA2048"
    fields = {k.strip(): v.strip().strip('"') for k, v in (p.split("=", 1) for p in params.split(","))}
    signed = (f"{recorded['method']}\n{recorded['url']}\n{fields['timestamp']}\n{fields['nonce_str']}\n".encode()
              + recorded["body"] + b"\n")
    merchant_key.public_key().verify(base64.b64decode(fields["signature"]), signed, padding.PKCS1v15(), hashes.SHA256())
    assert fields["mchid"] == MCHID and fields["serial_no"] == SERIAL
    return fields


async def test_a_pay_call_is_signed_over_the_bytes_sent_and_its_answer_verified(
        make_sidecar, sim, http, keys, merchant_key):
    running = await start(make_sidecar, sim, keys, merchant_key)
    order = {"appid": "wxd678efh567hg6787", "mchid": MCHID, "description": "a cup", "out_trade_no": "ORDER001",
             "notify_url": "https://example.com/pay", "amount": {"total": 1}, "payer": {"openid": "o1"}}
    body = json.dumps(order, ensure_ascii=False).encode()
    async with http.post(f"{running.base}/v3/pay/transactions/jsapi", data=body,
                         headers={"Content-Type": "application/json", "Authorization": "Bearer app-junk"}) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        assert resp.headers["Wechatpay-Serial"] and resp.headers["Wechatpay-Signature"]   # relayed for SDKs
    assert answer["prepay_id"].startswith("wx")
    recorded = sim.pay_requests[-1]
    assert recorded["body"] == body and "access_token" not in recorded["url"]
    verify_authorization(merchant_key, recorded)
    # by prefix and by header too, and a GET with a query (signed with it)
    async with http.get(f"{running.base}/acme/v3/pay/transactions/out-trade-no/ORDER001?mchid={MCHID}") as resp:
        assert resp.status == 200 and (await resp.json())["trade_state"] == "NOTPAY"
    verify_authorization(merchant_key, sim.pay_requests[-1])
    assert sim.pay_requests[-1]["url"] == f"/v3/pay/transactions/out-trade-no/ORDER001?mchid={MCHID}"
    async with http.get(f"{running.base}/v3/pay/transactions/out-trade-no/NOPE?mchid={MCHID}",
                        headers={"X-WeChat-Merchant": "acme"}) as resp:
        assert resp.status == 404 and (await resp.json())["code"] == "ORDER_NOT_EXIST"   # a signed error, relayed


async def test_a_signed_answer_with_no_content_is_verified_and_relayed_as_204(make_sidecar, sim, http, keys,
                                                                              merchant_key):
    """Closing an order: WeChat Pay answers 204, signed over the empty body;
    the app gets a 204 with no body and no Content-Length (RFC 9110 §8.6)."""
    running = await start(make_sidecar, sim, keys, merchant_key)
    async with http.post(f"{running.base}/v3/pay/transactions/jsapi", json={"out_trade_no": "CLOSE1"}) as resp:
        assert resp.status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", int(running.base.rsplit(":", 1)[1]))
    body = json.dumps({"mchid": MCHID}).encode()
    writer.write(b"POST /v3/pay/transactions/out-trade-no/CLOSE1/close HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1").lower()
    writer.close()
    assert head.startswith("http/1.1 204") and "wechatpay-signature:" in head
    assert "content-length" not in head and "transfer-encoding" not in head
    verify_authorization(merchant_key, sim.pay_requests[-1])
    assert sim.pay_orders["CLOSE1"]["trade_state"] == "CLOSED"
    sim.pay_orders["CLOSE2"] = {"mchid": MCHID, "out_trade_no": "CLOSE2", "trade_state": "NOTPAY"}
    sim.pay_sign_with = "NO_SUCH_SERIAL"           # a 204 no key of the merchant verifies is not relayed either
    async with http.post(f"{running.base}/v3/pay/transactions/out-trade-no/CLOSE2/close", json={"mchid": MCHID}) as resp:
        assert resp.status == 502 and "does not verify" in await resp.text()


async def test_a_tampered_answer_is_never_relayed(make_sidecar, sim, http, keys, merchant_key):
    running = await start(make_sidecar, sim, keys, merchant_key)
    sim.pay_tamper = True
    async with http.post(f"{running.base}/v3/pay/transactions/jsapi", json={"out_trade_no": "T1"}) as resp:
        assert resp.status == 502
        text = await resp.text()
    assert "does not verify" in text and "prepay_id" not in text


async def test_a_new_certificate_is_fetched_on_its_unknown_serial_at_most_once(make_sidecar, sim, http, keys,
                                                                               merchant_key):
    running = await start(make_sidecar, sim, keys, merchant_key)
    downloads = sim.pay_certificate_downloads
    assert downloads == 1                                          # at start
    serial = sim.pay_new_certificate()                             # WeChat Pay rotates; the newest signs now
    for n in range(3):
        async with http.post(f"{running.base}/v3/pay/transactions/jsapi", json={"out_trade_no": f"R{n}"}) as resp:
            assert resp.status == 200 and resp.headers["Wechatpay-Serial"] == serial
    assert sim.pay_certificate_downloads == downloads + 1
    sim.pay_sign_with = "ABCDEF0123456789"                         # a serial nobody has: refused, no refetch storm
    for _ in range(3):
        async with http.post(f"{running.base}/v3/pay/transactions/jsapi", json={"out_trade_no": "X"}) as resp:
            assert resp.status == 502
    assert sim.pay_certificate_downloads == downloads + 1          # within the minute: not fetched again


async def test_public_key_mode_and_certificates_side_by_side(make_sidecar, sim, http, keys, merchant_key, tmp_path):
    key_id, pem = sim.pay_use_public_key()
    public = tmp_path / "pub_key.pem"
    public.write_bytes(pem)
    running = await start(make_sidecar, sim, keys, merchant_key,
                          merchant_extra=f", public_key_file: {public}, public_key_id: {key_id}")
    assert sim.pay_certificate_downloads == 0                      # public-key mode: nothing fetched at start
    async with http.post(f"{running.base}/v3/pay/transactions/jsapi", json={"out_trade_no": "P1"},
                         headers={"Wechatpay-Serial": key_id}) as resp:
        assert resp.status == 200 and resp.headers["Wechatpay-Serial"] == key_id
    assert sim.pay_requests[-1]["headers"]["Wechatpay-Serial"] == key_id     # passed through
    # the gray period: answers still signed by a platform certificate are verified too
    async with http.post(f"{running.base}/v3/pay/transactions/jsapi", json={"out_trade_no": "P2"}) as resp:
        assert resp.status == 200 and resp.headers["Wechatpay-Serial"] != key_id
    assert sim.pay_certificate_downloads == 1


async def test_a_bill_file_streams_through_unverified_and_byte_exact(make_sidecar, sim, http, keys, merchant_key):
    running = await start(make_sidecar, sim, keys, merchant_key)
    async with http.get(f"{running.base}/v3/bill/tradebill?bill_date=2026-12-05") as resp:
        bill = await resp.json()
    async with http.get(f"{running.base}/v3/billdownload/file?token=SIMBILL") as resp:
        assert resp.status == 200
        data = await resp.read()
    assert data == sim.pay_bill_bytes() and hashlib.sha1(data).hexdigest() == bill["hash_value"]


async def test_notifications_are_verified_decrypted_delivered_once_and_acknowledged(
        make_sidecar, sim, http, keys, merchant_key, app_side):
    running = await start(make_sidecar, sim, keys, merchant_key, notify_to=app_side.url)
    headers, body = sim.pay_notification(MCHID, "ORDER9", note_id="EV-1")
    async with http.post(f"{running.callbacks}/pay/acme", data=body, headers=headers) as resp:
        assert resp.status == 204
    got_headers, payload = app_side.got[0]
    assert got_headers["X-WeChat-Notification-Id"] == "EV-1"
    assert payload["resource"]["out_trade_no"] == "ORDER9" and payload["event_type"] == "TRANSACTION.SUCCESS"
    headers, body = sim.pay_notification(MCHID, "ORDER9", note_id="EV-1")     # re-sent, freshly signed
    async with http.post(f"{running.callbacks}/pay/acme", data=body, headers=headers) as resp:
        assert resp.status == 204
    assert len(app_side.got) == 1
    app_side.status = 500                                           # the app fails: WeChat Pay must try again
    headers, body = sim.pay_notification(MCHID, "ORDER10", note_id="EV-2")
    async with http.post(f"{running.callbacks}/pay/acme", data=body, headers=headers) as resp:
        assert resp.status == 500 and (await resp.json())["code"] == "FAIL"
    app_side.status = 200
    async with http.post(f"{running.callbacks}/pay/acme", data=body, headers=headers) as resp:
        assert resp.status == 204
    assert [p["resource"]["out_trade_no"] for _, p in app_side.got] == ["ORDER9", "ORDER10", "ORDER10"]
    headers, body = sim.pay_notification(MCHID, "ORDER11", note_id="EV-3")
    headers["Wechatpay-Signature"] = "WECHATPAY/SIGNTEST/" + headers["Wechatpay-Signature"]   # WeChat's probe
    async with http.post(f"{running.callbacks}/pay/acme", data=body, headers=headers) as resp:
        assert resp.status == 401
    assert len(app_side.got) == 3


async def test_the_pay_parameters_and_sensitive_fields(make_sidecar, sim, http, keys, merchant_key):
    running = await start(make_sidecar, sim, keys, merchant_key)
    public = merchant_key.public_key()
    async with http.get(f"{running.base}/sidecar/pay/jsapi?appid=wxapp1&prepay_id=wx201410272009395522657a690389285100") as resp:
        jsapi = await resp.json()
    assert jsapi["package"] == "prepay_id=wx201410272009395522657a690389285100" and jsapi["signType"] == "RSA"
    assert isinstance(jsapi["timeStamp"], str)
    public.verify(base64.b64decode(jsapi["paySign"]),
                  f"wxapp1\n{jsapi['timeStamp']}\n{jsapi['nonceStr']}\n{jsapi['package']}\n".encode(),
                  padding.PKCS1v15(), hashes.SHA256())
    async with http.get(f"{running.base}/sidecar/pay/app?appid=wxapp1&prepay_id=PP1") as resp:
        app = await resp.json()
    assert app["partnerid"] == MCHID and app["package"] == "Sign=WXPay"
    public.verify(base64.b64decode(app["sign"]), f"wxapp1\n{app['timestamp']}\n{app['noncestr']}\nPP1\n".encode(),
                  padding.PKCS1v15(), hashes.SHA256())
    async with http.post(f"{running.base}/sidecar/pay/encrypt", json={"plaintext": ["张三", "13800138000"]}) as resp:
        sealed = await resp.json()
    platform = sim.pay_certificates[-1]
    assert sealed["serial"] == platform["serial"]
    opened = [platform["key"].decrypt(base64.b64decode(c), padding.OAEP(mgf=padding.MGF1(hashes.SHA1()),
                                                                        algorithm=hashes.SHA1(), label=None)).decode()
              for c in sealed["ciphertext"]]
    assert opened == ["张三", "13800138000"]


async def test_a_merchants_allow_list_keeps_an_ordering_service_from_refunding(make_sidecar, sim, http, keys,
                                                                             merchant_key):
    running = await start(make_sidecar, sim, keys, merchant_key,
                          merchant_extra=', allow: ["/v3/pay/transactions/**", "/sidecar/pay/jsapi"]')
    requests = len(sim.pay_requests)
    async with http.post(f"{running.base}/v3/refund/domestic/refunds", json={"out_refund_no": "R1"}) as resp:
        assert resp.status == 403 and "allow list" in await resp.text()
    async with http.post(f"{running.base}/sidecar/pay/encrypt", json={"plaintext": ["x"]}) as resp:
        assert resp.status == 403
    assert len(sim.pay_requests) == requests
    async with http.post(f"{running.base}/v3/pay/transactions/jsapi", json={"out_trade_no": "OK1"}) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("damage, key, why", [
    ("ec_key", "private_key_file", "not an RSA private key"),
    ("short_apiv3", "apiv3_key_file", "32 bytes"),
    ("lonely_public_key", "public_key_id", "both public_key_file and public_key_id"),
    ("missing_key", "private_key_file", "cannot read"),
])
def test_bad_merchant_keys_are_config_errors_naming_the_file(sim, keys, tmp_path, damage, key, why):
    private, apiv3 = keys
    extra = ""
    if damage == "ec_key":
        private.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    elif damage == "short_apiv3":
        apiv3.write_bytes(b"x" * 31)
    elif damage == "lonely_public_key":
        extra = f", public_key_file: {private}"
    else:
        private.unlink()
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(pay_yaml(sim, (private, apiv3), merchant_extra=extra), "c.yaml", {})
    assert err.value.key == f"merchants[0].{key}" and why in err.value.reason


async def test_no_key_material_in_any_output(make_sidecar, sim, http, keys, merchant_key, caplog):
    running = await start(make_sidecar, sim, keys, merchant_key)
    async with http.post(f"{running.base}/v3/pay/transactions/jsapi", json={"out_trade_no": "L1"}) as resp:
        assert resp.status == 200
    async with http.get(f"{running.admin}/admin/status") as resp:
        status = await resp.text()
    merchant = json.loads(status)["merchants"][0]                 # serials and expiry: shown
    assert merchant["name"] == "acme" and merchant["certificates"][0]["serial"] == sim.pay_certificates[-1]["serial"]
    assert merchant["certificates"][0]["expires_in_days"] > 1000
    from ..ops.test_admin import metric, scrape
    assert metric(await scrape(http, running), "wts_pay_certificate_expires_in_seconds", merchant="acme",
                  serial=sim.pay_certificates[-1]["serial"]) > 86400 * 1000
    text = "\n".join(r.getMessage() for r in caplog.records) + status + running.sidecar.config.summary() + \
        repr(running.sidecar.config)
    private_pem = keys[0].read_text()
    for secret in (APIV3.decode(), private_pem.splitlines()[1], "PRIVATE KEY"):
        assert secret not in text


async def test_two_sidecars_on_one_redis_download_the_certificates_once(sim, redis_server, spawn, http, keys,
                                                                        merchant_key):
    sim.pay_register_merchant(MCHID, merchant_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), SERIAL, APIV3)
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "t:"}}'
    replicas = spawn_replicas(spawn, 2, lambda i, port, admin: pay_yaml(sim, keys, listen_port=port, admin_port=admin)
                              .replace("callbacks: {host: 127.0.0.1, port: 0}",
                                       f"callbacks: {{host: 127.0.0.1, port: {free_port()}}}\n{store}"), "pay")
    await asyncio.gather(*(r.proc.wait_ready(r.admin) for r in replicas))
    for replica in replicas:
        async with http.post(f"{replica.base}/v3/pay/transactions/jsapi", json={"out_trade_no": "F1"}) as resp:
            assert resp.status == 200, await resp.text()
    assert sim.pay_certificate_downloads == 1
