"""The answers the sidecar makes itself, on either side: its JSON errors
(WeChat's shape) and its local JSON answers, never cached."""
from __future__ import annotations

from .server import JSON_HEADER, Reply, http_date, json_error_body


def local_reply(body: bytes) -> Reply:
    """A JSON answer the sidecar makes itself (tokens, tickets, jssdk):
    never cached by anyone on the way."""
    return Reply(200, [JSON_HEADER, (b"Cache-Control", b"no-store"), (b"Date", http_date())], body)


def sidecar_error(status: int, why: str, headers: dict[str, str] | None = None,
                  outcome: str = "") -> Reply:
    """An error made by the sidecar itself, in WeChat's shape (DESIGN.md);
    `outcome` is how it is counted in wts_calls_total{outcome}."""
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return Reply(status, [JSON_HEADER, (b"Date", http_date()), *extra], json_error_body(why),
                 outcome or _OUTCOME_BY_STATUS.get(status, "bad_request"))


_OUTCOME_BY_STATUS = {502: "upstream_unreachable", 504: "upstream_timeout", 503: "no_token"}
