"""The waypoint filter chain: built once per config snapshot, run per request.

Order per request: authorization -> fault (service-level HTTPFault, RateLimit) ->
route match -> rule filters (route/rule-level faults and rate limits, redirect,
request header modifiers, URL rewrite, mirrors) -> per-attempt timeout and retry ->
endpoint selection (outlier detection, load balancer, connection-pool limits).

Public API (what the runtime calls)::

    state = ChainState()                         # keep across snapshots
    chain = build_chain(config, state)           # once per WaypointConfig
    plan = plan_request(chain, request, now, rng)
    if isinstance(plan, LocalResponse):
        answer(plan)                             # 403/404/429/500/503/fault/redirect
        return
    try:
        await sleep(plan.fault_delay)            # HTTPFault delay (0 when none)
        for m in plan.mirrors:                   # fire-and-forget copies, owned by
            spawn(send(m.endpoint, m.request))   # the runtime's TaskGroup
        attempt = plan.first
        while True:
            await sleep(attempt.backoff)
            result = await send(attempt.endpoint, plan.request,
                                timeout=attempt.deadline - now)   # deadline may be None
            # result: the upstream status (int) or Outcome.CONNECT_FAILURE /
            # RESET / TIMEOUT; `rtt` = seconds until the response head
            nxt = plan.after_attempt(attempt, result, now, rng, rtt=rtt)
            if nxt is None:
                break
            attempt = nxt
        if result is an Outcome: answer(plan.failure_response(result))
        else: answer(plan.response(upstream_response))  # response header filters
    finally:
        plan.release(now)                        # always: pool and LB accounting

`request` is a `model.Request`: method, target, authority, headers (lower-case
names), the original destination (`dest_ip`/`dest_port` from the HBONE CONNECT
authority: the service VIP and port) and the client's SPIFFE ID from its peer
certificate. `now` is a monotonic clock in seconds (`loop.time()`), `rng` a
`random.Random` the runtime owns.

`plan.request` is the request to send upstream (path normalized, after header
modifiers and URL rewrite); `plan.flags` carries response flags already known
(`DI` after a fault delay); `plan.backend` names the chosen backend service, and
`plan.route` / `plan.policy` the matched route and the allowing policy for logs.
`Attempt.endpoint` tells where: `endpoint.hbone` -> HBONE to
`endpoint.address:15008` with `:authority endpoint.address:endpoint.port` and peer
identity `endpoint.identity`, else plain TCP to `endpoint.address:endpoint.port`.
Retry only when the request body can be replayed (buffered or empty); otherwise
treat `after_attempt`'s answer as final but still call it (it records the result
for outlier detection and the balancer). `LocalResponse.flags` / `details` are for
metrics (`response_flags`) and the access log.

Connection-pool limits on new upstream connections: `plan.cluster.pool`
(`resilience.PoolLimits`: `connection_verdict`, `connection_opened`, ...).
`port_protocol(chain, vip, port)` gives the service port's declared protocol
(`http`, `http2`, `grpc`, `tcp`, or "" to detect); for TCP traffic use
`plan_tcp(chain, dest_ip=..., dest_port=..., source_ip=..., source_principal=...,
now=..., rng=...)`, which returns the same `RequestPlan` (endpoint, attempts,
release) or a `LocalResponse` meaning "close the connection".

Swapping snapshots: `build_chain(new_config, state)` with the same `ChainState`
keeps balancer, outlier, pool and rate-limit state of unchanged backends; plans in
flight keep using the chain they came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from random import Random

from config.resources import (
    AuthorizationPolicySpec,
    BackendRef,
    DestinationRuleSpec,
    HeaderModifier,
    HTTPRouteSpec,
    RouteRule,
    TrafficPolicy,
)
from waypoint import authz as l7authz
from waypoint import filters as flt
from waypoint.lb import Balancer, PeakEwma, make_balancer
from waypoint.model import (
    LocalResponse,
    Named,
    Request,
    Response,
    UpstreamEndpoint,
    WaypointConfig,
    normalize_path,
    value,
)
from waypoint.resilience import (
    FaultPolicy,
    Outcome,
    OutlierDetector,
    PoolLimits,
    RetryPolicy,
    Timeouts,
    TokenBucket,
)
from waypoint.routes import (
    CompiledMatch,
    RouteTable,
    WeightedChoice,
    build_route_table,
    match_route,
)
from ztunnel import snapshot as zs

__all__ = [
    "LB_ANNOTATION",
    "Attempt",
    "BackendTarget",
    "Chain",
    "ChainState",
    "Cluster",
    "MirrorPlan",
    "RequestPlan",
    "SourcePlan",
    "build_chain",
    "declared_protocol",
    "plan_request",
    "plan_source",
    "plan_tcp",
    "port_protocol",
]

#: DestinationRule annotation selecting a balancer Istio's API has no name for
#: (`PEAK_EWMA`); it overrides `trafficPolicy.loadBalancer.simple`.
LB_ANNOTATION = "ambit.dev/load-balancer"

_DEFAULT_RETRY = RetryPolicy()  # a service without routes: Istio's default retries
_NO_TIMEOUTS = Timeouts()


# ----------------------------------------------------------------------------- clusters


@dataclass(frozen=True, slots=True)
class BackendTarget:
    """A backend service port."""

    namespace: str
    name: str
    port: int
    hostname: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}"


class Cluster:
    """One backend service port: its endpoints, balancer, outlier detector and pool.

    Stateful (in-flight counts, EWMA, ejections, pool counters); kept in
    `ChainState` so the state survives snapshot swaps while the policy is unchanged.
    """

    def __init__(
        self,
        target: BackendTarget,
        endpoints: tuple[UpstreamEndpoint, ...],
        balancer: Balancer,
        outlier: OutlierDetector | None,
        *,
        pool: PoolLimits,
        lb_policy: str = "",
    ) -> None:
        self.target = target
        self.endpoints = endpoints
        self.keys = tuple(e.key for e in endpoints)
        self.balancer = balancer
        self.outlier = outlier
        self.pool = pool
        self.lb_policy = lb_policy

    def pick(
        self, now: float, rng: Random, exclude: Iterable[str] = ()
    ) -> UpstreamEndpoint | None:
        """An endpoint for a new attempt: not ejected, and not in `exclude` if possible."""
        if not self.endpoints:
            return None
        od = self.outlier
        if od is not None and now >= od.clear_from:
            od = None  # nobody is ejected: no healthy list to build
        if od is None and not exclude:
            return self.balancer.pick(self.endpoints, now, rng)
        if od is not None:
            idx = od.healthy(self.keys, now)
            candidates = [self.endpoints[i] for i in idx]
        else:
            candidates = list(self.endpoints)
        ex = set(exclude)
        if ex:
            fresh = [e for e in candidates if e.key not in ex]
            if fresh:
                candidates = fresh
        return self.balancer.pick(candidates, now, rng)

    def started(self, ep: UpstreamEndpoint, now: float) -> None:
        self.balancer.started(ep.key, now)

    def finished(
        self, ep: UpstreamEndpoint, now: float, result: int | Outcome | None, rtt: float | None
    ) -> bool:
        """Record an attempt's end (None result: abandoned); True if `ep` got ejected."""
        self.balancer.finished(ep.key, now, rtt if result is not None else None)
        if self.outlier is not None and result is not None:
            return self.outlier.record(ep.key, result, now, self.keys)
        return False

    def is_ejected(self, ep: UpstreamEndpoint, now: float) -> bool:
        return self.outlier is not None and self.outlier.is_ejected(ep.key, now)


