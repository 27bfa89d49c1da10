"""JS-SDK and card tickets, WeCom's corp and agent tickets.
"""
from __future__ import annotations

import secrets

from aiohttp import web

from .core import Issued, SimCore


class TicketApis(SimCore):
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
