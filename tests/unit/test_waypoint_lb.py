"""Load balancers with injected rng and clock; peak-EWMA steers away from a slow endpoint."""

from __future__ import annotations

import heapq
import random
from collections import Counter

import pytest

from waypoint.lb import Balancer, LeastRequest, PeakEwma, RandomLB, RoundRobin, make_balancer
from waypoint.model import UpstreamEndpoint


def eps(n: int, weights: list[int] | None = None) -> list[UpstreamEndpoint]:
    return [
        UpstreamEndpoint(
            f"w{i}",
            f"10.0.0.{i + 1}",
            8080,
            f"spiffe://cluster.local/ns/app/sa/w{i}",
            weight=(weights or [1] * n)[i],
        )
        for i in range(n)
    ]


def test_round_robin_cycles() -> None:
    lb = RoundRobin()
    e = eps(3)
    rng = random.Random(1)
    picks = [lb.pick(e, 0.0, rng).workload_uid for _ in range(6)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_random_respects_weights() -> None:
    lb = RandomLB()
    e = eps(2, [3, 1])
    rng = random.Random(2)
    c = Counter(lb.pick(e, 0.0, rng).workload_uid for _ in range(4000))
    assert abs(c["w0"] / 40 - 75) <= 5


def test_least_request_prefers_fewer_in_flight() -> None:
    lb = LeastRequest()
    e = eps(2)
    rng = random.Random(3)
    for _ in range(5):
        lb.started(e[0].key, 0.0)
    assert all(lb.pick(e, 0.0, rng) is e[1] for _ in range(50))
    for _ in range(5):
        lb.finished(e[0].key, 1.0, 0.01)
    assert lb.active == {}


def test_least_request_two_choices_avoid_the_busiest() -> None:
    lb = LeastRequest()
    e = eps(4)
    for _ in range(100):
        lb.started(e[3].key, 0.0)
    rng = random.Random(4)
    c = Counter(lb.pick(e, 0.0, rng).workload_uid for _ in range(2000))
    assert c["w3"] == 0  # whenever it is drawn, the other choice has fewer in flight
    assert set(c) == {"w0", "w1", "w2"}


def test_make_balancer_names() -> None:
    assert isinstance(make_balancer(""), LeastRequest)
    assert isinstance(make_balancer("ROUND_ROBIN"), RoundRobin)
    assert isinstance(make_balancer("RANDOM"), RandomLB)
    assert isinstance(make_balancer("peak_ewma"), PeakEwma)


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    lb = PeakEwma(default_rtt=0.03, decay=10.0)
    k = "10.0.0.1:8080"
    lb.started(k, 0.0)
    lb.finished(k, 0.0, 0.1)
    assert lb.cost(k, 0.0) == pytest.approx(0.1)
    lb.started(k, 0.0)
    lb.finished(k, 0.0, 0.5)  # slower: the estimate takes the peak at once
    assert lb.cost(k, 0.0) == pytest.approx(0.5)
    lb.started(k, 10.0)
    lb.finished(k, 10.0, 0.1)  # faster, 1 decay period later: weight 1/e on the old value
    expect = 0.5 * 0.36787944 + 0.1 * (1 - 0.36787944)
    assert lb.cost(k, 10.0) == pytest.approx(expect, rel=1e-6)
    lb.started(k, 10.0)
    assert lb.cost(k, 10.0) == pytest.approx(expect * 2, rel=1e-6)  # one in flight


def _simulate(
    lb: Balancer,
    latencies: list[float],
    requests: int = 3000,
    interval: float = 0.004,
    seed: int = 9,
) -> Counter[str]:
    """Open-loop arrivals every `interval` s; endpoint i answers after latencies[i]."""
    e = eps(len(latencies))
    rng = random.Random(seed)
    pending: list[tuple[float, int, str]] = []
    counts: Counter[str] = Counter()
    now = 0.0
    for n in range(requests):
        now = n * interval
        while pending and pending[0][0] <= now:
            t, _, key = heapq.heappop(pending)
            idx = int(key.split(".")[3].split(":")[0]) - 1
            lb.finished(key, t, latencies[idx])
        ep = lb.pick(e, now, rng)
        lb.started(ep.key, now)
        idx = e.index(ep)
        heapq.heappush(pending, (now + latencies[idx], n, ep.key))
        if n >= requests // 10:  # after warm-up
            counts[ep.workload_uid] += 1
    return counts


def test_peak_ewma_steers_load_away_from_a_slow_endpoint() -> None:
    latencies = [0.200, 0.010, 0.010, 0.010]
    ewma = _simulate(PeakEwma(), latencies)
    rr = _simulate(RoundRobin(), latencies)
    total = sum(ewma.values())
    assert rr["w0"] / total > 0.24  # round robin keeps sending it a quarter
    assert ewma["w0"] / total < 0.05
    # and it beats plain least-request, which only sees queue depth
    lr = _simulate(LeastRequest(), latencies)
    assert ewma["w0"] < lr["w0"]


def test_peak_ewma_weighs_latency_against_load() -> None:
    lb = PeakEwma(decay=1.0)
    e = eps(2)
    rng = random.Random(1)
    lb.started(e[0].key, 0.0)
    lb.finished(e[0].key, 0.0, 0.05)
    lb.started(e[1].key, 0.0)
    lb.finished(e[1].key, 0.0, 0.01)
    assert lb.pick(e, 0.1, rng) is e[1]
    for _ in range(5):  # 0.01 x 6 in flight + 1 > 0.05: the slower, idle endpoint wins
        lb.started(e[1].key, 0.1)
    assert lb.pick(e, 0.1, rng) is e[0]
    # idle decay keeps the ratio of the estimates (both decay toward zero)
    assert lb.cost(e[0].key, 5.0) / lb.cost(e[0].key, 0.1) == pytest.approx(
        lb.cost(e[1].key, 5.0) / lb.cost(e[1].key, 0.1)
    )


def test_round_robin_with_weights_is_smooth() -> None:
    lb = RoundRobin()
    e = eps(3, [5, 1, 1])
    rng = random.Random(1)
    picks = [lb.pick(e, 0.0, rng).workload_uid for _ in range(14)]
    assert Counter(picks) == {"w0": 10, "w1": 2, "w2": 2}
    assert picks[:7] == ["w0", "w0", "w1", "w0", "w2", "w0", "w0"]  # nginx's sequence


def test_least_request_with_weights_prefers_heavier_and_idle() -> None:
    lb = LeastRequest()
    e = eps(2, [3, 1])
    rng = random.Random(6)
    c = Counter(lb.pick(e, 0.0, rng).workload_uid for _ in range(4000))
    assert abs(c["w0"] / 40 - 75) <= 5
    for _ in range(5):  # w0 busy: effective weights 3/6 vs 1/1
        lb.started(e[0].key, 0.0)
    c = Counter(lb.pick(e, 0.0, rng).workload_uid for _ in range(4000))
    assert abs(c["w0"] / 40 - 100 / 3) <= 5
