"""Translating resources into per-node snapshots: enrollment, waypoints, scoping, policies."""

from __future__ import annotations

import pytest
import yaml

from config.resources import Resource, parse_resource
from config.snapshot import MeshIndex, compute_snapshot, workload_uid
from ztunnel import snapshot as zs

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  {name: web-1, namespace: shop, annotations: {ambit.dev/node: node-a, ambit.dev/netns: web1}}
spec:
  address: 10.1.0.11
  labels: {app: web}
  serviceAccount: web
  locality: eu/eu-a
  ports: {http: 8080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-2, namespace: shop, annotations: {ambit.dev/node: node-b}}
spec: {address: 10.1.0.12, labels: {app: web}, serviceAccount: web, weight: 3, ports: {http: 9090}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: batch-1, namespace: shop, annotations: {ambit.dev/node: node-b}}
spec: {address: 10.1.0.13, labels: {app: batch, istio.io/dataplane-mode: none}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-1, namespace: legacy, annotations: {ambit.dev/node: node-b}}
spec: {address: 10.1.0.21, labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: cron-1, namespace: legacy, annotations: {ambit.dev/node: node-b}}
spec: {address: 10.1.0.22, labels: {app: cron}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, appProtocol: http}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: legacy}
spec: {clusterIP: 10.96.0.20, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client], requestPrincipals: ["*"]}}]
    to: [{operation: {ports: ["8080"], methods: [GET]}}]
    when: [{key: source.ip, values: [10.0.0.0/8]}, {key: "request.headers[x-env]", values: [prod]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-deny, namespace: legacy}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""


def resources(text: str = MESH) -> list[Resource]:
    return [parse_resource(d) for d in yaml.safe_load_all(text) if d]


def by_name(snap: zs.Snapshot) -> dict[str, zs.Workload]:
    return {w.name: w for w in snap.workloads}


def test_enrollment_by_namespace_label_and_workload_opt_out() -> None:
    snap = compute_snapshot(resources(), "node-b", version=7)
    w = by_name(snap)
    assert snap.version == 7 and snap.node == "node-b"
    assert w["web-2"].enrolled is True
    assert w["batch-1"].enrolled is False  # istio.io/dataplane-mode=none
    assert w["db-1"].enrolled is False  # namespace not enrolled
    assert {x.name for x in snap.local_workloads} == {"web-2", "batch-1", "db-1", "cron-1"}


def test_workload_fields_come_from_the_workload_entry() -> None:
    snap = compute_snapshot(resources(), "node-a")
    web1 = by_name(snap)["web-1"]
    assert web1.uid == workload_uid("shop", "web-1")
    assert (web1.ip, web1.node, web1.netns, web1.service_account) == (
        "10.1.0.11",
        "node-a",
        "web1",
        "web",
    )
    assert web1.identity == "spiffe://cluster.local/ns/shop/sa/web"
    assert web1.locality == zs.Locality(region="eu", zone="eu-a")
    assert web1.canonical_name == "web"
    assert by_name(snap)["web-2"].weight == 3


def test_service_endpoints_named_target_ports_and_tcp_only() -> None:
    snap = compute_snapshot(resources(), "node-a")
    web = snap.service_by_vip("10.96.0.10")
    assert web is not None and web.hostname == "web.shop.svc.cluster.local"
    assert [p.port for p in web.ports] == [80]  # the UDP port is not ztunnel's business
    eps = {ep.workload_uid: ep for ep in web.endpoints}
    assert set(eps) == {workload_uid("shop", "web-1"), workload_uid("shop", "web-2")}
    sp = web.port(80)
    assert sp is not None
    assert eps[workload_uid("shop", "web-1")].target_port(sp) == 8080
    assert eps[workload_uid("shop", "web-2")].target_port(sp) == 9090


def test_node_scoping_leaves_out_unreachable_workloads_of_other_nodes() -> None:
    snap = compute_snapshot(resources(), "node-a")
    names = set(by_name(snap))
    # own workload, service endpoints (web-2, db-1) and node-a's namespace (batch-1)
    assert names == {"web-1", "web-2", "db-1", "batch-1"}
    assert "cron-1" not in names  # node-b's, in another namespace, behind no service
    # policies: node-a's namespaces and the root namespace only
    assert [p.key for p in snap.authorization_policies] == ["shop/web-allow"]
    assert [p.namespace for p in snap.peer_authentications] == ["istio-system"]
    other = compute_snapshot(resources(), "node-c")
    assert {w.name for w in other.workloads} == {"web-1", "web-2", "db-1"}
    assert other.local_workloads == ()


def test_policy_l7_attributes_are_listed_for_the_waypoint() -> None:
    snap = compute_snapshot(resources(), "node-a")
    (pol,) = snap.authorization_policies
    (rule,) = pol.rules
    assert rule.from_[0].principals == ("cluster.local/ns/shop/sa/client",)
    assert rule.to[0].ports == (8080,)
    assert [c.key for c in rule.when] == ["source.ip"]
    assert rule.l7_fields == (
        "from.source.requestPrincipals",
        "to.operation.methods",
        "when.request.headers[x-env]",
    )
    assert pol.selector == {"app": "web"}


WAYPOINT = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def test_waypoint_binding_namespace_service_workload_and_opt_out() -> None:
    text = (
        MESH.replace(
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}",
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, "
            "istio.io/use-waypoint: wp}}",
        )
        + WAYPOINT
    )
    # the waypoint has no address yet: nothing is bound to it
    snap = compute_snapshot(resources(text), "node-a")
    assert snap.waypoints == ()
    web = snap.service_by_vip("10.96.0.10")
    assert web is not None and web.waypoint is None
    snap = compute_snapshot(
        resources(text), "node-a", waypoint_addresses={("shop", "wp"): "10.1.0.99"}
    )
    (wp,) = snap.waypoints
    assert wp.identity == "spiffe://cluster.local/ns/shop/sa/wp" and wp.port == 15008
    web = snap.service_by_vip("10.96.0.10")
    assert web is not None and web.waypoint == wp.ref()
    assert by_name(snap)["web-1"].waypoint == wp.ref()  # waypoint-for: all
    # opt-outs on the service and on a workload
    text2 = text.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: none}}",
    ).replace(
        "  labels: {app: web}\n  serviceAccount: web\n  locality",
        "  labels: {app: web, istio.io/use-waypoint: none}\n  serviceAccount: web\n  locality",
    )
    snap = compute_snapshot(
        resources(text2), "node-a", waypoint_addresses={("shop", "wp"): "10.1.0.99"}
    )
    web = snap.service_by_vip("10.96.0.10")
    assert web is not None and web.waypoint is None
    assert by_name(snap)["web-1"].waypoint is None
    assert by_name(snap)["web-2"].waypoint is not None
    # a waypoint for services only does not capture workload-addressed traffic
    text3 = text.replace("istio.io/waypoint-for: all", "istio.io/waypoint-for: service")
    snap = compute_snapshot(
        resources(text3), "node-a", waypoint_addresses={("shop", "wp"): "10.1.0.99"}
    )
    assert by_name(snap)["web-1"].waypoint is None
    web = snap.service_by_vip("10.96.0.10")
    assert web is not None and web.waypoint is not None


