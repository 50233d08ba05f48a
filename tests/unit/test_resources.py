"""Parsing manifests of every kind into the typed model."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from config.resources import (
    AuthorizationPolicySpec,
    DestinationRuleSpec,
    FieldError,
    GatewaySpec,
    HTTPFaultSpec,
    HTTPRouteSpec,
    PeerAuthenticationSpec,
    RateLimitSpec,
    ServiceSpec,
    Source,
    WorkloadEntrySpec,
    parse_duration,
    parse_resource,
    resolve_kind,
)
from config.validate import load_text


def _one(text: str) -> Any:
    return parse_resource(yaml.safe_load(text))


def test_workload_entry_with_node_and_netns_annotations() -> None:
    r = _one("""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: web-1
  namespace: shop
  annotations: {ambit.dev/node: node-a, ambit.dev/netns: web1}
spec:
  address: 10.0.1.5
  labels: {app: web, version: v1}
  serviceAccount: web
  locality: eu/zone-a
  weight: 3
  ports: {http: 8080}
""")
    assert r.key.namespace == "shop" and r.key.name == "web-1"
    assert r.spec == WorkloadEntrySpec(
        address="10.0.1.5",
        labels={"app": "web", "version": "v1"},
        service_account="web",
        locality="eu/zone-a",
        weight=3,
        ports={"http": 8080},
        network="",
        node="node-a",
        netns="web1",
    )


def test_service_defaults_namespace_target_port_and_protocol() -> None:
    r = _one("""
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {name: grpc, port: 9090, targetPort: grpc-port}
  - {name: dns, port: 53, protocol: UDP}
""")
    assert r.key.namespace == "default"
    assert isinstance(r.spec, ServiceSpec)
    assert [(p.port, p.target_port, p.protocol, p.app_protocol) for p in r.spec.ports] == [
        (80, 8080, "TCP", "http"),
        (9090, "grpc-port", "TCP", ""),
        (53, 53, "UDP", ""),
    ]
    assert r.spec.cluster_ip == ""


def test_authorization_policy_rules_and_not_forms() -> None:
    r = _one("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/client"]
        notNamespaces: ["kube-*"]
        ipBlocks: ["10.0.0.0/8", "192.168.1.7"]
    to:
    - operation: {ports: ["8080", 9090], methods: [GET], notPaths: ["/admin*"]}
    when:
    - {key: "request.headers[x-env]", values: [prod]}
    - {key: source.ip, notValues: [10.1.0.0/16]}
""")
    spec = r.spec
    assert isinstance(spec, AuthorizationPolicySpec)
    assert spec.action == "DENY" and spec.selector == {"app": "web"}
    (rule,) = spec.rules
    assert rule.sources[0].principals == ("cluster.local/ns/default/sa/client",)
    assert rule.sources[0].not_namespaces == ("kube-*",)
    assert rule.sources[0].ip_blocks == ("10.0.0.0/8", "192.168.1.7")
    assert rule.operations[0].ports == (8080, 9090)
    assert rule.operations[0].not_paths == ("/admin*",)
    assert [c.key for c in rule.when] == ["request.headers[x-env]", "source.ip"]


# Every `from.source` field, a value it accepts, a value it rejects and the error.
_WILDCARD_ERROR = "'a*b': '*' is only allowed as a whole value, a prefix or a suffix"
_CIDR_ERROR = "expected an IP address or CIDR like 10.0.0.0/8, got '10.1.2.0/33'"
SOURCE_FIELDS = [
    ("principals", "principals", "cluster.local/ns/a/sa/*", "a*b", _WILDCARD_ERROR),
    ("notPrincipals", "not_principals", "*/sa/admin", "a*b", _WILDCARD_ERROR),
    ("requestPrincipals", "request_principals", "*", "a*b", _WILDCARD_ERROR),
    ("notRequestPrincipals", "not_request_principals", "issuer/*", "a*b", _WILDCARD_ERROR),
    ("namespaces", "namespaces", "shop", "a*b", _WILDCARD_ERROR),
    ("notNamespaces", "not_namespaces", "kube-*", "a*b", _WILDCARD_ERROR),
    ("ipBlocks", "ip_blocks", "10.0.0.0/8", "10.1.2.0/33", _CIDR_ERROR),
    ("notIpBlocks", "not_ip_blocks", "192.168.1.7", "10.1.2.0/33", _CIDR_ERROR),
    ("remoteIpBlocks", "remote_ip_blocks", "fd00::/8", "10.1.2.0/33", _CIDR_ERROR),
    ("notRemoteIpBlocks", "not_remote_ip_blocks", "::1", "10.1.2.0/33", _CIDR_ERROR),
]


