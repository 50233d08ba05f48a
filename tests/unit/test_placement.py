"""Placing unannotated WorkloadEntries by claimed address: planning, the index, the local scan."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import yaml

from config.placement import (
    MAX_CLAIMS,
    MAX_CLAIMS_BYTES,
    MAX_NETNS_LEN,
    Claim,
    ClaimsError,
    Conflict,
    bound_claims,
    conflicts_for,
    parse_claims,
    plan_placement,
)
from config.resources import parse_resource
from config.snapshot import MeshIndex, NodeViews
from ztunnel.discovery import AddressDiscovery, NetnsScan, plan_claims

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db, namespace: shop}
spec: {address: 10.3.0.7, serviceAccount: db, labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: cache, namespace: shop, annotations: {ambit.dev/netns: cache-ns}}
spec: {address: 10.3.0.8, serviceAccount: cache}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: shop, annotations: {ambit.dev/node: node-c}}
spec: {address: 10.3.0.9, serviceAccount: web}
"""


def index() -> MeshIndex:
    idx = MeshIndex()
    idx.load([parse_resource(d) for d in yaml.safe_load_all(MESH)], 1)
    return idx


def local(idx: MeshIndex, node: str) -> dict[str, str | None]:
    """Names of the workloads `node` runs, with their netns."""
    return {w.name: w.netns for w in idx.node_snapshot(node).local_workloads}


# -- config.placement ---------------------------------------------------------------


def test_an_address_claimed_by_one_node_is_placed_there_with_its_netns() -> None:
    p = plan_placement({"node-a": {"10.3.0.7": "ns-db"}, "node-b": {"10.3.0.20": "x"}})
    assert p.lookup("10.3.0.7") == Claim("node-a", "ns-db")
    assert p.lookup("10.3.0.99") is None
    assert p.lookup("not-an-ip") is None
    assert not p.conflicts


def test_an_address_claimed_by_two_nodes_is_placed_nowhere_and_names_both() -> None:
    p = plan_placement({"node-b": {"10.3.0.7": "x"}, "node-a": {"10.3.0.7": "y"}})
    assert p.lookup("10.3.0.7") is None
    assert p.conflicts == {"10.3.0.7": ("node-a", "node-b")}
    [c] = conflicts_for(p, [("shop/db", "10.3.0.7"), ("shop/web", "10.3.0.9")])
    assert c == Conflict("shop/db", "10.3.0.7", ("node-a", "node-b"))
    assert "node-a, node-b" in c.message() and "ambit.dev/node" in c.message()


def test_ipv6_claims_match_any_spelling_of_the_address() -> None:
    p = plan_placement({"node-a": parse_claims({"[fd00:0:0::7]": "w"})})
    assert p.lookup("fd00::7") == Claim("node-a", "w")


def test_changed_addresses_lists_moved_new_gone_and_contested_ones() -> None:
    a = plan_placement({"n1": {"10.0.0.1": "x", "10.0.0.2": "y", "10.0.0.3": "z"}})
    b = plan_placement({"n1": {"10.0.0.1": "x", "10.0.0.2": "other"},
                        "n2": {"10.0.0.1": "q", "10.0.0.4": "w"}})
    assert a.changed_addresses(b) == {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"}
    assert a.changed_addresses(a) == set()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (["10.0.0.1"], "must be an object"),
        ({"10.0.0.1": 5}, "must be strings"),
        ({"10.0.0.300": "w"}, "not an IP address"),
        ({"10.0.0.1": ""}, "bad netns"),
        ({"10.0.0.1": "x" * 200}, "bad netns"),
        ({f"10.1.{i // 256}.{i % 256}": "w" for i in range(MAX_CLAIMS + 1)}, "at most"),
    ],
)
def test_malformed_claims_are_refused_with_the_reason(raw: object, reason: str) -> None:
    with pytest.raises(ClaimsError, match=reason):
        parse_claims(raw)


# -- MeshIndex --------------------------------------------------------------------


def test_unannotated_entry_runs_on_the_claiming_node_only() -> None:
    idx = index()
    assert "db" not in local(idx, "node-a")
    assert idx.set_claims("node-a", {"10.3.0.7": "/proc/77/ns/net"}) is True
    assert local(idx, "node-a") == {"db": "/proc/77/ns/net"}
    assert "db" not in local(idx, "node-b")
    assert idx.nodes() >= {"node-a", "node-c"}


def test_netns_annotation_wins_over_the_claimed_netns() -> None:
    idx = index()
    idx.set_claims("node-b", {"10.3.0.8": "somewhere-else"})
    assert local(idx, "node-b") == {"cache": "cache-ns"}