def test_incremental_updates_match_a_full_compute() -> None:
    res = resources(MESH + WAYPOINT)
    idx = MeshIndex()
    idx.set_waypoint_address("shop", "wp", "10.1.0.99")
    idx.load(res, 10)
    first = idx.node_snapshot("node-a")
    assert first == compute_snapshot(
        res, "node-a", version=10, waypoint_addresses={("shop", "wp"): "10.1.0.99"}
    )
    # move web-2 to node-a, relabel the namespace, delete the db service
    changed = yaml.safe_load(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: web-2, namespace: shop, annotations: {ambit.dev/node: node-a}}\n"
        "spec: {address: 10.1.0.12, labels: {app: web}, serviceAccount: web}\n"
    )
    ns = yaml.safe_load(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: "
        "{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}\n"
    )
    after = [
        r
        for r in res
        if not (r.kind == "Service" and r.meta.name == "db")
        and r.key not in (parse_resource(changed).key, parse_resource(ns).key)
    ]
    after += [parse_resource(changed), parse_resource(ns)]
    idx.apply(parse_resource(changed).key, parse_resource(changed), 11)
    idx.apply(parse_resource(ns).key, parse_resource(ns), 12)
    db_key = next(r.key for r in res if r.kind == "Service" and r.meta.name == "db")
    idx.apply(db_key, None, 13)
    snap = idx.node_snapshot("node-a")
    assert snap == compute_snapshot(
        after, "node-a", version=13, waypoint_addresses={("shop", "wp"): "10.1.0.99"}
    )
    assert {w.name for w in snap.local_workloads} == {"web-1", "web-2"}
    assert snap.service_by_vip("10.96.0.20") is None
    web = snap.service_by_vip("10.96.0.10")
    assert web is not None and web.waypoint is not None


