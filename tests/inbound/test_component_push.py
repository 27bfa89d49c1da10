"""A platform's push intake (proxy/inbound/component_push.py) takes each push
once: a time window, a replay memory every replica shares through the store,
state that only moves forward, and XML parsed with no DTD in any encoding."""
from __future__ import annotations

import asyncio
import time

import pytest

from proxy.credentials.platform import AuthorizationFailed
from proxy.simulator import DEMO_COMPONENT_AES_KEY, DEMO_COMPONENT_TOKEN
from proxy.wechat.crypto import MessageCrypto, signature

from ..conftest import wait_until
from ..credentials.test_platform import (
    AUTHORIZERS,
    EVENT,
    PLATFORM,
    authorized,
    get_json,
    platform_yaml,
    start_platform,
    with_ticket,
)
from ..credentials.test_redis_store import spawn_replicas


async def post(http, url: str, query: str, body: bytes) -> tuple[int, str]:
    async with http.post(f"{url}{EVENT}?{query}", data=body) as resp:
        return resp.status, await resp.text()


def ticket_push(sim, ticket: str, at: float | None = None) -> tuple[str, bytes]:
    return sim.push_request(PLATFORM, {"InfoType": "component_verify_ticket", "ComponentVerifyTicket": ticket}, at)


def stored_ticket(running):
    return running.sidecar.store.get_value(f"verify_ticket:{PLATFORM}")


async def test_a_replayed_verify_ticket_push_is_refused_and_the_newer_ticket_stays(make_sidecar, sim, http):
    running = await start_platform(make_sidecar, sim)
    p1 = ticket_push(sim, sim.new_verify_ticket(PLATFORM))
    assert (await post(http, running.base, *p1))[0] == 200
    p2 = ticket_push(sim, sim.new_verify_ticket(PLATFORM))
    assert (await post(http, running.base, *p2))[0] == 200
    latest = sim.verify_tickets[PLATFORM].value
    status, text = await post(http, running.base, *p1)                # byte for byte
    assert status == 403 and "already taken" in text
    assert await stored_ticket(running) == latest
    await wait_until(lambda: running.sidecar.managers["plat"].current() is not None)
    sim.rotate(PLATFORM, "component")                                  # the next rotation needs the latest ticket
    status, body = await get_json(http, f"{running.base}/cgi-bin/component/api_get_authorizer_list")
    assert status == 200 and body["errcode"] == 0


async def test_a_push_under_a_timestamp_and_nonce_seen_before_is_refused(make_sidecar, sim, http):
    """DESIGN: a (nonce, timestamp) already seen is refused, even when what it
    carries is new and signed (msg_signature covers the ciphertext)."""
    running = await start_platform(make_sidecar, sim)
    p1 = ticket_push(sim, sim.new_verify_ticket(PLATFORM))
    assert (await post(http, running.base, *p1))[0] == 200
    first = await stored_ticket(running)
    fields = dict(item.split("=", 1) for item in p1[0].split("&"))
    crypto = sim.crypto(PLATFORM)
    ticket = sim.new_verify_ticket(PLATFORM)
    encrypt = crypto.encrypt((f"<xml><AppId><![CDATA[{PLATFORM}]]></AppId><CreateTime>{fields['timestamp']}</CreateTime>"
                              "<InfoType><![CDATA[component_verify_ticket]]></InfoType>"
                              f"<ComponentVerifyTicket><![CDATA[{ticket}]]></ComponentVerifyTicket></xml>").encode())
    query = (f"timestamp={fields['timestamp']}&nonce={fields['nonce']}&encrypt_type=aes"
             f"&msg_signature={signature(crypto.token, fields['timestamp'], fields['nonce'], encrypt)}")
    body = f"<xml><AppId><![CDATA[{PLATFORM}]]></AppId><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode()
    status, text = await post(http, running.base, query, body)
    assert status == 403 and "already taken" in text
    assert await stored_ticket(running) == first


