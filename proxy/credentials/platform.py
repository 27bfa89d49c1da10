"""WeChat Open Platform: a platform app's component token, its verify ticket,
and the authorizers it calls for (DESIGN.md, "Third-party platforms").

The component_access_token is the platform app's own token, held by the
token engine like any other: `ComponentFetcher` makes it from the stored
component_verify_ticket. Each authorizer's token is a lazy credential of
the same engine (`AuthorizerFetcher`, with the stored refresh token), made
on first use and kept in a bounded LRU (`cachetools`): an idle authorizer
costs no task, no timer and no metric label, and one evicted costs nothing.

Refresh tokens are never lost: a refresh runs under the cluster's fetch
lock, and a rotated refresh token replaces the stored one only if the
stored one is still the one used (compare-and-set); one that cannot be
stored is kept and stored again before the next refresh, never dropped.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Callable

import aiohttp
from cachetools import Cache, LRUCache

from ..config import App
from .fetchers import TOKEN_ERRORS, Fetched, FetchError, HttpFetcher
from .manager import TokenManager, TokenUnavailable
from .policy import FailureKind
from .store import StoreUnavailable, TokenStore

log = logging.getLogger("proxy.platform")

# WeChat's errcode for a refresh token that is not (or no longer) valid.
REFRESH_TOKEN_INVALID = 61023

# An api_query_auth answer is a few hundred bytes of JSON; anything longer is not one.
MAX_ANSWER_BYTES = 64 * 1024

# An authorizer appid, as the path prefix /<platform app>/<authorizer appid>/...
# names it: "wx" and 16 hex digits (no WeChat path root looks like it).
AUTHORIZER_APPID_RE = re.compile(r"^wx[0-9a-fA-F]{16}$")

# A rotated refresh token that cannot be stored is tried again this often
# within the refresh, then kept for the next one.
SAVE_RETRIES = (0.1, 0.3, 1.0, 2.0)

class AuthorizationFailed(Exception):
    """An authorization code that could not be exchanged: HTTP status and a
    reason safe to log and answer."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status, self.why = status, why


def verify_ticket_key(app: App) -> str:
    return f"verify_ticket:{app.appid}"


def authorizer_key(app: App, authorizer_appid: str) -> str:
    return f"authorizer:{app.appid}:{authorizer_appid}"


class ComponentFetcher(HttpFetcher):
    """POST /cgi-bin/component/api_component_token with the latest stored
    component_verify_ticket (pushed every 10 minutes, valid 12 hours)."""
    api = "component"
    path = "/cgi-bin/component/api_component_token"
    value_field = "component_access_token"

    def __init__(self, app: App, session: aiohttp.ClientSession, timeout_s: float, store: TokenStore):
        super().__init__(app, session, timeout_s)
        self.store = store
        self.ticket = ""
        self.waiting_for_ticket = False     # no usable verify ticket is stored: a push is awaited

    def request_kwargs(self, force: bool) -> dict[str, Any]:
        return {"method": "POST", "url": self.url, "json": {
            "component_appid": self.app.appid, "component_appsecret": self.app.secret,
            "component_verify_ticket": self.ticket}}

    async def fetch(self, force: bool = False) -> Fetched:
        try:
            ticket = await self.store.get_value(verify_ticket_key(self.app))
        except StoreUnavailable as exc:
            raise FetchError(FailureKind.TRANSIENT, None, f"component: verify ticket unreadable: {exc}") from None
        self.waiting_for_ticket = ticket is None
        if ticket is None:
            raise FetchError(FailureKind.TRANSIENT, None,
                             "component: no component_verify_ticket yet (forward WeChat's pushes to "
                             "/sidecar/component/event, or POST /admin/component/verify_ticket)")
        self.ticket = ticket
        try:
            return await super().fetch(force)
        except FetchError as exc:
            # The stored ticket is too old or not WeChat's latest: only a new
            # push helps, and the pod must be ready to receive it.
            self.waiting_for_ticket = exc.errcode in TICKET_ERRORS
            raise


# api_component_token's answers to a verify ticket it does not take:
# 61005 "component ticket is expired", 61006 "component ticket is invalid".
TICKET_ERRORS = frozenset({61005, 61006})


