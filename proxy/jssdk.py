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
import secrets
import time
from urllib.parse import unquote_plus

MAX_URL_BYTES = 4096


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
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise BadRequest("url must not contain spaces or control characters")
    if kinds not in ([], ["agent"]):
        raise BadRequest("kind must be agent or left out")
    return url, kinds == ["agent"]


def config(ticket: str, url: str, wall: float | None = None) -> dict[str, object]:
    """timestamp, nonceStr and signature for `url` (without appId / corpid)."""
    timestamp = int(time.time() if wall is None else wall)
    nonce = secrets.token_hex(8)
    return {"timestamp": timestamp, "nonceStr": nonce, "signature": signature(ticket, nonce, timestamp, url)}
