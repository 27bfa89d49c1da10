"""Prometheus metrics, one registry per sidecar (no module globals).

Names follow Prometheus conventions (`_total` counters, `_seconds` units,
base units). What operators alert on and look at lives in
deploy/prometheus/rules.yaml (tested with promtool) and
deploy/grafana/dashboard.json; tests/test_monitoring.py checks that every
name they use is one this module writes.
"""
from __future__ import annotations

import logging
import time
from bisect import bisect_left as _bisect_left
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..credentials import TokenManager, TokenStore
    from ..credentials.platform import Platform

log = logging.getLogger("proxy.metrics")

# Buckets for one proxied call: sub-millisecond overhead up to WeChat's
# slow answers and the 15 s default upstream timeout.
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)

OUTCOMES = ("ok", "wechat_error", "token_rejected", "no_token", "upstream_unreachable",
            "upstream_timeout", "bad_request", "passthrough", "forbidden", "denied")

# The Prometheus text format 0.0.4 is written here directly: a handful of
# families need no client library (prometheus_client cost 1 MiB of RSS in
# every pod; the tests still parse this output with it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _value(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    # Sorted by name, as prometheus_client writes them (scrapers do not care; text matchers do).
    pairs = sorted(zip(names, values, strict=True))
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in pairs) + "}"


def _header(name: str, help_text: str, kind: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


class _Child:
    __slots__ = ("family", "key")

    def __init__(self, family: "Family", key: tuple[str, ...]):
        self.family, self.key = family, key

    def inc(self, amount: float = 1.0) -> None:
        values = self.family.values
        values[self.key] = values.get(self.key, 0.0) + amount

    def set(self, value: float) -> None:
        self.family.values[self.key] = float(value)


class Family:
    """A counter or gauge with labels: `family.labels(*values).inc()` / `.set(v)`."""

    def __init__(self, name: str, help_text: str, kind: str, labels: tuple[str, ...]):
        self.name = name + "_total" if kind == "counter" else name
        self.help, self.kind, self.label_names = help_text, kind, labels
        self.values: dict[tuple[str, ...], float] = {}

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}")
        return _Child(self, tuple(str(v) for v in values))

    def render(self) -> str:
        lines = [_header(self.name, self.help, self.kind)]
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, key)} {_value(value)}\n")
        return "".join(lines)


class _AppCalls:
    """One app's calls: counts by outcome, the duration histogram's buckets
    (then +Inf) and the sum of durations."""

    __slots__ = ("by_outcome", "buckets", "seconds")

    def __init__(self) -> None:
        self.by_outcome: dict[str, int] = {}
        self.buckets = [0] * (len(CALL_BUCKETS) + 1)
        self.seconds = 0.0


