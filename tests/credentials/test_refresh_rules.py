"""One rule book for refreshes (proxy/credentials/policy.py, `decide`): the
table of every source × state with numbers for a clock, and the findings
that came from the rules disagreeing, end to end through real HTTP."""
from __future__ import annotations

import time

import pytest

from proxy.credentials.policy import (
    MAX_CALLER_WAIT_S,
    REFRESH_COALESCE_S,
    SDK_FORCE_SPACING_S,
    Action,
    Decision,
    Facts,
    Source,
    decide,
)

from ..conftest import APPID

NOW = 1000.0
S, D, R, A, F, ST = (Source.PROACTIVE, Source.DEMAND, Source.REJECTED, Source.ADMIN, Source.SDK_FORCE,
                     Source.STORE)

# Token states: usable (fetched 100 s ago), rejected, absent.
TOKENS = {
    "usable": dict(usable=True, rejected=False, fetched_at=NOW - 100),
    "rejected": dict(usable=False, rejected=True, fetched_at=NOW - 100),
    "absent": dict(usable=False, rejected=False, fetched_at=None),
}
# Fetch states: in flight (started), just done (the held token fetched 0.1 s
# ago), backing off (a failure: next try in 1 s, or in 300 s), spaced out
# (forced refreshes: the next allowed in 2 s, or in 60 s).
FETCHES = {
    "idle": dict(inflight_at=None, retry_at=0.0, spaced_at=NOW),
    "in_flight": dict(inflight_at=NOW - 0.2, retry_at=0.0, spaced_at=NOW),
    "in_flight_later": dict(inflight_at=NOW + 30, retry_at=0.0, spaced_at=NOW + 30),
    "just_done": dict(inflight_at=None, retry_at=0.0, spaced_at=NOW + 1, just_done=True),
    "backing_off": dict(inflight_at=None, retry_at=NOW + 1, spaced_at=NOW),
    "backing_off_long": dict(inflight_at=None, retry_at=NOW + 300, spaced_at=NOW),
    "spaced_out": dict(inflight_at=None, retry_at=0.0, spaced_at=NOW + 2),
    "spaced_out_long": dict(inflight_at=None, retry_at=0.0, spaced_at=NOW + 60),
}


def facts(token: str, fetch: str, age: float | None = None) -> Facts:
    t, f = dict(TOKENS[token]), dict(FETCHES[fetch])
    if f.pop("just_done", False) and t["fetched_at"] is not None:
        t["fetched_at"] = NOW - 0.1
    if age is not None and t["fetched_at"] is not None:
        t["fetched_at"] = NOW - age
    return Facts(now=NOW, **t, **f)


ANSWER = Decision(Action.ANSWER)


def fetch(at: float = NOW) -> Decision:
    return Decision(Action.FETCH, at)


def refuse(at: float) -> Decision:
    return Decision(Action.REFUSE, at)


def join(at: float) -> Decision:
    return Decision(Action.JOIN, at)