def test_snapshot_round_trips_through_json() -> None:
    snap = compute_snapshot(
        resources(MESH + WAYPOINT),
        "node-b",
        version=3,
        waypoint_addresses={("shop", "wp"): "10.1.0.99"},
        trust_bundle_pem="-----BEGIN CERTIFICATE-----\n",
    )
    assert zs.Snapshot.from_json(snap.to_json()) == snap


def test_deltas_turn_one_snapshot_into_the_next() -> None:
    from config.snapshot import apply_delta, content_hash, make_delta
    from config.snapshot import sorted_dict as _sorted_dict

    before = _sorted_dict(compute_snapshot(resources(), "node-a", version=1))
    changed = MESH.replace("address: 10.1.0.12", "address: 10.1.0.14").replace(
        "spec: {action: DENY, rules: [{}]}", "spec: {action: ALLOW}"
    )
    after = _sorted_dict(
        compute_snapshot(
            resources(changed + WAYPOINT),
            "node-b",
            version=2,
            waypoint_addresses={("shop", "wp"): "10.1.0.99"},
        )
    )
    delta = make_delta(before, after)
    assert delta["set"] == {"version": 2, "node": "node-b"}
    assert [w["name"] for w in delta["upsert"]["workloads"]] == ["cron-1", "web-2"]
    assert delta["remove"] == {}
    assert apply_delta(before, delta) == after
    assert content_hash(after) != content_hash(before)
    assert content_hash({**after, "version": 99}) == content_hash(after)
    back = make_delta(after, before)
    assert back["remove"]["workloads"] == ["legacy/WorkloadEntry/cron-1"]
    assert back["remove"]["waypoints"] == ["shop/wp"]
    assert apply_delta(after, back) == before


def test_node_views_deltas_track_full_snapshots_through_random_changes() -> None:
    import random

    from config.snapshot import NodeState, NodeViews, apply_delta, content_hash, sorted_dict

    rng = random.Random(7)
    idx = MeshIndex()
    version = 1
    idx.load(resources(MESH + WAYPOINT), version)
    idx.set_waypoint_address("shop", "wp", "10.1.0.99")
    views = NodeViews(idx)
    nodes = ["node-a", "node-b", "node-c"]
    states = {n: NodeState(n) for n in nodes}
    held: dict[str, dict[str, object]] = {}
    for n in nodes:
        kind, body = views.update(states[n]) or ("", {})
        assert kind == "snapshot"
        held[n] = body
    for _step in range(60):
        version += 1
        i = rng.randrange(8)
        ns = rng.choice(["shop", "legacy"])
        node = rng.choice(nodes)
        app = rng.choice(["web", "db", "other"])
        choice = rng.randrange(4)
        if choice == 0:
            text = (
                f"apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
                f"metadata: {{name: w{i}, namespace: {ns}, annotations: "
                f"{{ambit.dev/node: {node}}}}}\n"
                f"spec: {{address: 10.5.{i}.{1 if ns == 'shop' else 2}, "
                f"labels: {{app: {app}}}}}\n"
            )
        elif choice == 1:
            text = (
                f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
                f"spec: {{clusterIP: 10.97.{i}.{1 if ns == 'shop' else 2}, "
                f"selector: {{app: {app}}}, ports: [{{port: 80}}]}}\n"
            )
        elif choice == 2:
            text = (
                f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                f"metadata: {{name: p{i}, namespace: {ns}}}\nspec: {{action: DENY}}\n"
            )
        else:
            text = ""
        if text:
            r = parse_resource(yaml.safe_load(text))
            idx.apply(r.key, r, version)
        else:  # delete something that may exist
            kind = rng.choice(["WorkloadEntry", "Service", "AuthorizationPolicy"])
            prefix = {"WorkloadEntry": "w", "Service": "s", "AuthorizationPolicy": "p"}[kind]
            from config.resources import ResourceKey

            idx.apply(ResourceKey(kind, ns, f"{prefix}{i}"), None, version)
        views.refresh()
        for n in nodes:
            res = views.update(states[n])
            if res is not None:
                kind, body = res
                held[n] = body if kind == "snapshot" else apply_delta(held[n], body)
            want = sorted_dict(idx.node_snapshot(n))
            got = {**held[n], "version": want["version"]}
            assert got == want, f"step {_step}: node {n} diverged"
            assert views.hash_of(states[n]) == content_hash(want)


