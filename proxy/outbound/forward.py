"""One proxied call: pick the app, inject its token, send, sniff the answer for
a token errcode, replay once after invalidating, stream the answer back.

request -> route -> token -> upstream -> answer
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import time
import uuid
import zlib
from typing import Any
from urllib.parse import quote, unquote

from ..config import App, Config
from ..credentials import Token, TokenManager, TokenUnavailable
from ..credentials.kinds import TICKET_PATHS, local_kind, signing_kind
from ..credentials.pay import PayMerchant
from ..credentials.platform import AUTHORIZER_APPID_RE, Platform
from ..http.callers import Callers, check_request, normalize_path
from ..http.client import Response, UpstreamError, UpstreamPool, UpstreamTimeout
from ..http.replies import local_reply, sidecar_error
from ..http.server import BodyError, Header, Reply, Request
from ..ops.logs import AccessLog
from ..ops.metrics import Metrics
from ..wechat import jssdk
from . import jssdk_request
from .pay_calls import PayCalls
from .platform_calls import QUERY_AUTH_PATH, Handler, PlatformCalls
from .pools import HOP_BY_HOP_BYTES, Pools
from .replies import SIDECAR_ROOT, held, named

log = logging.getLogger("proxy.forward")
_monotonic = time.monotonic

# Error answers are small JSON ({"errcode", "errmsg"} plus a rid); binary
# endpoints answer errors as JSON too (wechat-api-notes.md §6). Answers up to
# this size are buffered and inspected; larger ones cannot be token errors and
# stream through untouched. WxJava sniffs at 215 bytes; we keep a wide margin.
SNIFF_LIMIT = 64 * 1024

# Paths that carry other credentials and must never get the app token
# (wechat-api-notes.md §5). One row a path prefix, with what the call carries
# instead; `no_token_paths` in the config adds rows.
NO_TOKEN_TABLE: dict[str, str] = {
    "/sns/": "user OAuth token, or appid + secret + code (jscode2session, oauth2)",
    "/cgi-bin/component/": "component_access_token (third-party platform)",
    "/cgi-bin/clear_quota/v2": "appid + appsecret",
    "/cgi-bin/service/get_suite_token": "WeCom suite credentials",
    "/cgi-bin/service/get_provider_token": "WeCom provider credentials",
    "/cgi-bin/service/get_corp_token": "WeCom suite access token",
    "/cgi-bin/service/miniprogram/jscode2session": "WeCom suite access token",
    "/cgi-bin/showqrcode": "ticket (mp.weixin.qq.com)",
}
NO_TOKEN_PREFIXES = tuple(NO_TOKEN_TABLE)

# Calls WeChat wants the AppSecret on: with `inject_secret: true` the sidecar
# fills in what the caller left out, so apps never hold the secret (§5, §3).
SECRET_PARAMS: dict[str, tuple[str, ...]] = {
    "/sns/jscode2session": ("appid", "secret"),
    "/sns/oauth2/access_token": ("appid", "secret"),
    "/sns/oauth2/refresh_token": ("appid",),
    "/cgi-bin/clear_quota/v2": ("appid", "appsecret"),
}

_ERRCODE_RE = re.compile(rb'"errcode"\s*:\s*(-?\d{1,10})')
# What follows `"errcode"`, when the number ends within these bytes.
_ERRCODE_WINDOW = 16
_ERRCODE_VALUE_RE = re.compile(rb'\s*:\s*(-?\d{1,10})(?=\D)')


@functools.lru_cache(maxsize=256)
def _errcode_in(window: bytes) -> int | None:
    """The errcode a window after `"errcode"` holds, if its number ends there.
    Answers mostly repeat a few windows (`:0,"errmsg":"ok"`): looked up, not parsed."""
    match = _ERRCODE_VALUE_RE.match(window)
    return int(match.group(1)) if match is not None else None

# Answered by the sidecar itself with the managed token (DESIGN.md).
LOCAL_TOKEN_PATHS = frozenset({"/cgi-bin/token", "/cgi-bin/stable_token", "/cgi-bin/gettoken"})

JSON_TYPES_BYTES = (b"application/json", b"text/plain", b"text/json")

SIDECAR_ERRCODE_HEADER = "X-Sidecar-Upstream-Errcode"

# A client body whose JSON nests deeper than the parser's recursion allows.
TOO_DEEP = "the JSON body nests too deeply"

# Request headers the proxy port's server notes while parsing (Request.noted),
# so that no call searches its headers for them.
NOTED_HEADERS = (b"x-wechat-app", b"x-request-id", b"host", b"origin", b"sec-fetch-site",
                 b"x-wechat-authorizer")

JSSDK_PATH = "/sidecar/jssdk"


def add_missing_params(raw_query: str, params: dict[str, str]) -> str:
    """Append `params` the query does not carry yet (by decoded name)."""
    present = {unquote(part.split("=", 1)[0]) for part in raw_query.split("&") if part}
    extra = [f"{name}={quote(value, safe='')}" for name, value in params.items() if name not in present]
    return "&".join(([raw_query] if raw_query else []) + extra)


def strip_access_token(raw_query: str, name: str = "access_token") -> str:
    """Drop every `name` parameter, keeping the rest byte for byte."""
    kept = [part for part in raw_query.split("&")
            if part and unquote(part.split("=", 1)[0]) != name]
    return "&".join(kept)


@functools.lru_cache(maxsize=64)
def _token_param(token: str, name: str) -> str:
    """The query parameter for a token, built once per token, not per call."""
    return f"{name}=" + quote(token, safe="")


def with_token(raw_query: str, token: str, name: str = "access_token") -> str:
    """The query with `name` (access_token, or a platform's
    component_access_token) set to the token, replacing any the caller sent."""
    if "access" in raw_query or "%" in raw_query:
        raw_query = strip_access_token(raw_query, name)
    param = _token_param(token, name)
    return f"{raw_query}&{param}" if raw_query else param


# An upstream answer with its first bytes read, as `_send` gives it: the
# response, those bytes, whether they are all of it, and the errcode and
# errmsg they carry (a plain tuple: one is made per call).
_Answer = tuple[Response, bytes, bool, "int | None", str]


# What a call came to: the answer, the errcode it carried (None when none),
# and the token errcode that made the sidecar replay it (None when not replayed).
_Result = tuple[Reply, "int | None", "int | None"]


class Forwarder:
    def __init__(self, config: Config, managers: dict[str, TokenManager],
                 pools: Pools, metrics: Metrics | None = None,
                 access: AccessLog | None = None, platforms: dict[str, Platform] | None = None,
                 push_answers: dict[str, Handler] | None = None, pay: "PayCalls | None" = None):
        self.config = config
        self.pay = pay                  # WeChat Pay calls and answers, when merchants are configured
        self.managers = managers
        self.platforms = platforms or {}
        self.pools = pools
        self.access = access or AccessLog(config.log.format)
        self.apps = {app.name: app for app in config.apps}
        self.default_app = config.apps[0]
        self.refresh_codes = {app.name: config.refresh_errcodes_for(app) for app in config.apps}
        self.no_token_prefixes = NO_TOKEN_PREFIXES + config.no_token_paths
        # Who may call the proxy port: loopback names, listen.host, listen.allowed_hosts.
        self.callers = Callers("proxy port", (config.listen.host, *config.listen.allowed_hosts), ip_literals=False,
                               serves="loopback names and listen.host / listen.allowed_hosts")
        self.metrics = metrics or Metrics()
        # The calls the sidecar answers itself, path -> handler; a handler
        # answering None leaves the call to be forwarded (a getticket of
        # another type, a token path with another method).
        token_answers: dict[str, Handler] = {path: self._answer_locally for path in LOCAL_TOKEN_PATHS}
        self.local: dict[str, Handler] = {
            **token_answers,
            **{path: self._answer_ticket for path in TICKET_PATHS},
            JSSDK_PATH: self._jssdk,
        }
        # A platform app's calls (Open Platform): their credential and local answers.
        self.platform_calls = PlatformCalls(self.platforms, token_answers, self.no_token_prefixes, push_answers)
        # Pushes from WeChat forwarded here are not the app's calls: they
        # prove themselves by their signature, and no allow list stops them.
        self.push_paths = frozenset(push_answers or ())
        # /sidecar/jssdk's answers start with the app's names, made once:
        # (app, kind=agent) -> the JSON head; no agent head without an agentid.
        self._jssdk_heads = {(app.name, False): jssdk.head({"appId": app.appid}) for app in config.apps}
        self._jssdk_heads.update({(app.name, True): jssdk.head({"corpid": app.appid, "agentid": app.agentid})
                                  for app in config.apps if app.agentid is not None})
        # Request ids: a per-process random prefix and a counter (uuid4 per
        # call cost 4 % of the proxy's CPU).
        self._id_prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ routing

    def route(self, request: Request) -> tuple[App, str] | tuple[PayMerchant, str] | Reply:
        """(app, upstream path) by path prefix, else X-WeChat-App, else the default app;
        a WeChat Pay call or pay answer goes to its merchant instead. The path is
        normalised first, so what names the app is what is forwarded."""
        raw_path = normalize_path(request.path)
        if raw_path is None:
            return sidecar_error(400, "path cannot be normalised (it climbs above the root or "
                                      "carries encoded slashes, backslashes or NUL)", outcome="bad_request")
        if self.pay is not None:
            pay = self.pay.route(raw_path, request)
            if pay is not None:
                return pay
        _, _, rest = raw_path.partition("/")
        first, slash, tail = rest.partition("/")
        app = self.apps.get(first)
        if app is not None:
            return app, "/" + tail
        header = request.noted.get(b"x-wechat-app")
        if header is not None:
            found = named(self.apps, header.decode("latin-1"), "app", " in X-WeChat-App")
            return found if isinstance(found, Reply) else (found, raw_path)
        return self.default_app, raw_path

    # ------------------------------------------------------------ entry point

    def check_caller(self, request: Request) -> Reply | None:
        """Refuse what a web page could make a browser send (DNS rebinding, CSRF)."""
        noted = request.noted
        if self.callers.verdicts.get(noted.get(b"host")) is True and b"origin" not in noted \
                and b"sec-fetch-site" not in noted:
            return None                      # the usual call: a Host seen and allowed before, no browser headers
        why = self.callers.refusal(noted.get(b"host"), noted.get(b"origin"), noted.get(b"sec-fetch-site"))
        return None if why is None else sidecar_error(403, why, outcome="forbidden")

    async def handle(self, request: Request) -> Reply:
        started = _monotonic()
        routed = check_request(request) or self.check_caller(request) or self.route(request)
        if isinstance(routed, Reply):
            response, errcode, replayed_from = routed, None, None
            app_name = appid = None
        elif isinstance(routed[0], App):
            app, path = routed
            app_name, appid = app.name, app.appid
            response, errcode, replayed_from = await self._handle(request, app, path)
        else:
            # A WeChat Pay call or a pay answer: the merchant's, never an app's token.
            merchant, path = routed
            response = await self.pay.handle(request, merchant, path)  # type: ignore[union-attr]
            app_name, appid = merchant.merchant.name, merchant.merchant.mchid
            errcode, replayed_from = None, None
        duration = _monotonic() - started
        if app_name is not None:
            self.metrics.observe_call(app_name, response.outcome or ("wechat_error" if errcode else "ok"), duration)
            if replayed_from is not None:
                self.metrics.replays.labels(app_name, str(replayed_from)).inc()
        access = self.access
        if access.enabled:
            # The request id only ever appears in the access line.
            given = request.noted.get(b"x-request-id")
            request_id = (given[:64].decode("latin-1") if given else "") or \
                f"{self._id_prefix}-{next(self._ids):x}"
            access.call(app_name, appid, request_id, request.method, request.path, response.status,
                        errcode, replayed_from is not None, duration)
        return response

    async def _handle(self, request: Request, app: App, path: str) -> _Result:
        if not app.allow.everything and not app.allow.allows(self._allow_path(app, path)) \
                and path not in self.push_paths:
            # Before any other check: nothing forwarded, nothing handed out.
            return sidecar_error(403, f"{path[:256]} is not in app {app.name}'s allow list",
                                 outcome="denied"), None, None
        manager: TokenManager | None = self.managers[app.name]
        param = "access_token"
        platform = self.platforms.get(app.name) if self.platforms else None
        if platform is None:
            if b"x-wechat-authorizer" in request.noted:
                # Never the app's own token on a call meant for another account.
                return sidecar_error(400, f"X-WeChat-Authorizer names an authorized account, but app {app.name} is "
                                          "not a platform app (token_api: component)", outcome="bad_request"), None, None
            local = self.local.get(path)
            if path.startswith(self.no_token_prefixes):
                manager = None               # pass-through: the call carries its own credentials (§5)
        else:
            chosen = await self.platform_calls.route(request, platform, path)
            if isinstance(chosen, Reply):
                return chosen, None, None
            manager, path, param, local = chosen
        if local is None and path.startswith(SIDECAR_ROOT) and (
                len(path) == len(SIDECAR_ROOT) or path[len(SIDECAR_ROOT)] == "/"):
            return sidecar_error(404, f"no sidecar endpoint {path[:128]}", outcome="bad_request"), None, None
        if request.body_exists:
            refused = self._continue(request)
            if refused is not None:
                return refused, None, None
        if local is not None:
            assert manager is not None
            reply = await local(request, app, manager, path)
            if reply is not None:
                return reply, None, None

        body = b""
        if request.body_exists:
            try:
                body = await request.read()
            except BodyError as exc:
                return sidecar_error(exc.status, exc.why, outcome="bad_request"), None, None
        skip = HOP_BY_HOP_BYTES if not request.connection else self._hop_by_hop(request)
        headers = [(k, v) for k, v in request.raw_headers if k.lower() not in skip]
        raw_query = request.query

        if app.inject_secret and path in SECRET_PARAMS:
            values = {"appid": app.appid, "secret": app.secret, "appsecret": app.secret}
            raw_query = add_missing_params(raw_query, {n: values[n] for n in SECRET_PARAMS[path]})

        if manager is None:
            target = f"{path}?{raw_query}" if raw_query else path
            result = await self._exchange(request, target, headers, body, None, None, app, path, "")
            if not result[0].outcome:
                result[0].outcome = "passthrough"
            return result

        try:
            token = manager.current() or await manager.get()
        except TokenUnavailable as exc:
            return sidecar_error(503, str(exc)), None, None
        target = f"{path}?{with_token(raw_query, token.value, param)}"
        result = await self._exchange(request, target, headers, body, token, manager, app, path, raw_query, param)
        if path == QUERY_AUTH_PATH and platform is not None:
            await self.platform_calls.register_from(platform, result[0])
        return result

    async def _exchange(self, request: Request, target: str, headers: list[Header], body: bytes,
                        token: Token | None, manager: TokenManager | None, app: App, path: str,
                        raw_query: str, param: str = "access_token") -> _Result:
        """Send; on a token errcode (with a token), invalidate it and replay once."""
        pools = self.pools
        pool = (None if pools.fallbacks else pools.get(app.upstream)) or pools.first(app.upstream)
        refresh_codes = self.refresh_codes[app.name]
        method = request.method
        try:
            resp, head, complete, errcode, errmsg = await self._send(pool, method, target, headers, body,
                                                                     refresh_codes)
        except _UpstreamFailed as exc:
            return exc.response, None, None

        replayed_from = None
        if token is not None and manager is not None and errcode not in refresh_codes:
            if not manager.state.served:
                manager.mark_served(token.value)     # this token helped: refreshing it was worth it
        elif token is not None and manager is not None:
            # Token error: invalidate exactly the token we used, replay once.
            first_code = errcode
            resp.release()
            try:
                fresh = await manager.invalidate(token.value)
            except TokenUnavailable as exc:
                return sidecar_error(503, f"token rejected ({first_code}) and no fresh token: {exc}",
                                     {SIDECAR_ERRCODE_HEADER: str(first_code)}), first_code, None
            replayed_from = first_code
            target = f"{path}?{with_token(raw_query, fresh.value, param)}"
            try:
                resp, head, complete, errcode, errmsg = await self._send(pool, method, target, headers, body,
                                                                         refresh_codes)
            except _UpstreamFailed as exc:
                return exc.response, None, replayed_from
            if errcode not in refresh_codes:
                if not manager.state.served:
                    manager.mark_served(fresh.value)
            else:
                # A second token failure. Never hand 40001/42001/40014 back by
                # default: SDKs would fetch a token themselves and rotate
                # everyone's (DESIGN.md).
                manager.reject(fresh.value)
                if not self.config.pass_token_errors:
                    resp.release()
                    return sidecar_error(503, f"token rejected after refresh ({errcode}: {errmsg})",
                                         {SIDECAR_ERRCODE_HEADER: str(errcode)},
                                         outcome="token_rejected"), errcode, replayed_from
        if complete and method != "HEAD":
            # Small answer: already in hand; sent whole, in one write.
            resp.release()
            return Reply(resp.status, resp.relay_headers, head), errcode, replayed_from
        return await self._relay(request, resp, head, complete), errcode, replayed_from

    def _continue(self, request: Request) -> Reply | None:
        """Answer `Expect: 100-continue` before reading the body (clients such
        as libcurl otherwise wait a second per upload); a body announced over
        the limit is refused at once instead, never invited."""
        if request.version != "1.1":
            return None
        expect = request.header(b"expect")
        if expect is None:
            return None
        if expect.lower() != "100-continue":
            return sidecar_error(417, f"unsupported Expect: {expect[:64]}", outcome="bad_request")
        length = request.header(b"content-length")
        limit = self.config.max_body_bytes
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return sidecar_error(413, f"request body over {limit} bytes", outcome="bad_request")
        request.send_continue()
        return None

    # ------------------------------------------------------------ local answers

    async def _answer_locally(self, request: Request, app: App, manager: TokenManager,
                              path: str) -> Reply | None:
        """SDKs that insist on fetching a token get the shared one, never a
        fetch of their own that would invalidate it (DESIGN.md)."""
        method = request.method
        if path == "/cgi-bin/token" and method == "GET":
            wecom = False
        elif path == "/cgi-bin/stable_token" and method == "POST":
            wecom = False
        elif path == "/cgi-bin/gettoken" and method == "GET" and app.token_api == "wecom":
            wecom = True
        else:
            return None
        force = False
        if path == "/cgi-bin/stable_token":
            try:
                data = json.loads(await request.read() or b"{}")
                force = isinstance(data, dict) and data.get("force_refresh") is True
            except BodyError as exc:
                return sidecar_error(exc.status, exc.why, outcome="bad_request")
            except ValueError:
                pass
            except (RecursionError, MemoryError):
                return sidecar_error(400, TOO_DEEP, outcome="bad_request")
        try:
            token = await manager.refresh_for_caller() if force else (manager.current() or await manager.get())
        except TokenUnavailable as exc:
            return sidecar_error(503, str(exc))
        left = max(1, int(token.remaining(time.monotonic())))
        payload: dict[str, Any] = {"access_token": token.value, "expires_in": left}
        if wecom:
            payload = {"errcode": 0, "errmsg": "ok", **payload}
        return local_reply(json.dumps(payload).encode())

    async def _jssdk(self, request: Request, app: App, manager: TokenManager, path: str) -> Reply:
        """wx.config's fields for a page, signed with the app's jsapi ticket
        (WeCom: the corp ticket, or with kind=agent the agent ticket)."""
        if request.method != "GET":
            return sidecar_error(405, f"{path} answers GET only", outcome="bad_request")
        try:
            url, agent = jssdk_request.parse(request.query)
        except jssdk_request.BadRequest as exc:
            return sidecar_error(400, str(exc), outcome="bad_request")
        if agent and app.token_api != "wecom":
            return sidecar_error(400, f"kind=agent is for WeCom apps; app {app.name} is not one", outcome="bad_request")
        head = self._jssdk_heads.get((app.name, agent))
        if head is None:                    # only kind=agent without an agentid lacks one
            return sidecar_error(400, f"app {app.name} has no agentid in the config", outcome="bad_request")
        ticket = await held(manager.credential(signing_kind(app, agent)))
        if isinstance(ticket, Reply):
            return ticket
        return local_reply(jssdk.answer(head, ticket.value, url))

    @staticmethod
    async def _answer_ticket(request: Request, app: App, manager: TokenManager, path: str) -> Reply | None:
        """A ticket, in WeChat's shape, from the app's managed one: never a
        fetch of the caller's own, never forwarded (DESIGN.md, Tickets)."""
        kind = local_kind(app, path, request.query) if request.method == "GET" else None
        if kind is None:
            return None
        ticket = await held(manager.credential(kind))
        if isinstance(ticket, Reply):
            return ticket
        left = max(1, int(ticket.remaining(time.monotonic())))
        payload = {"errcode": 0, "errmsg": "ok", "ticket": ticket.value, "expires_in": left}
        return local_reply(json.dumps(payload).encode())

    # ------------------------------------------------------------ upstream

    def _allow_path(self, app: App, path: str) -> str:
        """The path an allow list is matched against: for a platform app's
        authorizer call by prefix (/<app>/<authorizer appid>/...), the WeChat
        path after the account."""
        if app.name in self.platforms:
            first, slash, rest = path[1:].partition("/")
            if slash and AUTHORIZER_APPID_RE.match(first):
                return "/" + rest
        return path

    @staticmethod
    def _hop_by_hop(request: Request) -> frozenset[bytes]:
        """The request headers not to forward: ours and the hop-by-hop ones,
        with those the client named in Connection."""
        skip = HOP_BY_HOP_BYTES
        for connection in request.connection:
            skip = skip | {h.strip().lower() for h in connection.split(b",") if h.strip()}
        return skip

    async def _send(self, pool: UpstreamPool, method: str, target: str,
                    headers: list[Header], body: bytes,
                    refresh_codes: frozenset[int]) -> _Answer:
        """Send, and read the answer's first bytes: a small answer whole, and
        its errcode; a large one (it cannot be a token error) is left to stream."""
        try:
            try:
                resp = await pool.request(method, target, headers, body)
            except UpstreamError as exc:               # WeChat's fallback hosts in turn, when it may move
                resp = await self.pools.fallback(pool, method, target, headers, body, exc)
        except UpstreamError as exc:
            raise _UpstreamFailed(self._failure(exc)) from None
        length = resp.content_length
        if length is not None and length > SNIFF_LIMIT:
            return resp, b"", False, None, ""
        # Small or unknown-length answer: buffer up to the limit and inspect.
        data = resp.whole_body(SNIFF_LIMIT)
        if data is None:
            timeout = self.config.upstream.timeout_s
            try:
                data = await resp.read_up_to(SNIFF_LIMIT, timeout)
            except UpstreamError as exc:
                resp.release()
                raise _UpstreamFailed(self._failure(exc)) from None
        complete = len(data) < SNIFF_LIMIT or resp.at_eof()
        errcode, errmsg = None, ""
        if complete and data:
            try:
                errcode, errmsg = self._errcode(resp, data, refresh_codes)
            except BaseException:
                resp.release()          # whatever went wrong, the pooled connection is given back
                raise
        return resp, data, complete, errcode, errmsg

    def _failure(self, exc: UpstreamError) -> Reply:
        """No answer from the upstream: 504 when it timed out, else 502."""
        if not isinstance(exc, UpstreamTimeout):
            return sidecar_error(502, str(exc))
        why = f"upstream timed out after {self.config.upstream.timeout_s:g} s"
        if "free" in str(exc):
            why += f": {exc}"
        return sidecar_error(504, why)

    @staticmethod
    def _errcode(resp: Response, data: bytes, refresh_codes: frozenset[int]) -> tuple[int | None, str]:
        """The errcode of a JSON answer: by Content-Type, or by a body that starts
        with `{` whatever the type says (binary endpoints, §6)."""
        encoding = resp.content_encoding
        if encoding:
            if encoding not in (b"gzip", b"deflate", b"x-gzip", b"identity"):
                return None, ""
            if encoding != b"identity":
                try:
                    # wbits 47: gzip or zlib header, detected; bounded output.
                    data = zlib.decompressobj(47).decompress(data, SNIFF_LIMIT)
                except zlib.error:
                    return None, ""
        first = data.find(b'"errcode"')
        if first < 0:
            return None, ""            # the common case for business answers
        if not (resp.content_type.startswith(JSON_TYPES_BYTES) or data.lstrip()[:1] == b"{"):
            return None, ""
        # No token errcode anywhere: the first errcode is the answer's (WeChat
        # writes it first); no need to parse the whole body.
        if data.find(b'"errcode"', first + 9) < 0:     # the usual single errcode
            code = _errcode_in(data[first + 9:first + 9 + _ERRCODE_WINDOW])
            if code is None:
                match = _ERRCODE_RE.match(data, first)
                code = int(match.group(1)) if match is not None else None
            if code is not None and code not in refresh_codes:
                return code, ""
        else:
            codes = _ERRCODE_RE.findall(data)
            if codes and refresh_codes.isdisjoint(map(int, codes)):
                return int(codes[0]), ""
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError, MemoryError):
            return None, ""            # not JSON we can read: relayed as it is
        if not isinstance(parsed, dict):
            return None, ""
        code = parsed.get("errcode")
        if isinstance(code, bool) or not isinstance(code, int):
            return None, ""
        return code, str(parsed.get("errmsg", ""))[:300]

    # ------------------------------------------------------------ answer

    async def _relay(self, request: Request, resp: Response, head: bytes, complete: bool) -> Reply:
        """A HEAD answer, or one to stream (a small GET answer is sent whole by
        `_exchange`); `head` is what `_send` read of the body already."""
        headers = resp.relay_headers       # hop-by-hop headers were left out while parsing
        if request.method == "HEAD":
            # No body, but the upstream's Content-Length describes the GET answer.
            resp.release()
            request.start(resp.status, headers, resp.content_length)
            request.finish()
            return Reply(resp.status)
        if complete:
            resp.release()
            return Reply(resp.status, headers, head)
        # Large or binary answer: stream through, never held in memory.
        timeout = self.config.upstream.timeout_s
        try:
            request.start(resp.status, headers, resp.content_length)
            if head:
                await request.write(head)
            while chunk := await resp.read_chunk(timeout):
                await request.write(chunk)
            request.finish()
        except UpstreamError as exc:
            # The status line is gone already: cut the connection so the
            # client sees a truncated answer rather than a silently short one.
            log.warning("upstream failed mid-answer: %s", exc)
            request.abort()
        except ConnectionResetError:
            request.abort()   # the app went away; nothing to tell it
        finally:
            resp.release()
        return Reply(resp.status)


class _UpstreamFailed(Exception):
    def __init__(self, response: Reply):
        super().__init__(response.status)
        self.response = response
