"""Tickets, the first step: the simulator's ticket endpoints follow WeChat's
rules, and a ticket fetch rides on the app's managed token (a token error
invalidates that token, refreshes it once and retries once)."""
from __future__ import annotations

import asyncio
import hashlib
import time
from json import loads as json_loads

import pytest

from proxy.credentials import FailureKind, FetchError
from proxy.credentials.fetchers import TicketFetcher

from ..conftest import APPID, CORPID, CORPSECRET, past_coalescing, sidecar_yaml, wait_until
from ..outbound.test_dropin import wecom_apps


def ticket_fetcher(sc, app: str, *, api: str = "jsapi_ticket", path: str = "/cgi-bin/ticket/getticket",
                   query: dict[str, str] | None = None) -> TicketFetcher:
    manager = sc.sidecar.managers[app]

    async def token() -> str:
        return (await manager.get()).value

    return TicketFetcher(manager.app, sc.sidecar.session, 5.0, api=api, path=path,
                         query={"type": "jsapi"} if query is None else query,
                         token=token, invalidate=manager.invalidate)


async def test_the_simulator_hands_out_one_ticket_per_kind_for_its_life_and_checks_the_token(sim, make_sidecar, http):
    sc = await make_sidecar()
    token = sc.sidecar.managers["mp"].current().value
    url = f"{sim.url}/cgi-bin/ticket/getticket"
    async with http.get(url, params={"access_token": "bogus", "type": "jsapi"}) as resp:
        assert (await resp.json())["errcode"] == 40001
    answers = []
    for kind in ("jsapi", "jsapi", "wx_card"):
        async with http.get(url, params={"access_token": token, "type": kind}) as resp:
            answers.append(await resp.json())
    assert answers[0]["ticket"] == answers[1]["ticket"] != answers[2]["ticket"]
    assert all(a["errcode"] == 0 and a["expires_in"] == 7200 for a in answers)   # never the seconds left
    assert sim.ticket_fetch_count("jsapi") == 2 and sim.ticket_fetch_count("wx_card") == 1
    async with http.get(url, params={"access_token": token, "type": "other"}) as resp:
        assert (await resp.json())["errcode"] == 40097


async def test_a_ticket_outlives_a_refetch_and_ends_at_its_own_expiry(sim, make_sidecar, http):
    sim.settings.ticket_ttl_s = 0.3
    sc = await make_sidecar()
    fetcher = ticket_fetcher(sc, "mp")
    first = await fetcher.fetch()
    assert first.value == (await fetcher.fetch()).value and sim.ticket_valid(first.value)
    base = sim.clock
    sim.clock = lambda: base() + 0.31                        # past the ticket's life
    second = await fetcher.fetch()
    assert second.value != first.value and not sim.ticket_valid(first.value) and sim.ticket_valid(second.value)


async def test_a_ticket_fetch_met_with_a_token_error_refreshes_the_token_once_and_retries(sim, make_sidecar):
    sc = await make_sidecar(token_api="client_credential")
    manager = sc.sidecar.managers["mp"]
    old = manager.current().value
    sim.rotate(APPID, "client_credential", grace_s=0)          # another system rotated the token
    fetches = sim.fetch_count()
    ticket = await ticket_fetcher(sc, "mp").fetch()
    assert sim.ticket_valid(ticket.value)
    assert manager.current().value != old and sim.fetch_count() == fetches + 1   # one token refresh


async def test_a_second_token_error_is_not_a_credential_fault_and_no_loop(sim, make_sidecar):
    sc = await make_sidecar(token_api="client_credential", min_refresh_interval_s=0)
    sim.settings.reject_all = True                               # every token is refused
    attempts = sim.attempt_count()
    with pytest.raises(FetchError) as info:
        await ticket_fetcher(sc, "mp").fetch()
    assert info.value.kind is FailureKind.TRANSIENT and info.value.errcode == 40001
    assert sim.attempt_count() - attempts == 1                  # one token refresh, then it stops