def test_node_annotation_wins_over_any_claim() -> None:
    idx = index()
    assert idx.set_claims("node-a", {"10.3.0.9": "web-ns"}) is False
    assert "web" not in local(idx, "node-a")
    assert "web" in local(idx, "node-c")


def test_contested_address_places_the_entry_nowhere_until_one_node_lets_go() -> None:
    idx = index()
    idx.set_claims("node-a", {"10.3.0.7": "a"})
    idx.set_claims("node-b", {"10.3.0.7": "b"})
    assert "db" not in local(idx, "node-a") and "db" not in local(idx, "node-b")
    assert idx.unplaced_conflicts() == [Conflict("shop/db", "10.3.0.7", ("node-a", "node-b"))]
    assert idx.set_claims("node-a", None) is True  # node-a disconnected
    assert local(idx, "node-b") == {"db": "b"}
    assert idx.unplaced_conflicts() == []


def test_claims_of_addresses_no_entry_uses_change_nothing() -> None:
    idx = index()
    views = NodeViews(idx)
    assert idx.set_claims("node-a", {"10.9.9.9": "x"}) is False
    assert idx.set_claims("node-a", {"10.9.9.9": "x"}) is False
    assert views.refresh() == set()


def test_node_views_carry_the_move_of_a_placed_entry() -> None:
    idx = index()
    views = NodeViews(idx)
    idx.set_claims("node-a", {"10.3.0.7": "a"})
    assert ("workloads", "shop/WorkloadEntry/db") in views.refresh()
    idx.set_claims("node-a", {})
    idx.set_claims("node-b", {"10.3.0.7": "b"})
    assert ("workloads", "shop/WorkloadEntry/db") in views.refresh()
    assert local(idx, "node-b") == {"db": "b"}


# -- ztunnel.discovery --------------------------------------------------------------


def test_plan_claims_keeps_addresses_found_in_exactly_one_netns() -> None:
    scans = [
        NetnsScan("w1", frozenset({"10.3.0.7", "fd00::7", "fe80::1", "127.0.0.2"})),
        NetnsScan("/proc/42/ns/net", frozenset({"10.3.0.8", "10.3.0.50"})),
        NetnsScan("w3", frozenset({"10.3.0.50"})),
    ]
    plan = plan_claims({}, scans)
    assert plan.claims == {"10.3.0.7": "w1", "fd00::7": "w1", "10.3.0.8": "/proc/42/ns/net"}
    assert plan.ambiguous == ("10.3.0.50",)
    assert plan.changed and plan.removed == ()
    again = plan_claims(plan.claims, scans)
    assert not again.changed
    gone = plan_claims(plan.claims, scans[1:2])
    assert gone.removed == ("10.3.0.7", "fd00::7") and gone.added == ("10.3.0.50",)


def test_plan_claims_is_bounded() -> None:
    scans = [NetnsScan(f"w{i}", frozenset({f"10.4.{i // 256}.{i % 256}"})) for i in range(40)]
    plan = plan_claims({}, scans, limit=25)
    assert len(plan.claims) == 25 and plan.dropped == 15


async def test_discovery_reports_what_each_scan_finds() -> None:
    found: list[NetnsScan] = [NetnsScan("w1", frozenset({"10.3.0.7"}))]
    reported: list[Mapping[str, str]] = []
    d = AddressDiscovery(reported.append, scan=lambda: list(found))
    await d.step()
    found.append(NetnsScan("w2", frozenset({"10.3.0.8"})))
    plan = await d.step()
    assert plan.added == ("10.3.0.8",)
    assert reported == [{"10.3.0.7": "w1"}, {"10.3.0.7": "w1", "10.3.0.8": "w2"}]


def test_bound_claims_always_fits_what_the_control_plane_accepts() -> None:
    many = {f"fd00:1234:5678:9abc::{i + 1:x}": f"/run/netns/{'x' * 100}{i}" for i in range(600)}
    many["10.0.0.1"] = "y" * (MAX_NETNS_LEN + 1)
    kept, left = bound_claims(many)
    assert "10.0.0.1" in left and len(kept) + len(left) == len(many)
    message = json.dumps({"type": "claims", "addresses": kept}, separators=(",", ":"))
    assert len(message) <= MAX_CLAIMS_BYTES
    assert parse_claims(json.loads(message)["addresses"]) == kept
    small = {"10.0.0.2": "w"}
    assert bound_claims(small) == (small, [])
