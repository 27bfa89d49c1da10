"""Where fetched tokens are kept so that every holder of the same credentials
uses one token, and who may fetch.

A store answers four things: the current token (`load`), "this token was
refused" as a compare-and-set (`reject`), "fetch unless someone already has"
as one exclusive step (`fetch_exclusive`), and how many fetches were made
today (`fetches_today`, capped). The memory store does this for one process;
the Redis store (redis_store.py) for a whole cluster.
"""
from __future__ import annotations

import hashlib
import time
from typing import Awaitable, Callable, Protocol

from cachetools import TLRUCache

from .policy import QUOTA_RESET_UTC_OFFSET_S, Token

Accept = Callable[[Token], bool]
FetchFn = Callable[[], Awaitable[Token]]
EventFn = Callable[[str, str], None]   # (event "new" | "rejected", token fingerprint)

# Default cap on token fetches per credential per day, across the cluster:
# well under /cgi-bin/token's 2000 a day (wechat-api-notes.md §3), leaving
# room for an operator's manual fetches and other tools.
DEFAULT_DAILY_FETCH_CAP = 1000


class StoreUnavailable(Exception):
    """The shared store cannot be reached; the message is safe to log."""


class FetchCapReached(Exception):
    """The configured daily fetch cap is used up."""


def fingerprint(value: str) -> str:
    """Names a token in logs and events without revealing it."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


# The memory store's short-lived entries (replay memory, message ids taken,
# replies kept for WeChat's retries): cachetools' TLRUCache drops each at its
# own end. Only pushes whose signature held make them, at WeChat's rate: a
# busy account's hour is far below this bound, past which the least recently
# used go first.
MAX_SHORT_LIVED = 100_000


def _ends(_key: str, value: tuple[str, float], now: float) -> float:
    return now + value[1]


def quota_day(wall_now: float) -> str:
    """The day WeChat's daily quotas count in (China time, see policy.py)."""
    return time.strftime("%Y%m%d", time.gmtime(wall_now + QUOTA_RESET_UTC_OFFSET_S))


