"""Resilience decisions: retries, timeouts, faults, rate limits, pool limits, outliers.

Everything here is pure or keeps small in-memory state driven by an injected clock
(`now`, seconds, monotonic) and an injected `random.Random`; nothing sleeps.

* `RetryPolicy.decide`: retry or stop after an attempt's outcome, with Envoy's
  exponential backoff and full jitter (`base * 2**(n-1)`, capped at 10 x base).
* `Timeouts`: HTTPRoute `timeouts.request` bounds the whole request including
  retries, `timeouts.backendRequest` each attempt.
* `FaultPolicy.decide`: HTTPFault delay/abort draws.
* `TokenBucket.take`: RateLimit (whole `tokensPerFill` added each `fillInterval`).
* `PoolLimits`: DestinationRule connection-pool accounting; an overflow is a 503
  with response flag `UO`.
* `OutlierDetector`: consecutive 5xx (or gateway errors) eject an endpoint for
  `baseEjectionTime x times ejected`, at most `maxEjectionPercent` of endpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from random import Random

from config.resources import (
    ConnectionPool,
    HTTPFaultSpec,
    OutlierDetection,
    RateLimitSpec,
    Retry,
)
from waypoint.model import LocalResponse

__all__ = [
    "GATEWAY_ERRORS",
    "UNLIMITED",
    "ConnVerdict",
    "FaultDecision",
    "FaultPolicy",
    "Outcome",
    "OutlierDetector",
    "PoolLimits",
    "RetryDecision",
    "RetryPolicy",
    "Timeouts",
    "TokenBucket",
    "overflow_response",
]

#: an unset connection-pool limit
UNLIMITED = 2**32 - 1

#: statuses Envoy counts as gateway errors (plus local connect failures and timeouts)
GATEWAY_ERRORS = frozenset({502, 503, 504})


class Outcome(Enum):
    """How an attempt ended when it produced no HTTP status."""

    CONNECT_FAILURE = "connect-failure"  # could not reach the endpoint (UF)
    RESET = "reset"  # stream/connection reset before a response head (UR)
    TIMEOUT = "timeout"  # the per-attempt timeout fired (UT)

    @property
    def status(self) -> int:
        """The status the client sees when this is the final outcome."""
        return 504 if self is Outcome.TIMEOUT else 503

    @property
    def flag(self) -> str:
        return {"connect-failure": "UF", "reset": "UR", "timeout": "UT"}[self.value]


def _is_5xx(result: int | Outcome) -> bool:
    return isinstance(result, Outcome) or result >= 500


def _is_gateway_error(result: int | Outcome) -> bool:
    return isinstance(result, Outcome) or result in GATEWAY_ERRORS


# ----------------------------------------------------------------------------- retry


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """`retry` with `backoff` seconds to wait first, or stop (with the reason)."""

    retry: bool
    backoff: float = 0.0
    reason: str = ""


_NOT_RETRIABLE = RetryDecision(False, reason="not retriable")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to retry an attempt.

    `attempts` is the number of retries after the first try (Gateway API
    `retry.attempts`). Connect failures and resets are always retriable; a status
    when it is in `codes`; a per-attempt timeout when 504 is in `codes`. With no
    `retry` on a route the Istio default applies: 2 retries of connect failures,
    resets and 503.
    """

    attempts: int = 2
    codes: frozenset[int] = frozenset({503})
    backoff: float = 0.025
    max_backoff: float = 0.25

    @classmethod
    def from_spec(cls, spec: Retry | None) -> RetryPolicy:
        if spec is None:
            return cls()
        base = spec.backoff if spec.backoff is not None else 0.025
        return cls(
            attempts=spec.attempts,
            codes=frozenset(spec.codes) if spec.codes else frozenset({503}),
            backoff=base,
            max_backoff=base * 10,
        )

    def retriable(self, result: int | Outcome) -> bool:
        """Whether this outcome may be retried at all."""
        if isinstance(result, Outcome):
            return result is not Outcome.TIMEOUT or 504 in self.codes
        return result in self.codes

    def backoff_for(self, retry_number: int, rng: Random) -> float:
        """Full-jitter exponential backoff before retry number `retry_number` (1-based)."""
        if self.backoff <= 0:
            return 0.0
        ceiling = min(self.backoff * 2.0 ** (retry_number - 1), self.max_backoff)
        return rng.random() * ceiling

    def decide(
        self,
        tries_done: int,
        result: int | Outcome,
        now: float,
        deadline: float | None,
        rng: Random,
    ) -> RetryDecision:
        """After `tries_done` tries (>= 1) ended with `result`: retry or stop."""
        if not self.retriable(result):
            return _NOT_RETRIABLE
        if tries_done > self.attempts:
            return RetryDecision(False, reason=f"{self.attempts} retries used")
        backoff = self.backoff_for(tries_done, rng)
        if deadline is not None and now + backoff >= deadline:
            return RetryDecision(False, reason="request timeout reached")
        return RetryDecision(True, backoff, reason=f"retry {tries_done} after {result}")