async def test_a_fresh_push_of_an_older_verify_ticket_is_acknowledged_and_ignored(make_sidecar, sim, http):
    running = await start_platform(make_sidecar, sim)
    now = time.time()
    newer = ticket_push(sim, "ticket@@@newer", at=now)
    older = ticket_push(sim, "ticket@@@older", at=now - 120)           # inside the window, but older by CreateTime
    assert (await post(http, running.base, *newer))[0] == 200
    status, text = await post(http, running.base, *older)
    assert status == 200 and text == "success"                          # WeChat must not retry it
    assert await stored_ticket(running) == "ticket@@@newer"
    assert running.sidecar.platforms["plat"].pushes.get("stale") == 1


@pytest.mark.parametrize("age_s", [86400, -3600, 301])
async def test_a_signed_push_outside_the_time_window_is_refused_and_changes_nothing(
        make_sidecar, sim, http, age_s):
    running = await start_platform(make_sidecar, sim)
    status, text = await post(http, running.base, *ticket_push(sim, "ticket@@@old", at=time.time() - age_s))
    assert status == 403 and "300 s" in text
    assert await stored_ticket(running) is None


async def test_an_operators_ticket_is_taken_whatever_was_pushed_before(make_sidecar, sim, http):
    running = await start_platform(make_sidecar, sim)
    assert (await post(http, running.base, *ticket_push(sim, "ticket@@@pushed")))[0] == 200
    async with http.post(f"{running.admin}/admin/component/verify_ticket?app=plat",
                         json={"component_verify_ticket": "ticket@@@operator"}) as resp:
        assert resp.status == 200
    assert await stored_ticket(running) == "ticket@@@operator"
    # and the next push (WeChat's timer) replaces it again
    assert (await post(http, running.base, *ticket_push(sim, "ticket@@@next", at=time.time() - 5)))[0] == 200
    assert await stored_ticket(running) == "ticket@@@next"