def _source_policy(source: dict[str, Any]) -> Any:
    return parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"rules": [{"from": [{"source": source}]}]},
        }
    )


def test_source_field_table_covers_every_source_attribute() -> None:
    assert {f.name for f in dataclasses.fields(Source)} == {a for _, a, *_ in SOURCE_FIELDS}


@pytest.mark.parametrize(
    ("key", "attr", "good", "bad", "error"), SOURCE_FIELDS, ids=[f[0] for f in SOURCE_FIELDS]
)
def test_each_source_field_is_read_and_checked(
    key: str, attr: str, good: str, bad: str, error: str
) -> None:
    spec = _source_policy({key: [good]}).spec
    assert isinstance(spec, AuthorizationPolicySpec)
    (source,) = spec.rules[0].sources
    assert source == Source(**{attr: (good,)})
    with pytest.raises(FieldError) as info:
        _source_policy({key: [good, bad]})
    assert str(info.value) == f"spec.rules[0].from[0].source.{key}[1]: {error}"
    with pytest.raises(FieldError) as info:
        _source_policy({key: [7]})
    assert str(info.value) == (
        f"spec.rules[0].from[0].source.{key}[0]: expected a string, got an integer"
    )


@pytest.mark.parametrize("key", ["sourceIpBlocks", "principal", "serviceAccounts", "notIPBlocks"])
def test_unknown_source_field_is_rejected_with_the_known_ones(key: str) -> None:
    with pytest.raises(FieldError) as info:
        _source_policy({key: ["10.0.0.0/8"]})
    known = ", ".join(sorted(k for k, *_ in SOURCE_FIELDS))
    assert str(info.value) == (
        f"spec.rules[0].from[0].source.{key}: unknown field (expected one of: {known})"
    )


def test_empty_authorization_policy_is_allow_nothing() -> None:
    r = _one(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all, namespace: istio-system}\nspec: {}\n"
    )
    assert r.spec == AuthorizationPolicySpec(
        selector=None, target_refs=(), action="ALLOW", rules=()
    )


def test_peer_authentication_port_level() -> None:
    r = _one("""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
  portLevelMtls: {"5432": {mode: PERMISSIVE}}
""")
    assert r.spec == PeerAuthenticationSpec({"app": "db"}, "STRICT", {5432: "PERMISSIVE"})


def test_waypoint_gateway_and_route_to_service() -> None:
    docs = load_text(
        """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-canary, value: "yes"}]
      queryParams: [{type: RegularExpression, name: v, value: "^[12]$"}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: canary}], remove: [x-debug]}
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 3, codes: [503], backoff: 100ms}
  - backendRefs: [{name: reviews-v1, port: 9080}]
""",
        "r.yaml",
    )
    gw = parse_resource(docs[0].obj)
    route = parse_resource(docs[1].obj)
    assert isinstance(gw.spec, GatewaySpec) and gw.spec.waypoint_for == "all"
    assert gw.spec.listeners[0].port == 15008
    spec = route.spec
    assert isinstance(spec, HTTPRouteSpec)
    assert spec.parent_refs[0].kind == "Service" and spec.parent_refs[0].port == 9080
    r0, r1 = spec.rules
    m = r0.matches[0]
    assert (m.path.type, m.path.value, m.method) == ("PathPrefix", "/api", "GET")
    assert m.headers[0].type == "Exact" and m.query_params[0].type == "RegularExpression"
    assert [(b.name, b.weight) for b in r0.backend_refs] == [("reviews-v1", 90), ("reviews-v2", 10)]
    assert r0.request_timeout == 2.0 and r0.backend_request_timeout == 0.5
    assert r0.retry is not None and r0.retry.attempts == 3 and r0.retry.backoff == 0.1
    hm = r0.filters[0].request_header_modifier
    assert hm is not None and hm.set == (("x-route", "canary"),) and hm.remove == ("x-debug",)
    # a rule without matches matches every path
    assert r1.matches[0].path.type == "PathPrefix" and r1.matches[0].path.value == "/"


