"""Retry, timeout, fault, rate-limit, pool-limit and outlier decisions with injected clocks."""

from __future__ import annotations

import random

import pytest

from config.resources import ConnectionPool, OutlierDetection, Retry
from waypoint.resilience import (
    ConnVerdict,
    FaultPolicy,
    Outcome,
    OutlierDetector,
    PoolLimits,
    RetryPolicy,
    Timeouts,
    TokenBucket,
)

# ----------------------------------------------------------------------------- retry


def test_retry_on_listed_codes_until_attempts_are_used() -> None:
    p = RetryPolicy.from_spec(Retry(attempts=2, codes=(503, 502), backoff=0.1))
    rng = random.Random(1)
    assert p.decide(1, 503, 0.0, None, rng).retry
    assert p.decide(2, 502, 0.0, None, rng).retry
    d = p.decide(3, 503, 0.0, None, rng)
    assert not d.retry and "2 retries" in d.reason


def test_unlisted_codes_and_success_are_not_retried() -> None:
    p = RetryPolicy.from_spec(Retry(attempts=3, codes=(503,), backoff=None))
    rng = random.Random(1)
    assert not p.decide(1, 500, 0.0, None, rng).retry
    assert not p.decide(1, 200, 0.0, None, rng).retry


def test_connect_failures_retry_timeouts_only_with_504() -> None:
    rng = random.Random(1)
    p = RetryPolicy.from_spec(Retry(attempts=1, codes=(503,), backoff=None))
    assert p.decide(1, Outcome.CONNECT_FAILURE, 0.0, None, rng).retry
    assert p.decide(1, Outcome.RESET, 0.0, None, rng).retry
    assert not p.decide(1, Outcome.TIMEOUT, 0.0, None, rng).retry
    p504 = RetryPolicy.from_spec(Retry(attempts=1, codes=(504,), backoff=None))
    assert p504.decide(1, Outcome.TIMEOUT, 0.0, None, rng).retry


def test_default_policy_is_istio_like() -> None:
    p = RetryPolicy.from_spec(None)
    assert p.attempts == 2 and p.codes == frozenset({503})


def test_zero_attempts_never_retries() -> None:
    p = RetryPolicy.from_spec(Retry(attempts=0, codes=(503,), backoff=None))
    assert not p.decide(1, 503, 0.0, None, random.Random(1)).retry