class Metrics:
    def __init__(self) -> None:
        # Per-call figures are kept in plain Python objects, one per app (a
        # few increments per call, no lock) and written as wts_calls_total and
        # wts_call_duration_seconds at scrape time.
        self.calls: dict[str, _AppCalls] = {}
        self.fetches = Family("wts_token_fetches", "Token fetches from WeChat, by app, api and result "
                              "(ok, credential, transient, quota, rate_limit)", "counter", ("app", "api", "result"))
        self.refreshes = Family("wts_token_refreshes", "Token refreshes started, by reason "
                                "(startup, proactive, errcode, admin, sdk_force, demand, retry)", "counter", ("app", "reason"))
        self.replays = Family("wts_replays", "Calls replayed after a token error, by errcode", "counter",
                              ("app", "errcode"))
        self.rotated = Family("wts_token_rotated_elsewhere", "Current tokens refused by WeChat before we "
                              "replaced them: another system fetches tokens for this appid", "counter", ("app",))
        self.fetches_today = Family("wts_token_fetches_today", "Token fetches counted today by the store "
                                    "(the whole cluster with store: redis), China time", "gauge", ("app",))
        self.authorizers = Family("wts_authorizers_registered", "Authorizers registered with a platform app "
                                  "(in the store)", "gauge", ("app",))
        self._managers: dict[str, "TokenManager"] = {}
        self.refused_ips: set[str] = set()       # egress IPs WeChat refused, each logged once
        self.egress: Any = None                  # http.egress.Egress: host switches
        self.delivery: Any = None                # inbound.delivery.Delivery: queues and drops
        self.merchants: Any = lambda: {}         # () -> the WeChat Pay merchants (credentials.pay.PayMerchant)
        self.pushes = Family("wts_pushes", "Pushes from WeChat on the callbacks listener, by app and result "
                             "(delivered, duplicate, late, queued, refused, verified)", "counter", ("app", "result"))
        self._store: "TokenStore | None" = None
        self._platforms: dict[str, "Platform"] = {}

    def observe_call(self, app: str, outcome: str, seconds: float) -> None:
        calls = self.calls.get(app)
        if calls is None:
            calls = self.calls[app] = _AppCalls()
        counts = calls.by_outcome
        counts[outcome] = counts.get(outcome, 0) + 1
        calls.buckets[_bisect_left(CALL_BUCKETS, seconds)] += 1
        calls.seconds += seconds

    def ip_refused(self, app: str, ip: str) -> None:
        """WeChat refused this egress IP (40164): say so once per IP, in words
        an operator acts on (the fetch failures keep being logged as such)."""
        if ip not in self.refused_ips:
            self.refused_ips.add(ip)
            log.warning("WeChat refuses calls from this sidecar's egress IP %s (40164: not whitelisted): add it "
                        "to the account's IP whitelist (Official Account platform: Settings and Development > "
                        "Basic configuration > IP whitelist)", ip,
                        extra={"event": "egress_ip_not_whitelisted", "app": app, "ip": ip})

    def watch(self, managers: dict[str, "TokenManager"], store: "TokenStore",
              platforms: "dict[str, Platform] | None" = None) -> None:
        self._managers, self._store, self._platforms = managers, store, platforms or {}

    async def render(self) -> bytes:
        """The exposition text; refreshes the values that need the store first."""
        if self._store is not None:
            for name, manager in self._managers.items():
                try:
                    count = await self._store.fetches_today(manager.app.store_key)
                except Exception:  # the store is down: keep the last value
                    continue
                if count is not None:
                    self.fetches_today.labels(name).set(count)
            for name, platform in self._platforms.items():
                try:
                    self.authorizers.labels(name).set(await self._store.registry_count(platform.app.appid))
                except Exception:  # the store is down: keep the last value
                    continue
        return self.text().encode()

    def text(self) -> str:
        now = time.monotonic()
        parts = [f.render() for f in (self.fetches, self.refreshes, self.replays, self.rotated,
                                      self.fetches_today)]
        expires = Family("wts_token_expires_in_seconds", "Seconds until the current token expires", "gauge",
                         ("app",))
        usable = Family("wts_token_usable", "1 when the app has a usable token", "gauge", ("app",))
        for name, manager in self._managers.items():
            token = manager.state.token
            expires.labels(name).set(max(0.0, token.expires_at - now) if token else 0.0)
            usable.labels(name).set(1.0 if manager.state.usable(now) else 0.0)
        parts += (expires.render(), usable.render())
        refused = Family("wts_egress_ip_not_whitelisted", "1 while the last token or ticket fetch was refused "
                         "because WeChat does not whitelist this egress IP (40164 / 60020)", "gauge", ("app", "ip"))
        for name, manager in self._managers.items():
            for held in (manager, *manager.dependents.values()):
                ip = held.state.egress_ip_not_whitelisted()
                if ip is not None:
                    refused.labels(name, ip).set(1.0)
        parts.append(refused.render())
        calls = Family("wts_calls", "Calls forwarded, by app and outcome", "counter", ("app", "outcome"))
        for app, per_app in self.calls.items():
            for outcome, count in per_app.by_outcome.items():
                calls.labels(app, outcome).set(count)
        parts.append(calls.render())
        parts.append(self._histogram())
        if self._platforms:
            cached = Family("wts_authorizers_cached", "Authorizer tokens this sidecar keeps in memory "
                            "(bounded by max_cached_authorizers)", "gauge", ("app",))
            pushes = Family("wts_platform_pushes", "Pushes taken at /sidecar/component/event, by InfoType "
                            "(refused: bad signature or appid)", "counter", ("app", "info_type"))
            for name, platform in self._platforms.items():
                cached.labels(name).set(len(platform.managers))
                for info, count in platform.pushes.items():
                    pushes.labels(name, info).set(count)
            parts += (self.authorizers.render(), cached.render(), pushes.render())
        cap = Family("wts_token_fetch_cap", "Token fetches allowed per credential per day (store.daily_fetch_cap): "
                     "what wts_token_fetches_today is measured against", "gauge", ())
        cap.labels().set(getattr(self._store, "daily_fetch_cap", 0))
        parts.append(cap.render())
        parts.append(self.pushes.render())
        dropped = Family("wts_push_dropped", "Pushes given up on (queue_full, expired after 10 minutes of "
                         "redelivery), by app and reason", "counter", ("app", "reason"))
        depth = Family("wts_push_queue_depth", "Pushes waiting for an app that is down", "gauge", ("app",))
        for app, state in (getattr(self.delivery, "apps", None) or {}).items():
            depth.labels(app).set(len(state.queue))
            for reason, count in state.dropped.items():
                dropped.labels(app, reason).set(count)
        parts += (dropped.render(), depth.render())
        expiry = Family("wts_pay_certificate_expires_in_seconds", "Seconds until each WeChat Pay platform "
                        "certificate held expires, by merchant and serial", "gauge", ("merchant", "serial"))
        for name, merchant in self.merchants().items():
            for cert in merchant.status()["certificates"]:
                expiry.labels(name, cert["serial"]).set(cert["expires_in_days"] * 86400)
        parts.append(expiry.render())
        switches = Family("wts_upstream_host_switches", "Calls and fetches moved to another upstream host "
                          "(upstream.fallback) because a connection could not be made or a GET was hung up on",
                          "counter", ())
        switches.labels().set(getattr(self.egress, "switches", 0))
        parts.append(switches.render())
        errors = Family("wts_store_errors", "Errors talking to the shared token store", "counter", ())
        errors.labels().set(getattr(self._store, "errors", 0))
        parts.append(errors.render())
        if hasattr(self._store, "reconnects"):
            reconnects = Family("wts_store_reconnects", "Times the store's event subscription came back after "
                                "a break (tokens held were written back)", "counter", ())
            reconnects.labels().set(getattr(self._store, "reconnects", 0))
            failovers = Family("wts_store_failovers", "Sentinel failovers followed to a new master", "counter", ())
            failovers.labels().set(getattr(self._store, "failovers", 0))
            parts += (reconnects.render(), failovers.render())
        return "".join(parts)

    def _histogram(self) -> str:
        name = "wts_call_duration_seconds"
        lines = [_header(name, "Time to answer a proxied call, replay included", "histogram")]
        for app, per_app in sorted(self.calls.items()):
            running = 0
            for bound, count in zip((*CALL_BUCKETS, float("inf")), per_app.buckets, strict=True):
                running += count
                lines.append(f'{name}_bucket{{app="{_escape(app)}",le="{_value(bound)}"}} {_value(running)}\n')
            lines.append(f'{name}_count{{app="{_escape(app)}"}} {_value(running)}\n')
            lines.append(f'{name}_sum{{app="{_escape(app)}"}} {_value(per_app.seconds)}\n')
        return "".join(lines)
