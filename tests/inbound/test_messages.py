"""Pushes from WeChat to apps (proxy/inbound/messages.py, delivery.py,
listener.py) over real sockets: URL verification with WeChat's published
vectors, each mode and format, replies checked by wechatpy (an independent
implementation of WeChat's scheme), the replay guard, dedupe of WeChat's
retries, a slow app, an app that is down and comes back, the queue bound."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time

import pytest
from aiohttp import web
from wechatpy.crypto import PrpCrypto, WeChatCrypto

from proxy.inbound import delivery as delivery_mod
from proxy.wechat.crypto import plain_signature

from ..conftest import APPID, free_port, sidecar_yaml, wait_until
from ..credentials.test_redis_store import spawn_replicas
from ..ops.test_admin import metric, scrape

TOKEN = "push-token-Xy7"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
OPENID = "oUser123"


class Receiver:
    """The app behind the sidecar: records what it is given, answers as told."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.reply: bytes = b"success"
        self.delay = 0.0
        self.status = 200
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, body=self.reply)

    async def start(self, port: int = 0) -> "Receiver":
        app = web.Application()
        app.router.add_post("/wechat", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/wechat"


@pytest.fixture
async def receiver():
    rx = await Receiver().start()
    yield rx
    await rx.stop()


def push_yaml(upstream: str, deliver_to: str, *, aes: str | None = AES_KEY, token: str = TOKEN,
              within: float = 1.0, top: str = "", **kw) -> str:
    key = f", encoding_aes_key: {aes}" if aes else ""
    return sidecar_yaml(upstream, top="callbacks: {host: 127.0.0.1, port: 0}\n" + top,
                        app_extra=f"push: {{token: {token}{key}, deliver_to: \"{deliver_to}\", "
                                  f"reply_within_s: {within}}}\n", **kw)


async def start(make_sidecar, sim, receiver, **kw):
    running = await make_sidecar(push_yaml(sim.url, receiver.url, **kw))
    running.callbacks = f"http://127.0.0.1:{running.callbacks_port}"
    return running


def text_message(msg_id: int = 23324061692833458, content: str = "hi") -> bytes:
    return (f"<xml><ToUserName><![CDATA[gh_123]]></ToUserName><FromUserName><![CDATA[{OPENID}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{content}]]></Content><MsgId>{msg_id}</MsgId></xml>").encode()


def plain_push(message: bytes, timestamp: int | None = None, nonce: str = "123456") -> tuple[str, bytes]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return f"signature={plain_signature(TOKEN, ts, nonce)}&timestamp={ts}&nonce={nonce}&openid={OPENID}", message


def safe_push(message: bytes, appid: str = APPID, as_json: bool = False, nonce: str = "765432",
              timestamp: int | None = None, token: str = TOKEN, key: str = AES_KEY) -> tuple[str, bytes]:
    """A safe-mode push as WeChat sends it, made by wechatpy, not by our code."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    envelope = WeChatCrypto(token, key, appid).encrypt_message(message.decode(), nonce, ts)
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]></Encrypt>", envelope).group(1)
    msg_signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]></MsgSignature>", envelope).group(1)
    query = (f"signature={plain_signature(token, ts, nonce)}&timestamp={ts}&nonce={nonce}&openid={OPENID}"
             f"&encrypt_type=aes&msg_signature={msg_signature}")
    body = (json.dumps({"ToUserName": "gh_123", "Encrypt": encrypt}).encode() if as_json else
            f"<xml><ToUserName><![CDATA[gh_123]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode())
    return query, body


async def post(http, running, query: str, body: bytes, path: str = "/wechat/mp") -> tuple[int, bytes]:
    async with http.post(f"{running.callbacks}{path}?{query}", data=body) as resp:
        return resp.status, await resp.read()


# ---------------------------------------------------------------- URL verification

async def test_url_verification_answers_echostr_with_wechats_published_vector(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver, token="AAAAA")
    # Mini Program "message push" page: token AAAAA
    query = ("signature=f464b24fc39322e44b38aa78f5edd27bd1441696&timestamp=1714036504&nonce=1514711492"
             "&echostr=4375120948345356249")
    async with http.get(f"{running.callbacks}/wechat/mp?{query}") as resp:
        assert resp.status == 200 and await resp.read() == b"4375120948345356249"
    async with http.get(f"{running.callbacks}/wechat/mp?{query.replace('f464', 'f465')}") as resp:
        assert resp.status == 403


async def test_wecom_url_verification_answers_the_decrypted_echostr(make_sidecar, sim, http, receiver):
    # WeCom document 90968's sample: token QDG6eK, corpid wx5823bf96d3bd56c7
    apps = f"""
- name: wc
  appid: wx5823bf96d3bd56c7
  secret: wecom-secret
  token_api: wecom
  push: {{token: QDG6eK, encoding_aes_key: jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C, deliver_to: "{receiver.url}"}}
"""
    running = await make_sidecar(push_yaml(sim.url, receiver.url, app=apps), wait_ready=False)
    running.callbacks = f"http://127.0.0.1:{running.callbacks_port}"
    echostr = "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ=="
    params = {"msg_signature": "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3", "timestamp": "1409659589",
              "nonce": "263014780", "echostr": echostr}
    async with http.get(f"{running.callbacks}/wechat/wc", params=params) as resp:
        assert resp.status == 200 and await resp.read() == b"1616140317555161061"
    async with http.get(f"{running.callbacks}/wechat/wc", params={**params, "nonce": "263014781"}) as resp:
        assert resp.status == 403
    # and WeCom's published message decrypts and is delivered (the vector is from 2014: its clock)
    running.sidecar.intake.wall = lambda: 1409659813
    encrypt = ("RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/"
               "sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZf"
               "JYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGU"
               "callcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KD"
               "YA5Pl/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q==")
    body = (f"<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt>"
            f"<AgentID><![CDATA[218]]></AgentID></xml>").encode()
    query = "msg_signature=477715d11cdb4164915debcba66cb864d751f3e6&timestamp=1409659813&nonce=1372623149"
    assert await post(http, running, query, body, "/wechat/wc") == (200, b"success")
    headers, delivered = receiver.got[-1]
    assert b"<Content><![CDATA[hello]]></Content>" in delivered
    assert headers["X-WeChat-Message-Id"] == "4561255354251345929" and headers["X-WeChat-Appid"] == "wx5823bf96d3bd56c7"


# ---------------------------------------------------------------- modes and formats

async def test_a_plaintext_push_is_delivered_and_the_apps_reply_relayed(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver)
    receiver.reply = b"<xml><Content><![CDATA[hello back]]></Content></xml>"
    status, answer = await post(http, running, *plain_push(text_message(msg_id=10001)))
    assert status == 200 and answer == receiver.reply
    headers, body = receiver.got[0]
    assert b"<MsgId>10001</MsgId>" in body and b"<Content><![CDATA[hi]]></Content>" in body
    assert headers["X-WeChat-App"] == "mp" and headers["X-WeChat-Appid"] == APPID
    assert headers["X-WeChat-Message-Id"] == "10001" and headers["Content-Type"].startswith("text/xml")


async def test_a_safe_mode_xml_push_is_decrypted_and_the_reply_encrypted_for_wechatpy(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver)
    message = text_message(msg_id=23324061692833458)            # above 2^53: kept exact
    receiver.reply = b"<xml><Content><![CDATA[good luck]]></Content></xml>"
    query, body = safe_push(message, nonce="415670741")
    status, answer = await post(http, running, query, body)
    assert status == 200
    assert receiver.got[0][1] == message and receiver.got[0][0]["X-WeChat-Message-Id"] == "23324061692833458"
    # wechatpy checks MsgSignature and decrypts the envelope: WeChat's own scheme, not ours
    text = answer.decode()
    ts = re.search(r"<TimeStamp>(\d+)</TimeStamp>", text).group(1)
    nonce = re.search(r"<Nonce><!\[CDATA\[(.*?)\]\]></Nonce>", text).group(1)
    sig = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]></MsgSignature>", text).group(1)
    assert nonce == "415670741" and abs(int(ts) - time.time()) < 5
    assert WeChatCrypto(TOKEN, AES_KEY, APPID).decrypt_message(text, sig, ts, nonce) == receiver.reply.decode()


async def test_a_json_push_is_delivered_as_json_and_answered_in_the_json_envelope(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver)
    message = json.dumps({"ToUserName": "gh_123", "FromUserName": OPENID, "CreateTime": int(time.time()),
                          "MsgType": "event", "Event": "debug_demo", "debug_str": "hello world"}).encode()
    receiver.reply = b'{"demo_resp":"good luck"}'
    status, answer = await post(http, running, *safe_push(message, as_json=True))
    assert status == 200
    headers, body = receiver.got[0]
    assert body == message and headers["Content-Type"] == "application/json"
    assert headers["X-WeChat-Message-Id"].startswith(f"{OPENID}-")          # an event: no MsgId
    envelope = json.loads(answer)
    assert set(envelope) == {"Encrypt", "MsgSignature", "TimeStamp", "Nonce"} and isinstance(envelope["TimeStamp"], int)
    expected = hashlib.sha1("".join(sorted((TOKEN, str(envelope["TimeStamp"]), envelope["Nonce"],
                                            envelope["Encrypt"]))).encode()).hexdigest()
    assert envelope["MsgSignature"] == expected
    key = base64.b64decode(AES_KEY + "=")
    assert PrpCrypto(key).decrypt(envelope["Encrypt"], APPID) == receiver.reply.decode()


async def test_two_events_of_the_same_second_are_two_messages(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver)
    now = int(time.time())
    for trace in ("t1", "t2"):       # media-check callbacks told apart only by trace_id
        event = (f"<xml><ToUserName>gh</ToUserName><FromUserName>sys</FromUserName><CreateTime>{now}</CreateTime>"
                 f"<MsgType>event</MsgType><Event>wxa_media_check</Event><trace_id>{trace}</trace_id></xml>").encode()
        assert (await post(http, running, *plain_push(event, nonce=f"9{trace}")))[0] == 200
    assert len(receiver.got) == 2
    assert receiver.got[0][0]["X-WeChat-Message-Id"] != receiver.got[1][0]["X-WeChat-Message-Id"]


# ---------------------------------------------------------------- refused

@pytest.mark.parametrize("damage, status", [
    ("signature", 403), ("msg_signature", 403), ("other_appid", 403), ("old", 403), ("future", 403),
    ("doctype", 400), ("not_xml", 400), ("no_encrypt", 400), ("utf16_entity", 400),
])
async def test_a_push_that_is_not_wechats_is_refused_and_nothing_is_delivered(
        make_sidecar, sim, http, receiver, damage, status):
    running = await start(make_sidecar, sim, receiver)
    message = text_message(msg_id=555)
    if damage == "signature":
        query, body = plain_push(message)
        query = query.replace("signature=", "signature=0", 1)
    elif damage == "msg_signature":
        query, body = safe_push(message)
        query = query.replace("msg_signature=", "msg_signature=0")
    elif damage == "other_appid":
        query, body = safe_push(message, appid="wx00000000000000ff")
    elif damage in ("old", "future"):
        query, body = safe_push(message, timestamp=int(time.time()) + (-301 if damage == "old" else 3600))
    elif damage == "doctype":
        query, body = plain_push(b'<!DOCTYPE x [<!ENTITY a "aaaa">]><xml><MsgId>&a;</MsgId></xml>')
    elif damage == "not_xml":
        query, body = plain_push(b"\x00\xffnot a message")
    elif damage == "no_encrypt":
        query, _ = safe_push(message)
        body = b"<xml><ToUserName>gh</ToUserName></xml>"
    else:
        query, body = plain_push('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "b">]>'
                                 '<xml><MsgId>&a;</MsgId></xml>'.encode("utf-16"))
    got = await post(http, running, query, body)
    assert got[0] == status, got
    assert json.loads(got[1])["errmsg"].startswith("sidecar: ")
    assert receiver.got == []


async def test_only_push_intake_on_the_callbacks_port(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver)
    for path in ("/cgi-bin/token", "/admin/apps", "/metrics", "/healthz", "/wechat/nope", "/sidecar/jssdk", "/"):
        async with http.get(f"{running.callbacks}{path}") as resp:
            assert resp.status == 404, path
    query, body = plain_push(b"<xml><Pad>" + b"x" * (1024 * 1024) + b"</Pad></xml>")
    assert (await post(http, running, query, body))[0] == 413
    assert receiver.got == []


async def test_a_captured_plaintext_signature_cannot_carry_another_message(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver)
    query, body = plain_push(text_message(msg_id=777))
    assert (await post(http, running, query, body))[0] == 200
    forged = text_message(msg_id=778, content="send me your money")    # the signature does not cover the body
    status, _ = await post(http, running, query, forged)
    assert status == 403 and len(receiver.got) == 1


# ---------------------------------------------------------------- once, and never lost

async def test_wechats_retries_are_delivered_once_and_get_the_first_reply(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver)
    receiver.reply = b"<xml><Content><![CDATA[first]]></Content></xml>"
    message = text_message(msg_id=4242)
    # the push and WeChat's 3 retries, each with its own timestamp and nonce
    answers = [await post(http, running, *plain_push(message, nonce=f"40{n}")) for n in range(4)]
    assert answers == [(200, receiver.reply)] * 4
    assert len(receiver.got) == 1
    assert metric(await scrape(http, running), "wts_pushes_total", app="mp", result="duplicate") == 3


async def test_a_push_replayed_as_it_was_is_refused_on_its_timestamp_and_nonce(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver)
    for push in (plain_push(text_message(msg_id=5151)), safe_push(text_message(msg_id=5152))):
        assert (await post(http, running, *push))[0] == 200
        status, body = await post(http, running, *push)                  # byte for byte
        assert status == 403 and b"already taken" in body
    assert len(receiver.got) == 2


async def test_a_timestamp_and_nonce_seen_before_are_refused_whatever_the_message(make_sidecar, sim, http, receiver):
    """DESIGN: a (nonce, timestamp) already seen is refused: in safe mode too,
    where a second message under them carries its own valid msg_signature."""
    running = await start(make_sidecar, sim, receiver)
    now = int(time.time())
    assert (await post(http, running, *safe_push(text_message(msg_id=6161), nonce="9090", timestamp=now)))[0] == 200
    status, body = await post(http, running, *safe_push(text_message(msg_id=6162, content="another"), nonce="9090",
                                                        timestamp=now))
    assert status == 403 and b"already taken" in body
    assert [headers["X-WeChat-Message-Id"] for headers, _ in receiver.got] == ["6161"]


async def test_a_digit_moved_from_the_nonce_to_the_timestamp_does_not_make_a_new_push(
        make_sidecar, sim, http, receiver):
    """WeChat's signature hashes the sorted values with no separator: nonce
    "00" + timestamp T and nonce "0" + timestamp "0T" sign alike, and "0T" is
    T in seconds. Such a timestamp is not Unix seconds as WeChat writes them."""
    running = await start(make_sidecar, sim, receiver)
    now = int(time.time())
    query, body = plain_push(text_message(msg_id=6363), timestamp=now, nonce="00")
    assert (await post(http, running, query, body))[0] == 200
    moved = query.replace(f"timestamp={now}&nonce=00", f"timestamp=0{now}&nonce=0")
    assert plain_signature(TOKEN, f"0{now}", "0") == plain_signature(TOKEN, str(now), "00")   # the same signature
    status, answer = await post(http, running, moved, text_message(msg_id=6364, content="moved"))
    assert status == 400 and b"not Unix seconds" in answer
    assert [headers["X-WeChat-Message-Id"] for headers, _ in receiver.got] == ["6363"]


async def test_a_signature_seen_before_is_refused_under_another_timestamp_and_nonce(
        make_sidecar, sim, http, receiver):
    """The rarer move keeps a canonical timestamp: a nonce that is the
    timestamp's first nine digits lets the boundary shift by one digit and
    still sign alike. The signature memory refuses it (issue 21's key)."""
    running = await start(make_sidecar, sim, receiver)
    now = int(time.time())
    now -= 1 if str(now).endswith("1") else 0
    ts, nonce = str(now), str(now)[:9]
    moved_ts, moved_nonce = (nonce + ts)[:10], (nonce + ts)[10:]
    assert (moved_ts, moved_nonce) != (ts, nonce) and abs(int(moved_ts) - now) < 10
    assert plain_signature(TOKEN, moved_ts, moved_nonce) == plain_signature(TOKEN, ts, nonce)
    query, body = plain_push(text_message(msg_id=6565), timestamp=now, nonce=nonce)
    assert (await post(http, running, query, body))[0] == 200
    moved = query.replace(f"timestamp={ts}&nonce={nonce}", f"timestamp={moved_ts}&nonce={moved_nonce}")
    status, answer = await post(http, running, moved, text_message(msg_id=6566, content="moved"))
    assert status == 403 and b"already taken" in answer
    assert [headers["X-WeChat-Message-Id"] for headers, _ in receiver.got] == ["6565"]


async def test_a_slow_app_never_shows_the_user_an_error(make_sidecar, sim, http, receiver):
    running = await start(make_sidecar, sim, receiver, within=0.3)
    receiver.delay, receiver.reply = 1.0, b"<xml><Content><![CDATA[late]]></Content></xml>"
    message = text_message(msg_id=9090)
    started = time.monotonic()
    assert await post(http, running, *plain_push(message, nonce="1")) == (200, b"success")   # within WeChat's 5 s
    assert time.monotonic() - started < 0.9
    await wait_until(lambda: receiver.got, timeout=3)
    await asyncio.sleep(1.0)                                             # the app answers at last
    assert await post(http, running, *plain_push(message, nonce="2")) == (200, receiver.reply)  # WeChat's retry
    assert len(receiver.got) == 1


async def test_an_app_that_is_down_gets_the_message_when_it_is_back_with_the_same_id(make_sidecar, sim, http):
    port = free_port()
    down = f"http://127.0.0.1:{port}/wechat"
    running = await make_sidecar(push_yaml(sim.url, down))
    running.callbacks = f"http://127.0.0.1:{running.callbacks_port}"
    assert await post(http, running, *plain_push(text_message(msg_id=31337))) == (200, b"success")
    async with http.get(f"{running.admin}/admin/apps") as resp:
        pushes = (await resp.json())["apps"][0]["pushes"]
    assert pushes["queued"] == 1 and "cannot reach the app" in pushes["last_failure"]
    receiver = await Receiver().start(port)                              # the app is back
    try:
        await wait_until(lambda: receiver.got, timeout=8)
        assert receiver.got[0][0]["X-WeChat-Message-Id"] == "31337"
        await wait_until(lambda: not running.sidecar.delivery.state("mp").queue, timeout=2)
    finally:
        await receiver.stop()


async def test_the_queue_is_bounded_and_what_overflows_is_counted_and_logged_by_id(
        make_sidecar, sim, http, monkeypatch, caplog):
    monkeypatch.setattr(delivery_mod, "MAX_QUEUE", 3)
    running = await make_sidecar(push_yaml(sim.url, f"http://127.0.0.1:{free_port()}/wechat"))
    running.callbacks = f"http://127.0.0.1:{running.callbacks_port}"
    for n in range(5):
        assert (await post(http, running, *plain_push(text_message(msg_id=500 + n), nonce=f"n{n}")))[0] == 200
    text = await scrape(http, running)
    assert metric(text, "wts_push_dropped_total", app="mp", reason="queue_full") == 2
    assert metric(text, "wts_push_queue_depth", app="mp") == 3
    dropped = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "push_dropped"]
    assert len(dropped) == 2 and "503" in dropped[0] and "504" in dropped[1]


async def test_no_token_key_or_message_content_is_logged(make_sidecar, sim, http, receiver, caplog):
    caplog.set_level(logging.DEBUG)
    running = await start(make_sidecar, sim, receiver)
    receiver.reply = b"<xml><Content><![CDATA[reply-words-zz9]]></Content></xml>"
    await post(http, running, *safe_push(text_message(msg_id=66, content="secret-words-qq7")))
    await post(http, running, *plain_push(b"<!DOCTYPE x><xml>secret-words-qq7</xml>"))
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in (TOKEN, AES_KEY, "secret-words-qq7", "reply-words-zz9"):
        assert secret not in logged
    assert "callback" in logged            # the listener's own access lines are there


# ---------------------------------------------------------------- platforms

async def test_an_authorized_accounts_push_uses_the_platforms_key_and_names_the_account(
        make_sidecar, sim, http, receiver):
    from proxy.simulator import DEMO_COMPONENT_AES_KEY, DEMO_COMPONENT_TOKEN

    from ..credentials.test_platform import PLATFORM, platform_yaml
    yaml = platform_yaml(sim.url, top="callbacks: {host: 127.0.0.1, port: 0}").replace(
        "    min_refresh_interval_s: 0\n  - name: mp", f'    min_refresh_interval_s: 0\n    push: {{deliver_to: "{receiver.url}"}}\n  - name: mp')
    running = await make_sidecar(yaml)
    running.callbacks = f"http://127.0.0.1:{running.callbacks_port}"
    authorizer = "wx00000000000000b7"
    query, body = safe_push(text_message(msg_id=8080), appid=PLATFORM, token=DEMO_COMPONENT_TOKEN,
                            key=DEMO_COMPONENT_AES_KEY)             # receive id: the platform's appid
    assert await post(http, running, query, body, f"/wechat/plat/{authorizer}") == (200, b"success")
    assert receiver.got[0][0]["X-WeChat-Appid"] == authorizer
    # the platform's own InfoType pushes at /wechat/plat go to its intake
    query, body = sim.push_request(PLATFORM, {"InfoType": "component_verify_ticket",
                                              "ComponentVerifyTicket": "ticket@@@via-callbacks"})
    assert await post(http, running, query, body, "/wechat/plat") == (200, b"success")
    assert await running.sidecar.store.get_value(f"verify_ticket:{PLATFORM}") == "ticket@@@via-callbacks"


async def test_two_sidecars_on_one_redis_deliver_a_message_once_whichever_wechat_reached(
        sim, redis_server, spawn, http, receiver):
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "t:"}}'
    callbacks = [free_port(), free_port()]
    spawned = spawn_replicas(spawn, 2, lambda i, port, admin: push_yaml(
        sim.url, receiver.url, listen_port=port, admin_port=admin).replace(
        "callbacks: {host: 127.0.0.1, port: 0}", f"callbacks: {{host: 127.0.0.1, port: {callbacks[i]}}}\n{store}"))
    replicas = [(r.proc, r.admin, f"http://127.0.0.1:{port}") for r, port in zip(spawned, callbacks)]
    await asyncio.gather(*(proc.wait_ready(admin) for proc, admin, _ in replicas))
    receiver.reply = b"<xml><Content><![CDATA[once]]></Content></xml>"
    push = safe_push(text_message(msg_id=123123123))
    first, second = replicas
    async with http.post(f"{first[2]}/wechat/mp?{push[0]}", data=push[1]) as resp:
        assert resp.status == 200
        first_answer = await resp.read()
    for n in range(3):                      # WeChat's retries (new timestamp and nonce) reach the other replica
        retry = safe_push(text_message(msg_id=123123123), nonce=f"99{n}")
        async with http.post(f"{second[2]}/wechat/mp?{retry[0]}", data=retry[1]) as resp:
            assert resp.status == 200
            retry_answer = await resp.read()
        crypto = WeChatCrypto(TOKEN, AES_KEY, APPID)
        for answer in (first_answer, retry_answer):
            text = answer.decode()
            ts = re.search(r"<TimeStamp>(\d+)</TimeStamp>", text).group(1)
            sig = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]></MsgSignature>", text).group(1)
            nonce = re.search(r"<Nonce><!\[CDATA\[(.*?)\]\]></Nonce>", text).group(1)
            assert crypto.decrypt_message(text, sig, ts, nonce) == receiver.reply.decode()
    assert len(receiver.got) == 1
    for proc, _, _ in replicas:
        assert "Traceback" not in proc.output()


