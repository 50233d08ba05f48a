"""HTTPRoute matching and Gateway API precedence through the waypoint chain, weighted picks."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from config.resources import BackendRef, Resource, parse_resource
from config.snapshot import compute_snapshot
from waypoint.chain import Chain, RequestPlan, build_chain, plan_request
from waypoint.model import LocalResponse, Request, WaypointConfig
from waypoint.routes import (
    CompiledMatch,
    RouteTable,
    WeightedChoice,
    match_route,
    path_prefix_matches,
)

NODE = "node-1"


# Reference implementations the fast paths in waypoint.routes are checked against.


def match_route_general(table: RouteTable, request: Request) -> CompiledMatch | None:
    """`match_route` without its shortcuts: every match runs `CompiledMatch.accepts`."""
    path = request.path_only
    params = request.query_params if "?" in request.path else ()
    for m in table.matches_for(request.source_namespace):
        if m.accepts(request, path, params):
            return m
    return None


def pick_weighted(backends: Sequence[BackendRef], rng: random.Random) -> BackendRef | None:
    """A backend chosen with probability weight / total; None when all weights are 0."""
    total = sum(b.weight for b in backends)
    if total <= 0:
        return None
    x = rng.random() * total
    for b in backends:
        if b.weight <= 0:
            continue
        x -= b.weight
        if x < 0:
            return b
    return next(b for b in reversed(backends) if b.weight > 0)

CLIENT = "spiffe://cluster.local/ns/app/sa/client"


def _base(backends: Iterable[str], namespaces: Sequence[str] = ("app",)) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for ns in namespaces:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": ns,
                    "labels": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"},
                },
            }
        )
    docs.append(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "wp", "namespace": "app"},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
                "addresses": [{"value": "10.0.0.250"}],
            },
        }
    )
    for i, name in enumerate(["front", *backends]):
        for j in range(2 if name == "front" else 1):
            docs.append(
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "WorkloadEntry",
                    "metadata": {
                        "name": f"{name}-{j}",
                        "namespace": "app",
                        "annotations": {"ambit.dev/node": NODE},
                    },
                    "spec": {
                        "address": f"10.0.{i}.{j + 10}",
                        "labels": {"app": name},
                        "serviceAccount": name,
                    },
                }
            )
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "app"},
                "spec": {
                    "selector": {"app": name},
                    "clusterIP": f"10.96.0.{i + 10}",
                    "ports": [{"port": 80, "targetPort": 8080}],
                },
            }
        )
    return docs


def build(
    extra: str | Iterable[dict[str, Any]] = (),
    backends: Iterable[str] = ("a", "b", "c"),
    *,
    created: dict[str, int] | None = None,
    namespaces: Sequence[str] = ("app",),
) -> Chain:
    """A chain for a waypoint in namespace `app`: services `front` (VIP 10.96.0.10:80)
    and one service per backend name, plus the extra manifests (YAML or dicts)."""
    docs = list(yaml.safe_load_all(extra)) if isinstance(extra, str) else list(extra)
    res: list[Resource] = [parse_resource(d) for d in _base(backends, namespaces) + docs]
    snap = compute_snapshot(res, NODE, waypoint_addresses={("app", "wp"): "10.0.0.250"})
    items: list[Resource | tuple[Resource, int]] = [
        (r, (created or {}).get(r.meta.name, 0)) for r in res
    ]
    return build_chain(WaypointConfig.from_resources(snap, items, gateway=("app", "wp")))


def req(
    path: str = "/",
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    *,
    principal: str | None = CLIENT,
    vip: str = "10.96.0.10",
    port: int = 80,
) -> Request:
    return Request(
        method,
        path,
        "front.app.svc.cluster.local",
        tuple((k.lower(), v) for k, v in headers),
        dest_ip=vip,
        dest_port=port,
        source_ip="10.0.9.9",
        source_principal=principal,
    )


def backend(chain: Chain, request: Request, seed: int = 1) -> str:
    """The backend service a request goes to, or `<status> <flags>` for a local answer."""
    p = plan_request(chain, request, 0.0, random.Random(seed))
    if isinstance(p, LocalResponse):
        return f"{p.status} {p.flags}".strip()
    p.release(0.0)
    return p.backend.name


def route(
    rules: list[dict[str, Any]],
    name: str = "r",
    ns: str = "app",
    parent: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parentRefs": [
                parent
                or {"group": "", "kind": "Service", "name": "front", "namespace": "app", "port": 80}
            ],
            "rules": rules,
        },
    }


def rule(to: str, *matches: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"backendRefs": [{"name": to, "namespace": "app", "port": 80}]}
    if matches:
        out["matches"] = list(matches)
    return out


def exact(v: str, **kw: Any) -> dict[str, Any]:
    return {"path": {"type": "Exact", "value": v}, **kw}


def prefix(v: str, **kw: Any) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": v}, **kw}


def regex(v: str, **kw: Any) -> dict[str, Any]:
    return {"path": {"type": "RegularExpression", "value": v}, **kw}


def hdr(name: str, value: str, typ: str = "Exact") -> dict[str, str]:
    return {"type": typ, "name": name, "value": value}


# ----------------------------------------------------------------------------- path types


def test_exact_beats_prefix_for_the_same_path() -> None:
    c = build([route([rule("b", prefix("/foo")), rule("a", exact("/foo"))])])
    assert backend(c, req("/foo")) == "a"


def test_prefix_takes_what_exact_does_not_match() -> None:
    c = build([route([rule("b", prefix("/foo")), rule("a", exact("/foo"))])])
    assert backend(c, req("/foo/bar")) == "b"


def test_exact_ignores_the_query_string() -> None:
    c = build([route([rule("a", exact("/foo")), rule("b", prefix("/"))])])
    assert backend(c, req("/foo?x=1")) == "a"


def test_longest_prefix_wins_whatever_the_order() -> None:
    c = build([route([rule("a", prefix("/foo")), rule("b", prefix("/foo/bar"))])])
    assert backend(c, req("/foo/bar/baz")) == "b"


def test_shorter_prefix_takes_the_rest() -> None:
    c = build([route([rule("a", prefix("/foo")), rule("b", prefix("/foo/bar"))])])
    assert backend(c, req("/foo/baz")) == "a"


def test_prefix_matches_whole_segments_only() -> None:
    c = build([route([rule("a", prefix("/foo")), rule("c", prefix("/"))])])
    assert backend(c, req("/foobar")) == "c"
    assert backend(c, req("/foo/")) == "a"


def test_trailing_slash_of_a_prefix_is_ignored() -> None:
    c = build([route([rule("a", prefix("/foo/")), rule("c", prefix("/"))])])
    assert backend(c, req("/foo")) == "a"


def test_prefix_beats_regular_expression() -> None:
    c = build([route([rule("b", regex("/api/.*")), rule("a", prefix("/api"))])])
    assert backend(c, req("/api/users")) == "a"


def test_regular_expression_used_when_nothing_more_specific_matches() -> None:
    c = build([route([rule("a", prefix("/api")), rule("b", regex("/v[0-9]+/items"))])])
    assert backend(c, req("/v2/items")) == "b"


def test_regular_expression_must_match_the_whole_path() -> None:
    c = build([route([rule("b", regex("/v[0-9]+/items")), rule("c", prefix("/"))])])
    assert backend(c, req("/v2/items/extra")) == "c"


def test_exact_beats_regular_expression() -> None:
    c = build([route([rule("b", regex("/.*")), rule("a", exact("/health"))])])
    assert backend(c, req("/health")) == "a"


def test_rule_without_matches_is_a_catch_all_prefix() -> None:
    c = build([route([rule("a", prefix("/x")), rule("c")])])
    assert backend(c, req("/anything")) == "c"


# ----------------------------------------------------------------------------- method


def test_method_match_selects_its_rule() -> None:
    c = build([route([rule("a", prefix("/")), rule("b", prefix("/", method="POST"))])])
    assert backend(c, req("/", "POST")) == "b"
    assert backend(c, req("/", "GET")) == "a"


def test_path_type_beats_method() -> None:
    c = build([route([rule("b", prefix("/x", method="GET")), rule("a", exact("/x"))])])
    assert backend(c, req("/x", "GET")) == "a"


def test_longer_prefix_beats_method() -> None:
    c = build([route([rule("b", prefix("/a", method="GET")), rule("a", prefix("/a/b"))])])
    assert backend(c, req("/a/b", "GET")) == "a"


def test_method_beats_headers() -> None:
    c = build(
        [
            route(
                [
                    rule("b", prefix("/", headers=[hdr("x", "1"), hdr("y", "2")])),
                    rule("a", prefix("/", method="GET")),
                ]
            )
        ]
    )
    assert backend(c, req("/", "GET", [("x", "1"), ("y", "2")])) == "a"


# ----------------------------------------------------------------------------- headers


def test_more_header_matches_win() -> None:
    c = build(
        [
            route(
                [
                    rule("a", prefix("/", headers=[hdr("x", "1")])),
                    rule("b", prefix("/", headers=[hdr("x", "1"), hdr("y", "2")])),
                ]
            )
        ]
    )
    assert backend(c, req("/", headers=[("x", "1"), ("y", "2")])) == "b"


def test_fewer_header_matches_take_what_more_do_not_match() -> None:
    c = build(
        [
            route(
                [
                    rule("a", prefix("/", headers=[hdr("x", "1")])),
                    rule("b", prefix("/", headers=[hdr("x", "1"), hdr("y", "2")])),
                ]
            )
        ]
    )
    assert backend(c, req("/", headers=[("x", "1")])) == "a"


def test_header_names_are_case_insensitive() -> None:
    c = build([route([rule("a", prefix("/", headers=[hdr("X-Env", "prod")])), rule("c")])])
    assert backend(c, req("/", headers=[("x-env", "prod")])) == "a"


def test_header_values_are_case_sensitive() -> None:
    c = build([route([rule("a", prefix("/", headers=[hdr("x-env", "Prod")])), rule("c")])])
    assert backend(c, req("/", headers=[("x-env", "prod")])) == "c"


def test_header_regular_expression() -> None:
    c = build(
        [
            route(
                [
                    rule(
                        "a",
                        prefix("/", headers=[hdr("user-agent", ".*Mobile.*", "RegularExpression")]),
                    ),
                    rule("c"),
                ]
            )
        ]
    )
    assert backend(c, req("/", headers=[("user-agent", "Foo Mobile Safari")])) == "a"
    assert backend(c, req("/", headers=[("user-agent", "curl/8")])) == "c"


def test_all_conditions_of_one_match_must_hold() -> None:
    c = build([route([rule("a", prefix("/api", headers=[hdr("x", "1")])), rule("c")])])
    assert backend(c, req("/api", headers=[("x", "2")])) == "c"
    assert backend(c, req("/web", headers=[("x", "1")])) == "c"
    assert backend(c, req("/api", headers=[("x", "1")])) == "a"


def test_any_match_of_a_rule_selects_it() -> None:
    c = build([route([rule("a", exact("/one"), exact("/two")), rule("c")])])
    assert backend(c, req("/two")) == "a"


# ----------------------------------------------------------------------------- query


def test_more_query_param_matches_win() -> None:
    c = build(
        [
            route(
                [
                    rule("a", prefix("/", queryParams=[hdr("v", "1")])),
                    rule("b", prefix("/", queryParams=[hdr("v", "1"), hdr("w", "2")])),
                ]
            )
        ]
    )
    assert backend(c, req("/?v=1&w=2")) == "b"
    assert backend(c, req("/?v=1")) == "a"


def test_query_param_absent_or_different_does_not_match() -> None:
    c = build([route([rule("a", prefix("/", queryParams=[hdr("debug", "true")])), rule("c")])])
    assert backend(c, req("/")) == "c"
    assert backend(c, req("/?debug=false")) == "c"
    assert backend(c, req("/?debug=true")) == "a"


def test_query_param_regular_expression() -> None:
    c = build(
        [
            route(
                [
                    rule("a", prefix("/", queryParams=[hdr("id", "[0-9]+", "RegularExpression")])),
                    rule("c"),
                ]
            )
        ]
    )
    assert backend(c, req("/?id=42")) == "a"
    assert backend(c, req("/?id=x42")) == "c"


def test_headers_beat_query_params() -> None:
    c = build(
        [
            route(
                [
                    rule("b", prefix("/", queryParams=[hdr("v", "1"), hdr("w", "2")])),
                    rule("a", prefix("/", headers=[hdr("x", "1")])),
                ]
            )
        ]
    )
    assert backend(c, req("/?v=1&w=2", headers=[("x", "1")])) == "a"


# ----------------------------------------------------------------------------- ties


def test_tie_across_routes_goes_to_the_oldest_route() -> None:
    c = build(
        [
            route([rule("a", prefix("/x"))], name="zeta"),
            route([rule("b", prefix("/x"))], name="alpha"),
        ],
        created={"zeta": 5, "alpha": 9},
    )
    assert backend(c, req("/x")) == "a"


def test_tie_across_routes_of_the_same_age_goes_alphabetically() -> None:
    c = build(
        [
            route([rule("a", prefix("/x"))], name="zeta"),
            route([rule("b", prefix("/x"))], name="alpha"),
        ]
    )
    assert backend(c, req("/x")) == "b"


def test_tie_within_a_route_goes_to_the_first_rule() -> None:
    c = build([route([rule("b", prefix("/x")), rule("a", prefix("/x"))])])
    assert backend(c, req("/x")) == "b"


def test_precedence_across_routes_before_age() -> None:
    # the newer route has the more specific match: specificity first, age only on ties
    c = build(
        [
            route([rule("a", prefix("/"))], name="old"),
            route([rule("b", prefix("/shop"))], name="new"),
        ],
        created={"old": 1, "new": 2},
    )
    assert backend(c, req("/shop/cart")) == "b"
    assert backend(c, req("/home")) == "a"


# ----------------------------------------------------------------------------- attachment


def test_no_route_attached_goes_to_the_service_itself() -> None:
    c = build([])
    assert backend(c, req("/anything")) == "front"


def test_routes_attached_but_none_matching_is_404() -> None:
    c = build([route([rule("a", exact("/only"))])])
    assert backend(c, req("/other")) == "404 NR"


def test_route_for_another_port_does_not_apply() -> None:
    parent = {"group": "", "kind": "Service", "name": "front", "port": 8080}
    c = build([route([rule("a")], parent=parent)])
    assert backend(c, req("/")) == "front"


def test_route_attached_to_another_service_does_not_apply() -> None:
    parent = {"group": "", "kind": "Service", "name": "b"}
    c = build([route([rule("a")], parent=parent)])
    assert backend(c, req("/")) == "front"
    assert backend(c, req("/", vip="10.96.0.12")) == "a"  # requests to service b


def test_consumer_route_applies_to_its_namespace_only() -> None:
    producer = route([rule("a")], name="producer")
    consumer = route([rule("b")], name="consumer", ns="client")
    c = build([producer, consumer], namespaces=("app", "client"))
    assert backend(c, req("/", principal="spiffe://cluster.local/ns/client/sa/x")) == "b"
    assert backend(c, req("/", principal=CLIENT)) == "a"


def test_service_found_by_host_when_vip_unknown() -> None:
    c = build([route([rule("a", prefix("/"))])])
    r = Request("GET", "/", "front.app.svc.cluster.local:80", dest_ip="", dest_port=80)
    assert backend(c, r) == "a"


def test_unknown_destination_is_404() -> None:
    c = build([])
    assert backend(c, req("/", vip="10.200.0.1")) == "404 NR"


# ----------------------------------------------------------------------------- weights


def _shares(c: Chain, draws: int = 2000) -> dict[str, float]:
    rng = random.Random(20261122)
    counts: dict[str, int] = {}
    for _ in range(draws):
        p = plan_request(c, req("/"), 0.0, rng)
        assert isinstance(p, RequestPlan)
        p.release(0.0)
        counts[p.backend.name] = counts.get(p.backend.name, 0) + 1
    return {k: 100.0 * v / draws for k, v in counts.items()}


@pytest.mark.parametrize(("wa", "wb"), [(90, 10), (50, 50), (1, 1), (3, 1)])
def test_weighted_backends_within_five_points(wa: int, wb: int) -> None:
    c = build(
        [
            route(
                [
                    {
                        "backendRefs": [
                            {"name": "a", "port": 80, "weight": wa},
                            {"name": "b", "port": 80, "weight": wb},
                        ]
                    }
                ]
            )
        ]
    )
    shares = _shares(c)
    assert abs(shares.get("a", 0) - 100 * wa / (wa + wb)) <= 5
    assert abs(shares.get("b", 0) - 100 * wb / (wa + wb)) <= 5


def test_weight_zero_backend_never_chosen() -> None:
    c = build(
        [
            route(
                [
                    {
                        "backendRefs": [
                            {"name": "a", "port": 80, "weight": 1},
                            {"name": "b", "port": 80, "weight": 0},
                        ]
                    }
                ]
            )
        ]
    )
    assert _shares(c, 300) == {"a": 100.0}


def test_all_weights_zero_is_500() -> None:
    c = build([route([{"backendRefs": [{"name": "a", "port": 80, "weight": 0}]}])])
    assert backend(c, req("/")) == "500 NR"


def test_unknown_backend_service_is_500() -> None:
    c = build([route([{"backendRefs": [{"name": "missing", "port": 80}]}])])
    assert backend(c, req("/")) == "500 NR"


def test_rule_without_backends_is_500() -> None:
    c = build([route([{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}])])
    assert backend(c, req("/")) == "500 NR"


@pytest.mark.parametrize(
    ("pfx", "path", "ok"),
    [
        ("/", "/x", True),
        ("/a", "/a", True),
        ("/a", "/a/", True),
        ("/a", "/ab", False),
        ("/a/", "/a", True),
        ("/a/b", "/a", False),
    ],
)
def test_path_prefix_semantics(pfx: str, path: str, ok: bool) -> None:
    assert path_prefix_matches(pfx, path) is ok


def test_route_attaches_by_port_name_as_section_name() -> None:
    extra = yaml.safe_load("""
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: app}
spec:
  selector: {app: front}
  clusterIP: 10.96.1.3
  ports: [{name: http-web, port: 80}, {name: http-admin, port: 81}]