class AuthorizerFetcher(HttpFetcher):
    """POST /cgi-bin/component/api_authorizer_token with the component token
    and the authorizer's stored refresh token. Runs under the cluster's fetch
    lock (the store's fetch_exclusive), so one sidecar refreshes at a time."""
    api = "authorizer"
    path = "/cgi-bin/component/api_authorizer_token"
    value_field = "authorizer_access_token"

    def __init__(self, app: App, session: aiohttp.ClientSession, timeout_s: float, *,
                 authorizer_appid: str, store: TokenStore, component: TokenManager):
        super().__init__(app, session, timeout_s)
        self.appid = authorizer_appid
        self.store, self.component = store, component
        self._component_token = self._refresh_token = ""
        self._answered_refresh: str | None = None
        self.unsaved: tuple[str, str] | None = None     # (used, new) a refresh answered but the store refused

    def request_kwargs(self, force: bool) -> dict[str, Any]:
        return {"method": "POST", "url": self.url, "params": {"component_access_token": self._component_token},
                "json": {"component_appid": self.app.appid, "authorizer_appid": self.appid,
                         "authorizer_refresh_token": self._refresh_token}}

    def parse(self, status: int, body: bytes) -> Fetched:
        data = self.answer(status, body)
        fetched = self.credential(data)
        refresh = data.get("authorizer_refresh_token")
        self._answered_refresh = refresh if isinstance(refresh, str) and refresh.isprintable() and refresh else None
        return fetched

    async def _stored_refresh_token(self) -> str:
        if self.unsaved is not None:
            used, new = self.unsaved
            if await self._save(used, new):
                self.unsaved = None
            else:
                return new                 # still not stored: the newest one is ours
        try:
            refresh = await self.store.registry_get(self.app.appid, self.appid)
        except StoreUnavailable as exc:
            raise FetchError(FailureKind.TRANSIENT, None, f"authorizer: refresh token unreadable: {exc}") from None
        if refresh is None:
            raise FetchError(FailureKind.CREDENTIAL, None,
                             f"authorizer {self.appid} is not registered with platform {self.app.name}")
        return refresh

    async def fetch(self, force: bool = False) -> Fetched:
        retried = False
        while True:
            used = self._refresh_token = await self._stored_refresh_token()
            try:
                self._component_token = (await self.component.get()).value
            except TokenUnavailable as exc:
                raise FetchError(FailureKind.TRANSIENT, None, f"authorizer: no component token: {exc}") from None
            try:
                fetched = await super().fetch(force)
            except FetchError as exc:
                if retried:
                    raise
                if exc.errcode in TOKEN_ERRORS:        # the component token was refused: refresh it once
                    await self.component.invalidate(self._component_token)
                elif exc.errcode == REFRESH_TOKEN_INVALID and self.unsaved is None:
                    # Refused: unless it changed in the store meanwhile (an
                    # import, a sidecar without the lock in an outage), the
                    # account must authorize the platform again.
                    try:
                        if await self.store.registry_get(self.app.appid, self.appid) == used:
                            raise
                    except StoreUnavailable:
                        raise exc from None
                else:
                    raise
                retried = True
                continue
            new = self._answered_refresh
            if new is not None and new != used and not await self._save(used, new):
                self.unsaved = (used, new)
                log.error("authorizer %s: the rotated refresh token could not be stored; it is kept "
                          "in this sidecar and stored again before the next refresh", self.appid,
                          extra={"event": "refresh_token_unsaved", "app": self.app.name})
            return fetched

    async def _save(self, used: str, new: str) -> bool:
        """Store `new` in place of `used`, retrying a store outage a few times.
        False only when the store could not be reached."""
        for delay in (*SAVE_RETRIES, None):
            try:
                if not await self.store.registry_cas(self.app.appid, self.appid, used, new):
                    log.warning("authorizer %s: the stored refresh token changed during the refresh "
                                "(an import?); the stored one is kept", self.appid,
                                extra={"event": "refresh_token_changed", "app": self.app.name})
                return True
            except StoreUnavailable:
                if delay is None:
                    return False
                await asyncio.sleep(delay)
        return False


class _Managers(LRUCache):  # type: ignore[type-arg]
    """The authorizer managers one sidecar keeps; the least recently used
    beyond the bound is closed (its token stays in the store)."""

    def __init__(self, maxsize: int, on_evict: Callable[[TokenManager], None]):
        super().__init__(maxsize)
        self.on_evict = on_evict

    def peek(self, appid: str) -> TokenManager | None:
        """The manager if cached, without making it recently used."""
        return Cache.__getitem__(self, appid) if appid in self else None

    def popitem(self) -> tuple[str, TokenManager]:
        appid, manager = super().popitem()
        self.on_evict(manager)
        return appid, manager