# ----------------------------------------------------------------------------- timeouts


@dataclass(frozen=True, slots=True)
class Timeouts:
    """`request`: whole request incl. retries; `backend_request`: each attempt (seconds).

    None (or 0) means no bound, as in the Gateway API.
    """

    request: float | None = None
    backend_request: float | None = None

    def request_deadline(self, started: float) -> float | None:
        """When the whole request must be answered, given its start time."""
        return started + self.request if self.request else None

    def attempt_deadline(self, started: float, now: float) -> float | None:
        """The deadline of an attempt starting at `now` for a request started at `started`."""
        whole = started + self.request if self.request else None
        if not self.backend_request:
            return whole
        mine = now + self.backend_request
        return whole if whole is not None and whole <= mine else mine


# ----------------------------------------------------------------------------- faults


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What fault injection does to one request: delay first, then maybe abort."""

    delay: float = 0.0
    abort: int | None = None


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """An `HTTPFault`: fixed delay for `delay_percent` %, abort for `abort_percent` %."""

    name: str
    delay: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0

    @classmethod
    def from_spec(cls, name: str, spec: HTTPFaultSpec) -> FaultPolicy:
        return cls(name, spec.delay, spec.delay_percent, spec.abort_status, spec.abort_percent)

    def decide(self, rng: Random) -> FaultDecision:
        """Draw this request's fault (two independent draws, delay then abort)."""
        delay = 0.0
        if self.delay and rng.random() * 100 < self.delay_percent:
            delay = self.delay
        abort = None
        if self.abort_status is not None and rng.random() * 100 < self.abort_percent:
            abort = self.abort_status
        return FaultDecision(delay, abort)

    def abort_response(self, status: int) -> LocalResponse:
        return LocalResponse(
            status,
            b"fault filter abort",
            (("content-type", "text/plain"),),
            flags="FI",
            details=f"aborted by HTTPFault {self.name}",
        )


# ----------------------------------------------------------------------------- rate limit


@dataclass
class TokenBucket:
    """A token bucket: starts full; `tokens_per_fill` added every `fill_interval` s."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval: float
    tokens: float = field(default=-1.0)
    last_fill: float | None = None

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = float(self.max_tokens)

    @classmethod
    def from_spec(cls, spec: RateLimitSpec) -> TokenBucket:
        return cls(spec.max_tokens, spec.tokens_per_fill, spec.fill_interval)

    def _refill(self, now: float) -> None:
        if self.last_fill is None:
            self.last_fill = now
            return
        fills = math.floor((now - self.last_fill) / self.fill_interval)
        if fills > 0:
            self.tokens = min(float(self.max_tokens), self.tokens + fills * self.tokens_per_fill)
            self.last_fill += fills * self.fill_interval

    def take(self, now: float) -> bool:
        """Take one token at time `now`; False means rate limited."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until the next fill (for a `retry-after` hint)."""
        self._refill(now)
        assert self.last_fill is not None
        return max(0.0, self.last_fill + self.fill_interval - now)