""")
    parent = {"group": "", "kind": "Service", "name": "multi", "sectionName": "http-admin"}
    c = build([extra, route([rule("a")], parent=parent)])
    assert backend(c, req("/", vip="10.96.1.3", port=81)) == "a"
    assert backend(c, req("/", vip="10.96.1.3", port=80)) == "multi"


# ----------------------------------------------------------------------------- property

_PATHS = ["/", "/a", "/a/b", "/a/b/c", "/ab", "/b"]
_NAME_VALUE = {"name": st.sampled_from(["x", "y"]), "value": st.sampled_from(["1", "2"])}
_QUERY = {"name": st.sampled_from(["q", "r"]), "value": st.sampled_from(["1", "2"])}


def _by_name(h: dict[str, str]) -> str:
    return h["name"]


_OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "method": st.sampled_from(["GET", "POST"]),
    "headers": st.lists(st.fixed_dictionaries(_NAME_VALUE), max_size=2, unique_by=_by_name),
    "queryParams": st.lists(st.fixed_dictionaries(_QUERY), max_size=2, unique_by=_by_name),
}
_PATH: dict[str, st.SearchStrategy[Any]] = {
    "path": st.fixed_dictionaries(
        {
            "type": st.sampled_from(["Exact", "PathPrefix", "RegularExpression"]),
            "value": st.sampled_from(["/", "/a", "/a/b", "/a/.*", "/.*"]),
        }
    )
}
_match: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(_PATH, optional=_OPTIONAL)


def _accepts(
    m: dict[str, Any], path: str, method: str, headers: dict[str, str], query: dict[str, str]
) -> bool:
    p = m["path"]
    if p["type"] == "Exact" and path != p["value"]:
        return False
    if p["type"] == "PathPrefix" and not (
        p["value"] == "/" or path == p["value"] or path.startswith(p["value"] + "/")
    ):
        return False
    if p["type"] == "RegularExpression" and re.fullmatch(p["value"], path) is None:
        return False
    if m.get("method", method) != method:
        return False
    if any(headers.get(h["name"]) != h["value"] for h in m.get("headers", [])):
        return False
    return all(query.get(q["name"]) == q["value"] for q in m.get("queryParams", []))


def _better(a: tuple[int, int, dict[str, Any]], b: tuple[int, int, dict[str, Any]]) -> bool:
    """Whether candidate a (route index, rule index, match) beats b, rule by rule."""
    (ra, ia, ma), (rb, ib, mb) = a, b
    order = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}
    ta, tb = order[ma["path"]["type"]], order[mb["path"]["type"]]
    if ta != tb:
        return ta < tb
    la, lb = len(ma["path"]["value"]), len(mb["path"]["value"])
    if la != lb:
        return la > lb
    if ("method" in ma) != ("method" in mb):
        return "method" in ma
    for key in ("headers", "queryParams"):
        na, nb = len(ma.get(key, [])), len(mb.get(key, []))
        if na != nb:
            return na > nb
    return (ra, ia) < (rb, ib)  # routes are named r0, r1... in age order


@settings(max_examples=50, deadline=None)
@given(
    routes=st.lists(st.lists(_match, min_size=1, max_size=2), min_size=1, max_size=4),
    path=st.sampled_from(_PATHS),
    method=st.sampled_from(["GET", "POST"]),
    headers=st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(["1", "2"])),
    query=st.dictionaries(st.sampled_from(["q", "r"]), st.sampled_from(["1", "2"])),
)
def test_precedence_agrees_with_a_reference(
    routes: list[list[dict[str, Any]]],
    path: str,
    method: str,
    headers: dict[str, str],
    query: dict[str, str],
) -> None:
    names = [f"b{i}" for i in range(8)]
    manifests = []
    cands: list[tuple[int, int, dict[str, Any]]] = []
    for ri, rule_matches in enumerate(routes):
        rules = [
            {"matches": [m], "backendRefs": [{"name": names[ri * 2 + mi], "port": 80}]}
            for mi, m in enumerate(rule_matches)
        ]
        manifests.append(route(rules, name=f"r{ri}"))
        cands += [
            (ri, mi, m)
            for mi, m in enumerate(rule_matches)
            if _accepts(m, path, method, headers, query)
        ]
    c = build(manifests, backends=names, created={f"r{i}": i for i in range(4)})
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    got = backend(c, req(path + ("?" + qs if qs else ""), method, list(headers.items())))
    if not cands:
        assert got == "404 NR"
        return
    best = cands[0]
    for cand in cands[1:]:
        if _better(cand, best):
            best = cand
    assert got == names[best[0] * 2 + best[1]]


def test_host_header_match_uses_the_authority() -> None:
    c = build(
        [
            route(
                [
                    rule("a", prefix("/", headers=[hdr("Host", "front.app.svc.cluster.local")])),
                    rule("c"),
                ]
            )
        ]
    )
    assert backend(c, req("/")) == "a"  # no host header (HTTP/2): the authority counts


# ----------------------------------------------------------------------------- fast paths

_FAST_PATHS = [
    "", "/", "//", "/a", "/a/", "/a/b", "/a/b/", "/a/b/c", "/ab", "/a.b", "/b",
    "/a?q=1", "/a/b?r=2&q=1", "?q=1", "/ab?", "/a%2Fb",
]
_FAST_MATCH: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "path": st.fixed_dictionaries(
            {
                "type": st.sampled_from(["Exact", "PathPrefix", "RegularExpression"]),
                "value": st.sampled_from(["/", "/a", "/a/", "/a/b", "/ab", "/a/.*", "/.*"]),
            }
        )
    },
    optional=_OPTIONAL,
)


@settings(max_examples=60, deadline=None)
@given(
    routes=st.lists(
        st.tuples(
            st.sampled_from(["app", "other"]),
            st.lists(st.lists(_FAST_MATCH, max_size=2), min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=4,
    ),
    method=st.sampled_from(["GET", "POST"]),
    headers=st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(["1", "2"])),
)
def test_match_route_shortcuts_answer_like_the_general_matcher(
    routes: list[tuple[str, list[list[dict[str, Any]]]]],
    method: str,
    headers: dict[str, str],
) -> None:
    """`match_route` (inline path checks, lazy namespace and query) picks the very
    match `match_route_general` (every match through `accepts`) picks."""
    manifests = []
    for i, (ns, rules) in enumerate(routes):
        body = [
            {"matches": ms, "backendRefs": [{"name": "a", "namespace": "app", "port": 80}]}
            if ms
            else {"backendRefs": [{"name": "a", "namespace": "app", "port": 80}]}
            for ms in rules
        ]
        manifests.append(route(body, name=f"r{i}", ns=ns))
    c = build(manifests, namespaces=("app", "other"))
    principals = [CLIENT, "spiffe://cluster.local/ns/other/sa/x", None]
    compared = 0
    for sc in c.services.values():
        for path in _FAST_PATHS:
            for principal in principals:
                r = req(path, method, list(headers.items()), principal=principal)
                assert match_route(sc.table, r) is match_route_general(sc.table, r)
                compared += 1
    assert compared


def test_match_shapes_of_the_common_matches() -> None:
    c = build([route([rule("a", exact("/x")), rule("b", prefix("/api/")), rule("c"),
                      rule("a", prefix("/m", method="POST")), rule("b", regex("/r.*"))])])
    table = c.services[("app", "front", 80)].table
    shapes = {(m.path_type, m.path_value, m.method): m.shape for m in table.producer}
    assert shapes == {
        ("Exact", "/x", ""): 1,
        ("PathPrefix", "/api/", ""): 2,
        ("PathPrefix", "/", ""): 0,
        ("PathPrefix", "/m", "POST"): 3,
        ("RegularExpression", "/r.*", ""): 3,
    }
    assert {m.route_key for m in table.producer} == {"app/r"}
    assert next(m for m in table.producer if m.path_value == "/api/").prefix_slash == "/api/"


def _refs(weights: Sequence[int]) -> list[BackendRef]:
    return [BackendRef("", "Service", f"b{i}", "app", 80, w) for i, w in enumerate(weights)]


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(
        st.one_of(st.just(0), st.integers(1, 10), st.integers(1, 1_000_000)), max_size=6
    ),
    seed=st.integers(0, 2**32),
)
def test_weighted_choice_answers_like_pick_weighted(weights: list[int], seed: int) -> None:
    refs = _refs(weights)
    choice = WeightedChoice(refs)
    fast, slow = random.Random(seed), random.Random(seed)
    for _ in range(20):
        i = choice.pick(fast)
        want = pick_weighted(refs, slow)
        assert (refs[i] if i >= 0 else None) is want
        assert fast.getstate() == slow.getstate()  # the same draws, so later picks agree


class _Fixed(random.Random):
    """A Random whose `random()` returns the given values in turn."""

    def __init__(self, values: Sequence[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


@pytest.mark.parametrize(
    "weights", [[90, 10], [1, 0, 1], [0, 3, 0, 1, 0], [5], [0, 7], [1_000_000, 1, 999_999]]
)
def test_weighted_choice_at_the_boundaries(weights: list[int]) -> None:
    """Draws landing exactly on a cumulative weight, just below it, and the largest draw."""
    refs = _refs(weights)
    total = sum(weights)
    draws = [0.0, 1.0 - 2.0**-53]
    acc = 0
    for w in weights:
        acc += w
        draws += [acc / total, acc / total - 2.0**-53, acc / total + 2.0**-53]
    draws = [d for d in draws if 0.0 <= d < 1.0]
    choice = WeightedChoice(refs)
    for d in draws:
        i = choice.pick(_Fixed([d]))
        assert refs[i] is pick_weighted(refs, _Fixed([d])), d
