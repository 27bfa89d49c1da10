"""A lean HTTP/1.1 client for the business calls to WeChat.

Profiling showed most of a call's CPU in aiohttp's ClientSession (URL
objects, cookie and header machinery, payload writers). This client keeps
per-upstream pools of keep-alive connections built on asyncio protocols,
writes each request as one buffer and parses answers with httptools (the
parser uvicorn uses). Bodies of any size stream with backpressure. TLS is
the standard library's, verified, with SNI. Token fetches keep using
aiohttp: they are rare and not on the hot path.
"""
from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Iterable
from urllib.parse import urlsplit

import httptools

from .egress import Egress, TunnelRefused

# A connection buffers at most this much answer body before it stops reading
# from the socket until the app has taken some (a 20 MiB download streams).
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

# An answer's head is bounded like a request's (httpserver.py): its raw
# bytes as they arrive, before httptools has a whole line, and its header
# count. Beyond either the answer is a 502 and the connection is closed.
MAX_ANSWER_HEAD_BYTES = 64 * 1024
MAX_ANSWER_HEADERS = 256

# An idle keep-alive connection older than this is closed rather than reused:
# the upstream may be closing it just as a request is written (nginx's
# `keepalive_timeout` is 75 s by default, aiohttp's server's too), and a
# request that may not be sent twice cannot be retried after that race.
IDLE_REUSE_S = 30.0

# Methods a stale pooled connection may be retried for (RFC 9110 §9.2.2:
# safe, so idempotent). WeChat's calls are GET and POST; a POST is never
# sent twice (urllib3 and Go's transport decide the same way).
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# What on_header does with a header (see UpstreamPool.header_kind).
_RELAY, _DROP, _LENGTH, _TYPE, _ENCODING, _CONNECTION = "relay", "drop", "length", "type", "encoding", "connection"


class UpstreamError(Exception):
    """The upstream could not be reached or broke off; message safe to show."""


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamBrokeOff(UpstreamError):
    """The connection closed after the request was written and before any
    byte of an answer: a safe request (GET, HEAD) may be sent to another host
    (DESIGN.md, "Egress"); any other may have been acted on."""


class UpstreamConnectTimeout(UpstreamTimeout, UpstreamConnectError):
    """No connection within the timeout: a timeout (504) and a connection
    never made (a fallback host may be tried)."""


