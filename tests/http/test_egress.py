"""Egress (DESIGN.md, "Egress"): every connection to WeChat through an HTTP
CONNECT proxy, TLS checked for the WeChat host with a corporate CA, and
WeChat's fallback host when the primary cannot be connected to. A real proxy
process on loopback, the simulator behind TLS with a certificate from a CA
made for the run; the WeChat host name is never resolved by the sidecar."""
from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from aiohttp import web

from proxy import config as config_mod
from proxy.simulator import SimSettings, WeChatSimulator

from ..conftest import APPID, SECRET, free_port, sidecar_yaml
from ..egress_proxy import CertAuthority, ConnectProxy, serve_tls
from ..ops.test_admin import metric, scrape

WECHAT = "api.weixin.qq.com"
PASSWORD = "pr0xy-s3cret-pass"


@pytest.fixture
async def tls_wechat(tmp_path):
    """The simulator as https://api.weixin.qq.com would be, reachable only through the proxy."""
    ca = CertAuthority(tmp_path)
    sim = WeChatSimulator(accounts={APPID: SECRET}, settings=SimSettings(verify_ticket_interval_s=0))
    runner, port = await serve_tls(sim.app(), ca.server_context(WECHAT, "api2.weixin.qq.com"))
    proxy = await ConnectProxy({(WECHAT, 443): ("127.0.0.1", port)}, credentials=("corp", PASSWORD)).start()
    yield sim, ca, proxy
    await proxy.stop()
    await runner.cleanup()


@pytest.fixture
def lookups(monkeypatch):
    """Every name this process resolves."""
    seen: list[str] = []
    real = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        seen.append(host if isinstance(host, str) else host.decode())
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return seen


def egress_yaml(upstream: str, **upstream_keys: object) -> str:
    text = sidecar_yaml(upstream)
    extra = "".join(f", {k}: {v!r}".replace("'", '"') for k, v in upstream_keys.items())
    return text.replace(f'upstream: {{base_url: "{upstream}", timeout_s: 5}}',
                        f'upstream: {{base_url: "{upstream}", timeout_s: 5{extra}}}')


async def test_calls_and_fetches_go_through_the_tunnel_with_tls_for_the_wechat_host(
        make_sidecar, tls_wechat, http, lookups):
    sim, ca, proxy = tls_wechat
    running = await make_sidecar(egress_yaml(f"https://{WECHAT}", proxy=proxy.url("corp", PASSWORD),
                                             ca_file=str(ca.ca_file)))
    for _ in range(5):
        async with http.get(f"{running.base}/cgi-bin/user/info?openid=O") as resp:
            assert resp.status == 200 and (await resp.json())["errcode"] == 0
    async with http.get(f"{running.base}/cgi-bin/ticket/getticket?type=jsapi") as resp:
        assert resp.status == 200 and (await resp.json())["ticket"]
    assert sim.fetch_count() == 1 and sim.ticket_fetch_count() == 1 and sim.business_calls == 5
    assert {target for target, _ in proxy.seen} == {f"{WECHAT}:443"}
    assert all(with_credentials for _, with_credentials in proxy.seen)
    # keep-alive through the tunnel: a handful of tunnels, not one per call
    assert len(proxy.seen) <= 4, proxy.seen
    assert WECHAT not in lookups                       # the proxy resolved it, never the sidecar


async def test_a_certificate_for_another_name_is_refused(make_sidecar, tmp_path, http):
    ca = CertAuthority(tmp_path)
    sim = WeChatSimulator(accounts={APPID: SECRET}, settings=SimSettings(verify_ticket_interval_s=0))
    runner, port = await serve_tls(sim.app(), ca.server_context("other.example"))
    proxy = await ConnectProxy({(WECHAT, 443): ("127.0.0.1", port)}).start()
    try:
        running = await make_sidecar(egress_yaml(f"https://{WECHAT}", proxy=proxy.url(), ca_file=str(ca.ca_file)),
                                     wait_ready=False)
        await asyncio.sleep(0.5)
        assert running.sidecar.managers["mp"].current() is None and sim.fetch_count() == 0
        async with http.get(f"{running.base}/cgi-bin/user/info") as resp:
            assert resp.status == 503
        async with http.get(f"{running.base}/sns/jscode2session?js_code=x") as resp:   # the pool's own TLS
            assert resp.status == 502 and "not valid for 'api.weixin.qq.com'" in await resp.text()
        assert sim.business_calls == 0
        assert "CERTIFICATE_VERIFY_FAILED" in running.sidecar.managers["mp"].state.last_failure.message or \
            "SSL" in running.sidecar.managers["mp"].state.last_failure.message
    finally:
        await proxy.stop()
        await runner.cleanup()