def test_backoff_is_jittered_exponential_and_capped() -> None:
    p = RetryPolicy(attempts=10, backoff=0.1, max_backoff=0.5)
    rng = random.Random(5)
    for n, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (8, 0.5)]:
        draws = [p.backoff_for(n, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # full jitter spreads over the range


def test_no_retry_past_the_request_deadline() -> None:
    p = RetryPolicy(attempts=5, backoff=0.0)
    rng = random.Random(1)
    assert p.decide(1, 503, 9.0, 10.0, rng).retry
    d = p.decide(1, 503, 10.0, 10.0, rng)
    assert not d.retry and "timeout" in d.reason


# ----------------------------------------------------------------------------- timeouts


def test_attempt_deadline_is_the_sooner_of_request_and_backend_timeouts() -> None:
    t = Timeouts(request=10.0, backend_request=3.0)
    assert t.attempt_deadline(100.0, 100.0) == 103.0
    assert t.attempt_deadline(100.0, 108.5) == 110.0
    assert Timeouts(request=None, backend_request=2.0).attempt_deadline(0.0, 5.0) == 7.0
    assert Timeouts().attempt_deadline(0.0, 5.0) is None
    assert Timeouts(request=0.0).request_deadline(1.0) is None


# ----------------------------------------------------------------------------- faults


def test_fault_abort_percent() -> None:
    f = FaultPolicy("app/f", abort_status=503, abort_percent=50)
    rng = random.Random(11)
    aborts = sum(f.decide(rng).abort == 503 for _ in range(2000))
    assert abs(aborts / 20 - 50) <= 5


def test_fault_delay_always_and_never() -> None:
    rng = random.Random(1)
    always = FaultPolicy("app/f", delay=0.5, delay_percent=100)
    never = FaultPolicy("app/f", delay=0.5, delay_percent=0)
    assert all(always.decide(rng).delay == 0.5 for _ in range(50))
    assert all(never.decide(rng).delay == 0.0 for _ in range(50))
    assert FaultPolicy("app/f", abort_status=418).abort_response(418).flags == "FI"


# ----------------------------------------------------------------------------- rate limit


def test_token_bucket_starts_full_and_refills_per_interval() -> None:
    b = TokenBucket(max_tokens=3, tokens_per_fill=1, fill_interval=1.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(0.99)
    assert b.take(1.0)
    assert not b.take(1.5)
    assert b.retry_after(1.5) == 0.5
    # a long idle period refills only up to the maximum
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_token_bucket_fills_in_whole_batches() -> None:
    b = TokenBucket(max_tokens=10, tokens_per_fill=5, fill_interval=2.0)
    for _ in range(10):
        assert b.take(0.0)
    assert not b.take(1.9)
    assert sum(b.take(2.0) for _ in range(10)) == 5
    assert sum(b.take(5.0) for _ in range(10)) == 5  # the fill at t=4


# ----------------------------------------------------------------------------- pool limits


def test_pool_request_limit_overflows_with_503_uo() -> None:
    p = PoolLimits.from_spec(ConnectionPool(http2_max_requests=2))
    assert p.start_request() is None and p.start_request() is None
    r = p.start_request()
    assert r is not None and (r.status, r.flags) == (503, "UO")
    p.end_request()
    assert p.start_request() is None


def test_pool_connections_then_pending_then_overflow() -> None:
    p = PoolLimits.from_spec(ConnectionPool(max_connections=1, http1_max_pending_requests=1))
    assert p.connection_verdict() is ConnVerdict.OPEN
    p.connection_opened()
    assert p.connection_verdict() is ConnVerdict.QUEUE
    assert p.connection_verdict() is ConnVerdict.OVERFLOW
    p.dequeued()
    assert p.connection_verdict() is ConnVerdict.QUEUE
    p.dequeued()
    p.connection_closed()
    assert p.connection_verdict() is ConnVerdict.OPEN


def test_pool_requests_per_connection_and_retry_budget() -> None:
    p = PoolLimits.from_spec(ConnectionPool(max_requests_per_connection=2, max_retries=1))
    assert p.may_reuse(1) and not p.may_reuse(2)
    assert PoolLimits().may_reuse(10_000)
    assert p.start_retry() and not p.start_retry()
    p.end_retry()
    assert p.start_retry()


# ----------------------------------------------------------------------------- outliers


KEYS = [f"10.0.0.{i}:80" for i in range(1, 5)]


def test_consecutive_5xx_ejects_for_base_time_times_count() -> None:
    od = OutlierDetector(consecutive_5xx=3, base_ejection_time=30.0, max_ejection_percent=100)
    k = KEYS[0]
    assert not od.record(k, 503, 0.0, KEYS)
    assert not od.record(k, 500, 1.0, KEYS)
    assert od.record(k, Outcome.CONNECT_FAILURE, 2.0, KEYS)
    assert od.is_ejected(k, 31.9)
    assert not od.is_ejected(k, 32.0)
    for t in (40.0, 41.0, 42.0):
        od.record(k, 503, t, KEYS)
    assert od.is_ejected(k, 101.9)  # second ejection: 2 x 30 s
    assert not od.is_ejected(k, 102.0)
    assert od.healthy(KEYS, 50.0) == [1, 2, 3]


def test_success_resets_the_consecutive_count() -> None:
    od = OutlierDetector(consecutive_5xx=2, max_ejection_percent=100)
    k = KEYS[0]
    od.record(k, 503, 0.0, KEYS)
    od.record(k, 200, 0.1, KEYS)
    assert not od.record(k, 503, 0.2, KEYS)
    assert not od.is_ejected(k, 0.3)


def test_gateway_errors_only_count_502_503_504() -> None:
    od = OutlierDetector(consecutive_5xx=None, consecutive_gateway=2, max_ejection_percent=100)
    k = KEYS[0]
    od.record(k, 500, 0.0, KEYS)
    assert not od.record(k, 500, 0.1, KEYS)
    od.record(k, 502, 0.2, KEYS)
    assert od.record(k, 504, 0.3, KEYS)


def test_max_ejection_percent_caps_ejections() -> None:
    od = OutlierDetector(consecutive_5xx=1, max_ejection_percent=50)
    assert od.record(KEYS[0], 503, 0.0, KEYS)
    assert od.record(KEYS[1], 503, 0.0, KEYS)
    assert not od.record(KEYS[2], 503, 0.0, KEYS)  # would be 75 %
    assert od.healthy(KEYS, 1.0) == [2, 3]


def test_all_ejected_falls_back_to_every_endpoint() -> None:
    od = OutlierDetector(consecutive_5xx=1, max_ejection_percent=100)
    keys = KEYS[:2]
    od.record(keys[0], 503, 0.0, keys)
    od.record(keys[1], 503, 0.0, keys)
    assert od.healthy(keys, 1.0) == [0, 1]


def test_min_health_percent_disables_ejection_below_it() -> None:
    od = OutlierDetector(consecutive_5xx=1, max_ejection_percent=100, min_health_percent=80)
    od.record(KEYS[0], 503, 0.0, KEYS)
    assert od.healthy(KEYS, 1.0) == [0, 1, 2, 3]  # 75 % healthy < 80 %


def test_outlier_from_spec_defaults() -> None:
    od = OutlierDetector.from_spec(OutlierDetection(base_ejection_time=10.0))
    assert od is not None and od.consecutive_5xx == 5 and od.max_ejection_percent == 10
    assert OutlierDetector.from_spec(None) is None


@pytest.mark.parametrize("request_timeout", [None, 0.0, 2.0, 10.0])
@pytest.mark.parametrize("backend_timeout", [None, 0.0, 1.0, 3.0, 8.0])
@pytest.mark.parametrize(("started", "now"), [(100.0, 100.0), (100.0, 107.0), (0.0, 9.5)])
def test_attempt_deadline_table(
    request_timeout: float | None, backend_timeout: float | None, started: float, now: float
) -> None:
    """The sooner of `started + request` and `now + backendRequest`, unset or 0 = none."""
    t = Timeouts(request=request_timeout, backend_request=backend_timeout)
    ends = []
    if request_timeout:
        ends.append(started + request_timeout)
    if backend_timeout:
        ends.append(now + backend_timeout)
    assert t.attempt_deadline(started, now) == (min(ends) if ends else None)


def test_not_retriable_decision() -> None:
    d = RetryPolicy().decide(1, 500, 0.0, None, random.Random(1))
    assert (d.retry, d.backoff, d.reason) == (False, 0.0, "not retriable")
