"""Hostile input on the proxy port: raw sockets, not a polite client. The
sidecar must never become an open proxy, never leak, and never fall over."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from proxy import config as config_mod
from proxy.forward import normalize_path

from .conftest import SECRET


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
    answer = await raw(sc.proxy_port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
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
    answer = await raw(sc.proxy_port, f"GET {path}?a=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
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
    answer = await raw(sc.proxy_port, b"POST /cgi-bin/message/custom/send HTTP/1.1\r\nHost: x\r\n"
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
                 b"GET /cgi-bin/user/info HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n",   # truncated
                 b"GET /cgi-bin/user/info HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"):
        await raw(sc.proxy_port, junk, read_timeout=2)
    await assert_still_serving(sc, http)


async def test_too_many_or_too_large_headers_are_431(sc, http):
    many = "".join(f"X-H{i}: v\r\n" for i in range(150))
    status, body = status_and_json(await raw(sc.proxy_port, f"GET /cgi-bin/user/info HTTP/1.1\r\nHost: x\r\n"
                                                            f"{many}Connection: close\r\n\r\n".encode()))
    assert status == 431 and "headers" in body["errmsg"]
    big = "".join(f"X-B{i}: {'v' * 1000}\r\n" for i in range(40))
    status, body = status_and_json(await raw(sc.proxy_port, f"GET /cgi-bin/user/info HTTP/1.1\r\nHost: x\r\n"
                                                            f"{big}Connection: close\r\n\r\n".encode()))
    assert status == 431
    one_big = await raw(sc.proxy_port, f"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {'v' * 40000}\r\n\r\n".encode())
    assert status_and_json(one_big)[0] == 431
    # beyond the server's hard limit the head is not even kept: 431, connection closed
    huge = await raw(sc.proxy_port, f"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {'v' * 70000}\r\n\r\n".encode())
    status, body = status_and_json(huge)
    assert status == 431 and "request head over" in body["errmsg"]
    await assert_still_serving(sc, http)


async def test_a_long_url_is_414(sc, http):
    status, body = status_and_json(await raw(sc.proxy_port, f"GET /cgi-bin/user/info?q={'a' * 9000} HTTP/1.1\r\n"
                                                            f"Host: x\r\nConnection: close\r\n\r\n".encode()))
    assert status == 414 and body["errcode"] == -1
    await assert_still_serving(sc, http)


async def test_a_slowloris_client_is_disconnected(sc, http):
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(b"GET /cgi-bin/user/info HTTP/1.1\r\nHost: x\r\n")
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
    answer = await raw(sc.proxy_port, b"POST /cgi-bin/message/custom/send HTTP/1.1\r\nHost: x\r\n"
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
    answer = await raw(sc.proxy_port, b"POST /cgi-bin/message/custom/send HTTP/1.1\r\nHost: x\r\n"
                                      b"Expect: teapot\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    status, body = status_and_json(answer)
    assert status == 417 and body["errcode"] == -1
    assert sim.business_calls == calls
