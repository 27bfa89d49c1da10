"""proxy/ops/admin.py and proxy/ops/metrics.py over real HTTP: probes, the per-app
view, the passive refresh, and metrics that move with what happens."""
from __future__ import annotations

import asyncio
import json
import re

from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.metrics import Metrics

from ..conftest import APPID, SECRET, past_coalescing, sidecar_yaml, wait_until


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p))
        if got == want:
            return float(m.group(3))
    return 0.0


async def scrape(http, sc) -> str:
    async with http.get(f"{sc.admin}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    # Every scrape must be what Prometheus itself can read (its client's parser).
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["wts_calls"] == "counter" and families["wts_token_usable"] == "gauge"
    assert families["wts_call_duration_seconds"] == "histogram"
    return text


def test_label_values_are_escaped_so_the_text_stays_parseable():
    metrics = Metrics()
    odd = 'a"b\\c\nd'
    metrics.replays.labels(odd, "40001").inc()
    metrics.replays.labels(odd, "40001").inc()
    metrics.observe_call(odd, "ok", 0.003)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.text()) for s in f.samples}
    assert samples[("wts_replays_total", (("app", odd), ("errcode", "40001")))] == 2
    assert samples[("wts_call_duration_seconds_bucket", (("app", odd), ("le", "0.0025")))] == 0
    assert samples[("wts_call_duration_seconds_bucket", (("app", odd), ("le", "0.005")))] == 1
    assert samples[("wts_call_duration_seconds_count", (("app", odd),))] == 1