# ----------------------------------------------------------------------------- pool limits


class ConnVerdict(Enum):
    """What to do when a request needs a new upstream connection."""

    OPEN = "open"  # under max_connections: open one
    QUEUE = "queue"  # at max_connections: wait for one (counted as pending)
    OVERFLOW = "overflow"  # pending queue full: 503 UO


def overflow_response(what: str) -> LocalResponse:
    """The 503 for a connection-pool overflow."""
    return LocalResponse(
        503,
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        (("content-type", "text/plain"),),
        flags="UO",
        details=f"connection pool overflow: {what}",
    )


@dataclass
class PoolLimits:
    """DestinationRule `connectionPool` accounting for one backend (all endpoints).

    Unset limits are unlimited (`UNLIMITED`), as Istio configures Envoy. The
    runtime calls `start_request`/`end_request` around every request,
    `connection_verdict` before opening a connection and `connection_opened` /
    `connection_closed` / `dequeued` as things happen.
    """

    max_connections: int = UNLIMITED
    max_pending: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_requests_per_connection: int = 0  # 0 = unlimited
    max_retries: int = UNLIMITED
    connections: int = 0
    pending: int = 0
    active: int = 0
    retries: int = 0

    @classmethod
    def from_spec(cls, cp: ConnectionPool | None) -> PoolLimits:
        if cp is None:
            return cls()
        return cls(
            max_connections=cp.max_connections or UNLIMITED,
            max_pending=cp.http1_max_pending_requests or UNLIMITED,
            max_requests=cp.http2_max_requests or UNLIMITED,
            max_requests_per_connection=cp.max_requests_per_connection or 0,
            max_retries=cp.max_retries if cp.max_retries is not None else UNLIMITED,
        )

    def same_limits(self, other: PoolLimits) -> bool:
        return (
            self.max_connections,
            self.max_pending,
            self.max_requests,
            self.max_requests_per_connection,
            self.max_retries,
        ) == (
            other.max_connections,
            other.max_pending,
            other.max_requests,
            other.max_requests_per_connection,
            other.max_retries,
        )

    def start_request(self) -> LocalResponse | None:
        """Admit one request (None) or answer the overflow 503 UO."""
        if self.active >= self.max_requests:
            return overflow_response(f"{self.active} active requests (max {self.max_requests})")
        self.active += 1
        return None

    def end_request(self) -> None:
        self.active = max(0, self.active - 1)

    def connection_verdict(self) -> ConnVerdict:
        """Open a new connection, queue for one, or overflow. QUEUE counts as pending."""
        if self.connections < self.max_connections:
            return ConnVerdict.OPEN
        if self.pending < self.max_pending:
            self.pending += 1
            return ConnVerdict.QUEUE
        return ConnVerdict.OVERFLOW

    def dequeued(self) -> None:
        """A queued request got a connection (or gave up)."""
        self.pending = max(0, self.pending - 1)

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections = max(0, self.connections - 1)

    def may_reuse(self, requests_served: int) -> bool:
        """Whether a connection that served `requests_served` requests takes another."""
        n = self.max_requests_per_connection
        return n <= 0 or requests_served < n

    def start_retry(self) -> bool:
        """Count one retry in flight; False when `maxRetries` concurrent retries run."""
        if self.retries >= self.max_retries:
            return False
        self.retries += 1
        return True

    def end_retry(self) -> None:
        self.retries = max(0, self.retries - 1)


# ----------------------------------------------------------------------------- outliers


@dataclass
class _HostState:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    times_ejected: int = 0
    ejected_until: float | None = None