# (source, token, fetch) -> decision. Every source × token state × fetch state.
TABLE = {
    # the refresher: join a fetch under way; else fetch when the backoff (or, for
    # a rejected token, the forced spacing too) allows
    **{(S, tok, "idle"): fetch() for tok in TOKENS},
    **{(S, tok, "in_flight"): join(NOW - 0.2) for tok in TOKENS},
    **{(S, tok, "in_flight_later"): join(NOW + 30) for tok in TOKENS},
    **{(S, tok, "just_done"): fetch() for tok in ("usable", "absent")},
    (S, "rejected", "just_done"): fetch(NOW + 1),
    **{(S, tok, "backing_off"): fetch(NOW + 1) for tok in TOKENS},
    **{(S, tok, "backing_off_long"): fetch(NOW + 300) for tok in TOKENS},
    (S, "usable", "spaced_out"): fetch(), (S, "absent", "spaced_out"): fetch(), (S, "rejected", "spaced_out"): fetch(NOW + 2),
    (S, "usable", "spaced_out_long"): fetch(), (S, "absent", "spaced_out_long"): fetch(),
    (S, "rejected", "spaced_out_long"): fetch(NOW + 60),

    # a call with no usable token: join what is under way or a fetch soon
    # enough (within MAX_CALLER_WAIT_S), else a 503 with the time; with a
    # usable token nothing is asked
    **{(src, "usable", fs): ANSWER for src in (D, R) for fs in FETCHES},
    **{(src, tok, "idle"): fetch() for src in (D, R) for tok in ("rejected", "absent")},
    **{(src, tok, "in_flight"): join(NOW - 0.2) for src in (D, R) for tok in ("rejected", "absent")},
    **{(src, tok, "in_flight_later"): refuse(NOW + 30) for src in (D, R) for tok in ("rejected", "absent")},
    (D, "absent", "just_done"): fetch(), (D, "rejected", "just_done"): fetch(NOW + 1),
    (R, "absent", "just_done"): fetch(NOW + 1), (R, "rejected", "just_done"): fetch(NOW + 1),
    **{(src, tok, "backing_off"): fetch(NOW + 1) for src in (D, R) for tok in ("rejected", "absent")},
    **{(src, tok, "backing_off_long"): refuse(NOW + 300) for src in (D, R) for tok in ("rejected", "absent")},
    (D, "absent", "spaced_out"): fetch(), (D, "rejected", "spaced_out"): fetch(NOW + 2),
    (R, "absent", "spaced_out"): fetch(NOW + 2), (R, "rejected", "spaced_out"): fetch(NOW + 2),
    (D, "absent", "spaced_out_long"): fetch(), (D, "rejected", "spaced_out_long"): refuse(NOW + 60),
    (R, "absent", "spaced_out_long"): refuse(NOW + 60), (R, "rejected", "spaced_out_long"): refuse(NOW + 60),

    # an operator: answered by a refresh that just completed (whatever
    # caused it), joins one under way, overrides a backoff, and meets the
    # forced spacing with a 429 while a token is served
    (A, "usable", "idle"): fetch(), (A, "rejected", "idle"): fetch(), (A, "absent", "idle"): fetch(),
    **{(A, tok, "in_flight"): join(NOW - 0.2) for tok in TOKENS},
    (A, "usable", "in_flight_later"): refuse(NOW + 30),
    (A, "rejected", "in_flight_later"): refuse(NOW + 30), (A, "absent", "in_flight_later"): refuse(NOW + 30),
    (A, "usable", "just_done"): ANSWER, (A, "rejected", "just_done"): fetch(NOW + 1), (A, "absent", "just_done"): fetch(NOW + 1),
    **{(A, tok, "backing_off"): fetch() for tok in TOKENS},
    **{(A, tok, "backing_off_long"): fetch() for tok in TOKENS},
    (A, "usable", "spaced_out"): refuse(NOW + 2), (A, "rejected", "spaced_out"): fetch(NOW + 2),
    (A, "absent", "spaced_out"): fetch(NOW + 2),
    (A, "usable", "spaced_out_long"): refuse(NOW + 60), (A, "rejected", "spaced_out_long"): refuse(NOW + 60),
    (A, "absent", "spaced_out_long"): refuse(NOW + 60),

    # an SDK's force refresh: no evidence; the held token (100 s old here, so
    # past SDK_FORCE_SPACING_S) with a fetch behind it when nothing is under
    # way or spaced; with no usable token, the same as a call
    (F, "usable", "idle"): Decision(Action.BEHIND, NOW), (F, "usable", "in_flight"): ANSWER,
    (F, "usable", "in_flight_later"): ANSWER, (F, "usable", "just_done"): ANSWER,
    (F, "usable", "backing_off"): ANSWER, (F, "usable", "backing_off_long"): ANSWER,
    (F, "usable", "spaced_out"): ANSWER, (F, "usable", "spaced_out_long"): ANSWER,
    (F, "rejected", "idle"): fetch(), (F, "absent", "idle"): fetch(),
    (F, "rejected", "in_flight"): join(NOW - 0.2), (F, "absent", "in_flight"): join(NOW - 0.2),
    (F, "rejected", "in_flight_later"): refuse(NOW + 30), (F, "absent", "in_flight_later"): refuse(NOW + 30),
    (F, "rejected", "just_done"): fetch(NOW + 1), (F, "absent", "just_done"): fetch(),
    (F, "rejected", "backing_off"): fetch(NOW + 1), (F, "absent", "backing_off"): fetch(NOW + 1),
    (F, "rejected", "backing_off_long"): refuse(NOW + 300), (F, "absent", "backing_off_long"): refuse(NOW + 300),
    (F, "rejected", "spaced_out"): fetch(NOW + 2), (F, "absent", "spaced_out"): fetch(),
    (F, "rejected", "spaced_out_long"): refuse(NOW + 60), (F, "absent", "spaced_out_long"): fetch(),

    # news from the store: taken, unless a fetch of ours is under way while a
    # token is served (that fetch finds it in the store itself)
    **{(ST, tok, fs): Decision(Action.ADOPT) for tok in TOKENS for fs in FETCHES},
    (ST, "usable", "in_flight"): ANSWER, (ST, "usable", "in_flight_later"): ANSWER,
}


