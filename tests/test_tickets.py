"""Tickets, the first step: the simulator's ticket endpoints follow WeChat's
rules, and a ticket fetch rides on the app's managed token (a token error
invalidates that token, refreshes it once and retries once)."""
from __future__ import annotations

import pytest

from proxy.tokens import FailureKind, FetchError
from proxy.tokens.fetchers import TicketFetcher

from .conftest import APPID, CORPID, CORPSECRET, sidecar_yaml
from .test_dropin import wecom_apps


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
