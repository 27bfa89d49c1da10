"""A WeChat API simulator for `demo` and the tests.

It follows wechat-api-notes.md: `/cgi-bin/token` issues a new token on every
call and leaves only the immediately previous one a grace window;
`/cgi-bin/stable_token` returns the same token until its last
`stable_window_s` seconds (force mode rotates it, 30 s apart, 20 a day);
WeCom's `/cgi-bin/gettoken` returns the same token until expiry; daily quotas
end in 45009; business calls check the token (41001 missing, 40001 invalid or
superseded, 42001 expired) and echo what they received. Errors are JSON under
a configurable Content-Type (binary endpoints answer errors as JSON too).

Test controls live under `/_sim/` (a root WeChat does not have): settings,
rotating a token as if another system fetched it, and counters.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from aiohttp import web

DEMO_APPID = "wx5f0b1e2d3c4a0001"
DEMO_SECRET = "demo-appsecret-0123456789abcdef"
DEMO_CORPID = "ww5f0b1e2d3c4a0001"
DEMO_CORPSECRET = "demo-corpsecret-0123456789abcdef"

# A third-party platform (WeChat Open Platform) and one account it serves.
DEMO_COMPONENT_APPID = "wx5f0b1e2d3c4a0c01"
DEMO_COMPONENT_SECRET = "demo-componentsecret-0123456789ab"
DEMO_COMPONENT_TOKEN = "demo-msg-token"
DEMO_COMPONENT_AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DEMO_AUTHORIZER_APPID = "wx5f0b1e2d3c4a0a01"

MEDIA_CHUNK = 64 * 1024


@dataclass
class SimSettings:
    ttl_s: float = 7200.0            # token lifetime, "up to 7200" (§1.1)
    grace_s: float = 300.0           # the previous token's grace after a re-fetch (§2)
    stable_window_s: float = 300.0   # stable_token renews only in the last 300 s (§1.2)
    force_spacing_s: float = 30.0    # stable force calls 30 s apart (§1.2)
    force_daily_limit: int = 20      # stable force calls a day (§1.2)
    token_daily_limit: int = 2000    # /cgi-bin/token a day (§3)
    stable_daily_limit: int = 500000  # stable_token a day (§1.2)
    wecom_daily_limit: int = 2000
    latency_s: float = 0.0           # added to business calls
    token_latency_s: float = 0.0     # added to token calls
    token_fault: str = ""            # "", http500, busy, garbage, html, empty, no_token, absurd_expires, errcode:N
    error_content_type: str = "application/json; encoding=utf-8"
    reject_all: bool = False         # every business call answers 40001
    wecom_errors: bool = False       # answer bad tokens as WeCom does: 40014, not 40001 (§8)
    # Tickets: 7200 s, fetched with the token, "api calls are very limited,
    # cache it globally" (Official Account JS-SDK docs, appendix 1:
    # developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/JS-SDK.html).
    # While a ticket lives, a fetch returns the same ticket and still says
    # expires_in 7200, not the seconds left, and a fetch ends no earlier
    # ticket (unlike /cgi-bin/token): WeChat's docs say neither, developers
    # report both on developers.weixin.qq.com/community (2020-2024 threads).
    ticket_ttl_s: float = 7200.0
    # WeCom: "in one hour a corp may fetch jsapi_ticket at most 400 times, and
    # one application at most 100" (developer.work.weixin.qq.com/document/path/90454,
    # frequency limits; an hourly block lasts 60 minutes).
    # Past it the simulator answers 45009.
    wecom_corp_ticket_hourly_limit: int = 400
    wecom_agent_ticket_hourly_limit: int = 100
    # Open Platform (wechat-api-notes: see README "Open Platform facts"):
    # WeChat pushes a component_verify_ticket every 10 minutes, encrypted, to
    # the platform's callback (push_url here; no pushes while it is empty);
    # a ticket is valid 12 hours. The simulator is stricter than WeChat in
    # one way: api_component_token takes only the latest ticket (61006
    # otherwise), so a sidecar that keeps an old one is caught.
    verify_ticket_interval_s: float = 600.0
    verify_ticket_ttl_s: float = 43200.0
    push_url: str = ""
    # api_authorizer_token's answer carries authorizer_refresh_token; with
    # this on it is a new one each time and the one used is dead (61023).
    rotate_refresh_tokens: bool = False
    auth_code_ttl_s: float = 600.0


@dataclass
class Issued:
    value: str
    api: str
    key: str
    issued_at: float
    expires_at: float
    dead_at: float = float("inf")    # when a re-fetch ended it (after any grace)


def media_bytes(media_id: str, size: int) -> Any:
    """The deterministic content of a media file, in chunks (tests hash it)."""
    seed = hashlib.sha256(media_id.encode()).digest()
    block = (seed * (MEDIA_CHUNK // len(seed) + 1))[:MEDIA_CHUNK]
    sent = 0
    counter = 0
    while sent < size:
        n = min(MEDIA_CHUNK, size - sent)
        chunk = bytes([counter & 0xFF]) + block[1:n] if n > 1 else block[:n]
        yield chunk
        sent += n
        counter += 1


class WeChatSimulator:
    def __init__(self, accounts: dict[str, str] | None = None,
                 corps: dict[str, list[str]] | None = None,
                 settings: SimSettings | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 platforms: dict[str, tuple[str, str, str]] | None = None):
        self.accounts = dict(accounts or {DEMO_APPID: DEMO_SECRET})
        # component_appid -> (component_appsecret, message token, EncodingAESKey)
        self.platforms = dict(platforms or {DEMO_COMPONENT_APPID: (
            DEMO_COMPONENT_SECRET, DEMO_COMPONENT_TOKEN, DEMO_COMPONENT_AES_KEY)})
        self.corps = {k: list(v) for k, v in (corps or {DEMO_CORPID: [DEMO_CORPSECRET]}).items()}
        self.settings = settings or SimSettings()
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.tokens: dict[str, Issued] = {}
        self.current: dict[str, Issued] = {}
        self.history: dict[str, list[Issued]] = {}
        self.fetches: dict[str, int] = {}          # "api:appid" -> token endpoint calls that issued or returned a token
        self.fetch_times: list[float] = []         # clock() of each such call
        self.fetch_attempts: dict[str, int] = {}   # "api:appid" -> every call to a token endpoint
        self.daily: dict[str, int] = {}
        self.last_force: dict[str, float] = {}
        self.force_count: dict[str, int] = {}
        self.calls: deque[dict[str, Any]] = deque(maxlen=20000)
        self.business_calls = 0
        self.business_received = 0     # counted on arrival, before any latency_s
        self.tickets: dict[str, Issued] = {}          # "kind:owner" -> the live ticket
        self.ticket_values: dict[str, Issued] = {}    # every ticket issued, by value
        self.ticket_fetches: dict[str, int] = {}      # kind -> fetches answered with a ticket
        self.ticket_hourly: dict[str, list[float]] = {}
        self.verify_tickets: dict[str, Issued] = {}        # component_appid -> the latest verify ticket
        self.refresh_tokens: dict[str, str] = {}          # authorizer appid -> its valid refresh token
        self.authorizer_owner: dict[str, str] = {}        # authorizer appid -> component_appid
        self.auth_codes: dict[str, tuple[str, str, float]] = {}   # code -> (component, authorizer, expires)
        self.authorizer_fetches: dict[str, int] = {}      # authorizer appid -> api_authorizer_token answered
        self.refresh_token_refusals = 0                   # 61023 answers
        self.pushes_sent: list[tuple[str, int]] = []      # (InfoType, HTTP status of the answer)
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ token bookkeeping

    def _new_token(self, api: str, key: str, ttl: float | None = None) -> Issued:
        now = self.clock()
        value = f"SIM_{api[:2].upper()}_{next(self._ids)}_" + secrets.token_urlsafe(48)
        issued = Issued(value=value, api=api, key=key, issued_at=now,
                        expires_at=now + (self.settings.ttl_s if ttl is None else ttl))
        self.tokens[value] = issued
        self.current[key] = issued
        self.history.setdefault(key, []).append(issued)
        return issued

    def _supersede(self, key: str, grace_s: float) -> None:
        """A new token replaces the current one: only the immediately previous
        token keeps a grace window; any older one dies now (§10)."""
        now = self.clock()
        previous = self.current.get(key)
        for old in self.history.get(key, []):
            if old is not previous:
                old.dead_at = min(old.dead_at, now)
        if previous is not None:
            previous.dead_at = min(previous.dead_at, now + grace_s)
        self.history[key] = [previous] if previous is not None else []

    @staticmethod
    def wecom_key(corpid: str, corpsecret: str) -> str:
        """WeCom tokens belong to one application: corp and agent secret (§8)."""
        return f"wecom:{corpid}:{hashlib.sha256(corpsecret.encode()).hexdigest()[:16]}"

    def rotate(self, appid: str, api: str = "stable", grace_s: float = 0.0, key: str | None = None) -> str:
        """Another system fetched a token for this appid (test control)."""
        key = key or f"{api}:{appid}"
        api = key.split(":", 1)[0]
        self._supersede(key, grace_s)
        return self._new_token(api, key).value

    def token_error(self, value: str | None) -> tuple[int, str] | None:
        invalid = ((40014, "invalid access_token") if self.settings.wecom_errors
                   else (40001, "invalid credential, access_token is invalid or not latest"))
        if self.settings.reject_all and value:
            return invalid
        if not value:
            return 41001, "access_token missing"
        issued = self.tokens.get(value)
        now = self.clock()
        if issued is None or now >= issued.dead_at:
            return invalid
        if now >= issued.expires_at:
            return 42001, "access_token expired"
        return None

    def _count_fetch(self, key: str) -> None:
        self.fetches[key] = self.fetches.get(key, 0) + 1
        self.fetch_times.append(self.clock())

    def fetch_count(self, api: str | None = None, appid: str | None = None) -> int:
        return sum(n for k, n in self.fetches.items()
                   if (api is None or k.split(":", 1)[0] == api)
                   and (appid is None or k.split(":", 1)[1] == appid))

    def attempt_count(self) -> int:
        return sum(self.fetch_attempts.values())

    def issued_tokens(self) -> list[str]:
        return list(self.tokens)

    # ------------------------------------------------------------ HTTP helpers

    def _error(self, errcode: int, errmsg: str, status: int = 200, **extra: Any) -> web.Response:
        rid = f"{secrets.token_hex(4)}-{secrets.token_hex(4)}-{secrets.token_hex(4)}"
        body = {**extra, "errcode": errcode, "errmsg": f"{errmsg} rid: {rid}"}
        return web.Response(status=status, body=json.dumps(body).encode(),
                            headers={"Content-Type": self.settings.error_content_type})

    @staticmethod
    def _json(data: dict[str, Any]) -> web.Response:
        return web.Response(body=json.dumps(data).encode(),
                            headers={"Content-Type": "application/json; encoding=utf-8"})

    def _token_answer(self, issued: Issued, wecom: bool = False) -> web.Response:
        left = max(1, round(issued.expires_at - self.clock()))
        body: dict[str, Any] = {"access_token": issued.value, "expires_in": left}
        if wecom:
            body = {"errcode": 0, "errmsg": "ok", **body}
        return self._json(body)

    async def _token_fault(self, key: str) -> web.StreamResponse | None:
        self.fetch_attempts[key] = self.fetch_attempts.get(key, 0) + 1
        if self.settings.token_latency_s:
            await asyncio.sleep(self.settings.token_latency_s)
        fault = self.settings.token_fault
        if not fault:
            return None
        if fault == "http500":
            return web.Response(status=500, text="Internal Server Error")
        if fault == "busy":
            return self._error(-1, "system error")
        if fault == "garbage":
            return web.Response(body=b"\x00\xff\x13garbage", content_type="application/octet-stream")
        if fault == "html":
            return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if fault == "empty":
            return web.Response(body=b"", content_type="application/json")
        if fault == "no_token":
            return self._json({"expires_in": 7200})
        if fault == "absurd_expires":
            return self._json({"access_token": "X" * 40, "expires_in": -5})
        if fault.startswith("errcode:"):
            code = int(fault.split(":", 1)[1])
            msg = {40164: "invalid ip 203.0.113.7 ipv6 ::ffff:203.0.113.7, not in whitelist",
                   45009: "reach max api daily quota limit", 45011: "api minute-quota reach limit"
                   }.get(code, "simulated error")
            return self._error(code, msg)
        return None

    def _bad_credentials(self, known: dict[str, str], appid: str, secret: str) -> web.Response | None:
        """WeChat's answer to an unknown appid or a wrong secret, if it is one."""
        if appid not in known:
            return self._error(40013, "invalid appid")
        if not secrets.compare_digest(secret, known[appid]):
            return self._error(40125, "invalid appsecret")
        return None

    def _quota(self, key: str, limit: int) -> bool:
        """Count one call against a daily quota; False when it is used up."""
        used = self.daily.get(key, 0)
        if used >= limit:
            return False
        self.daily[key] = used + 1
        return True

    # ------------------------------------------------------------ token endpoints

    async def get_token(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        appid = q.get("appid", "")
        key = f"client_credential:{appid}"
        fault = await self._token_fault(key)
        if fault is not None:
            return fault
        if q.get("grant_type") != "client_credential":
            return self._error(40002, "invalid grant_type")
        if not appid:
            return self._error(41002, "appid missing")
        if not q.get("secret"):
            return self._error(41004, "appsecret missing")
        refused = self._bad_credentials(self.accounts, appid, q["secret"])
        if refused is not None:
            return refused
        if not self._quota(key, self.settings.token_daily_limit):
            return self._error(45009, "reach max api daily quota limit, could get access_token by getStableAccessToken")
        self._count_fetch(key)
        return self._token_answer(self._reissue("client_credential", key))

    async def stable_token(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        appid = str(body.get("appid", ""))
        key = f"stable:{appid}"
        fault = await self._token_fault(key)
        if fault is not None:
            return fault
        if body.get("grant_type") != "client_credential":
            return self._error(40002, "invalid grant_type")
        refused = self._bad_credentials(self.accounts, appid, str(body.get("secret", "")))
        if refused is not None:
            return refused
        if not self._quota(key, self.settings.stable_daily_limit):
            return self._error(45009, "reach max api daily quota limit")
        now = self.clock()
        current = self.current.get(key)
        live = current is not None and now < current.dead_at and now < current.expires_at
        self._count_fetch(key)
        if body.get("force_refresh") is True:
            if live and now - self.last_force.get(key, -1e18) < self.settings.force_spacing_s:
                return self._token_answer(current)  # too soon: nothing is refreshed
            if self.force_count.get(key, 0) >= self.settings.force_daily_limit:
                return self._error(45009, "reach max api daily quota limit")
            self.force_count[key] = self.force_count.get(key, 0) + 1
            self.last_force[key] = now
            self._supersede(key, self.settings.grace_s)
            return self._token_answer(self._new_token("stable", key))
        if live and current.expires_at - now > self.settings.stable_window_s:
            return self._token_answer(current)
        # Last window of the old token: a new one, and the old one works on
        # until its own expiry (§1.2: both valid for those minutes).
        return self._token_answer(self._new_token("stable", key))

    async def wecom_gettoken(self, request: web.Request) -> web.StreamResponse:
        corpid, corpsecret = request.query.get("corpid", ""), request.query.get("corpsecret", "")
        key = self.wecom_key(corpid, corpsecret)
        fault = await self._token_fault(key)
        if fault is not None:
            return fault
        if corpid not in self.corps:
            return self._error(40013, "invalid corpid")
        if corpsecret not in self.corps[corpid]:
            return self._error(40001, "invalid secret")
        if not self._quota(key, self.settings.wecom_daily_limit):
            return self._error(45009, "api freq out of limit")
        self._count_fetch(key)
        now = self.clock()
        current = self.current.get(key)
        if current is not None and now < current.dead_at and now < current.expires_at:
            return self._token_answer(current, wecom=True)  # same token until expiry (§8)
        return self._token_answer(self._new_token("wecom", key), wecom=True)

    # ------------------------------------------------------------ calls that carry the secret

    def _check_app_secret(self, appid: str, secret: str | None) -> tuple[int, str] | None:
        if not appid:
            return 41002, "appid missing"
        if appid not in self.accounts:
            return 40013, "invalid appid"
        if secret is not None and not secrets.compare_digest(secret, self.accounts[appid]):
            return 40125 if secret else 41004, "invalid appsecret" if secret else "appsecret missing"
        return None

    async def secret_call(self, request: web.Request) -> web.StreamResponse:
        """jscode2session, oauth2 and clear_quota/v2: appid + secret, no token."""
        q = request.query
        path = request.path
        await self._record(request, b"", None)
        secret_name = {"/cgi-bin/clear_quota/v2": "appsecret", "/sns/oauth2/refresh_token": None}.get(path, "secret")
        error = self._check_app_secret(q.get("appid", ""), q.get(secret_name, "") if secret_name else None)
        if error is not None:
            return self._error(*error)
        digest = hashlib.sha256((q.get("js_code", "") + q.get("code", "") + q.get("refresh_token", "")).encode()).hexdigest()
        if path == "/sns/jscode2session":
            if not q.get("js_code"):
                return self._error(41008, "missing code")
            return self._json({"openid": "o" + digest[:27], "session_key": digest[27:51]})
        if path == "/cgi-bin/clear_quota/v2":
            self.daily.clear()
            return self._json({"errcode": 0, "errmsg": "ok"})
        return self._json({"access_token": "USER_" + digest[:40], "expires_in": 7200,
                           "refresh_token": "REFRESH_" + digest[:40], "openid": "o" + digest[:27],
                           "scope": "snsapi_base"})

    # ------------------------------------------------------------ business endpoints

    async def _record(self, request: web.Request, body: bytes, error: tuple[int, str] | None) -> None:
        self.business_calls += 1
        self.calls.append({
            "method": request.method, "path": request.path, "query": request.rel_url.raw_query_string,
            "access_token": request.query.getall("access_token", []),
            "body_sha256": hashlib.sha256(body).hexdigest(), "body_len": len(body),
            "errcode": error[0] if error else 0,
        })

    async def business(self, request: web.Request) -> web.StreamResponse:
        self.business_received += 1
        body = await request.read()
        if self.settings.latency_s:
            await asyncio.sleep(self.settings.latency_s)
        path = request.path
        user_token_path = path.startswith("/sns/")
        token_param = "component_access_token" if path.startswith("/cgi-bin/component/") else "access_token"
        error = None if user_token_path else self.token_error(request.query.get(token_param))
        await self._record(request, body, error)
        if error is not None:
            return self._error(*error)
        if path == "/cgi-bin/media/get":
            return await self._media(request)
        if path in ("/wxa/getwxacodeunlimit", "/wxa/getwxacode", "/cgi-bin/wxaapp/createwxaqrcode"):
            return web.Response(body=b"\xff\xd8\xff\xe0" + hashlib.sha256(body).digest() * 64,
                                content_type="image/jpeg")
        if path == "/cgi-bin/media/upload":
            return await self._upload(request, body)
        return self._json({
            "errcode": 0, "errmsg": "ok", "method": request.method, "path": path,
            "query": request.rel_url.raw_query_string,
            "access_token": request.query.getall("access_token", []),
            "component_access_token": request.query.getall("component_access_token", []),
            "headers": {k: v for k, v in request.headers.items()},
            "body_sha256": hashlib.sha256(body).hexdigest(), "body_len": len(body),
            "body": body.decode("utf-8", "replace") if len(body) <= 4096 else None,
        })

    async def _media(self, request: web.Request) -> web.StreamResponse:
        media_id = request.query.get("media_id", "media")
        size = int(request.query.get("size", "65536"))
        resp = web.StreamResponse(headers={
            "Content-Type": "image/jpeg",
            "Content-Disposition": f'attachment; filename="{media_id}.jpg"'})
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()      # as some gateways answer
        else:
            resp.content_length = size
        await resp.prepare(request)
        for chunk in media_bytes(media_id, size):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _upload(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/form-data"):
            return self._error(41005, "media data missing")
        media_type = request.query.get("type", "image")
        return self._json({"type": media_type, "media_id": f"MEDIA_{hashlib.sha256(body).hexdigest()[:24]}",
                           "created_at": int(time.time())})

    # ------------------------------------------------------------ test controls

    async def ctl_settings(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            changes = await request.json()
            known = {f.name: f.type for f in fields(SimSettings)}
            for name, value in changes.items():
                if name not in known:
                    return web.json_response({"error": f"unknown setting {name}"}, status=400)
                setattr(self.settings, name, value)
        return web.json_response(asdict(self.settings))

    async def ctl_rotate(self, request: web.Request) -> web.Response:
        appid = request.query.get("appid", next(iter(self.accounts)))
        api = request.query.get("api", "stable")
        grace = float(request.query.get("grace_s", "0"))
        self.rotate(appid, api, grace)
        return web.json_response({"rotated": f"{api}:{appid}"})

    # ------------------------------------------------------------ tickets

    def ticket_fetch_count(self, kind: str | None = None) -> int:
        return sum(n for k, n in self.ticket_fetches.items() if kind is None or k == kind)

    def ticket_valid(self, value: str) -> bool:
        issued = self.ticket_values.get(value)
        return issued is not None and self.clock() < issued.expires_at

    def _ticket(self, kind: str, owner: str, hourly_limit: int | None = None) -> web.Response:
        now = self.clock()
        key = f"{kind}:{owner}"
        if hourly_limit is not None:
            recent = [t for t in self.ticket_hourly.get(key, []) if now - t < 3600]
            if len(recent) >= hourly_limit:
                return self._error(45009, "api freq out of limit")
            self.ticket_hourly[key] = recent + [now]
        current = self.tickets.get(key)
        if current is None or now >= current.expires_at:
            value = f"SIM_TK_{kind}_{next(self._ids)}_" + secrets.token_urlsafe(48)
            current = Issued(value=value, api=kind, key=key, issued_at=now,
                             expires_at=now + self.settings.ticket_ttl_s)
            self.tickets[key] = self.ticket_values[value] = current
        self.ticket_fetches[kind] = self.ticket_fetches.get(kind, 0) + 1
        ttl = self.settings.ticket_ttl_s          # an int as WeChat's, unless a test's short TTL is not
        return self._json({"errcode": 0, "errmsg": "ok", "ticket": current.value,
                           "expires_in": int(ttl) if ttl == int(ttl) else ttl})

    def _ticket_owner(self, request: web.Request) -> Issued | web.Response:
        """The token a ticket fetch came with, or WeChat's answer to a bad one."""
        value = request.query.get("access_token")
        error = self.token_error(value)
        return self._error(*error) if error is not None else self.tokens[value or ""]

    async def getticket(self, request: web.Request) -> web.Response:
        """GET /cgi-bin/ticket/getticket?type=jsapi|wx_card (Official Accounts)."""
        issued = self._ticket_owner(request)
        if isinstance(issued, web.Response):
            return issued
        kind = request.query.get("type", "")
        if kind not in ("jsapi", "wx_card"):
            return self._error(40097, "invalid args")
        return self._ticket(kind, issued.key.split(":", 1)[1])

    async def wecom_corp_ticket(self, request: web.Request) -> web.Response:
        """GET /cgi-bin/get_jsapi_ticket: the corp's ticket, shared by its apps."""
        issued = self._ticket_owner(request)
        if isinstance(issued, web.Response):
            return issued
        corpid = issued.key.split(":")[1]
        return self._ticket("corp_jsapi", corpid, self.settings.wecom_corp_ticket_hourly_limit)

    async def wecom_agent_ticket(self, request: web.Request) -> web.Response:
        """GET /cgi-bin/ticket/get?type=agent_config: one application's ticket."""
        issued = self._ticket_owner(request)
        if isinstance(issued, web.Response):
            return issued
        if request.query.get("type") != "agent_config":
            return self._error(40097, "invalid args")
        return self._ticket("agent_config", issued.key, self.settings.wecom_agent_ticket_hourly_limit)

    # ------------------------------------------------------------ Open Platform

    def crypto(self, component_appid: str) -> Any:
        from .wxcrypt import MessageCrypto
        _, token, aes = self.platforms[component_appid]
        return MessageCrypto(token, aes, component_appid)

    def push_request(self, component_appid: str, fields: dict[str, str]) -> tuple[str, bytes]:
        """A push as WeChat sends it: (query string, body)."""
        from .wxcrypt import signature
        inner = "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in
                        {"AppId": component_appid, "CreateTime": str(int(time.time())), **fields}.items())
        crypto = self.crypto(component_appid)
        encrypt = crypto.encrypt(f"<xml>{inner}</xml>".encode())
        timestamp, nonce = str(int(time.time())), str(secrets.randbelow(10**10))
        query = (f"signature={secrets.token_hex(20)}&timestamp={timestamp}&nonce={nonce}&encrypt_type=aes"
                 f"&msg_signature={signature(crypto.token, timestamp, nonce, encrypt)}")
        body = f"<xml><AppId><![CDATA[{component_appid}]]></AppId><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
        return query, body.encode()

    def new_verify_ticket(self, component_appid: str) -> str:
        now = self.clock()
        value = f"ticket@@@SIM_{next(self._ids)}_" + secrets.token_urlsafe(32)
        self.verify_tickets[component_appid] = Issued(value, "verify_ticket", component_appid, now,
                                                      now + self.settings.verify_ticket_ttl_s)
        return value

    async def push(self, component_appid: str, fields: dict[str, str]) -> int:
        """Send a push to push_url; the HTTP status it was answered with (0: not sent)."""
        import aiohttp
        url = self.settings.push_url
        if not url:
            return 0
        query, body = self.push_request(component_appid, fields)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{url}?{query}", data=body,
                                        headers={"Content-Type": "text/xml"}) as resp:
                    status = resp.status
        except (aiohttp.ClientError, OSError):
            status = 0
        self.pushes_sent.append((fields.get("InfoType", ""), status))
        return status

    async def push_verify_ticket(self, component_appid: str) -> int:
        ticket = self.new_verify_ticket(component_appid)
        return await self.push(component_appid, {"InfoType": "component_verify_ticket",
                                                 "ComponentVerifyTicket": ticket})

    async def run_pushes(self) -> None:
        """WeChat's timer: a verify ticket to every platform every interval
        (settings are read each turn, so a test may shorten or stop it)."""
        last = -float("inf")
        while True:
            interval = self.settings.verify_ticket_interval_s
            if interval > 0 and self.settings.push_url and self.clock() >= last + interval:
                last = self.clock()
                for component_appid in self.platforms:
                    await self.push_verify_ticket(component_appid)
            await asyncio.sleep(0.05)

    def authorize(self, component_appid: str, authorizer_appid: str) -> str:
        """An account authorizes the platform: an authorization code (the
        account is known to the simulator from now on)."""
        code = f"queryauthcode@@@SIM_{next(self._ids)}_" + secrets.token_urlsafe(24)
        self.auth_codes[code] = (component_appid, authorizer_appid, self.clock() + self.settings.auth_code_ttl_s)
        self.authorizer_owner[authorizer_appid] = component_appid
        if authorizer_appid not in self.accounts:
            self.accounts[authorizer_appid] = secrets.token_hex(16)
        return code

    def grant_refresh_token(self, authorizer_appid: str) -> str:
        token = f"refreshtoken@@@SIM_{next(self._ids)}_" + secrets.token_urlsafe(24)
        self.refresh_tokens[authorizer_appid] = token
        return token

    async def _component_call(self, request: web.Request) -> tuple[str, dict[str, Any]] | web.Response:
        """A component API call: (the platform it is from, by its
        component_access_token; its JSON body), or WeChat's answer to a bad one."""
        value = request.query.get("component_access_token")
        error = self.token_error(value)
        if error is not None:
            return self._error(*error)
        issued = self.tokens[value or ""]
        if issued.api != "component":
            return self._error(40001, "invalid credential, access_token is invalid or not latest")
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        return issued.key.split(":", 1)[1], body

    def _reissue(self, api: str, key: str) -> Issued:
        """A new token for `key`; the one it replaces keeps the grace window."""
        self._supersede(key, self.settings.grace_s)
        return self._new_token(api, key)

    def _expires_in(self, issued: Issued) -> int:
        return max(1, round(issued.expires_at - self.clock()))

    async def _json_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if request.method != "POST":
            return self._error(43002, "require POST method")
        try:
            body = await request.json()
            assert isinstance(body, dict)
        except Exception:
            return self._error(47001, "data format error")
        return body

    async def component_token(self, request: web.Request) -> web.StreamResponse:
        """POST /cgi-bin/component/api_component_token."""
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        appid = str(body.get("component_appid", ""))
        key = f"component:{appid}"
        fault = await self._token_fault(key)
        if fault is not None:
            return fault
        refused = self._bad_credentials({a: p[0] for a, p in self.platforms.items()}, appid,
                                        str(body.get("component_appsecret", "")))
        if refused is not None:
            return refused
        ticket = self.verify_tickets.get(appid)
        if ticket is None or body.get("component_verify_ticket") != ticket.value:
            return self._error(61006, "component ticket is invalid")
        if self.clock() >= ticket.expires_at:
            return self._error(61005, "component ticket is expired")
        if not self._quota(key, self.settings.token_daily_limit):
            return self._error(45009, "reach max api daily quota limit")
        self._count_fetch(key)
        issued = self._reissue("component", key)
        return self._json({"component_access_token": issued.value, "expires_in": self._expires_in(issued)})

    async def query_auth(self, request: web.Request) -> web.StreamResponse:
        """POST /cgi-bin/component/api_query_auth: an authorization code, once."""
        call = await self._component_call(request)
        if isinstance(call, web.Response):
            return call
        platform, body = call
        code = self.auth_codes.pop(str(body.get("authorization_code", "")), None)
        if code is None or code[0] != platform or self.clock() >= code[2]:
            # The code's errcode is not in WeChat's public docs; this is the
            # one developers report for a used or expired code.
            return self._error(61010, "code is expired")
        authorizer = code[1]
        issued = self._reissue("authorizer", f"authorizer:{authorizer}")
        return self._json({"authorization_info": {
            "authorizer_appid": authorizer, "authorizer_access_token": issued.value,
            "expires_in": self._expires_in(issued),
            "authorizer_refresh_token": self.grant_refresh_token(authorizer),
            "func_info": [{"funcscope_category": {"id": 1}}]}})

    async def authorizer_token(self, request: web.Request) -> web.StreamResponse:
        """POST /cgi-bin/component/api_authorizer_token: a new authorizer token
        for a valid refresh token (rotated when rotate_refresh_tokens)."""
        call = await self._component_call(request)
        if isinstance(call, web.Response):
            return call
        platform, body = call
        authorizer = str(body.get("authorizer_appid", ""))
        key = f"authorizer:{authorizer}"
        fault = await self._token_fault(key)
        if fault is not None:
            return fault
        if self.authorizer_owner.get(authorizer) != platform or body.get("component_appid") != platform:
            return self._error(61003, "component is not authorized by this account")
        valid = self.refresh_tokens.get(authorizer)
        if valid is None or body.get("authorizer_refresh_token") != valid:
            self.refresh_token_refusals += 1
            return self._error(61023, "refresh_token is invalid")
        self.authorizer_fetches[authorizer] = self.authorizer_fetches.get(authorizer, 0) + 1
        self._count_fetch(key)
        issued = self._reissue("authorizer", key)
        refresh = self.grant_refresh_token(authorizer) if self.settings.rotate_refresh_tokens else valid
        return self._json({"authorizer_access_token": issued.value, "expires_in": self._expires_in(issued),
                           "authorizer_refresh_token": refresh})

    async def ctl_bulk_authorize(self, request: web.Request) -> web.Response:
        """Many accounts authorize the platform at once (a scale test): their
        appids and first refresh tokens, as a platform's database holds them."""
        component = request.query.get("component_appid", next(iter(self.platforms)))
        count = int(request.query.get("count", "1000"))
        start = int(request.query.get("start", "0"))
        entries = []
        for n in range(start, start + count):
            appid = f"wx{n:016x}"
            self.authorizer_owner[appid] = component
            entries.append({"authorizer_appid": appid, "authorizer_refresh_token": self.grant_refresh_token(appid)})
        return web.json_response({"authorizers": entries})

    async def ctl_push_ticket(self, request: web.Request) -> web.Response:
        appid = request.query.get("appid", next(iter(self.platforms)))
        status = await self.push_verify_ticket(appid)
        return web.json_response({"pushed": status})

    async def ctl_authorize(self, request: web.Request) -> web.Response:
        component = request.query.get("component_appid", next(iter(self.platforms)))
        authorizer = request.query.get("authorizer_appid", DEMO_AUTHORIZER_APPID)
        code = self.authorize(component, authorizer)
        status = await self.push(component, {
            "InfoType": "authorized", "AuthorizerAppid": authorizer, "AuthorizationCode": code,
            "AuthorizationCodeExpiredTime": str(int(time.time() + self.settings.auth_code_ttl_s)),
            "PreAuthCode": "preauthcode@@@SIM"})
        return web.json_response({"authorization_code": code, "pushed": status})

    async def ctl_unauthorize(self, request: web.Request) -> web.Response:
        component = request.query.get("component_appid", next(iter(self.platforms)))
        authorizer = request.query.get("authorizer_appid", DEMO_AUTHORIZER_APPID)
        self.refresh_tokens.pop(authorizer, None)
        status = await self.push(component, {"InfoType": "unauthorized", "AuthorizerAppid": authorizer})
        return web.json_response({"pushed": status})

    async def _start_pushes(self, app: web.Application) -> Any:
        task = asyncio.create_task(self.run_pushes())
        yield
        task.cancel()

    async def ctl_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"fetches": self.fetches, "fetch_attempts": self.fetch_attempts,
                                  "ticket_fetches": self.ticket_fetches, "business_calls": self.business_calls,
                                  "authorizer_fetches": sum(self.authorizer_fetches.values()),
                                  "authorizers_fetched": len(self.authorizer_fetches),
                                  "refresh_token_refusals": self.refresh_token_refusals})

    async def ctl_cookies(self, request: web.Request) -> web.Response:
        """Answers with two Set-Cookie headers (a proxy must pass both back)."""
        response = web.json_response({"errcode": 0, "errmsg": "ok"})
        response.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    async def ctl_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    def app(self) -> web.Application:
        # Uploads up to WeCom's 20 MB file plus multipart overhead (§7).
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("GET", "/cgi-bin/token", self.get_token)
        app.router.add_route("*", "/cgi-bin/stable_token", self.stable_token)
        app.router.add_route("GET", "/cgi-bin/gettoken", self.wecom_gettoken)
        for path in ("/sns/jscode2session", "/sns/oauth2/access_token", "/sns/oauth2/refresh_token",
                     "/cgi-bin/clear_quota/v2"):
            app.router.add_route("*", path, self.secret_call)
        app.router.add_route("GET", "/cgi-bin/ticket/getticket", self.getticket)
        app.router.add_route("GET", "/cgi-bin/get_jsapi_ticket", self.wecom_corp_ticket)
        app.router.add_route("GET", "/cgi-bin/ticket/get", self.wecom_agent_ticket)
        app.router.add_route("*", "/cgi-bin/component/api_component_token", self.component_token)
        app.router.add_route("*", "/cgi-bin/component/api_query_auth", self.query_auth)
        app.router.add_route("*", "/cgi-bin/component/api_authorizer_token", self.authorizer_token)
        app.router.add_route("POST", "/_sim/component/push_ticket", self.ctl_push_ticket)
        app.router.add_route("POST", "/_sim/component/authorize", self.ctl_authorize)
        app.router.add_route("POST", "/_sim/component/unauthorize", self.ctl_unauthorize)
        app.router.add_route("POST", "/_sim/component/bulk_authorize", self.ctl_bulk_authorize)
        app.cleanup_ctx.append(self._start_pushes)
        app.router.add_route("*", "/_sim/settings", self.ctl_settings)
        app.router.add_route("POST", "/_sim/rotate", self.ctl_rotate)
        app.router.add_route("GET", "/_sim/stats", self.ctl_stats)
        app.router.add_route("POST", "/_sim/reset", self.ctl_reset)
        app.router.add_route("GET", "/_sim/cookies", self.ctl_cookies)
        app.router.add_route("*", "/{tail:.*}", self.business)
        return app


def main() -> None:
    """`python -m proxy.simulator --port N`: the simulator alone (benchmarks)."""
    import argparse
    parser = argparse.ArgumentParser(description="the WeChat simulator on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--accounts", type=int, default=0,
                        help="also accounts wx%%016x (0, 1, ...) with secrets fleet-secret-<n> (fleet benchmarks)")
    args = parser.parse_args()
    accounts = {DEMO_APPID: DEMO_SECRET, **{f"wx{n:016x}": f"fleet-secret-{n}" for n in range(args.accounts)}}
    web.run_app(WeChatSimulator(accounts=accounts).app(), host="127.0.0.1", port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