def test_the_table_covers_every_source_token_state_and_fetch_state():
    assert {(s, t, f) for s in Source for t in TOKENS for f in FETCHES} == set(TABLE)


@pytest.mark.parametrize("case", sorted(TABLE, key=lambda c: (c[0].value, c[1], c[2])),
                         ids=lambda c: f"{c[0].value}-{c[1]}-{c[2]}")
def test_the_rule_book(case):
    source, token, fetch_state = case
    assert decide(source, facts(token, fetch_state)) == TABLE[case]


def test_an_sdk_force_refresh_fetches_behind_only_for_a_token_older_than_the_spacing():
    assert decide(F, facts("usable", "idle", age=SDK_FORCE_SPACING_S - 1)) == ANSWER
    assert decide(F, facts("usable", "idle", age=SDK_FORCE_SPACING_S)).action is Action.BEHIND


def test_an_operators_refresh_is_coalesced_only_within_the_window():
    assert decide(A, facts("usable", "idle", age=REFRESH_COALESCE_S / 2)) == ANSWER
    assert decide(A, facts("usable", "idle", age=REFRESH_COALESCE_S)) == fetch()


def test_a_caller_waits_for_an_attempt_exactly_up_to_the_wait_limit():
    edge = Facts(now=NOW, usable=False, rejected=False, fetched_at=None, inflight_at=None,
                 retry_at=NOW + MAX_CALLER_WAIT_S, spaced_at=NOW)
    assert decide(D, edge) == fetch(NOW + MAX_CALLER_WAIT_S)
    later = Facts(**{**edge.__dict__, "retry_at": NOW + MAX_CALLER_WAIT_S + 0.01})
    assert decide(D, later).action is Action.REFUSE


# ---------------------------------------------------------------- the findings, end to end

async def test_an_operators_refresh_right_after_a_replays_refresh_is_that_refresh(sim, make_sidecar, http):
    sc = await make_sidecar(min_refresh_interval_s=1)
    sim.rotate(APPID)                                    # the token is refused at the next call
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200 and (await resp.json())["errcode"] == 0   # refreshed and replayed
    fetches = sim.fetch_count()
    async with http.post(f"{sc.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 200, await resp.text()      # not 429 "refreshed 0.0 s ago"
        assert (await resp.json())["refreshed"] is True
    assert sim.fetch_count() == fetches


async def test_a_call_during_a_short_backoff_waits_for_the_next_attempt(sim, make_sidecar, http):
    sc = await make_sidecar()
    manager = sc.sidecar.managers["mp"]
    sim.settings.token_fault = "http500"
    sim.rotate(APPID)
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:      # refused; the refresh gets HTTP 500
        assert resp.status == 503
    assert manager.state.retry_at > time.monotonic()                   # a short backoff: the next try soon
    sim.settings.token_fault = ""                                       # WeChat recovered right after
    started = time.monotonic()
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200 and (await resp.json())["errcode"] == 0
    assert 0.2 < time.monotonic() - started < MAX_CALLER_WAIT_S         # it waited for that attempt
