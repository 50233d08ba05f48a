"""Endpoint load balancing: ROUND_ROBIN, RANDOM, LEAST_REQUEST and peak-EWMA.

All balancers share one small interface, with the clock and randomness injected:

    ep = lb.pick(endpoints, now, rng)       # endpoints: non-empty sequence
    lb.started(ep.key, now)                 # request sent to ep
    lb.finished(ep.key, now, rtt)           # response head came back after `rtt` s

* `RoundRobin`: endpoints in turn (smooth weighted round robin when endpoint
  weights differ).
* `RandomLB`: random, weighted by each endpoint's `weight`.
* `LeastRequest`: power of two choices: two distinct random endpoints, the one
  with fewer requests in flight wins (Envoy's default for LEAST_REQUEST); with
  unequal weights, random by `weight / (in flight + 1)` as Envoy does.
* `PeakEwma`: power of two choices on cost = RTT estimate x (in-flight + 1), the
  estimate being a peak-sensitive EWMA as in Linkerd/tower: a slower sample
  replaces the estimate at once, faster samples pull it down with weight
  `1 - exp(-elapsed / decay)`; idle estimates decay the same way toward a new
  observation. New endpoints start at `default_rtt`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from random import Random
from typing import Protocol

from waypoint.model import UpstreamEndpoint

__all__ = [
    "Balancer",
    "LeastRequest",
    "PeakEwma",
    "RandomLB",
    "RoundRobin",
    "make_balancer",
]


class Balancer(Protocol):
    """The interface every load balancer offers."""

    name: str

    def pick(
        self, endpoints: Sequence[UpstreamEndpoint], now: float, rng: Random
    ) -> UpstreamEndpoint: ...

    def started(self, key: str, now: float) -> None: ...

    def finished(self, key: str, now: float, rtt: float | None) -> None: ...


@dataclass
class _InFlight:
    """In-flight request counts per endpoint key."""

    active: dict[str, int] = field(default_factory=dict)

    def started(self, key: str, now: float) -> None:
        self.active[key] = self.active.get(key, 0) + 1

    def finished(self, key: str, now: float, rtt: float | None) -> None:
        n = self.active.get(key, 0) - 1
        if n <= 0:
            self.active.pop(key, None)
        else:
            self.active[key] = n


def _uniform(endpoints: Sequence[UpstreamEndpoint]) -> bool:
    w = endpoints[0].weight
    return all(e.weight == w for e in endpoints)


@dataclass
class RoundRobin(_InFlight):
    """Endpoints in turn; unequal weights use smooth weighted round robin."""

    name: str = "ROUND_ROBIN"
    next_index: int = 0
    current: dict[str, int] = field(default_factory=dict)

    def pick(
        self, endpoints: Sequence[UpstreamEndpoint], now: float, rng: Random
    ) -> UpstreamEndpoint:
        if _uniform(endpoints):
            ep = endpoints[self.next_index % len(endpoints)]
            self.next_index = (self.next_index + 1) % (1 << 30)
            return ep
        total = 0
        best: UpstreamEndpoint | None = None
        best_cw = 0
        for e in endpoints:
            cw = self.current.get(e.key, 0) + e.weight
            self.current[e.key] = cw
            total += e.weight
            if best is None or cw > best_cw:
                best, best_cw = e, cw
        assert best is not None
        self.current[best.key] = best_cw - total
        if len(self.current) > 4 * len(endpoints):  # endpoints came and went
            keep = {e.key for e in endpoints}
            self.current = {k: v for k, v in self.current.items() if k in keep}
        return best


@dataclass
class RandomLB(_InFlight):
    name: str = "RANDOM"

    def pick(
        self, endpoints: Sequence[UpstreamEndpoint], now: float, rng: Random
    ) -> UpstreamEndpoint:
        total = sum(e.weight for e in endpoints)
        x = rng.random() * total
        for e in endpoints:
            x -= e.weight
            if x < 0:
                return e
        return endpoints[-1]


def _two(n: int, rng: Random) -> tuple[int, int]:
    a = rng.randrange(n)
    b = rng.randrange(n - 1)
    if b >= a:
        b += 1
    return a, b


@dataclass
class LeastRequest(_InFlight):
    """Power of two choices on requests in flight; with unequal weights, Envoy's
    weighted variant: random by effective weight `weight / (in flight + 1)`."""

    name: str = "LEAST_REQUEST"

    def pick(
        self, endpoints: Sequence[UpstreamEndpoint], now: float, rng: Random
    ) -> UpstreamEndpoint:
        if len(endpoints) == 1:
            return endpoints[0]
        if not _uniform(endpoints):
            eff = [e.weight / (self.active.get(e.key, 0) + 1) for e in endpoints]
            x = rng.random() * sum(eff)
            for e, w in zip(endpoints, eff, strict=True):
                x -= w
                if x < 0:
                    return e
            return endpoints[-1]
        a, b = _two(len(endpoints), rng)
        ea, eb = endpoints[a], endpoints[b]
        if self.active.get(eb.key, 0) < self.active.get(ea.key, 0):
            return eb
        return ea


@dataclass
class _Ewma:
    rtt: float
    stamp: float


@dataclass
class PeakEwma(_InFlight):
    """Latency-aware balancing (Linkerd's peak EWMA with power of two choices)."""

    name: str = "PEAK_EWMA"
    default_rtt: float = 0.030
    decay: float = 10.0
    estimates: dict[str, _Ewma] = field(default_factory=dict)

    def _estimate(self, key: str, now: float) -> float:
        e = self.estimates.get(key)
        if e is None:
            return self.default_rtt
        elapsed = max(0.0, now - e.stamp)
        # decay toward zero while no response arrives
        return e.rtt * math.exp(-elapsed / self.decay)

    def cost(self, key: str, now: float) -> float:
        """RTT estimate x (requests in flight + 1); lower is better."""
        pending = self.active.get(key, 0)
        rtt = self._estimate(key, now)
        if rtt <= 0:
            return float(pending)  # no estimate: only load counts
        return rtt * (pending + 1)

    def pick(
        self, endpoints: Sequence[UpstreamEndpoint], now: float, rng: Random
    ) -> UpstreamEndpoint:
        if len(endpoints) == 1:
            return endpoints[0]
        a, b = _two(len(endpoints), rng)
        ea, eb = endpoints[a], endpoints[b]
        if self.cost(eb.key, now) < self.cost(ea.key, now):
            return eb
        return ea

    def finished(self, key: str, now: float, rtt: float | None) -> None:
        super().finished(key, now, rtt)
        if rtt is None:
            return
        e = self.estimates.get(key)
        if e is None:
            self.estimates[key] = _Ewma(rtt, now)
            return
        if rtt > e.rtt:
            e.rtt = rtt  # peak: jump up at once
        else:
            w = math.exp(-max(0.0, now - e.stamp) / self.decay)
            e.rtt = e.rtt * w + rtt * (1 - w)
        e.stamp = now

    def forget_except(self, keys: Sequence[str]) -> None:
        keep = set(keys)
        for k in [k for k in self.estimates if k not in keep]:
            del self.estimates[k]


def make_balancer(policy: str) -> Balancer:
    """The balancer for a DestinationRule `loadBalancer.simple` value.

    "" (unset) is LEAST_REQUEST, as in Istio. `PEAK_EWMA` selects the latency-aware
    mode; `PASSTHROUGH` is treated as RANDOM.
    """
    p = policy.upper()
    if p == "ROUND_ROBIN":
        return RoundRobin()
    if p in ("RANDOM", "PASSTHROUGH"):
        return RandomLB()
    if p == "PEAK_EWMA":
        return PeakEwma()
    return LeastRequest()