@dataclass
class ChainState:
    """Mutable state that outlives one chain: clusters and rate-limit buckets."""

    clusters: dict[str, Cluster] = field(default_factory=dict)
    buckets: dict[str, tuple[tuple[int, int, float], TokenBucket]] = field(default_factory=dict)
    _used_buckets: set[str] = field(default_factory=set, repr=False)

    def bucket(self, key: str, max_tokens: int, per_fill: int, interval: float) -> TokenBucket:
        """The bucket for `key`, reused while its settings stay the same."""
        self._used_buckets.add(key)
        settings = (max_tokens, per_fill, interval)
        cur = self.buckets.get(key)
        if cur is not None and cur[0] == settings:
            return cur[1]
        b = TokenBucket(max_tokens, per_fill, interval)
        self.buckets[key] = (settings, b)
        return b

    def cluster(
        self,
        target: BackendTarget,
        endpoints: tuple[UpstreamEndpoint, ...],
        lb_policy: str,
        outlier: OutlierDetector | None,
        pool: PoolLimits,
    ) -> Cluster:
        """The cluster for `target`, keeping its state when the policy is unchanged."""
        cur = self.clusters.get(target.key)
        if cur is not None and cur.lb_policy == lb_policy:
            same_od = (cur.outlier is None and outlier is None) or (
                cur.outlier is not None
                and outlier is not None
                and cur.outlier.same_settings(outlier)
            )
            if same_od and cur.pool.same_limits(pool):
                cur.endpoints = endpoints
                cur.keys = tuple(e.key for e in endpoints)
                cur.target = target
                if cur.outlier is not None:
                    cur.outlier.forget_except(cur.keys)
                if isinstance(cur.balancer, PeakEwma):
                    cur.balancer.forget_except(cur.keys)
                return cur
        c = Cluster(target, endpoints, make_balancer(lb_policy), outlier, pool=pool,
                    lb_policy=lb_policy)
        self.clusters[target.key] = c
        return c


# ----------------------------------------------------------------------------- plans


