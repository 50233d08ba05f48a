"""The per-snapshot filter chain end to end: order, retries, timeouts, faults, limits, pools."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import yaml

from config.resources import Resource, parse_resource
from config.snapshot import MeshIndex, compute_snapshot
from tests.unit.test_waypoint_routes import NODE, _base, build, exact, prefix, req, route, rule
from waypoint.chain import (
    LB_ANNOTATION,
    ChainState,
    RequestPlan,
    build_chain,
    declared_protocol,
    plan_request,
    port_protocol,
)
from waypoint.lb import PeakEwma, RoundRobin
from waypoint.model import LocalResponse, Response, WaypointConfig
from waypoint.resilience import Outcome
from ztunnel import snapshot as zs


def plan(
    chain: Any, path: str = "/", seed: int = 1, now: float = 0.0, **kw: Any
) -> RequestPlan | LocalResponse:
    return plan_request(chain, req(path, **kw), now, random.Random(seed))


def fault(
    spec: dict[str, Any], name: str = "f", target: dict[str, str] | None = None
) -> dict[str, Any]:
    body = {**spec}
    if target is not None:
        body["targetRefs"] = [target]
    return {
        "apiVersion": "ambit.dev/v1alpha1",
        "kind": "HTTPFault",
        "metadata": {"name": name, "namespace": "app"},
        "spec": body,
    }


def ratelimit(
    max_tokens: int, interval: str, target: dict[str, str] | None = None, name: str = "rl"
) -> dict[str, Any]:
    spec: dict[str, Any] = {"tokenBucket": {"maxTokens": max_tokens, "fillInterval": interval}}
    if target is not None:
        spec["targetRefs"] = [target]
    return {
        "apiVersion": "ambit.dev/v1alpha1",
        "kind": "RateLimit",
        "metadata": {"name": name, "namespace": "app"},
        "spec": spec,
    }


def dr(
    policy: dict[str, Any], host: str = "front", annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    md: dict[str, Any] = {"name": f"dr-{host}", "namespace": "app"}
    if annotations:
        md["annotations"] = annotations
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": md,
        "spec": {"host": host, "trafficPolicy": policy},
    }


SVC = {"group": "", "kind": "Service", "name": "front"}


# ----------------------------------------------------------------------------- basics


def test_plan_names_backend_endpoint_and_hbone_details() -> None:
    p = plan(build([]))
    assert isinstance(p, RequestPlan)
    assert p.backend.key == "app/front:80"
    ep = p.first.endpoint
    assert ep.address in ("10.0.0.10", "10.0.0.11") and ep.port == 8080
    assert ep.hbone and ep.identity == "spiffe://cluster.local/ns/app/sa/front"
    assert p.first.number == 1 and p.first.deadline is None
    assert p.fault_delay == 0.0 and p.flags == ""
    p.release(0.0)
    p.release(0.0)  # idempotent
    assert p.cluster.pool.active == 0


def test_service_without_endpoints_is_503_uh() -> None:
    extra = yaml.safe_load("""
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: app}
spec: {selector: {app: nobody}, clusterIP: 10.96.1.1, ports: [{port: 80}]}
""")
    p = plan(build([extra]), vip="10.96.1.1")
    assert isinstance(p, LocalResponse) and (p.status, p.flags) == (503, "UH")


def test_unknown_service_port_is_404() -> None:
    p = plan(build([]), port=81)
    assert isinstance(p, LocalResponse) and p.status == 404 and "no port 81" in p.details


def test_workload_addressed_traffic_goes_to_that_workload() -> None:
    p = plan(build([]), vip="10.0.1.10", port=9000)  # workload a-0
    assert isinstance(p, RequestPlan)
    assert (p.first.endpoint.address, p.first.endpoint.port) == ("10.0.1.10", 9000)
    p.release(0.0)


# ----------------------------------------------------------------------------- order


def test_authorization_runs_before_fault() -> None:
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "app"},
        "spec": {"targetRefs": [SVC], "action": "DENY", "rules": [{}]},
    }
    c = build([deny, fault({"abort": {"httpStatus": 500}}, target=SVC)])
    p = plan(c)
    assert isinstance(p, LocalResponse) and p.status == 403


def test_service_fault_runs_before_route_match() -> None:
    c = build(
        [route([rule("a", prefix("/only"))]), fault({"abort": {"httpStatus": 418}}, target=SVC)]
    )
    p = plan(c, "/unmatched")
    assert isinstance(p, LocalResponse) and (p.status, p.flags) == (418, "FI")


def test_abort_fifty_percent_gives_about_half_503() -> None:
    c = build([fault({"abort": {"httpStatus": 503, "percentage": 50}}, target=SVC)])
    rng = random.Random(77)
    statuses: Counter[int] = Counter()
    for _ in range(2000):
        p = plan_request(c, req("/"), 0.0, rng)
        if isinstance(p, LocalResponse):
            statuses[p.status] += 1
        else:
            statuses[200] += 1
            p.release(0.0)
    assert abs(statuses[503] / 20 - 50) <= 5


def test_fault_delay_is_planned_and_flagged() -> None:
    c = build([fault({"delay": {"fixedDelay": "1500ms"}}, target=SVC)])
    p = plan(c, now=10.0)
    assert isinstance(p, RequestPlan)
    assert p.fault_delay == 1.5 and p.flags == "DI"
    assert p.first.started == 11.5
    p.release(11.5)


def test_extension_ref_fault_on_one_rule_only() -> None:
    rules = [
        {
            "matches": [prefix("/slow")],
            "filters": [
                {
                    "type": "ExtensionRef",
                    "extensionRef": {"group": "ambit.dev", "kind": "HTTPFault", "name": "f"},
                }
            ],
            "backendRefs": [{"name": "a", "port": 80}],
        },
        rule("b"),
    ]
    c = build([route(rules), fault({"abort": {"httpStatus": 502}})])
    p = plan(c, "/slow/x")
    assert isinstance(p, LocalResponse) and p.status == 502
    q = plan(c, "/fast")
    assert isinstance(q, RequestPlan) and q.backend.name == "b"
    q.release(0.0)


# ----------------------------------------------------------------------------- rate limit


def test_route_rate_limit_429_then_refill() -> None:
    c = build(
        [
            route([rule("a")], name="r"),
            ratelimit(
                3, "1s", {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}
            ),
        ]
    )
    got = []
    for _ in range(4):
        p = plan(c, now=0.0)
        got.append(p.status if isinstance(p, LocalResponse) else 200)
        if isinstance(p, RequestPlan):
            p.release(0.0)
    assert got == [200, 200, 200, 429]
    limited = plan(c, now=0.5)
    assert isinstance(limited, LocalResponse) and limited.flags == "RL"
    assert dict(limited.headers)["retry-after"] == "1"
    ok = plan(c, now=1.0)
    assert isinstance(ok, RequestPlan)
    ok.release(1.0)


def test_rate_limit_state_survives_a_rebuild_with_the_same_settings() -> None:
    docs = [parse_resource(d) for d in [*_base(("a",)), ratelimit(2, "10s", SVC)]]
    snap = compute_snapshot(docs, NODE, waypoint_addresses={("app", "wp"): "10.0.0.250"})
    state = ChainState()
    c1 = build_chain(WaypointConfig.from_resources(snap, docs, gateway=("app", "wp")), state)
    for _ in range(2):
        p = plan(c1)
        assert isinstance(p, RequestPlan)
        p.release(0.0)
    c2 = build_chain(WaypointConfig.from_resources(snap, docs, gateway=("app", "wp")), state)
    p = plan(c2, now=1.0)
    assert isinstance(p, LocalResponse) and p.status == 429


# ----------------------------------------------------------------------------- retries, timeouts


def test_retry_turns_a_first_503_into_success_on_another_endpoint() -> None:
    rules = [
        {
            "backendRefs": [{"name": "front", "port": 80}],
            "retry": {"attempts": 2, "codes": [503], "backoff": "100ms"},
        }
    ]
    c = build([route(rules)])
    rng = random.Random(3)
    p = plan_request(c, req("/"), 0.0, rng)
    assert isinstance(p, RequestPlan)
    a1 = p.first
    a2 = p.after_attempt(a1, 503, 0.05, rng, rtt=0.05)
    assert a2 is not None and a2.number == 2
    assert a2.endpoint.key != a1.endpoint.key  # the other endpoint
    assert 0.0 <= a2.backoff <= 0.1 and a2.started == 0.05 + a2.backoff
    assert p.after_attempt(a2, 200, 0.2, rng, rtt=0.01) is None
    p.release(0.2)
    assert p.cluster.pool.active == 0 and p.cluster.pool.retries == 0


def test_retries_stop_after_attempts() -> None:
    rules = [
        {"backendRefs": [{"name": "front", "port": 80}], "retry": {"attempts": 1, "codes": [503]}}
    ]
    c = build([route(rules)])
    rng = random.Random(3)
    p = plan_request(c, req("/"), 0.0, rng)
    assert isinstance(p, RequestPlan)
    a2 = p.after_attempt(p.first, 503, 0.0, rng)
    assert a2 is not None
    assert p.after_attempt(a2, 503, 0.1, rng) is None
    p.release(0.1)


def test_backend_timeout_bounds_each_attempt_and_504_when_final() -> None:
    rules = [
        {
            "backendRefs": [{"name": "front", "port": 80}],
            "timeouts": {"request": "3s", "backendRequest": "1s"},
            "retry": {"attempts": 5, "codes": [504], "backoff": "0s"},
        }
    ]
    c = build([route(rules)])
    rng = random.Random(1)
    p = plan_request(c, req("/"), 100.0, rng)
    assert isinstance(p, RequestPlan)
    a = p.first
    assert a.deadline == 101.0
    deadlines: list[float | None] = [a.deadline]
    while True:
        assert a.deadline is not None
        nxt = p.after_attempt(a, Outcome.TIMEOUT, a.deadline, rng)
        if nxt is None:
            break
        a = nxt
        deadlines.append(a.deadline)
    assert deadlines == [101.0, 102.0, 103.0]  # the request timeout caps the retries
    final = p.failure_response(Outcome.TIMEOUT)
    assert (final.status, final.flags) == (504, "UT")
    p.release(103.0)


def test_default_route_retries_connect_failures() -> None:
    p = plan(build([]))
    assert isinstance(p, RequestPlan)
    nxt = p.after_attempt(p.first, Outcome.CONNECT_FAILURE, 0.01, random.Random(1))
    assert nxt is not None and nxt.endpoint.key != p.first.endpoint.key
    assert p.failure_response(Outcome.CONNECT_FAILURE).flags == "UF"
    p.release(0.02)


# ----------------------------------------------------------------------------- pools, outliers, LB


def test_pool_limit_overflow_503_uo_until_released() -> None:
    c = build([dr({"connectionPool": {"http": {"http2MaxRequests": 1}}})])
    p1 = plan(c)
    assert isinstance(p1, RequestPlan)
    p2 = plan(c)
    assert isinstance(p2, LocalResponse) and (p2.status, p2.flags) == (503, "UO")
    assert "app/front:80" in p2.details
    p1.release(0.1)
    p3 = plan(c)
    assert isinstance(p3, RequestPlan)
    p3.release(0.2)


def test_outlier_detection_ejects_a_failing_endpoint() -> None:
    no_retry = [{"backendRefs": [{"name": "front", "port": 80}], "retry": {"attempts": 0}}]
    c = build(
        [
            route(no_retry),
            dr(
                {
                    "outlierDetection": {
                        "consecutive5xxErrors": 2,
                        "baseEjectionTime": "30s",
                        "maxEjectionPercent": 50,
                    },
                    "loadBalancer": {"simple": "ROUND_ROBIN"},
                }
            ),
        ]
    )
    rng = random.Random(1)
    bad = None
    for i in range(4):  # the first endpoint seen fails every time
        p = plan_request(c, req("/"), float(i), rng)
        assert isinstance(p, RequestPlan)
        bad = bad or p.first.endpoint.key
        result = 503 if p.first.endpoint.key == bad else 200
        assert p.after_attempt(p.first, result, float(i), rng, rtt=0.01) is None
        p.release(float(i))
    assert isinstance(p, RequestPlan)
    assert bad is not None and p.cluster.is_ejected(p.first.endpoint, 4.0) == (
        p.first.endpoint.key == bad
    )
    picks = set()
    for i in range(10):
        p = plan_request(c, req("/"), 10.0 + i, rng)
        assert isinstance(p, RequestPlan)
        picks.add(p.first.endpoint.key)
        p.release(10.0 + i)
    assert picks and bad not in picks
    seen = set()
    for _ in range(2):  # ejection over after 30 s
        q = plan_request(c, req("/"), 40.0, rng)
        assert isinstance(q, RequestPlan)
        seen.add(q.first.endpoint.key)
        q.release(40.0)
    assert seen == {bad, *picks}


def test_destination_rule_selects_round_robin() -> None:
    c = build([dr({"loadBalancer": {"simple": "ROUND_ROBIN"}})])
    p = plan(c)
    assert isinstance(p, RequestPlan)
    assert isinstance(p.cluster.balancer, RoundRobin)
    keys = []
    for _ in range(4):
        q = plan(c)
        assert isinstance(q, RequestPlan)
        keys.append(q.first.endpoint.key)
        q.release(0.0)
    assert keys[0] == keys[2] and keys[1] == keys[3] and keys[0] != keys[1]
    p.release(0.0)


def test_annotation_selects_peak_ewma_and_state_survives_rebuild() -> None:
    peak = dr(
        {"loadBalancer": {"simple": "LEAST_REQUEST"}}, annotations={LB_ANNOTATION: "PEAK_EWMA"}
    )
    docs: list[Resource] = [parse_resource(d) for d in [*_base(("a",)), peak]]
    snap = compute_snapshot(docs, NODE, waypoint_addresses={("app", "wp"): "10.0.0.250"})
    state = ChainState()
    c1 = build_chain(WaypointConfig.from_resources(snap, docs, gateway=("app", "wp")), state)
    p = plan(c1)
    assert isinstance(p, RequestPlan)
    assert isinstance(p.cluster.balancer, PeakEwma)
    slow = p.first.endpoint
    p.after_attempt(p.first, 200, 2.0, random.Random(1), rtt=2.0)
    p.release(2.0)
    c2 = build_chain(WaypointConfig.from_resources(snap, docs, gateway=("app", "wp")), state)
    for seed in range(20):  # the slow endpoint's estimate was kept: it is avoided
        q = plan(c2, seed=seed, now=2.1)
        assert isinstance(q, RequestPlan)
        assert q.first.endpoint.key != slow.key
        q.release(2.1)


def test_release_while_an_attempt_is_in_flight_clears_lb_state() -> None:
    c = build([dr({"loadBalancer": {"simple": "LEAST_REQUEST"}})])
    p = plan(c)
    assert isinstance(p, RequestPlan)
    assert sum(p.cluster.balancer.active.values()) == 1  # type: ignore[attr-defined]
    p.release(1.0)
    assert sum(p.cluster.balancer.active.values()) == 0  # type: ignore[attr-defined]


def test_timeouts_start_after_a_fault_delay() -> None:
    rules = [{"backendRefs": [{"name": "front", "port": 80}], "timeouts": {"request": "2s"}}]
    c = build([route(rules), fault({"delay": {"fixedDelay": "5s"}}, target=SVC)])
    p = plan(c, now=0.0)
    assert isinstance(p, RequestPlan)
    assert p.fault_delay == 5.0 and p.first.deadline == 7.0
    p.release(7.0)


def test_local_answers_keep_configuration_details_out_of_the_body() -> None:
    p = plan(build([route([rule("a", exact("/only"))])]), "/other")
    assert isinstance(p, LocalResponse) and p.status == 404
    assert p.body == b"" and "front" in p.details


@pytest.mark.parametrize(
    ("name", "app", "want"),
    [
        ("http", "", "http"),
        ("http-web", "", "http"),
        ("grpc-api", "", "grpc"),
        ("http2", "", "http2"),
        ("tcp-db", "", "tcp"),
        ("web", "", ""),
        ("", "", ""),
        ("web", "kubernetes.io/h2c", "http2"),
        ("http", "tcp", "tcp"),
        ("x", "https", "tcp"),
        ("x", "HTTP", "http"),
    ],
)
def test_declared_protocol(name: str, app: str, want: str) -> None:
    assert declared_protocol(zs.ServicePort(port=80, name=name, app_protocol=app)) == want


def test_port_protocol_of_a_dialled_vip() -> None:
    extra = yaml.safe_load("""
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: app}
spec:
  selector: {app: a}
  clusterIP: 10.96.1.2
  ports: [{name: grpc-api, port: 9000}, {name: db, port: 5432, appProtocol: tcp}]
