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

from aiohttp import web

from .core import (
    DEMO_APPID,
    DEMO_AUTHORIZER_APPID,
    DEMO_COMPONENT_AES_KEY,
    DEMO_COMPONENT_APPID,
    DEMO_COMPONENT_SECRET,
    DEMO_COMPONENT_TOKEN,
    DEMO_CORPID,
    DEMO_CORPSECRET,
    DEMO_SECRET,
    MEDIA_CHUNK,
    Issued,
    SimSettings,
    media_bytes,
)
from .pay import PayApis
from .platform import PlatformApis
from .pushes import DEMO_MESSAGE_AES_KEY, DEMO_MESSAGE_TOKEN, PushApis
from .tickets import TicketApis
from .tokens import TokenApis

__all__ = ["DEMO_APPID", "DEMO_AUTHORIZER_APPID", "DEMO_COMPONENT_AES_KEY", "DEMO_COMPONENT_APPID",
           "DEMO_COMPONENT_SECRET", "DEMO_COMPONENT_TOKEN", "DEMO_CORPID", "DEMO_CORPSECRET", "DEMO_SECRET",
           "DEMO_MESSAGE_AES_KEY", "DEMO_MESSAGE_TOKEN",
           "MEDIA_CHUNK", "Issued", "SimSettings", "WeChatSimulator", "main", "media_bytes"]


class WeChatSimulator(TokenApis, TicketApis, PlatformApis, PushApis, PayApis):
    """WeChat, as wechat-api-notes.md describes it: one API family per module."""

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
        app.router.add_route("POST", "/_sim/push_message", self.ctl_push_message)
        self.pay_routes(app)
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
