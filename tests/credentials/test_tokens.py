"""proxy/credentials: the pure policy driven by a number for a clock, and the
manager driven by a scripted fetcher (no sockets)."""
from __future__ import annotations

import asyncio
import time

import pytest

from proxy.config import App
from proxy.credentials import FailureKind, Fetched, FetchError, MemoryStore, TokenManager, TokenState, TokenUnavailable
from proxy.credentials.policy import REFRESH_COALESCE_S, Token, classify, retry_delay

from ..conftest import wait_until

HALF = lambda: 0.5  # noqa: E731  a fixed "random" for exact delays


# ---------------------------------------------------------------- policy: errcodes

@pytest.mark.parametrize("code", [40001, 40013, 40125, 40164, 40243, 41002, 41004, 61024, 89503, 89506, 89507])
def test_credential_errcodes_are_not_transient(code):
    assert classify(code) is FailureKind.CREDENTIAL


def test_quota_rate_limit_and_busy_are_classified():
    assert classify(45009) is FailureKind.QUOTA
    assert classify(45011) is FailureKind.RATE_LIMIT
    assert classify(-1) is FailureKind.TRANSIENT
    assert classify(None) is FailureKind.TRANSIENT


def test_transient_backoff_doubles_with_jitter_up_to_a_cap():
    delays = [retry_delay(FailureKind.TRANSIENT, -1, n, 0, lambda: 0.999) for n in range(1, 10)]
    assert delays[:4] == pytest.approx([1, 2, 4, 8], rel=0.01)
    # a long outage costs one try a minute, never a hot loop (WxJava's 1 s, 2 s, 4 s ..., capped)
    assert max(delays) <= 60 and delays[-1] == pytest.approx(60, rel=0.01)
    low = retry_delay(FailureKind.TRANSIENT, -1, 3, 0, lambda: 0.0)
    assert low == pytest.approx(2.0)  # jitter spans [0.5, 1.0) of the step


def test_credential_errors_wait_minutes_and_ip_blocks_wait_their_length():
    # a bad secret or IP whitelist needs an operator: one try every five minutes
    assert 270 <= retry_delay(FailureKind.CREDENTIAL, 40125, 1, 0, HALF) <= 300
    assert retry_delay(FailureKind.CREDENTIAL, 89507, 1, 0, HALF) >= 0.9 * 3600
    assert retry_delay(FailureKind.CREDENTIAL, 89506, 1, 0, HALF) >= 0.9 * 86400


def test_quota_exhaustion_waits_until_midnight_china_time():
    # 2026-11-25 15:00:00 UTC is 23:00 in China: one hour to the reset.
    wall = 1795618800.0
    assert time.gmtime(wall).tm_hour == 15
    delay = retry_delay(FailureKind.QUOTA, 45009, 1, wall, lambda: 0.0)
    assert delay == pytest.approx(3600)


def test_rate_limit_waits_for_the_next_minute():
    assert retry_delay(FailureKind.RATE_LIMIT, 45011, 1, 1000 * 60 + 45, lambda: 0.0) == pytest.approx(15)


# ---------------------------------------------------------------- policy: state

def test_token_is_usable_until_a_margin_before_expiry():
    state = TokenState(refresh_before_s=240, min_refresh_interval_s=60)
    assert not state.usable(0)
    state.on_fetched("T1", 7200, now=100)
    assert state.usable(100) and state.usable(7296.9)
    assert not state.usable(7297.1)          # 3 s margin
    short = TokenState(1, 0)
    short.on_fetched("S", 2, now=0)
    assert short.usable(1.79) and not short.usable(1.81)   # a tenth of a short life


def test_refresh_is_due_refresh_before_s_ahead_but_never_before_half_life():
    state = TokenState(refresh_before_s=240, min_refresh_interval_s=60)
    state.on_fetched("T1", 7200, now=0)
    assert state.refresh_due_at() == 6960
    state.on_fetched("T2", 300, now=1000)      # shorter than the margin
    assert state.refresh_due_at() == 1150


def test_reject_only_the_current_token_once():
    state = TokenState(240, 60)
    state.on_fetched("T1", 7200, now=0)
    assert not state.reject("OLD")
    assert state.reject("T1")
    assert not state.reject("T1")            # already known: no second refresh
    assert not state.usable(1)
    assert state.refresh_due_at() == 0       # refresh at once
    state.on_fetched("T2", 7200, now=2)
    assert state.usable(3)


def test_a_failure_keeps_the_valid_token_and_sets_the_backoff():
    state = TokenState(240, 60)
    state.on_fetched("T1", 7200, now=0)
    state.on_failed(FailureKind.TRANSIENT, -1, "busy", now=6960, wall_now=0, rng=HALF)
    assert state.usable(6961)
    assert state.retry_at == pytest.approx(6960 + 0.75)
    assert state.next_fetch_at() == pytest.approx(6960.75)