""")
    c = build([extra])
    assert port_protocol(c, "10.96.1.2", 9000) == "grpc"
    assert port_protocol(c, "10.96.1.2", 5432) == "tcp"
    assert port_protocol(c, "10.96.1.2", 1) == ""
    assert port_protocol(c, "10.9.9.9", 80) == ""


def test_chain_from_the_waypoint_snapshot_the_control_plane_pushes() -> None:
    docs = [
        parse_resource(d)
        for d in [
            *_base(("a", "b")),
            route(
                [
                    {
                        "backendRefs": [
                            {"name": "a", "port": 80, "weight": 1},
                            {"name": "b", "port": 80, "weight": 1},
                        ]
                    }
                ]
            ),
        ]
    ]
    idx = MeshIndex()
    idx.set_waypoint_address("app", "wp", "10.0.0.250")
    idx.load(docs, 7)
    snap = idx.waypoint_snapshot("app", "wp")
    chain = build_chain(WaypointConfig.from_resources(snap, docs, gateway=("app", "wp")))
    assert chain.version == 7
    seen = set()
    for seed in range(20):
        p = plan(chain, seed=seed)
        assert isinstance(p, RequestPlan)
        seen.add((p.backend.name, p.first.endpoint.address))
        p.release(0.0)
    assert seen == {("a", "10.0.1.10"), ("b", "10.0.2.10")}


def test_extension_ref_rate_limit_limits_its_rule_only() -> None:
    limited = {
        "matches": [prefix("/api")],
        "filters": [
            {
                "type": "ExtensionRef",
                "extensionRef": {"group": "ambit.dev", "kind": "RateLimit", "name": "rl"},
            }
        ],
        "backendRefs": [{"name": "a", "port": 80}],
    }
    c = build([route([limited, rule("b")]), ratelimit(1, "1m")])
    first = plan(c, "/api/x")
    assert isinstance(first, RequestPlan)
    first.release(0.0)
    second = plan(c, "/api/y")
    assert isinstance(second, LocalResponse) and second.status == 429
    for _ in range(3):
        other = plan(c, "/web")
        assert isinstance(other, RequestPlan) and other.backend.name == "b"
        other.release(0.0)


# ----------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize(
    "result",
    [200, 204, 404, 429, 500, 502, 503, 504, Outcome.CONNECT_FAILURE, Outcome.RESET,
     Outcome.TIMEOUT],
)
@pytest.mark.parametrize("codes", [None, [503], [502, 504], [500, 503, 504]])
def test_after_attempt_retries_exactly_when_the_retry_policy_does(
    result: int | Outcome, codes: list[int] | None
) -> None:
    """The shortcut for statuses the policy does not list answers like `decide`."""
    spec: dict[str, Any] = {"backendRefs": [{"name": "front", "port": 80}]}
    if codes is not None:
        spec["retry"] = {"attempts": 2, "codes": codes, "backoff": "10ms"}
    c = build([route([spec])])
    p = plan_request(c, req("/"), 0.0, random.Random(1))
    assert isinstance(p, RequestPlan)
    want = p.retry.decide(1, result, 0.01, p.timeouts.request_deadline(p.started),
                          random.Random(5))
    rng = random.Random(5)
    nxt = p.after_attempt(p.first, result, 0.01, rng)
    assert (nxt is not None) == want.retry
    if nxt is not None:
        assert nxt.backoff == want.backoff
    p.release(0.02)
    assert p.cluster.pool.active == 0 and p.cluster.pool.retries == 0


def test_response_without_modifiers_is_the_upstream_response_itself() -> None:
    p = plan(build([route([rule("a")])]))
    assert isinstance(p, RequestPlan)
    up = Response(200, (("content-type", "text/plain"), ("x-up", "1")))
    assert p.response(up) is up
    p.release(0.0)


def test_response_with_modifiers_is_a_new_response() -> None:
    spec = {
        "backendRefs": [{"name": "a", "port": 80}],
        "filters": [
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["x-up"]}}
        ],
    }
    p = plan(build([route([spec])]))
    assert isinstance(p, RequestPlan)
    up = Response(200, (("content-type", "text/plain"), ("x-up", "1")))
    assert p.response(up) == Response(200, (("content-type", "text/plain"),))
    assert up.headers == (("content-type", "text/plain"), ("x-up", "1"))
    p.release(0.0)


def test_destination_index_agrees_with_the_service_lookup() -> None:
    c = build([route([rule("a", prefix("/x")), rule("b")])])
    snap = c.config.snapshot
    seen = 0
    for svc in snap.services:
        for vip in svc.vips:
            for sp in svc.ports:
                owner = snap.service_by_vip(vip)
                assert owner is not None
                assert c.by_destination[(vip, sp.port)] is c.services[
                    (owner.namespace, owner.name, sp.port)
                ]
                seen += 1
    assert seen == len(c.by_destination) > 0


@pytest.mark.parametrize("path", ["/", "/x", "/x/y", "/z"])
def test_plan_by_vip_equals_plan_by_hostname(path: str) -> None:
    """The (VIP, port) index gives the plan the lookup by Host gives (no dest IP)."""
    c = build([route([rule("a", prefix("/x")), rule("b")])])
    by_vip = plan_request(c, req(path), 0.0, random.Random(7))
    by_host = plan_request(c, req(path, vip=""), 0.0, random.Random(7))
    assert isinstance(by_vip, RequestPlan) and isinstance(by_host, RequestPlan)
    assert (by_vip.backend, by_vip.route, by_vip.rule_index, by_vip.request.path) == (
        by_host.backend, by_host.route, by_host.rule_index, by_host.request.path
    )
    by_vip.release(0.0)
    by_host.release(0.0)