@value
class Attempt:
    """One try of a request: where, when it started and its deadline (absolute)."""

    number: int  # 1 = first try
    endpoint: UpstreamEndpoint
    started: float
    deadline: float | None
    backoff: float = 0.0  # wait this long before sending (retries only)


@dataclass(frozen=True, slots=True)
class MirrorPlan:
    """A copy of the request for a RequestMirror backend (its response is dropped). It
    counts against the mirror backend's `pool` like any request to it (as in Envoy):
    copies beyond its limits are dropped."""

    request: Request
    backend: BackendTarget
    endpoint: UpstreamEndpoint
    pool: PoolLimits


@dataclass(slots=True, eq=False)
class RequestPlan:
    """How to serve one request upstream (see the module docstring for the loop).

    Read-only for its users; its private fields hold the request's accounting (the
    attempt in flight, a retry counted against the pool, released or not), which
    `after_attempt` and `release` update. Not frozen: one is built per request and
    a frozen dataclass of this size costs more to build than the rest of the plan.
    """

    request: Request
    original: Request
    backend: BackendTarget
    cluster: Cluster
    first: Attempt
    retry: RetryPolicy
    timeouts: Timeouts
    started: float  # when the timeouts started: `now` plus any fault delay
    route: str | None = None  # `namespace/name` of the matched HTTPRoute
    rule_index: int | None = None
    fault_delay: float = 0.0
    flags: str = ""
    mirrors: tuple[MirrorPlan, ...] = ()
    response_modifiers: tuple[HeaderModifier, ...] = ()
    policy: str | None = None  # the AuthorizationPolicy that allowed it, if any
    _in_flight: Attempt | None = field(default=None, repr=False)
    _retry_in_flight: bool = field(default=False, repr=False)
    _released: bool = field(default=False, repr=False)
    _counted: bool = field(default=True, repr=False)  # holds one of the pool's max requests

    def after_attempt(
        self,
        attempt: Attempt,
        result: int | Outcome,
        now: float,
        rng: Random,
        *,
        rtt: float | None = None,
    ) -> Attempt | None:
        """Record how `attempt` ended; the next attempt (a retry) or None to stop."""
        if self._in_flight is attempt:
            self._in_flight = None
            self.cluster.finished(attempt.endpoint, now, result, rtt)
            if self._retry_in_flight:
                self.cluster.pool.end_retry()
                self._retry_in_flight = False
        if self._released:
            return None
        if not self.retry.retriable(result):
            return None  # what decide() would answer, without working out the deadline
        d = self.retry.decide(
            attempt.number, result, now, self.timeouts.request_deadline(self.started), rng
        )
        if not d.retry:
            return None
        ep = self.cluster.pick(now + d.backoff, rng, exclude=(attempt.endpoint.key,))
        if ep is None or not self.cluster.pool.start_retry():
            return None
        self._retry_in_flight = True
        nxt = Attempt(
            attempt.number + 1,
            ep,
            now + d.backoff,
            self.timeouts.attempt_deadline(self.started, now + d.backoff),
            d.backoff,
        )
        self.cluster.started(ep, now + d.backoff)
        self._in_flight = nxt
        return nxt

    def response(self, response: Response) -> Response:
        """The upstream response with ResponseHeaderModifier filters applied."""
        if not self.response_modifiers:
            return response  # nothing to change (Response is immutable)
        headers = response.headers
        for m in self.response_modifiers:
            headers = flt.modify_headers(headers, m)
        return Response(response.status, headers)

    def failure_response(self, outcome: Outcome) -> LocalResponse:
        """What the client gets when the last attempt failed without a response."""
        if outcome is Outcome.TIMEOUT:
            body = b"upstream request timeout"
        else:
            body = (
                b"upstream connect error or disconnect/reset before headers. reset reason: "
                + outcome.value.encode()
            )
        return LocalResponse(
            outcome.status,
            body,
            (("content-type", "text/plain"),),
            flags=outcome.flag,
            details=f"{outcome.value} to {self.backend.key}",
        )

    def release(self, now: float) -> None:
        """End the request's accounting (idempotent); call it in a `finally`."""
        if self._released:
            return
        self._released = True
        in_flight = self._in_flight
        if in_flight is not None:
            self.cluster.finished(in_flight.endpoint, now, None, None)
            self._in_flight = None
        if self._retry_in_flight:
            self.cluster.pool.end_retry()
            self._retry_in_flight = False
        if self._counted:
            self.cluster.pool.end_request()


# ----------------------------------------------------------------------------- chain


@dataclass(frozen=True, slots=True)
class _RateLimit:
    name: str
    bucket: TokenBucket
    status: int


@dataclass(frozen=True, slots=True)
class _Guards:
    """Faults and rate limits at one level (service, route or rule)."""

    faults: tuple[FaultPolicy, ...] = ()
    rate_limits: tuple[_RateLimit, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.faults or self.rate_limits)