async def test_wecom_corp_and_agent_tickets(sim, make_sidecar):
    sim.corps[CORPID].append(f"{CORPSECRET}-agent2")
    sc = await make_sidecar(sidecar_yaml(sim.url, app=wecom_apps(sim.url)))
    corp = {name: await ticket_fetcher(sc, name, api="corp_jsapi_ticket", path="/cgi-bin/get_jsapi_ticket",
                                       query={}).fetch() for name in ("corp", "corp2")}
    agent = {name: await ticket_fetcher(sc, name, api="agent_config_ticket", path="/cgi-bin/ticket/get",
                                        query={"type": "agent_config"}).fetch() for name in ("corp", "corp2")}
    assert corp["corp"].value == corp["corp2"].value              # the corp ticket is the corp's
    assert agent["corp"].value != agent["corp2"].value            # an agent ticket is one application's
    assert sim.ticket_fetch_count("corp_jsapi") == 2 and sim.ticket_fetch_count("agent_config") == 2


async def test_wecom_ticket_fetches_are_limited_per_hour(sim, make_sidecar):
    sim.settings.wecom_agent_ticket_hourly_limit = 2
    sim.corps[CORPID].append(f"{CORPSECRET}-agent2")
    sc = await make_sidecar(sidecar_yaml(sim.url, app=wecom_apps(sim.url)))
    fetcher = ticket_fetcher(sc, "corp", api="agent_config_ticket", path="/cgi-bin/ticket/get",
                             query={"type": "agent_config"})
    await fetcher.fetch()
    await fetcher.fetch()
    with pytest.raises(FetchError) as info:
        await fetcher.fetch()
    assert info.value.errcode == 45009


# ---------------------------------------------------------------- served by the sidecar

async def getticket(http, base: str, kind: str = "jsapi", prefix: str = "") -> dict:
    async with http.get(f"{base}{prefix}/cgi-bin/ticket/getticket", params={"type": kind}) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_twenty_concurrent_asks_cost_one_ticket_fetch_and_none_while_it_is_valid(sim, make_sidecar, http):
    sc = await make_sidecar()
    answers = await asyncio.gather(*(getticket(http, sc.base) for _ in range(20)))
    assert len({a["ticket"] for a in answers}) == 1 and sim.ticket_fetch_count("jsapi") == 1
    assert all(a["errcode"] == 0 and 7100 < a["expires_in"] <= 7200 for a in answers)
    assert sim.ticket_valid(answers[0]["ticket"])
    again = await asyncio.gather(*(getticket(http, sc.base) for _ in range(5)))
    assert {a["ticket"] for a in again} == {answers[0]["ticket"]} and sim.ticket_fetch_count() == 1
    card = await getticket(http, sc.base, "wx_card")
    assert card["ticket"] != answers[0]["ticket"] and sim.ticket_fetch_count("wx_card") == 1
    assert sim.business_received == 0                       # answered by the sidecar, never forwarded


async def test_a_ticket_never_asked_for_is_never_fetched_and_other_types_are_forwarded(sim, make_sidecar, http):
    sc = await make_sidecar()
    async with http.get(f"{sc.base}/cgi-bin/user/info?openid=o") as resp:
        assert (await resp.json())["errcode"] == 0
    async with http.get(f"{sc.base}/cgi-bin/ticket/getticket", params={"type": "other"}) as resp:
        assert (await resp.json())["errcode"] == 40097         # WeChat's answer: it was forwarded
    assert sim.ticket_fetch_count() == 0
    assert sc.sidecar.managers["mp"].dependents == {}          # nothing made, no task, no timer


async def test_a_ticket_at_the_end_of_its_life_is_replaced_not_served_dead(sim, make_sidecar, http):
    sim.settings.ticket_ttl_s = 1.0
    sc = await make_sidecar()
    first = (await getticket(http, sc.base))["ticket"]
    token_manager = sc.sidecar.managers["mp"]

    def never_believed_longer_than_it_lives() -> bool:
        held = token_manager.credential("jsapi_ticket").current()   # asked for all along
        if held is not None:        # the simulator's clock is the same monotonic clock
            assert held.expires_at <= sim.ticket_values[held.value].expires_at + 0.05, "a dead ticket held as live"
        return held is not None and held.value != first

    await wait_until(never_believed_longer_than_it_lives, timeout=5)
    # refreshed ahead, WeChat handed back the same ticket until it ended; the one served now is alive
    served = (await getticket(http, sc.base))["ticket"]
    assert served != first and sim.ticket_valid(served)
    assert sim.ticket_fetch_count("jsapi") <= 12               # a few re-fetches near the end, no loop


