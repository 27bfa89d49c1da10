"""Bodies the JSON parser cannot take (issue: RecursionError is not a
ValueError): an upstream answer nested past the recursion limit gives its
pooled connection back, and a client body nested that deep is a 400."""
from __future__ import annotations

import json

import pytest
from aiohttp import web

from ..conftest import sidecar_yaml

DEEP = 5000


@pytest.fixture
async def hostile_wechat():
    """WeChat as a broken middlebox might make it: tokens as usual, every
    business answer a token errcode followed by 5000 nested arrays."""
    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "T" * 32, "expires_in": 7200})

    async def business(request: web.Request) -> web.Response:
        body = b'{"errcode":40001,"errmsg":"x","deep":' + b"[" * DEEP + b"]" * DEEP + b"}"
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/cgi-bin/stable_token", token)
    app.router.add_route("*", "/{tail:.*}", business)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


async def test_200_unparsable_answers_leave_every_pooled_connection_free(make_sidecar, hostile_wechat, http):
    running = await make_sidecar(sidecar_yaml(hostile_wechat))
    for _ in range(200):
        async with http.get(f"{running.base}/cgi-bin/user/info?openid=o") as resp:
            assert resp.status == 200                 # relayed as it is: not JSON the sidecar can read
            assert (await resp.read()).startswith(b'{"errcode":40001')
    pool = running.sidecar.pools[hostile_wechat]
    assert pool.free_slots == pool.limit                  # every slot given back
    async with http.get(f"{running.base}/cgi-bin/user/info?openid=o", timeout=5) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("path, body", [
    ("/cgi-bin/stable_token", b"[" * 100_000),
    ("/cgi-bin/stable_token", b'{"force_refresh": ' + b"[" * 100_000),
])
async def test_a_client_body_nested_past_the_parser_is_a_400(make_sidecar, sim, http, path, body):
    running = await make_sidecar(sidecar_yaml(sim.url))
    async with http.post(f"{running.base}{path}", data=body) as resp:
        answer = await resp.json(content_type=None)
        assert resp.status == 400, answer
    assert answer["errcode"] == -1 and "nests too deeply" in answer["errmsg"]
    assert json.dumps(answer)                         # a sidecar error, never a stack trace