@dataclass(frozen=True, slots=True)
class _RulePlan:
    backends: tuple[tuple[BackendRef, Cluster | None], ...]
    refs: tuple[BackendRef, ...]
    guards: _Guards
    filters: tuple[tuple[str, object], ...]  # (type, payload) in listed order
    mirrors: tuple[tuple[Cluster, float], ...]
    response_modifiers: tuple[HeaderModifier, ...]
    retry: RetryPolicy
    timeouts: Timeouts
    #: the weighted pick over `refs`, prepared (its index points into `backends`)
    choice: WeightedChoice = field(init=False, repr=False, compare=False)
    #: route or rule faults / rate limits to run
    guarded: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "choice", WeightedChoice(self.refs))
        object.__setattr__(self, "guarded", self.guards.active)


@dataclass(frozen=True, slots=True)
class _ServiceChain:
    service: zs.Service
    port: int
    policies: tuple[Named[AuthorizationPolicySpec], ...]
    guards: _Guards
    table: RouteTable
    rules: Mapping[tuple[str, int], _RulePlan]
    default: Cluster
    #: service-level faults / rate limits to run
    guarded: bool = field(init=False, repr=False, compare=False)
    #: no HTTPRoute attaches
    unrouted: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "guarded", self.guards.active)
        object.__setattr__(self, "unrouted", self.table.empty)


@dataclass(frozen=True)
class Chain:
    """The immutable per-snapshot plan; `plan_request` runs it."""

    config: WaypointConfig
    state: ChainState
    services: Mapping[tuple[str, str, int], _ServiceChain]
    gateway_policies: tuple[Named[AuthorizationPolicySpec], ...]
    #: (VIP, port) -> what `services` holds for the service owning that VIP, on that
    #: port: the lookup `plan_request` would do from a request's original destination
    by_destination: Mapping[tuple[str, int], _ServiceChain] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def version(self) -> int:
        return self.config.snapshot.version


def _dr_for(config: WaypointConfig, svc: zs.Service) -> Named[DestinationRuleSpec] | None:
    """The DestinationRule for `svc`: waypoint's namespace, service's, then root."""
    host = svc.hostname or f"{svc.name}.{svc.namespace}.svc.{config.snapshot.dns_domain}"
    order = [config.gateway_namespace, svc.namespace, config.snapshot.root_namespace]
    best: tuple[int, int, Named[DestinationRuleSpec]] | None = None
    for dr in config.destination_rules:
        if dr.spec.workload_selector is not None or dr.namespace not in order:
            continue
        h = dr.spec.host.lower()
        if "." not in h:
            h = f"{h}.{dr.namespace}.svc.{config.snapshot.dns_domain}"
        elif h.count(".") == 1:
            h = f"{h}.svc.{config.snapshot.dns_domain}"
        if h == host:
            spec_rank = 0
        elif h.startswith("*") and host.endswith(h[1:]):
            spec_rank = 1
        else:
            continue
        cand = (order.index(dr.namespace), spec_rank, dr)
        if best is None or cand[:2] < best[:2]:
            best = cand
    return best[2] if best is not None else None


def _make_cluster(
    config: WaypointConfig, state: ChainState, svc: zs.Service, port: int
) -> Cluster:
    dr = _dr_for(config, svc)
    tp = dr.spec.traffic_policy if dr is not None else None
    tp = tp or TrafficPolicy()
    lb = tp.load_balancer
    if dr is not None and dr.annotations.get(LB_ANNOTATION):
        lb = dr.annotations[LB_ANNOTATION]
    target = BackendTarget(svc.namespace, svc.name, port, svc.hostname)
    return state.cluster(
        target,
        config.endpoints(svc, port),
        lb.upper(),
        OutlierDetector.from_spec(tp.outlier_detection),
        PoolLimits.from_spec(tp.connection_pool),
    )


def _guards(
    config: WaypointConfig,
    state: ChainState,
    *,
    kind: str,
    namespace: str,
    name: str,
    refs: Iterable[tuple[str, str]] = (),
) -> _Guards:
    """Faults and rate limits targeting `kind namespace/name`, plus explicit refs."""
    faults: list[FaultPolicy] = []
    limits: list[_RateLimit] = []
    wanted = set(refs)
    for f in config.faults:
        hit = (("HTTPFault", f.name) in wanted and f.namespace == namespace) or any(
            t.kind == kind and t.name == name and f.namespace == namespace
            for t in f.spec.target_refs
        )
        if hit:
            faults.append(FaultPolicy.from_spec(f.key, f.spec))
    for r in config.rate_limits:
        hit = (("RateLimit", r.name) in wanted and r.namespace == namespace) or any(
            t.kind == kind and t.name == name and r.namespace == namespace
            for t in r.spec.target_refs
        )
        if hit:
            scope = f"{kind}/{namespace}/{name}"
            b = state.bucket(
                f"{r.key}@{scope}", r.spec.max_tokens, r.spec.tokens_per_fill, r.spec.fill_interval
            )
            limits.append(_RateLimit(r.key, b, r.spec.status_code))
    return _Guards(tuple(faults), tuple(limits))