async def test_a_replayed_unauthorized_push_never_removes_an_account_that_authorized_again(
        make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[0]
    now = time.time()
    code = sim.authorize(PLATFORM, appid)
    assert await sim.push(PLATFORM, {"InfoType": "authorized", "AuthorizerAppid": appid,
                                     "AuthorizationCode": code}) == 200
    u1 = sim.push_request(PLATFORM, {"InfoType": "unauthorized", "AuthorizerAppid": appid}, at=now + 1)
    assert (await post(http, running.base, *u1))[0] == 200
    assert (await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info"))[0] == 404
    code = sim.authorize(PLATFORM, appid)                               # the customer authorizes again
    again = sim.push_request(PLATFORM, {"InfoType": "authorized", "AuthorizerAppid": appid,
                                        "AuthorizationCode": code}, at=now + 2)
    assert (await post(http, running.base, *again))[0] == 200
    refresh = sim.refresh_tokens[appid]

    status, text = await post(http, running.base, *u1)                  # the captured U1, byte for byte
    assert status == 403
    # The same revocation signed afresh (not a replay) is still older than the authorization.
    u1_resigned = sim.push_request(PLATFORM, {"InfoType": "unauthorized", "AuthorizerAppid": appid}, at=now + 1)
    assert await post(http, running.base, *u1_resigned) == (200, "success")
    status, body = await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info")
    assert status == 200 and body["errcode"] == 0
    assert await running.sidecar.store.registry_get(PLATFORM, appid) == refresh


async def test_a_push_the_sidecar_could_not_act_on_gets_through_when_wechat_sends_it_again(
        make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[1]
    code = sim.authorize(PLATFORM, appid)
    push = sim.push_request(PLATFORM, {"InfoType": "authorized", "AuthorizerAppid": appid,
                                       "AuthorizationCode": code})
    platform = running.sidecar.platforms["plat"]
    exchange = platform.query_auth

    async def wechat_down(code: str) -> str:
        raise AuthorizationFailed(502, "api_query_auth: ClientConnectorError")

    platform.query_auth = wechat_down             # the code exchange fails once
    status, _ = await post(http, running.base, *push)
    assert status == 502
    platform.query_auth = exchange
    status, text = await post(http, running.base, *push)   # WeChat's retry of the same push
    assert (status, text) == (200, "success")
    assert await running.sidecar.store.registry_get(PLATFORM, appid) == sim.refresh_tokens[appid]


@pytest.mark.parametrize("encoding, why", [("utf-16", "DOCTYPE"), ("utf-16-be", "DOCTYPE"),
                                           ("utf-32", "is not XML")])   # expat reads no UTF-32 at all
async def test_a_document_type_in_any_encoding_is_refused_before_any_entity_is_expanded(
        make_sidecar, sim, http, encoding, why):
    running = await start_platform(make_sidecar, sim)
    crypto = MessageCrypto(DEMO_COMPONENT_TOKEN, DEMO_COMPONENT_AES_KEY, PLATFORM)
    encrypt = crypto.encrypt(b"<xml><InfoType>component_verify_ticket</InfoType></xml>")
    timestamp, nonce = str(int(time.time())), "12345"
    query = f"timestamp={timestamp}&nonce={nonce}&msg_signature={signature(DEMO_COMPONENT_TOKEN, timestamp, nonce, encrypt)}"
    text = (f'<?xml version="1.0" encoding="{encoding[:6].upper()}"?>'
            '<!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            f"<xml><Encrypt>{encrypt}</Encrypt><Pad>&b;</Pad></xml>")
    body = text.encode(encoding)
    assert b"<!DOCTYPE" not in body.upper()                             # what a byte search missed
    status, answer = await post(http, running.base, query, body)
    assert status == 400 and why in answer
    assert await stored_ticket(running) is None


async def test_a_replay_sent_to_another_replica_is_refused_there_too(sim, redis_server, spawn, http):
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "t:"}}'
    replicas = spawn_replicas(spawn, 2, lambda i, port, admin: platform_yaml(
        sim.url, top=store, listen_port=port, admin_port=admin), "plat")
    await asyncio.gather(*(r.proc.wait_ready(r.admin) for r in replicas))
    first, other = replicas
    p1 = ticket_push(sim, sim.new_verify_ticket(PLATFORM))
    assert (await post(http, first.base, *p1))[0] == 200
    p2 = ticket_push(sim, sim.new_verify_ticket(PLATFORM))
    assert (await post(http, first.base, *p2))[0] == 200
    status, text = await post(http, other.base, *p1)                    # captured, replayed elsewhere
    assert status == 403 and "already taken" in text
    assert sim.verify_tickets[PLATFORM].value.encode() in \
        redis_server.command("GET", f"t:value:{{verify_ticket:{PLATFORM}}}")
    # An unauthorized replayed to the other replica after a new authorization
    appid = AUTHORIZERS[2]
    async with http.post(f"{first.admin}/admin/authorizers?app=plat",
                         json={"authorizer_appid": appid, "authorizer_refresh_token": authorized(sim, appid)}) as r:
        assert r.status == 200
    now = time.time()
    u1 = sim.push_request(PLATFORM, {"InfoType": "unauthorized", "AuthorizerAppid": appid}, at=now)
    assert (await post(http, first.base, *u1))[0] == 200
    async with http.post(f"{first.admin}/admin/authorizers?app=plat",
                         json={"authorizer_appid": appid, "authorizer_refresh_token": authorized(sim, appid)}) as r:
        assert r.status == 200
    assert (await post(http, other.base, *u1))[0] == 403
    assert sim.refresh_tokens[appid].encode() in redis_server.command("HGET", f"t:registry:{{{PLATFORM}}}", appid)
    for replica in replicas:
        assert "Traceback" not in replica.proc.output()
