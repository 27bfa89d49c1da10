"""The proxy port as an app sees it: real sockets, real HTTP, the simulator as WeChat."""
from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
import pytest
from yarl import URL

from proxy.credentials import TokenUnavailable

from ..conftest import APPID, APPID2, SECRET2, free_port, mini_app_yaml, past_coalescing, sidecar_yaml, wait_until


def last_call(sim):
    return sim.calls[-1]


# ---------------------------------------------------------------- injection

async def test_token_is_injected_and_a_client_token_replaced(sim, make_sidecar, http):
    sc = await make_sidecar()
    current = sc.sidecar.managers["mp"].current().value
    async with http.get(f"{sc.base}/cgi-bin/user/info?openid=O1&access_token=APP_SENT&lang=zh_CN") as resp:
        assert resp.status == 200
        echo = await resp.json()
    assert echo["access_token"] == [current]
    assert "APP_SENT" not in echo["query"]
    assert echo["query"] == f"openid=O1&lang=zh_CN&access_token={current}"


async def test_query_headers_and_body_reach_upstream_byte_identical(sim, make_sidecar, http):
    sc = await make_sidecar()
    body = "{\"touser\":\"o\u00e9\",\"text\":{\"content\":\"\u4f60\u597d &=?\"}}".encode()
    query = "b=2&a=%E4%BD%A0&empty=&flag&a=dup&x=%2F%20"
    headers = {"Content-Type": "application/json; charset=utf-8", "X-Custom": "v1",
               "User-Agent": "my-sdk/1.0", "X-WeChat-App": "mp"}
    url = URL(f"{sc.base}/cgi-bin/message/custom/send?{query}", encoded=True)
    async with http.post(url, data=body, headers=headers) as resp:
        echo = await resp.json()
    token = sc.sidecar.managers["mp"].current().value
    assert echo["query"] == f"{query}&access_token={token}"
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["headers"]["X-Custom"] == "v1"
    assert echo["headers"]["User-Agent"] == "my-sdk/1.0"
    assert echo["headers"]["Content-Type"] == "application/json; charset=utf-8"
    assert "X-WeChat-App" not in echo["headers"]          # ours, not WeChat's


async def test_upstream_headers_come_back_including_set_cookie(sim, make_sidecar, http):
    sc = await make_sidecar()
    async with http.get(f"{sc.base}/cgi-bin/media/get?media_id=M9&size=100") as resp:
        assert resp.headers["Content-Disposition"] == 'attachment; filename="M9.jpg"'
        assert resp.headers["Content-Type"] == "image/jpeg"


async def test_sns_calls_get_no_app_token(sim, make_sidecar, http):
    sc = await make_sidecar()
    url = f"{sc.base}/sns/userinfo?access_token=USER_OAUTH_TOKEN&openid=O1"
    async with http.get(url) as resp:
        echo = await resp.json()
    assert echo["access_token"] == ["USER_OAUTH_TOKEN"]
    async with http.get(f"{sc.base}/sns/jscode2session?appid={APPID}&js_code=C&grant_type=authorization_code") as resp:
        assert resp.status == 200
    assert sim.calls[-1]["path"] == "/sns/jscode2session" and sim.calls[-1]["access_token"] == []


# ---------------------------------------------------------------- routing

async def test_app_is_chosen_by_prefix_then_header_then_default(sim, make_sidecar, http):
    sc = await make_sidecar(sidecar_yaml(sim.url, app=mini_app_yaml()))
    t_mp = sc.sidecar.managers["mp"].current().value
    t_mini = sc.sidecar.managers["mini"].current().value
    assert t_mp != t_mini
    async with http.get(f"{sc.base}/mini/cgi-bin/user/info") as resp:
        echo = await resp.json()
        assert (echo["path"], echo["access_token"]) == ("/cgi-bin/user/info", [t_mini])
    async with http.get(f"{sc.base}/cgi-bin/user/info", headers={"X-WeChat-App": "mini"}) as resp:
        assert (await resp.json())["access_token"] == [t_mini]
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert (await resp.json())["access_token"] == [t_mp]
    async with http.get(f"{sc.base}/cgi-bin/user/info", headers={"X-WeChat-App": "nope"}) as resp:
        assert resp.status == 400
        err = await resp.json()
        assert err["errcode"] == -1 and "unknown app 'nope'" in err["errmsg"]


# ---------------------------------------------------------------- replay

