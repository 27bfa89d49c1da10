"""The proxy port's HTTP/1.1 server: an asyncio protocol parsing with httptools.

aiohttp's server side had become about a third of a proxied call (request
objects, header multidicts, response preparation, its writer). The proxy
port needs little of it: one handler, the target and headers as the bytes
that came, answers written as one buffer. The admin port keeps aiohttp.

One connection handles one request at a time; pipelined requests wait
their turn (reading pauses meanwhile). A connection with no request in
hand is closed after `idle_timeout`: an idle keep-alive connection and a
client that dribbles its headers (slowloris) alike. Request heads are
bounded as their raw bytes arrive (a JSON 431 and the connection closed
beyond the hard limits), bodies by `max_body`, and a body must arrive
within `body_timeout`. A client that stops reading its answer is cut off
after `send_timeout` without progress (nginx's `send_timeout`).

Strictness follows RFC 9112 and h11 where llhttp is more lenient: only
`HTTP/1.0` and `HTTP/1.1` request lines (llhttp also takes HTTP/0.9's
version-less line and `HTTP/2.0`), exactly one Host in HTTP/1.1, no
transfer coding but `chunked`, trailers read and discarded (RFC 9110 §6.5.1,
as nginx does), and a `#fragment` never part of the target.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
from email.utils import formatdate
from http import HTTPStatus
from typing import Awaitable, Callable, Iterable
from urllib.parse import unquote_to_bytes

import httptools

log = logging.getLogger("proxy.httpserver")

# Hard limits of a request head; the forwarder answers JSON 414/431 well
# below them (forward.py). Beyond these the head is not even kept. The
# bytes are counted as they arrive, before httptools has a complete line
# (an endless header line once grew to 67 MiB): h11 stops at 16 KiB of an
# incomplete head (`max_incomplete_event_size`), nginx at 4 x 8 KiB
# (`large_client_header_buffers`); 64 KiB leaves room above the forwarder's
# own 8 KiB URL and 32 KiB header limits. Trailers have the same bound.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_COUNT = 256

# After refusing a request whose bytes are still coming, the connection is
# half-closed and what arrives is read and dropped for a while before the
# close: closing with unread bytes makes the kernel send a reset, which can
# destroy the refusal before the client reads it (nginx's `lingering_close`,
# with its `lingering_timeout` of 5 s; ours is shorter, and bounded in bytes).
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024

Header = tuple[bytes, bytes]
JSON_HEADER: Header = (b"Content-Type", b"application/json; charset=utf-8")
_NONE: list[bytes] = []                # shared, never appended to
_NO_NOTES: dict[bytes, bytes] = {}     # shared, never written to

# Method names as text, decoded once (others are decoded as they come).
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT",
                                     "TRACE")}

# The only request versions served (RFC 9112 §2.3: HTTP/1.x); `HTTP/2.0` in a
# request line is 505, anything else (HTTP/0.9's line without a version) 400.
_VERSIONS = frozenset({"1.0", "1.1"})

def query_values(raw_query: str, name: str) -> list[str]:
    """The decoded values of one query parameter, read by hand: the few
    local answers that read a parameter do it per call, and parse_qs took
    8 µs a call there."""
    values = []
    for part in raw_query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            # unquote_plus's result, a third faster (its str path splits on a regex).
            values.append(unquote_to_bytes(value.replace("+", " ")).decode("utf-8", "replace"))
    return values


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_NO_BODY_STATUSES = frozenset({204, 304})


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def json_error_body(why: str) -> bytes:
    """A sidecar-made error in WeChat's shape (DESIGN.md)."""
    return json.dumps({"errcode": -1, "errmsg": f"sidecar: {why}"}, ensure_ascii=False).encode()


def http_date() -> bytes:
    return formatdate(usegmt=True).encode()