def _rule_plan(
    config: WaypointConfig,
    state: ChainState,
    route: Named[HTTPRouteSpec],
    *,
    ri: int,
    rule: RouteRule,
    clusters: dict[tuple[str, str, int], Cluster],
) -> _RulePlan:
    def cluster_for(ref: BackendRef, default_port: int) -> Cluster | None:
        svc = config.service(ref.namespace, ref.name)
        if svc is None:
            return None
        port = ref.port or default_port
        key = (svc.namespace, svc.name, port)
        c = clusters.get(key)
        if c is None:
            c = _make_cluster(config, state, svc, port)
            clusters[key] = c
        return c

    backends = tuple((b, cluster_for(b, 0)) for b in rule.backend_refs)
    filters: list[tuple[str, object]] = []
    mirrors: list[tuple[Cluster, float]] = []
    response_mods: list[HeaderModifier] = []
    ext_refs: list[tuple[str, str]] = []
    for f in rule.filters:
        if f.type == "RequestHeaderModifier" and f.request_header_modifier is not None:
            filters.append((f.type, f.request_header_modifier))
        elif f.type == "ResponseHeaderModifier" and f.response_header_modifier is not None:
            response_mods.append(f.response_header_modifier)
        elif f.type == "RequestRedirect" and f.redirect is not None:
            filters.append((f.type, f.redirect))
        elif f.type == "URLRewrite" and f.url_rewrite is not None:
            filters.append((f.type, f.url_rewrite))
        elif f.type == "RequestMirror" and f.mirror is not None:
            mc = cluster_for(f.mirror, 0)
            if mc is not None:
                mirrors.append((mc, f.mirror_percent))
        elif f.type == "ExtensionRef" and f.extension_ref is not None:
            ext_refs.append((f.extension_ref.kind, f.extension_ref.name))
    route_level = _guards(config, state, kind="HTTPRoute", namespace=route.namespace,
                          name=route.name)
    rule_level = _guards(config, state, kind="", namespace=route.namespace,
                         name=f"{route.name}#{ri}", refs=ext_refs)
    guards = _Guards(
        route_level.faults + rule_level.faults, route_level.rate_limits + rule_level.rate_limits
    )
    return _RulePlan(
        backends=backends,
        refs=tuple(b for b, _c in backends),
        guards=guards,
        filters=tuple(filters),
        mirrors=tuple(mirrors),
        response_modifiers=tuple(response_mods),
        retry=RetryPolicy.from_spec(rule.retry),
        timeouts=Timeouts(rule.request_timeout, rule.backend_request_timeout),
    )


def build_chain(config: WaypointConfig, state: ChainState | None = None) -> Chain:
    """Compile `config` into a chain; pass the previous chain's `state` to keep it."""
    state = state if state is not None else ChainState()
    state._used_buckets.clear()
    gw = (config.gateway_namespace, config.gateway_name)
    root = config.snapshot.root_namespace
    clusters: dict[tuple[str, str, int], Cluster] = {}
    services: dict[tuple[str, str, int], _ServiceChain] = {}
    by_parent: dict[tuple[str, str], list[Named[HTTPRouteSpec]]] = {}
    for r in config.routes:
        for parent in {(p.namespace, p.name) for p in r.spec.parent_refs if p.kind == "Service"}:
            by_parent.setdefault(parent, []).append(r)
    for svc in config.snapshot.services:
        attached = by_parent.get((svc.namespace, svc.name), [])
        for sp in svc.ports:
            port = sp.port
            table = build_route_table(attached, svc.namespace, svc.name, port, sp.name)
            rules: dict[tuple[str, int], _RulePlan] = {}
            for ms in (table.producer, *(m for _ns, m in table.consumers)):
                for m in ms:
                    k = (m.route_key, m.rule_index)
                    if k not in rules:
                        rules[k] = _rule_plan(config, state, m.route, ri=m.rule_index,
                                              rule=m.rule, clusters=clusters)
            key = (svc.namespace, svc.name, port)
            default = clusters.get(key)
            if default is None:
                default = _make_cluster(config, state, svc, port)
                clusters[key] = default
            services[key] = _ServiceChain(
                service=svc,
                port=port,
                policies=l7authz.applicable_policies(
                    config.policies, gateway=gw, service=(svc.namespace, svc.name),
                    root_namespace=root,
                ),
                guards=_guards(config, state, kind="Service", namespace=svc.namespace,
                               name=svc.name),
                table=table,
                rules=rules,
                default=default,
            )
    # drop state of backends that are gone
    live = {c.target.key for c in clusters.values()}
    for gone in [ck for ck in state.clusters if ck not in live]:
        del state.clusters[gone]
    for gone in [bk for bk in state.buckets if bk not in state._used_buckets]:
        del state.buckets[gone]
    gateway_policies = l7authz.applicable_policies(
        config.policies, gateway=gw, service=None, root_namespace=root
    )
    by_destination: dict[tuple[str, int], _ServiceChain] = {}
    snap = config.snapshot
    for svc in snap.services:
        for vip in svc.vips:
            owner = snap.service_by_vip(vip)
            if owner is None:
                continue
            for sp in owner.ports:
                sc = services.get((owner.namespace, owner.name, sp.port))
                if sc is not None:
                    by_destination[(vip, sp.port)] = sc
    return Chain(config, state, services, gateway_policies, by_destination)


