"""`GET /admin/status`: what the status page (`GET /`) shows, as JSON, for
the page's own polling and for anyone who wants it. Per app: each credential
with its time to expiry, the last hour's fetches, failures and replays, the
last errors; a platform's authorizer counts; pushes. Never a token, a
ticket, a secret or a key: only names, numbers and failure descriptions.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..credentials.store import StoreUnavailable
from .history import History

if TYPE_CHECKING:
    from ..credentials import TokenManager


def _credential(kind: str, manager: "TokenManager", now: float) -> dict[str, Any]:
    state = manager.state
    token = state.token
    failure = state.last_failure
    failing = failure is not None and (token is None or token.fetched_at < failure.at)
    return {
        "credential": kind,
        "usable": state.usable(now),
        "expires_in_s": round(max(0.0, token.expires_at - now), 1) if token else None,
        "lifetime_s": round(token.expires_at - token.fetched_at, 1) if token else None,
        "fetched_s_ago": round(now - token.fetched_at, 1) if token else None,
        "last_fetch": "ok" if not failing else failure.describe(),   # type: ignore[union-attr]
        "fetches_ok": state.fetches_ok,
        "fetches_failed": state.fetches_failed,
        "refreshing": manager._inflight is not None,
    }


def _replays(sidecar: Any) -> dict[str, int]:
    """Calls replayed, by app (wts_replays_total summed over errcodes)."""
    replays: dict[str, int] = {}
    for (app, _errcode), count in sidecar.metrics.replays.values.items():
        replays[app] = replays.get(app, 0) + int(count)
    return replays


def sample(history: History, sidecar: Any) -> dict[str, int]:
    """Feed the history from the counters the sidecar keeps anyway; the replays by app."""
    replays = _replays(sidecar)
    for name, manager in sidecar.managers.items():
        holders = {"token": manager, **manager.dependents}
        ok = sum(m.state.fetches_ok for m in holders.values())
        failed = sum(m.state.fetches_failed for m in holders.values())
        last = {kind: (m.state.last_failure.at, m.state.last_failure.describe())
                for kind, m in holders.items() if m.state.last_failure is not None}
        history.sample(name, ok + failed, failed, replays.get(name, 0), last)
    return replays


async def status(history: History, sidecar: Any) -> dict[str, Any]:
    replays = sample(history, sidecar)
    now = time.monotonic()
    apps = []
    for name, manager in sidecar.managers.items():
        credentials = [_credential("token", manager, now)]
        credentials += [_credential(kind, m, now) for kind, m in manager.dependents.items()]
        entry: dict[str, Any] = {
            "name": name, "appid": manager.app.appid, "token_api": manager.app.token_api,
            "credentials": credentials,
            "replays": replays.get(name, 0),
            "history": history.view(name),
        }
        ip = manager.state.egress_ip_not_whitelisted()
        if ip:
            entry["egress_ip_not_whitelisted"] = ip
        platform = sidecar.platforms.get(name)
        if platform is not None:
            try:
                registered: int | None = await platform.store.registry_count(platform.app.appid)
            except StoreUnavailable:
                registered = None
            entry["platform"] = {"registered": registered, "cached": len(platform.managers),
                                 "refreshing": sum(1 for m in platform.managers.values() if m._inflight is not None)}
        pushes = sidecar.push_status(name)
        if pushes is not None:
            entry["pushes"] = {k: pushes[k] for k in ("delivered", "queued", "dropped", "last_failure")}
        apps.append(entry)
    merchants = [m.status() for m in getattr(sidecar, "merchants", {}).values()]
    return {"apps": apps, "merchants": merchants, "store": sidecar.config.store.kind}
