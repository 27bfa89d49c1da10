"""How the sidecar reaches WeChat (DESIGN.md, "Egress"): directly or through
an HTTP CONNECT proxy (a fixed-IP egress that WeChat's IP whitelist names),
TLS checked for the WeChat host with the system's CAs plus `ca_file` (a
TLS-inspecting corporate proxy), and which of `upstream.base_url` and its
`fallback` hosts (WeChat's disaster-recovery domain) a call goes to first.

One `Egress` per sidecar serves both halves: the business calls' pool
(`client.UpstreamPool` opens its connections here) and the token, ticket and
platform fetches (`EgressSession` wraps their aiohttp session).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

log = logging.getLogger("proxy.egress")

# After this many connect failures in a row to the primary host, calls go to
# the fallback first for PREFER_FALLBACK_S, then the primary is tried again
# (DESIGN.md). One failure is a blip; three in a row is an outage.
PREFER_FALLBACK_AFTER = 3
PREFER_FALLBACK_S = 60.0

# A request written to a host that hung up before answering goes to the next
# host only when it is safe to send twice (RFC 9110 §9.2.1; DESIGN.md, "Egress").
RESENDABLE_METHODS = frozenset({"GET", "HEAD"})

# A proxy's answer to CONNECT is a status line and a few headers.
MAX_CONNECT_HEAD = 16 * 1024


class TunnelRefused(Exception):
    """The proxy answered CONNECT with something else than 2xx."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}".strip())
        self.status, self.reason = status, reason

    @property
    def is_connect_failure(self) -> bool:
        """5xx: the proxy could not reach the host (a fallback may help);
        407 / 403: the proxy says no (no other host will change that)."""
        return self.status >= 500


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: bytes | None       # the Proxy-Authorization value, Basic; never logged

    @classmethod
    def from_url(cls, url: str) -> "Proxy":
        parts = urlsplit(url)
        auth = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth = b"Basic " + base64.b64encode(pair)
        return cls(parts.hostname or "", parts.port or 3128, auth)

    def __repr__(self) -> str:
        return f"Proxy({self.host}:{self.port}{', with credentials' if self.authorization else ''})"


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """The system's CAs, plus those of `ca_file`; hostnames checked."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


class _Handshake(asyncio.Protocol):
    """The proxy's answer to CONNECT: bytes up to the end of its head."""

    def __init__(self) -> None:
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if self.head.done():
            return
        if end >= 0:
            self.head.set_result(bytes(self.buffer[:end]))
            del self.buffer[:end + 4]
        elif len(self.buffer) > MAX_CONNECT_HEAD:
            self.head.set_exception(TunnelRefused(502, "the egress proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("the egress proxy closed the connection during CONNECT"))


async def open_tunnel(proxy: Proxy, host: str, port: int) -> tuple[asyncio.Transport, bytes]:
    """A TCP connection through `proxy` to host:port (HTTP CONNECT,
    RFC 9110 §9.3.6), ready for TLS or plain HTTP, and any bytes already
    received past the proxy's answer; TunnelRefused when the proxy says no.
    The sidecar never resolves `host` itself: the proxy does."""
    loop = asyncio.get_running_loop()
    transport, handshake = await loop.create_connection(_Handshake, proxy.host, proxy.port)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = [f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")]
        if proxy.authorization is not None:
            head.append(b"Proxy-Authorization: " + proxy.authorization + b"\r\n")
        transport.write(b"".join(head) + b"\r\n")
        answer = await handshake.head
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise TunnelRefused(502, "the egress proxy's answer to CONNECT is not HTTP")
        if not 200 <= int(code) < 300:
            raise TunnelRefused(int(code), reason[:64])
    except BaseException:
        transport.close()
        raise
    return transport, bytes(handshake.buffer)   # type: ignore[return-value]


class Egress:
    """The way out to WeChat, and which host of base_url + fallback is preferred."""

    def __init__(self, primary: str, fallback: tuple[str, ...] = (), proxy_url: str = "", ca_file: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.primary = primary.rstrip("/")
        self.hosts = (self.primary, *(f.rstrip("/") for f in fallback))
        self.proxy = Proxy.from_url(proxy_url) if proxy_url else None
        self.proxy_url = proxy_url
        self.ssl = tls_context(ca_file)
        self.clock = clock
        self.failures = 0                  # connect failures to the primary in a row
        self.prefer_fallback_until = 0.0
        self.switches = 0                  # calls and fetches moved to another host after a connect failure

    def bases(self, base: str) -> tuple[str, ...]:
        """The hosts to try for a call to `base`, in order: only base_url
        has fallbacks (an app's own upstream, WeCom's, has none)."""
        if base != self.primary or len(self.hosts) == 1:
            return (base,)
        if self.clock() < self.prefer_fallback_until:
            return (*self.hosts[1:], self.primary)
        return self.hosts

    def connected(self, base: str) -> None:
        if base == self.primary:
            self.failures = 0

    def connect_failed(self, base: str, moving_on: bool, counted: bool = True) -> None:
        """A connection to `base` could not be made (`counted`), or it hung
        up on a request that may go elsewhere; `moving_on`: the call goes to
        the next host."""
        if moving_on:
            self.switches += 1
        if base != self.primary or not counted:
            return
        self.failures += 1
        if self.failures >= PREFER_FALLBACK_AFTER and self.clock() >= self.prefer_fallback_until \
                and len(self.hosts) > 1:
            self.prefer_fallback_until = self.clock() + PREFER_FALLBACK_S
            log.warning("%d connect failures in a row to %s: preferring %s for %.0f s", self.failures,
                        self.primary, self.hosts[1], PREFER_FALLBACK_S, extra={"event": "upstream_fallback"})

    async def tunnel(self, host: str, port: int, use_tls: bool,
                     protocol_factory: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """A connection to WeChat's host:port through the proxy, with
        `protocol_factory()`'s protocol on it (a direct one is the pool's own)."""
        assert self.proxy is not None
        loop = asyncio.get_running_loop()
        raw, early = await open_tunnel(self.proxy, host, port)
        protocol = protocol_factory()
        try:
            if use_tls:
                # TLS to the WeChat host inside the tunnel: SNI and certificate
                # for that host, not the proxy.
                transport = await loop.start_tls(raw, protocol, self.ssl, server_hostname=host)
                if transport is None:
                    raise ConnectionError("TLS through the tunnel did not start")
            else:
                raw.set_protocol(protocol)
                transport = raw
        except BaseException:
            raw.close()
            raise
        protocol.connection_made(transport)
        if early and not use_tls:
            protocol.data_received(early)        # the upstream spoke first (plain HTTP only)
        return protocol


class _Attempts:
    """`async with session.request(...)` over the egress's hosts in turn:
    a connection that cannot be made goes to the next host (nothing was
    written to the first), and so does a GET the host hung up on before
    answering; anything else is the answer, or the error."""

    def __init__(self, owner: "EgressSession", method: str, url: str, kwargs: dict[str, Any]):
        self.owner, self.method, self.url, self.kwargs = owner, method, url, kwargs
        self.response: Any = None

    async def __aenter__(self) -> Any:
        import aiohttp
        egress, primary = self.owner.egress, self.owner.egress.primary
        bases = egress.bases(primary) if self.url.startswith(primary + "/") else (None,)
        for index, base in enumerate(bases):
            url = self.url if base is None else base + self.url[len(primary):]
            last = index == len(bases) - 1
            try:
                self.response = await self.owner.session.request(self.method, url, **self.kwargs)
            except aiohttp.ClientHttpProxyError as exc:
                if base is not None and exc.status >= 500 and not last:
                    egress.connect_failed(base, moving_on=True)
                    continue
                raise
            except aiohttp.ClientConnectorError:
                if base is not None:
                    egress.connect_failed(base, moving_on=not last)
                if last:
                    raise
                continue
            except aiohttp.ServerDisconnectedError:
                # The host hung up before answering: a GET may go to the next one.
                if base is None or last or self.method not in RESENDABLE_METHODS:
                    raise
                egress.connect_failed(base, moving_on=True, counted=False)
                continue
            if base is not None:
                egress.connected(base)
            return self.response
        raise AssertionError("unreachable")

    async def __aexit__(self, *exc: object) -> None:
        if self.response is not None:
            self.response.release()


class EgressSession:
    """The fetches' aiohttp session, through the egress: its proxy (aiohttp
    sends CONNECT for https), its CAs (the connector's TLS context) and the
    fallback hosts of base_url."""

    def __init__(self, egress: Egress, **session_kwargs: Any):
        import aiohttp
        self.egress = egress
        connector = aiohttp.TCPConnector(limit=10, ttl_dns_cache=300, ssl=egress.ssl)
        self.session = aiohttp.ClientSession(connector=connector, proxy=egress.proxy_url or None,
                                             **session_kwargs)

    def request(self, method: str, url: str, **kwargs: Any) -> _Attempts:
        return _Attempts(self, method, url, kwargs)

    def post(self, url: str, **kwargs: Any) -> _Attempts:
        return _Attempts(self, "POST", url, kwargs)

    def get(self, url: str, **kwargs: Any) -> _Attempts:
        return _Attempts(self, "GET", url, kwargs)

    async def close(self) -> None:
        await self.session.close()

    @property
    def closed(self) -> bool:
        return self.session.closed
