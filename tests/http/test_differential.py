"""Differential tests: the proxy port's request parsing (proxy/http/server.py)
and the upstream client's answer parsing (proxy/http/client.py) against h11,
the strict reference parser. Messages are built from HTTP's parts and from
near misses: each near miss alone in an otherwise valid message (a fixed
sweep), and mixes of them drawn by Hypothesis. Whatever h11 refuses, we must
refuse too; where both take a message they must read the same body or status.
Where we refuse what h11 takes, the difference is one the sidecar means to
make and README lists (documented_stricter and answer_documented_stricter
below); anything else is a failure."""
from __future__ import annotations

import asyncio
from typing import Callable

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http.client import UpstreamError, UpstreamPool
from proxy.http.client import _Connection as UpstreamConnection
from proxy.http.server import BodyError, HttpServer, Reply, Request
from proxy.http.server import _Connection as RequestConnection


class FakeTransport:
    """Enough of an asyncio transport to drive a protocol without a socket."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def write_eof(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


# ---------------------------------------------------------------- requests

PARTS: dict[str, tuple[list, list]] = {}      # name -> (valid, broken), for the one-miss-at-a-time sweep


def mostly(valid: list, broken: list, name: str = "") -> st.SearchStrategy:
    """A valid part seven times in eight, so that whole valid messages are
    common and each near miss is tried alone as well as with others."""
    if name:
        PARTS[name] = (valid, broken)
    return st.sampled_from([False] * 7 + [True]).flatmap(lambda bad: st.sampled_from(broken if bad else valid))


METHODS = mostly(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"],
                 ["get", "G ET", "GET\t", ""], "methods")
TARGETS = mostly(["/", "/cgi-bin/user/info?openid=o", "/a#frag", "*"],
                 ["/a b", "/a\x00", "/%zz", "/a?b=\x7f", "/ä".encode("utf-8").decode("latin-1"), "", "/a\rb"],
                 "targets")
VERSIONS = mostly(["HTTP/1.1", "HTTP/1.0"],
                  ["HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "http/1.1", "HTTP/1.1 ", "HTTP/11", ""], "versions")
NAMES = mostly(["X-A", "x-a", "Content-Type", "User-Agent", "Accept"],
               ["X A", "X-A ", " X-A", "X:A", "", "X\x00A"], "names")
VALUES = mostly(["v", "", " v ", "a\tb", "ä".encode("utf-8").decode("latin-1"), "1"],
                ["v\x00", "\x7f", "v\rx"], "values")
EOLS = mostly(["\r\n"], ["\n", "\r"], "eols")
FRAMING = mostly([
    ("", b""), ("Content-Length: 3\r\n", b"abc"), ("Content-Length: 0\r\n", b""),
    ("Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    ("Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"),
    ("Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
], [
    ("Content-Length: 3\r\nContent-Length: 4\r\n", b"abc"),
    ("Content-Length: -1\r\n", b""), ("Content-Length: 3x\r\n", b"abc"), ("Content-Length: +3\r\n", b"abc"),
    ("Transfer-Encoding: chunked\r\n", b"3;ext=1\r\nabc\r\n0\r\n\r\n"),
    ("Transfer-Encoding: chunked\r\n", b"z\r\nabc\r\n0\r\n\r\n"),
    ("Transfer-Encoding: chunked\r\n", b"3\r\nabcd\r\n0\r\n\r\n"),
    ("Transfer-Encoding: gzip, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    ("Transfer-Encoding: chunked, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    ("Transfer-Encoding: identity\r\n", b""),
    ("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    ("X-F: a\r\n b\r\n", b""),                                       # obs-fold
], "framing")
HOSTS = mostly(["Host: x\r\n"], ["", "Host: a\r\nHost: b\r\n", "Host: \r\n"], "hosts")


def build_request(method: str = "GET", target: str = "/", version: str = "HTTP/1.1", host: str = "Host: x\r\n",
                  names: tuple[str, ...] = ("X-A",), values: tuple[str, ...] = ("v",),
                  framing: tuple[str, bytes] = ("", b""), eol: str = "\r\n") -> bytes:
    line = f"{method} {target} {version}".rstrip(" ") if version is not None else f"{method} {target}"
    headers = "".join(f"{n}: {v}\r\n" for n, v in zip(names, values))
    head = (line + "\r\n" + host + headers + framing[0] + "\r\n").replace("\r\n", eol)
    return head.encode("latin-1") + framing[1]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(0, 3))
    return build_request(
        draw(METHODS), draw(TARGETS), draw(VERSIONS) if draw(mostly([True], [False])) else None, draw(HOSTS),
        tuple(draw(NAMES) for _ in range(count)), tuple(draw(VALUES) for _ in range(count)),
        draw(FRAMING), draw(EOLS))


def one_miss_at_a_time() -> list[bytes]:
    """Every broken part alone in an otherwise valid request (and without a
    version at all): the sweep that does not depend on Hypothesis's luck."""
    keys = {"methods": "method", "targets": "target", "versions": "version", "hosts": "host", "eols": "eol",
            "framing": "framing"}
    cases = [build_request(version=None)]
    for part, (_, broken) in PARTS.items():
        for bad in broken if part in keys or part in ("names", "values") else ():
            if part == "names":
                cases.append(build_request(names=(bad,)))
            elif part == "values":
                cases.append(build_request(values=(bad,)))
            else:
                cases.append(build_request(**{keys[part]: bad}))
    return cases


