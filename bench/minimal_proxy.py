"""The baseline of the benchmark: a minimal aiohttp pass-through proxy that
appends a static token (what a user might write in 30 lines). Like the
sidecar it runs on uvloop and writes an access line per call, so the two
are compared like with like."""
import logging
import sys

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = sys.argv[1]
PORT = int(sys.argv[2])
HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}


async def on_startup(app: web.Application) -> None:
    app["session"] = aiohttp.ClientSession()


async def on_cleanup(app: web.Application) -> None:
    await app["session"].close()


async def proxy(request: web.Request) -> web.StreamResponse:
    sep = "&" if request.query_string else ""
    url = f"{UPSTREAM}{request.path}?{request.query_string}{sep}access_token=STATIC"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with request.app["session"].request(request.method, url, headers=headers,
                                               data=await request.read()) as resp:
        body = await resp.read()
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP | {"content-encoding"}}
        return web.Response(status=resp.status, body=body, headers=out)


app = web.Application()
app.on_startup.append(on_startup)
app.on_cleanup.append(on_cleanup)
app.router.add_route("*", "/{tail:.*}", proxy)
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
web.run_app(app, host="127.0.0.1", port=PORT, print=None, loop=uvloop.new_event_loop())
