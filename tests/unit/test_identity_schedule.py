"""The identity manager's sans-IO schedule: priorities, half-life renewal, backoff, forgetting."""

from __future__ import annotations

import pytest

from ztunnel.identity import (
    Certificate,
    Fetch,
    IdentitySchedule,
    Pending,
    Priority,
    Ready,
    SpiffeId,
    Unavailable,
    Wait,
)

T0 = 1_800_000_000.0
DAY = 86400.0
A, B, C, D = (SpiffeId("cluster.local", "ns", n) for n in "abcd")


def cert(identity: SpiffeId, not_before: float, ttl: float = DAY) -> Certificate:
    return Certificate(identity, b"", b"", b"", not_before, not_before + ttl)


def schedule(**kw: float) -> IdentitySchedule:
    return IdentitySchedule(random=lambda: 0.5, **kw)  # type: ignore[arg-type]


def fetch(s: IdentitySchedule, now: float) -> Fetch:
    action = s.next_action(now)
    assert isinstance(action, Fetch), action
    return action


def test_newly_scheduled_identities_are_prefetched_at_once() -> None:
    s = schedule()
    s.set_wanted([A, B], T0)
    first, second = fetch(s, T0), fetch(s, T0)
    assert {first.identity, second.identity} == {A, B}
    assert first.priority == Priority.PREFETCH and first.attempt == 1
    assert s.next_action(T0) == Wait(None)


def test_a_waiting_connection_goes_before_prefetching() -> None:
    s = schedule(max_in_flight=1)
    s.set_wanted([A, B, C], T0)
    assert isinstance(s.demand(D, T0), Pending)
    order = []
    for _ in range(4):
        f = fetch(s, T0)
        order.append((f.identity, f.priority))
        s.fetch_succeeded(f, cert(f.identity, T0), T0)
    assert order[0] == (D, Priority.WAITING)
    assert [i for i, _ in order[1:]] == [A, B, C]


def test_demand_raises_the_priority_of_a_queued_prefetch() -> None:
    s = schedule(max_in_flight=1)
    s.set_wanted([A, B, C], T0)
    blocker = fetch(s, T0)  # A occupies the only slot
    assert blocker.identity == A
    assert isinstance(s.demand(C, T0), Pending)
    assert s.next_action(T0) == Wait(None)  # slot busy
    s.fetch_succeeded(blocker, cert(A, T0), T0)
    nxt = fetch(s, T0)
    assert (nxt.identity, nxt.priority) == (C, Priority.WAITING)


def test_only_max_in_flight_fetches_run_at_once() -> None:
    s = schedule(max_in_flight=2)
    s.set_wanted([A, B, C], T0)
    fetch(s, T0)
    fetch(s, T0)
    assert s.next_action(T0) == Wait(None)


def test_cached_certificate_is_ready_and_renewed_at_half_life() -> None:
    s = schedule()
    s.set_wanted([A], T0)
    f = fetch(s, T0)
    c = cert(A, T0 - 300, DAY)
    assert s.fetch_succeeded(f, c, T0) == 0
    assert s.demand(A, T0 + 10) == Ready(c)
    half = T0 - 300 + DAY / 2
    assert s.next_action(T0 + 10) == Wait(half)
    assert s.next_action(half - 1) == Wait(half)
    renew = fetch(s, half)
    assert (renew.identity, renew.priority) == (A, Priority.RENEW)


def test_failed_renewal_keeps_the_still_valid_certificate() -> None:
    s = schedule()
    s.set_wanted([A], T0)
    c = cert(A, T0, DAY)
    s.fetch_succeeded(fetch(s, T0), c, T0)
    half = c.renewal_time()
    outcome = s.fetch_failed(fetch(s, half), "control plane unreachable", half)
    assert outcome is not None and outcome.kept == c and not outcome.fail_waiters
    assert s.demand(A, half + 1) == Ready(c)
    assert s.certificate(A, half + 1) == c