async def test_rotated_token_is_refreshed_once_and_the_call_replayed_once(sim, make_sidecar, http):
    sc = await make_sidecar()
    assert sim.fetch_count() == 1
    sim.rotate(APPID, "stable", grace_s=0)
    calls_before = sim.business_calls
    async with http.post(f"{sc.base}/cgi-bin/message/custom/send", data=b'{"x":1}') as resp:
        assert resp.status == 200
        echo = await resp.json()
    assert echo["errcode"] == 0
    assert sim.fetch_count() == 2                     # exactly one extra fetch
    assert sim.business_calls - calls_before == 2     # the call and its one replay
    assert sim.calls[-2]["errcode"] == 40001 and sim.calls[-1]["errcode"] == 0
    assert sim.calls[-2]["body_sha256"] == sim.calls[-1]["body_sha256"]


async def test_200_concurrent_calls_after_invalidation_cause_one_fetch(sim, make_sidecar, http):
    sc = await make_sidecar()
    sim.rotate(APPID, "stable", grace_s=0)
    before = sim.fetch_count()

    async def call(i: int) -> int:
        async with http.get(f"{sc.base}/cgi-bin/user/info?openid=O{i}") as resp:
            body = await resp.json()
            return body["errcode"] if resp.status == 200 else -resp.status

    results = await asyncio.gather(*(call(i) for i in range(200)))
    assert results == [0] * 200
    assert sim.fetch_count() - before == 1


async def test_second_token_failure_becomes_a_sidecar_503(sim, make_sidecar, http):
    sc = await make_sidecar(token_api="client_credential")
    sim.settings.reject_all = True
    before_calls, before_fetch = sim.business_calls, sim.fetch_count()
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 503
        assert resp.headers["X-Sidecar-Upstream-Errcode"] == "40001"
        body = await resp.json()
    assert body["errcode"] == -1
    assert body["errmsg"].startswith("sidecar: token rejected after refresh (40001: invalid credential")
    assert sim.business_calls - before_calls == 2      # exactly one replay
    assert sim.fetch_count() - before_fetch == 1


async def test_second_token_failure_passes_through_when_configured(sim, make_sidecar, http):
    sc = await make_sidecar(top="pass_token_errors: true", token_api="client_credential")
    sim.settings.reject_all = True
    before_calls = sim.business_calls
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200
        assert (await resp.json())["errcode"] == 40001
        assert "X-Sidecar-Upstream-Errcode" not in resp.headers
    assert sim.business_calls - before_calls == 2


@pytest.mark.parametrize("ctype", ["text/plain", "application/json; encoding=utf-8"])
async def test_token_error_on_a_binary_endpoint_is_replayed(sim, make_sidecar, http, ctype):
    sc = await make_sidecar()
    sim.settings.error_content_type = ctype
    sim.rotate(APPID, "stable", grace_s=0)
    async with http.post(f"{sc.base}/wxa/getwxacodeunlimit", data=b'{"scene":"a=1"}') as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/jpeg"
        image = await resp.read()
    assert image.startswith(b"\xff\xd8")
    assert [c["errcode"] for c in list(sim.calls)[-2:]] == [40001, 0]


async def test_multipart_upload_is_replayed_with_identical_bytes(sim, make_sidecar, http):
    sc = await make_sidecar()
    sim.rotate(APPID, "stable", grace_s=0)
    payload = bytes(range(256)) * 4096  # 1 MiB
    form = aiohttp.FormData()
    form.add_field("media", payload, filename="pic.jpg", content_type="image/jpeg")
    async with http.post(f"{sc.base}/cgi-bin/media/upload?type=image", data=form) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["type"] == "image" and answer["media_id"].startswith("MEDIA_")
    first, second = list(sim.calls)[-2:]
    assert (first["errcode"], second["errcode"]) == (40001, 0)
    assert first["body_sha256"] == second["body_sha256"]
    assert first["body_len"] == second["body_len"] > len(payload)


async def test_stable_token_handed_back_after_rejection_is_forced_once(sim, make_sidecar, http):
    sc = await make_sidecar()
    sim.settings.reject_all = True   # WeChat refuses a token that stable_token still returns
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 503
    assert sim.force_count == {f"stable:{APPID}": 1}
    sim.settings.reject_all = False
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200
    sim.settings.reject_all = True
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 503
    assert sim.force_count == {f"stable:{APPID}": 1}   # force calls stay 30 s apart