class TokenStore(Protocol):
    async def load(self, key: str) -> Token | None: ...

    async def reject(self, key: str, bad_value: str) -> bool: ...

    async def fetch_exclusive(self, key: str, fetch: FetchFn, accept: Accept) -> tuple[Token, bool]: ...

    async def fetches_today(self, key: str) -> int | None: ...

    def watch(self, key: str, callback: EventFn) -> None: ...

    def unwatch(self, key: str, callback: EventFn) -> None: ...

    async def seed(self, key: str, token: Token) -> bool: ...

    # Small named values (a platform's component_verify_ticket).
    async def get_value(self, key: str) -> str | None: ...

    async def set_value(self, key: str, value: str) -> None: ...

    # A value that only moves forward: stored with its stamp (a push's
    # CreateTime) unless the stored one is newer; False when it was older.
    # set_value stores unconditionally and clears the stamp.
    async def set_value_if_newer(self, key: str, value: str, stamp: int) -> bool: ...

    # Replay memory: True the first time a key is claimed within ttl_s, on
    # every replica sharing the store; release_claim forgets it (the push it
    # stood for was not taken after all, and WeChat will send it again).
    async def claim_once(self, key: str, ttl_s: float) -> bool: ...

    async def release_claim(self, key: str) -> None: ...

    # A short-lived value (a push's reply, kept for WeChat's retries).
    async def set_value_ttl(self, key: str, value: str, ttl_s: float) -> None: ...

    async def get_value_ttl(self, key: str) -> str | None: ...

    # A platform's authorizers: appid -> refresh token, one registry per platform.
    async def registry_get(self, registry: str, appid: str) -> str | None: ...

    async def registry_put(self, registry: str, entries: dict[str, str]) -> None: ...

    async def registry_cas(self, registry: str, appid: str, old: str, new: str) -> bool: ...

    async def registry_remove(self, registry: str, appid: str, token_key: str) -> bool: ...

    async def registry_page(self, registry: str, cursor: int, count: int) -> tuple[int, list[str]]: ...

    async def registry_count(self, registry: str) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Watchers:
    """Who is told of a key's events (store events: "new", "rejected", "removed")."""

    def __init__(self) -> None:
        self._watchers: dict[str, list[EventFn]] = {}

    def watch(self, key: str, callback: EventFn) -> None:
        self._watchers.setdefault(key, []).append(callback)

    def unwatch(self, key: str, callback: EventFn) -> None:
        callbacks = self._watchers.get(key, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            self._watchers.pop(key, None)

    def tell(self, key: str, event: str, fp: str) -> None:
        for callback in list(self._watchers.get(key, ())):
            callback(event, fp)


class MemoryStore(Watchers):
    """One process's tokens. Apps in one sidecar with the same credentials share."""

    def __init__(self, daily_fetch_cap: int = DEFAULT_DAILY_FETCH_CAP,
                 wall: Callable[[], float] = time.time):
        self.daily_fetch_cap = daily_fetch_cap
        self.wall = wall
        self._tokens: dict[str, Token] = {}
        self._rejected: dict[str, str] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._values: dict[str, str] = {}
        self._stamps: dict[str, int] = {}
        self._claims: TLRUCache = TLRUCache(MAX_SHORT_LIVED, _ends)     # key -> ("", ttl)
        self._expiring: TLRUCache = TLRUCache(MAX_SHORT_LIVED, _ends)   # key -> (value, ttl)
        self._registries: dict[str, dict[str, str]] = {}
        # One process: the managers see every token change themselves; only
        # a removed authorizer is news to them.
        Watchers.__init__(self)

    async def start(self) -> None:
        return None

    async def seed(self, key: str, token: Token) -> bool:
        stored = self._tokens.get(key)
        if stored is not None and stored.fetched_at >= token.fetched_at:
            return False
        self._tokens[key] = token
        return True

    async def get_value(self, key: str) -> str | None:
        return self._values.get(key)

    async def set_value(self, key: str, value: str) -> None:
        self._values[key] = value
        self._stamps.pop(key, None)

    async def set_value_if_newer(self, key: str, value: str, stamp: int) -> bool:
        if self._stamps.get(key, stamp) > stamp:
            return False
        self._values[key], self._stamps[key] = value, stamp
        return True

    async def claim_once(self, key: str, ttl_s: float) -> bool:
        if key in self._claims:
            return False
        self._claims[key] = ("", ttl_s)
        return True

    async def release_claim(self, key: str) -> None:
        self._claims.pop(key, None)

    async def set_value_ttl(self, key: str, value: str, ttl_s: float) -> None:
        self._expiring[key] = (value, ttl_s)

    async def get_value_ttl(self, key: str) -> str | None:
        held = self._expiring.get(key)
        return held[0] if held is not None else None

    async def registry_get(self, registry: str, appid: str) -> str | None:
        return self._registries.get(registry, {}).get(appid)

    async def registry_put(self, registry: str, entries: dict[str, str]) -> None:
        self._registries.setdefault(registry, {}).update(entries)

    async def registry_cas(self, registry: str, appid: str, old: str, new: str) -> bool:
        entries = self._registries.get(registry, {})
        if entries.get(appid) != old:
            return False
        entries[appid] = new
        return True

    async def registry_remove(self, registry: str, appid: str, token_key: str) -> bool:
        removed = self._registries.get(registry, {}).pop(appid, None) is not None
        self._tokens.pop(token_key, None)
        self.tell(token_key, "removed", "")
        return removed

    async def registry_page(self, registry: str, cursor: int, count: int) -> tuple[int, list[str]]:
        appids = sorted(self._registries.get(registry, {}))
        page = appids[cursor:cursor + count]
        return (cursor + count if cursor + count < len(appids) else 0), page

    async def registry_count(self, registry: str) -> int:
        return len(self._registries.get(registry, {}))

    async def load(self, key: str) -> Token | None:
        token = self._tokens.get(key)
        if token is None or self._rejected.get(key) == token.value:
            return None
        return token

    async def reject(self, key: str, bad_value: str) -> bool:
        token = self._tokens.get(key)
        if token is None or token.value != bad_value or self._rejected.get(key) == bad_value:
            return False
        self._rejected[key] = bad_value
        return True

    async def fetch_exclusive(self, key: str, fetch: FetchFn, accept: Accept) -> tuple[Token, bool]:
        token = await self.load(key)
        if token is not None and accept(token):
            return token, False
        day = quota_day(self.wall())
        if self._counts.get((key, day), 0) >= self.daily_fetch_cap:
            raise FetchCapReached(f"daily fetch cap of {self.daily_fetch_cap} reached (store.daily_fetch_cap)")
        self._counts[(key, day)] = self._counts.get((key, day), 0) + 1
        token = await fetch()
        self._tokens[key] = token
        return token, True

    async def fetches_today(self, key: str) -> int | None:
        return self._counts.get((key, quota_day(self.wall())), 0)

    async def close(self) -> None:
        self._tokens.clear()
