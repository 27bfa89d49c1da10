"""The token endpoint failing in every way wechat-api-notes.md and the network
allow: a still-valid token keeps serving, fetches stay bounded, readiness
and logs say what is wrong, and recovery is quick once WeChat is back."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from proxy.config import App
from proxy.credentials import FailureKind, FetchError, make_fetcher
from proxy.simulator import WeChatSimulator

from .conftest import APPID, SECRET, free_port, past_coalescing, sidecar_yaml

FAULTS = {
    "http500": "HTTP 500",
    "busy": "-1: stable: system error",
    "garbage": "not JSON",
    "html": "not JSON",
    "empty": "not JSON",
    "no_token": "no usable access_token",
    "absurd_expires": "absurd expires_in",
    "timeout": "timed out",
    "errcode:40164": "40164: stable: invalid ip 203.0.113.7",
    "errcode:45011": "45011",
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_failing_token_endpoint_never_costs_a_valid_token(sim, make_sidecar, http, fault):
    text = sidecar_yaml(sim.url).replace("timeout_s: 5", "timeout_s: 0.5")
    sc = await make_sidecar(text)
    if fault == "timeout":
        sim.settings.token_latency_s = 1.5
    else:
        sim.settings.token_fault = fault
    attempts = sim.attempt_count()
    await past_coalescing()
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 503
        err = (await resp.json())["errmsg"]
    assert FAULTS[fault] in err and "still served" in err
    for _ in range(10):
        async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
            assert resp.status == 200 and (await resp.json())["errcode"] == 0
    async with http.get(f"{sc.admin}/readyz") as resp:
        ready = await resp.json()
    assert resp.status == 200 and FAULTS[fault] in ready["warnings"]["mp"]
    assert sim.attempt_count() - attempts == 1           # no retry storm while the token is valid:
    async with http.get(f"{sc.admin}/admin/apps") as resp:
        planned = (await resp.json())["apps"][0]["next_retry_in_s"]
    assert planned is not None and planned >= 0.2, planned   # the next try is planned, and not at once
    # WeChat is back: the next attempt succeeds at once
    sim.settings.token_fault, sim.settings.token_latency_s = "", 0.0
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 200
    async with http.get(f"{sc.admin}/readyz") as resp:
        assert "warnings" not in await resp.json()


async def test_connection_refused_is_a_transient_failure_with_the_address():
    port = free_port()
    app = App(name="mp", appid=APPID, secret="s", token_api="stable", refresh_before_s=240,
              upstream=f"http://127.0.0.1:{port}", min_refresh_interval_s=0)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchError) as info:
            await make_fetcher(app, session, 1.0).fetch()
    assert info.value.kind is FailureKind.TRANSIENT
    assert f"cannot connect to 127.0.0.1:{port}" in info.value.message
    assert "secret" not in info.value.message


async def test_failures_when_the_token_is_due_back_off_and_recover_within_a_second(sim, make_sidecar, http):
    sim.settings.ttl_s = 4.0
    sim.settings.stable_window_s = 3.0
    sc = await make_sidecar(refresh_before_s=2.5)          # due 2 s after each fetch
    manager = sc.sidecar.managers["mp"]
    manager.rng = lambda: 0.0                             # backoff 0.5 s, 1 s, 2 s ...
    sim.settings.token_fault = "busy"
    attempts = sim.attempt_count()
    await asyncio.sleep(3.2)                              # due at 2 s: tries at 2, 2.5, 3.5 ...
    tried = sim.attempt_count() - attempts
    assert 2 <= tried <= 3, tried                         # backing off, not hammering
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200                          # the old token still serves
    sim.settings.token_fault = ""
    fixed_at = asyncio.get_running_loop().time()
    while manager.state.failures and asyncio.get_running_loop().time() - fixed_at < 3:
        await asyncio.sleep(0.05)
    assert manager.state.failures == 0
    recovered_in = asyncio.get_running_loop().time() - fixed_at
    next_try = 2.0                                        # the longest backoff step reached here
    assert recovered_in <= next_try + 1.0, recovered_in


async def test_quota_exhaustion_stops_fetching_until_an_operator_refreshes(sim, make_sidecar, http):
    sc = await make_sidecar(token_api="client_credential")
    sim.settings.token_fault = "errcode:45009"
    sim.rotate(APPID, "client_credential", grace_s=0)     # the token dies: a fetch is needed
    attempts = sim.attempt_count()
    for _ in range(5):
        async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
            assert resp.status == 503
            assert "45009" in (await resp.json())["errmsg"]
    assert sim.attempt_count() - attempts == 1            # one try, then it stops: no loop
    async with http.get(f"{sc.admin}/admin/apps") as resp:
        planned = (await resp.json())["apps"][0]["next_retry_in_s"]
    assert planned >= 3600, planned                       # not before the quota resets
    async with http.get(f"{sc.admin}/readyz") as resp:
        assert resp.status == 503 and "45009" in await resp.text()
    async with http.get(f"{sc.admin}/metrics") as resp:
        assert 'wts_token_fetches_total{api="client_credential",app="mp",result="quota"} 1.0' in await resp.text()
    sim.settings.token_fault = ""                         # quota reset (clear_quota) by the operator
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 200
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200


async def test_business_upstream_connect_errors_are_502_and_never_replayed(make_sidecar, http):
    own = WeChatSimulator(accounts={APPID: SECRET})
    runner = web.AppRunner(own.app(), access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    sc = await make_sidecar(sidecar_yaml(f"http://127.0.0.1:{runner.addresses[0][1]}"))
    await runner.cleanup()                                # WeChat becomes unreachable
    async with http.post(f"{sc.base}/cgi-bin/message/custom/send", data=b"{}") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["errcode"] == -1 and "cannot connect to upstream" in body["errmsg"]
    manager = sc.sidecar.managers["mp"]
    assert manager.refreshes.get("errcode", 0) == 0 and manager.current() is not None