async def test_healthz_readyz_and_apps_over_http(sim, make_sidecar, http):
    sc = await make_sidecar()
    async with http.get(f"{sc.admin}/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with http.get(f"{sc.admin}/readyz") as resp:
        assert resp.status == 200
    async with http.get(f"{sc.admin}/admin/apps") as resp:
        text = await resp.text()
    app = json.loads(text)["apps"][0]
    assert app["name"] == "mp" and app["appid"] == APPID and app["token_api"] == "stable"
    assert app["last_fetch"] == "ok" and app["fetches_ok"] == 1 and 7100 < app["expires_in_s"] <= 7200
    assert app["fetches_today"] == 1
    for secret in [SECRET, *sim.issued_tokens()]:
        assert secret not in text


async def test_readyz_names_the_reason_when_not_ready(sim, make_sidecar, http):
    sc = await make_sidecar(secret="wrong", wait_ready=False)
    await wait_until(lambda: sc.sidecar.managers["mp"].state.last_failure is not None)
    async with http.get(f"{sc.admin}/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert "40125" in body["apps"]["mp"] and "invalid appsecret" in body["apps"]["mp"]
    async with http.get(f"{sc.admin}/healthz") as resp:
        assert resp.status == 200          # liveness never depends on WeChat


async def test_admin_refresh_fetches_once_even_when_ten_ask_at_once(sim, make_sidecar, http):
    sc = await make_sidecar(min_refresh_interval_s=0)
    sim.settings.token_latency_s = 0.05          # a real fetch takes a while: the asks overlap it
    await asyncio.sleep(1)                        # a second after the start-up fetch, as operators do
    before = sim.fetch_count()

    async def refresh() -> tuple[int, dict]:
        async with http.post(f"{sc.admin}/admin/refresh?app=mp") as r:
            return r.status, await r.json()

    answers = await asyncio.gather(*(refresh() for _ in range(10)))
    assert [status for status, _ in answers] == [200] * 10, answers
    assert sim.fetch_count() == before + 1        # ten asks, one fetch
    body = answers[0][1]
    assert body["app"] == "mp" and body["expires_in"] > 7000 and "access_token" not in body
    # and ten more right behind them share that refresh too
    answers = await asyncio.gather(*(refresh() for _ in range(10)))
    assert [status for status, _ in answers] == [200] * 10 and sim.fetch_count() == before + 1
    async with http.post(f"{sc.admin}/admin/refresh?app=nope") as resp:
        assert resp.status == 404


async def test_admin_refresh_beyond_the_forced_refresh_spacing_is_429_with_retry_after(sim, make_sidecar, http):
    sc = await make_sidecar(min_refresh_interval_s=30)
    await past_coalescing()                       # a while after the start-up fetch
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 200
    await asyncio.sleep(0.6)                      # past the coalescing window
    before = sim.fetch_count()
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 429
        assert 29 <= int(resp.headers["Retry-After"]) <= 30
        assert "still served" in (await resp.json())["errmsg"]
    assert sim.fetch_count() == before
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:   # the token is still served
        assert (await resp.json())["errcode"] == 0


async def test_admin_refresh_needs_the_bearer_token_when_set(sim, make_sidecar, http):
    text = sidecar_yaml(sim.url).replace("admin:  {host: 127.0.0.1, port: 0}",
                                         'admin:  {host: 127.0.0.1, port: 0, token: "s3cret-admin"}')
    sc = await make_sidecar(text)
    before = sim.fetch_count()
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 401 and (await resp.json())["errcode"] == -1
    async with http.post(f"{sc.admin}/admin/refresh?app=mp", headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    assert sim.fetch_count() == before
    await past_coalescing()
    async with http.post(f"{sc.admin}/admin/refresh?app=mp",
                         headers={"Authorization": "Bearer s3cret-admin"}) as resp:
        assert resp.status == 200
    assert sim.fetch_count() == before + 1


async def test_admin_refresh_is_refused_beyond_loopback_without_a_token(sim, make_sidecar, http):
    text = sidecar_yaml(sim.url).replace("admin:  {host: 127.0.0.1, port: 0}", "admin:  {host: 0.0.0.0, port: 0}")
    sc = await make_sidecar(text)
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 403
        assert "admin.token" in (await resp.json())["errmsg"]
    async with http.get(f"{sc.admin}/readyz") as resp:   # GETs stay open for probes
        assert resp.status == 200


async def test_metrics_move_as_calls_fetches_and_replays_happen(sim, make_sidecar, http):
    sc = await make_sidecar()
    first = await scrape(http, sc)
    assert metric(first, "wts_token_fetches_total", app="mp", api="stable", result="ok") == 1
    assert metric(first, "wts_token_refreshes_total", app="mp", reason="startup") == 1
    assert metric(first, "wts_token_usable", app="mp") == 1
    assert 7100 < metric(first, "wts_token_expires_in_seconds", app="mp") <= 7200
    assert metric(first, "wts_token_fetches_today", app="mp") == 1

    for _ in range(3):
        async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
            assert resp.status == 200
    sim.rotate(APPID, "stable", grace_s=0)
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200
    async with http.get(f"{sc.base}/cgi-bin/user/info", headers={"X-WeChat-App": "nope"}) as resp:
        assert resp.status == 400
    sim.settings.token_fault = "errcode:40164"
    await past_coalescing()                       # not the replay's refresh: a new one
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 503 and "203.0.113.7" in (await resp.json())["errmsg"]

    after = await scrape(http, sc)
    assert metric(after, "wts_calls_total", app="mp", outcome="ok") == 4
    assert metric(after, "wts_replays_total", app="mp", errcode="40001") == 1
    assert metric(after, "wts_token_rotated_elsewhere_total", app="mp") == 1
    assert metric(after, "wts_token_refreshes_total", app="mp", reason="errcode") == 1
    assert metric(after, "wts_token_fetches_total", app="mp", api="stable", result="ok") == 2
    assert metric(after, "wts_token_fetches_total", app="mp", api="stable", result="credential") == 1
    assert metric(after, "wts_call_duration_seconds_count", app="mp") == 4
    for secret in [SECRET, *sim.issued_tokens()]:
        assert secret not in after


async def test_every_admin_endpoint_needs_the_bearer_when_set_and_probes_never_do(sim, make_sidecar, http):
    text = sidecar_yaml(sim.url).replace("admin:  {host: 127.0.0.1, port: 0}",
                                         'admin:  {host: 127.0.0.1, port: 0, token: "s3cret-admin"}')
    sc = await make_sidecar(text)
    refused = [None, "Bearer wrong", "Basic czNjcmV0LWFkbWlu", "s3cret-admin", "Bearer", "Bearer  ",
               "Bearer s3cret-admin-and-more", "Bearer s3cret-admi"]
    for value in refused:
        headers = {"Authorization": value} if value is not None else {}
        async with http.get(f"{sc.admin}/admin/apps", headers=headers) as resp:
            assert resp.status == 401, value
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            body = await resp.json()
            assert body["errcode"] == -1 and APPID not in json.dumps(body)
    for scheme in ("Bearer", "bearer", "BEARER"):         # RFC 9110 §11.1: case-insensitive scheme
        async with http.get(f"{sc.admin}/admin/apps", headers={"Authorization": f"{scheme} s3cret-admin"}) as resp:
            assert resp.status == 200 and (await resp.json())["apps"][0]["appid"] == APPID
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(f"{sc.admin}{path}") as resp:
            assert resp.status == 200, path


async def test_a_non_ascii_authorization_value_is_401_not_500(sim, make_sidecar):
    text = sidecar_yaml(sim.url).replace("admin:  {host: 127.0.0.1, port: 0}",
                                         'admin:  {host: 127.0.0.1, port: 0, token: "s3cret-admin"}')
    sc = await make_sidecar(text)
    for value in ("Bearer s3cr\u00e9t".encode("utf-8"), b"Bearer \xff\xfe", "Bearer 令牌".encode("utf-8")):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.admin_port)
        writer.write(b"GET /admin/apps HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + value +
                     b"\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