def test_full_json_is_the_full_snapshot_encoded() -> None:
    import json

    from config.snapshot import NodeState, NodeViews, content_hash

    idx = MeshIndex()
    idx.load(resources(MESH + WAYPOINT), 4)
    idx.set_waypoint_address("shop", "wp", "10.1.0.99")
    views = NodeViews(idx)
    a, b = NodeState("node-a"), NodeState("node-a")
    decoded = json.loads(views.full_json(a))
    assert decoded == views.full(b)
    assert views.hash_of(a) == views.hash_of(b) == content_hash(decoded)
    assert zs.Snapshot.from_dict(decoded) == idx.node_snapshot("node-a")


def test_replica_applies_deltas_item_by_item_like_a_full_parse() -> None:
    from config.snapshot import (
        apply_delta,
        content_hash,
        make_delta,
        replica_apply_delta,
        replica_from_dict,
        sorted_dict,
    )

    before = sorted_dict(compute_snapshot(resources(), "node-a", version=1))
    changed = MESH.replace("address: 10.1.0.12", "address: 10.1.0.14")
    after = sorted_dict(
        compute_snapshot(
            resources(changed + WAYPOINT),
            "node-a",
            version=2,
            waypoint_addresses={("shop", "wp"): "10.1.0.99"},
        )
    )
    rep = replica_from_dict(before)
    assert rep.snapshot == zs.Snapshot.from_dict(before)
    assert rep.hash == content_hash(before)
    new = replica_apply_delta(rep, make_delta(before, after))
    assert new.snapshot == zs.Snapshot.from_dict(apply_delta(before, make_delta(before, after)))
    assert new.hash == content_hash(after)
    assert new.to_dict() == after
    assert rep.snapshot.version == 1  # the old state is untouched (a nack keeps it)
    bad = {"upsert": {"workloads": [{"uid": "x", "name": "x"}]}}
    with pytest.raises(zs.SnapshotError):
        replica_apply_delta(rep, bad)


CLIENTS = """
---
apiVersion: v1
kind: Namespace
metadata: {name: load, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  {name: loadgen, namespace: load, annotations: {ambit.dev/node: node-c, ambit.dev/netns: lg}}
spec:
  address: 10.2.0.5
  serviceAccount: loadgen
  locality: us/us-b
  labels: {app: loadgen, version: v3, team: perf}
"""


def _bound_mesh() -> str:
    return (
        MESH.replace(
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}",
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, "
            "istio.io/use-waypoint: wp}}",
        )
        + WAYPOINT
        + CLIENTS
    )


def _index(text: str, version: int = 1) -> MeshIndex:
    idx = MeshIndex(waypoint_clients=True)
    idx.set_waypoint_address("shop", "wp", "10.1.0.99")
    idx.load(resources(text), version)
    return idx


def test_waypoint_snapshot_holds_every_enrolled_client_in_compact_form() -> None:
    snap = _index(_bound_mesh()).waypoint_snapshot("shop", "wp")
    names = by_name(snap)
    # served workloads in full, enrolled clients of any namespace, no one outside the mesh
    assert set(names) == {"web-1", "web-2", "loadgen"}
    assert names["web-1"].netns == "web1" and names["web-1"].locality.region == "eu"
    lg = snap.workload_by_ip("10.2.0.5")
    assert lg is not None and lg.uid == workload_uid("load", "loadgen")
    assert (lg.name, lg.namespace, lg.node) == ("loadgen", "load", "node-c")
    assert lg.identity == "spiffe://cluster.local/ns/load/sa/loadgen"
    assert dict(lg.labels) == {"app": "loadgen", "version": "v3"}  # what telemetry reads
    assert lg.netns is None and lg.locality == zs.Locality() and lg.waypoint is None
    assert lg.canonical_name == "loadgen" and lg.enrolled
    # the services and policies are still only the waypoint's
    assert {s.name for s in snap.services} == {"web"}
    # an index without waypoint_clients: only what is bound to the waypoint
    plain = MeshIndex()
    plain.set_waypoint_address("shop", "wp", "10.1.0.99")
    plain.load(resources(_bound_mesh()), 1)
    assert {w.name for w in plain.waypoint_snapshot("shop", "wp").workloads} == {
        "web-1", "web-2"}
    # a waypoint nothing is bound to gets no clients either
    idle = _index(MESH + WAYPOINT + CLIENTS).waypoint_snapshot("shop", "wp")
    assert idle.workloads == () and idle.services == ()