async def test_without_the_corporate_ca_the_inspected_tls_is_refused(make_sidecar, tls_wechat, http):
    sim, ca, proxy = tls_wechat
    running = await make_sidecar(egress_yaml(f"https://{WECHAT}", proxy=proxy.url("corp", PASSWORD)),
                                 wait_ready=False)
    await asyncio.sleep(0.5)
    assert running.sidecar.managers["mp"].current() is None and sim.fetch_count() == 0


async def test_a_proxy_that_wants_credentials_is_a_502_naming_its_status_and_no_credential_is_shown(
        make_sidecar, tls_wechat, http, caplog):
    caplog.set_level(logging.DEBUG)
    sim, ca, proxy = tls_wechat
    running = await make_sidecar(egress_yaml(f"https://{WECHAT}", proxy=proxy.url("corp", "wrong-" + PASSWORD),
                                             ca_file=str(ca.ca_file)), wait_ready=False)
    await asyncio.sleep(0.5)
    async with http.get(f"{running.base}/cgi-bin/user/info") as resp:
        body = await resp.text()
        assert resp.status == 503 and "407" in body   # no token: its fetch was refused by the proxy
    async with http.get(f"{running.admin}/admin/apps") as resp:
        apps = await resp.text()
    assert "407" in apps
    # a business call with no token to fetch: a pass-through path goes to the pool
    async with http.get(f"{running.base}/sns/jscode2session?js_code=x") as resp:
        body = await resp.text()
        assert resp.status == 502 and "407" in body
    text = "\n".join(r.getMessage() for r in caplog.records) + body + apps + running.sidecar.config.summary()
    assert PASSWORD not in text and "corp:***@" in running.sidecar.config.summary()


async def test_a_proxy_that_refuses_the_host_is_a_502_naming_its_status(make_sidecar, tls_wechat, http):
    sim, ca, proxy = tls_wechat
    running = await make_sidecar(egress_yaml(f"https://{WECHAT}", proxy=proxy.url("corp", PASSWORD),
                                             ca_file=str(ca.ca_file)))
    proxy.refuse_with = 403                                     # the proxy's policy changes: WeChat is blocked
    async with http.get(f"{running.base}/cgi-bin/user/info") as resp:
        assert resp.status == 502
        errmsg = (await resp.json())["errmsg"]
    assert errmsg == f"sidecar: the egress proxy refused the tunnel to {WECHAT}:443: 403 Refused"
    assert sim.business_calls == 0


def test_bad_egress_settings_are_config_errors_naming_them(tmp_path):
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    for keys, key, why in (({"proxy": "socks5://h:1"}, "upstream.proxy", "http://"),
                           ({"ca_file": str(tmp_path / "missing.pem")}, "upstream.ca_file", "cannot read"),
                           ({"ca_file": str(bad_ca)}, "upstream.ca_file", "no valid PEM"),
                           ({"fallback": "https://api2.weixin.qq.com"}, "upstream.fallback", "list")):
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse(egress_yaml("https://api.weixin.qq.com", **keys), "c.yaml", {})
        assert err.value.key.startswith(key) and why in err.value.reason, (keys, err.value)


# ---------------------------------------------------------------- fallback

async def test_the_fallback_host_takes_calls_when_the_primary_cannot_be_connected_to(make_sidecar, sim, http):
    primary = f"http://127.0.0.1:{free_port()}"                 # nothing listens there
    running = await make_sidecar(egress_yaml(primary, fallback=[sim.url]))
    egress = running.sidecar.egress
    for _ in range(3):
        async with http.get(f"{running.base}/cgi-bin/user/info") as resp:
            assert resp.status == 200 and (await resp.json())["errcode"] == 0
    assert sim.business_calls == 3 and sim.fetch_count() == 1
    assert egress.prefer_fallback_until > 0                     # 3 connect failures in a row: fallback preferred
    switches = metric(await scrape(http, running), "wts_upstream_host_switches_total")
    assert switches >= 3
    async with http.get(f"{running.base}/cgi-bin/user/info") as resp:    # straight to the fallback now
        assert resp.status == 200
    assert metric(await scrape(http, running), "wts_upstream_host_switches_total") == switches

    # the primary comes back; after the cool-down it is tried first again
    back = WeChatSimulator(accounts={APPID: SECRET}, settings=SimSettings(verify_ticket_interval_s=0))
    runner = web.AppRunner(back.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(primary.rsplit(":", 1)[1])).start()
    try:
        now = egress.clock()
        egress.clock = lambda: now + 61                         # 60 s later
        async with http.get(f"{running.base}/cgi-bin/user/info") as resp:
            assert resp.status == 200
        # served by the primary (its token refused there once and replaced: the two are separate WeChats here)
        assert back.business_calls >= 1 and sim.business_calls == 4
    finally:
        await runner.cleanup()


