"""What the status page shows over time (DESIGN.md, "Operators can see it"):
per app, fetches, failed fetches and replays a minute for the last hour, and
the last errors with their time. Kept in memory, bounded (60 one-minute
buckets and 10 errors an app), and read from counters the sidecar keeps
anyway: sampled by a background task and when the page asks, never on a
call's path.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable

MINUTES = 60          # an hour at one-minute resolution
MAX_ERRORS = 10       # the last errors an app keeps
SAMPLE_EVERY_S = 15.0


@dataclass
class _AppHistory:
    buckets: collections.deque[list[int]] = field(default_factory=lambda: collections.deque(maxlen=MINUTES))
    last: tuple[int, int, int] | None = None          # the cumulative counts at the last sample
    errors: collections.deque[tuple[float, str, str]] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_ERRORS))
    seen_failures: dict[str, float] = field(default_factory=dict)   # credential -> the failure time last noted


class History:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.apps: dict[str, _AppHistory] = {}

    def sample(self, app: str, fetches: int, failures: int, replays: int,
               last_failures: dict[str, tuple[float, str]]) -> None:
        """Cumulative counts for an app now, and each credential's last
        failure (monotonic time, description): deltas go to this minute."""
        history = self.apps.get(app)
        if history is None:
            history = self.apps[app] = _AppHistory()
        minute = int(self.clock() // 60)
        counts = (fetches, failures, replays)
        if history.last is not None:
            delta = [max(0, now - before) for now, before in zip(counts, history.last)]
            if not history.buckets or history.buckets[-1][0] != minute:
                history.buckets.append([minute, 0, 0, 0])
            bucket = history.buckets[-1]
            for i in range(3):
                bucket[i + 1] += delta[i]
        history.last = counts
        for credential, (at, why) in last_failures.items():
            if history.seen_failures.get(credential) != at:
                history.seen_failures[credential] = at
                history.errors.append((at, credential, why))

    def view(self, app: str) -> dict[str, object]:
        """The last hour, oldest minute first, and the last errors, newest first."""
        history = self.apps.get(app)
        now = self.clock()
        minute = int(now // 60)
        series = {"fetches": [0] * MINUTES, "failures": [0] * MINUTES, "replays": [0] * MINUTES}
        errors: list[dict[str, object]] = []
        if history is not None:
            for at_minute, fetches, failures, replays in history.buckets:
                index = MINUTES - 1 - (minute - at_minute)
                if 0 <= index < MINUTES:
                    series["fetches"][index] += fetches
                    series["failures"][index] += failures
                    series["replays"][index] += replays
            errors = [{"s_ago": round(now - at, 1), "credential": credential, "error": why}
                      for at, credential, why in reversed(history.errors)]
        return {"minutes": MINUTES, **series, "errors": errors}