def test_client_changes_reach_the_waypoint_snapshot_incrementally() -> None:
    text = _bound_mesh()
    idx = _index(text)
    first = idx.waypoint_snapshot("shop", "wp")
    shop_views = idx.client_views_in("shop")
    more = yaml.safe_load(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: loadgen-2, namespace: load, annotations: {ambit.dev/node: node-c}}\n"
        "spec: {address: 10.2.0.6, serviceAccount: loadgen, labels: {app: loadgen}}\n"
    )
    r = parse_resource(more)
    idx.apply(r.key, r, 2)
    snap = idx.waypoint_snapshot("shop", "wp")
    assert idx.client_views_in("shop") is shop_views  # untouched namespace: reused
    added = snap.workload_by_ip("10.2.0.6")
    assert added is not None and added.name == "loadgen-2"
    assert snap.version == 2 and first.workload_by_ip("10.2.0.6") is None
    # the same as computing everything from scratch
    assert snap == _index(text + "---\n" + yaml.safe_dump(more), 2).waypoint_snapshot("shop", "wp")
    idx.apply(r.key, None, 3)
    assert idx.waypoint_snapshot("shop", "wp").workload_by_ip("10.2.0.6") is None
    # opting the load namespace out of the mesh takes its clients away
    ns = parse_resource(yaml.safe_load(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: load}\n"))
    idx.apply(ns.key, ns, 4)
    assert idx.waypoint_snapshot("shop", "wp").workload_by_ip("10.2.0.5") is None


def test_clients_sharing_an_address_are_left_out() -> None:
    twin = CLIENTS.replace("name: loadgen, namespace: load", "name: twin, namespace: load")
    twin = twin.split("---\napiVersion: networking.istio.io/v1", 1)[1]
    text = _bound_mesh() + "---\napiVersion: networking.istio.io/v1" + twin
    snap = _index(text).waypoint_snapshot("shop", "wp")
    # two workloads claim 10.2.0.5: naming either would be a guess
    assert snap.workload_by_ip("10.2.0.5") is None
    assert {w.name for w in snap.workloads} == {"web-1", "web-2"}
    # a client may not shadow a served workload's address either
    clash = _bound_mesh().replace("address: 10.2.0.5", "address: 10.1.0.11")
    snap = _index(clash).waypoint_snapshot("shop", "wp")
    w = snap.workload_by_ip("10.1.0.11")
    assert w is not None and w.name == "web-1"


def test_waypoint_snapshot_dicts_and_hashes_reuse_unchanged_items() -> None:
    from config.snapshot import COLLECTIONS, content_hash, item_digest, scalars_digest, sorted_dict

    def plain(snap: zs.Snapshot) -> tuple[dict[str, object], str]:
        d = snap.to_dict()
        for name, keyf in COLLECTIONS.items():
            d[name] = sorted(d[name], key=keyf)
        total = scalars_digest(d) + sum(item_digest(n, i) for n in COLLECTIONS for i in d[n])
        return d, f"{total & (2**64 - 1):016x}"

    idx = _index(_bound_mesh())
    first = sorted_dict(idx.waypoint_snapshot("shop", "wp"))
    assert (first, content_hash(first)) == plain(idx.waypoint_snapshot("shop", "wp"))
    moved = parse_resource(yaml.safe_load(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: loadgen, namespace: load, annotations: {ambit.dev/node: node-c}}\n"
        "spec: {address: 10.2.0.7, serviceAccount: loadgen, labels: {app: loadgen}}\n"))
    idx.apply(moved.key, moved, 2)
    snap = idx.waypoint_snapshot("shop", "wp")
    second = sorted_dict(snap)
    assert (second, content_hash(second)) == plain(snap)
    before = {w["uid"]: w for w in first["workloads"]}
    after = {w["uid"]: w for w in second["workloads"]}
    web1, lg = workload_uid("shop", "web-1"), workload_uid("load", "loadgen")
    assert after[web1] is before[web1]  # unchanged: the same encoding
    assert after[lg]["ip"] == "10.2.0.7"
