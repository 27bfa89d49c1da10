"""TokenManager: one app's token, fetched once, refreshed ahead, invalidated
only if still current, with never more than one fetch in flight.

The decisions live in `TokenState` (pure); this class adds the event loop:
a background refresher, a single-flight fetch task, and waiters on it.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable

from ..config import App
from .fetchers import Fetched, Fetcher, FetchError
from .policy import MAX_CALLER_WAIT_S, Action, FailureKind, Source, Token, TokenState, decide, refresh_due_at
from .store import FetchCapReached, StoreUnavailable, TokenStore, fingerprint

log = logging.getLogger("proxy.tokens")

# stable_token force mode: consecutive force calls must be 30 s apart or
# nothing is refreshed (wechat-api-notes.md §1.2).
STABLE_FORCE_SPACING_S = 30.0

# A reader looks for the fetchers' new token this often while it waits.
READER_POLL_S = 0.05


class TokenUnavailable(Exception):
    """No usable token for an app; the message says why, for the operator."""


class RefreshThrottled(TokenUnavailable):
    """A refresh was asked for before the forced-refresh spacing allows one;
    the current token is still served. `retry_after` is in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def _nothing(*_: object) -> None:
    """The observers' default: one function shared by every manager."""


class TokenManager:
    # Slots, not a __dict__: a platform keeps up to max_cached_authorizers of
    # these (10,000 by default), and a per-instance dict was a third of each.
    __slots__ = ("app", "key", "name", "dependents", "lazy", "make_dependent", "fetcher", "store", "clock", "wall",
                 "rng", "state", "refreshes", "_inflight", "_inflight_starts_at", "_wake", "_runner", "_started",
                 "_adopting", "_looked_in_store_at", "_last_force_at", "role", "on_store_down",
                 "local_fetches_store_down", "on_refresh", "on_fetch", "on_rotated", "on_removed", "on_ip_refused",
                 "_wake_adopt",
                 "_due_for", "_due_at")

    def __init__(self, app: App, fetcher: Fetcher, store: TokenStore, *,
                 role: str = "fetcher", on_store_down: str = "fetch_locally",
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random,
                 key: str | None = None, name: str | None = None):
        self.app = app
        # What this manager holds: the app's token by default, or another
        # credential of the app (a ticket) under its own store key and name.
        self.key = key or app.store_key
        self.name = name or app.name
        self.dependents: dict[str, TokenManager] = {}     # credentials fetched with this one, made lazily
        # A lazy credential (a ticket, an authorizer's token) has no refresher
        # task and no timer: each ask checks whether it is due and starts the
        # refresh ahead in the background. One nobody asks for is left to end
        # and costs nothing but its entry.
        self.lazy = False
        self.make_dependent: Callable[[TokenManager, str], TokenManager] | None = None
        self.fetcher = fetcher
        self.store = store
        self.clock, self.wall, self.rng = clock, wall, rng
        self.state = TokenState(app.refresh_before_s, app.min_refresh_interval_s)
        self.refreshes: dict[str, int] = {}
        self._inflight: asyncio.Task[None] | None = None
        self._inflight_starts_at = 0.0
        self._wake: asyncio.Event | None = None     # the refresher's alarm; a lazy credential has none
        self._runner: asyncio.Task[None] | None = None
        self._started = False
        self._adopting: set[asyncio.Task[None]] | None = None    # store reads under way (rare): made when needed
        self._looked_in_store_at = -1.0
        self._last_force_at = -STABLE_FORCE_SPACING_S
        self.role, self.on_store_down = role, on_store_down
        self.local_fetches_store_down = 0
        # Observers (metrics); the token logic does not depend on them.
        self.on_refresh: Callable[[str], None] = _nothing
        self.on_fetch: Callable[[str], None] = _nothing
        self.on_rotated: Callable[[], None] = _nothing
        self.on_removed: Callable[[], None] = _nothing     # the credential was deleted (an authorizer)
        self.on_ip_refused: Callable[[str], None] = _nothing   # WeChat refused our egress IP (40164)
        self._wake_adopt = False
        self._due_for: Token | None = None      # ask(): the token _due_at was worked out for
        self._due_at = float("inf")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.store.watch(self.key, self._on_store_event)
            self._start_refresh("startup")
            if not self.lazy:
                self._start_runner()

    def _poke(self) -> None:
        """Wake the refresher, if there is one."""
        if self._wake is not None:
            self._wake.set()

    def _start_runner(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._runner = asyncio.create_task(self._run(), name=f"token-refresher:{self.name}")

    def credential(self, kind: str) -> TokenManager:
        """The manager of a credential fetched with this one (a ticket),
        made and started the first time it is asked for: one never asked for
        costs nothing and is never fetched."""
        manager = self.dependents.get(kind)
        if manager is None:
            if self.make_dependent is None:
                raise KeyError(kind)
            manager = self.dependents[kind] = self.make_dependent(self, kind)
            manager.lazy = True
        return manager.ask()

    def ask(self) -> TokenManager:
        """A lazy credential is asked for: made on the first ask, refreshed
        in the background when an ask finds it due (the current one is
        served meanwhile), never refreshed for nobody."""
        if not self._started:
            self.start()
        elif self._inflight is None:
            token = self.state.token
            if token is not self._due_for:      # when the held token is due: worked out once per token
                self._due_for = token
                self._due_at = self.state.next_fetch_at() if token is not None else float("inf")
            if self.clock() >= self._due_at:
                self._due_for = None            # a failed refresh moves it: work it out again
                self._start_refresh("retry" if self.state.failures else "proactive")
        return self

    def retry_soon(self) -> None:
        """What a failed fetch lacked has arrived (a platform's verify ticket):
        try again now rather than after the backoff."""
        self.state.clear_backoff()
        self._poke()

    async def close(self) -> None:
        if self._started:
            self.store.unwatch(self.key, self._on_store_event)
        for dependent in self.dependents.values():
            await dependent.close()
        for task in (self._runner, self._inflight):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._runner, self._inflight):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._runner = self._inflight = None

    async def _run(self) -> None:
        """Background refresher: fetch at start-up, then `refresh_before_s`
        ahead of expiry, retrying failures after the backoff the state says."""
        while True:
            now = self.clock()
            due = self.state.next_fetch_at()
            if self._wake_adopt:
                self._wake_adopt = False
                await self._adopt_from_store()
                continue
            if due > now and self._inflight is None:
                assert self._wake is not None
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=due - now)
                except asyncio.TimeoutError:
                    pass
                continue
            if self._inflight is not None:
                await asyncio.wait({self._inflight})
                continue
            await self._refresh("retry" if self.state.failures or self.state.token is None
                                else "proactive")

    # ------------------------------------------------------------ request path

    def current(self) -> Token | None:
        """The token to use now, or None when there is no usable one.
        Synchronous: the request path pays for nothing when the token is good."""
        now = self.clock()
        return self.state.token if self.state.usable(now) else None

    async def get(self) -> Token:
        """A usable token, fetching on the request's path only if there is none."""
        token = self.current()
        if token is not None:
            return token
        return await self._obtain(Source.DEMAND)

    async def invalidate(self, bad_token: str) -> Token:
        """WeChat rejected `bad_token`. Refresh only if it is still the current
        token; callers that hold an already-replaced one get the new one free."""
        if self.state.reject(bad_token):
            log.warning("token rejected by WeChat; refreshing",
                        extra={"event": "token_rejected", "app": self.name})
            self.on_rotated()
        return await self._obtain(Source.REJECTED)

    def reject(self, bad_token: str) -> None:
        """WeChat refused a token we had just fetched: mark it so the next caller
        refreshes (within the forced-refresh budget), without making this caller wait."""
        if self.state.reject(bad_token):
            log.warning("fresh token rejected by WeChat too; another system may be "
                        "fetching tokens for this appid", extra={"event": "token_rejected", "app": self.name})
            self.on_rotated()
            self._poke()

    def mark_served(self, value: str) -> None:
        """A call with `value` succeeded (the forced-refresh policy asks)."""
        self.state.mark_served(value)

    async def refresh_for_caller(self) -> Token:
        """An SDK's force refresh, which says nothing about which token failed:
        the token held is the answer (the sidecar puts its own token on every
        call anyway), with a fetch behind it at most every SDK_FORCE_SPACING_S."""
        return await self._obtain(Source.SDK_FORCE)

    async def refresh_now(self) -> Token:
        """The passive refresh interface (admin): fetch now, coalesced with a
        fetch under way or one that just completed; overrides a backoff, not
        the forced-refresh spacing (RefreshThrottled while the token is valid)."""
        return await self._obtain(Source.ADMIN)

    async def _obtain(self, source: Source) -> Token:
        """A token for `source`, as the rule book (policy.decide) says: the
        one held, the fetch under way's, a new fetch's, or a refusal."""
        before = self.state.token
        for attempt in (1, 2):
            now = self.clock()
            decision = decide(source, self.state.facts(now, self._inflight_starts_at if self._inflight else None))
            if decision.action is Action.REFUSE:
                raise self._refusal(source, decision.at - now)
            if decision.action in (Action.ANSWER, Action.BEHIND):
                if decision.action is Action.BEHIND:
                    self._start_refresh(source.value, use_store=False, not_before=decision.at)
                token = self.current()
                if token is not None:
                    return token
                continue                                 # (not reached: answers need a usable token)
            if decision.action is Action.FETCH:
                if source is Source.ADMIN:
                    self.state.clear_backoff()
                self._start_refresh(source.value, use_store=source not in (Source.ADMIN, Source.SDK_FORCE),
                                    not_before=decision.at)
            # FETCH or JOIN: that attempt's answer. While it is still to come
            # (a backoff, a spaced-out refresh), another sidecar may hold what
            # we lack: one look in the store per READER_POLL_S, not per call.
            if self._inflight_starts_at > self.clock() and self.clock() - self._looked_in_store_at >= READER_POLL_S \
                    and source is not Source.ADMIN:
                self._looked_in_store_at = self.clock()
                await self._adopt_from_store()
                token = self.current()
                if token is not None:
                    return token
            assert self._inflight is not None
            await asyncio.shield(self._inflight)
            token = self.current()
            if source is Source.ADMIN:
                if token is None or token is before:
                    failure = self.state.last_failure
                    raise TokenUnavailable(f"app {self.name}: refresh failed"
                                           + (f": {failure.describe()}" if failure else "")
                                           + ("; the current token is still served" if token else ""))
                return token
            if token is not None:
                return token
            if self.state.failures or self.state.rejected is None:
                break
            # The fetch joined began before the token was refused and ended
            # with that very token (taken from the store): one more, now.
        raise TokenUnavailable(self._reason())

    def _refusal(self, source: Source, wait: float) -> TokenUnavailable:
        token = self.current()
        if token is not None:                           # a refresh refused while a token is served: 429
            why = (f"a refresh is scheduled in {wait:.1f} s" if self._inflight is not None
                   else f"refreshed {self.clock() - token.fetched_at:.1f} s ago; the next forced refresh "
                        f"is allowed in {wait:.1f} s")
            return RefreshThrottled(f"app {self.name}: {why} (the current token is still served)", wait)
        return TokenUnavailable(f"{self._reason()}; next refresh in {wait:.0f} s "
                                f"(forced refreshes and retries are spaced to protect the daily quota)")

    def _reason(self) -> str:
        return f"app {self.name}: {self.state.unavailable_reason(self.clock())}"

    # ------------------------------------------------------------ fetching

    def _start_refresh(self, reason: str, use_store: bool = True,
                       not_before: float | None = None) -> asyncio.Task[None]:
        if self._inflight is None:
            now = self.clock()
            forced = reason in ("errcode", "admin", "sdk_force") or self.state.rejected is not None
            if not_before is None:
                not_before = self.state.forced_fetch_at(now) if forced else max(now, self.state.retry_at)
            self._inflight_starts_at = not_before
            self._inflight = asyncio.create_task(self._fetch(reason, not_before, forced, use_store),
                                                 name=f"token-fetch:{self.name}")
            self._inflight.add_done_callback(self._fetch_done)
        return self._inflight

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None
        self._poke()

    async def _refresh(self, reason: str) -> None:
        await asyncio.shield(self._start_refresh(reason))

    async def _fetch(self, reason: str, not_before: float, forced: bool, use_store: bool) -> None:
        delay = not_before - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        self.refreshes[reason] = self.refreshes.get(reason, 0) + 1
        self.on_refresh(reason)
        rejected = self.state.rejected
        asked_at = self.clock()
        key = self.key

        def accept(token: Token) -> bool:
            """Is a token someone else put in the store good enough to skip a fetch?"""
            if token.value == rejected or self._older(token):
                return False
            if not use_store:       # admin / SDK force refresh: only a token fetched since the ask
                return token.fetched_at >= asked_at
            return self.clock() < refresh_due_at(token, self.app.refresh_before_s) \
                or (rejected is not None and self.clock() < token.usable_until)

        async def fetch() -> Token:
            if forced:
                self.state.spend_forced(self.clock())
            fetched = await self._counted_fetch(force=False)
            if reason == "errcode" and rejected is not None and fetched.value == rejected and self._may_force():
                # stable_token normal mode handed back the token WeChat just
                # refused: only force mode replaces it (wechat-api-notes.md §1.2).
                self._last_force_at = self.clock()
                log.warning("WeChat returned the rejected token again; forcing a new one",
                            extra={"event": "token_force", "app": self.name})
                fetched = await self._counted_fetch(force=True)
            now = self.clock()
            return Token(value=fetched.value, fetched_at=now, expires_at=now + fetched.expires_in)

        started = self.clock()
        try:
            if rejected is not None:
                await self._store_reject(rejected)
            if self.role == "reader":
                token, by_us = await self._follow(accept), False
            else:
                try:
                    token, by_us = await self.store.fetch_exclusive(key, fetch, accept)
                except StoreUnavailable as exc:
                    token, by_us = await self._store_down(exc, fetch), True
        except FetchError as exc:
            self._failed(exc.kind, exc.errcode, exc.message, reason)
            return
        except FetchCapReached as exc:
            self._failed(FailureKind.QUOTA, None, str(exc), reason)
            return
        except StoreUnavailable as exc:
            self._failed(FailureKind.TRANSIENT, None, f"store unavailable: {exc}", reason)
            return
        if by_us:
            self.state.on_fetched_token(token)
            log.info("token fetched (%s), expires in %.0f s", reason, token.remaining(self.clock()),
                     extra={"event": "token_fetched", "app": self.name, "reason": reason,
                            "duration_s": round(self.clock() - started, 4)})
        elif token != self.state.token:
            self.state.on_adopted(token)
            log.info("token taken from the store (%s), expires in %.0f s", reason,
                     token.remaining(self.clock()), extra={"event": "token_adopted", "app": self.name,
                                                          "reason": reason})

    async def _counted_fetch(self, force: bool) -> Fetched:
        try:
            fetched = await self.fetcher.fetch(force=force)
        except FetchError as exc:
            self.on_fetch(exc.kind.value)
            raise
        self.on_fetch("ok")
        return fetched

    def _failed(self, kind: FailureKind, errcode: int | None, message: str, reason: str) -> None:
        failure = self.state.on_failed(kind, errcode, message, self.clock(), self.wall(), self.rng)
        if failure.egress_ip is not None:
            self.on_ip_refused(failure.egress_ip)
        level = logging.ERROR if kind is not FailureKind.TRANSIENT else logging.WARNING
        log.log(level, "token fetch failed: %s; next try in %.0f s",
                failure.describe(), max(0.0, self.state.retry_at - self.clock()),
                extra={"event": "token_fetch_failed", "app": self.name, "errcode": errcode,
                       "reason": reason, "failure": kind.value})

    async def _store_reject(self, bad_value: str) -> None:
        """Tell the cluster: refresh only if the shared token is still this one."""
        try:
            await self.store.reject(self.key, bad_value)
        except StoreUnavailable as exc:
            log.warning("could not mark the rejected token in the store: %s", exc,
                        extra={"event": "store_error", "app": self.name})

    async def _follow(self, accept: Callable[[Token], bool]) -> Token:
        """role: reader — never fetch; take what a fetching sidecar stored."""
        deadline = self.clock() + MAX_CALLER_WAIT_S
        while True:
            token = await self.store.load(self.key)
            if token is not None and accept(token):
                return token
            if self.clock() >= deadline:
                raise StoreUnavailable("role is reader: no fetching sidecar stored a usable token")
            await asyncio.sleep(READER_POLL_S)

    async def _store_down(self, exc: StoreUnavailable, fetch: Callable[[], Awaitable[Token]]) -> Token:
        """The shared store is gone. While the local token is usable, keep it
        and retry later; once it is not, apply `on_store_down`."""
        if self.state.usable(self.clock()) or self.on_store_down == "fail":
            raise exc
        log.error("store unavailable (%s) and no usable token: fetching locally "
                  "(on_store_down: fetch_locally); other replicas may fetch too", exc,
                  extra={"event": "store_down_fetch_locally", "app": self.name})
        self.local_fetches_store_down += 1
        return await fetch()

    def _on_store_event(self, event: str, fp: str) -> None:
        """Another sidecar stored a new token or saw ours refused."""
        if event == "rejected":
            current = self.state.token
            if current is not None and fingerprint(current.value) == fp and self.state.reject(current.value):
                log.warning("token rejected (seen by another sidecar); refreshing",
                            extra={"event": "token_rejected", "app": self.name})
                self.on_rotated()
                self._poke()
        elif event == "removed":
            self.on_removed()
        elif event == "new" and self.state.token is not None and fingerprint(self.state.token.value) == fp:
            return                                   # the news is the token held already
        elif event == "new" and decide(Source.STORE, self.state.facts(
                self.clock(), self._inflight_starts_at if self._inflight else None)).action is Action.ANSWER:
            return                                   # our fetch under way finds it in the store itself
        elif event == "new" and self._inflight is None:
            self._wake_adopt = True
            self._poke()
        elif event == "new":
            # A fetch of ours waits out a backoff while another sidecar got
            # the token (a platform whose verify ticket reached only that
            # one): take it now rather than after the backoff.
            task = asyncio.create_task(self._adopt_from_store())
            if self._adopting is None:
                self._adopting = set()
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt_from_store(self) -> None:
        try:
            token = await self.store.load(self.key)
        except StoreUnavailable:
            return
        if token is not None and token != self.state.token and token.value != self.state.rejected \
                and self.clock() < token.usable_until and not self._older(token):
            self.state.on_adopted(token)

    def _older(self, token: Token) -> bool:
        """Fetched before the one held: a write lost in a failover, never to
        be taken back (the holder writes its own back instead, `reseed`)."""
        held = self.state.token
        return held is not None and token.value != held.value and token.fetched_at < held.fetched_at

    async def reseed(self) -> None:
        """The store came back (after an outage, a failover, a restart empty):
        write back the token held, where the store has none or an older one."""
        token = self.current()
        if token is None or self.role == "reader":
            return
        try:
            if await self.store.seed(self.key, token):
                log.info("token written back to the store", extra={"event": "token_reseeded", "app": self.name})
        except StoreUnavailable:
            pass

    def _may_force(self) -> bool:
        return (self.app.token_api == "stable"
                and self.clock() - self._last_force_at >= STABLE_FORCE_SPACING_S)

    # ------------------------------------------------------------ reporting

    def status(self) -> dict[str, object]:
        now = self.clock()
        token = self.state.token
        failure = self.state.last_failure
        return {
            "name": self.name,
            "appid": self.app.appid,
            "token_api": self.app.token_api,
            "usable": self.state.usable(now),
            "token_age_s": round(now - token.fetched_at, 1) if token else None,
            "expires_in_s": round(token.expires_at - now, 1) if token else None,
            "last_fetch": ("ok" if failure is None or (token and token.fetched_at > failure.at)
                           else failure.describe()),
            "fetches_ok": self.state.fetches_ok,
            "fetches_failed": self.state.fetches_failed,
            "refreshes": dict(self.refreshes),
            "next_retry_in_s": round(max(0.0, self.state.retry_at - now), 1) if self.state.retry_at else None,
            **({"egress_ip_not_whitelisted": ip} if (ip := self.state.egress_ip_not_whitelisted()) else {}),
        }
