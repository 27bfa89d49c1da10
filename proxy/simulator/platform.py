"""WeChat Open Platform: component tokens from verify tickets, pushes
(encrypted with WeChat's scheme from proxy.wechat), authorization codes,
authorizer tokens and their refresh tokens.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from aiohttp import web

from .core import DEMO_AUTHORIZER_APPID, Issued, SimCore


class PlatformApis(SimCore):
    # ------------------------------------------------------------ Open Platform

    def crypto(self, component_appid: str) -> Any:
        from ..wechat.crypto import MessageCrypto
        _, token, aes = self.platforms[component_appid]
        return MessageCrypto(token, aes, component_appid)

    def push_request(self, component_appid: str, fields: dict[str, str],
                     at: float | None = None) -> tuple[str, bytes]:
        """A push as WeChat sends it: (query string, body); `at` (Unix
        seconds, default now) is its timestamp and CreateTime."""
        from ..wechat.crypto import signature
        sent = int(time.time() if at is None else at)
        inner = "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in
                        {"AppId": component_appid, "CreateTime": str(sent), **fields}.items())
        crypto = self.crypto(component_appid)
        encrypt = crypto.encrypt(f"<xml>{inner}</xml>".encode())
        timestamp, nonce = str(sent), str(secrets.randbelow(10**10))
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
