"""WeChat Open Platform: the component token from pushed verify tickets,
authorizers registered by pushes, api_query_auth or import, their tokens on
calls, refresh tokens never lost (DESIGN.md, "Third-party platforms")."""
from __future__ import annotations

import asyncio
import json
import textwrap
import time

import pytest

from proxy import config as config_mod
from proxy.simulator import (
    DEMO_COMPONENT_AES_KEY,
    DEMO_COMPONENT_APPID,
    DEMO_COMPONENT_SECRET,
    DEMO_COMPONENT_TOKEN,
    WeChatSimulator,
)
from proxy.wechat.crypto import MessageCrypto

from ..conftest import APPID, SECRET, head_yaml, wait_until
from ..ports import free_port

PLATFORM = DEMO_COMPONENT_APPID
AUTHORIZERS = [f"wx{n:016x}" for n in range(0xA0, 0xA8)]
EVENT = "/sidecar/component/event"


def platform_yaml(upstream: str, *, top: str = "", listen_port: int = 0, admin_port: int = 0,
                  extra: str = "", secret: str = DEMO_COMPONENT_SECRET) -> str:
    """A platform app `plat` (the default route) and an ordinary app `mp`."""
    return head_yaml(upstream, top=top, listen_port=listen_port, admin_port=admin_port) + textwrap.dedent(f"""\
        apps:
          - name: plat
            appid: {PLATFORM}
            secret: "{secret}"
            token_api: component
            token: {DEMO_COMPONENT_TOKEN}
            encoding_aes_key: {DEMO_COMPONENT_AES_KEY}
            min_refresh_interval_s: 0
        """) + textwrap.indent(textwrap.dedent(extra), "    ") + textwrap.indent(textwrap.dedent(f"""\
          - name: mp
            appid: {APPID}
            secret: "{SECRET}"
            token_api: stable
            min_refresh_interval_s: 0
        """), "  ")


def authorized(sim: WeChatSimulator, appid: str) -> str:
    """An account authorized the platform: its first refresh token (as a
    platform's database would hold it)."""
    sim.authorize(PLATFORM, appid)
    return sim.grant_refresh_token(appid)


async def start_platform(make_sidecar, sim, **kw):
    running = await make_sidecar(platform_yaml(sim.url, **kw))
    sim.settings.push_url = running.base + EVENT
    return running


async def with_ticket(make_sidecar, sim, **kw):
    """A platform sidecar that has had its first verify ticket pushed."""
    running = await start_platform(make_sidecar, sim, **kw)
    assert await sim.push_verify_ticket(PLATFORM) == 200
    component = running.sidecar.managers["plat"]
    await wait_until(lambda: component.current() is not None)
    return running