async def test_a_call_holding_an_already_replaced_token_causes_no_fetch(sim, make_sidecar):
    sc = await make_sidecar()
    manager = sc.sidecar.managers["mp"]
    old = manager.current().value
    sim.rotate(APPID, "stable", grace_s=0)
    new = await manager.invalidate(old)
    fetches = sim.fetch_count()
    again = await manager.invalidate(old)   # a late caller with the old token
    assert again.value == new.value != old
    assert sim.fetch_count() == fetches


# ---------------------------------------------------------------- refresh ahead

@pytest.mark.parametrize("api", ["stable", "client_credential"])
async def test_proactive_refresh_with_short_ttl_fails_no_call(sim, make_sidecar, http, api):
    sim.settings.ttl_s = 2.0
    sim.settings.stable_window_s = 1.5
    sim.settings.grace_s = 0.8       # the old token dies soon after a re-fetch
    sc = await make_sidecar(token_api=api, refresh_before_s=1.0)
    loop = asyncio.get_running_loop()
    end = loop.time() + 6.0
    failures, calls = [], 0
    while loop.time() < end:
        async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
            body = await resp.json()
            calls += 1
            if resp.status != 200 or body.get("errcode") != 0:
                failures.append((resp.status, body))
        await asyncio.sleep(0.01)
    assert failures == []
    assert calls > 100
    # every ~1 s a new token: several cycles, none of them reactive
    assert sim.fetch_count(api=api) >= 5
    assert sc.sidecar.managers["mp"].refreshes.get("errcode", 0) == 0


# ---------------------------------------------------------------- token endpoint failures

async def test_token_endpoint_down_while_token_valid_keeps_calls_working(sim, make_sidecar, http):
    sc = await make_sidecar()
    sim.settings.token_fault = "http500"
    manager = sc.sidecar.managers["mp"]
    await past_coalescing()
    with pytest.raises(TokenUnavailable, match="HTTP 500"):
        await manager.refresh_now()
    for _ in range(5):
        async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
            assert resp.status == 200 and (await resp.json())["errcode"] == 0
    async with http.get(f"{sc.admin}/readyz") as resp:
        assert resp.status == 200


async def test_bad_secret_gives_a_clear_error_bounded_fetches_and_a_live_process(sim, make_sidecar, http):
    sc = await make_sidecar(secret="wrong-secret", wait_ready=False)
    await wait_until(lambda: sc.sidecar.managers["mp"].state.last_failure is not None)
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 503
        err = await resp.json()
    assert err["errcode"] == -1
    assert "40125" in err["errmsg"] and "invalid appsecret" in err["errmsg"]
    for _ in range(20):
        async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
            assert resp.status == 503
    assert sim.attempt_count() == 1            # credential errors are not hammered
    async with http.get(f"{sc.admin}/readyz") as resp:
        assert resp.status == 503
        assert "40125" in json.dumps(await resp.json())
    async with http.get(f"{sc.admin}/healthz") as resp:
        assert resp.status == 200


# ---------------------------------------------------------------- upstream failures, limits

async def test_upstream_unreachable_is_a_json_502(sim, make_sidecar, http):
    dead_port = free_port()
    sc = await make_sidecar(sidecar_yaml(sim.url, app=f"""
        - name: gone
          appid: {APPID2}
          secret: "{SECRET2}"
          token_api: stable
          upstream: http://127.0.0.1:{dead_port}
        """), wait_ready=False)
    # `gone` has no token (its upstream is down): a 503 naming why, not a trace
    async with http.get(f"{sc.base}/gone/cgi-bin/user/info") as resp:
        assert resp.status == 503
        assert "cannot connect" in (await resp.json())["errmsg"]
    # /sns/ needs no token, so it reaches for the dead upstream: 502
    async with http.get(f"{sc.base}/gone/sns/auth?access_token=u") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["errcode"] == -1 and body["errmsg"].startswith("sidecar: cannot connect to upstream")


async def test_upstream_timeout_is_a_json_504_and_not_replayed(sim, make_sidecar, http):
    text = sidecar_yaml(sim.url).replace("timeout_s: 5", "timeout_s: 0.3")
    sc = await make_sidecar(text)
    sim.settings.latency_s = 1.0
    before = sim.business_received
    started = asyncio.get_running_loop().time()
    async with http.post(f"{sc.base}/cgi-bin/message/custom/send", data=b"{}") as resp:
        assert resp.status == 504
        assert (await resp.json())["errmsg"].startswith("sidecar: upstream timed out")
    # a replay would have been sent before the 504 came back, and cost another timeout
    assert asyncio.get_running_loop().time() - started < 0.6
    assert sim.business_received - before == 1