# ----------------------------------------------------------------------------- protocol

_APP_PROTOCOLS = {
    "http": "http",
    "http2": "http2",
    "grpc": "grpc",
    "grpc-web": "http",
    "tcp": "tcp",
    "kubernetes.io/h2c": "http2",
    "kubernetes.io/ws": "http",
    "kubernetes.io/wss": "tcp",
    "https": "tcp",
    "tls": "tcp",
}


def declared_protocol(port: zs.ServicePort) -> str:
    """`http`, `http2`, `grpc`, `tcp`, or "" (undeclared) for a service port.

    `appProtocol` first, else the port name (`http`, `http-web`, `grpc-api`...), as
    Istio reads them. Encrypted protocols (https, tls) are proxied as TCP.
    """
    ap = port.app_protocol.lower()
    if ap:
        return _APP_PROTOCOLS.get(ap, "tcp")
    prefix = port.name.lower().split("-", 1)[0]
    return _APP_PROTOCOLS.get(prefix, "")


def port_protocol(chain: Chain, dest_ip: str, dest_port: int) -> str:
    """The declared protocol of the service port a client dialled (VIP, port).

    "" when the port declares none or the destination is not a service port: the
    runtime then detects HTTP (request line or HTTP/2 preface) or proxies TCP.
    """
    svc = chain.config.snapshot.service_by_vip(dest_ip)
    if svc is None:
        return ""
    sp = svc.port(dest_port)
    return declared_protocol(sp) if sp is not None else ""


# ----------------------------------------------------------------------------- per request


def _local(status: int, flags: str, details: str, body: bytes = b"") -> LocalResponse:
    """A local answer; `details` (for the access log) stays out of the body."""
    return LocalResponse(
        status,
        body,
        (("content-type", "text/plain"),),
        flags=flags,
        details=details,
    )


def _run_guards(
    guards: _Guards, now: float, rng: Random
) -> tuple[LocalResponse | None, float]:
    """Rate limits then faults: a local answer, or the delay to add."""
    for rl in guards.rate_limits:
        if not rl.bucket.take(now):
            after = max(1, round(rl.bucket.retry_after(now) + 0.5))
            return (
                LocalResponse(
                    rl.status,
                    b"local_rate_limited",
                    (("content-type", "text/plain"), ("retry-after", str(after))),
                    flags="RL",
                    details=f"rate limited by RateLimit {rl.name}",
                ),
                0.0,
            )
    delay = 0.0
    for fp in guards.faults:
        d = fp.decide(rng)
        delay += d.delay
        if d.abort is not None:
            return fp.abort_response(d.abort), delay
    return None, delay


def _workload_plan(
    chain: Chain, request: Request, now: float, rng: Random, *, tcp: bool = False
) -> RequestPlan | LocalResponse:
    """Traffic addressed to a workload IP (waypoint-for workload): no routes."""
    snap = chain.config.snapshot
    w = snap.workload_by_ip(request.dest_ip) if request.dest_ip else None
    if w is None:
        return _local(
            404,
            "NR",
            f"no service or workload at {request.dest_ip}:{request.dest_port} "
            f"(host {request.authority!r}) in configuration version {snap.version}",
        )
    dec = l7authz.authorize(chain.gateway_policies, request, tcp=tcp)
    if not dec.allowed:
        return l7authz.denied_response(dec)
    ep = UpstreamEndpoint(w.uid, w.ip, request.dest_port, w.identity, w.enrolled, w.weight)
    target = BackendTarget(w.namespace, w.name, request.dest_port)
    cluster = chain.state.cluster(target, (ep,), "ROUND_ROBIN", None, PoolLimits())
    return _start(request, request, cluster, now, rng, retry=RetryPolicy(), timeouts=Timeouts(),
                  policy=dec.policy, tcp=tcp)