async def import_authorizers(http, running, entries: dict[str, str], headers=None) -> dict:
    body = {"authorizers": [{"authorizer_appid": a, "authorizer_refresh_token": r} for a, r in entries.items()]}
    async with http.post(f"{running.admin}/admin/authorizers?app=plat", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def get_json(http, url: str, **kw) -> tuple[int, dict]:
    async with http.get(url, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


# ---------------------------------------------------------------- crypto and config

def test_wechats_published_vector_decrypts_and_a_changed_signature_or_appid_does_not_pass():
    # WeCom document 90968 (developer.work.weixin.qq.com/document/path/90968):
    # the same AES scheme and signature as Open Platform pushes.
    crypto = MessageCrypto("QDG6eK", "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "wx5823bf96d3bd56c7")
    encrypt = ("RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/"
               "sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZf"
               "JYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGU"
               "callcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KD"
               "YA5Pl/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q==")
    assert crypto.check_signature("477715d11cdb4164915debcba66cb864d751f3e6", "1409659813", "1372623149", encrypt)
    assert not crypto.check_signature("477715d11cdb4164915debcba66cb864d751f3e7", "1409659813", "1372623149", encrypt)
    assert not crypto.check_signature("477715d11cdb4164915debcba66cb864d751f3e6", "1409659814", "1372623149", encrypt)
    message, appid = crypto.decrypt(encrypt)
    assert appid == "wx5823bf96d3bd56c7"
    assert b"<Content><![CDATA[hello]]></Content>" in message and b"<MsgId>4561255354251345929</MsgId>" in message
    # And our encryption is WeChat's layout: it decrypts with the same code path.
    assert crypto.decrypt(crypto.encrypt(b"<xml/>")) == (b"<xml/>", "wx5823bf96d3bd56c7")


@pytest.mark.parametrize("line, key, why", [
    ("encoding_aes_key: tooshort", "encoding_aes_key", "43 characters"),
    ("encoding_aes_key: '" + "!" * 43 + "'", "encoding_aes_key", "base64"),
])
def test_a_bad_encoding_aes_key_names_the_key(line, key, why):
    text = platform_yaml("http://127.0.0.1:1").replace(f"encoding_aes_key: {DEMO_COMPONENT_AES_KEY}", line)
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(text, "p.yaml", env={})
    assert f"apps[0].{key}" in str(info.value) and why in str(info.value)


def test_platform_keys_belong_to_platform_apps_and_come_in_pairs():
    with pytest.raises(config_mod.ConfigError, match=r"apps\[1\]\.max_cached_authorizers: only platform apps"):
        config_mod.parse(platform_yaml("http://127.0.0.1:1") + "    max_cached_authorizers: 5\n", "p.yaml", env={})
    text = platform_yaml("http://127.0.0.1:1").replace(f"    token: {DEMO_COMPONENT_TOKEN}\n", "")
    with pytest.raises(config_mod.ConfigError, match=r"apps\[0\]\.token: .*both token and encoding_aes_key"):
        config_mod.parse(text, "p.yaml", env={})


# ---------------------------------------------------------------- verify tickets and the component token

async def test_a_pushed_verify_ticket_makes_the_component_token_used_on_component_calls(make_sidecar, sim, http):
    running = await start_platform(make_sidecar, sim)
    status, ready = await get_json(http, f"{running.admin}/readyz")
    assert status == 200 and "component_verify_ticket" in ready["warnings"]["plat"]   # ready to take the push
    status, body = await get_json(http, f"{running.base}/cgi-bin/component/api_get_authorizer_info")
    assert status == 503 and "component_verify_ticket" in body["errmsg"]
    assert sim.fetch_count("component") == 0

    assert await sim.push_verify_ticket(PLATFORM) == 200
    component = running.sidecar.managers["plat"]
    await wait_until(lambda: component.current() is not None)     # fetched at once, not after a backoff
    assert sim.fetch_count("component") == 1
    async with http.post(f"{running.base}/cgi-bin/component/api_get_authorizer_info?component_access_token=MINE",
                         json={"component_appid": PLATFORM}) as resp:
        body = await resp.json()
    assert body["errcode"] == 0
    assert body["component_access_token"] == [sim.current[f"component:{PLATFORM}"].value]
    assert body["access_token"] == []


async def test_a_refused_component_token_is_refreshed_once_and_the_call_replayed(make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    sim.rotate(PLATFORM, "component")                  # another system fetched the component token
    results = await asyncio.gather(*(get_json(http, f"{running.base}/cgi-bin/component/api_get_authorizer_list")
                                     for _ in range(10)))
    assert all(status == 200 and body["errcode"] == 0 for status, body in results)
    assert sim.fetch_count("component") == 2


@pytest.mark.parametrize("damage, status", [
    ("signature", 403), ("appid", 403), ("not_xml", 400), ("doctype", 400), ("no_encrypt", 400), ("no_query", 400),
    ("too_big", 413),
])
async def test_a_push_that_is_not_wechats_for_this_platform_is_refused_and_changes_nothing(
        make_sidecar, sim, http, damage, status):
    running = await start_platform(make_sidecar, sim)
    query, body = sim.push_request(PLATFORM, {"InfoType": "component_verify_ticket",
                                              "ComponentVerifyTicket": "ticket@@@forged"})
    if damage == "signature":
        query = query.replace("msg_signature=", "msg_signature=0")
    elif damage == "appid":      # right key and token, encrypted for another appid
        crypto = MessageCrypto(DEMO_COMPONENT_TOKEN, DEMO_COMPONENT_AES_KEY, "wx00000000000000ff")
        sim.crypto = lambda appid: crypto          # type: ignore[method-assign]
        query, body = sim.push_request(PLATFORM, {"InfoType": "component_verify_ticket",
                                                  "ComponentVerifyTicket": "ticket@@@forged"})
    elif damage == "not_xml":
        body = b"\x00\xffnot xml at all"
    elif damage == "doctype":
        body = b'<!DOCTYPE xml [<!ENTITY a "aaaa">]><xml><Encrypt>&a;</Encrypt></xml>'
    elif damage == "no_encrypt":
        body = b"<xml><AppId>x</AppId></xml>"
    elif damage == "no_query":
        query = ""
    elif damage == "too_big":
        body = body.replace(b"<xml>", b"<xml><Pad>" + b"x" * 70000 + b"</Pad>", 1)
    async with http.post(f"{running.base}{EVENT}?{query}", data=body) as resp:
        assert resp.status == status
        answer = await resp.json()
    assert answer["errcode"] == -1 and answer["errmsg"].startswith("sidecar: ")
    assert await running.sidecar.store.get_value(f"verify_ticket:{PLATFORM}") is None
    assert sim.fetch_count("component") == 0
    async with http.get(f"{running.base}{EVENT}") as resp:
        assert resp.status == 405


async def test_wechats_timer_pushes_keep_the_latest_ticket_which_the_next_component_fetch_uses(
        make_sidecar, sim, http):
    running = await start_platform(make_sidecar, sim)
    sim.settings.verify_ticket_interval_s = 0.2            # WeChat's 10 minutes, shortened
    await wait_until(lambda: len(sim.pushes_sent) >= 3, timeout=5)
    sim.settings.verify_ticket_interval_s = 0
    await asyncio.sleep(0.1)                               # a push under way lands
    assert all(status == 200 for _, status in sim.pushes_sent)
    await wait_until(lambda: running.sidecar.managers["plat"].current() is not None)
    latest = sim.verify_tickets[PLATFORM].value
    assert await running.sidecar.store.get_value(f"verify_ticket:{PLATFORM}") == latest
    # The simulator takes only the latest ticket (61006 otherwise): a refresh
    # now succeeds only with the one pushed last.
    sim.rotate(PLATFORM, "component")
    status, body = await get_json(http, f"{running.base}/cgi-bin/component/api_get_authorizer_list")
    assert status == 200 and body["errcode"] == 0
    assert running.sidecar.platforms["plat"].pushes["component_verify_ticket"] == len(sim.pushes_sent)


async def test_the_admin_port_takes_a_verify_ticket_too(make_sidecar, sim, http):
    running = await start_platform(make_sidecar, sim)
    ticket = sim.new_verify_ticket(PLATFORM)          # as a platform that decrypts pushes itself saw it
    async with http.post(f"{running.admin}/admin/component/verify_ticket?app=plat",
                         json={"component_verify_ticket": ticket}) as resp:
        assert resp.status == 200
    await wait_until(lambda: running.sidecar.managers["plat"].current() is not None)
    async with http.post(f"{running.admin}/admin/component/verify_ticket?app=mp",
                         json={"component_verify_ticket": ticket}) as resp:
        assert resp.status == 404                       # mp is not a platform


# ---------------------------------------------------------------- authorizers

async def test_an_authorized_push_registers_the_account_and_its_calls_carry_its_token(make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[0]
    async with http.post(f"{sim.url}/_sim/component/authorize?authorizer_appid={appid}") as resp:
        assert (await resp.json())["pushed"] == 200     # the sidecar exchanged the code before answering
    assert await running.sidecar.store.registry_get(PLATFORM, appid) == sim.refresh_tokens[appid]

    status, by_prefix = await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info?openid=O")
    status2, by_header = await get_json(http, f"{running.base}/cgi-bin/user/info?access_token=X",
                                        headers={"X-WeChat-Authorizer": appid})
    token = sim.current[f"authorizer:{appid}"].value
    assert status == status2 == 200
    assert by_prefix["access_token"] == by_header["access_token"] == [token]
    assert by_prefix["path"] == "/cgi-bin/user/info"
    assert "X-WeChat-Authorizer" not in by_header["headers"]

    status, body = await get_json(http, f"{running.base}/plat/{AUTHORIZERS[1]}/cgi-bin/user/info")
    assert status == 404 and "unknown authorizer" in body["errmsg"]
    status, body = await get_json(http, f"{running.base}/cgi-bin/user/info")
    assert status == 400 and "X-WeChat-Authorizer" in body["errmsg"]

    # updateauthorized: a new code, a new refresh token replaces the stored one
    code = sim.authorize(PLATFORM, appid)
    assert await sim.push(PLATFORM, {"InfoType": "updateauthorized", "AuthorizerAppid": appid,
                                     "AuthorizationCode": code}) == 200
    assert await running.sidecar.store.registry_get(PLATFORM, appid) == sim.refresh_tokens[appid]

    async with http.post(f"{sim.url}/_sim/component/unauthorize?authorizer_appid={appid}") as resp:
        assert (await resp.json())["pushed"] == 200
    status, body = await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info")
    assert status == 404
    assert await running.sidecar.store.registry_get(PLATFORM, appid) is None


async def test_a_forwarded_api_query_auth_registers_the_authorizer(make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[2]
    code = sim.authorize(PLATFORM, appid)
    async with http.post(f"{running.base}/cgi-bin/component/api_query_auth",
                         json={"component_appid": PLATFORM, "authorization_code": code}) as resp:
        answer = await resp.json()
    assert answer["authorization_info"]["authorizer_appid"] == appid
    assert await running.sidecar.store.registry_get(PLATFORM, appid) == sim.refresh_tokens[appid]
    status, body = await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info")
    assert status == 200 and body["errcode"] == 0


async def test_a_refused_authorizer_token_costs_one_refresh_however_many_calls_saw_it(make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[0]
    await import_authorizers(http, running, {appid: authorized(sim, appid)})
    url = f"{running.base}/plat/{appid}/cgi-bin/user/info"
    assert (await get_json(http, url))[0] == 200
    assert sim.authorizer_fetches[appid] == 1
    sim.rotate(appid, key=f"authorizer:{appid}")       # the token is refused from now on
    results = await asyncio.gather(*(get_json(http, url) for _ in range(20)))
    assert all(status == 200 and body["errcode"] == 0 for status, body in results)
    assert sim.authorizer_fetches[appid] == 2
    assert sim.refresh_token_refusals == 0


async def test_sdks_asking_for_component_and_authorizer_tokens_get_the_managed_ones(make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[0]
    await import_authorizers(http, running, {appid: authorized(sim, appid)})
    fetches = sim.fetch_count()
    async with http.post(f"{running.base}/plat/cgi-bin/component/api_component_token",
                         json={"component_appid": PLATFORM, "component_appsecret": "the SDK's copy",
                               "component_verify_ticket": "old"}) as resp:
        body = await resp.json()
    assert body["component_access_token"] == sim.current[f"component:{PLATFORM}"].value
    assert 0 < body["expires_in"] <= 7200
    async with http.post(f"{running.base}/cgi-bin/component/api_authorizer_token?component_access_token=X",
                         json={"component_appid": PLATFORM, "authorizer_appid": appid,
                               "authorizer_refresh_token": "the SDK's copy"}) as resp:
        body = await resp.json()
    assert body["authorizer_access_token"] == sim.current[f"authorizer:{appid}"].value
    assert body["authorizer_refresh_token"] == "the SDK's copy"     # the stored one is never handed out
    assert sim.fetch_count() == fetches + 1            # the authorizer's first use; the component's none
    async with http.post(f"{running.base}/cgi-bin/component/api_authorizer_token",
                         json={"authorizer_appid": AUTHORIZERS[5]}) as resp:
        assert resp.status == 404


async def test_admin_authorizer_endpoints_import_list_and_delete_without_showing_a_token(make_sidecar, sim, http):
    text = platform_yaml(sim.url).replace("admin:  {host: 127.0.0.1, port: 0}",
                                          'admin:  {host: 127.0.0.1, port: 0, token: "adm-secret"}')
    running = await make_sidecar(text)
    auth = {"Authorization": "Bearer adm-secret"}
    for method, path in (("POST", "/admin/authorizers?app=plat"), ("GET", "/admin/authorizers?app=plat"),
                         ("DELETE", f"/admin/authorizers?app=plat&authorizer_appid={AUTHORIZERS[0]}"),
                         ("POST", "/admin/component/verify_ticket?app=plat")):
        async with http.request(method, running.admin + path, json={}) as resp:
            assert resp.status == 401
    refresh = {appid: authorized(sim, appid) for appid in AUTHORIZERS[:3]}
    assert (await import_authorizers(http, running, refresh, auth))["imported"] == 3
    async with http.post(f"{running.admin}/admin/component/verify_ticket?app=plat", headers=auth,
                         json={"component_verify_ticket": sim.new_verify_ticket(PLATFORM)}) as resp:
        assert resp.status == 200
    assert (await get_json(http, f"{running.base}/plat/{AUTHORIZERS[1]}/cgi-bin/user/info"))[0] == 200

    async with http.get(f"{running.admin}/admin/authorizers?app=plat", headers=auth) as resp:
        text_answer = await resp.text()
        listing = json.loads(text_answer)
    assert listing["authorizers"] == 3 and listing["cached"] == 1
    assert {e["authorizer_appid"] for e in listing["page"]} == set(AUTHORIZERS[:3])
    assert [e["usable"] for e in listing["page"] if e["cached"]] == [True]
    for secret in (*refresh.values(), sim.current[f"authorizer:{AUTHORIZERS[1]}"].value):
        assert secret not in text_answer

    async with http.post(f"{running.admin}/admin/authorizers?app=plat", headers=auth,
                         json={"authorizers": [{"authorizer_appid": "wx1"}]}) as resp:
        assert resp.status == 400 and "entry 0" in (await resp.json())["errmsg"]
    async with http.delete(f"{running.admin}/admin/authorizers?app=plat&authorizer_appid={AUTHORIZERS[1]}",
                           headers=auth) as resp:
        assert resp.status == 200
    async with http.delete(f"{running.admin}/admin/authorizers?app=plat&authorizer_appid={AUTHORIZERS[1]}",
                           headers=auth) as resp:
        assert resp.status == 404
    assert (await get_json(http, f"{running.base}/plat/{AUTHORIZERS[1]}/cgi-bin/user/info"))[0] == 404


# ---------------------------------------------------------------- scale: bounded, lazy, nothing idle

def authorizer_tasks(appid: str) -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if appid in t.get_name() and not t.done()]


async def test_the_authorizer_cache_is_bounded_and_an_evicted_one_keeps_no_task(make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim, extra="max_cached_authorizers: 3\n")
    refresh = {appid: authorized(sim, appid) for appid in AUTHORIZERS[:6]}
    await import_authorizers(http, running, refresh)
    for appid in AUTHORIZERS[:6]:
        assert (await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info"))[0] == 200
    platform = running.sidecar.platforms["plat"]
    assert list(platform.managers.keys()) == AUTHORIZERS[3:6]
    await wait_until(lambda: not any(authorizer_tasks(a) for a in AUTHORIZERS[:3]))
    # An evicted authorizer is served again from the store: no new fetch.
    assert (await get_json(http, f"{running.base}/plat/{AUTHORIZERS[0]}/cgi-bin/user/info"))[0] == 200
    assert sum(sim.authorizer_fetches.values()) == 6
    async with http.get(f"{running.admin}/metrics") as resp:
        metrics = await resp.text()
    assert 'wts_authorizers_registered{app="plat"} 6.0' in metrics
    assert 'wts_authorizers_cached{app="plat"} 3.0' in metrics
    assert not any(appid in metrics for appid in AUTHORIZERS)        # no label per authorizer


async def test_an_authorizer_nobody_calls_is_left_to_end_and_costs_no_task(make_sidecar, sim, http):
    sim.settings.ttl_s = 1.5
    running = await with_ticket(make_sidecar, sim, extra="refresh_before_s: 0.5\n")
    appid = AUTHORIZERS[0]
    await import_authorizers(http, running, {appid: authorized(sim, appid)})
    url = f"{running.base}/plat/{appid}/cgi-bin/user/info"
    assert (await get_json(http, url))[0] == 200
    await wait_until(lambda: not authorizer_tasks(appid))      # held: no task, no timer
    manager = running.sidecar.platforms["plat"].managers[appid]
    first = manager.current()
    # Used: refreshed ahead in the background when a call finds it due,
    # while that call is served with the current token.
    await asyncio.sleep(max(0.0, first.expires_at - 0.5 - time.monotonic()) + 0.05)
    assert (await get_json(http, url))[0] == 200
    await wait_until(lambda: manager.current() is not None and manager.current() is not first)
    assert sim.authorizer_fetches[appid] == 2
    # Not used: left to end, nothing fetched for nobody.
    await wait_until(lambda: manager.state.token.expires_at < time.monotonic(), timeout=5)
    assert sim.authorizer_fetches[appid] == 2 and not authorizer_tasks(appid)
    assert (await get_json(http, url))[0] == 200       # used again: fetched on demand
    assert sim.authorizer_fetches[appid] == 3


# ---------------------------------------------------------------- refresh tokens are never lost

async def test_a_rotated_refresh_token_is_stored_even_when_redis_stalls_during_the_refresh(
        sim, redis_server, make_sidecar, http):
    sim.settings.rotate_refresh_tokens = True
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "t:"}}'
    running = await with_ticket(make_sidecar, sim, top=store)
    appid = AUTHORIZERS[0]
    await import_authorizers(http, running, {appid: authorized(sim, appid)})
    sim.settings.token_latency_s = 0.3
    key = f"authorizer:{appid}"
    call = asyncio.create_task(get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info"))
    await wait_until(lambda: sim.fetch_attempts.get(key, 0) == 1)    # the refresh is at WeChat now
    redis_server.command("CLIENT", "PAUSE", "2500", "WRITE")         # and Redis takes no writes for 2.5 s
    status, body = await call
    assert status == 200 and body["errcode"] == 0
    stored = redis_server.command("HGET", f"t:registry:{{{PLATFORM}}}", appid)
    assert sim.refresh_tokens[appid].encode() in stored               # the rotated one, not the spent one
    sim.rotate(appid, key=key)
    assert (await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info"))[0] == 200
    assert sim.refresh_token_refusals == 0


async def test_two_sidecars_racing_to_refresh_rotating_refresh_tokens_never_lose_one(
        sim, redis_server, spawn, http, tmp_path):
    from .test_redis_store import Replica
    sim.settings.rotate_refresh_tokens = True
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "t:"}}'
    replicas = []
    for i in range(2):
        port, admin = free_port(), free_port()
        proc = spawn(platform_yaml(sim.url, top=store, listen_port=port, admin_port=admin), name=f"plat{i}")
        replicas.append(Replica(proc, port, admin))
    accounts = AUTHORIZERS[:4]
    sim.new_verify_ticket(PLATFORM)
    ticket = sim.verify_tickets[PLATFORM].value
    await asyncio.gather(*(r.proc.wait_ready(r.admin) for r in replicas))
    async with http.post(f"{replicas[0].admin}/admin/component/verify_ticket?app=plat",
                         json={"component_verify_ticket": ticket}) as resp:
        assert resp.status == 200
    async with http.post(f"{replicas[0].admin}/admin/authorizers?app=plat",
                         json={"authorizers": [{"authorizer_appid": a, "authorizer_refresh_token": authorized(sim, a)}
                                               for a in accounts]}) as resp:
        assert resp.status == 200

    async def component_usable(replica) -> bool:
        status, apps = await get_json(http, f"{replica.admin}/admin/apps")
        return any(a["name"] == "plat" and a["usable"] for a in apps["apps"])

    for replica in replicas:            # the other one took the component token from Redis
        for _ in range(200):
            if await component_usable(replica):
                break
            await asyncio.sleep(0.02)

    async def calls() -> list[tuple[int, dict]]:
        return await asyncio.gather(*(get_json(http, f"{r.base}/plat/{a}/cgi-bin/user/info")
                                      for r in replicas for a in accounts for _ in range(5)))

    def all_ok(results: list[tuple[int, dict]]) -> None:
        failed = [(s, b) for s, b in results if s != 200 or b["errcode"] != 0]
        assert not failed, failed[:3]

    all_ok(await calls())
    rounds = 5
    for _ in range(rounds):
        for appid in accounts:                       # every authorizer token refused at once, on both
            sim.rotate(appid, key=f"authorizer:{appid}")
        all_ok(await calls())
    assert sim.refresh_token_refusals == 0
    for appid in accounts:
        assert sim.authorizer_fetches[appid] == 1 + rounds           # one refresh per rotation, cluster-wide
        stored = redis_server.command("HGET", f"t:registry:{{{PLATFORM}}}", appid)
        assert sim.refresh_tokens[appid].encode() in stored
    for replica in replicas:
        assert "Traceback" not in replica.proc.output()


async def test_a_restarted_sidecar_serves_imported_authorizers_from_redis_with_no_admin_call(
        sim, redis_server, spawn, http):
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "t:"}}'
    port, admin = free_port(), free_port()
    first = spawn(platform_yaml(sim.url, top=store, listen_port=port, admin_port=admin), name="first")
    await first.wait_ready(f"http://127.0.0.1:{admin}")
    sim.settings.push_url = f"http://127.0.0.1:{port}{EVENT}"
    assert await sim.push_verify_ticket(PLATFORM) == 200
    appid = AUTHORIZERS[3]
    async with http.post(f"http://127.0.0.1:{admin}/admin/authorizers?app=plat",
                         json={"authorizer_appid": appid, "authorizer_refresh_token": authorized(sim, appid)}) as resp:
        assert resp.status == 200
    status, body = await get_json(http, f"http://127.0.0.1:{port}/plat/{appid}/cgi-bin/user/info")
    assert status == 200 and body["errcode"] == 0
    first.stop()
    fetches = sim.fetch_count()

    sim.settings.push_url = ""                         # no push will come: the ticket must be the stored one
    port, admin = free_port(), free_port()
    second = spawn(platform_yaml(sim.url, top=store, listen_port=port, admin_port=admin), name="second")
    await second.wait_ready(f"http://127.0.0.1:{admin}")
    status, body = await get_json(http, f"http://127.0.0.1:{port}/plat/{appid}/cgi-bin/user/info")
    assert status == 200 and body["access_token"] == [sim.current[f"authorizer:{appid}"].value]
    status, body = await get_json(http, f"http://127.0.0.1:{port}/cgi-bin/component/api_get_authorizer_list")
    assert status == 200 and body["errcode"] == 0
    assert sim.fetch_count() == fetches                # tokens taken from Redis: nothing fetched again


async def test_no_token_refresh_token_or_verify_ticket_is_logged(make_sidecar, sim, http, caplog):
    caplog.set_level("DEBUG")
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[0]
    async with http.post(f"{sim.url}/_sim/component/authorize?authorizer_appid={appid}") as resp:
        assert (await resp.json())["pushed"] == 200
    sim.rotate(appid, key=f"authorizer:{appid}")
    sim.rotate(PLATFORM, "component")
    assert (await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info"))[0] == 200
    assert (await get_json(http, f"{running.base}/cgi-bin/component/api_get_authorizer_list"))[0] == 200
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    secrets = [i.value for i in sim.tokens.values()] + list(sim.refresh_tokens.values()) + \
        [sim.verify_tickets[PLATFORM].value, DEMO_COMPONENT_SECRET, DEMO_COMPONENT_AES_KEY]
    assert "push taken" in logged and "authorizer" in logged
    for secret in secrets:
        assert secret not in logged


def test_check_summarises_a_platform_app_without_its_secrets(tmp_path):
    import subprocess
    import sys

    from ..conftest import ROOT
    path = tmp_path / "config.yaml"
    aes_file = tmp_path / "aes"
    aes_file.write_text(DEMO_COMPONENT_AES_KEY + "\n")
    path.write_text(platform_yaml("http://127.0.0.1:1").replace(
        f"encoding_aes_key: {DEMO_COMPONENT_AES_KEY}", f"encoding_aes_key_file: {aes_file}"))
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"plat: appid={PLATFORM} token_api=component" in result.stdout
    assert "pushes=on" in result.stdout and "max_cached_authorizers=10000" in result.stdout
    for secret in (DEMO_COMPONENT_SECRET, DEMO_COMPONENT_TOKEN, DEMO_COMPONENT_AES_KEY):
        assert secret not in result.stdout + result.stderr
    assert str(aes_file) in config_mod.load(path).watched_files()      # a changed key file reloads


async def test_an_authorizer_header_on_an_ordinary_app_is_refused_not_given_the_apps_token(make_sidecar, sim, http):
    running = await start_platform(make_sidecar, sim)
    status, body = await get_json(http, f"{running.base}/mp/cgi-bin/user/info",
                                  headers={"X-WeChat-Authorizer": AUTHORIZERS[0]})
    assert status == 400 and "not a platform app" in body["errmsg"]
    assert sim.business_received == 0


async def test_a_reload_that_changes_the_platform_app_keeps_serving_its_authorizers(make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[0]
    await import_authorizers(http, running, {appid: authorized(sim, appid)})
    assert (await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info"))[0] == 200
    old = running.sidecar.platforms["plat"]
    new_config = config_mod.parse(platform_yaml(sim.url, extra="max_cached_authorizers: 7\n"), "<t>", env={})
    running.sidecar.reload(new_config)
    platform = running.sidecar.platforms["plat"]
    assert platform is not old and platform.managers.maxsize == 7
    await wait_until(lambda: running.sidecar.managers["plat"].current() is not None)
    status, body = await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info")
    assert status == 200 and body["errcode"] == 0
    assert sim.authorizer_fetches[appid] == 1       # the store held its token: nothing fetched again


async def test_a_platform_whose_stored_ticket_wechat_refuses_stays_ready_for_the_next_push(make_sidecar, sim, http):
    running = await start_platform(make_sidecar, sim)
    async with http.post(f"{running.admin}/admin/component/verify_ticket?app=plat",
                         json={"component_verify_ticket": "ticket@@@stale"}) as resp:
        assert resp.status == 200
    component = running.sidecar.managers["plat"]
    await wait_until(lambda: component.state.last_failure is not None and component.state.last_failure.errcode == 61006)
    status, ready = await get_json(http, f"{running.admin}/readyz")
    assert status == 200 and "component_verify_ticket" in ready["warnings"]["plat"]
    assert await sim.push_verify_ticket(PLATFORM) == 200          # the push it was ready for
    await wait_until(lambda: component.current() is not None)


async def test_an_authorizer_refresh_met_by_a_refused_component_token_refreshes_that_and_retries_once(
        make_sidecar, sim, http):
    running = await with_ticket(make_sidecar, sim)
    appid = AUTHORIZERS[0]
    await import_authorizers(http, running, {appid: authorized(sim, appid)})
    url = f"{running.base}/plat/{appid}/cgi-bin/user/info"
    assert (await get_json(http, url))[0] == 200
    components = sim.fetch_count("component")
    sim.rotate(PLATFORM, "component")              # the component token dies...
    sim.rotate(appid, key=f"authorizer:{appid}")   # ...and the authorizer's too
    status, body = await get_json(http, url)
    assert status == 200 and body["errcode"] == 0
    assert sim.fetch_count("component") == components + 1
    assert sim.authorizer_fetches[appid] == 2        # the refused try is not counted by WeChat, the retry is
    assert sim.refresh_token_refusals == 0
