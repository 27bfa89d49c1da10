"""Prometheus metrics, one registry per sidecar (no module globals).

Names follow Prometheus conventions (`_total` counters, `_seconds` units,
base units). What a user alerts on:
  token fetches failing:  increase(wts_token_fetches_total{result!="ok"}[10m]) > 0
  no usable token:        min(wts_token_usable) == 0
  quota being burned:     max(wts_token_fetches_today) > 500
                          or rate(wts_token_fetches_total[1h]) * 86400 > 1000
  someone else rotating:  increase(wts_token_rotated_elsewhere_total[1h]) > 0
"""
from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from .tokens import TokenManager, TokenStore

# Buckets for one proxied call: sub-millisecond overhead up to WeChat's
# slow answers and the 15 s default upstream timeout.
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)

OUTCOMES = ("ok", "wechat_error", "token_rejected", "no_token", "upstream_unreachable",
            "upstream_timeout", "bad_request", "passthrough")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Per-call figures are kept in plain dicts (a dict increment per call,
        # no lock) and turned into wts_calls_total and wts_call_duration_seconds
        # at scrape time by _LiveCollector.
        self.call_counts: dict[tuple[str, str], int] = {}
        self.call_buckets: dict[str, list[int]] = {}   # per app: counts per bucket, then +Inf
        self.call_sums: dict[str, float] = {}
        self.fetches = Counter("wts_token_fetches", "Token fetches from WeChat, by app, api and result "
                               "(ok, credential, transient, quota, rate_limit)", ["app", "api", "result"], registry=r)
        self.refreshes = Counter("wts_token_refreshes", "Token refreshes started, by reason "
                                 "(startup, proactive, errcode, admin, demand, retry)", ["app", "reason"], registry=r)
        self.replays = Counter("wts_replays", "Calls replayed after a token error, by errcode",
                               ["app", "errcode"], registry=r)
        self.rotated = Counter("wts_token_rotated_elsewhere", "Current tokens refused by WeChat before we "
                               "replaced them: another system fetches tokens for this appid", ["app"], registry=r)
        self.fetches_today = Gauge("wts_token_fetches_today", "Token fetches counted today by the store "
                                   "(the whole cluster with store: redis), China time", ["app"], registry=r)
        self._managers: dict[str, "TokenManager"] = {}
        self._store: "TokenStore | None" = None
        r.register(_LiveCollector(self))

    def observe_call(self, app: str, outcome: str, seconds: float) -> None:
        key = (app, outcome)
        self.call_counts[key] = self.call_counts.get(key, 0) + 1
        buckets = self.call_buckets.get(app)
        if buckets is None:
            buckets = self.call_buckets[app] = [0] * (len(CALL_BUCKETS) + 1)
            self.call_sums[app] = 0.0
        buckets[bisect.bisect_left(CALL_BUCKETS, seconds)] += 1
        self.call_sums[app] += seconds

    def watch(self, managers: dict[str, "TokenManager"], store: "TokenStore") -> None:
        self._managers, self._store = managers, store

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
        return generate_latest(self.registry)


class _LiveCollector:
    """Values read at scrape time from the managers and the store."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        expires = GaugeMetricFamily("wts_token_expires_in_seconds", "Seconds until the current token expires",
                                    labels=["app"])
        usable = GaugeMetricFamily("wts_token_usable", "1 when the app has a usable token", labels=["app"])
        for name, manager in self.metrics._managers.items():
            token = manager.state.token
            expires.add_metric([name], max(0.0, token.expires_at - now) if token else 0.0)
            usable.add_metric([name], 1.0 if manager.state.usable(now) else 0.0)
        yield expires
        yield usable
        m = self.metrics
        calls = CounterMetricFamily("wts_calls", "Calls forwarded, by app and outcome", labels=["app", "outcome"])
        for (app, outcome), count in sorted(m.call_counts.items()):
            calls.add_metric([app, outcome], float(count))
        yield calls
        seconds = HistogramMetricFamily("wts_call_duration_seconds",
                                        "Time to answer a proxied call, replay included", labels=["app"])
        for app, counts in sorted(m.call_buckets.items()):
            cumulative, running = [], 0
            for bound, count in zip((*map(str, CALL_BUCKETS), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            seconds.add_metric([app], cumulative, m.call_sums[app])
        yield seconds
        store = self.metrics._store
        errors = CounterMetricFamily("wts_store_errors", "Errors talking to the shared token store")
        errors.add_metric([], float(getattr(store, "errors", 0)))
        yield errors
