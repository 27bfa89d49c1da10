"""The token decisions as pure code: no I/O, no event loop, every time passed in.

`TokenState` answers "is this token usable", "when must I refresh", "may I fetch
now", and records what a fetch brought. `decide` is the one rule book for
every source of a refresh (the refresher, a call with no usable token, a call
that saw the token rejected, an operator, an SDK's force refresh, news from
the store): fetch now, join the fetch under way, answer with the token held,
wait for the next attempt, or refuse with a time to retry. The async
`TokenManager` asks it and does the talking; tests drive both with plain
numbers for a clock.
"""
from __future__ import annotations

import enum
import functools
import ipaddress
import re
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


# "The caller's IP is not whitelisted": WeChat's 40164 ("invalid ip
# 203.0.113.7 ipv6 ::ffff:203.0.113.7, not in whitelist rid: ...") and WeCom's
# 60020 ("not allow to access from your ip, ... from ip: 203.0.113.7") name
# the egress IP WeChat saw: the one an operator must whitelist.
IP_NOT_WHITELISTED = frozenset({40164, 60020})
_EGRESS_IP = re.compile(r"(?:invalid ip|from ip:?)\s+([0-9a-fA-F.:]+[0-9a-fA-F])")


def egress_ip(errcode: int | None, message: str) -> str | None:
    """The egress IP a not-whitelisted answer names, or None."""
    if errcode not in IP_NOT_WHITELISTED:
        return None
    match = _EGRESS_IP.search(message)
    if match is None:
        return None
    try:
        return str(ipaddress.ip_address(match.group(1)))
    except ValueError:
        return None


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

    @functools.cached_property
    def egress_ip(self) -> str | None:
        """The egress IP WeChat refused (40164 / 60020), if this was that."""
        return egress_ip(self.errcode, self.message)


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

    def spaced_at(self, now: float) -> float:
        """Earliest moment the spacing since the last forced refresh allows another."""
        return now if self._last_forced_at is None else max(now, self._last_forced_at + self.forced_spacing())

    def forced_fetch_at(self, now: float) -> float:
        """Earliest moment a forced refresh (rejected token, operator) may fetch:
        after the backoff, and the spacing since the last forced refresh."""
        return max(self.spaced_at(now), self.retry_at)

    def facts(self, now: float, inflight_at: float | None) -> "Facts":
        token = self.token
        return Facts(now=now, usable=self.usable(now), rejected=token is not None and token.value == self.rejected,
                     fetched_at=token.fetched_at if token is not None else None, inflight_at=inflight_at,
                     retry_at=self.retry_at, spaced_at=self.spaced_at(now))

    def spend_forced(self, now: float) -> None:
        self._last_forced_at = now

    def mark_served(self, value: str) -> None:
        """A call with `value` succeeded: a refresh that brought it helped."""
        if self.token is not None and self.token.value == value:
            self.served = True

    def egress_ip_not_whitelisted(self) -> str | None:
        """The IP WeChat refused at the last fetch, unless a fetch succeeded since."""
        failure, token = self.last_failure, self.token
        if failure is None or (token is not None and token.fetched_at > failure.at):
            return None
        return failure.egress_ip

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


# ---------------------------------------------------------------- the rule book

# A caller with no usable token waits for an attempt that starts within this
# long (a short backoff, a spaced-out forced refresh) and gets that attempt's
# answer; past it, a clear 503 at once rather than hanging until the app's
# own timeout (SDK timeouts are 5-30 s).
MAX_CALLER_WAIT_S = 5.0

# A passive refresh (an operator's, or a business server's that saw a token
# rejected) asked this soon after the held token was fetched is answered with
# that token: ten servers that saw one rejection cost one fetch, and an
# operator's refresh right behind a replay's refresh is that refresh.
REFRESH_COALESCE_S = 0.5

# An SDK's force refresh (stable_token with force_refresh: true) carries no
# evidence that the token is bad: it is answered with the token held, and a
# fetch starts behind it only when that token is at least this old, WeChat's
# own spacing of forced stable_token calls (wechat-api-notes.md §1.2). A
# token seen rejected is another matter: that caller waits for the refresh.
SDK_FORCE_SPACING_S = 30.0


