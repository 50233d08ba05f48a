"""L7 AuthorizationPolicy at the waypoint: which policies apply, rule attributes, chain 403."""

from __future__ import annotations

import random
from typing import Any

import pytest

from config.resources import AuthorizationPolicySpec, parse_resource
from tests.unit.test_waypoint_routes import CLIENT, backend, build, req
from waypoint.authz import DENIED_BODY, applicable_policies, authorize
from waypoint.chain import RequestPlan, plan_request, plan_tcp
from waypoint.model import LocalResponse, Named, Request
from waypoint.resilience import Outcome


def policy(spec: dict[str, Any], name: str = "p", ns: str = "app") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def named(spec: dict[str, Any], name: str = "p", ns: str = "app") -> Named[AuthorizationPolicySpec]:
    r = parse_resource(policy(spec, name, ns))
    assert isinstance(r.spec, AuthorizationPolicySpec)
    return Named(ns, name, r.spec)


TARGET = {"targetRefs": [{"kind": "Service", "group": "", "name": "front"}]}


def r(
    path: str = "/",
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
    *,
    principal: str | None = CLIENT,
    authority: str = "front.app.svc.cluster.local:80",
    port: int = 80,
    src: str = "10.0.9.9",
) -> Request:
    return Request(
        method,
        path,
        authority,
        headers,
        dest_ip="10.96.0.10",
        dest_port=port,
        source_ip=src,
        source_principal=principal,
    )


def allowed(spec: dict[str, Any], request: Request) -> bool:
    return authorize([named(spec)], request).allowed


# ----------------------------------------------------------------------------- applicability


def test_policies_targeting_the_service_gateway_or_class_apply() -> None:
    svc = named({"targetRefs": [{"kind": "Service", "group": "", "name": "front"}]}, "svc")
    gw = named(
        {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}]},
        "gw",
    )
    cls = named(
        {
            "targetRefs": [
                {
                    "kind": "GatewayClass",
                    "group": "gateway.networking.k8s.io",
                    "name": "istio-waypoint",
                }
            ]
        },
        "cls",
        ns="istio-system",
    )
    other = named({"targetRefs": [{"kind": "Service", "group": "", "name": "b"}]}, "other")
    sel = named({"selector": {"matchLabels": {"app": "front"}}}, "sel")
    got = applicable_policies(
        [svc, gw, cls, other, sel],
        gateway=("app", "wp"),
        service=("app", "front"),
        root_namespace="istio-system",
    )
    assert [p.name for p in got] == ["svc", "gw", "cls"]


# ----------------------------------------------------------------------------- attributes


def test_no_policy_allows() -> None:
    assert authorize([], r()).allowed


def test_allow_with_no_rules_allows_nothing() -> None:
    d = authorize([named({**TARGET})], r())
    assert not d.allowed
    assert "no ALLOW policy matched" in d.reason


def test_allow_methods_and_paths() -> None:
    spec = {
        **TARGET,
        "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/public/*", "/health"]}}]}],
    }
    assert allowed(spec, r("/public/x"))
    assert allowed(spec, r("/health?full=1"))
    assert not allowed(spec, r("/public/x", "POST"))
    assert not allowed(spec, r("/admin"))


def test_deny_path_wins_over_allow() -> None:
    pols = [
        named(
            {
                **TARGET,
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
            },
            "deny",
        ),
        named({**TARGET, "rules": [{}]}, "allow-all"),
    ]
    assert not authorize(pols, r("/admin/users")).allowed
    assert authorize(pols, r("/home")).allowed


def test_not_paths_and_not_methods() -> None:
    spec = {
        **TARGET,
        "rules": [{"to": [{"operation": {"notPaths": ["/private*"], "notMethods": ["DELETE"]}}]}],
    }
    assert allowed(spec, r("/x"))
    assert not allowed(spec, r("/private/1"))
    assert not allowed(spec, r("/x", "DELETE"))


def test_hosts_case_insensitive_with_or_without_port() -> None:
    op = {"hosts": ["FRONT.app.svc.cluster.local"]}
    spec = {**TARGET, "rules": [{"to": [{"operation": op}]}]}
    assert allowed(spec, r())
    assert allowed(spec, r(authority="front.app.svc.cluster.local"))
    assert not allowed(spec, r(authority="other.example"))
    wild = {**TARGET, "rules": [{"to": [{"operation": {"hosts": ["*.cluster.local:80"]}}]}]}
    assert allowed(wild, r())


