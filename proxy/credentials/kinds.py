"""Every credential an app holds besides its token, in one table.

A credential is (kind, owner): a kind names how it is fetched (a path and a
query, always with the app's token), the owner is whose it is, which is its
key in the store. Adding a kind is a row here; the engine that holds it
(lazy, shared, single flight, refreshed ahead) is the token's own
TokenManager, made the first time a kind is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import App
from ..http.server import query_values


@dataclass(frozen=True)
class Kind:
    name: str
    wecom: bool                       # a WeCom app's credential, else an Official Account / Mini Program's
    path: str                         # the WeChat endpoint it is fetched from, with access_token
    query: dict[str, str]
    owner: Callable[[App], str]       # whose it is: the part of its store key after the kind

    def serves(self, app: App) -> bool:
        return self.wecom == (app.token_api == "wecom")


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("jsapi_ticket", False, "/cgi-bin/ticket/getticket", {"type": "jsapi"}, lambda app: app.appid),
    Kind("wx_card_ticket", False, "/cgi-bin/ticket/getticket", {"type": "wx_card"}, lambda app: app.appid),
    # WeCom: the corp ticket belongs to the corp (shared by its applications),
    # the agent ticket to one application (corp and agent secret, as its token).
    Kind("corp_jsapi_ticket", True, "/cgi-bin/get_jsapi_ticket", {}, lambda app: app.appid),
    Kind("agent_config_ticket", True, "/cgi-bin/ticket/get", {"type": "agent_config"},
         lambda app: app.store_key.split(":", 1)[1]),
)}

# The calls answered locally with a credential: (path, type parameter) -> kind.
LOCAL_ANSWERS: dict[tuple[str, str], str] = {(k.path, k.query.get("type", "")): k.name for k in KINDS.values()}


def store_key(kind: str, app: App) -> str:
    return f"{kind}:{KINDS[kind].owner(app)}"


def kinds_for(app: App) -> list[str]:
    return [name for name, kind in KINDS.items() if kind.serves(app)]


def signing_kind(app: App, agent: bool) -> str:
    """The ticket a JS-SDK config is signed with (DESIGN.md, /sidecar/jssdk)."""
    if app.token_api != "wecom":
        return "jsapi_ticket"
    return "agent_config_ticket" if agent else "corp_jsapi_ticket"


def local_kind(app: App, path: str, raw_query: str) -> str | None:
    """The credential a call asks for and the sidecar answers itself, if any:
    only GET-able ticket paths of the app's own account kind."""
    types = query_values(raw_query, "type")
    kind = LOCAL_ANSWERS.get((path, types[0] if types else ""))
    return kind if kind is not None and KINDS[kind].serves(app) else None


TICKET_PATHS = frozenset(path for path, _ in LOCAL_ANSWERS)
