"""The request side of `GET /sidecar/jssdk?url=...`: which page URL a call
asks to have signed, checked before any ticket is touched (DESIGN.md,
"Tickets (JSSDK and cards)"). The signing itself is wechat/jssdk.py.
"""
from __future__ import annotations

import re

from ..http.server import query_values

MAX_URL_BYTES = 4096
# Spaces and control characters have no place in a page URL (one regex
# search: a per-character check cost more than the signing).
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


class BadRequest(Exception):
    pass


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
