"""The simulator's state and shared helpers (see the package's docstring for
what it follows): issued tokens and their grace, counters, settings, error
answers, test controls under `/_sim/`.
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
    egress_ip: str = "203.0.113.7"   # the caller's IP as WeChat names it in 40164 (not whitelisted)
    message_push_url: str = ""       # an account's server URL for message pushes (/_sim/push_message)
    pay_notify_url: str = ""         # where WeChat Pay notifications go (/_sim/pay/notify)
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


class SimCore:
    """The simulator's state and what every API family shares: issued
    tokens, counters, error answers and the test controls."""

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
        # appid -> (message token, EncodingAESKey) of its server configuration (message pushes)
        self.message_accounts: dict[str, tuple[str, str]] = {}
        self.settings = settings or SimSettings()
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.messages_sent: list[dict[str, Any]] = []     # message pushes and how they were answered
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
            ip = self.settings.egress_ip
            msg = {40164: f"invalid ip {ip} ipv6 ::ffff:{ip}, not in whitelist rid: 6751a3f2-0b1c2d3e-4f5a6b7c",
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
