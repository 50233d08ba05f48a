"""L4 authz: Istio's ALLOW/DENY semantics, field matching, L7 handling, PeerAuthentication."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.authz import (
    ConnectionInfo,
    denied_connections,
    evaluate,
    evaluate_policies,
    peer_authentication_mode,
)
from ztunnel.identity import SpiffeId
from ztunnel.snapshot import (
    AuthorizationPolicy,
    Snapshot,
    SnapshotError,
    Workload,
)

SLEEP = SpiffeId("cluster.local", "frontend", "sleep")
ADMIN = SpiffeId("cluster.local", "ops", "admin")
FOREIGN = SpiffeId("other.org", "frontend", "sleep")

SERVER = Workload(
    uid="u-server",
    name="httpbin",
    namespace="backend",
    ip="10.0.2.1",
    node="n1",
    service_account="httpbin",
    labels={"app": "httpbin", "tier": "api"},
    trust_domain="cluster.local",
)
OTHER = Workload(
    uid="u-other",
    name="db",
    namespace="backend",
    ip="10.0.2.2",
    node="n1",
    labels={"app": "db"},
    trust_domain="cluster.local",
)


def policy(spec: dict[str, Any]) -> AuthorizationPolicy:
    """Build a policy from the JSON form (exercises the snapshot loader too)."""
    d = {"version": 1, "node": "n1", "authorization_policies": [{"name": "p", **spec}]}
    return Snapshot.from_dict(d).authorization_policies[0]


def conn(ident: SpiffeId | None = SLEEP, ip: str = "10.0.1.5", port: int = 8080) -> ConnectionInfo:
    return ConnectionInfo(ident, ip, SERVER, port)


def allow(*rules: dict[str, Any], ns: str = "backend") -> dict[str, Any]:
    return {"namespace": ns, "action": "ALLOW", "rules": list(rules)}


def deny(*rules: dict[str, Any], ns: str = "backend") -> dict[str, Any]:
    return {"namespace": ns, "action": "DENY", "rules": list(rules)}


# (description, policy spec, connection, expected allowed)
SINGLE_POLICY_CASES: list[tuple[str, dict[str, Any], ConnectionInfo, bool]] = [
    ("allow all rule", allow({}), conn(), True),
    ("empty spec allows nothing", {"namespace": "backend"}, conn(), False),
    ("empty DENY matches nothing", {"namespace": "backend", "action": "DENY"}, conn(), True),
    ("deny all rule", deny({}), conn(), False),
    # principals, exact and wildcards
    (
        "principal exact",
        allow({"from": [{"principals": ["cluster.local/ns/frontend/sa/sleep"]}]}),
        conn(),
        True,
    ),
    (
        "principal with spiffe prefix",
        allow({"from": [{"principals": ["spiffe://cluster.local/ns/frontend/sa/sleep"]}]}),
        conn(),
        True,
    ),
    (
        "principal mismatch",
        allow({"from": [{"principals": ["cluster.local/ns/frontend/sa/other"]}]}),
        conn(),
        False,
    ),
    (
        "principal prefix wildcard",
        allow({"from": [{"principals": ["cluster.local/ns/frontend/*"]}]}),
        conn(),
        True,
    ),
    ("principal suffix wildcard", allow({"from": [{"principals": ["*/sa/sleep"]}]}), conn(), True),
    ("principal * matches any identity", allow({"from": [{"principals": ["*"]}]}), conn(), True),
    (
        "principal * does not match plaintext",
        allow({"from": [{"principals": ["*"]}]}),
        conn(None),
        False,
    ),
    (
        "principal other trust domain",
        allow({"from": [{"principals": ["cluster.local/ns/frontend/sa/sleep"]}]}),
        conn(FOREIGN),
        False,
    ),
    (
        "not_principals excludes",
        allow({"from": [{"not_principals": ["cluster.local/ns/frontend/*"]}]}),
        conn(),
        False,
    ),
    (
        "not_principals lets others in",
        allow({"from": [{"not_principals": ["cluster.local/ns/frontend/*"]}]}),
        conn(ADMIN),
        True,
    ),
    (
        "not_principals * = unauthenticated only",
        allow({"from": [{"not_principals": ["*"]}]}),
        conn(None),
        True,
    ),
    # namespaces
    ("namespace match", allow({"from": [{"namespaces": ["frontend"]}]}), conn(), True),
    ("namespace mismatch", allow({"from": [{"namespaces": ["ops"]}]}), conn(), False),
    ("namespace prefix", allow({"from": [{"namespaces": ["front*"]}]}), conn(), True),
    ("namespace plaintext", allow({"from": [{"namespaces": ["frontend"]}]}), conn(None), False),
    ("not_namespaces", allow({"from": [{"not_namespaces": ["frontend"]}]}), conn(), False),
    ("not_namespaces other", allow({"from": [{"not_namespaces": ["ops"]}]}), conn(), True),
    # ip blocks
    ("ip block match", allow({"from": [{"ip_blocks": ["10.0.1.0/24"]}]}), conn(), True),
    ("ip single address", allow({"from": [{"ip_blocks": ["10.0.1.5"]}]}), conn(), True),
    ("ip block mismatch", allow({"from": [{"ip_blocks": ["10.0.9.0/24"]}]}), conn(), False),
    ("ip block plaintext", allow({"from": [{"ip_blocks": ["10.0.1.0/24"]}]}), conn(None), True),
    ("ipv6 block", allow({"from": [{"ip_blocks": ["fd00::/64"]}]}), conn(ip="fd00::5"), True),
    (
        "v4-mapped v6 source",
        allow({"from": [{"ip_blocks": ["10.0.1.0/24"]}]}),
        conn(ip="::ffff:10.0.1.5"),
        True,
    ),
    ("family mismatch", allow({"from": [{"ip_blocks": ["fd00::/64"]}]}), conn(), False),
    ("not_ip_blocks", allow({"from": [{"not_ip_blocks": ["10.0.1.0/28"]}]}), conn(), False),
    ("not_ip_blocks other", allow({"from": [{"not_ip_blocks": ["10.9.0.0/16"]}]}), conn(), True),
    # all fields of one source must match
    (
        "source fields AND",
        allow({"from": [{"namespaces": ["frontend"], "ip_blocks": ["10.9.0.0/16"]}]}),
        conn(),
        False,
    ),
    # sources are ORed
    (
        "sources OR",
        allow({"from": [{"namespaces": ["ops"]}, {"ip_blocks": ["10.0.0.0/8"]}]}),
        conn(),
        True,
    ),
    # ports
    ("port match", allow({"to": [{"ports": [8080]}]}), conn(), True),
    ("port mismatch", allow({"to": [{"ports": [9090]}]}), conn(), False),
    ("not_ports", allow({"to": [{"not_ports": [8080]}]}), conn(), False),
    ("not_ports other", allow({"to": [{"not_ports": [22]}]}), conn(), True),
    ("ports OR", allow({"to": [{"ports": [1]}, {"ports": [8080]}]}), conn(), True),
    # from AND to
    (
        "from and to both needed",
        allow({"from": [{"namespaces": ["frontend"]}], "to": [{"ports": [9090]}]}),
        conn(),
        False,
    ),
    (
        "from and to both match",
        allow({"from": [{"namespaces": ["frontend"]}], "to": [{"ports": [8080]}]}),
        conn(),
        True,
    ),
    # rules are ORed
    (
        "rules OR",
        allow({"to": [{"ports": [1]}]}, {"from": [{"namespaces": ["frontend"]}]}),
        conn(),
        True,
    ),
    # when conditions
    (
        "when source.ip",
        allow({"when": [{"key": "source.ip", "values": ["10.0.1.0/24"]}]}),
        conn(),
        True,
    ),
    (
        "when not destination.port",
        allow({"when": [{"key": "destination.port", "not_values": ["8080"]}]}),
        conn(),
        False,
    ),
    (
        "when source.principal wildcard",
        allow({"when": [{"key": "source.principal", "values": ["*/sa/sleep"]}]}),
        conn(),
        True,
    ),
    (
        "when source.namespace",
        allow({"when": [{"key": "source.namespace", "values": ["ops"]}]}),
        conn(),
        False,
    ),
    (
        "when destination.ip",
        allow({"when": [{"key": "destination.ip", "values": ["10.0.2.0/24"]}]}),
        conn(),
        True,
    ),
    # L7 handling
    (
        "ALLOW rule with L7 never matches",
        allow({"from": [{"namespaces": ["frontend"]}], "l7_fields": ["methods"]}),
        conn(),
        False,
    ),
    (
        "DENY rule with L7 denies on its L4 part",
        deny({"from": [{"namespaces": ["frontend"]}], "to": [{}], "l7_fields": ["paths"]}),
        conn(),
        False,
    ),
    (
        "DENY rule with L7 whose L4 part does not match",
        deny({"from": [{"namespaces": ["ops"]}], "l7_fields": ["methods"]}),
        conn(),
        True,
    ),
    (
        "DENY rule only L7 denies everything",
        deny({"to": [{}], "l7_fields": ["methods"]}),
        conn(None),
        False,
    ),
    # DENY field matching
    ("DENY by ip", deny({"from": [{"ip_blocks": ["10.0.1.5/32"]}]}), conn(), False),
    ("DENY non-matching", deny({"from": [{"ip_blocks": ["10.0.7.0/24"]}]}), conn(), True),
]


@pytest.mark.parametrize(
    ("spec", "connection", "expected"),
    [pytest.param(s, c, e, id=d) for d, s, c, e in SINGLE_POLICY_CASES],
)
def test_single_policy(spec: dict[str, Any], connection: ConnectionInfo, expected: bool) -> None:
    d = evaluate_policies([policy(spec)], connection)
    assert d.allowed is expected, d.reason
    assert d.reason


def test_no_policies_allows() -> None:
    d = evaluate_policies([], conn())
    assert d.allowed and d.policy is None and "no ALLOW policy" in d.reason


def test_deny_wins_over_allow_and_names_policy() -> None:
    a = policy(allow({}))
    d = policy(deny({"from": [{"namespaces": ["frontend"]}]}) | {"name": "block-frontend"})
    dec = evaluate_policies([a, d], conn())
    assert not dec.allowed
    assert dec.policy == "backend/block-frontend"
    assert "DENY" in dec.reason and "frontend" in dec.reason


def test_any_allow_allows_and_otherwise_denied_lists_policies() -> None:
    a1 = policy(allow({"from": [{"namespaces": ["ops"]}]}) | {"name": "ops-only"})
    a2 = policy(allow({"from": [{"namespaces": ["frontend"]}]}) | {"name": "frontend"})
    ok = evaluate_policies([a1, a2], conn())
    assert ok.allowed and ok.policy == "backend/frontend"
    no = evaluate_policies([a1], conn())
    assert not no.allowed and "backend/ops-only" in no.reason


def test_l7_deny_reason_explains() -> None:
    d = policy(deny({"l7_fields": ["methods", "paths"]}))
    dec = evaluate_policies([d], conn())
    assert not dec.allowed
    assert "methods, paths" in dec.reason and "waypoint" in dec.reason
    a = policy(allow({"l7_fields": ["hosts"]}))
    dec = evaluate_policies([a], conn())
    assert not dec.allowed and "waypoint" in dec.reason


def scoped_snapshot(*policies: dict[str, Any], **extra: Any) -> Snapshot:
    server = {
        "uid": "u-server",
        "name": "httpbin",
        "namespace": "backend",
        "ip": "10.0.2.1",
        "node": "n1",
        "service_account": "httpbin",
        "labels": {"app": "httpbin", "tier": "api"},
    }
    other = {
        "uid": "u-other",
        "name": "db",
        "namespace": "backend",
        "ip": "10.0.2.2",
        "node": "n1",
        "labels": {"app": "db"},
    }
    elsewhere = {
        "uid": "u-x",
        "name": "x",
        "namespace": "other",
        "ip": "10.0.3.1",
        "node": "n1",
        "labels": {"app": "httpbin"},
    }
    pols = [{"name": f"p{i}", **p} for i, p in enumerate(policies)]
    return Snapshot.from_dict(
        {
            "version": 1,
            "node": "n1",
            "workloads": [server, other, elsewhere],
            "authorization_policies": pols,
            **extra,
        }
    )


def verdicts(s: Snapshot, ident: SpiffeId | None = SLEEP) -> dict[str, bool]:
    out = {}
    for uid in ("u-server", "u-other", "u-x"):
        w = s.workload_by_uid(uid)
        assert w is not None
        out[w.name] = evaluate(s, ConnectionInfo(ident, "10.0.1.5", w, 8080)).allowed
    return out


def test_scopes_mesh_namespace_selector_and_target_refs() -> None:
    # mesh-wide DENY in the root namespace hits every workload
    assert verdicts(scoped_snapshot(deny({}, ns="istio-system"))) == {
        "httpbin": False,
        "db": False,
        "x": False,
    }
    # namespace-wide allow-nothing only in backend
    assert verdicts(scoped_snapshot({"namespace": "backend"})) == {
        "httpbin": False,
        "db": False,
        "x": True,
    }
    # selector narrows to labelled workloads of the policy's namespace
    sel = {"namespace": "backend", "selector": {"app": "httpbin"}}
    assert verdicts(scoped_snapshot(sel)) == {"httpbin": False, "db": True, "x": True}
    # a root-namespace policy with a selector applies to matching workloads mesh-wide
    root_sel = {"namespace": "istio-system", "selector": {"app": "httpbin"}}
    assert verdicts(scoped_snapshot(root_sel)) == {"httpbin": False, "db": True, "x": False}
    # targetRefs policies belong to waypoints: ztunnel ignores them
    tr = {"namespace": "backend", "target_refs": [{"kind": "Service", "name": "httpbin"}]}
    assert verdicts(scoped_snapshot(tr)) == {"httpbin": True, "db": True, "x": True}


def test_custom_root_namespace() -> None:
    s = scoped_snapshot(deny({}, ns="mesh-root"), root_namespace="mesh-root")
    assert verdicts(s) == {"httpbin": False, "db": False, "x": False}
    s2 = scoped_snapshot(deny({}, ns="istio-system"), root_namespace="mesh-root")
    assert verdicts(s2) == {"httpbin": True, "db": True, "x": True}


def pa(name: str, ns: str, mode: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "namespace": ns, "mode": mode, **kw}


@pytest.mark.parametrize(
    ("pas", "expected_server", "expected_other"),
    [
        ([], "PERMISSIVE", "PERMISSIVE"),
        ([pa("mesh", "istio-system", "STRICT")], "STRICT", "STRICT"),
        (
            [pa("mesh", "istio-system", "STRICT"), pa("ns", "backend", "PERMISSIVE")],
            "PERMISSIVE",
            "PERMISSIVE",
        ),
        (
            [
                pa("mesh", "istio-system", "PERMISSIVE"),
                pa("ns", "backend", "UNSET"),
                pa("w", "backend", "STRICT", selector={"app": "httpbin"}),
            ],
            "STRICT",
            "PERMISSIVE",
        ),
        (
            [pa("mesh", "istio-system", "STRICT"), pa("ns", "backend", "UNSET")],
            "STRICT",
            "STRICT",
        ),
        (
            [pa("ns", "backend", "STRICT"), pa("w", "backend", "DISABLE", selector={"app": "db"})],
            "STRICT",
            "PERMISSIVE",
        ),
        ([pa("elsewhere", "other", "STRICT")], "PERMISSIVE", "PERMISSIVE"),
    ],
)
def test_peer_authentication_precedence(
    pas: list[dict[str, Any]], expected_server: str, expected_other: str
) -> None:
    s = scoped_snapshot(peer_authentications=pas)
    server = s.workload_by_uid("u-server")
    other = s.workload_by_uid("u-other")
    assert server is not None and other is not None
    assert peer_authentication_mode(s, server) == expected_server
    assert peer_authentication_mode(s, other) == expected_other


def test_port_level_mtls() -> None:
    s = scoped_snapshot(
        peer_authentications=[
            pa(
                "w",
                "backend",
                "STRICT",
                selector={"app": "httpbin"},
                port_mtls={"9000": "PERMISSIVE", "9001": "UNSET"},
            )
        ]
    )
    server = s.workload_by_uid("u-server")
    assert server is not None
    assert peer_authentication_mode(s, server, 8080) == "STRICT"
    assert peer_authentication_mode(s, server, 9000) == "PERMISSIVE"
    assert peer_authentication_mode(s, server, 9001) == "STRICT"


def test_strict_denies_plaintext_permissive_accepts() -> None:
    s = scoped_snapshot(peer_authentications=[pa("ns", "backend", "STRICT")])
    server = s.workload_by_uid("u-server")
    assert server is not None
    plain = evaluate(s, ConnectionInfo(None, "10.0.1.5", server, 8080))
    assert not plain.allowed and "STRICT" in plain.reason and plain.policy == "backend/ns"
    assert evaluate(s, ConnectionInfo(SLEEP, "10.0.1.5", server, 8080)).allowed
    s2 = scoped_snapshot(peer_authentications=[pa("ns", "backend", "PERMISSIVE")])
    server2 = s2.workload_by_uid("u-server")
    assert server2 is not None
    assert evaluate(s2, ConnectionInfo(None, "10.0.1.5", server2, 8080)).allowed


def test_denied_connections_after_policy_change() -> None:
    before = scoped_snapshot()
    server = before.workload_by_uid("u-server")
    other = before.workload_by_uid("u-other")
    assert server is not None and other is not None
    conns = {
        1: ConnectionInfo(SLEEP, "10.0.1.5", server, 8080),
        2: ConnectionInfo(ADMIN, "10.0.1.6", server, 8080),
        3: ConnectionInfo(SLEEP, "10.0.1.5", other, 5432),
    }
    assert denied_connections(before, conns) == []
    after = scoped_snapshot(
        deny({"from": [{"namespaces": ["frontend"]}]}) | {"selector": {"app": "httpbin"}}
    )
    denied = denied_connections(after, conns)
    assert [k for k, _ in denied] == [1]
    assert denied[0][1].policy == "backend/p0"


def test_denied_connections_sees_label_changes_and_removed_workloads() -> None:
    before = scoped_snapshot(deny({}) | {"selector": {"app": "httpbin"}, "namespace": "backend"})
    other = before.workload_by_uid("u-other")
    x = before.workload_by_uid("u-x")
    assert other is not None and x is not None
    conns = {"db": ConnectionInfo(SLEEP, "10.0.1.5", other, 5432)}
    assert denied_connections(before, conns) == []
    d = before.to_dict()
    d["workloads"][1]["labels"] = {"app": "httpbin"}  # db relabelled into the DENY selector
    relabelled = Snapshot.from_dict(d)
    assert [k for k, _ in denied_connections(relabelled, conns)] == ["db"]
    d2 = before.to_dict()
    d2["workloads"] = [w for w in d2["workloads"] if w["uid"] != "u-other"]
    gone = Snapshot.from_dict(d2)
    res = denied_connections(gone, conns)
    assert len(res) == 1 and "no longer" in res[0][1].reason


def test_invalid_condition_keys_are_rejected_at_load() -> None:
    with pytest.raises(SnapshotError) as ei:
        policy(allow({"when": [{"key": "request.headers[x]", "values": ["a"]}]}))
    assert ei.value.path == "authorization_policies[0].rules[0].when[0].key"
    with pytest.raises(SnapshotError):
        policy(allow({"when": [{"key": "source.ip", "values": ["nope"]}]}))
    with pytest.raises(SnapshotError):
        policy(allow({"when": [{"key": "source.ip"}]}))


# ----------------------------------------------------------------------------- properties

_idents = st.sampled_from([SLEEP, ADMIN, FOREIGN, None])
_ips = st.sampled_from(["10.0.1.5", "10.0.9.1", "192.168.1.1", "fd00::5"])
_ports = st.sampled_from([80, 8080, 9090])
_principal_patterns = st.sampled_from(
    ["*", "cluster.local/ns/frontend/sa/sleep", "*/sa/admin", "other.org/*", "x"]
)
_ns_patterns = st.sampled_from(["*", "frontend", "ops", "front*", "*ps"])
_blocks = st.sampled_from(["10.0.0.0/8", "10.0.1.0/24", "fd00::/16", "192.168.1.1"])


def _small(elems: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(elems, max_size=2, unique=True)


_sources = st.fixed_dictionaries(
    {},
    optional={
        "principals": _small(_principal_patterns),
        "not_principals": _small(_principal_patterns),
        "namespaces": _small(_ns_patterns),
        "not_namespaces": _small(_ns_patterns),
        "ip_blocks": _small(_blocks),
        "not_ip_blocks": _small(_blocks),
    },
)
_operations = st.fixed_dictionaries(
    {}, optional={"ports": _small(_ports), "not_ports": _small(_ports)}
)
_rules = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(_sources, max_size=2),
        "to": st.lists(_operations, max_size=2),
        "l7_fields": st.sampled_from([["methods"], ["paths", "hosts"]]),
    },
)
_specs = st.builds(
    lambda action, rules: {"namespace": "backend", "action": action, "rules": rules},
    st.sampled_from(["ALLOW", "DENY"]),
    st.lists(_rules, max_size=3),
)
_conns = st.builds(conn, _idents, _ips, _ports)
PROPS = settings(max_examples=120, deadline=None)


def _policies(specs: list[dict[str, Any]]) -> list[AuthorizationPolicy]:
    return [policy(s | {"name": f"p{i}"}) for i, s in enumerate(specs)]


@PROPS
@given(st.lists(_specs, max_size=3), st.lists(_rules, max_size=3), _conns)
def test_adding_a_deny_policy_never_grants_access(
    specs: list[dict[str, Any]], rules: list[dict[str, Any]], c: ConnectionInfo
) -> None:
    base_pols = _policies(specs)
    extra = policy({"name": "extra", "namespace": "backend", "action": "DENY", "rules": rules})
    if evaluate_policies([*base_pols, extra], c).allowed:
        assert evaluate_policies(base_pols, c).allowed


@PROPS
@given(st.lists(_specs, max_size=3), st.lists(_rules, min_size=1, max_size=3), _conns)
def test_l7_allow_rules_never_grant_access_at_l4(
    specs: list[dict[str, Any]], rules: list[dict[str, Any]], c: ConnectionInfo
) -> None:
    base_pols = _policies(specs)
    l7_rules = [r | {"l7_fields": ["methods"]} for r in rules]
    extra = policy({"name": "l7", "namespace": "backend", "rules": l7_rules})
    if evaluate_policies([*base_pols, extra], c).allowed:
        assert evaluate_policies(base_pols, c).allowed


@PROPS
@given(
    st.sampled_from(
        [
            ("principals", _principal_patterns),
            ("namespaces", _ns_patterns),
            ("ip_blocks", _blocks),
            ("ports", _ports),
        ]
    ).flatmap(lambda kv: st.tuples(st.just(kv[0]), st.lists(kv[1], min_size=1, max_size=2))),
    _conns,
)
def test_not_forms_are_complements(field_values: tuple[str, list[Any]], c: ConnectionInfo) -> None:
    name, values = field_values
    side = "to" if name == "ports" else "from"
    pos = policy(allow({side: [{name: values}]}))
    neg = policy(allow({side: [{f"not_{name}": values}]}))
    assert evaluate_policies([pos], c).allowed != evaluate_policies([neg], c).allowed