@dataclass
class OutlierDetector:
    """Passive health checking of a backend's endpoints (keys are `ip:port`).

    An endpoint is ejected when it reaches `consecutive_5xx` 5xx results (connect
    failures, resets and timeouts count) or `consecutive_gateway` 502/503/504
    results in a row, for `base_ejection_time x times ejected`, unless that would
    eject more than `max_ejection_percent` % of the endpoints. `healthy` leaves
    ejected endpoints out, but returns all of them when fewer than
    `min_health_percent` % would remain or none would.
    """

    consecutive_5xx: int | None = 5
    consecutive_gateway: int | None = None
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0
    hosts: dict[str, _HostState] = field(default_factory=dict)
    ejections: int = 0  # total ejections, for metrics
    #: no endpoint is ejected from this time on (loop time): balance over all of them
    clear_from: float = 0.0

    @classmethod
    def from_spec(cls, od: OutlierDetection | None) -> OutlierDetector | None:
        if od is None:
            return None
        c5 = od.consecutive_5xx_errors
        return cls(
            consecutive_5xx=5 if c5 is None else (c5 or None),  # Istio: default 5, 0 = off
            consecutive_gateway=od.consecutive_gateway_errors or None,
            base_ejection_time=od.base_ejection_time,
            max_ejection_percent=od.max_ejection_percent,
            min_health_percent=od.min_health_percent,
        )

    def same_settings(self, other: OutlierDetector) -> bool:
        return (
            self.consecutive_5xx,
            self.consecutive_gateway,
            self.base_ejection_time,
            self.max_ejection_percent,
            self.min_health_percent,
        ) == (
            other.consecutive_5xx,
            other.consecutive_gateway,
            other.base_ejection_time,
            other.max_ejection_percent,
            other.min_health_percent,
        )

    def is_ejected(self, key: str, now: float) -> bool:
        h = self.hosts.get(key)
        return h is not None and h.ejected_until is not None and now < h.ejected_until

    def _ejected_count(self, keys: Iterable[str], now: float) -> int:
        return sum(1 for k in keys if self.is_ejected(k, now))

    def record(self, key: str, result: int | Outcome, now: float, all_keys: Sequence[str]) -> bool:
        """Record one result for endpoint `key` of `all_keys`; True when it got ejected."""
        h = self.hosts.setdefault(key, _HostState())
        if _is_5xx(result):
            h.consecutive_5xx += 1
        else:
            h.consecutive_5xx = 0
        if _is_gateway_error(result):
            h.consecutive_gateway += 1
        else:
            h.consecutive_gateway = 0
        if self.is_ejected(key, now):
            return False
        c5, cg = self.consecutive_5xx, self.consecutive_gateway
        tripped = (c5 is not None and h.consecutive_5xx >= c5) or (
            cg is not None and h.consecutive_gateway >= cg
        )
        if not tripped:
            return False
        total = max(1, len(all_keys))
        ejected = self._ejected_count(all_keys, now)
        if (ejected + 1) * 100 > self.max_ejection_percent * total:
            return False
        h.times_ejected += 1
        h.ejected_until = until = now + self.base_ejection_time * h.times_ejected
        self.clear_from = max(self.clear_from, until)
        h.consecutive_5xx = 0
        h.consecutive_gateway = 0
        self.ejections += 1
        return True

    def healthy(self, keys: Sequence[str], now: float) -> list[int]:
        """Indices of the endpoints (by key) to balance over: the ones not ejected."""
        ok = [i for i, k in enumerate(keys) if not self.is_ejected(k, now)]
        if not ok:
            return list(range(len(keys)))
        if self.min_health_percent and len(ok) * 100 < self.min_health_percent * len(keys):
            return list(range(len(keys)))
        return ok

    def forget_except(self, keys: Iterable[str]) -> None:
        """Drop state of endpoints that left the backend."""
        keep = set(keys)
        for k in [k for k in self.hosts if k not in keep]:
            del self.hosts[k]