def test_forced_refreshes_that_helped_follow_each_other_after_the_minimum_spacing():
    """Another system rotates the token every few seconds; each new token
    serves calls: every rotation is followed by a refresh, a second apart at least."""
    state = TokenState(240, min_refresh_interval_s=1)
    now = 0.0
    state.on_fetched("T0", 7200, now)
    for n in range(1, 50):
        state.mark_served(f"T{n - 1}")
        now += 3                                   # rotated elsewhere every 3 s
        assert state.reject(f"T{n - 1}")
        assert state.forced_fetch_at(now) == now    # no wait: the refresh helped last time
        state.spend_forced(now)
        state.on_fetched(f"T{n}", 7200, now)
    state.mark_served("T49")
    assert state.reject("T49")
    state.spend_forced(now + 0.2)
    state.on_fetched("T50", 7200, now + 0.2)
    state.mark_served("T50")
    assert state.reject("T50")                     # rotated again at once
    assert state.forced_fetch_at(now + 0.4) == pytest.approx(now + 1.2)   # the 1 s spacing


def test_futile_refreshes_back_off_to_at_most_one_a_minute_within_ten_minutes():
    """Every new token is rejected before it serves a call (a wrong appid, a
    loop with another system): the spacing doubles 1, 2, 4 ... s, capped."""
    state = TokenState(240, min_refresh_interval_s=1)
    now, fetches = 0.0, [0.0]
    state.on_fetched("T0", 7200, now)
    n = 0
    while now < 3600:
        assert state.reject(f"T{n}")              # rejected at once, never served
        now = state.forced_fetch_at(now)
        state.spend_forced(now)
        n += 1
        state.on_fetched(f"T{n}", 7200, now)
        fetches.append(now)
    gaps = [b - a for a, b in zip(fetches, fetches[1:])]
    assert gaps[:8] == pytest.approx([0, 2, 4, 8, 16, 32, 64, 128])
    assert all(b - a >= 60 for a, b in zip(fetches, fetches[1:]) if a >= 600)
    assert max(gaps) == pytest.approx(300)        # and never longer than five minutes
    assert len(fetches) < 25                      # an hour of rejection: ~20 fetches, then 12 an hour


def test_a_token_that_serves_again_ends_the_backoff():
    state = TokenState(240, min_refresh_interval_s=1)
    state.on_fetched("T0", 7200, 0)
    for n in range(5):                             # five futile rotations
        state.reject(f"T{n}")
        state.spend_forced(state.forced_fetch_at(0))
        state.on_fetched(f"T{n + 1}", 7200, 0)
    assert state.forced_spacing() == pytest.approx(16)
    state.mark_served("T5")
    state.reject("T5")
    assert state.futile == 0 and state.forced_spacing() == 1


# ---------------------------------------------------------------- manager with a scripted fetcher

class ScriptedFetcher:
    """Answers fetches from a script; counts them; can be made slow."""

    def __init__(self, lifetime: float = 7200, delay: float = 0.0):
        self.lifetime, self.delay = lifetime, delay
        self.calls = 0
        self.forced = 0
        self.fail: FetchError | None = None
        self.same_value: str | None = None

    async def fetch(self, force: bool = False) -> Fetched:
        self.calls += 1
        self.forced += force
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if self.same_value and not force:
            return Fetched(self.same_value, self.lifetime)
        return Fetched(f"T{self.calls}", self.lifetime)


def make_app(**kw) -> App:
    base = dict(name="mp", appid="wx1", secret="s", token_api="client_credential",
                refresh_before_s=240, upstream="http://x", min_refresh_interval_s=0)
    base.update(kw)
    return App(**base)


@pytest.fixture
async def manager_for():
    made: list[TokenManager] = []

    def factory(fetcher, **app_kw) -> TokenManager:
        manager = TokenManager(make_app(**app_kw), fetcher, MemoryStore())
        made.append(manager)
        return manager

    yield factory
    for m in made:
        await m.close()


async def test_first_token_is_fetched_at_startup(manager_for):
    fetcher = ScriptedFetcher()
    m = manager_for(fetcher)
    assert m.current() is None
    m.start()
    token = await m.get()
    assert token.value == "T1" and fetcher.calls == 1
    assert m.refreshes == {"startup": 1}


async def test_concurrent_invalidations_share_one_fetch(manager_for):
    fetcher = ScriptedFetcher(delay=0.05)
    m = manager_for(fetcher)
    first = await m.get()
    tokens = await asyncio.gather(*(m.invalidate(first.value) for _ in range(50)))
    assert {t.value for t in tokens} == {"T2"}
    assert fetcher.calls == 2


