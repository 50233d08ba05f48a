"""plan_outbound / plan_inbound: every branch, weighted spread, locality preference."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ztunnel.plan import (
    Hbone,
    HboneViaWaypoint,
    InboundPlan,
    InboundReject,
    Passthrough,
    Reject,
    format_authority,
    parse_authority,
    plan_inbound,
    plan_outbound,
)
from ztunnel.snapshot import (
    Endpoint,
    Locality,
    Service,
    ServicePort,
    Snapshot,
    WaypointRef,
    Workload,
)

WP = WaypointRef(address="10.0.9.9", identity="spiffe://cluster.local/ns/app/sa/waypoint")


def wl(
    uid: str,
    ip: str,
    *,
    node: str = "n1",
    zone: str = "",
    region: str = "r1",
    weight: int = 1,
    enrolled: bool = True,
    waypoint: WaypointRef | None = None,
    ip6: str | None = None,
    ports: tuple[int, ...] = (),
) -> Workload:
    return Workload(
        uid=uid,
        name=uid,
        namespace="app",
        ip=ip,
        ip6=ip6,
        node=node,
        service_account=f"sa-{uid}",
        locality=Locality(region=region, zone=zone),
        weight=weight,
        enrolled=enrolled,
        waypoint=waypoint,
        ports=ports,
        trust_domain="cluster.local",
    )


CLIENT = wl("client", "10.0.1.1", node="n1", zone="z1")


def snap(*services: Service, workloads: tuple[Workload, ...] = ()) -> Snapshot:
    return Snapshot(version=1, node="n1", workloads=(CLIENT, *workloads), services=services)


def svc(
    *eps: Endpoint,
    name: str = "web",
    waypoint: WaypointRef | None = None,
    td: str = "Any",
    vips: tuple[str, ...] = ("10.96.0.1",),
) -> Service:
    return Service(
        name=name,
        namespace="app",
        vips=vips,
        ports=(ServicePort(port=80, target_port=8080),),
        endpoints=eps,
        waypoint=waypoint,
        traffic_distribution=td,
    )


def rng() -> random.Random:
    return random.Random(1234)


def test_service_vip_to_enrolled_endpoint_is_hbone_with_endpoint_authority() -> None:
    server = wl("server", "10.0.2.1", node="n2")
    s = snap(svc(Endpoint(workload_uid="server")), workloads=(server,))
    plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=rng())
    assert isinstance(plan, Hbone)
    assert plan.address == ("10.0.2.1", 15008)
    assert plan.authority == "10.0.2.1:8080"
    assert plan.identity == "spiffe://cluster.local/ns/app/sa/sa-server"
    assert plan.destination == s.workload_by_uid("server")
    assert plan.service is not None and plan.service.name == "web"


def test_service_endpoint_port_override() -> None:
    server = wl("server", "10.0.2.1")
    s = snap(svc(Endpoint(workload_uid="server", ports={80: 9000})), workloads=(server,))
    plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=rng())
    assert isinstance(plan, Hbone) and plan.authority == "10.0.2.1:9000"


def test_service_vip_to_unenrolled_endpoint_is_passthrough_to_target_port() -> None:
    legacy = wl("legacy", "10.0.2.2", enrolled=False)
    s = snap(svc(Endpoint(workload_uid="legacy")), workloads=(legacy,))
    plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=rng())
    assert isinstance(plan, Passthrough)
    assert plan.address == ("10.0.2.2", 8080)
    assert plan.service is not None


def test_service_with_waypoint_goes_to_waypoint_with_vip_authority() -> None:
    server = wl("server", "10.0.2.1")
    s = snap(svc(Endpoint(workload_uid="server"), waypoint=WP), workloads=(server,))
    plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=rng())
    assert isinstance(plan, HboneViaWaypoint)
    assert plan.address == ("10.0.9.9", 15008)
    assert plan.identity == WP.identity
    assert plan.authority == "10.96.0.1:80"


def test_service_waypoint_not_used_when_source_is_the_waypoint() -> None:
    server = wl("server", "10.0.2.1")
    waypoint_wl = wl("wp", "10.0.9.9")
    s = snap(svc(Endpoint(workload_uid="server"), waypoint=WP), workloads=(server, waypoint_wl))
    plan = plan_outbound(s, waypoint_wl, ("10.96.0.1", 80), rng=rng())
    assert isinstance(plan, Hbone) and plan.authority == "10.0.2.1:8080"


def test_workload_waypoint_applies_to_workload_addressed_traffic_only() -> None:
    server = wl("server", "10.0.2.1", waypoint=WP)
    s = snap(svc(Endpoint(workload_uid="server")), workloads=(server,))
    direct = plan_outbound(s, CLIENT, ("10.0.2.1", 8080), rng=rng())
    assert isinstance(direct, HboneViaWaypoint)
    assert direct.authority == "10.0.2.1:8080" and direct.address == ("10.0.9.9", 15008)
    assert direct.destination is not None and direct.destination.uid == "server"
    via_service = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=rng())
    assert isinstance(via_service, Hbone)


def test_workload_ip_enrolled_is_hbone() -> None:
    server = wl("server", "10.0.2.1")
    plan = plan_outbound(snap(workloads=(server,)), CLIENT, ("10.0.2.1", 5000), rng=rng())
    assert plan == Hbone(
        "10.0.2.1",
        15008,
        "spiffe://cluster.local/ns/app/sa/sa-server",
        "10.0.2.1:5000",
        server,
    )


def test_workload_ip_not_enrolled_and_unknown_ip_are_passthrough() -> None:
    legacy = wl("legacy", "10.0.2.2", enrolled=False)
    s = snap(workloads=(legacy,))
    plan = plan_outbound(s, CLIENT, ("10.0.2.2", 5432), rng=rng())
    assert isinstance(plan, Passthrough) and plan.address == ("10.0.2.2", 5432)
    assert plan.destination == legacy
    out = plan_outbound(s, CLIENT, ("192.0.2.7", 443), rng=rng())
    assert out == Passthrough("192.0.2.7", 443)


@pytest.mark.parametrize("port", [15000, 15001, 15006, 15008, 15020, 15021, 15053])
def test_ztunnel_own_ports_are_rejected(port: int) -> None:
    server = wl("server", "10.0.2.1")
    s = snap(workloads=(server,))
    plan = plan_outbound(s, CLIENT, ("10.0.2.1", port), rng=rng())
    assert isinstance(plan, Reject)
    assert str(port) in plan.reason and "ztunnel" in plan.reason
    assert isinstance(plan_outbound(s, CLIENT, ("127.0.0.1", port), rng=rng()), Reject)
    # the same port on a host outside the mesh is somebody else's: pass it through
    assert isinstance(plan_outbound(s, CLIENT, ("192.0.2.1", port), rng=rng()), Passthrough)


def test_service_target_port_on_ztunnel_port_is_rejected() -> None:
    server = wl("server", "10.0.2.1")
    bad = Service(
        name="bad",
        namespace="app",
        vips=("10.96.0.5",),
        ports=(ServicePort(port=80, target_port=15008),),
        endpoints=(Endpoint(workload_uid="server"),),
    )
    plan = plan_outbound(snap(bad, workloads=(server,)), CLIENT, ("10.96.0.5", 80), rng=rng())
    assert isinstance(plan, Reject) and "15008" in plan.reason


def test_service_without_healthy_endpoint_is_rejected() -> None:
    server = wl("server", "10.0.2.1")
    s = snap(svc(Endpoint(workload_uid="server", healthy=False)), workloads=(server,))
    plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=rng())
    assert isinstance(plan, Reject)
    assert plan.reason.startswith("no healthy endpoint for service app/web")
    assert "unhealthy" in plan.reason
    empty = plan_outbound(snap(svc()), CLIENT, ("10.96.0.1", 80), rng=rng())
    assert isinstance(empty, Reject) and "no endpoints" in empty.reason


def test_unknown_service_port_is_rejected() -> None:
    server = wl("server", "10.0.2.1")
    s = snap(svc(Endpoint(workload_uid="server")), workloads=(server,))
    plan = plan_outbound(s, CLIENT, ("10.96.0.1", 81), rng=rng())
    assert isinstance(plan, Reject) and "no port 81" in plan.reason and "80" in plan.reason


def test_unhealthy_endpoints_are_never_picked() -> None:
    eps = [wl(f"e{i}", f"10.0.2.{i + 1}") for i in range(4)]
    s = snap(
        svc(*(Endpoint(workload_uid=w.uid, healthy=(i % 2 == 0)) for i, w in enumerate(eps))),
        workloads=tuple(eps),
    )
    r = rng()
    picked: Counter[str] = Counter()
    for _ in range(400):
        plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=r)
        assert isinstance(plan, Hbone)
        picked[plan.destination.uid] += 1
    assert set(picked) == {"e0", "e2"}


def test_equal_weights_spread_evenly() -> None:
    eps = [wl(f"e{i}", f"10.0.2.{i + 1}") for i in range(3)]
    s = snap(svc(*(Endpoint(workload_uid=w.uid) for w in eps)), workloads=tuple(eps))
    r = rng()
    counts: Counter[str] = Counter()
    n = 3000
    for _ in range(n):
        plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=r)
        assert isinstance(plan, Hbone)
        counts[plan.destination.uid] += 1
    for uid in ("e0", "e1", "e2"):
        # expected 1000, sd ~26: 5 sd bounds
        assert 870 <= counts[uid] <= 1130, counts


def test_weighted_distribution_follows_workload_weight() -> None:
    eps = [wl("light", "10.0.2.1", weight=1), wl("heavy", "10.0.2.2", weight=3)]
    s = snap(svc(*(Endpoint(workload_uid=w.uid) for w in eps)), workloads=tuple(eps))
    r = rng()
    counts: Counter[str] = Counter()
    n = 4000
    for _ in range(n):
        plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=r)
        assert isinstance(plan, Hbone)
        counts[plan.destination.uid] += 1
    # expected heavy share 0.75, sd ~0.0068
    assert 0.72 <= counts["heavy"] / n <= 0.78, counts


def test_prefer_same_node_then_zone_then_anywhere() -> None:
    same_node = wl("same-node", "10.0.2.1", node="n1", zone="z1")
    same_zone = wl("same-zone", "10.0.2.2", node="n3", zone="z1")
    far = wl("far", "10.0.2.3", node="n4", zone="z9")
    all_eps = (same_node, same_zone, far)

    def picks(td: str, *healthy: Workload) -> set[str]:
        eps = tuple(Endpoint(workload_uid=w.uid, healthy=w in healthy) for w in all_eps)
        s = snap(svc(*eps, td=td), workloads=all_eps)
        r = rng()
        out = set()
        for _ in range(200):
            plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=r)
            assert isinstance(plan, Hbone)
            out.add(plan.destination.uid)
        return out

    assert picks("PreferSameNode", *all_eps) == {"same-node"}
    assert picks("PreferSameNode", same_zone, far) == {"same-zone"}
    assert picks("PreferSameNode", far) == {"far"}
    assert picks("PreferClose", *all_eps) == {"same-node", "same-zone"}
    assert picks("PreferSameZone", same_zone, far) == {"same-zone"}
    assert picks("PreferClose", far) == {"far"}
    assert picks("Any", *all_eps) == {"same-node", "same-zone", "far"}


def test_prefer_close_falls_back_to_same_region() -> None:
    other_region = wl("other-region", "10.0.2.1", region="r2", zone="z1")
    same_region = wl("same-region", "10.0.2.2", region="r1", zone="z7")
    eps = (other_region, same_region)
    s = snap(svc(*(Endpoint(workload_uid=w.uid) for w in eps), td="PreferClose"), workloads=eps)
    r = rng()
    for _ in range(50):
        plan = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=r)
        assert isinstance(plan, Hbone) and plan.destination.uid == "same-region"


def test_plan_is_deterministic_for_a_seed() -> None:
    eps = [wl(f"e{i}", f"10.0.2.{i + 1}") for i in range(5)]
    s = snap(svc(*(Endpoint(workload_uid=w.uid) for w in eps)), workloads=tuple(eps))
    a = [plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_ipv6_vip_picks_ipv6_endpoint_address() -> None:
    server = wl("server", "10.0.2.1", ip6="fd00::21")
    s = snap(
        svc(Endpoint(workload_uid="server"), vips=("10.96.0.1", "fd00:96::1")),
        workloads=(server,),
    )
    plan = plan_outbound(s, CLIENT, ("fd00:96:0::1", 80), rng=rng())
    assert isinstance(plan, Hbone)
    assert plan.address == ("fd00::21", 15008)
    assert plan.authority == "[fd00::21]:8080"
    v4 = plan_outbound(s, CLIENT, ("10.96.0.1", 80), rng=rng())
    assert isinstance(v4, Hbone) and v4.host == "10.0.2.1"


def test_authority_helpers() -> None:
    assert format_authority("10.0.0.1", 80) == "10.0.0.1:80"
    assert format_authority("fd00::1", 80) == "[fd00::1]:80"
    assert parse_authority("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_authority("[fd00:0::1]:443") == ("fd00::1", 443)
    for bad in [
        "10.0.0.1",
        "10.0.0.1:0",
        "10.0.0.1:99999",
        "host:80",
        "fd00::1:80",
        "[fd00::1]80",
        ":80",
        "10.0.0.1:8a",
        "[::1",
    ]:
        with pytest.raises(ValueError):
            parse_authority(bad)


def test_plan_inbound() -> None:
    local = wl("local", "10.0.1.2", node="n1", ports=(8080, 9090))
    remote = wl("remote", "10.0.2.2", node="n2")
    any_port = wl("any", "10.0.1.3", node="n1")
    s = snap(workloads=(local, remote, any_port))
    assert plan_inbound(s, "10.0.1.2:8080") == InboundPlan(local, "10.0.1.2", 8080)
    assert plan_inbound(s, "10.0.1.2:8080", workload=local) == InboundPlan(local, "10.0.1.2", 8080)
    assert plan_inbound(s, "10.0.1.3:1234") == InboundPlan(any_port, "10.0.1.3", 1234)

    def status(authority: str, w: Workload | None = None) -> int:
        r = plan_inbound(s, authority, workload=w)
        assert isinstance(r, InboundReject), r
        assert r.reason
        return r.status

    assert status("garbage") == 400
    assert status("10.0.2.2:80") == 400  # another node's workload
    assert status("10.9.9.9:80") == 400  # nobody's
    assert status("10.0.1.3:80", local) == 400  # not this listener's workload
    assert status("10.0.1.2:7070") == 503  # port not offered
    assert status("10.0.1.3:15008") == 503  # ztunnel's own port