class BodyError(Exception):
    """The request body could not be had; `status` and `why` say what to answer."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status
        self.why = why


class Reply:
    """A complete answer for the connection to write; `outcome` labels
    sidecar-made answers. A handler that streamed its answer itself (through
    `Request.start`) returns just the status it sent: the connection sees it
    started and writes nothing more."""

    __slots__ = ("status", "headers", "body", "outcome")

    def __init__(self, status: int, headers: Iterable[Header] = (), body: bytes = b"", outcome: str = ""):
        self.status = status
        self.headers = headers
        self.body = body
        self.outcome = outcome


class Request:
    """One request as it came: method, target, version and headers as parsed,
    the body on demand; answers go back through `start`/`write`/`finish`."""

    __slots__ = ("method", "target", "path", "query", "version", "raw_headers", "head_bytes",
                 "keep_alive", "body_exists", "connection", "noted", "_conn", "_parts", "_size", "complete", "_error",
                 "_waiter", "_state", "_chunked")

    def __init__(self, conn: "_Connection", method: str, target: str, version: str,
                 raw_headers: list[Header], head_bytes: int, keep_alive: bool, body_exists: bool,
                 connection: list[bytes] = _NONE, noted: dict[bytes, bytes] = _NO_NOTES):
        self._conn = conn
        self.method = method
        self.target = target                   # path and query, exactly as sent
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.version = version                 # "1.1", "1.0"
        self.raw_headers = raw_headers
        self.head_bytes = head_bytes
        self.keep_alive = keep_alive
        self.body_exists = body_exists
        self.connection = connection            # the values of Connection headers
        self.noted = noted                      # the server's `noted` headers: first value by name
        self._parts: list[bytes] = _NONE        # made when a body comes
        self._size = 0
        self.complete = not body_exists
        self._error: BodyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._state = 0                        # 0 nothing sent, 1 streaming, 2 done
        self._chunked = False

    def header(self, lower_name: bytes) -> str | None:
        """The first header of that (lower-case) name, as text."""
        for name, value in self.raw_headers:
            if len(name) == len(lower_name) and name.lower() == lower_name:
                return value.decode("latin-1")
        return None

    # -- body

    def _feed(self, data: bytes) -> None:
        if self._error is not None:
            return                               # over the limit: the rest is dropped
        self._size += len(data)
        if self._size > self._conn.server.max_body:
            self._parts.clear()
            self._fail(BodyError(413, f"request body over {self._conn.server.max_body} bytes"))
            return
        if self._parts is _NONE:
            self._parts = []
        self._parts.append(data)

    def _complete(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: BodyError) -> None:
        if self._error is None and not self.complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The whole body; BodyError when it is too large, broken or late."""
        if not self.complete and self._error is None:
            conn = self._conn
            timeout = conn.server.body_timeout
            waiter = self._waiter = conn.loop.create_future()
            timer = conn.loop.call_later(timeout, self._fail, BodyError(
                408, f"request body not received within {timeout:g} s"))
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._error is not None:
            raise self._error
        return b"".join(self._parts)

    def send_continue(self) -> None:
        """`100 Continue`, for a client that waits for it before sending the body."""
        if not self.complete and self._state == 0:
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- answer

    def start(self, status: int, headers: Iterable[Header], content_length: int | None) -> None:
        """Send the status line and headers of a streamed answer."""
        no_body = self.method == "HEAD" or status in _NO_BODY_STATUSES
        self._chunked = content_length is None and not no_body and self.version == "1.1"
        keep = self._conn.keep(self) and (content_length is not None or self._chunked or no_body)
        self._state = 1
        self._conn.write(self._conn.head(self, status, headers, content_length, keep, self._chunked))

    async def write(self, data: bytes) -> None:
        """A piece of a streamed answer; waits while the client is slow."""
        conn = self._conn
        if conn.closed:
            raise ConnectionResetError("the client went away")
        if self._chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.write(data)
        if conn.write_paused:
            await conn.drain()

    def finish(self) -> None:
        if self._state == 1 and self._chunked:
            self._conn.write(b"0\r\n\r\n")
        self._state = 2

    def abort(self) -> None:
        """Cut the connection: the client sees a truncated answer, not a short one."""
        self._state = 2
        self._conn.keep_alive = False
        self._conn.close()


Handler = Callable[[Request], Awaitable[Reply]]