def test_ports() -> None:
    spec = {**TARGET, "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}
    assert allowed(spec, r(port=80))
    assert not allowed(spec, r(port=8080))


def test_principals_and_namespaces_from_the_peer_identity() -> None:
    spec = {
        **TARGET,
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/app/sa/client"]}}]}],
    }
    assert allowed(spec, r())
    assert not allowed(spec, r(principal="spiffe://cluster.local/ns/app/sa/other"))
    assert not allowed(spec, r(principal=None))
    ns = {**TARGET, "rules": [{"from": [{"source": {"namespaces": ["app"]}}]}]}
    assert allowed(ns, r())
    assert not allowed(ns, r(principal="spiffe://cluster.local/ns/evil/sa/client"))


def test_not_principals_never_exclude_an_unknown_client() -> None:
    spec = {**TARGET, "rules": [{"from": [{"source": {"notPrincipals": ["*/sa/bad"]}}]}]}
    assert allowed(spec, r(principal=None))
    assert not allowed(spec, r(principal="spiffe://cluster.local/ns/app/sa/bad"))


def test_ip_blocks() -> None:
    spec = {**TARGET, "rules": [{"from": [{"source": {"ipBlocks": ["10.0.9.0/24"]}}]}]}
    assert allowed(spec, r())
    assert not allowed(spec, r(src="10.1.0.1"))


def test_when_request_headers() -> None:
    spec = {
        **TARGET,
        "rules": [{"when": [{"key": "request.headers[x-user]", "values": ["alice", "bob*"]}]}],
    }
    assert allowed(spec, r(headers=(("x-user", "alice"),)))
    assert allowed(spec, r(headers=(("x-user", "bobby"),)))
    assert not allowed(spec, r(headers=(("x-user", "eve"),)))
    assert not allowed(spec, r())
    neg = {
        **TARGET,
        "rules": [{"when": [{"key": "request.headers[x-user]", "notValues": ["eve"]}]}],
    }
    assert allowed(neg, r(headers=(("x-user", "alice"),)))
    assert not allowed(neg, r(headers=(("x-user", "eve"),)))


@pytest.mark.parametrize("key", ["source.namespace", "destination.port", "source.principal"])
def test_when_l4_keys(key: str) -> None:
    values = {
        "source.namespace": ["app"],
        "destination.port": ["80"],
        "source.principal": ["cluster.local/ns/app/sa/client"],
    }[key]
    spec = {**TARGET, "rules": [{"when": [{"key": key, "values": values}]}]}
    assert allowed(spec, r())
    assert not allowed(spec, r(principal="spiffe://cluster.local/ns/x/sa/y", port=81))


def test_jwt_attributes_never_match() -> None:
    spec = {**TARGET, "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}
    assert not allowed(spec, r())
    when = {**TARGET, "rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}
    assert not allowed(when, r())


# ----------------------------------------------------------------------------- in the chain


def test_chain_denies_path_with_403_while_other_paths_work() -> None:
    c = build(
        [
            policy(
                {
                    **TARGET,
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
                }
            )
        ]
    )
    p = plan_request(c, req("/admin"), 0.0, random.Random(1))
    assert isinstance(p, LocalResponse)
    assert (p.status, p.body) == (403, DENIED_BODY)
    assert "app/p" in p.details
    assert backend(c, req("/shop")) == "front"


def test_chain_policy_on_another_service_does_not_apply() -> None:
    c = build([policy({"targetRefs": [{"kind": "Service", "group": "", "name": "b"}]})])
    assert backend(c, req("/")) == "front"
    assert backend(c, req("/", vip="10.96.0.12")) == "403"


# ----------------------------------------------------------------------------- TCP


def _tcp(spec: dict[str, Any], **kw: Any) -> bool:
    return authorize([named(spec)], r(**kw), tcp=True).allowed


def test_tcp_deny_ignores_http_attributes() -> None:
    spec = {
        **TARGET,
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/admin"], "ports": ["80"]}}]}],
    }
    assert not _tcp(spec)  # denies the whole connection on port 80
    assert _tcp(spec, port=81)
    assert allowed(spec, r("/shop"))  # over HTTP only /admin is denied


def test_tcp_allow_with_http_attributes_never_matches() -> None:
    spec = {
        **TARGET,
        "rules": [
            {"to": [{"operation": {"methods": ["GET"]}}]},
            {"from": [{"source": {"namespaces": ["other"]}}]},
        ],
    }
    assert not _tcp(spec)
    plain = {
        **TARGET,
        "rules": [
            {
                "from": [{"source": {"namespaces": ["app"]}}],
                "when": [{"key": "destination.port", "values": ["80"]}],
            }
        ],
    }
    assert _tcp(plain)
    assert not _tcp(plain, principal="spiffe://cluster.local/ns/x/sa/y")


def test_plan_tcp_picks_an_endpoint_or_denies() -> None:
    deny = policy(
        {**TARGET, "action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["app"]}}]}]}
    )
    c = build([deny])
    p = plan_tcp(
        c,
        dest_ip="10.96.0.10",
        dest_port=80,
        source_ip="10.0.9.9",
        source_principal=CLIENT,
        now=0.0,
        rng=random.Random(1),
    )
    assert isinstance(p, RequestPlan)
    assert p.first.endpoint.port == 8080 and p.backend.name == "front"
    assert p.after_attempt(p.first, Outcome.CONNECT_FAILURE, 0.1, random.Random(1)) is not None
    p.release(0.2)
    q = plan_tcp(
        c,
        dest_ip="10.96.0.10",
        dest_port=80,
        source_ip="10.0.9.9",
        source_principal="spiffe://cluster.local/ns/evil/sa/x",
        now=0.0,
        rng=random.Random(1),
    )
    assert isinstance(q, LocalResponse) and q.status == 403
    w = plan_tcp(
        c,
        dest_ip="10.0.1.10",
        dest_port=5432,
        source_ip="10.0.9.9",
        source_principal=CLIENT,
        now=0.0,
        rng=random.Random(1),
    )
    assert isinstance(w, RequestPlan) and w.first.endpoint.key == "10.0.1.10:5432"
    w.release(0.0)
    gone = plan_tcp(
        c,
        dest_ip="10.96.0.10",
        dest_port=81,
        source_ip="10.0.9.9",
        source_principal=CLIENT,
        now=0.0,
        rng=random.Random(1),
    )
    assert isinstance(gone, LocalResponse) and gone.status == 404