async def test_body_over_the_limit_is_a_json_413(sim, make_sidecar, http):
    sc = await make_sidecar(top="max_body_bytes: 4096")
    async with http.post(f"{sc.base}/cgi-bin/media/upload", data=b"x" * 5000) as resp:
        assert resp.status == 413
        assert (await resp.json())["errcode"] == -1
    async with http.post(f"{sc.base}/cgi-bin/message/custom/send", data=b"x" * 100) as resp:
        assert resp.status == 200


# ---------------------------------------------------------------- answered locally

async def test_token_endpoints_are_answered_locally_with_the_shared_token(sim, make_sidecar, http):
    sc = await make_sidecar()
    token = sc.sidecar.managers["mp"].current().value
    fetches = sim.attempt_count()
    async with http.get(f"{sc.base}/cgi-bin/token?grant_type=client_credential&appid=x&secret=y") as resp:
        got = await resp.json()
    assert got["access_token"] == token and 7000 < got["expires_in"] <= 7200
    async with http.post(f"{sc.base}/cgi-bin/stable_token", json={"grant_type": "client_credential",
                                                                 "appid": "x", "secret": "y"}) as resp:
        got = await resp.json()
    assert got["access_token"] == token and set(got) == {"access_token", "expires_in"}
    assert sim.attempt_count() == fetches      # nothing reached WeChat's token endpoints


@pytest.mark.parametrize("size", [100, 70_000, 3_000_000])
async def test_chunked_binary_answers_pass_through_whole(sim, make_sidecar, http, size):
    from proxy.simulator import media_bytes
    sc = await make_sidecar()
    async with http.get(f"{sc.base}/cgi-bin/media/get?media_id=CH&size={size}&chunked=1") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
        data = await resp.read()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(b"".join(media_bytes("CH", size))).hexdigest()