def h11_request(data: bytes) -> tuple[str, bytes]:
    """('ok', body) when h11 reads one whole request, ('refused', b'') when it
    raises, ('incomplete', b'') when it wants more bytes."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    conn.receive_data(b"")            # the client is done sending
    body = b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return "ok", body
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return "incomplete", b""
    except h11.RemoteProtocolError:
        return "refused", b""


async def ours_request(data: bytes) -> tuple[str, bytes]:
    seen: list[bytes] = []

    async def handler(request: Request) -> Reply:
        try:
            seen.append(await request.read())
        except BodyError:
            return Reply(400, [], b"bad body")
        return Reply(200, [], b"ok")

    server = HttpServer(handler, idle_timeout=5, body_timeout=0.2, max_body=1 << 20)
    conn = RequestConnection(server)
    transport = FakeTransport()
    conn.connection_made(transport)        # type: ignore[arg-type]
    conn.data_received(data)
    for _ in range(5):
        await asyncio.sleep(0)
    if conn.task is not None and not conn.task.done() and not seen:
        await asyncio.sleep(0.25)          # a body that never completes: the handler sees 408
    if conn.timer is not None:
        conn.timer.cancel()
    if conn.task is not None:
        conn.task.cancel()
    status = bytes(transport.written[9:12])
    if seen and status == b"200":
        return "ok", seen[0]
    if status[:1] in (b"4", b"5"):
        return "refused", b""
    return "incomplete", b""


def documented_stricter(data: bytes) -> bool:
    """Where the sidecar refuses what h11 takes, on purpose (module docstring)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    return (
        b"\n" in data.replace(b"\r\n", b"")            # bare LF or CR line ends: llhttp is strict (RFC 9112 §2.2)
        or b"\r" in data.replace(b"\r\n", b"")
        or b"\r\n " in head or b"\r\n\t" in head        # obs-fold: RFC 9112 §5.2 lets a server refuse it
        or b"ext=" in data                              # chunk extensions are not ours to relay
        or b"Host: \r\n" in head                         # an empty Host names nothing to check
        # only HTTP/1.0 and 1.1 are served: 2.0 is 505, 0.9 and 1.2+ are 400 (llhttp knows no 1.2)
        or head.split(b"\r\n", 1)[0].rsplit(b" ", 1)[-1] not in (b"HTTP/1.0", b"HTTP/1.1")
        or b"HTTP/1.0" in head.split(b"\r\n", 1)[0] and b"Transfer-Encoding" in head   # RFC 9112 §6.1
        or not head.split(b" ", 1)[0].isupper()         # a method outside the relayed set: 405/501, not 200
        or b"\x7f" in head                              # DEL is no field-vchar (RFC 9110 §5.5); h11 takes it
        or head.count(b"Content-Length") > 1             # even equal ones, as nginx (RFC 9112 §6.3 allows it)
        # both framings: smuggling's signature, refused as nginx does (RFC 9112 §6.1 lets a server)
        or b"Transfer-Encoding" in head and b"Content-Length" in head
    )


def compare(data: bytes, theirs: tuple[str, object], ours: tuple[str, object],
            stricter: Callable[[bytes], bool]) -> None:
    """Whatever h11 refuses we refuse; where we refuse what h11 takes, it is a
    documented stricter case; where both take it, both read the same thing
    (the body of a request, the status of an answer)."""
    (their_verdict, their_reading), (our_verdict, our_reading) = theirs, ours
    if their_verdict == "refused":
        assert our_verdict != "ok", data
    elif their_verdict == "ok" and our_verdict != "ok":
        assert stricter(data), (data, our_verdict)
    if their_verdict == "ok" and our_verdict == "ok":
        assert our_reading == their_reading, data


