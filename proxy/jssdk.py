"""`GET /sidecar/jssdk?url=...`: what a page's `wx.config` (or WeCom's
`wx.agentConfig`) needs, signed with the app's ticket, so that the app never
touches a ticket (DESIGN.md, "Tickets (JSSDK and cards)").

The signature is WeChat's JS-SDK one (Official Account JS-SDK docs, appendix
1; WeCom's JS-SDK signature algorithm is the same): SHA-1, in hex, of
`jsapi_ticket=T&noncestr=N&timestamp=TS&url=U`, where U is the page's URL
without its `#fragment`.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import time

from .httpserver import query_values

MAX_URL_BYTES = 4096
# Spaces and control characters have no place in a page URL (one regex
# search: a per-character check cost more than the signing).
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


class BadRequest(Exception):
    pass


def signature(ticket: str, noncestr: str, timestamp: int, url: str) -> str:
    text = f"jsapi_ticket={ticket}&noncestr={noncestr}&timestamp={timestamp}&url={url}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def parse(raw_query: str) -> tuple[str, bool]:
    """The page URL (fragment dropped) and whether the agent ticket is asked for."""
    urls, kinds = query_values(raw_query, "url"), query_values(raw_query, "kind")
    if len(urls) != 1 or not urls[0]:
        raise BadRequest("jssdk needs exactly one url parameter: the page's URL")
    url = urls[0].split("#", 1)[0]
    if len(url.encode("utf-8")) > MAX_URL_BYTES:
        raise BadRequest(f"url over {MAX_URL_BYTES} bytes")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest[0] in "/?":
        raise BadRequest("url must be the page's http(s) URL")
    if _UNSAFE.search(url):
        raise BadRequest("url must not contain spaces or control characters")
    if kinds not in ([], ["agent"]):
        raise BadRequest("kind must be agent or left out")
    return url, kinds == ["agent"]


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

