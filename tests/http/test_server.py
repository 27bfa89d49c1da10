"""The proxy port's HTTP/1.1 server (proxy/http/server.py) on its own, over
real sockets: keep-alive, pipelining, HTTP/1.0, bodies, limits, streaming
with backpressure, idle connections, graceful shutdown."""
from __future__ import annotations

import asyncio
import json
import socket
from typing import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.server import BodyError, HttpServer, Reply, Request

Handler = Callable[[Request], Awaitable[Reply]]
TEXT = (b"Content-Type", b"text/plain")


async def echo(request: Request) -> Reply:
    """Answers what it saw; `?sleep=s` waits first."""
    if "sleep=" in request.query:
        await asyncio.sleep(float(request.query.split("sleep=")[1]))
    try:
        body = await request.read()
    except BodyError as exc:
        return Reply(exc.status, [TEXT], exc.why.encode())
    seen = {"method": request.method, "path": request.path, "query": request.query,
            "version": request.version, "body": body.decode("latin-1"),
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers]}
    return Reply(200, [(b"Content-Type", b"application/json")], json.dumps(seen).encode())


class Served:
    def __init__(self, server: HttpServer):
        self.server = server
        self.port = server.port

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    servers: list[HttpServer] = []

    async def start(handler: Handler = echo, *, idle_timeout: float = 5, body_timeout: float = 5,
                    max_body: int = 1 << 20, noted: tuple[bytes, ...] = (),
                    send_timeout: float | None = None) -> Served:
        extra = {} if send_timeout is None else {"send_timeout": send_timeout}
        server = HttpServer(handler, idle_timeout=idle_timeout, body_timeout=body_timeout, max_body=max_body,
                            noted=noted, **extra)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        await server.start(sock)
        servers.append(server)
        return Served(server)

    yield start
    for server in servers:
        await server.shutdown(1)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer off a keep-alive connection (Content-Length, chunked or to EOF)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = await asyncio.wait_for(reader.read(), 5)
    return status, headers, body


async def closed_by_server(reader: asyncio.StreamReader, within: float = 5) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True


