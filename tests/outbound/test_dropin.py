"""Drop-in use: unmodified SDK-style clients, every account kind, several apps
in one sidecar, apps that never hold the secret, and paths that must never
get the app token."""
from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from proxy.outbound.forward import NO_TOKEN_TABLE

from ..conftest import APPID, APPID2, CORPID, CORPSECRET, SECRET, mini_app_yaml, sidecar_yaml

TOKEN_ERRORS = (40001, 40014, 42001)


class SdkStyleClient:
    """What wechatpy / silenceper-style SDKs do: fetch a token from
    {base}/cgi-bin/token, cache it, add it to every call themselves, and on a
    token error fetch a new one and retry once. Pointed at the sidecar with a
    placeholder appid/secret, it needs no change."""

    def __init__(self, http: aiohttp.ClientSession, base: str):
        self.http, self.base = http, base
        self.token: str | None = None
        self.token_fetches = 0

    async def fetch_token(self) -> str:
        self.token_fetches += 1
        async with self.http.get(f"{self.base}/cgi-bin/token", params={
                "grant_type": "client_credential", "appid": "placeholder", "secret": "placeholder"}) as r:
            data = await r.json()
        self.token = data["access_token"]
        return self.token

    async def call(self, path: str, **params: str) -> dict:
        for attempt in range(2):
            token = self.token or await self.fetch_token()
            async with self.http.get(f"{self.base}{path}", params={**params, "access_token": token}) as r:
                data = await r.json()
            if data.get("errcode") in TOKEN_ERRORS and attempt == 0:
                self.token = None
                continue
            return data
        return data


async def test_an_sdk_that_fetches_its_own_token_works_and_costs_no_upstream_fetch(sim, make_sidecar, http):
    sc = await make_sidecar()
    sdk = SdkStyleClient(http, sc.base)
    attempts = sim.attempt_count()
    for i in range(5):
        assert (await sdk.call("/cgi-bin/user/info", openid=f"o{i}"))["errcode"] == 0
    assert sdk.token_fetches == 1
    assert sdk.token == sc.sidecar.managers["mp"].current().value      # the shared token
    assert sim.attempt_count() == attempts                               # WeChat saw no fetch
    sim.rotate(APPID, "stable", grace_s=0)                               # someone else rotates
    assert (await sdk.call("/cgi-bin/user/info", openid="o"))["errcode"] == 0
    assert sdk.token_fetches == 1                                        # the SDK never saw 40001
    assert sim.attempt_count() == attempts + 1                           # only the sidecar refetched


async def test_an_sdks_force_refresh_is_answered_with_the_held_token_and_costs_no_fetch(sim, make_sidecar, http):
    """node-easywechat's getStableAccessToken(true) in a loop: no evidence the
    token is bad, so no fetch (at most one per 30 s behind the answer)."""
    sc = await make_sidecar(token_api="client_credential")
    old = sc.sidecar.managers["mp"].current().value

    async def force() -> dict:
        async with http.post(f"{sc.base}/cgi-bin/stable_token", json={
                "grant_type": "client_credential", "appid": "x", "secret": "y", "force_refresh": True}) as r:
            return await r.json()

    answers = await asyncio.gather(*(force() for _ in range(8)))   # eight at once
    for _ in range(12):                                            # and a loop for 3 s, as a buggy SDK does
        answers.append(await force())
        await asyncio.sleep(0.25)
    assert {a["access_token"] for a in answers} == {old}
    assert sim.fetch_count() == 1                                  # the start-up fetch only
    assert all(set(a) == {"access_token", "expires_in"} for a in answers)
    assert sim.force_count == {}                                   # never WeChat's force mode


async def test_an_sdks_force_refresh_after_the_token_was_seen_rejected_waits_for_the_new_one(
        sim, make_sidecar, http):
    sc = await make_sidecar(token_api="client_credential")
    manager = sc.sidecar.managers["mp"]
    old = manager.current().value
    sim.settings.token_fault = "http500"
    sim.rotate(APPID, "client_credential")                        # another system took the token
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:  # a call sees it rejected; WeChat is down
        assert resp.status == 503
    sim.settings.token_fault = ""                                  # WeChat is back
    async with http.post(f"{sc.base}/cgi-bin/stable_token", json={
            "grant_type": "client_credential", "appid": "x", "secret": "y", "force_refresh": True}) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["access_token"] != old and answer["access_token"] == manager.current().value


async def test_force_refresh_past_the_spacing_is_answered_at_once_with_the_valid_token(sim, make_sidecar, http):
    sc = await make_sidecar(token_api="client_credential", min_refresh_interval_s=600)
    manager = sc.sidecar.managers["mp"]
    token = manager.current()
    await manager.invalidate(token.value)          # a forced refresh: the next waits 600 s
    current = manager.current().value
    await asyncio.sleep(2.1)
    fetches = sim.fetch_count()
    started = asyncio.get_running_loop().time()
    async with http.post(f"{sc.base}/cgi-bin/stable_token", json={
            "grant_type": "client_credential", "appid": "x", "secret": "y", "force_refresh": True}) as r:
        answer = await r.json()
    assert asyncio.get_running_loop().time() - started < 0.5
    assert answer["access_token"] == current and answer["expires_in"] > 7000
    assert sim.fetch_count() == fetches


@pytest.mark.parametrize("api", ["client_credential", "stable"])
async def test_each_wechat_account_kind_works_against_the_simulator(sim, make_sidecar, http, api):
    sc = await make_sidecar(token_api=api)
    assert sim.fetch_count(api=api) == 1
    sim.rotate(APPID, api, grace_s=0)
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert (await resp.json())["errcode"] == 0
    assert sim.fetch_count(api=api) == 2