async def test_wecom_apps_are_answered_their_corp_and_agent_tickets(sim, make_sidecar, http):
    sim.corps[CORPID].append(f"{CORPSECRET}-agent2")
    sc = await make_sidecar(sidecar_yaml(sim.url, app=wecom_apps(sim.url)))
    got = {}
    for name in ("corp", "corp2"):
        async with http.get(f"{sc.base}/{name}/cgi-bin/get_jsapi_ticket") as resp:
            got[name, "corp"] = (await resp.json())["ticket"]
        async with http.get(f"{sc.base}/{name}/cgi-bin/ticket/get", params={"type": "agent_config"}) as resp:
            got[name, "agent"] = (await resp.json())["ticket"]
    assert got["corp", "corp"] == got["corp2", "corp"] and got["corp", "agent"] != got["corp2", "agent"]
    assert sim.ticket_fetch_count("corp_jsapi") == 1           # one corp ticket, shared through the store
    assert sim.ticket_fetch_count("agent_config") == 2
    async with http.get(f"{sc.base}/corp/cgi-bin/ticket/getticket", params={"type": "jsapi"}) as resp:
        assert resp.status == 200
    assert sim.ticket_fetch_count("jsapi") == 1                 # not a WeCom ticket path: forwarded as a call


# ---------------------------------------------------------------- /sidecar/jssdk

def expected_signature(ticket: str, answer: dict, url: str) -> str:
    text = f"jsapi_ticket={ticket}&noncestr={answer['nonceStr']}&timestamp={answer['timestamp']}&url={url}"
    return hashlib.sha1(text.encode()).hexdigest()


async def test_jssdk_signs_the_page_url_without_its_fragment_with_the_jsapi_ticket(sim, make_sidecar, http):
    sc = await make_sidecar()
    page = "https://shop.example.com/item?id=7&from=share"
    async with http.get(f"{sc.base}/sidecar/jssdk", params={"url": page + "#section-2"}) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert set(answer) == {"appId", "timestamp", "nonceStr", "signature"} and answer["appId"] == APPID
    ticket = sim.tickets[f"jsapi:{APPID}"].value                 # the simulator's ticket, never shown to the app
    assert answer["signature"] == expected_signature(ticket, answer, page)
    assert abs(answer["timestamp"] - time.time()) < 5 and sim.ticket_fetch_count() == 1
    async with http.get(f"{sc.base}/sidecar/jssdk", params={"url": page}) as resp:
        other = await resp.json()
    assert other["nonceStr"] != answer["nonceStr"] and sim.ticket_fetch_count() == 1


@pytest.mark.parametrize("query", [
    {}, {"url": ""}, {"url": "ftp://example.com/a"}, {"url": "example.com/page"}, {"url": "https:///path"},
    {"url": "https://example.com/" + "a" * 4100}, {"url": "https://example.com/", "kind": "other"},
    {"url": "https://example.com/", "kind": "agent"},            # not a WeCom app
])
async def test_jssdk_refuses_a_bad_url_with_a_sidecar_error_and_fetches_nothing(sim, make_sidecar, http, query):
    sc = await make_sidecar()
    async with http.get(f"{sc.base}/sidecar/jssdk", params=query) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["errcode"] == -1 and body["errmsg"].startswith("sidecar: ")
    assert sim.ticket_fetch_count() == 0


async def test_jssdk_for_wecom_signs_with_the_corp_ticket_and_with_kind_agent_the_agent_ticket(sim, make_sidecar, http):
    apps = f"""
- {{name: corp, appid: {CORPID}, secret: "{CORPSECRET}", token_api: wecom, upstream: {sim.url}, agentid: 1000002}}
- {{name: plain, appid: {CORPID}, secret: "{CORPSECRET}", token_api: wecom, upstream: {sim.url}}}
"""
    sc = await make_sidecar(sidecar_yaml(sim.url, app=apps))
    page = "https://work.example.com/app"
    async with http.get(f"{sc.base}/corp/sidecar/jssdk", params={"url": page}) as resp:
        corp = await resp.json()
    assert corp["appId"] == CORPID
    assert corp["signature"] == expected_signature(sim.tickets[f"corp_jsapi:{CORPID}"].value, corp, page)
    async with http.get(f"{sc.base}/corp/sidecar/jssdk", params={"url": page, "kind": "agent"}) as resp:
        agent = await resp.json()
    assert set(agent) == {"corpid", "agentid", "timestamp", "nonceStr", "signature"}
    assert agent["corpid"] == CORPID and agent["agentid"] == "1000002"
    agent_ticket = next(t.value for k, t in sim.tickets.items() if k.startswith("agent_config:"))
    assert agent["signature"] == expected_signature(agent_ticket, agent, page)
    async with http.get(f"{sc.base}/plain/sidecar/jssdk", params={"url": page, "kind": "agent"}) as resp:
        assert resp.status == 400 and "no agentid" in (await resp.json())["errmsg"]


