"""Token endpoints (`/cgi-bin/token`, `stable_token`, WeCom's `gettoken`),
the calls that carry a secret, and business calls that check the token and
echo what they received (media and uploads too).
"""
from __future__ import annotations

import asyncio
import hashlib
import secrets
import time

from aiohttp import web

from .core import SimCore, media_bytes


class TokenApis(SimCore):
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
