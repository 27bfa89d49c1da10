"""WeChat's JS-SDK signature, pure: what a page's `wx.config` (or WeCom's
`wx.agentConfig`) needs, signed with the app's ticket, so that the app never
touches a ticket (DESIGN.md, "Tickets (JSSDK and cards)"). The request side
(`GET /sidecar/jssdk?url=...`) is outbound/jssdk_request.py.

The signature is WeChat's JS-SDK one (Official Account JS-SDK docs, appendix
1; WeCom's JS-SDK signature algorithm is the same): SHA-1, in hex, of
`jsapi_ticket=T&noncestr=N&timestamp=TS&url=U`, where U is the page's URL
without its `#fragment`.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time


def signature(ticket: str, noncestr: str, timestamp: int, url: str) -> str:
    text = f"jsapi_ticket={ticket}&noncestr={noncestr}&timestamp={timestamp}&url={url}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def head(who: dict[str, str | None]) -> str:
    """The start of an answer naming the app (appId, or corpid and agentid):
    made once per app, since only these fields need JSON's escaping."""
    return json.dumps(who)[:-1] + ", "


def answer(head: str, ticket: str, url: str) -> bytes:
    """The JSON answer: `head` and the signed fields (digits and hex)."""
    timestamp = int(time.time())
    nonce = secrets.token_hex(8)
    sig = signature(ticket, nonce, timestamp, url)
    return f'{head}"timestamp": {timestamp}, "nonceStr": "{nonce}", "signature": "{sig}"}}'.encode()