class Response:
    """One upstream answer: status and headers at once, the body as it comes.
    What the forwarder needs of the headers is read while they are parsed:
    the length, type and encoding, and `relay_headers` (all but the pool's
    `drop` set and Content-Length, which is written for the bytes sent)."""

    __slots__ = ("_conn", "head_only", "status", "relay_headers", "content_type",
                 "content_encoding", "content_length", "keep_alive", "complete", "_chunks", "_buffered",
                 "_waiter", "_error", "headers_done", "_released")

    def __init__(self, conn: "_Connection", head_only: bool):
        self._conn = conn
        self.head_only = head_only
        self.status = 0
        self.relay_headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""               # lower case
        self.content_encoding = b""           # lower case, stripped
        self.content_length: int | None = None
        self.keep_alive = False
        self.complete = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.headers_done: asyncio.Future[None] = conn.loop.create_future()
        self._released = False

    # -- fed by the connection

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.complete:
            return
        self._error = exc
        if not self.headers_done.done():
            self.headers_done.set_exception(exc)
            self.headers_done.exception()   # seen: no "never retrieved" noise if nobody waits
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the forwarder

    async def read_chunk(self, timeout: float) -> bytes:
        """The next piece of body, b"" at the end."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            # A timer handle, not wait_for: this runs once per answer chunk.
            waiter = self._waiter = self._conn.loop.create_future()
            timer = self._conn.loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < LOW_WATER:
            self._conn.resume()
        return chunk

    async def read_up_to(self, limit: int, timeout: float) -> bytes:
        """Up to `limit` bytes of body (fewer only at the end)."""
        parts, size = [], 0
        while size < limit:
            chunk = await self.read_chunk(timeout)
            if not chunk:
                break
            if size + len(chunk) > limit:           # keep the rest for later readers
                keep = limit - size
                self._chunks.appendleft(chunk[keep:])
                self._buffered += len(chunk) - keep
                chunk = chunk[:keep]
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    def whole_body(self, limit: int) -> bytes | None:
        """The body at once if it has all arrived and is under `limit` bytes
        (a small answer usually has by the time its headers are seen)."""
        if not self.complete or self._buffered >= limit:
            return None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    def release(self) -> None:
        """Give the connection back (reused only if the answer was read whole)."""
        if self._released:
            return
        self._released = True
        self._conn.done(self, reusable=self.complete and self.keep_alive and not self._chunks)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("upstream timed out"))


def _line_expired(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(
            f"no upstream connection free within {timeout:g} s (every one is busy)"))


class _BadAnswer(Exception):
    """Raised in a parser callback: the answer is refused (502), the connection closed."""


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "UpstreamPool"):
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.header_kinds = pool.header_kinds      # the pool's, shared
        self.response: Response | None = None
        self._relay: list[tuple[bytes, bytes]] = []   # the response's relay_headers
        self.closed = False
        self.received_any = False
        self.interim = False
        self._paused = False
        self.deadline = 0.0            # for the answer's headers; see UpstreamPool._sweep
        self.idle_since = 0.0
        self._raw = 0                  # bytes of the answer's head so far
        self._headers = 0
        self._connection: list[bytes] = []   # the answer's Connection header values

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        response = self.response
        if response is None:
            self.close()                               # bytes nobody asked for
            return
        head = not response.headers_done.done()
        if head:
            self._raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken("upstream switched protocols")
        except httptools.HttpParserCallbackError as exc:
            self._broken(str(exc.__context__) if isinstance(exc.__context__, _BadAnswer)
                         else "unreadable answer from upstream")
        except httptools.HttpParserError as exc:
            self._broken(f"unreadable answer from upstream ({exc.__class__.__name__})")
        else:
            if head and self._raw > MAX_ANSWER_HEAD_BYTES and not response.headers_done.done():
                self._broken(f"upstream answer head over {MAX_ANSWER_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._connections.discard(self)
        if self.response is not None and not self.response.complete:
            if self.response.head_only and self.response.headers_done.done():
                self.response._finish()
            elif self.received_any:
                self.response._fail(UpstreamError("upstream closed the connection"))
            else:
                self.response._fail(UpstreamBrokeOff("upstream closed the connection"))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response.complete:
            # Bytes after a whole answer, with no request outstanding: the
            # connection's framing can no longer be trusted (h11 and aiohttp
            # refuse it too), so it is closed, never pooled.
            raise _BadAnswer("upstream sent bytes after a complete answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._headers > MAX_ANSWER_HEADERS:
            raise _BadAnswer(f"upstream answer with more than {MAX_ANSWER_HEADERS} headers")
        # The usual kinds first: this runs for every header of every answer.
        kind = self.header_kinds.get(name)
        if kind is _RELAY:
            self._relay.append((name, value))
        elif kind is _LENGTH:
            try:
                self.response.content_length = int(value)  # type: ignore[union-attr]
            except ValueError:
                pass
        elif kind is _TYPE:
            self.response.content_type = value.lower()  # type: ignore[union-attr]
            self._relay.append((name, value))
        elif kind is _DROP:
            pass
        elif kind is _ENCODING:
            self.response.content_encoding = value.strip().lower()  # type: ignore[union-attr]
            self._relay.append((name, value))
        elif kind is _CONNECTION:
            self._connection.append(value)
        else:                                        # a spelling not seen before: learn it, look again
            self.pool.header_kind(name)
            self.on_header(name, value)

    def on_headers_complete(self) -> None:
        response: Response = self.response  # type: ignore[assignment]   # parsing only while one is expected
        status = self.parser.get_status_code()
        if status < 200 and status >= 100 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.interim = True
            response.relay_headers.clear()
            response.content_length = None
            response.content_type = response.content_encoding = b""
            self._connection.clear()
            return
        if self._connection:
            # Headers the upstream named in Connection are for this hop only
            # (RFC 9110 §7.6.1): never relayed.
            named = {token.strip().lower() for value in self._connection for token in value.split(b",")}
            response.relay_headers[:] = [h for h in response.relay_headers if h[0].lower() not in named]
            self._connection.clear()
        response.status = status
        response.keep_alive = self.parser.should_keep_alive()
        done = response.headers_done
        if not done.done():
            done.set_result(None)
        if response.head_only:
            # A HEAD answer has no body whatever Content-Length says; the
            # parser would wait for one, so this connection is not reused.
            response.keep_alive = False
            response._finish()

    def on_body(self, body: bytes) -> None:
        self.response._feed(body)  # type: ignore[union-attr]   # parsing only while one is expected

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.response is not None:
            self.response._finish()

    # -- helpers

    def timed_out(self) -> None:
        if self.response is not None:
            self.response._fail(UpstreamTimeout("upstream timed out"))
        self.close()

    def _broken(self, why: str) -> None:
        if self.response is not None:
            self.response._fail(UpstreamError(why))
        self.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def start(self, request: bytes, head_only: bool) -> Response:
        # The parser carries over: a connection is reused only after an
        # answer it parsed to the end (never after HEAD; see on_headers_complete).
        response = self.response = Response(self, head_only)
        self._relay = response.relay_headers
        self._raw = self._headers = 0
        self.received_any = False
        self.deadline = self.loop.time() + self.pool.timeout
        self.transport.write(request)  # type: ignore[union-attr]   # a connection is made before it starts
        return response

    def done(self, response: Response, reusable: bool) -> None:
        if self.response is response:
            self.response = None
        if self._paused:
            self.resume()
        self.pool._give_back(self, reusable and not self.closed)


class UpstreamPool:
    """Keep-alive connections to one upstream; beyond `limit` calls queue."""

    def __init__(self, base_url: str, timeout_s: float, limit: int = 100,
                 ssl_context: ssl.SSLContext | None = None, drop: Iterable[bytes] = (),
                 egress: "Egress | None" = None):
        parts = urlsplit(base_url)
        self.base = base_url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        default_port = self.port == (443 if self.scheme == "https" else 80)
        self.host_header = (self.host if default_port else f"{self.host}:{self.port}").encode("idna")
        self.base_path = parts.path.rstrip("/")
        self.timeout = timeout_s
        self.egress = egress          # a CONNECT proxy on the way, if any (egress.py)
        if ssl_context is None and egress is not None:
            ssl_context = egress.ssl
        self.ssl = (ssl_context or ssl.create_default_context()) if self.scheme == "https" else None
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        # Calls beyond `limit` wait in line (asyncio.Semaphore's own check
        # walked its waiters on every acquire: 1 % of a call).
        self.limit = limit
        self._free = limit
        self._line: collections.deque[asyncio.Future[None]] = collections.deque()
        self._max_idle = limit   # every connection in use may be reused
        self.drop = frozenset(drop)   # lower-case header names kept out of relay_headers
        # What on_header does with a name, by the name's exact bytes: one
        # dict lookup for the few spellings an upstream uses (bounded).
        self.header_kinds: dict[bytes, str] = {}
        self._host_line = b" HTTP/1.1\r\nHost: " + self.host_header + b"\r\n"
        self._connections: set[_Connection] = set()
        # One timer per pool checks deadlines, instead of one per call: a
        # timeout fires at most a quarter of itself late.
        self._tick = min(1.0, max(0.05, timeout_s / 4))
        self._sweep_timer: asyncio.TimerHandle | None = None

    @property
    def free_slots(self) -> int:
        """Calls that could start now without waiting for a connection."""
        return self._free

    def header_kind(self, name: bytes) -> str:
        lower = name.lower()
        if lower == b"content-length":
            kind = _LENGTH          # never relayed: written for the bytes actually sent
        elif lower == b"connection":
            kind = _CONNECTION      # never relayed; the names it lists are dropped too
        elif lower in self.drop:
            kind = _DROP
        else:
            kind = {b"content-type": _TYPE, b"content-encoding": _ENCODING}.get(lower, _RELAY)
        if len(self.header_kinds) >= 256:          # bounded: odd spellings start it over
            self.header_kinds.clear()
        self.header_kinds[name] = kind             # always kept: on_header looks again
        return kind

    def _sweeping(self) -> None:
        if self._sweep_timer is None:
            self._sweep_timer = self.loop.call_later(self._tick, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        now = self.loop.time()
        waiting = False
        for conn in list(self._connections):
            response = conn.response
            if response is None or response.headers_done.done():
                continue
            if conn.deadline <= now:
                conn.timed_out()
            else:
                waiting = True
        if waiting:
            self._sweeping()

    async def _connect(self) -> _Connection:
        try:
            if self.egress is not None and self.egress.proxy is not None:
                conn = await asyncio.wait_for(self.egress.tunnel(
                    self.host, self.port, self.ssl is not None, lambda: _Connection(self)), self.timeout)
            else:
                _, conn = await asyncio.wait_for(self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None), self.timeout)
        except asyncio.TimeoutError:
            raise UpstreamConnectTimeout(f"connecting to upstream {self.host}:{self.port} timed out") from None
        except TunnelRefused as exc:
            why = f"the egress proxy refused the tunnel to {self.host}:{self.port}: {exc.status} {exc.reason}".rstrip()
            raise (UpstreamConnectError(why) if exc.is_connect_failure else UpstreamError(why)) from None
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            reason = getattr(exc, "strerror", None) or exc.__class__.__name__
            via = " through the egress proxy" if self.egress is not None and self.egress.proxy is not None else ""
            raise UpstreamConnectError(f"cannot connect to upstream {self.host}:{self.port}{via} ({reason})") from None
        return conn  # type: ignore[return-value]

    def _build(self, method: str, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> bytes:
        head = [f"{method} {self.base_path}{target}".encode("latin-1"), self._host_line]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        if body:
            head.append(body)
        return b"".join(head)

    async def request(self, method: str, target: str, headers: Iterable[tuple[bytes, bytes]],
                      body: bytes) -> Response:
        """Send one request; returns once the answer's headers are in.
        The caller must `release()` the response. One coroutine, awaiting
        the answer's headers future itself: this runs once per call."""
        data = self._build(method, target, headers, body)
        if self._free > 0:
            self._free -= 1
        else:
            await self._wait_for_slot()
        head_only = method == "HEAD"
        retry = method in RETRYABLE_METHODS
        try:
            while True:
                conn = self._idle_connection()
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                response = conn.start(data, head_only)
                done = response.headers_done
                try:
                    if done.done():
                        done.result()          # raises what failed it
                    else:
                        self._sweeping()       # the sweep enforces the timeout
                        await done
                    return response
                except UpstreamTimeout:
                    raise
                except UpstreamError:
                    # A pooled connection the upstream closed as the request
                    # went out: a safe request is sent once more, on a new
                    # connection; any other may have been processed already.
                    if not (retry and reused) or conn.received_any:
                        raise
                    retry = False
                    conn.close()
                    self._drop_idle()
        except BaseException:
            self._release_slot()
            raise

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection still worth reusing."""
        oldest = self.loop.time() - IDLE_REUSE_S
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.idle_since >= oldest:
                return conn
            conn.close()
        return None

    def _drop_idle(self) -> None:
        """After one pooled connection proved stale, the others (idle as
        long or longer) likely are too: a retry goes to a new connection."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _wait_for_slot(self) -> None:
        """Wait in line for a connection slot, at most the upstream timeout
        (then UpstreamTimeout, a 504): a queue that cannot move is an answer."""
        waiter = self.loop.create_future()
        self._line.append(waiter)
        timer = self.loop.call_later(self.timeout, _line_expired, waiter, self.timeout)
        try:
            await waiter
        except UpstreamTimeout:
            if waiter in self._line:
                self._line.remove(waiter)
            raise
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()          # handed a slot, but gone: pass it on
            elif waiter in self._line:
                self._line.remove(waiter)
            raise
        finally:
            timer.cancel()

    def _release_slot(self) -> None:
        while self._line:
            waiter = self._line.popleft()
            if not waiter.done():
                waiter.set_result(None)       # the slot goes straight to the next in line
                return
        self._free += 1

    def _give_back(self, conn: _Connection, reusable: bool) -> None:
        if self._line:
            self._release_slot()
        else:
            self._free += 1
        if reusable and len(self._idle) < self._max_idle:
            conn.idle_since = self.loop.time()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