def test_destination_rule_traffic_policy() -> None:
    r = _one("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web.default.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 10, maxRetries: 2}
    outlierDetection: {consecutive5xxErrors: 5, interval: 5s, baseEjectionTime: 1m}
    loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - {name: v1, labels: {version: v1}}
""")
    spec = r.spec
    assert isinstance(spec, DestinationRuleSpec)
    tp = spec.traffic_policy
    assert tp is not None and tp.load_balancer == "LEAST_REQUEST"
    assert tp.connection_pool is not None and tp.connection_pool.max_connections == 100
    assert tp.connection_pool.connect_timeout == 0.25
    assert tp.outlier_detection is not None
    assert tp.outlier_detection.consecutive_5xx_errors == 5
    assert tp.outlier_detection.base_ejection_time == 60.0
    assert spec.subsets[0].labels == {"version": "v1"}


def test_ambit_fault_and_rate_limit() -> None:
    f = _one("""
apiVersion: ambit.dev/v1alpha1
kind: HTTPFault
metadata: {name: slow}
spec:
  targetRefs: [{kind: Service, name: web}]
  delay: {fixedDelay: 1.5s, percentage: 25}
  abort: {httpStatus: 503, percentage: 10.5}
""")
    assert isinstance(f.spec, HTTPFaultSpec)
    assert (f.spec.delay, f.spec.delay_percent, f.spec.abort_status, f.spec.abort_percent) == (
        1.5,
        25.0,
        503,
        10.5,
    )
    rl = _one("""
apiVersion: ambit.dev/v1alpha1
kind: RateLimit
metadata: {name: limit}
spec:
  targetRefs: [{kind: Service, name: web}]
  tokenBucket: {maxTokens: 100, tokensPerFill: 10, fillInterval: 1s}
""")
    assert rl.spec == RateLimitSpec(rl.spec.target_refs, 100, 10, 1.0, 429)


def test_body_is_normalised_and_cluster_metadata_dropped() -> None:
    r = _one("""
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
  uid: 1234
  resourceVersion: "99"
status: {phase: Active}
""")
    assert r.body == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}},
    }


@pytest.mark.parametrize(
    ("alias", "kind"),
    [
        ("svc", "Service"),
        ("services", "Service"),
        ("ns", "Namespace"),
        ("ap", "AuthorizationPolicy"),
        ("PeerAuthentication", "PeerAuthentication"),
        ("we", "WorkloadEntry"),
        ("httproutes", "HTTPRoute"),
        ("dr", "DestinationRule"),
        ("gtw", "Gateway"),
        ("httpfaults", "HTTPFault"),
        ("ratelimit", "RateLimit"),
    ],
)
def test_kind_aliases(alias: str, kind: str) -> None:
    assert resolve_kind(alias).kind == kind


def test_unknown_kind_alias_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown resource type 'pods'"):
        resolve_kind("pods")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("0.5s", 0.5),
        ("100us", 1e-4),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1 s", "1d", "-1s", "1s2"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(FieldError, match="expected a duration like 1s or 250ms"):
        parse_duration(text, "x")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 70000) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "spec",
                    "ports",
                    "port",
                    "rules",
                    "from",
                    "source",
                    "name",
                    "metadata",
                    "selector",
                    "address",
                    "listeners",
                    "matches",
                    "path",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(
        [
            "Service",
            "WorkloadEntry",
            "AuthorizationPolicy",
            "HTTPRoute",
            "Gateway",
            "DestinationRule",
            "PeerAuthentication",
            "HTTPFault",
            "RateLimit",
            "Namespace",
        ]
    ),
    spec=_json,
)
def test_arbitrary_specs_either_parse_or_raise_field_error(kind: str, spec: Any) -> None:
    from config.resources import KINDS

    obj = {
        "apiVersion": KINDS[kind].api_versions[0],
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": spec,
    }
    try:
        parse_resource(obj)
    except FieldError as e:
        assert e.message


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("abc:-{}[]#\n '\"0123456789.,/&*!|>")), max_size=120)
)
def test_any_text_loads_or_fails_with_a_located_problem(text: str) -> None:
    from config.resources import ResourceKey
    from config.validate import ValidationFailed, validate_batch

    try:
        docs = load_text(text, "fuzz.yaml")
        if docs:
            validate_batch(docs, lambda k: k == ResourceKey("Namespace", "", "default"))
    except ValidationFailed as e:
        assert e.problems
        assert all(p.source == "fuzz.yaml" and p.index >= 1 for p in e.problems)
