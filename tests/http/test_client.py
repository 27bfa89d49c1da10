"""proxy/http/client.py, the lean HTTP/1.1 client, against real aiohttp servers:
chunked and HEAD answers, keep-alive reuse (also after errors and after the
upstream drops idle connections), backpressure, timeouts, and TLS with
certificate and hostname verification."""
from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
import subprocess

import pytest
from aiohttp import web

from proxy.http.client import UpstreamConnectError, UpstreamError, UpstreamPool, UpstreamTimeout

from ..conftest import free_port

BIG = 8 * 1024 * 1024


async def chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(50):
        await resp.write(bytes([i]) * 1000)
    await resp.write_eof()
    return resp


async def big(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_length = BIG
    await resp.prepare(request)
    block = bytes(range(256)) * 256
    for _ in range(BIG // len(block)):
        await resp.write(block)
    await resp.write_eof()
    return resp


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"method": request.method, "path_qs": request.path_qs,
                              "host": request.headers.get("Host"), "len": len(body),
                              "x": request.headers.get("X-Thing"), "peer": id(request.transport)})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.Response(text="late")


async def serve(ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
    app = web.Application()
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner, port


@pytest.fixture
async def upstream():
    runner, port = await serve()
    yield port
    await runner.cleanup()


async def body_of(resp, timeout=5.0) -> bytes:
    parts = []
    while chunk := await resp.read_chunk(timeout):
        parts.append(chunk)
    resp.release()
    return b"".join(parts)


async def test_requests_reuse_one_keep_alive_connection(upstream):
    pool = UpstreamPool(f"http://127.0.0.1:{upstream}", 5)
    peers = set()
    for i in range(5):
        resp = await pool.request("POST", f"/a?i={i}", [(b"X-Thing", b"v")], b"x" * 100)
        assert resp.status == 200
        data = await body_of(resp)
        import json
        answer = json.loads(data)
        assert (answer["path_qs"], answer["len"], answer["x"]) == (f"/a?i={i}", 100, "v")
        assert answer["host"] == f"127.0.0.1:{upstream}"
        peers.add(answer["peer"])
    assert len(peers) == 1
    pool.close()


async def test_chunked_answers_are_de_chunked_and_complete(upstream):
    pool = UpstreamPool(f"http://127.0.0.1:{upstream}", 5)
    resp = await pool.request("GET", "/chunked", [], b"")
    assert resp.content_length is None
    data = await body_of(resp)
    assert data == b"".join(bytes([i]) * 1000 for i in range(50))
    resp = await pool.request("GET", "/x", [], b"")      # the connection is reusable after it
    assert resp.status == 200
    await body_of(resp)
    pool.close()


async def test_head_answers_end_without_a_body(upstream):
    pool = UpstreamPool(f"http://127.0.0.1:{upstream}", 5)
    resp = await pool.request("HEAD", "/x", [], b"")
    assert resp.status == 200 and await body_of(resp) == b""
    pool.close()


async def test_a_large_answer_streams_with_backpressure(upstream):
    pool = UpstreamPool(f"http://127.0.0.1:{upstream}", 5)
    resp = await pool.request("GET", "/big", [], b"")
    await asyncio.sleep(0.3)                              # a slow reader: the buffer stays bounded
    assert resp._buffered <= 2 * 256 * 1024 + 65536
    digest, size = hashlib.sha256(), 0
    while chunk := await resp.read_chunk(5):
        digest.update(chunk)
        size += len(chunk)
    resp.release()
    expected = hashlib.sha256((bytes(range(256)) * 256) * (BIG // 65536)).hexdigest()
    assert size == BIG and digest.hexdigest() == expected
    pool.close()


async def test_a_timeout_is_reported_and_the_next_call_uses_a_fresh_connection(upstream):
    pool = UpstreamPool(f"http://127.0.0.1:{upstream}", 0.3)
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/slow", [], b"")
    resp = await pool.request("GET", "/x", [], b"")
    assert resp.status == 200
    await body_of(resp)
    pool.close()


async def test_idle_connections_closed_by_the_upstream_are_replaced():
    runner, port = await serve()
    pool = UpstreamPool(f"http://127.0.0.1:{port}", 5)
    resp = await pool.request("GET", "/x", [], b"")
    await body_of(resp)
    await runner.cleanup()                                # the upstream restarts...
    app_runner, _ = await _serve_on(port)                 # ...on the same port
    try:
        resp = await pool.request("GET", "/again", [], b"")
        assert resp.status == 200
        await body_of(resp)
    finally:
        pool.close()
        await app_runner.cleanup()


async def _serve_on(port: int):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def test_connection_refused_is_a_connect_error():
    pool = UpstreamPool(f"http://127.0.0.1:{free_port()}", 2)
    with pytest.raises(UpstreamConnectError, match="cannot connect to upstream 127.0.0.1"):
        await pool.request("GET", "/x", [], b"")
    pool.close()


async def test_calls_beyond_the_pool_limit_queue_instead_of_failing(upstream):
    pool = UpstreamPool(f"http://127.0.0.1:{upstream}", 5, limit=3)

    async def one(i: int) -> int:
        resp = await pool.request("GET", f"/q{i}", [], b"")
        await body_of(resp)
        return resp.status

    assert await asyncio.gather(*(one(i) for i in range(30))) == [200] * 30
    assert len(pool._idle) <= 3
    pool.close()


async def test_a_call_cancelled_while_waiting_in_line_leaks_no_slot(upstream):
    pool = UpstreamPool(f"http://127.0.0.1:{upstream}", 5, limit=1)
    first = await pool.request("GET", "/big", [], b"")       # holds the only slot until read
    waiting = asyncio.create_task(pool.request("GET", "/a", [], b""))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await body_of(first)                                      # gives the slot back
    resp = await asyncio.wait_for(pool.request("GET", "/b", [], b""), 2)
    assert resp.status == 200 and pool._free == 0
    await body_of(resp)
    assert pool._free == 1 and not pool._line
    pool.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


async def test_tls_upstreams_are_verified_with_sni(certificate):
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    runner, port = await serve(server_ctx)
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        pool = UpstreamPool(f"https://localhost:{port}", 5, ssl_context=trusting)
        resp = await pool.request("GET", "/tls?x=1", [], b"")
        assert resp.status == 200 and b"/tls?x=1" in await body_of(resp)
        pool.close()
        # the same server under a name its certificate does not carry: refused
        pool = UpstreamPool(f"https://127.0.0.1:{port}", 5, ssl_context=trusting)
        with pytest.raises(UpstreamError):
            await pool.request("GET", "/tls", [], b"")
        pool.close()
        # and a certificate nobody vouches for: refused
        pool = UpstreamPool(f"https://localhost:{port}", 5)
        with pytest.raises(UpstreamError):
            await pool.request("GET", "/tls", [], b"")
        pool.close()
    finally:
        await runner.cleanup()


async def test_an_interim_100_continue_is_skipped():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")   # in a packet of its own
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(f"http://127.0.0.1:{port}", 5)
    try:
        resp = await pool.request("POST", "/x", [(b"Expect", b"100-continue")], b"body")
        assert resp.status == 200 and await body_of(resp) == b"ok"
    finally:
        pool.close()
        server.close()


async def test_header_spellings_beyond_the_kept_bound_are_all_read_right():
    """The pool learns what to do with each header spelling (bounded at 256,
    then it starts over): 600 spellings across answers, odd cases of the
    names that matter among them, are each relayed, dropped or read."""
    async def many(request: web.Request) -> web.Response:
        n = int(request.query["n"])
        resp = web.Response(body=b"{}", content_type="application/json")
        resp.headers[f"X-Spelling-{n}"] = str(n)
        return resp

    app = web.Application()
    app.router.add_get("/many", many)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = UpstreamPool(f"http://127.0.0.1:{port}", 5, drop=[b"connection", b"keep-alive"])
    try:
        for n in range(600):
            resp = await pool.request("GET", f"/many?n={n}", [], b"")
            relayed = dict(resp.relay_headers)
            assert relayed[f"X-Spelling-{n}".encode()] == str(n).encode()
            assert resp.content_length == 2 and resp.content_type.startswith(b"application/json")
            assert not any(name.lower() in (b"content-length", b"connection") for name in relayed)
            assert await body_of(resp) == b"{}"
            assert len(pool.header_kinds) <= 256
    finally:
        pool.close()
        await runner.cleanup()


# ---------------------------------------------------------------- a malicious or broken upstream

class RawUpstream:
    """An upstream written with raw sockets: `answer(n, request_bytes)` says
    what to send back to the n-th request (None: close without answering)."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "RawUpstream":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                reply = self.answer(len(self.requests), request)
                if reply is None:
                    break
                if isinstance(reply, bytes):
                    writer.write(reply)
                else:                                   # an iterator of pieces: stream them
                    for piece in reply:
                        writer.write(piece)
                        await writer.drain()
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            pass
        finally:
            writer.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("method, sends", [("POST", 1), ("GET", 2)])
async def test_a_post_is_never_sent_twice_and_a_get_is_retried_once_on_a_new_connection(method, sends):
    """The upstream answers the first call, then reads every later request
    whole and closes without answering."""
    async with RawUpstream(lambda n, req: OK if n == 1 else None) as up:
        pool = UpstreamPool(f"http://127.0.0.1:{up.port}", 5)
        try:
            assert await body_of(await pool.request("GET", "/warm", [], b"")) == b"ok"   # now pooled
            with pytest.raises(UpstreamError, match="closed the connection"):
                await pool.request(method, "/cgi-bin/message/custom/send", [], b'{"touser":"o"}')
            sent = [r for r in up.requests if b"/custom/send" in r]
            assert len(sent) == sends
        finally:
            pool.close()


async def test_a_stale_pooled_connection_is_replaced_for_a_get():
    """The classic race: the upstream drops the pooled connection as the next
    request arrives; a GET goes again on a new connection and succeeds."""
    async with RawUpstream(lambda n, req: None if n == 2 else OK) as up:
        pool = UpstreamPool(f"http://127.0.0.1:{up.port}", 5)
        try:
            assert await body_of(await pool.request("GET", "/a", [], b"")) == b"ok"
            resp = await pool.request("GET", "/b", [], b"")
            assert resp.status == 200 and await body_of(resp) == b"ok"
            assert [r.split(b" ")[1] for r in up.requests] == [b"/a", b"/b", b"/b"]
        finally:
            pool.close()


async def test_bytes_after_a_complete_answer_close_the_connection_and_the_next_call_is_answered():
    # The first answer is followed by the start of another one nobody asked for.
    stray = OK + b"HTTP/1.1 200 OK\r\nX-Stray: 1\r\nContent-Length: 5\r\n\r\n"
    async with RawUpstream(lambda n, req: stray if n == 1 else OK) as up:
        pool = UpstreamPool(f"http://127.0.0.1:{up.port}", 2)
        try:
            resp = await pool.request("GET", "/one", [], b"")
            assert await body_of(resp) == b"ok"
            assert b"X-Stray" not in b"".join(name for name, _ in resp.relay_headers)
            resp = await asyncio.wait_for(pool.request("GET", "/two", [], b""), 3)
            assert resp.status == 200 and await body_of(resp) == b"ok"
            assert pool._free == 100 and len(up.requests) == 2
        finally:
            pool.close()


async def test_an_endless_answer_header_line_is_a_quick_error_with_bounded_reading():
    def endless(n, req):
        yield b"HTTP/1.1 200 OK\r\nX-A: "
        for _ in range(1024):                              # up to 64 MiB, never a CRLF
            yield b"a" * 65536

    async with RawUpstream(endless) as up:
        pool = UpstreamPool(f"http://127.0.0.1:{up.port}", 5)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(UpstreamError, match="answer head over 65536 bytes"):
                await pool.request("GET", "/x", [], b"")
            assert asyncio.get_running_loop().time() - started < 2
        finally:
            pool.close()


async def test_an_answer_with_thousands_of_headers_is_refused():
    many = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5000)) + \
        b"Content-Length: 2\r\n\r\nok"
    async with RawUpstream(lambda n, req: many) as up:
        pool = UpstreamPool(f"http://127.0.0.1:{up.port}", 5)
        try:
            with pytest.raises(UpstreamError, match="more than 256 headers"):
                await pool.request("GET", "/x", [], b"")
        finally:
            pool.close()


async def test_headers_the_upstream_names_in_connection_are_not_relayed():
    answer = (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop, x-other\r\nX-Hop: secret\r\n"
              b"X-Other: 1\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok")
    async with RawUpstream(lambda n, req: answer) as up:
        pool = UpstreamPool(f"http://127.0.0.1:{up.port}", 5)
        try:
            resp = await pool.request("GET", "/x", [], b"")
            assert dict(resp.relay_headers) == {b"X-Kept": b"yes"}
            assert await body_of(resp) == b"ok"
        finally:
            pool.close()


async def test_waiting_for_a_pool_slot_is_bounded_by_the_upstream_timeout(upstream):
    pool = UpstreamPool(f"http://127.0.0.1:{upstream}", 0.3, limit=1)
    held = await pool.request("GET", "/big", [], b"")       # holds the only slot, never read
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout, match="no upstream connection free within 0.3 s"):
            await pool.request("GET", "/a", [], b"")
        assert 0.25 < asyncio.get_running_loop().time() - started < 1.5
        assert not pool._line
    finally:
        held.release()
        pool.close()
