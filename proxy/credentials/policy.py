"""The token decisions as pure code: no I/O, no event loop, every time passed in.

`TokenState` answers "is this token usable", "when must I refresh", "may I fetch
now", and records what a fetch brought. The async `TokenManager` asks it and
does the talking; tests drive it with plain numbers for a clock.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Callable

# A token is not handed out in its last seconds: a call that leaves now must
# still arrive while the token lives. 3 s, or a tenth of a very short life.
EXPIRY_MARGIN_S = 3.0
EXPIRY_MARGIN_FRACTION = 0.1

# Backoff for transient fetch failures: WxJava waits 1 s, 2 s, 4 s ... between
# tries (wechat-api-notes.md §4, errcode -1). We keep doubling up to a cap so a
# long outage costs one try a minute, not a hot loop.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0

# Credential errors (bad appid/secret, IP not whitelisted, frozen secret) do
# not heal by retrying; an operator has to act. Retry rarely so the fix is
# picked up without a restart, and never hammer (wechat-api-notes.md §4).
CREDENTIAL_RETRY_S = 300.0

# Risk-control blocks name their own length (wechat-api-notes.md §1.1):
# 89507 blocks the IP for 1 h, 89506 for 24 h. No retry inside the block.
BLOCK_RETRY_S = {89507: 3600.0, 89506: 86400.0}

# Refreshes forced by rejected tokens (or an operator, or an SDK) adapt to
# whether refreshing helps. When the rejected token had served successful
# calls, the refresh helped last time (another system rotates the token now
# and then, each new token serves thousands of calls): the next forced
# refresh may follow after `min_refresh_interval_s` (1 s by default). When a
# token is rejected before it served any call, refreshing is futile (a
# wrong appid, a loop with another system): each futile rotation in a row
# doubles the spacing from FUTILE_BACKOFF_BASE_S up to FUTILE_BACKOFF_CAP_S,
# so such a loop costs one fetch a minute within about two minutes (1 + 2 +
# ... + 64 s) and one per five minutes after that. The hard guard of the
# daily quota (2000 a day for /cgi-bin/token, wechat-api-notes.md §3) is the
# store's daily fetch cap (1000 by default), which stops fetching long before it.
FUTILE_BACKOFF_BASE_S = 1.0
FUTILE_BACKOFF_CAP_S = 300.0

# Daily quotas reset at midnight China time (UTC+8) (inference: WeChat counts
# "per day" in its own time zone; clear_quota is the manual way out).
QUOTA_RESET_UTC_OFFSET_S = 8 * 3600


class FailureKind(enum.Enum):
    TRANSIENT = "transient"      # network, 5xx, -1 busy, garbage: back off and retry
    CREDENTIAL = "credential"    # fix the config or the whitelist: retry rarely
    QUOTA = "quota"              # 45009: stop until the quota resets
    RATE_LIMIT = "rate_limit"    # 45011 / 45033: wait for the next minute


# What an errcode from a token endpoint means (wechat-api-notes.md §4 and §8).
# At the token endpoint 40001 means "wrong AppSecret", not "bad token".
CREDENTIAL_ERRCODES = frozenset({
    40001, 40002, 40013, 40125, 40164, 40243, 41002, 41004, 43002, 61024,
    89501, 89503, 89506, 89507,
    40091, 60020,  # WeCom: secret invalid, IP not allowed
})
QUOTA_ERRCODES = frozenset({45009})
RATE_LIMIT_ERRCODES = frozenset({45011, 45033})


def classify(errcode: int | None) -> FailureKind:
    if errcode in CREDENTIAL_ERRCODES:
        return FailureKind.CREDENTIAL
    if errcode in QUOTA_ERRCODES:
        return FailureKind.QUOTA
    if errcode in RATE_LIMIT_ERRCODES:
        return FailureKind.RATE_LIMIT
    return FailureKind.TRANSIENT


def retry_delay(kind: FailureKind, errcode: int | None, failures: int,
                wall_now: float, rng: Callable[[], float]) -> float:
    """Seconds to wait before the next fetch after `failures` failures in a row.

    Jitter (a factor in [0.5, 1.0)) keeps many sidecars that failed together
    from retrying together.
    """
    jitter = 0.5 + rng() / 2
    if kind is FailureKind.TRANSIENT:
        return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1)) * jitter
    if kind is FailureKind.RATE_LIMIT:
        return (60.0 - wall_now % 60.0) + 5.0 * rng()
    if kind is FailureKind.QUOTA:
        local = wall_now + QUOTA_RESET_UTC_OFFSET_S
        return (86400.0 - local % 86400.0) + 60.0 * rng()
    return BLOCK_RETRY_S.get(errcode or 0, CREDENTIAL_RETRY_S) * (0.9 + rng() / 10)


@dataclass(frozen=True)
class Token:
    value: str
    fetched_at: float   # monotonic seconds
    expires_at: float   # monotonic seconds

    def remaining(self, now: float) -> float:
        return self.expires_at - now

    @functools.cached_property
    def usable_until(self) -> float:
        """Computed once per token: every proxied call asks."""
        life = self.expires_at - self.fetched_at
        return self.expires_at - min(EXPIRY_MARGIN_S, life * EXPIRY_MARGIN_FRACTION)


@dataclass(frozen=True)
class FetchFailure:
    kind: FailureKind
    errcode: int | None
    message: str
    at: float

    def describe(self) -> str:
        code = f"{self.errcode}: " if self.errcode is not None else ""
        return f"{code}{self.message}"


def refresh_due_at(token: Token, refresh_before_s: float) -> float:
    """When a token should be replaced: `refresh_before_s` ahead of expiry, but
    never before half its life, so an `expires_in` shorter than the margin
    cannot turn into a fetch loop."""
    half_life = token.fetched_at + (token.expires_at - token.fetched_at) / 2
    return max(token.expires_at - refresh_before_s, half_life)


class TokenState:
    """The token of one app and what the sidecar knows about fetching it."""

    __slots__ = ("refresh_before_s", "min_refresh_interval_s", "token", "rejected", "failures", "last_failure",
                 "retry_at", "served", "fetched_here", "futile", "_last_forced_at", "fetches_ok", "fetches_failed")

    def __init__(self, refresh_before_s: float, min_refresh_interval_s: float):
        self.refresh_before_s = refresh_before_s
        self.min_refresh_interval_s = min_refresh_interval_s
        self.token: Token | None = None
        self.rejected: str | None = None        # a token WeChat refused, until replaced
        self.failures = 0                       # fetch failures in a row
        self.last_failure: FetchFailure | None = None
        self.retry_at = 0.0                     # no automatic fetch before this
        self.served = False                     # the token has served a successful call
        self.fetched_here = False               # this holder fetched it (not taken from the store)
        self.futile = 0                         # tokens in a row rejected before serving any call
        self._last_forced_at: float | None = None
        self.fetches_ok = 0
        self.fetches_failed = 0

    # -- questions

    def usable(self, now: float) -> bool:
        token = self.token
        return token is not None and token.value != self.rejected and now < token.usable_until

    def refresh_due_at(self) -> float:
        """When the background refresher should fetch, ignoring backoff."""
        token = self.token
        if token is None or token.value == self.rejected:
            return 0.0
        return refresh_due_at(token, self.refresh_before_s)

    def next_fetch_at(self) -> float:
        """When the background refresher should try next, backoff included."""
        return max(self.refresh_due_at(), self.retry_at)

    def is_current(self, value: str) -> bool:
        return self.token is not None and self.token.value == value

    def forced_spacing(self) -> float:
        """How long after the last forced refresh the next may fetch."""
        if self.futile == 0:
            return self.min_refresh_interval_s
        base = max(FUTILE_BACKOFF_BASE_S, self.min_refresh_interval_s)
        return min(FUTILE_BACKOFF_CAP_S, base * 2 ** (self.futile - 1))

    def forced_fetch_at(self, now: float) -> float:
        """Earliest moment a forced refresh (rejected token, operator) may fetch:
        after the backoff, and the spacing since the last forced refresh."""
        at = now if self._last_forced_at is None else max(now, self._last_forced_at + self.forced_spacing())
        return max(at, self.retry_at)

    def spend_forced(self, now: float) -> None:
        self._last_forced_at = now

    def mark_served(self, value: str) -> None:
        """A call with `value` succeeded: a refresh that brought it helped."""
        if self.token is not None and self.token.value == value:
            self.served = True

    def unavailable_reason(self, now: float) -> str:
        if self.token is not None and self.token.value == self.rejected:
            why = "the token was rejected by WeChat and no new one could be fetched"
        elif self.token is not None and now >= self.token.usable_until:
            why = "the token expired and no new one could be fetched"
        else:
            why = "no token fetched yet"
        if self.last_failure is not None:
            why += f" (last fetch failed: {self.last_failure.describe()})"
        return why

    # -- events

    def on_fetched(self, value: str, expires_in: float, now: float) -> Token:
        if self.token is None or self.token.value != value:
            self.served = False
        self.fetched_here = True
        self.token = Token(value=value, fetched_at=now, expires_at=now + expires_in)
        # WeChat's token endpoint just vouched for this value, even if it is the
        # one a business call refused: trust it (the forced-refresh budget
        # bounds the cost if the refusal repeats).
        self.rejected = None
        self.failures = 0
        self.retry_at = 0.0
        self.fetches_ok += 1
        return self.token

    def on_fetched_token(self, token: Token) -> None:
        """A token this holder fetched itself."""
        self.on_adopted(token)
        self.fetched_here = True
        self.rejected = None   # WeChat vouched for it just now (see on_fetched)
        self.fetches_ok += 1

    def on_adopted(self, token: Token) -> None:
        """A token another holder fetched (shared store); no fetch counted."""
        if self.token is None or self.token.value != token.value:
            self.served = False
            self.fetched_here = False
        self.token = token
        if self.rejected != token.value:
            self.rejected = None
        self.failures = 0
        self.retry_at = 0.0

    def on_failed(self, kind: FailureKind, errcode: int | None, message: str,
                  now: float, wall_now: float, rng: Callable[[], float]) -> FetchFailure:
        self.failures += 1
        self.fetches_failed += 1
        self.last_failure = FetchFailure(kind=kind, errcode=errcode, message=message, at=now)
        self.retry_at = now + retry_delay(kind, errcode, self.failures, wall_now, rng)
        return self.last_failure

    def reject(self, value: str) -> bool:
        """WeChat refused `value`. True when it was the current token (so a
        refresh is needed); False when it was already replaced."""
        if not self.is_current(value) or self.rejected == value:
            return False
        self.rejected = value
        # Did refreshing help last time? A token that served calls says yes;
        # one this holder fetched that served nothing says no. A token taken
        # from the store that served nothing here says nothing: in a fleet
        # most replicas never call most apps between two rotations.
        if self.served:
            self.futile = 0
        elif self.fetched_here:
            self.futile += 1
        return True

    def clear_backoff(self) -> None:
        """An operator asked for a refresh: try now, whatever the backoff said."""
        self.retry_at = 0.0
