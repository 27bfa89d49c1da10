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


def quota_day(wall_now: float) -> str:
    """The day WeChat's daily quotas count in (China time, see policy.py)."""
    return time.strftime("%Y%m%d", time.gmtime(wall_now + QUOTA_RESET_UTC_OFFSET_S))


class TokenStore(Protocol):
    async def load(self, key: str) -> Token | None: ...

    async def reject(self, key: str, bad_value: str) -> bool: ...

    async def fetch_exclusive(self, key: str, fetch: FetchFn, accept: Accept) -> tuple[Token, bool]: ...

    async def fetches_today(self, key: str) -> int | None: ...

    def watch(self, key: str, callback: EventFn) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """One process's tokens. Apps in one sidecar with the same credentials share."""

    def __init__(self, daily_fetch_cap: int = DEFAULT_DAILY_FETCH_CAP,
                 wall: Callable[[], float] = time.time):
        self.daily_fetch_cap = daily_fetch_cap
        self.wall = wall
        self._tokens: dict[str, Token] = {}
        self._rejected: dict[str, str] = {}
        self._counts: dict[tuple[str, str], int] = {}

    async def start(self) -> None:
        return None

    def watch(self, key: str, callback: EventFn) -> None:
        return None  # one process: the managers already see every change

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