async def test_expect_100_continue_is_answered_and_not_forwarded(sim, make_sidecar):
    sc = await make_sidecar()
    body = b"a" * 2048
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(b"POST /cgi-bin/message/custom/send HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)   # no 1 s client stall
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    echo = json.loads(payload)
    assert echo["body_len"] == 2048 and "Expect" not in echo["headers"]


async def test_expect_100_continue_is_answered_for_the_local_token_endpoint_too(sim, make_sidecar):
    sc = await make_sidecar()
    body = json.dumps({"grant_type": "client_credential", "appid": "x", "secret": "y"}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(b"POST /cgi-bin/stable_token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(body)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["access_token"] == sc.sidecar.managers["mp"].current().value


async def test_head_keeps_the_upstream_content_length_and_sends_no_body(sim, make_sidecar):
    sc = await make_sidecar()
    answer = await asyncio.wait_for(_raw_exchange(sc.proxy_port, b"HEAD /cgi-bin/media/get?media_id=H&size=12345 "
                                                  b"HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), 5)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 12345" in head and rest == b""


async def _raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_several_rotations_in_a_row_all_recover_with_the_default_budget(sim, make_sidecar, http):
    from proxy.config import DEFAULT_MIN_REFRESH_INTERVAL_S
    sc = await make_sidecar(min_refresh_interval_s=DEFAULT_MIN_REFRESH_INTERVAL_S)
    for n in range(5):
        sim.rotate(APPID, "stable", grace_s=0)
        async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
            assert resp.status == 200, n
    assert sim.fetch_count() == 1 + 5


async def test_a_client_that_leaves_mid_download_frees_its_upstream_slot(sim, make_sidecar, http):
    sc = await make_sidecar()
    size = 20 * 1024 * 1024
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(f"GET /cgi-bin/media/get?media_id=GONE&size={size} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        got = 0
        while got < 1024 * 1024:                  # take 1 MiB, then hang up
            got += len(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()
    pool = next(iter(sc.sidecar.pools.values()))
    # The sidecar notices on its next write, drops the upstream connection
    # and gives the slot back: no call is left holding one.
    await wait_until(lambda: pool._free == 100, timeout=5)
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200


# ---------------------------------------------------------------- every token errcode replays

async def test_an_expired_token_42001_is_refreshed_and_the_call_replayed(sim, make_sidecar, http):
    sc = await make_sidecar(token_api="client_credential")
    old = sc.sidecar.managers["mp"].current().value
    sim.tokens[old].expires_at = sim.clock() - 1      # WeChat ended it early: 42001, not 40001
    fetches, calls = sim.fetch_count(), sim.business_calls
    async with http.get(f"{sc.base}/cgi-bin/user/info?openid=o") as resp:
        assert resp.status == 200 and (await resp.json())["errcode"] == 0
    assert sim.fetch_count() == fetches + 1 and sim.business_calls == calls + 2
    assert [c["errcode"] for c in list(sim.calls)[-2:]] == [42001, 0]
    assert sc.sidecar.metrics.replays.values[("mp", "42001")] == 1


async def test_an_invalid_token_40014_is_refreshed_and_the_call_replayed(sim, make_sidecar, http):
    sc = await make_sidecar(token_api="client_credential")
    sim.settings.wecom_errors = True                  # a bad token answered 40014
    sim.rotate(APPID, "client_credential", grace_s=0)
    fetches, calls = sim.fetch_count(), sim.business_calls
    async with http.get(f"{sc.base}/cgi-bin/user/info?openid=o") as resp:
        assert resp.status == 200 and (await resp.json())["errcode"] == 0
    assert sim.fetch_count() == fetches + 1 and sim.business_calls == calls + 2
    assert [c["errcode"] for c in list(sim.calls)[-2:]] == [40014, 0]
    assert sc.sidecar.metrics.replays.values[("mp", "40014")] == 1


# ---------------------------------------------------------------- rotation storms

async def test_a_rotation_storm_keeps_calls_succeeding_with_one_fetch_per_rotation(sim, make_sidecar, http):
    """Another system fetches a token every 1.2 s (its fetch ends ours after a
    0.3 s grace), under steady load, with the default forced-refresh spacing:
    every refresh helps, so every rotation is followed at once, the twelfth
    as promptly as the first (a fixed budget ran dry after ten)."""
    sim.settings.grace_s = 0.3
    sc = await make_sidecar(token_api="client_credential", min_refresh_interval_s=None)
    start_fetches = sim.fetch_count(api="client_credential")
    statuses: dict[str, int] = {}
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            async with http.get(f"{sc.base}/cgi-bin/user/info?openid=o") as resp:
                ok = resp.status == 200 and (await resp.json())["errcode"] == 0
                key = "ok" if ok else str(resp.status)
                statuses[key] = statuses.get(key, 0) + 1

    workers = [asyncio.create_task(worker()) for _ in range(8)]
    rotations = 0
    for _ in range(12):
        await asyncio.sleep(1.2)
        sim.rotate(APPID, "client_credential", grace_s=0.3)
        rotations += 1
    await asyncio.sleep(1.2)
    stop.set()
    await asyncio.gather(*workers)
    total = sum(statuses.values())
    assert total > 500, statuses
    assert statuses.get("ok", 0) >= 0.99 * total, statuses
    fetches = sim.fetch_count(api="client_credential") - start_fetches
    assert 1 <= fetches <= rotations, (fetches, rotations)


# ---------------------------------------------------------------- outcomes in the metrics

async def test_each_call_outcome_is_counted(sim, make_sidecar, http, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    sc = await make_sidecar(top="max_body_bytes: 2048")
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:                 # ok
        assert resp.status == 200
    async with http.get(f"{sc.base}/sns/userinfo?access_token=user") as resp:     # passthrough
        assert resp.status == 200
    async with http.post(f"{sc.base}/cgi-bin/message/custom/send", data=b"x" * 4096) as resp:
        assert resp.status == 413                                                # bad_request
    sim.settings.reject_all = True
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:                 # token_rejected
        assert resp.status == 503
    sim.settings.reject_all = False
    sim.settings.latency_s = 6                                                   # upstream timeout_s is 5
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:                 # upstream_timeout
        assert resp.status == 504
    sim.settings.latency_s = 0
    async with http.get(f"{sc.admin}/metrics") as resp:
        text = await resp.text()
    counts = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text) if f.name == "wts_calls"
              for s in f.samples if s.name == "wts_calls_total" and s.labels.get("app") == "mp"}
    assert counts == {"ok": 1, "passthrough": 1, "bad_request": 1, "token_rejected": 1, "upstream_timeout": 1}