async def test_the_simulator_pushes_as_wechat_does_and_its_retries_are_one_delivery(
        make_sidecar, sim, http, receiver, monkeypatch):
    from proxy.simulator import pushes as sim_pushes
    monkeypatch.setattr(sim_pushes, "PUSH_WAIT_S", 0.3)          # WeChat's 5 s, shortened
    sim.message_accounts[APPID] = (TOKEN, AES_KEY)
    running = await start(make_sidecar, sim, receiver, within=1.0)
    receiver.delay = 0.6                                       # slower than WeChat waits (here)
    receiver.reply = b"<xml><Content><![CDATA[after a while]]></Content></xml>"
    result = await sim.send_message(f"{running.callbacks}/wechat/mp", APPID, text_message(msg_id=1717))
    assert result["status"] == 200 and result["attempts"] >= 2  # WeChat sent it again
    assert len(receiver.got) == 1                              # the app saw it once
    # compatible mode (plaintext fields and Encrypt side by side) and a plaintext push also go through
    for mode, msg_id in (("compatible", 1718), ("plaintext", 1719)):
        receiver.delay = 0
        result = await sim.send_message(f"{running.callbacks}/wechat/mp", APPID, text_message(msg_id=msg_id), mode)
        assert result == {"status": 200, "attempts": 1, "reply": receiver.reply.decode(),
                          "encrypted": mode == "compatible"}
    assert [h["X-WeChat-Message-Id"] for h, _ in receiver.got] == ["1717", "1718", "1719"]
