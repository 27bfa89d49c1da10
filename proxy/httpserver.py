"""The proxy port's HTTP/1.1 server: an asyncio protocol parsing with httptools.

aiohttp's server side had become about a third of a proxied call (request
objects, header multidicts, response preparation, its writer). The proxy
port needs little of it: one handler, the target and headers as the bytes
that came, answers written as one buffer. The admin port keeps aiohttp.

One connection handles one request at a time; pipelined requests wait
their turn (reading pauses meanwhile). A connection with no request in
hand is closed after `idle_timeout`: an idle keep-alive connection and a
client that dribbles its headers (slowloris) alike. Request heads are
bounded (a JSON 431 and the connection closed beyond the hard limits),
bodies by `max_body`, and a body must arrive within `body_timeout`.
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

import httptools

log = logging.getLogger("proxy.httpserver")

# Hard limits of a request head; the forwarder answers JSON 414/431 well
# below them (forward.py). Beyond these the head is not even kept.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_COUNT = 256

Header = tuple[bytes, bytes]
JSON_HEADER: Header = (b"Content-Type", b"application/json; charset=utf-8")
_NONE: list[bytes] = []                # shared, never appended to
_NO_NOTES: dict[bytes, bytes] = {}     # shared, never written to

# Method names as text, decoded once (others are decoded as they come).
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT")}

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

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)   # asyncio and uvloop set TCP_NODELAY themselves
        self.timer = self.loop.call_later(self.server.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT, or Upgrade with `Connection: upgrade`: the request is
            # answered (CONNECT with a 405), then the connection closes.
            self._no_more_requests()
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _HeadTooLarge):
                self._refuse(refused.status, str(refused))
            else:
                log.error("request parser callback failed: %r", refused)
                self._refuse(400, "malformed request")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request ({exc.__class__.__name__})")

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
        if self._connection:
            self._connection = []
        self._keep_alive_asked = False
        if self._noted:
            self._noted = _NO_NOTES

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge(f"URL over {MAX_HEAD_BYTES} bytes", status=414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")
        if len(self._headers) > MAX_HEAD_COUNT:
            raise _HeadTooLarge(f"more than {MAX_HEAD_COUNT} request headers")
        if len(name) in self.server.name_lengths:     # only names of these lengths matter here
            lower = name.lower()
            if lower == b"content-length":
                self._body_exists = value.strip() not in (b"0", b"")
            elif lower == b"transfer-encoding":
                self._body_exists = True
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
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        # Kept alive with no (Proxy-)Connection header is HTTP/1.1 (1.0 closes
        # by default); httptools formats the version text anew on every ask.
        version = "1.1" if keep_alive and not self._keep_alive_asked else parser.get_http_version()
        # self._connection: a list made for this request, or the shared empty one.
        req = Request(self, _METHODS.get(method) or method.decode("ascii", "replace"), self._url.decode("latin-1"),
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
        if self.parsing is not None:
            self.parsing._feed(body)

    def on_message_complete(self) -> None:
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
        if self.parsing is not None:
            self.parsing._fail(BodyError(400, "malformed request body"))
        if self.current is None and not self.pipeline:
            body = json_error_body(why)
            self.write(b"".join((status_line(status), JSON_HEADER[0], b": ", JSON_HEADER[1], b"\r\n",
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body), body)))
            self.close()

    def _no_more_requests(self) -> None:
        self.keep_alive = False
        self._linger = False
        self._pause_reading()

    # -- transport

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            self._drain = self.loop.create_future()
            await self._drain
        if self.closed:
            raise ConnectionResetError("the client went away")

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


class _HeadTooLarge(Exception):
    def __init__(self, why: str, status: int = 431):
        super().__init__(why)
        self.status = status


class HttpServer:
    """Listens on one socket; `shutdown` stops accepting, lets calls in hand
    finish within the grace, then cuts what is left."""

    def __init__(self, handler: Handler, *, idle_timeout: float, body_timeout: float, max_body: int,
                 noted: Iterable[bytes] = ()):
        self.handler = handler
        # Request headers (lower-case names) whose first value each request
        # carries in `Request.noted`, read while parsing: no search per call.
        self.noted = frozenset(noted)
        self.name_lengths = frozenset({10, 14, 16, 17} | {len(name) for name in self.noted})
        self.idle_timeout = idle_timeout
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