async def test_a_post_written_to_the_primary_is_never_sent_to_the_fallback(make_sidecar, sim, http):
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"stable_token" in head.split(b"\r\n", 1)[0]:        # tokens are fine here
            length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            body = b'{"access_token": "TTTTTTTTTTTTTTTTTTTTTTTT", "expires_in": 7200}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()                                          # a call: written, then the connection breaks

    breaker = await asyncio.start_server(swallow, "127.0.0.1", 0)
    primary = f"http://127.0.0.1:{breaker.sockets[0].getsockname()[1]}"
    try:
        running = await make_sidecar(egress_yaml(primary, fallback=[sim.url]))   # tokens: from the fallback
        calls = sim.business_calls
        async with http.post(f"{running.base}/cgi-bin/message/custom/send", json={"touser": "O"}) as resp:
            assert resp.status == 502
        assert sim.business_calls == calls                       # not sent a second time elsewhere
    finally:
        breaker.close()
        await breaker.wait_closed()


async def test_a_get_whose_connection_broke_before_any_answer_goes_to_the_fallback(make_sidecar, sim, http):
    """DESIGN: a request already written is never sent to another host unless
    it is a GET/HEAD. A primary that reads the request and hangs up without a
    byte: the GET is answered by the fallback, the POST is a 502 and sent once."""
    token = sim.rotate(APPID)                       # the primary hands out a token the fallback's WeChat knows
    seen: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0]
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                      0)
        await reader.readexactly(length)
        if b"stable_token" in line:
            body = b'{"access_token": "%s", "expires_in": 7200}' % token.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        else:
            seen.append(line)                       # a call: read whole, then the connection breaks
        writer.close()

    breaker = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    primary = f"http://127.0.0.1:{breaker.sockets[0].getsockname()[1]}"
    try:
        running = await make_sidecar(egress_yaml(primary, fallback=[sim.url]))
        calls = sim.business_calls
        async with http.get(f"{running.base}/cgi-bin/user/info?openid=O") as resp:
            assert resp.status == 200 and (await resp.json())["errcode"] == 0
        assert seen == [b"GET /cgi-bin/user/info?openid=O&access_token=" + token.encode() + b" HTTP/1.1"]
        assert sim.business_calls == calls + 1                  # the fallback answered it
        async with http.head(f"{running.base}/cgi-bin/user/info?openid=O") as resp:
            assert resp.status == 200
        assert sim.business_calls == calls + 2 and len(seen) == 2
        async with http.post(f"{running.base}/cgi-bin/message/custom/send", json={"touser": "O"}) as resp:
            assert resp.status == 502
        assert sim.business_calls == calls + 2 and len(seen) == 3   # the POST went to the primary only
        egress = running.sidecar.egress
        assert egress.failures == 0 and egress.prefer_fallback_until == 0   # a hang-up is not a connect failure
        assert metric(await scrape(http, running), "wts_upstream_host_switches_total") == 2
    finally:
        breaker.close()
        await breaker.wait_closed()


async def test_a_token_fetch_by_get_the_primary_hung_up_on_goes_to_the_fallback(make_sidecar, sim, http):
    """The same for fetches: `/cgi-bin/token` is a GET (token_api:
    client_credential); the primary reads it and hangs up."""
    seen: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1].split(b"?")[0])
        writer.close()

    breaker = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    primary = f"http://127.0.0.1:{breaker.sockets[0].getsockname()[1]}"
    try:
        running = await make_sidecar(egress_yaml(primary, fallback=[sim.url]).replace(
            "token_api: stable", "token_api: client_credential"))
        async with http.get(f"{running.base}/cgi-bin/user/info?openid=O") as resp:
            assert resp.status == 200 and (await resp.json())["errcode"] == 0
        assert seen[0] == b"/cgi-bin/token" and b"/cgi-bin/user/info" in seen
        assert sim.fetch_count() == 1 and sim.business_calls == 1
        assert running.sidecar.egress.failures == 0
    finally:
        breaker.close()
        await breaker.wait_closed()


async def test_a_reload_that_changes_egress_settings_is_refused_and_says_a_restart_is_needed(make_sidecar, sim):
    """DESIGN: proxy, ca_file and fallback take effect at start; a reload that
    changes them is refused (the subprocess test in test_cli.py sees its log line)."""
    running = await make_sidecar(egress_yaml(sim.url))
    before = running.sidecar.config
    new = config_mod.parse(egress_yaml(sim.url, proxy="http://127.0.0.1:3128", fallback=["https://api2.weixin.qq.com"])
                           .replace("refresh_before_s: 240", "refresh_before_s: 300"), "c.yaml", {})
    assert new.apps[0].refresh_before_s == 300
    with pytest.raises(config_mod.ConfigError) as refused:
        running.sidecar.reload(new)
    assert "upstream.proxy, upstream.fallback" in str(refused.value) and "restart" in str(refused.value)
    assert running.sidecar.config is before                      # nothing applied, the app change neither
    assert running.sidecar.config.apps[0].refresh_before_s == 240