def _start(
    original: Request,
    request: Request,
    cluster: Cluster,
    now: float,
    rng: Random,
    *,
    retry: RetryPolicy,
    timeouts: Timeouts,
    route: str | None = None,
    rule_index: int | None = None,
    delay: float = 0.0,
    mirrors: tuple[MirrorPlan, ...] = (),
    response_modifiers: tuple[HeaderModifier, ...] = (),
    policy: str | None = None,
    tcp: bool = False,
) -> RequestPlan | LocalResponse:
    """Endpoint, pool admission and the first attempt (to `cluster.target`). A TCP
    connection is not a request: `http2MaxRequests` does not count it (as in Istio)."""
    ep = cluster.pick(now + delay, rng)
    if ep is None:
        return _local(503, "UH", f"no healthy upstream for {cluster.target.key}",
                      b"no healthy upstream")
    overflow = None if tcp else cluster.pool.start_request()
    if overflow is not None:
        return LocalResponse(overflow.status, overflow.body, overflow.headers, overflow.flags,
                             f"{overflow.details} for {cluster.target.key}")
    begin = now + delay  # timeouts run from the end of a fault delay, as in Envoy
    first = Attempt(1, ep, begin, timeouts.attempt_deadline(begin, begin))
    cluster.started(ep, begin)
    # positional: RequestPlan's fields in order (keywords cost more than the rest)
    return RequestPlan(
        request, original, cluster.target, cluster, first, retry, timeouts, begin, route,
        rule_index, delay, "DI" if delay > 0 else "", mirrors, response_modifiers, policy,
        first, False, False, not tcp,
    )


def _service_chain(
    chain: Chain, request: Request
) -> tuple[_ServiceChain, Request] | LocalResponse | None:
    """The service port a request is for (None: not a service), the request with its
    port filled in when the client gave none and the service has one port."""
    svc = chain.config.service_for(request)
    if svc is None:
        return None
    port = request.dest_port
    if svc.port(port) is None:
        if len(svc.ports) == 1 and not port:
            port = svc.ports[0].port
        else:
            return _local(
                404, "NR", f"service {svc.key} has no port {request.dest_port}: "
                f"it serves {', '.join(str(p.port) for p in svc.ports) or 'no ports'}"
            )
    sc = chain.services[(svc.namespace, svc.name, port)]
    if request.dest_port != port:
        request = request.with_(dest_port=port)
    return sc, request


def plan_request(
    chain: Chain, request: Request, now: float, rng: Random
) -> RequestPlan | LocalResponse:
    """Run the chain for one request: a plan to send it upstream, or a local answer.

    The path is normalized first (`model.normalize_path`); the upstream gets the
    normalized path, as Envoy forwards it.
    """
    raw = request.path
    if "%" in raw or "/." in raw:
        normalized = normalize_path(raw)
        if normalized != raw:
            request = request.with_(path=normalized)
    # a service VIP and one of its ports (the usual case): straight to its chain
    sc = chain.by_destination.get((request.dest_ip, request.dest_port)) if request.dest_ip else None
    if sc is None:
        found = _service_chain(chain, request)
        if found is None:
            return _workload_plan(chain, request, now, rng)
        if isinstance(found, LocalResponse):
            return found
        sc, request = found
    original = request

    # 1. authorization
    policy: str | None = None
    if sc.policies:
        dec = l7authz.authorize(sc.policies, request)
        if not dec.allowed:
            return l7authz.denied_response(dec)
        policy = dec.policy

    # 2. service-level rate limits and faults
    delay = 0.0
    if sc.guarded:
        answer, delay = _run_guards(sc.guards, now, rng)
        if answer is not None:
            return answer

    # 3. route match
    if sc.unrouted:
        return _start(original, request, sc.default, now, rng, retry=_DEFAULT_RETRY,
                      timeouts=_NO_TIMEOUTS, delay=delay, policy=policy)
    m: CompiledMatch | None = match_route(sc.table, request)
    if m is None:
        return _local(404, "NR", f"no HTTPRoute rule of {sc.service.key}:{sc.port} matches "
                      f"{request.method} {request.path_only}")
    route_key = m.route_key
    rp = sc.rules[(route_key, m.rule_index)]

    # 4. route/rule-level limits and faults, then filters in listed order
    if rp.guarded:
        answer, more = _run_guards(rp.guards, now, rng)
        delay += more
        if answer is not None:
            return answer
    if rp.filters:
        prefix = m.path_value if m.path_type == "PathPrefix" else None
        for typ, payload in rp.filters:
            if typ == "RequestHeaderModifier":
                assert isinstance(payload, HeaderModifier)
                request = request.with_(headers=flt.modify_headers(request.headers, payload))
            elif typ == "RequestRedirect":
                assert isinstance(payload, Mapping)
                return flt.redirect(payload, request, prefix)
            elif typ == "URLRewrite":
                assert isinstance(payload, Mapping)
                request = flt.rewrite(payload, request, prefix)

    # 5. weighted backend
    if not rp.backends:
        return _local(500, "NR", f"HTTPRoute {route_key} rule {m.rule_index} has no "
                      "backendRefs: add one, or a RequestRedirect filter")
    i = rp.choice.pick(rng)
    if i < 0:
        return _local(500, "NR", f"HTTPRoute {route_key} rule {m.rule_index}: every "
                      "backendRef has weight 0")
    ref, cluster = rp.backends[i]
    if cluster is None:
        return _local(500, "NR", f"HTTPRoute {route_key} backend {ref.namespace}/{ref.name} "
                      "is not a known Service: check backendRefs")
    mirrors: tuple[MirrorPlan, ...] = ()
    if rp.mirrors:
        wanted: list[MirrorPlan] = []
        for mc, pct in rp.mirrors:
            if flt.mirror_wanted(pct, rng):
                mep = mc.pick(now, rng)
                if mep is not None:
                    wanted.append(MirrorPlan(request, mc.target, mep, mc.pool))
        mirrors = tuple(wanted)

    # 6. retry/timeout and endpoint selection
    return _start(original, request, cluster, now, rng, retry=rp.retry, timeouts=rp.timeouts,
                  route=route_key, rule_index=m.rule_index, delay=delay, mirrors=mirrors,
                  response_modifiers=rp.response_modifiers, policy=policy)


