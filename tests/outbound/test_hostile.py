"""Hostile input on the proxy port: raw sockets, not a polite client. The
sidecar must never become an open proxy, never leak, and never fall over."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from proxy import config as config_mod
from proxy.http.callers import normalize_path

from ..conftest import SECRET, sidecar_yaml, wait_until


async def raw(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send bytes, read until the server closes or stops talking."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except (asyncio.TimeoutError, ConnectionResetError):
        pass
    writer.close()
    return b"".join(chunks)


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else {}


@pytest.fixture
async def other_host():
    """A local listener standing for "some other host": it must see zero hits."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        return web.Response(text="other host")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1], hits
    await runner.cleanup()


@pytest.fixture
async def sc(make_sidecar):
    return await make_sidecar(top="client_timeout_s: 1")


async def assert_still_serving(sc, http) -> None:
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200 and (await resp.json())["errcode"] == 0


# ---------------------------------------------------------------- never an open proxy

async def test_absolute_form_targets_never_reach_another_host(sc, sim, http, other_host):
    port, hits = other_host
    answer = await raw(sc.proxy_port, f"GET http://127.0.0.1:{port}/cgi-bin/user/info HTTP/1.1\r\n"
                                      f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    status, body = status_and_json(answer)
    assert status == 400 and body["errcode"] == -1 and "absolute-form" in body["errmsg"]
    assert hits == []
    await assert_still_serving(sc, http)


async def test_connect_is_refused(sc, sim, http, other_host):
    port, hits = other_host
    answer = await raw(sc.proxy_port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    status, body = status_and_json(answer)
    assert status == 405 and "not a forward proxy" in body["errmsg"]
    assert hits == []


async def test_a_host_header_naming_another_host_still_goes_to_the_upstream(sc, sim, http, other_host):
    port, hits = other_host
    calls = sim.business_calls
    answer = await raw(sc.proxy_port, f"GET /cgi-bin/user/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                      f"Connection: close\r\n\r\n".encode())
    status, body = status_and_json(answer)
    assert status == 200 and body["errcode"] == 0
    assert sim.business_calls == calls + 1 and hits == []


@pytest.mark.parametrize("path", [
    "/../cgi-bin/user/info", "/mp/../../cgi-bin/user/info", "/%2e%2e/cgi-bin/user/info",
    "/cgi-bin/%2E%2E/%2e%2e/x", "/cgi-bin/user%2Finfo", "/cgi-bin\\user\\info", "/cgi-bin/%5c..%5cx",
    "/cgi-bin/%00/x",
])
async def test_paths_that_cannot_be_normalised_are_400(sc, sim, path):
    calls = sim.business_calls
    answer = await raw(sc.proxy_port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    status, body = status_and_json(answer)
    assert status == 400 and body["errcode"] == -1
    assert sim.business_calls == calls


@pytest.mark.parametrize("path, upstream", [
    ("//cgi-bin//user/info", "/cgi-bin/user/info"),
    ("/cgi-bin/./user/./info", "/cgi-bin/user/info"),
    ("/cgi-bin/x/../user/info", "/cgi-bin/user/info"),
    ("/mp//cgi-bin/user/info", "/cgi-bin/user/info"),
])
async def test_dot_segments_and_double_slashes_are_resolved_before_forwarding(sc, sim, path, upstream):
    answer = await raw(sc.proxy_port, f"GET {path}?a=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    status, body = status_and_json(answer)
    assert status == 200 and body["path"] == upstream


def test_normalize_path_cases():
    assert normalize_path("/cgi-bin/user/info") == "/cgi-bin/user/info"
    assert normalize_path("/a/b/") == "/a/b/"
    assert normalize_path("/a/%2e/b") == "/a/b"
    assert normalize_path("/a/..") == "/"
    assert normalize_path("/..") is None
    assert normalize_path("http://x/") is None


async def test_hop_by_hop_and_proxy_headers_are_not_forwarded(sc, sim):
    body = b'{"k": "v"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = await raw(sc.proxy_port, b"POST /cgi-bin/message/custom/send HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Connection: close, X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
                       b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Connection: keep-alive\r\n"
                       b"X-WeChat-App: mp\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Kept: yes\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    status, echo = status_and_json(answer)
    assert status == 200
    sent = {k.lower() for k in echo["headers"]}
    for hop in ("x-hop-secret", "keep-alive", "proxy-authorization", "proxy-connection", "x-wechat-app",
                "te", "upgrade", "transfer-encoding"):
        assert hop not in sent, hop
    assert echo["headers"]["X-Kept"] == "yes"
    assert echo["body"] == body.decode() and echo["headers"]["Content-Length"] == str(len(body))


async def test_set_cookie_headers_come_back_as_they_are(sc, http):
    async with http.get(f"{sc.base}/_sim/cookies") as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/; HttpOnly", "b=2; Path=/"]


# ---------------------------------------------------------------- limits, garbage, slow clients

async def test_garbage_and_truncated_requests_leave_the_process_serving(sc, sim, http):
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
                 b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x00" * 1000,
                 b"GET /cgi-bin/user/info HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n",   # truncated
                 b"GET /cgi-bin/user/info HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n"):
        await raw(sc.proxy_port, junk, read_timeout=2)
    await assert_still_serving(sc, http)


async def test_too_many_or_too_large_headers_are_431(sc, http):
    many = "".join(f"X-H{i}: v\r\n" for i in range(150))
    status, body = status_and_json(await raw(sc.proxy_port, f"GET /cgi-bin/user/info HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                            f"{many}Connection: close\r\n\r\n".encode()))
    assert status == 431 and "headers" in body["errmsg"]
    big = "".join(f"X-B{i}: {'v' * 1000}\r\n" for i in range(40))
    status, body = status_and_json(await raw(sc.proxy_port, f"GET /cgi-bin/user/info HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                            f"{big}Connection: close\r\n\r\n".encode()))
    assert status == 431
    one_big = await raw(sc.proxy_port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: {'v' * 40000}\r\n\r\n".encode())
    assert status_and_json(one_big)[0] == 431
    # beyond the server's hard limit the head is not even kept: 431, connection closed
    huge = await raw(sc.proxy_port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: {'v' * 70000}\r\n\r\n".encode())
    status, body = status_and_json(huge)
    assert status == 431 and "request head over" in body["errmsg"]
    await assert_still_serving(sc, http)


async def test_a_long_url_is_414(sc, http):
    status, body = status_and_json(await raw(sc.proxy_port, f"GET /cgi-bin/user/info?q={'a' * 9000} HTTP/1.1\r\n"
                                                            f"Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()))
    assert status == 414 and body["errcode"] == -1
    await assert_still_serving(sc, http)


async def test_a_slowloris_client_is_disconnected(sc, http):
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(b"GET /cgi-bin/user/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    loop = asyncio.get_running_loop()
    started, closed_after = loop.time(), None
    for _ in range(40):                         # one header byte every 0.1 s
        try:
            writer.write(b"X")
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            closed_after = loop.time() - started
            break
        try:
            if await asyncio.wait_for(reader.read(1024), 0.1) == b"":
                closed_after = loop.time() - started
                break
        except asyncio.TimeoutError:
            pass
    writer.close()
    assert closed_after is not None and closed_after < 3, closed_after   # client_timeout_s: 1
    await assert_still_serving(sc, http)


async def test_a_body_that_never_arrives_is_408(sc, sim, http):
    calls = sim.business_calls
    answer = await raw(sc.proxy_port, b"POST /cgi-bin/message/custom/send HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Content-Length: 100\r\n\r\n0123456789", read_timeout=4)
    status, body = status_and_json(answer)
    assert status == 408 and "not received" in body["errmsg"]
    assert sim.business_calls == calls
    await assert_still_serving(sc, http)


# ---------------------------------------------------------------- leaks

def test_listening_beyond_loopback_needs_an_explicit_yes():
    text = "listen: {host: 0.0.0.0, port: 8080}\napps: [{name: a, appid: w, secret: s}]"
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(text, "c.yaml", {})
    assert info.value.key == "listen.host" and "/cgi-bin/token" in info.value.reason
    cfg = config_mod.parse(text.replace("8080}", "8080, allow_non_loopback: true}"), "c.yaml", {})
    assert cfg.listen.host == "0.0.0.0"


async def test_no_token_or_secret_in_error_bodies_metrics_or_admin_answers(sc, sim, http):
    bodies = []
    for path in ("/cgi-bin/../../x", "/nope%2Fx", "/cgi-bin/user/info"):
        async with http.get(f"{sc.base}{path}", headers={"X-WeChat-App": "ghost"}) as resp:
            bodies.append(await resp.text())
    sim.settings.reject_all = True
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        bodies.append(await resp.text())
    sim.settings.reject_all = False
    for url in (f"{sc.admin}/metrics", f"{sc.admin}/admin/apps", f"{sc.admin}/readyz"):
        async with http.get(url) as resp:
            bodies.append(await resp.text())
    everything = "\n".join(bodies)
    assert "token rejected after refresh" in everything
    for secret in (SECRET, *sim.issued_tokens()):
        assert secret not in everything


async def test_an_unknown_expectation_is_417(sc, sim):
    calls = sim.business_calls
    answer = await raw(sc.proxy_port, b"POST /cgi-bin/message/custom/send HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Expect: teapot\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    status, body = status_and_json(answer)
    assert status == 417 and body["errcode"] == -1
    assert sim.business_calls == calls


# ---------------------------------------------------------------- who may call (DNS rebinding, CSRF)

def _get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n".encode()


@pytest.mark.parametrize("headers", [
    ("Host: attacker.example",),
    ("Host: attacker.example:8080",),
    ("Host: 10.0.0.5",),
    ("Host: localhost.attacker.example",),
    ("Host: 127.0.0.1", "Origin: https://attacker.example"),
    ("Host: 127.0.0.1", "Origin: null"),
    ("Host: localhost", "Sec-Fetch-Site: cross-site"),
])
@pytest.mark.parametrize("path", ["/cgi-bin/token?grant_type=client_credential", "/cgi-bin/user/info"])
async def test_calls_a_web_page_could_make_are_refused_and_nothing_is_forwarded(sc, sim, headers, path):
    calls, fetches = sim.business_calls, sim.fetch_count()
    answer = await raw(sc.proxy_port, _get(path, *headers))
    status, body = status_and_json(answer)
    assert status == 403 and body["errcode"] == -1, answer
    assert b"access_token" not in answer.partition(b"\r\n\r\n")[2]
    assert sim.business_calls == calls and sim.fetch_count() == fetches


@pytest.mark.parametrize("headers", [
    ("Host: 127.0.0.1",), ("Host: localhost:8080",), ("Host: [::1]:8080",), ("Host: 127.0.0.2",),
    ("Host: LOCALHOST",), ("Host: 127.0.0.1", "Origin: http://localhost:3000"),
    ("Host: 127.0.0.1", "Sec-Fetch-Site: same-origin"),
])
async def test_loopback_hosts_and_same_site_origins_are_served(sc, sim, headers):
    status, body = status_and_json(await raw(sc.proxy_port, _get("/cgi-bin/user/info", *headers)))
    assert status == 200 and body["errcode"] == 0


async def test_listen_allowed_hosts_adds_names_a_node_wide_sidecar_is_reached_by(make_sidecar, sim):
    running = await make_sidecar(top="", app="")
    status, _ = status_and_json(await raw(running.proxy_port, _get("/cgi-bin/user/info", "Host: sidecar.node")))
    assert status == 403
    text = sidecar_yaml(sim.url).replace("listen: {host: 127.0.0.1, port: 0}",
                                         "listen: {host: 127.0.0.1, port: 0, allowed_hosts: [sidecar.node]}")
    allowed = await make_sidecar(text)
    for host in ("sidecar.node", "sidecar.node:8080", "127.0.0.1"):
        status, body = status_and_json(await raw(allowed.proxy_port, _get("/cgi-bin/user/info", f"Host: {host}")))
        assert status == 200 and body["errcode"] == 0, host
    status, _ = status_and_json(await raw(allowed.proxy_port, _get("/cgi-bin/user/info", "Host: other.node")))
    assert status == 403


def test_allowed_hosts_must_be_host_names():
    base = "apps: [{name: a, appid: w, secret: s}]\nlisten: {host: 127.0.0.1, port: 1, allowed_hosts: %s}"
    for bad in ("x.example", "['http://x']", "['x:80']"):
        with pytest.raises(config_mod.ConfigError) as info:
            config_mod.parse(base % bad, "c.yaml", {})
        assert info.value.key.startswith("listen.allowed_hosts"), info.value


# ---------------------------------------------------------------- methods, targets, expectations

async def test_trace_is_405_and_never_forwarded(sc, sim):
    calls = sim.business_calls
    status, body = status_and_json(await raw(sc.proxy_port, b"TRACE /cgi-bin/user/info HTTP/1.1\r\n"
                                                           b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n"))
    assert status == 405 and "TRACE" in body["errmsg"]
    assert sim.business_calls == calls


async def test_a_fragment_is_never_forwarded_and_the_token_never_follows_a_hash(sc, sim):
    status, body = status_and_json(await raw(sc.proxy_port, _get("/cgi-bin/user/info?openid=o1#top&x=1",
                                                                "Host: 127.0.0.1")))
    assert status == 200
    last = sim.calls[-1]
    assert "#" not in last["query"] and last["query"].startswith("openid=o1&access_token=")
    assert len(last["access_token"]) == 1 and last["errcode"] == 0


async def test_expect_100_continue_with_a_body_over_the_limit_is_413_at_once(make_sidecar, sim):
    running = await make_sidecar(top="max_body_bytes: 2048")
    calls = sim.business_calls
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    writer.write(b"POST /cgi-bin/media/upload?type=image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n")        # and waits
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer
    writer.close()
    assert sim.business_calls == calls


async def test_the_sidecar_root_is_never_forwarded(sc, sim, http):
    calls = sim.business_calls
    for path in ("/sidecar/nope", "/mp/sidecar/nope", "/sidecar"):
        async with http.get(f"{sc.base}{path}") as resp:
            assert resp.status == 404, path
            assert (await resp.json())["errmsg"].startswith("sidecar: no sidecar endpoint")
    assert sim.business_calls == calls


def test_sidecar_is_a_reserved_app_name():
    with pytest.raises(config_mod.ConfigError, match="collides"):
        config_mod.parse("apps: [{name: sidecar, appid: w, secret: s}]", "c.yaml", {})


# ---------------------------------------------------------------- clients that stop reading

async def test_clients_that_stop_reading_downloads_do_not_block_other_calls(make_sidecar, sim, http, monkeypatch):
    from proxy.outbound import pools
    monkeypatch.setattr(pools, "UPSTREAM_POOL_LIMIT", 3)
    running = await make_sidecar(top="client_timeout_s: 0.5")
    stalled = []
    for i in range(6):                                   # twice as many as there are upstream slots
        reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
        writer.write(f"GET /cgi-bin/media/get?media_id=m{i}&size={50 << 20} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\n\r\n".encode())       # and never read
        stalled.append(writer)
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.get(f"{running.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200 and (await resp.json())["errcode"] == 0
    # answered once the stalled clients were cut off (0.5 s without progress), not 12 s later
    assert loop.time() - started < 3
    pool = running.sidecar.pools[sim.url]
    await wait_until(lambda: pool._free == 3 and not pool._line, 5)
    for writer in stalled:
        writer.close()
