"""Snapshot schema: validation with field paths, indexes, JSON round trip, example file."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from ztunnel.snapshot import (
    AuthorizationPolicy,
    Endpoint,
    FrozenMap,
    Service,
    ServicePort,
    Snapshot,
    SnapshotError,
    Waypoint,
    WaypointRef,
    Workload,
    local_workload_changes,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "ztunnel" / "examples" / "local-config.json"


def base() -> dict[str, Any]:
    return {
        "version": 3,
        "node": "n1",
        "workloads": [
            {"uid": "u1", "name": "a", "namespace": "ns1", "ip": "10.0.0.1", "node": "n1"},
            {"uid": "u2", "name": "b", "namespace": "ns2", "ip": "10.0.0.2", "node": "n2"},
        ],
        "services": [
            {
                "name": "svc",
                "namespace": "ns2",
                "vips": ["10.96.0.1"],
                "ports": [{"port": 80, "target_port": 8080}],
                "endpoints": [{"workload_uid": "u2"}],
            }
        ],
    }


def load(d: dict[str, Any]) -> Snapshot:
    return Snapshot.from_json(json.dumps(d))


def error_of(d: dict[str, Any]) -> SnapshotError:
    with pytest.raises(SnapshotError) as ei:
        load(d)
    return ei.value


def test_example_local_config_loads_and_indexes() -> None:
    s = Snapshot.from_file(EXAMPLE)
    assert s.node == "node-1"
    assert {w.name for w in s.local_workloads} == {"sleep-1", "httpbin-1"}
    svc = s.service_by_hostname("httpbin.default.svc.cluster.local.")
    assert svc is not None and svc.vips == ("10.96.0.10",)
    assert s.service_by_vip("10.96.0.10") is svc
    wl = s.workload_by_ip("10.10.1.11")
    assert wl is not None and wl.identity == "spiffe://cluster.local/ns/default/sa/sleep"


def test_loading_twice_gives_equal_snapshots_and_round_trips() -> None:
    a = Snapshot.from_file(EXAMPLE)
    b = Snapshot.from_file(EXAMPLE)
    assert a == b
    again = Snapshot.from_json(a.to_json())
    assert again == a
    assert again.to_json() == a.to_json()
    assert Snapshot.from_json(a.to_json(indent=None)) == a


def test_defaults_filled_from_snapshot() -> None:
    d = base()
    d["trust_domain"] = "example.org"
    d["dns_domain"] = "corp.local"
    s = load(d)
    assert s.workloads[0].identity == "spiffe://example.org/ns/ns1/sa/default"
    assert s.services[0].hostname == "svc.ns2.svc.corp.local"
    assert s.services[0].ports[0].target_port == 8080
    assert s.root_namespace == "istio-system"


def test_target_port_defaults_to_port_and_endpoint_override() -> None:
    sp = ServicePort(port=80)
    assert sp.target_port == 80
    ep = Endpoint(workload_uid="u", ports={80: 9090})
    assert ep.target_port(sp) == 9090
    assert ep.target_port(ServicePort(port=81, target_port=8081)) == 8081


def test_snapshot_is_immutable_and_hashable_parts() -> None:
    s = load(base())
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.version = 4  # type: ignore[misc]
    w = s.workloads[0]
    assert isinstance(w.labels, FrozenMap)
    with pytest.raises(TypeError):
        w.labels["x"] = "y"  # type: ignore[index]
    assert hash(w) == hash(load(base()).workloads[0])
    assert isinstance(s.workloads, tuple)


def test_python_construction_coerces_lists_and_dicts() -> None:
    w = Workload(
        uid="u",
        name="n",
        namespace="ns",
        ip="fd00::0001",
        node="n1",
        labels={"app": "x"},
        ports=[80],  # type: ignore[arg-type]
    )
    assert w.ip == "fd00::1"
    assert w.labels == {"app": "x"} and isinstance(w.labels, FrozenMap)
    assert w.ports == (80,)
    assert w.accepts_port(80) and not w.accepts_port(81)
    s = Snapshot(version=1, node="n1", workloads=[w])  # type: ignore[arg-type]
    assert s.workload_by_ip("fd00:0::1") == s.workloads[0]
    assert s.workloads[0].trust_domain == "cluster.local"


@pytest.mark.parametrize(
    ("mutate", "path", "words"),
    [
        (lambda d: d["workloads"][1].update(ip="10.0.0.300"), "workloads[1].ip", "not an IP"),
        (lambda d: d["workloads"][0].pop("namespace"), "workloads[0].namespace", "missing"),
        (lambda d: d["workloads"][0].update(nmespace="x"), "workloads[0].nmespace", "unknown"),
        (lambda d: d["workloads"][1].update(ip="10.0.0.1"), "workloads[1].ip", "already"),
        (lambda d: d["workloads"][1].update(uid="u1"), "workloads[1].uid", "twice"),
        (lambda d: d["workloads"][0].update(weight=0), "workloads[0].weight", ">= 1"),
        (lambda d: d["workloads"][0].update(enrolled="yes"), "workloads[0].enrolled", "true"),
        (lambda d: d["workloads"][0].update(ip6="10.0.0.9"), "workloads[0].ip6", "IPv6"),
        (lambda d: d["workloads"][0].update(ports=[0]), "workloads[0].ports[0]", "range"),
        (
            lambda d: d["workloads"][0].update(waypoint={"address": "10.0.0.9", "identity": "x"}),
            "workloads[0].waypoint.identity",
            "spiffe",
        ),
        (lambda d: d["services"][0]["vips"].append("nope"), "services[0].vips[1]", "not an IP"),
        (
            lambda d: d["services"][0]["ports"][0].update(target_port=70000),
            "services[0].ports[0].target_port",
            "range",
        ),
        (
            lambda d: d["services"][0]["endpoints"].append({"workload_uid": "ghost"}),
            "services[0].endpoints[1].workload_uid",
            "ghost",
        ),
        (
            lambda d: d["services"].append(
                {"name": "other", "namespace": "ns2", "vips": ["10.96.0.1"]}
            ),
            "services[1].vips[0]",
            "already a VIP of service ns2/svc",
        ),
        (
            lambda d: d["services"].append({"name": "svc", "namespace": "ns2"}),
            "services[1].hostname",
            "already",
        ),
        (
            lambda d: d["services"][0].update(traffic_distribution="Nearest"),
            "services[0].traffic_distribution",
            "PreferClose",
        ),
        (lambda d: d["services"][0].update(vips=["10.0.0.1"]), "services[0].vips[0]", "workload"),
        (lambda d: d.update(version=-1), "version", ">= 0"),
        (lambda d: d.update(node=""), "node", "empty"),
        (lambda d: d.update(dns_domain="bad domain"), "dns_domain", "domain"),
        (lambda d: d.update(trust_domain="bad/td"), "trust_domain", "domain"),
        (
            lambda d: d.update(
                authorization_policies=[{"name": "p", "namespace": "ns1", "action": "CUSTOM"}]
            ),
            "authorization_policies[0].action",
            "ALLOW or DENY",
        ),
        (
            lambda d: d.update(
                authorization_policies=[
                    {
                        "name": "p",
                        "namespace": "ns1",
                        "rules": [{"from": [{"ip_blocks": ["10.0.0.0/33"]}]}],
                    }
                ]
            ),
            "authorization_policies[0].rules[0].from[0].ip_blocks[0]",
            "CIDR",
        ),
        (
            lambda d: d.update(
                authorization_policies=[
                    {
                        "name": "p",
                        "namespace": "ns1",
                        "selector": {"a": "b"},
                        "target_refs": [{"kind": "Service", "name": "s"}],
                    }
                ]
            ),
            "authorization_policies[0].target_refs",
            "either",
        ),
        (
            lambda d: d.update(
                peer_authentications=[{"name": "p", "namespace": "ns1", "mode": "strict"}]
            ),
            "peer_authentications[0].mode",
            "STRICT",
        ),
        (
            lambda d: d.update(
                peer_authentications=[
                    {"name": "p", "namespace": "ns1", "port_mtls": {"80": "DISABLE"}}
                ]
            ),
            "peer_authentications[0].port_mtls",
            "selector",
        ),
    ],
)
def test_validation_errors_name_the_field_path(mutate: Any, path: str, words: str) -> None:
    d = copy.deepcopy(base())
    mutate(d)
    err = error_of(d)
    assert err.path == path, str(err)
    assert words in str(err)
    assert str(err).startswith(path + ":")


def test_not_json_and_wrong_types_are_reported() -> None:
    with pytest.raises(SnapshotError, match="not valid JSON"):
        Snapshot.from_json("{")
    with pytest.raises(SnapshotError, match="expected an object"):
        Snapshot.from_json("[]")
    d = base()
    d["workloads"] = {"a": 1}
    assert error_of(d).path == "workloads"


def test_from_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(SnapshotError, match="cannot read snapshot file"):
        Snapshot.from_file(missing)
    bad = tmp_path / "bad.json"
    d = base()
    d["workloads"][0]["ip"] = "x"
    bad.write_text(json.dumps(d))
    with pytest.raises(SnapshotError) as ei:
        Snapshot.from_file(bad)
    assert ei.value.path == "workloads[0].ip" and str(bad) in str(ei.value)


def test_ports_may_be_numeric_strings() -> None:
    d = base()
    d["authorization_policies"] = [
        {"name": "p", "namespace": "ns1", "rules": [{"to": [{"ports": ["8080"]}]}]}
    ]
    s = load(d)
    assert s.authorization_policies[0].rules[0].to[0].ports == (8080,)


def test_policy_indexes_and_scope() -> None:
    d = base()
    d["workloads"][0]["labels"] = {"app": "a"}
    d["authorization_policies"] = [
        {"name": "mesh", "namespace": "istio-system", "action": "DENY"},
        {"name": "ns", "namespace": "ns1"},
        {"name": "sel", "namespace": "ns1", "selector": {"app": "a"}},
        {"name": "other-sel", "namespace": "ns1", "selector": {"app": "zzz"}},
        {"name": "wp", "namespace": "ns1", "target_refs": [{"kind": "Service", "name": "s"}]},
        {"name": "elsewhere", "namespace": "ns2"},
        {"name": "mesh-sel", "namespace": "istio-system", "selector": {"app": "a"}},
    ]
    s = load(d)
    names = [p.name for p in s.policies_for(s.workloads[0])]
    assert names == ["mesh", "mesh-sel", "ns", "sel"]
    assert [p.name for p in s.policies_in_namespace("ns2")] == ["elsewhere"]
    scopes = {p.name: p.scope(s.root_namespace) for p in s.authorization_policies}
    assert scopes["mesh"] == "mesh" and scopes["ns"] == "namespace"
    assert scopes["sel"] == "selector" and scopes["wp"] == "target_refs"


def test_services_of_and_waypoints() -> None:
    d = base()
    d["waypoints"] = [
        {
            "name": "wp",
            "namespace": "ns2",
            "address": "10.0.0.50",
            "identity": "spiffe://cluster.local/ns/ns2/sa/wp",
        }
    ]
    d["services"][0]["waypoint"] = {
        "address": "10.0.0.50",
        "identity": "spiffe://cluster.local/ns/ns2/sa/wp",
    }
    s = load(d)
    assert [x.name for x in s.services_of("u2")] == ["svc"]
    assert s.services_of("u1") == ()
    wp = s.waypoint_by_address("10.0.0.50")
    assert isinstance(wp, Waypoint)
    assert (
        s.services[0].waypoint
        == wp.ref()
        == WaypointRef(address="10.0.0.50", identity="spiffe://cluster.local/ns/ns2/sa/wp")
    )
    assert s == Snapshot.from_json(s.to_json())


def test_direct_construction_matches_json() -> None:
    s = Snapshot(
        version=3,
        node="n1",
        workloads=(
            Workload(uid="u1", name="a", namespace="ns1", ip="10.0.0.1", node="n1"),
            Workload(uid="u2", name="b", namespace="ns2", ip="10.0.0.2", node="n2"),
        ),
        services=(
            Service(
                name="svc",
                namespace="ns2",
                vips=("10.96.0.1",),
                ports=(ServicePort(port=80, target_port=8080),),
                endpoints=(Endpoint(workload_uid="u2"),),
            ),
        ),
    )
    assert s == load(base())
    assert AuthorizationPolicy(name="p", namespace="ns").rules == ()


def test_local_workload_changes() -> None:
    old = load(base())
    d = base()
    d["workloads"][0]["labels"] = {"app": "new"}
    d["workloads"].append(
        {"uid": "u3", "name": "c", "namespace": "ns1", "ip": "10.0.0.3", "node": "n1"}
    )
    new = load(d)
    ch = local_workload_changes(old, new)
    assert [w.uid for w in ch.added] == ["u3"]
    assert [w.uid for w in ch.changed] == ["u1"] and ch.changed[0].labels == {"app": "new"}
    assert ch.removed == ()
    back = local_workload_changes(new, old)
    assert [w.uid for w in back.removed] == ["u3"]
    assert not local_workload_changes(old, load(base()))
    first = local_workload_changes(None, old)
    assert [w.uid for w in first.added] == ["u1"]  # u2 is on another node