class Platform:
    """One platform app: pushes in, authorizers registered, their managers cached."""

    def __init__(self, app: App, component: TokenManager, store: TokenStore, session: aiohttp.ClientSession,
                 timeout_s: float, make_authorizer: Callable[["Platform", str], TokenManager]):
        self.app, self.component, self.store = app, component, store
        self.session, self.timeout = session, aiohttp.ClientTimeout(total=timeout_s)
        self.make_authorizer = make_authorizer
        self.managers = _Managers(app.max_cached_authorizers, self._retire)
        self._closing: set[asyncio.Task[None]] = set()
        self.pushes: dict[str, int] = {}          # InfoType (or "refused") -> pushes taken (inbound counts)

    @property
    def waiting_for_ticket(self) -> bool:
        """No usable verify ticket is stored: a push is awaited (the pod must
        be ready to receive it)."""
        fetcher = self.component.fetcher
        return isinstance(fetcher, ComponentFetcher) and fetcher.waiting_for_ticket

    # ------------------------------------------------------------ authorizers

    async def authorizer(self, appid: str) -> TokenManager | None:
        """The manager of a registered authorizer (made on first use), or None."""
        manager = self.managers.get(appid)
        if manager is None:
            if await self.store.registry_get(self.app.appid, appid) is None:
                return None
            manager = self.managers.get(appid)       # made by a call that asked meanwhile
            if manager is None:
                manager = self.make_authorizer(self, appid)
                manager.lazy = True
                manager.on_removed = lambda: self._forget(appid)
                self.managers[appid] = manager
        return manager.ask()

    def _retire(self, manager: TokenManager) -> None:
        task = asyncio.create_task(manager.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _forget(self, appid: str) -> None:
        manager = self.managers.pop(appid, None)
        if manager is not None:
            self._retire(manager)

    async def register(self, entries: dict[str, str]) -> None:
        """Authorizers and their refresh tokens (an authorization, or an import)."""
        await self.store.registry_put(self.app.appid, entries)

    async def remove(self, appid: str) -> bool:
        removed = await self.store.registry_remove(self.app.appid, appid, authorizer_key(self.app, appid))
        self._forget(appid)
        return removed

    async def close(self) -> None:
        managers = list(self.managers.values())
        self.managers.clear()
        for manager in managers:
            await manager.close()
        for task in list(self._closing):
            await task

    async def store_verify_ticket(self, ticket: str, created: int | None = None) -> bool:
        """Store a verify ticket: one pushed at `created` (its CreateTime)
        only if no newer one is stored (a replayed older push must not roll
        the ticket back: WeChat takes only the latest, 61005/61006); one an
        operator gives (`created` None) always. False when it was older."""
        key = verify_ticket_key(self.app)
        if created is None:
            await self.store.set_value(key, ticket)
        elif not await self.store.set_value_if_newer(key, ticket, created):
            return False
        if self.component.current() is None:
            self.component.retry_soon()      # the fetch was waiting for this
        return True

    async def authorization_moves_forward(self, authorizer_appid: str, event: str, created: int) -> bool:
        """Record an authorization event (authorized / updateauthorized /
        unauthorized) at `created`; False when a newer one is recorded, so a
        replayed `unauthorized` never removes an account that authorized again."""
        return await self.store.set_value_if_newer(f"authorization:{self.app.appid}:{authorizer_appid}", event,
                                                   created)

    # ------------------------------------------------------------ api_query_auth

    async def query_auth(self, code: str) -> str:
        """Exchange an authorization code and register the authorizer; its appid."""
        for attempt in (1, 2):
            try:
                token = (await self.component.get()).value
            except TokenUnavailable as exc:
                raise AuthorizationFailed(503, f"no component token to exchange the authorization code: {exc}") from None
            try:
                async with self.session.post(self.app.upstream + "/cgi-bin/component/api_query_auth",
                                             params={"component_access_token": token}, timeout=self.timeout,
                                             allow_redirects=False,
                                             json={"component_appid": self.app.appid,
                                                   "authorization_code": code}) as resp:
                    body = await resp.content.read(MAX_ANSWER_BYTES)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise AuthorizationFailed(502, f"api_query_auth: {exc.__class__.__name__}") from None
            try:
                data = json.loads(body)
            except ValueError:
                raise AuthorizationFailed(502, "api_query_auth: answer is not JSON") from None
            errcode = data.get("errcode", 0) if isinstance(data, dict) else None
            if errcode in TOKEN_ERRORS and attempt == 1:
                await self.component.invalidate(token)
                continue
            appid = await self.register_answer(data)
            if appid is None:
                raise AuthorizationFailed(502, f"api_query_auth failed: {str(data)[:200] if errcode is None else errcode}")
            return appid
        raise AssertionError("unreachable")

    async def register_answer(self, data: object) -> str | None:
        """Register the authorizer an api_query_auth answer names; its appid."""
        info = data.get("authorization_info") if isinstance(data, dict) else None
        if not isinstance(info, dict):
            return None
        appid, refresh = info.get("authorizer_appid"), info.get("authorizer_refresh_token")
        if not (isinstance(appid, str) and appid and isinstance(refresh, str) and refresh):
            return None
        await self.register({appid: refresh})
        log.info("authorizer %s registered", appid, extra={"event": "authorizer_registered", "app": self.app.name})
        return appid

    # ------------------------------------------------------------ reporting

    async def status(self) -> dict[str, object]:
        try:
            count: int | None = await self.store.registry_count(self.app.appid)
            ticket = await self.store.get_value(verify_ticket_key(self.app)) is not None
        except StoreUnavailable:
            count, ticket = None, None
        return {"authorizers": count, "cached_authorizers": len(self.managers),
                "verify_ticket_stored": ticket, "pushes": dict(self.pushes)}


def authorizer_status(manager: TokenManager, appid: str, now: float | None = None) -> dict[str, object]:
    """One authorizer's state for /admin/authorizers: never a token."""
    now = time.monotonic() if now is None else now
    token = manager.state.token
    failure = manager.state.last_failure
    return {"authorizer_appid": appid, "cached": True, "usable": manager.state.usable(now),
            "expires_in_s": round(token.expires_at - now, 1) if token else None,
            "last_fetch": ("ok" if failure is None or (token and token.fetched_at > failure.at)
                           else failure.describe())}