class Source(enum.Enum):
    PROACTIVE = "proactive"      # the refresher: the token is due, or a retry after a failure
    DEMAND = "demand"            # a call found no usable token
    REJECTED = "errcode"         # a call saw WeChat reject the token (40001 / 42001 / 40014)
    ADMIN = "admin"              # POST /admin/refresh: the passive refresh
    SDK_FORCE = "sdk_force"      # an SDK's force refresh
    STORE = "store"              # another replica stored a new token


class Action(enum.Enum):
    ANSWER = "answer"            # the token held is the answer; nothing is fetched
    JOIN = "join"                # wait for the fetch under way
    FETCH = "fetch"              # start a fetch at `at` and wait for it
    BEHIND = "behind"            # answer the token held, and start a fetch behind it
    ADOPT = "adopt"              # take what the store holds
    REFUSE = "refuse"            # not now: retry after `at` (429 while a token is held, else 503)


@dataclass(frozen=True)
class Facts:
    """What a decision looks at, all monotonic seconds."""
    now: float
    usable: bool                 # a token is held, not rejected, not expired
    rejected: bool               # the held token was seen rejected
    fetched_at: float | None     # when the held token was fetched (None: none held)
    inflight_at: float | None    # when the fetch under way starts or started (None: none)
    retry_at: float              # the backoff after failures: no automatic fetch before it
    spaced_at: float             # the forced-refresh spacing: no forced fetch before it


@dataclass(frozen=True)
class Decision:
    action: Action
    at: float = 0.0


def _wait_for(f: Facts, start: float) -> Decision:
    """A caller with no usable token: a fetch from `start`, if soon enough."""
    start = max(f.now, start)
    return Decision(Action.FETCH, start) if start - f.now <= MAX_CALLER_WAIT_S else Decision(Action.REFUSE, start)


def decide(source: Source, f: Facts) -> Decision:
    """The one rule for every source of a refresh (README "How it behaves")."""
    forced_at = max(f.spaced_at, f.retry_at)
    if source is Source.STORE:
        # News of another replica's token: while a fetch of ours is under way
        # and a token is served, that fetch finds it in the store itself.
        return Decision(Action.ANSWER) if f.usable and f.inflight_at is not None else Decision(Action.ADOPT)
    if source is Source.PROACTIVE:
        if f.inflight_at is not None:
            return Decision(Action.JOIN, f.inflight_at)
        return Decision(Action.FETCH, max(f.now, forced_at if f.rejected else f.retry_at))
    if source is Source.ADMIN:
        if f.inflight_at is not None:
            if f.usable and f.inflight_at > f.now:
                return Decision(Action.REFUSE, f.inflight_at)        # a spaced-out refresh is scheduled
            return Decision(Action.JOIN, f.inflight_at) if f.inflight_at - f.now <= MAX_CALLER_WAIT_S \
                else Decision(Action.REFUSE, f.inflight_at)
        if f.usable and f.fetched_at is not None and f.now - f.fetched_at < REFRESH_COALESCE_S:
            return Decision(Action.ANSWER)                          # a refresh just completed: this is it
        start = max(f.now, f.spaced_at)                             # an operator overrides a backoff
        if f.usable and start > f.now:
            return Decision(Action.REFUSE, start)
        return _wait_for(f, start)
    if f.usable:
        if source is Source.SDK_FORCE and f.inflight_at is None and f.fetched_at is not None \
                and f.now - f.fetched_at >= SDK_FORCE_SPACING_S and forced_at <= f.now:
            return Decision(Action.BEHIND, f.now)
        return Decision(Action.ANSWER)
    # No usable token (DEMAND, REJECTED, SDK_FORCE): wait for an attempt soon enough.
    if f.inflight_at is not None:
        return Decision(Action.JOIN, f.inflight_at) if f.inflight_at - f.now <= MAX_CALLER_WAIT_S \
            else Decision(Action.REFUSE, f.inflight_at)
    return _wait_for(f, forced_at if (source is Source.REJECTED or f.rejected) else f.retry_at)