async def check_request(data: bytes) -> None:
    compare(data, h11_request(data), await ours_request(data), documented_stricter)


@given(data=requests())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_the_proxy_port_refuses_every_request_h11_refuses(data):
    await check_request(data)


async def test_each_near_miss_alone_is_refused_where_h11_refuses_it():
    cases = one_miss_at_a_time()
    assert len(cases) > 30
    for data in cases:
        await check_request(data)


# ---------------------------------------------------------------- answers from upstream

STATUS_LINES = mostly(["HTTP/1.1 200 OK", "HTTP/1.1 200", "HTTP/1.1 404 Not Found", "HTTP/1.0 200 OK",
                       "HTTP/1.1 204 No Content"],
                      ["HTTP/1.1 2000 OK", "HTTP/1.1 20 OK", "HTTP/2 200", "HTTP/1.1 abc OK", "ICY 200 OK",
                       "HTTP/1.1 100 Continue"], "status")
ANSWER_FRAMING = mostly([
    ("Content-Length: 2\r\n", b"ok"), ("Transfer-Encoding: chunked\r\n", b"2\r\nok\r\n0\r\n\r\n"),
], [
    ("Content-Length: 2\r\nContent-Length: 3\r\n", b"ok"),
    ("Content-Length: x\r\n", b"ok"), ("Content-Length: -2\r\n", b"ok"),
    ("Transfer-Encoding: chunked\r\n", b"g\r\nok\r\n0\r\n\r\n"),
    ("Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", b"2\r\nok\r\n0\r\n\r\n"),
    ("X-F: a\r\n b\r\nContent-Length: 2\r\n", b"ok"),
], "answer_framing")


def build_answer(status: str = "HTTP/1.1 200 OK", names: tuple[str, ...] = ("X-A",), values: tuple[str, ...] = ("v",),
                 framing: tuple[str, bytes] = ("Content-Length: 2\r\n", b"ok")) -> bytes:
    headers = "".join(f"{n}: {v}\r\n" for n, v in zip(names, values))
    return (status + "\r\n" + headers + framing[0] + "\r\n").encode("latin-1") + framing[1]


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(0, 3))
    return build_answer(draw(STATUS_LINES), tuple(draw(NAMES) for _ in range(count)),
                        tuple(draw(VALUES) for _ in range(count)), draw(ANSWER_FRAMING))


def h11_answer(data: bytes) -> tuple[str, int]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                return "ok", event.status_code
            if event is h11.NEED_DATA:
                return "incomplete", 0
    except h11.RemoteProtocolError:
        return "refused", 0


async def ours_answer(data: bytes) -> tuple[str, int]:
    pool = UpstreamPool("http://127.0.0.1:9", 5)
    conn = UpstreamConnection(pool)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    response = conn.start(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False)
    conn.data_received(data)
    pool.close()
    done = response.headers_done
    if not done.done():
        return "incomplete", 0
    try:
        done.result()
    except UpstreamError:
        return "refused", 0
    return "ok", response.status


def answer_documented_stricter(data: bytes) -> bool:
    head = data.split(b"\r\n\r\n", 1)[0]
    return (b"\r\n " in head              # obs-fold in an answer: refused (RFC 9112 §5.2)
            or b"\x7f" in head            # DEL is no field-vchar (RFC 9110 §5.5); h11 takes it
            # both framings: "ought to be handled as an error" (RFC 9112 §6.3), h11 lets TE win
            or b"Transfer-Encoding" in head and b"Content-Length" in head)


async def check_answer(data: bytes) -> None:
    compare(data, h11_answer(data), await ours_answer(data), answer_documented_stricter)


@given(data=answers())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_the_upstream_client_refuses_every_answer_h11_refuses(data):
    await check_answer(data)


async def test_each_near_miss_in_an_answer_alone_is_refused_where_h11_refuses_it():
    cases = [build_answer(status=bad) for bad in PARTS["status"][1]]
    cases += [build_answer(framing=bad) for bad in PARTS["answer_framing"][1]]
    cases += [build_answer(names=(bad,)) for bad in PARTS["names"][1]]
    cases += [build_answer(values=(bad,)) for bad in PARTS["values"][1]]
    assert len(cases) > 20
    for data in cases:
        await check_answer(data)