def wecom_apps(sim_url: str) -> str:
    return f"""
- name: corp
  appid: {CORPID}
  secret: "{CORPSECRET}"
  token_api: wecom
  upstream: {sim_url}
- name: corp2
  appid: {CORPID}
  secret: "{CORPSECRET}-agent2"
  token_api: wecom
  upstream: {sim_url}
"""


async def test_wecom_gettoken_and_its_own_errcodes(sim, make_sidecar, http):
    sim.corps[CORPID].append(f"{CORPSECRET}-agent2")
    sim.settings.wecom_errors = True
    sc = await make_sidecar(sidecar_yaml(sim.url, app=wecom_apps(sim.url)))
    corp, corp2 = (sc.sidecar.managers[n].current().value for n in ("corp", "corp2"))
    assert corp != corp2                                   # one token per agent secret, same corpid
    async with http.get(f"{sc.base}/corp/cgi-bin/gettoken?corpid=x&corpsecret=y") as resp:
        answer = await resp.json()
    assert answer["errcode"] == 0 and answer["errmsg"] == "ok" and answer["access_token"] == corp
    sim.rotate(CORPID, key=sim.wecom_key(CORPID, CORPSECRET), grace_s=0)
    async with http.get(f"{sc.base}/corp/cgi-bin/user/get?userid=u1") as resp:
        echo = await resp.json()
    assert echo["errcode"] == 0 and echo["access_token"] != [corp]
    assert [c["errcode"] for c in list(sim.calls)[-2:]] == [40014, 0]   # WeCom's bad-token code, replayed
    async with http.get(f"{sc.base}/corp2/cgi-bin/user/get?userid=u1") as resp:
        assert (await resp.json())["access_token"] == [corp2]


async def test_wecom_bad_secret_40001_is_a_credential_error(sim, make_sidecar, http):
    text = sidecar_yaml(sim.url, app=f"""
- name: corp
  appid: {CORPID}
  secret: wrong
  token_api: wecom
  upstream: {sim.url}
""")
    sc = await make_sidecar(text, wait_ready=False)
    await asyncio.sleep(0.3)
    async with http.get(f"{sc.base}/corp/cgi-bin/user/get") as resp:
        assert resp.status == 503
        assert "40001: wecom: invalid secret" in (await resp.json())["errmsg"]
    assert sc.sidecar.managers["corp"].state.last_failure.kind.value == "credential"


async def test_two_apps_never_mix_tokens_under_concurrent_load(sim, make_sidecar, http):
    sc = await make_sidecar(sidecar_yaml(sim.url, app=mini_app_yaml()))

    async def call(i: int) -> tuple[str, str]:
        app = ("mp", "mini")[i % 2]
        url = f"{sc.base}/{app}/cgi-bin/user/info" if i % 4 < 2 else f"{sc.base}/cgi-bin/user/info"
        async with http.get(url, headers={"X-WeChat-App": app}) as resp:
            return app, (await resp.json())["access_token"][0]

    results = await asyncio.gather(*(call(i) for i in range(300)))
    for app, token in results:
        issued = sim.tokens[token]
        assert issued.key == (f"stable:{APPID}" if app == "mp" else f"client_credential:{APPID2}")
    async with http.get(f"{sc.admin}/admin/apps") as resp:
        assert [a["name"] for a in (await resp.json())["apps"]] == ["mp", "mini"]


async def test_inject_secret_fills_in_appid_and_secret_and_never_shows_them(sim, make_sidecar, http, caplog):
    caplog.set_level(logging.DEBUG)
    sc = await make_sidecar(app_extra="inject_secret: true\n")
    async with http.get(f"{sc.base}/sns/jscode2session?js_code=CODE1&grant_type=authorization_code") as resp:
        text_answer = await resp.text()
        answer = await resp.json()
    assert "openid" in answer and "session_key" in answer
    assert sim.calls[-1]["query"].count("secret=") == 1
    async with http.get(f"{sc.base}/sns/oauth2/refresh_token?grant_type=refresh_token&refresh_token=R") as resp:
        assert "access_token" in await resp.json()
    async with http.post(f"{sc.base}/cgi-bin/clear_quota/v2") as resp:
        assert (await resp.json())["errcode"] == 0
    # a caller that sends its own appid keeps it
    async with http.get(f"{sc.base}/sns/jscode2session?appid=wxOTHER&js_code=C") as resp:
        assert (await resp.json())["errcode"] == 40013
    logged = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert SECRET not in text_answer and SECRET not in logged


async def test_without_inject_secret_the_caller_gets_wechats_own_error(sim, make_sidecar, http):
    sc = await make_sidecar()
    async with http.get(f"{sc.base}/sns/jscode2session?js_code=CODE1&grant_type=authorization_code") as resp:
        assert (await resp.json())["errcode"] == 41002
    assert "secret" not in sim.calls[-1]["query"]


@pytest.mark.parametrize("prefix", list(NO_TOKEN_TABLE) + ["/custom/own-token/"])
async def test_no_token_paths_keep_the_callers_credentials(sim, make_sidecar, http, prefix):
    sc = await make_sidecar(top='no_token_paths: ["/custom/own-token/"]')
    path = prefix + ("x" if prefix.endswith("/") else "")
    async with http.get(f"{sc.base}{path}?access_token=CALLER_TOKEN&appid={APPID}") as resp:
        assert resp.status == 200
    call = sim.calls[-1]
    assert call["path"] == path and call["access_token"] == ["CALLER_TOKEN"]