async def test_keep_alive_and_pipelined_requests_answer_in_order(serve):
    served = await serve()
    reader, writer = await served.open()
    # The first is slow: the second, already parsed, must wait its turn.
    writer.write(b"GET /one?sleep=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                 b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = [await read_answer(reader) for _ in range(3)]
    assert [json.loads(body)["path"] for _, _, body in answers] == ["/one", "/two", "/three"]
    assert json.loads(answers[1][2])["body"] == "hello"
    assert all(headers.get("connection") is None for _, headers, _ in answers)
    writer.write(b"GET /four HTTP/1.1\r\nHost: x\r\n\r\n")          # still open
    assert json.loads((await read_answer(reader))[2])["path"] == "/four"
    writer.close()


async def test_target_and_headers_reach_the_handler_as_sent(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"GET /a//b/%41?x=%2F&y=1 HTTP/1.1\r\nHost: x\r\nX-Case: MiXeD\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n")
    seen = json.loads((await read_answer(reader))[2])
    assert seen["path"] == "/a//b/%41" and seen["query"] == "x=%2F&y=1"
    assert seen["headers"] == [["Host", "x"], ["X-Case", "MiXeD"], ["X-Dup", "1"], ["X-Dup", "2"]]
    writer.close()


async def test_noted_headers_are_found_while_parsing_whatever_their_case(serve):
    async def noted(request: Request) -> Reply:
        seen = {k.decode(): v.decode() for k, v in request.noted.items()}
        return Reply(200, [TEXT], json.dumps(seen).encode())

    served = await serve(noted, noted=(b"x-request-id", b"x-wechat-app"))
    reader, writer = await served.open()
    # The first value of each noted name, any case; other names (of the same
    # length, too) are not noted; nothing carries over to the next request.
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\nX-REQUEST-ID: first\r\nx-request-id: second\r\n"
                 b"X-Wechat-App: mini\r\nX-Something: 1\r\n\r\n"
                 b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert json.loads((await read_answer(reader))[2]) == {"x-request-id": "first", "x-wechat-app": "mini"}
    assert json.loads((await read_answer(reader))[2]) == {}
    writer.close()


async def test_http_1_0_closes_unless_keep_alive_is_asked_for(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"GET /a HTTP/1.0\r\n\r\n")
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await closed_by_server(reader)
    reader, writer = await served.open()
    writer.write(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, _ = await read_answer(reader)
    assert headers["connection"] == "keep-alive"
    writer.write(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert json.loads((await read_answer(reader))[2])["path"] == "/b"
    writer.close()


@pytest.mark.parametrize("head, version", [
    (b"GET /v HTTP/1.1\r\nHost: x\r\n\r\n", "1.1"),
    (b"GET /v HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "1.1"),
    (b"GET /v HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", "1.1"),
    (b"GET /v HTTP/1.0\r\n\r\n", "1.0"),
    (b"GET /v HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", "1.0"),
    (b"GET /v HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n", "1.0"),   # llhttp keeps it alive too
])
async def test_the_handler_sees_the_request_s_http_version(serve, head, version):
    served = await serve()
    reader, writer = await served.open()
    writer.write(head)
    assert json.loads((await read_answer(reader))[2])["version"] == version
    writer.close()


async def test_connection_close_is_honoured(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    _, headers, _ = await read_answer(reader)
    assert headers["connection"] == "close" and await closed_by_server(reader)


async def test_chunked_request_bodies_are_decoded(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n")
    await asyncio.sleep(0.05)                          # the body arrives in pieces
    writer.write(b"4\r\ndefg\r\n0\r\n\r\n")
    assert json.loads((await read_answer(reader))[2])["body"] == "abcdefg"
    writer.close()


@pytest.mark.parametrize("connection", [b"", b"Connection: close\r\n"])
async def test_a_body_over_the_limit_gets_413_which_the_client_actually_reads(serve, connection):
    served = await serve(max_body=1000)
    reader, writer = await served.open()
    body = b"x" * 2_000_000                           # far more than the socket buffers
    writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\n%bContent-Length: %d\r\n\r\n" % (connection, len(body)))
    writer.write(body)
    status, headers, answer = await read_answer(reader)
    assert status == 413 and b"over 1000 bytes" in answer and headers["connection"] == "close"
    writer.close()


async def test_a_late_body_is_408_and_the_connection_closes(serve):
    served = await serve(body_timeout=0.3, idle_timeout=0.5)
    reader, writer = await served.open()
    writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    status, headers, answer = await read_answer(reader)
    assert status == 408 and headers["connection"] == "close"
    assert await closed_by_server(reader, within=3)


async def test_idle_and_dribbling_connections_are_closed(serve):
    served = await serve(idle_timeout=0.3)
    reader, writer = await served.open()
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_answer(reader)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await closed_by_server(reader)                  # idle keep-alive
    assert 0.25 < loop.time() - started < 2
    reader, writer = await served.open()
    writer.write(b"GET /a HTTP/1.1\r\n")                   # a head that never ends
    started = loop.time()
    for _ in range(20):
        writer.write(b"X-A: b\r\n")
        await asyncio.sleep(0.05)
        if reader.at_eof():
            break
    assert await closed_by_server(reader) and loop.time() - started < 2


async def test_malformed_requests_get_json_400_and_a_closed_connection(serve):
    served = await serve()
    for junk in (b"NOT HTTP\r\n\r\n", b"GET /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                 b"GET /a HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"):
        reader, writer = await served.open()
        writer.write(junk)
        status, headers, body = await read_answer(reader)
        assert status == 400 and json.loads(body)["errcode"] == -1, junk
        assert await closed_by_server(reader)


async def test_a_url_over_the_hard_limit_is_414(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"GET /a?q=" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_answer(reader)
    assert status == 414 and "URL over 65536 bytes" in json.loads(body)["errmsg"]
    assert await closed_by_server(reader)


async def test_a_request_head_over_the_hard_limit_is_431(serve):
    served = await serve()
    for head in (b"X-Big: " + b"v" * 70000 + b"\r\n", b"".join(b"X-%d: v\r\n" % i for i in range(300))):
        reader, writer = await served.open()
        writer.write(b"GET /a HTTP/1.1\r\n" + head + b"\r\n")
        status, _, body = await read_answer(reader)
        why = json.loads(body)["errmsg"]
        assert status == 431 and ("request head over" in why or "more than 256 request headers" in why), why
        assert await closed_by_server(reader)


async def test_a_handler_that_fails_gets_a_json_500_and_the_connection_survives(serve):
    async def flaky(request: Request) -> Reply:
        if request.path == "/boom":
            raise RuntimeError("bug")
        return await echo(request)

    served = await serve(flaky)
    reader, writer = await served.open()
    writer.write(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_answer(reader)
    assert status == 500 and json.loads(body) == {"errcode": -1, "errmsg": "sidecar: internal error"}
    writer.write(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_answer(reader))[0] == 200
    writer.close()


async def test_head_answers_carry_the_length_but_no_body(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Content-Length: " in head and b"Content-Length: 0" not in head
    # the next bytes are the second answer, not a body
    assert json.loads((await read_answer(reader))[2])["path"] == "/b"
    writer.close()


async def stream(request: Request, size: int, length: int | None, written: list[int]) -> Reply:
    request.start(200, [TEXT], length)
    piece = b"z" * 65536
    for _ in range(size // len(piece)):
        await request.write(piece)
        written[0] += len(piece)
    request.finish()
    return Reply(200)                          # streamed: the status it sent


async def test_streamed_answers_are_chunked_for_1_1_and_close_delimited_for_1_0(serve):
    served = await serve(lambda r: stream(r, 1 << 20, None, [0]))
    reader, writer = await served.open()
    writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_answer(reader)
    assert headers["transfer-encoding"] == "chunked" and len(body) == 1 << 20
    writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")          # reusable afterwards
    assert len((await read_answer(reader))[2]) == 1 << 20
    reader, writer = await served.open()
    writer.write(b"GET /s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = await read_answer(reader)
    assert headers["connection"] == "close" and "transfer-encoding" not in headers and len(body) == 1 << 20


async def test_streaming_waits_for_a_slow_client(serve):
    written = [0]
    served = await serve(lambda r: stream(r, 64 << 20, 64 << 20, written))
    reader, writer = await served.open()
    writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.5)                   # the client reads nothing meanwhile
    held = written[0]
    assert held < 16 << 20, held               # buffers, not 64 MiB, were written
    got = 0
    while got < 64 << 20:
        chunk = await asyncio.wait_for(reader.read(1 << 20), 5)
        assert chunk
        got += len(chunk)
    assert written[0] == 64 << 20
    writer.close()


async def test_shutdown_lets_calls_in_hand_finish_and_closes_idle_connections(serve):
    served = await serve()
    idle_reader, idle_writer = await served.open()
    idle_writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_answer(idle_reader)
    busy_reader, busy_writer = await served.open()
    busy_writer.write(b"GET /slow?sleep=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(served.server.shutdown(5))
    assert await closed_by_server(idle_reader, within=1)
    with pytest.raises(OSError):
        await served.open()                    # no longer accepting
    status, headers, body = await read_answer(busy_reader)
    assert status == 200 and headers["connection"] == "close"
    await asyncio.wait_for(stopping, 2)


async def test_shutdown_cuts_what_outlives_the_grace(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"GET /slow?sleep=30 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await served.server.shutdown(0.3)
    assert loop.time() - started < 1.5
    assert await closed_by_server(reader, within=1)


# ---------------------------------------------------------------- fragmentation

PIPELINE = (b"GET /one?a=1 HTTP/1.1\r\nHost: x\r\nX-Long-Header-Name: " + b"v" * 300 + b"\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
            b"POST /three HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nabcde\r\n3\r\nfgh\r\n0\r\n\r\n"
            b"GET /four HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


async def _send_in_pieces(cuts: list[int]) -> list[tuple[str, str]]:
    server = HttpServer(echo, idle_timeout=5, body_timeout=5, max_body=1 << 20)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    await server.start(sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        edges = [0, *sorted(set(c % len(PIPELINE) for c in cuts)), len(PIPELINE)]
        for start, end in zip(edges, edges[1:], strict=False):
            if end > start:
                writer.write(PIPELINE[start:end])
                await writer.drain()
                await asyncio.sleep(0.001)          # let the server see this piece alone
        seen = []
        for _ in range(4):
            _, _, body = await read_answer(reader)
            echo_ = json.loads(body)
            seen.append((echo_["path"], echo_["body"]))
        assert await closed_by_server(reader)
        writer.close()
        return seen
    finally:
        await server.shutdown(1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=10_000), max_size=12))
def test_requests_cut_anywhere_are_read_the_same(cuts):
    """However the bytes are split across reads (inside the request line, a
    header, the body, a chunk size), the same four answers come back in order."""
    seen = asyncio.run(_send_in_pieces(cuts))
    assert seen == [("/one", ""), ("/two", "hello world"), ("/three", "abcdefgh"), ("/four", "")]


# ---------------------------------------------------------------- hostile input (issue: raw-socket attacks)

async def _send_until_answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               piece: bytes, limit: int) -> int:
    """Write `piece` again and again until the server answers or closes; the bytes sent by then."""
    sent = 0
    while sent < limit:
        try:
            writer.write(piece)
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            break
        sent += len(piece)
        await asyncio.sleep(0)
        if reader._buffer or reader.at_eof():            # type: ignore[attr-defined]
            break
    return sent


@pytest.mark.parametrize("start", [
    b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: ",                                   # an endless header value
    b"GET /a HTTP/1.1\r\nHost: x\r\nX-",                                      # an endless header name
])
async def test_an_endless_header_line_is_431_once_the_raw_head_passes_the_limit(serve, start):
    served = await serve()
    reader, writer = await served.open()
    writer.write(start)
    sent = await _send_until_answered(reader, writer, b"a" * 8192, 8 * 1024 * 1024)
    # Refused while the line is still incomplete: a little over 64 KiB went
    # in, not the 8 MiB the client was ready to send.
    assert sent < 256 * 1024, sent
    status, headers, body = await read_answer(reader)
    assert status == 431 and "request head over 65536 bytes" in json.loads(body)["errmsg"]
    assert await closed_by_server(reader)


async def test_an_endless_trailer_line_fails_the_body_and_closes(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: ")
    sent = await _send_until_answered(reader, writer, b"t" * 8192, 8 * 1024 * 1024)
    assert sent < 256 * 1024, sent
    status, _, body = await read_answer(reader)
    assert status == 400 and b"malformed request body" in body
    assert await closed_by_server(reader)


async def test_trailers_are_read_and_never_become_headers(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n0\r\nX-Trailer: sneaky\r\nHost: evil\r\n\r\n"
                 b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    seen = json.loads((await read_answer(reader))[2])
    assert seen["body"] == "abc"
    assert [name for name, _ in seen["headers"]] == ["Host", "Transfer-Encoding"]
    assert json.loads((await read_answer(reader))[2])["path"] == "/next"   # the connection goes on
    writer.close()


@pytest.mark.parametrize("head, status", [
    (b"GET /x\r\n\r\n", 400),                                            # HTTP/0.9 style, no version
    (b"GET /q?x=a\r\nInjected: 1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),    # a header smuggled into the line
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                    # HTTP/1.1 without Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),              # two Hosts
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", 501),
    # chunked not last: the framing is unknowable (RFC 9112 §6.3), llhttp says 400
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", 400),
])
async def test_request_lines_and_framing_outside_http_1_x_are_refused_before_the_handler(serve, head, status):
    handled: list[str] = []

    async def record(request: Request) -> Reply:
        handled.append(request.target)
        return await echo(request)

    served = await serve(record)
    reader, writer = await served.open()
    writer.write(head)
    got, headers, body = await read_answer(reader)
    assert got == status and json.loads(body)["errcode"] == -1, body
    assert handled == []
    assert await closed_by_server(reader)


async def test_http_1_0_without_host_is_served(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"GET /old HTTP/1.0\r\n\r\n")
    status, _, body = await read_answer(reader)
    assert status == 200 and json.loads(body)["path"] == "/old"


async def test_a_fragment_never_reaches_the_handler(serve):
    served = await serve()
    reader, writer = await served.open()
    writer.write(b"GET /a?x=1#frag&access_token=t HTTP/1.1\r\nHost: x\r\n\r\nGET /b#f?y=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    first = json.loads((await read_answer(reader))[2])
    second = json.loads((await read_answer(reader))[2])
    assert (first["path"], first["query"]) == ("/a", "x=1")
    assert (second["path"], second["query"]) == ("/b", "")
    writer.close()


async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(serve):
    ended: list[str] = []

    async def endless(request: Request) -> Reply:
        request.start(200, [TEXT], None)
        try:
            while True:
                await request.write(b"z" * 65536)
        except ConnectionResetError:
            ended.append("reset")
            raise

    served = await serve(endless, idle_timeout=5, send_timeout=0.3)
    reader, writer = await served.open()
    writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")       # and never read
    await wait_for(lambda: ended == ["reset"] and not served.server.connections, 5)
    writer.close()


async def test_a_pipelining_client_that_never_reads_gets_no_further_answers_queued(serve):
    answered: list[str] = []

    async def big(request: Request) -> Reply:
        answered.append(request.path)
        return Reply(200, [TEXT], b"b" * (1 << 20))

    served = await serve(big, idle_timeout=5, send_timeout=0.3)
    reader, writer = await served.open()
    writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(200)))
    await wait_for(lambda: not served.server.connections, 5)
    # The socket buffers hold a few 1 MiB answers at most; then it was cut off.
    assert 1 <= len(answered) < 20
    writer.close()


async def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("raw", ["a%20b+c", "%E4%BD%A0%E5%A5%BD", "100%", "%zz%2", "plain", "%FF%FE", "ümlaut%C3%BC", ""])
def test_query_values_decode_as_unquote_plus_does(raw):
    from urllib.parse import unquote_plus

    from proxy.http.server import query_values
    assert query_values(f"x=1&url={raw}&y=2", "url") == [unquote_plus(raw)]
