"""Where a token comes from: one fetcher per WeChat token API.

A fetcher knows one endpoint's request and answer shape and nothing about
caching or timing. Adding a token source means adding a class here.
Nothing here may put the secret into an exception or a log line: the request
URL of /cgi-bin/token carries it, so no URL is ever formatted into a message.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import aiohttp

from ..config import App
from .policy import FailureKind, classify

# A token answer is a few hundred bytes; anything longer is not one.
MAX_ANSWER_BYTES = 64 * 1024

# WeChat says "a value up to 7200" (wechat-api-notes.md §1.1); allow some
# slack for a future change, but refuse nonsense that would pin a token forever.
MAX_EXPIRES_IN_S = 86400


@dataclass(frozen=True)
class Fetched:
    value: str
    expires_in: float


class FetchError(Exception):
    def __init__(self, kind: FailureKind, errcode: int | None, message: str):
        super().__init__(message)
        self.kind, self.errcode, self.message = kind, errcode, message


class Fetcher(Protocol):
    api: str

    async def fetch(self, force: bool = False) -> Fetched: ...


class HttpFetcher:
    api = ""
    path = ""
    value_field = "access_token"      # where the answer carries the credential

    def __init__(self, app: App, session: aiohttp.ClientSession, timeout_s: float):
        self.app = app
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.url = app.upstream + self.path

    def request_kwargs(self, force: bool) -> dict[str, Any]:
        raise NotImplementedError

    async def fetch(self, force: bool = False) -> Fetched:
        try:
            async with self.session.request(timeout=self.timeout, allow_redirects=False,
                                            **self.request_kwargs(force)) as resp:
                body = await resp.content.read(MAX_ANSWER_BYTES + 1)
                status = resp.status
        except asyncio.TimeoutError:
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: timed out") from None
        except aiohttp.ClientHttpProxyError as exc:
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: the egress proxy refused the tunnel: "
                                                          f"{exc.status} {exc.message}".rstrip()) from None
        except aiohttp.ClientConnectorError as exc:
            raise FetchError(FailureKind.TRANSIENT, None,
                             f"{self.api}: cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})") from None
        except aiohttp.ClientError as exc:
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: {exc.__class__.__name__}") from None
        return self.parse(status, body)

    def parse(self, status: int, body: bytes) -> Fetched:
        return self.credential(self.answer(status, body))

    def answer(self, status: int, body: bytes) -> dict[str, Any]:
        """The answer as a JSON object, or the FetchError it amounts to."""
        if status >= 400:
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: HTTP {status}")
        if len(body) > MAX_ANSWER_BYTES:
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: answer too long to be a token")
        try:
            data = json.loads(body)
        except ValueError:
            preview = body[:60].decode("utf-8", "replace").replace("\n", " ")
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: answer is not JSON: {preview!r}") from None
        if not isinstance(data, dict):
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: answer is not a JSON object")
        errcode = data.get("errcode", 0)
        if errcode not in (0, None):
            errmsg = str(data.get("errmsg", ""))[:300]
            code = errcode if isinstance(errcode, int) else None
            raise FetchError(classify(code), code, f"{self.api}: {errmsg}")
        return data

    def credential(self, data: dict[str, Any]) -> Fetched:
        """The credential an answer carries, and its lifetime."""
        value = data.get(self.value_field)
        if not isinstance(value, str) or not value or len(value) > 4096 or not value.isprintable():
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: answer has no usable {self.value_field}")
        expires_in = data.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or not 0 < expires_in <= MAX_EXPIRES_IN_S:
            raise FetchError(FailureKind.TRANSIENT, None, f"{self.api}: absurd expires_in {str(expires_in)[:20]!r}")
        return Fetched(value=value, expires_in=float(expires_in))


class ClientCredentialFetcher(HttpFetcher):
    """GET /cgi-bin/token: every call invalidates the previous token after a
    5-minute grace (wechat-api-notes.md §1.1, §2); `force` changes nothing."""
    api = "client_credential"
    path = "/cgi-bin/token"

    def request_kwargs(self, force: bool) -> dict[str, Any]:
        return {"method": "GET", "url": self.url, "params": {
            "grant_type": "client_credential", "appid": self.app.appid, "secret": self.app.secret}}


class StableFetcher(HttpFetcher):
    """POST /cgi-bin/stable_token: normal mode returns the same token until its
    last 300 s; force mode rotates it, at most 20 a day, 30 s apart (§1.2)."""
    api = "stable"
    path = "/cgi-bin/stable_token"

    def request_kwargs(self, force: bool) -> dict[str, Any]:
        body = {"grant_type": "client_credential", "appid": self.app.appid,
                "secret": self.app.secret, "force_refresh": bool(force)}
        return {"method": "POST", "url": self.url, "json": body}


class WeComFetcher(HttpFetcher):
    """GET /cgi-bin/gettoken on qyapi: per (corpid, agent secret) token; the
    success answer carries errcode 0 (wechat-api-notes.md §8)."""
    api = "wecom"
    path = "/cgi-bin/gettoken"

    def request_kwargs(self, force: bool) -> dict[str, Any]:
        return {"method": "GET", "url": self.url,
                "params": {"corpid": self.app.appid, "corpsecret": self.app.secret}}

    def parse(self, status: int, body: bytes) -> Fetched:
        try:
            return super().parse(status, body)
        except FetchError as exc:
            # In WeCom 40001 / 40091 are bad secrets, 40014 / 42001 bad tokens.
            if exc.errcode in (40014, 42001):
                raise FetchError(FailureKind.TRANSIENT, exc.errcode, exc.message) from None
            raise


# The token errors a ticket fetch can meet: the token it was fetched with is
# bad, not the ticket (wechat-api-notes.md: 40001, 42001; WeCom 40014).
TOKEN_ERRORS = frozenset({40001, 40014, 42001})


class TicketFetcher(HttpFetcher):
    """A ticket is fetched with its app's token: GET `path` with
    access_token and the ticket's query. A token error invalidates exactly
    the token used (through `invalidate`, single flight in the token's
    manager), and the fetch is retried once with the token that replaced it.

    WeChat answers expires_in 7200 even when it hands back a ticket issued
    earlier (the same ticket for its whole life), so expires_in is an upper
    bound on a ticket's life, not the seconds left."""
    value_field = "ticket"

    def __init__(self, app: App, session: aiohttp.ClientSession, timeout_s: float, *, api: str, path: str,
                 query: dict[str, str], token: Callable[[], Awaitable[str]],
                 invalidate: Callable[[str], Awaitable[object]]):
        self.api, self.path, self.query = api, path, query
        super().__init__(app, session, timeout_s)
        self.token, self.invalidate = token, invalidate
        self._ends: dict[str, float] = {}     # ticket -> when it ends (monotonic), for the ones seen

    def _life_left(self, fetched: Fetched) -> Fetched:
        """The same ticket fetched again keeps the end it had: WeChat says
        expires_in 7200 again, but the ticket ends when it always would."""
        now = time.monotonic()
        end = self._ends.get(fetched.value)
        if end is None:
            self._ends = {v: e for v, e in self._ends.items() if e > now}   # only live ones are kept
            self._ends[fetched.value] = now + fetched.expires_in
            return fetched
        return Fetched(fetched.value, max(0.05, min(fetched.expires_in, end - now)))

    def request_kwargs(self, force: bool) -> dict[str, Any]:
        return {"method": "GET", "url": self.url, "params": {"access_token": self._token, **self.query}}

    async def fetch(self, force: bool = False) -> Fetched:
        retried = False
        while True:
            self._token = await self.token()
            try:
                return self._life_left(await super().fetch(force))
            except FetchError as exc:
                if exc.errcode not in TOKEN_ERRORS:
                    raise
                if retried:    # the fresh token failed too: not a fault of the ticket's credentials
                    raise FetchError(FailureKind.TRANSIENT, exc.errcode, exc.message) from None
            await self.invalidate(self._token)
            retried = True


FETCHERS: dict[str, type[HttpFetcher]] = {
    "client_credential": ClientCredentialFetcher,
    "stable": StableFetcher,
    "wecom": WeComFetcher,
}


def make_fetcher(app: App, session: aiohttp.ClientSession, timeout_s: float) -> Fetcher:
    return FETCHERS[app.token_api](app, session, timeout_s)