#: TCP: only connect failures are retried (a connection cannot be replayed)
_TCP_RETRY = RetryPolicy(attempts=2, codes=frozenset())


def plan_tcp(
    chain: Chain,
    *,
    dest_ip: str,
    dest_port: int,
    source_ip: str,
    source_principal: str | None,
    now: float,
    rng: Random,
) -> RequestPlan | LocalResponse:
    """A plan for a TCP connection through the waypoint (a port that is not HTTP).

    Authorization runs with TCP semantics (`authz.authorize(..., tcp=True)`); no
    routes, faults or rate limits apply; the endpoint comes from the service's
    balancer, outlier detector and pool like HTTP traffic. A `LocalResponse` means:
    close the connection (its status says why: 403 denied, 404 unknown
    destination, 503 no endpoint). The pool's connection limits apply when the
    connection to the endpoint opens (`Upstreams.reserve`). Retry (`after_attempt`)
    only connect failures. Release the plan when the connection ends.
    """
    request = Request("", "", "", (), "tcp", dest_ip, dest_port, source_ip, source_principal)
    svc = chain.config.snapshot.service_by_vip(dest_ip)
    if svc is None:
        return _workload_plan(chain, request, now, rng, tcp=True)
    sc = chain.services.get((svc.namespace, svc.name, dest_port))
    if sc is None:
        return _local(404, "NR", f"service {svc.key} has no port {dest_port}")
    dec = l7authz.authorize(sc.policies, request, tcp=True)
    if not dec.allowed:
        return l7authz.denied_response(dec)
    return _start(request, request, sc.default, now, rng, retry=_TCP_RETRY, timeouts=Timeouts(),
                  policy=dec.policy, tcp=True)


# ----------------------------------------------------------------------------- source


@dataclass(frozen=True)
class SourcePlan:
    """Which source address a tunnelled connection is judged by (ipBlocks, telemetry).

    `ignored` is the `forwarded: for=` address when it was not trusted (None when it
    was used or absent); `reason` says why: `unknown_workload` or
    `identity_mismatch`.
    """

    ip: str
    ignored: str | None = None
    reason: str = ""


def forwarded_ip(forwarded_for: str) -> str:
    """The address of a `forwarded: for=` value (`ip`, `ip:port`, `[v6]`, `[v6]:port`)."""
    fwd = forwarded_for.strip().strip('"')
    if fwd.startswith("["):
        end = fwd.find("]")
        return fwd[1:end] if end > 0 else fwd[1:]
    host, sep, port = fwd.rpartition(":")
    return host if sep and port.isdigit() and host.count(":") == 0 else fwd


def plan_source(snapshot: zs.Snapshot, *, forwarded_for: str | None, peer_ip: str,
                peer_identity: str) -> SourcePlan:
    """Trust `forwarded: for=` only when the authenticated peer speaks for that address.

    In ambient mode the HBONE client is the source workload's ztunnel presenting the
    source workload's certificate, so the claim holds when the workload that owns the
    forwarded address in the snapshot has exactly the peer's identity. Anything else
    (an address the snapshot does not know, or one owned by another identity) could
    be forged by the client: the TCP peer address is used instead.
    """
    if not forwarded_for:
        return SourcePlan(peer_ip)
    ip = forwarded_ip(forwarded_for)
    if ip == peer_ip:
        return SourcePlan(ip)
    w = snapshot.workload_by_ip(ip)
    if w is None:
        return SourcePlan(peer_ip, ip, "unknown_workload")
    if w.identity != peer_identity:
        return SourcePlan(peer_ip, ip, "identity_mismatch")
    return SourcePlan(ip)