class _Connection(asyncio.Protocol):
    def __init__(self, server: "HttpServer"):
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True                   # false once no further request may follow
        self.current: Request | None = None      # being handled
        self.parsing: Request | None = None      # whose body is being received
        self.pipeline: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[Request | None] | None = None   # the task waiting for a request
        self.idle_since = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._linger = False
        # the request head being parsed
        self._url: bytes = b""
        self._headers: list[Header] = []
        self._head_bytes = 0
        self._body_exists = False
        self._connection: list[bytes] = []
        self._keep_alive_asked = False           # a Connection or Proxy-Connection header came
        self._noted: dict[bytes, bytes] = _NO_NOTES
        self._hosts = 0                          # Host headers seen
        self._te: bytes | None = None            # Transfer-Encoding, all values joined
        # Raw bytes received since the last body byte, head completed or
        # request completed: a head (or trailers) growing without bound.
        self._in_head = True                     # a head is expected or being parsed
        self._raw = 0
        self._refused = False                    # a request was refused: linger, then close
        self._discard = 0                        # > 0: lingering, bytes still to drop

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)   # asyncio and uvloop set TCP_NODELAY themselves
        self.timer = self.loop.call_later(self.server.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._discard:
            self._discard -= len(data)
            if self._discard <= 0:
                self.close()
            return
        self._raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT, or Upgrade with `Connection: upgrade`: the request is
            # answered (CONNECT with a 405), then the connection closes.
            self._no_more_requests()
            return
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, str(refused))
            else:
                log.error("request parser callback failed: %r", refused)
                self._refuse(400, "malformed request")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request ({exc.__class__.__name__})")
            return
        if self._raw > MAX_HEAD_BYTES and self.keep_alive:
            # httptools holds an incomplete header line until its CRLF comes:
            # refuse before it grows (defect seen: 67 MiB of one endless line).
            if self._in_head:
                self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
            else:
                self._refuse(400, f"request trailers over {MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        for req in (self.parsing, *self.pipeline):
            if req is not None:
                req._fail(BodyError(400, "the client closed the connection"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        if not self.server.connections and self.server._all_closed is not None:
            self.server._all_closed.set()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._body_exists = False
        self._in_head = True
        self._hosts = 0
        self._te = None
        if self._connection:
            self._connection = []
        self._keep_alive_asked = False
        if self._noted:
            self._noted = _NO_NOTES

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refused(f"URL over {MAX_HEAD_BYTES} bytes", status=414)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer (after a chunked body): read and dropped, never
            # forwarded (RFC 9110 §6.5.1); its bytes count in `_raw`.
            return
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refused(f"request head over {MAX_HEAD_BYTES} bytes")
        if len(self._headers) > MAX_HEAD_COUNT:
            raise _Refused(f"more than {MAX_HEAD_COUNT} request headers")
        if len(name) in self.server.name_lengths:     # only names of these lengths matter here
            lower = name.lower()
            if lower == b"host":
                self._hosts += 1
            if lower == b"content-length":
                self._body_exists = value.strip() not in (b"0", b"")
            elif lower == b"transfer-encoding":
                self._body_exists = True
                self._te = value if self._te is None else self._te + b"," + value
            elif lower == b"connection":
                self._connection.append(value)
                self._keep_alive_asked = True
            elif lower == b"proxy-connection":      # llhttp reads it as Connection
                self._keep_alive_asked = True
            elif lower in self.server.noted and lower not in self._noted:
                if self._noted is _NO_NOTES:
                    self._noted = {}
                self._noted[lower] = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        self._in_head = False
        self._raw = 0
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        # Kept alive with no (Proxy-)Connection header is HTTP/1.1 (llhttp
        # refuses 1.2 and above; 1.0, 0.9 and 2.0 close by default); httptools
        # formats the version text anew on every ask.
        version = "1.1" if keep_alive and not self._keep_alive_asked else parser.get_http_version()
        if version not in _VERSIONS:
            if version == "2.0":
                raise _Refused("HTTP/2.0 request line: only HTTP/1.0 and HTTP/1.1 are served", status=505)
            raise _Refused("malformed request line: it must be method, target and HTTP/1.x", status=400)
        if self._hosts != 1 and (self._hosts or version == "1.1"):
            raise _Refused("an HTTP/1.1 request needs exactly one Host header" if self._hosts == 0
                           else "more than one Host header", status=400)
        if self._te is not None:
            if version == "1.0":
                raise _Refused("Transfer-Encoding in an HTTP/1.0 request", status=400)
            if self._te.strip().lower() != b"chunked":
                # RFC 9112 §6.1: a coding the server does not understand is 501.
                raise _Refused("only Transfer-Encoding: chunked is supported", status=501)
        url = self._url
        if b"#" in url:
            url = url.partition(b"#")[0]     # a fragment is the client's own (RFC 9110 §4.2.5)
        # self._connection: a list made for this request, or the shared empty one.
        req = Request(self, _METHODS.get(method) or method.decode("ascii", "replace"), url.decode("latin-1"),
                      version, self._headers, self._head_bytes, keep_alive, self._body_exists,
                      self._connection or _NONE, self._noted)
        self.parsing = req if req.body_exists else None
        if not self.keep_alive:
            return                      # closing: a request after the last one is not answered
        if self.current is None:
            self._serve(req)
        else:
            self.pipeline.append(req)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        self._raw = 0
        if self.parsing is not None:
            self.parsing._feed(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._raw = 0
        if self.parsing is not None:
            self.parsing._complete()
            self.parsing = None
        if self._linger and self.current is None:
            self.close()

    # -- serving

    def _serve(self, req: Request) -> None:
        """Hand `req` to the connection's task, waiting for it or started now.
        One task a connection, not one a request (a task costs more than a
        future to wake)."""
        self.current = req
        waiter = self._next
        if waiter is not None:
            self._next = None
            waiter.set_result(req)
        else:
            self.task = self.loop.create_task(self._run(req))

    async def _run(self, req: Request | None) -> None:
        """Answer the connection's requests in turn until it closes."""
        while req is not None:
            try:
                reply = await self.server.handler(req)
            except Exception:
                log.exception("unexpected error handling %s %s", req.method, req.path)
                reply = Reply(500, [JSON_HEADER], json_error_body("internal error"), "bad_request")
            if req._state == 0:
                self.write(self.head(req, reply.status, reply.headers, len(reply.body), self.keep(req), False,
                                     reply.body))
                if self.write_paused:
                    # A client that pipelines and never reads: take no further
                    # request until it reads this answer (or is cut off).
                    try:
                        await self.drain()
                    except ConnectionResetError:
                        pass
            elif req._state == 1:       # a handler that started an answer and left it
                req.abort()
            req = self._done()
            if req is None and self.keep_alive and not self.closed:
                self._next = self.loop.create_future()
                req = await self._next      # None when the connection closes
        self.task = None

    def keep(self, req: Request) -> bool:
        """Whether the connection stays open after `req`'s answer."""
        if not req.complete:
            # The body is still coming (or never will): answer, then close;
            # read on a little so the client sees the answer, not a reset
            # (unless the parser has failed, when there is nothing to drain).
            if self.keep_alive:
                self._linger = True
            return False
        return req.keep_alive and self.keep_alive and not self.server.closing

    def head(self, req: Request, status: int, headers: Iterable[Header], length: int | None,
             keep: bool, chunked: bool, body: bytes = b"") -> bytes:
        parts = [_STATUS_LINES.get(status) or status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if status in _NO_BODY_STATUSES or status < 200:
            body = b""
        elif length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if not keep:
            self.keep_alive = False
            parts.append(b"Connection: close\r\n")
        elif req.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if body and req.method != "HEAD":
            parts.append(body)
        return b"".join(parts)

    def _done(self) -> Request | None:
        """After an answer: the next request if one is waiting, else None."""
        self.current = None
        if self.closed:
            return None
        if not self.keep_alive:
            if self._linger and self.parsing is not None:
                # Drain what is left of the body, then close; the idle timer ends it anyway.
                self.idle_since = self.loop.time()
                self._resume_reading()
                return None
            if self._refused:
                self._linger_close()
            else:
                self.close()
            return None
        if self.pipeline:
            self.current = self.pipeline.popleft()
            if not self.pipeline:
                self._resume_reading()
            return self.current
        self.idle_since = self.loop.time()
        self._resume_reading()
        return None

    def _check_idle(self) -> None:
        if self.closed:
            return
        timeout = self.server.idle_timeout
        if self.current is None and not self.pipeline:
            idle = self.loop.time() - self.idle_since
            if idle >= timeout:
                self.close()
                return
            timeout -= idle
        self.timer = self.loop.call_later(timeout, self._check_idle)

    def _refuse(self, status: int, why: str) -> None:
        """A request the parser cannot take: answer it if nothing else is
        being answered, and close; otherwise just close after the current one."""
        self._no_more_requests()
        self._refused = True
        if self.parsing is not None:
            self.parsing._fail(BodyError(400, "malformed request body"))
        if self.current is None and not self.pipeline:
            body = json_error_body(why)
            self.write(b"".join((status_line(status), JSON_HEADER[0], b": ", JSON_HEADER[1], b"\r\n",
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body), body)))
            self._linger_close()

    def _linger_close(self) -> None:
        """Send what is written and a FIN, drop what still comes in (up to
        LINGER_BYTES, for LINGER_S at most), then close."""
        transport = self.transport
        if self.closed or transport is None:
            return
        try:
            transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            self.close()
            return
        self._discard = LINGER_BYTES
        self._resume_reading()
        self.loop.call_later(LINGER_S, self.close)

    def _no_more_requests(self) -> None:
        self.keep_alive = False
        self._linger = False
        self._pause_reading()

    # -- transport

    def write(self, data: bytes) -> None:
        if not self.closed and not self._discard and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the client has read enough of what was written; a client
        that reads nothing for `send_timeout` is cut off (its upstream
        connection is then given back by whoever was streaming to it)."""
        if self.write_paused and not self.closed:
            drain = self._drain = self.loop.create_future()
            timer = self.loop.call_later(self.server.send_timeout, self._stalled, drain)
            try:
                await drain
            finally:
                timer.cancel()
        if self.closed:
            raise ConnectionResetError("the client went away")

    def _stalled(self, drain: asyncio.Future[None]) -> None:
        if drain.done() or self.closed:
            return
        log.warning("client read nothing for %g s: connection closed", self.server.send_timeout,
                    extra={"event": "client_stalled"})
        self.keep_alive = False
        self.closed = True
        if self.transport is not None:
            self.transport.abort()          # what is buffered would never be read
        drain.set_result(None)

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.closed and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closed and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()           # what is buffered is sent first

    def close_if_idle(self) -> None:
        if self.current is None and not self.pipeline:
            self.close()


class _Refused(Exception):
    """Raised in a parser callback: answer `status` with `why`, then close."""

    def __init__(self, why: str, status: int = 431):
        super().__init__(why)
        self.status = status


class HttpServer:
    """Listens on one socket; `shutdown` stops accepting, lets calls in hand
    finish within the grace, then cuts what is left."""

    def __init__(self, handler: Handler, *, idle_timeout: float, body_timeout: float, max_body: int,
                 noted: Iterable[bytes] = (), send_timeout: float | None = None):
        self.handler = handler
        # Request headers (lower-case names) whose first value each request
        # carries in `Request.noted`, read while parsing: no search per call.
        self.noted = frozenset(noted)
        self.name_lengths = frozenset({4, 10, 14, 16, 17} | {len(name) for name in self.noted})
        self.idle_timeout = idle_timeout
        # A write that makes no progress this long ends the connection.
        self.send_timeout = idle_timeout if send_timeout is None else send_timeout
        self.body_timeout = body_timeout
        self.max_body = max_body
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._all_closed: asyncio.Event | None = None

    async def start(self, sock: socket.socket) -> None:
        self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, grace: float) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.close_if_idle()               # the busy ones close after their answer
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), grace)
            except asyncio.TimeoutError:
                pass
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.abort()