def test_backoff_is_exponential_jittered_and_capped() -> None:
    jitter = iter([0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    s = IdentitySchedule(random=lambda: next(jitter), backoff_initial=1.0, backoff_max=30.0)
    s.set_wanted([A], T0)
    now = T0
    delays = []
    for _ in range(8):
        f = fetch(s, now)
        out = s.fetch_failed(f, "boom", now)
        assert out is not None
        delays.append(out.retry_at - now)
        assert s.next_action(now) == Wait(out.retry_at)  # nothing before the retry
        now = out.retry_at
    # base 1,2,4,8,16,30,30,30 spread over [base/2, base] by the injected random
    assert delays == [0.5, 2.0, 3.0, 4.0, 16.0, 30.0, 30.0, 30.0]


def test_retry_attempt_numbers_count_consecutive_failures() -> None:
    s = schedule()
    s.set_wanted([A], T0)
    f1 = fetch(s, T0)
    out = s.fetch_failed(f1, "boom", T0)
    assert out is not None
    f2 = fetch(s, out.retry_at)
    assert f2.attempt == 2
    c = cert(A, out.retry_at)
    s.fetch_succeeded(f2, c, out.retry_at)
    assert fetch(s, c.renewal_time()).attempt == 1  # success resets the count


def test_expired_certificate_is_dropped_when_renewal_keeps_failing() -> None:
    s = schedule(backoff_max=600)
    s.set_wanted([A], T0)
    c = cert(A, T0, 3600)
    s.fetch_succeeded(fetch(s, T0), c, T0)
    now = c.renewal_time()
    while now < c.not_after + 1200:
        out = s.fetch_failed(fetch(s, now), "boom", now)
        assert out is not None
        assert (out.kept is c) == (now < c.not_after)
        now = out.retry_at
    assert s.certificate(A, now) is None


def test_waiters_fail_fast_when_there_is_no_certificate_to_fall_back_on() -> None:
    s = schedule()
    assert isinstance(s.demand(A, T0), Pending)
    out = s.fetch_failed(fetch(s, T0), "CSR refused", T0)
    assert out is not None and out.fail_waiters and out.kept is None


def test_demand_during_a_short_backoff_waits_for_the_retry() -> None:
    s = schedule(backoff_initial=2.0, max_demand_wait=5.0)
    s.set_wanted([A], T0)
    out = s.fetch_failed(fetch(s, T0), "boom", T0)
    assert out is not None and out.retry_at == T0 + 1.5
    assert isinstance(s.demand(A, T0 + 0.5), Pending)
    assert s.next_action(T0 + 0.5) == Wait(T0 + 1.5)
    f = fetch(s, T0 + 1.5)
    assert (f.identity, f.priority) == (A, Priority.WAITING)


def test_demand_during_a_long_backoff_is_unavailable_with_the_reason() -> None:
    s = schedule(backoff_initial=100.0, max_demand_wait=5.0)
    s.set_wanted([A], T0)
    s.fetch_failed(fetch(s, T0), "control plane refused: node-impersonation", T0)
    status = s.demand(A, T0 + 1)
    assert status == Unavailable("control plane refused: node-impersonation", T0 + 75.0)


def test_identities_that_left_the_node_are_forgotten() -> None:
    s = schedule()
    s.set_wanted([A, B], T0)
    fa, fb = fetch(s, T0), fetch(s, T0)
    s.fetch_succeeded(fa, cert(fa.identity, T0), T0)
    assert sorted(s.set_wanted([B], T0 + 1)) == [fa.identity]
    assert s.identities() == [B]
    assert s.certificate(fa.identity, T0 + 1) is None
    assert s.in_flight == 1  # B's fetch is still running
    # the result of a fetch for a forgotten identity is dropped
    s.set_wanted([], T0 + 2)
    assert s.fetch_succeeded(fb, cert(B, T0), T0 + 3) == -1
    assert s.in_flight == 0
    assert s.next_action(T0 + 3) == Wait(None)


def test_a_stale_fetch_does_not_count_for_a_re_added_identity() -> None:
    s = schedule()
    s.set_wanted([A], T0)
    old = fetch(s, T0)
    s.set_wanted([], T0)
    s.set_wanted([A], T0)
    new = fetch(s, T0)
    assert s.fetch_failed(old, "late", T0) is None
    assert s.fetch_succeeded(new, cert(A, T0), T0) == 0


def test_an_identity_with_waiters_is_not_forgotten() -> None:
    s = schedule()
    s.set_wanted([A], T0)
    assert isinstance(s.demand(A, T0), Pending)
    assert s.set_wanted([], T0) == []
    f = fetch(s, T0)
    assert s.fetch_succeeded(f, cert(A, T0), T0) == 1
    assert s.set_wanted([], T0) == [A]


@pytest.mark.parametrize("ttl", [60.0, 3600.0, DAY])
def test_renewal_is_never_scheduled_in_the_past(ttl: float) -> None:
    s = schedule()
    s.set_wanted([A], T0)
    late = T0 + ttl  # the certificate arrives already past its half-life
    s.fetch_succeeded(fetch(s, late), cert(A, T0, ttl * 1.5), late)
    assert fetch(s, late).priority == Priority.RENEW