async def test_invalidating_a_replaced_token_fetches_nothing(manager_for):
    fetcher = ScriptedFetcher()
    m = manager_for(fetcher)
    first = await m.get()
    await m.invalidate(first.value)
    again = await m.invalidate(first.value)
    assert again.value == "T2" and fetcher.calls == 2


async def test_proactive_refresh_serves_the_old_token_meanwhile(manager_for):
    fetcher = ScriptedFetcher(lifetime=1.0, delay=0.2)
    m = manager_for(fetcher, refresh_before_s=0.5)
    m.start()
    first = await m.get()
    await wait_until(lambda: fetcher.calls == 2)      # refresh due at 0.5 s, takes 0.2 s
    assert m.current().value == first.value           # still the old one, no waiting
    await wait_until(lambda: m.current().value == "T2")
    assert m.refreshes["proactive"] >= 1


async def test_credential_error_is_reported_and_not_hammered(manager_for):
    fetcher = ScriptedFetcher()
    fetcher.fail = FetchError(FailureKind.CREDENTIAL, 40125, "stable: invalid appsecret")
    m = manager_for(fetcher)
    m.start()
    await wait_until(lambda: m.state.last_failure is not None)
    for _ in range(20):
        with pytest.raises(TokenUnavailable, match="40125: stable: invalid appsecret"):
            await m.get()
    assert fetcher.calls == 1
    # not hammered later either: the next try is planned minutes away, not just not yet made
    assert m.status()["next_retry_in_s"] >= 60
    assert m.status()["last_fetch"] == "40125: stable: invalid appsecret"


async def test_transient_failures_back_off_and_recover(manager_for):
    fetcher = ScriptedFetcher()
    fetcher.fail = FetchError(FailureKind.TRANSIENT, -1, "system busy")
    m = manager_for(fetcher)
    m.rng = lambda: 0.0                      # backoff 0.5 s, 1 s, ...
    m.start()
    await wait_until(lambda: m.state.last_failure is not None)
    assert fetcher.calls == 1 and m.status()["next_retry_in_s"] >= 0.4   # 0.5 s with this jitter
    fetcher.fail = None
    await wait_until(lambda: m.current() is not None and m.current().value == "T2", timeout=2)
    assert fetcher.calls == 2


async def test_a_futile_refresh_makes_callers_fail_fast_instead_of_waiting(manager_for):
    fetcher = ScriptedFetcher()
    m = manager_for(fetcher, min_refresh_interval_s=600)
    token = await m.get()                    # demand fetch: not forced
    token = await m.invalidate(token.value)  # the first forced refresh goes at once
    assert fetcher.calls == 2
    started = time.monotonic()
    with pytest.raises(TokenUnavailable, match="next refresh in"):
        await m.invalidate(token.value)      # T2 served nothing: the next one waits its spacing
    assert time.monotonic() - started < 0.5
    assert fetcher.calls == 2


async def test_a_token_that_served_calls_is_refreshed_promptly_when_rejected(manager_for):
    fetcher = ScriptedFetcher()
    m = manager_for(fetcher, min_refresh_interval_s=0.05)
    token = await m.get()
    for _ in range(5):
        m.mark_served(token.value)
        started = time.monotonic()
        token = await m.invalidate(token.value)
        assert time.monotonic() - started < 1
    assert fetcher.calls == 6


async def test_admin_refresh_overrides_backoff_and_reports_failure(manager_for):
    fetcher = ScriptedFetcher()
    m = manager_for(fetcher)
    await m.get()
    await asyncio.sleep(REFRESH_COALESCE_S + 0.05)    # the operator asks a while after the start-up fetch
    fetcher.fail = FetchError(FailureKind.CREDENTIAL, 40164, "stable: invalid ip 203.0.113.7")
    with pytest.raises(TokenUnavailable, match="203.0.113.7"):
        await m.refresh_now()
    assert m.current() is not None          # the old token is still served
    fetcher.fail = None
    token = await m.refresh_now()           # the operator fixed it: no waiting for the backoff
    assert token.value == "T3"


def test_a_token_taken_from_the_store_and_rejected_before_serving_here_is_not_futile():
    """In a fleet most replicas never call most apps between two rotations:
    a rejection of a token another replica fetched says nothing about this
    replica's refreshes, so it must not slow them down."""
    state = TokenState(240, min_refresh_interval_s=1)
    for n in range(10):
        state.on_adopted(Token(value=f"T{n}", fetched_at=float(n), expires_at=7200.0))
        assert state.reject(f"T{n}")
    assert state.futile == 0 and state.forced_spacing() == 1
    state.on_fetched("F", 7200, 10)                # one this replica fetched, rejected unserved: futile
    state.reject("F")
    assert state.futile == 1
