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
from urllib.parse import unquote_plus

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
    # Read by hand: parse_qs took 8 µs a call, more than the signing.
    urls, kinds = [], []
    for part in raw_query.split("&"):
        name, _, value = part.partition("=")
        if name == "url":
            urls.append(unquote_plus(value))
        elif name == "kind":
            kinds.append(unquote_plus(value))
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


def answer(who: dict[str, str | None], ticket: str, url: str) -> bytes:
    """The JSON answer: `who` (appId, or corpid and agentid) and the signed
    fields. The signed fields are digits and hex, so only `who` needs JSON's
    escaping, done once per app and kept."""
    key = tuple(who.items())
    head = _heads.get(key)
    if head is None:
        head = _heads[key] = json.dumps(who)[:-1] + ", "
    timestamp = int(time.time())
    nonce = secrets.token_hex(8)
    sig = signature(ticket, nonce, timestamp, url)
    return f'{head}"timestamp": {timestamp}, "nonceStr": "{nonce}", "signature": "{sig}"}}'.encode()


_heads: dict[tuple[tuple[str, str | None], ...], str] = {}