def test_agentid_is_for_wecom_apps_and_is_a_number():
    from proxy.config import ConfigError, parse
    base = "apps:\n  - {name: a, appid: wx1, secret: s, token_api: %s, agentid: %s}\n"
    assert parse(base % ("wecom", "1000002"), "<t>", env={}).apps[0].agentid == "1000002"
    with pytest.raises(ConfigError, match="agentid.*only WeCom apps"):
        parse(base % ("stable", "1000002"), "<t>", env={})
    with pytest.raises(ConfigError, match="agentid.*must be the application's number"):
        parse(base % ("wecom", "abc"), "<t>", env={})


# ---------------------------------------------------------------- operators

async def test_admin_refresh_of_one_ticket_is_one_fetch_and_apps_show_tickets_but_never_one(
        sim, make_sidecar, http, caplog):
    sc = await make_sidecar()
    ticket = (await getticket(http, sc.base))["ticket"]
    sim.settings.ticket_ttl_s = 7200
    sim.tickets.clear()                              # WeChat would hand out a new ticket now
    before = sim.ticket_fetch_count("jsapi")
    await past_coalescing()
    async with http.post(f"{sc.admin}/admin/refresh", params={"app": "mp", "credential": "jsapi_ticket"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["credential"] == "jsapi_ticket" and body["refreshed"] is True
    assert sim.ticket_fetch_count("jsapi") == before + 1
    assert (await getticket(http, sc.base))["ticket"] != ticket
    async with http.post(f"{sc.admin}/admin/refresh", params={"app": "mp", "credential": "agent_config_ticket"}) as resp:
        assert resp.status == 400 and "jsapi_ticket" in (await resp.json())["errmsg"]
    async with http.get(f"{sc.admin}/admin/apps") as resp:
        text = await resp.text()
    app = json_loads(text)["apps"][0]
    assert set(app["credentials"]) == {"jsapi_ticket"} and app["credentials"]["jsapi_ticket"]["fetches_ok"] == 2
    async with http.get(f"{sc.admin}/metrics") as resp:
        metrics = await resp.text()
    assert 'wts_token_fetches_total{api="jsapi_ticket",app="mp",result="ok"} 2.0' in metrics
    current = sc.sidecar.managers["mp"].credential("jsapi_ticket").current().value
    for value in (ticket, current):                  # no ticket in the admin answers, the metrics or the logs
        assert value not in text and value not in metrics and value not in caplog.text


async def test_jssdk_answers_get_only_and_is_never_forwarded(sim, make_sidecar, http):
    sc = await make_sidecar()
    async with http.post(f"{sc.base}/sidecar/jssdk?url=https%3A%2F%2Fa.example%2F", data=b"{}") as resp:
        assert resp.status == 405 and (await resp.json())["errmsg"].startswith("sidecar: ")
    assert sim.business_received == 0 and sim.ticket_fetch_count() == 0


async def test_a_ticket_nobody_asks_for_any_more_is_left_to_end_and_costs_no_task(sim, make_sidecar, http):
    sim.settings.ticket_ttl_s = 0.6
    sc = await make_sidecar()
    first = (await getticket(http, sc.base))["ticket"]
    manager = sc.sidecar.managers["mp"].dependents["jsapi_ticket"]
    assert manager._runner is None and manager._inflight is None      # no task, no timer, while held
    fetches = sim.ticket_fetch_count("jsapi")
    await wait_until(lambda: not sim.ticket_valid(first), timeout=3)
    assert sim.ticket_fetch_count("jsapi") == fetches and manager._runner is None   # nothing planned, none made
    served = (await getticket(http, sc.base))["ticket"]            # asked again: fetched anew, alive
    assert sim.ticket_valid(served) and served != first


async def test_admin_refresh_of_a_ticket_never_asked_for_is_its_one_first_fetch(sim, make_sidecar, http):
    sc = await make_sidecar()
    async with http.post(f"{sc.admin}/admin/refresh", params={"app": "mp", "credential": "wx_card_ticket"}) as resp:
        assert resp.status == 200 and (await resp.json())["refreshed"] is True
    assert sim.ticket_fetch_count("wx_card") == 1
