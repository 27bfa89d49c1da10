"""The upstream connection pools of the outbound side, one per upstream
base URL, all opened through the sidecar's egress; and the one place a call
moves to WeChat's fallback host when its host cannot be connected to
(DESIGN.md, "Egress"): nothing was written to the first host, so any call
may move; a request already written never does (the pool raises something
else than UpstreamConnectError for it)."""
from __future__ import annotations

from typing import Iterable

from ..http.client import Response, UpstreamBrokeOff, UpstreamConnectError, UpstreamError, UpstreamPool
from ..http.egress import RESENDABLE_METHODS, Egress

# Hop-by-hop headers (RFC 9110 §7.6.1) and ours: never forwarded either way.
# Content-Length is recomputed for the bytes actually sent.
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
    "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    "Host", "Content-Length", "X-WeChat-App", "X-WeChat-Authorizer",
    # The sidecar answers the app's 100-continue itself and holds the whole
    # body; forwarded, it would only make the upstream send an interim 100.
    "Expect",
))
HOP_BY_HOP_BYTES = frozenset(h.lower().encode() for h in HOP_BY_HOP)

# Upstream connections kept per upstream; calls beyond it queue for a free one.
UPSTREAM_POOL_LIMIT = 100


class Pools(dict[str, UpstreamPool]):
    """base URL -> its pool, made on first use."""

    def __init__(self, timeout_s: float, egress: Egress | None = None):
        super().__init__()
        self.timeout_s, self.egress = timeout_s, egress
        self.fallbacks = egress is not None and len(egress.hosts) > 1   # read on the request path

    def pool(self, base: str) -> UpstreamPool:
        pool = self.get(base)
        if pool is None:
            pool = self[base] = UpstreamPool(base, self.timeout_s, UPSTREAM_POOL_LIMIT, drop=HOP_BY_HOP_BYTES,
                                             egress=self.egress)
        return pool

    def first(self, base: str) -> UpstreamPool:
        """The pool of the host a call to `base` goes to first (the fallback
        while it is preferred, DESIGN.md)."""
        if self.fallbacks:
            base = self.egress.bases(base)[0]  # type: ignore[union-attr]
        pool = self.get(base)
        return pool if pool is not None else self.pool(base)

    async def request(self, pool: UpstreamPool, method: str, target: str,
                      headers: Iterable[tuple[bytes, bytes]], body: bytes) -> Response:
        """`pool.request`, and when its host could not be connected to (or
        hung up on a GET/HEAD before answering), the next hosts in turn;
        UpstreamError (or a subclass) when none answers."""
        try:
            return await pool.request(method, target, headers, body)
        except UpstreamError as exc:
            return await self.fallback(pool, method, target, headers, body, exc)

    async def fallback(self, pool: UpstreamPool, method: str, target: str, headers: Iterable[tuple[bytes, bytes]],
                       body: bytes, failed: UpstreamError) -> Response:
        """After `pool` failed with `failed`: the next hosts in turn when
        nothing was written (a connect failure) or the request may be sent
        twice (a GET/HEAD the host hung up on), else `failed` raised again;
        the last failure when no host answers. Called only on a failure, so
        a call that is answered pays for nothing here."""
        if isinstance(failed, UpstreamConnectError):
            counted = True                     # a connect failure: counts toward preferring the fallback
        elif isinstance(failed, UpstreamBrokeOff) and method in RESENDABLE_METHODS:
            counted = False                    # the host took the connection: says nothing of connecting
        else:
            raise failed
        egress = self.egress
        bases = egress.bases(pool.base) if egress is not None else (pool.base,)
        at = bases.index(pool.base) if pool.base in bases else len(bases) - 1
        for index in range(at, len(bases)):
            if index > at:
                try:
                    resp = await self.pool(bases[index]).request(method, target, headers, body)
                except UpstreamConnectError as exc:
                    failed, counted = exc, True
                else:
                    egress.connected(bases[index])  # type: ignore[union-attr]
                    return resp
            if egress is not None:
                egress.connect_failed(bases[index], moving_on=index + 1 < len(bases), counted=counted)
        raise failed

    def close(self) -> None:
        for pool in self.values():
            pool.close()
