"""Which source address the waypoint trusts: `forwarded: for=` only from its owner's identity."""

from __future__ import annotations

from typing import Any

from config.resources import parse_resource
from tests.inproc.test_waypoint_e2e import waypoint_namespace
from waypoint.chain import SourcePlan, forwarded_ip, plan_source
from waypoint.server import config_from_resources
from ztunnel import snapshot as zs

CLIENT = "spiffe://cluster.local/ns/app/sa/client"
OTHER = "spiffe://cluster.local/ns/app/sa/other"


def _service(name: str, vip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "app"},
            "spec": {"selector": {"app": name}, "clusterIP": vip,
                     "ports": [{"port": 80, "name": "http"}]}}


def _entry(name: str, ip: str, sa: str) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": f"{name}-{ip.replace(':', '-')}", "namespace": "app",
                         "annotations": {"ambit.dev/node": "node-1"}},
            "spec": {"address": ip, "labels": {"app": name}, "serviceAccount": sa}}


def _snapshot() -> zs.Snapshot:
    docs = [
        *waypoint_namespace(),
        _entry("client", "10.1.0.5", "client"),
        _entry("client", "fd00::5", "client"),
        _entry("other", "10.1.0.9", "other"),
        # the waypoint's snapshot holds the workloads behind its services
        _service("client", "10.96.0.5"), _service("other", "10.96.0.9"),
    ]
    cfg = config_from_resources([parse_resource(d) for d in docs], ("app", "wp"),
                                address="10.1.0.100")
    return cfg.snapshot


def test_forwarded_address_of_the_peers_own_workload_is_used() -> None:
    snap = _snapshot()
    assert plan_source(snap, forwarded_for="10.1.0.5:40000", peer_ip="192.168.0.1",
                       peer_identity=CLIENT) == SourcePlan("10.1.0.5")
    assert plan_source(snap, forwarded_for="[fd00::5]:40000", peer_ip="192.168.0.1",
                       peer_identity=CLIENT) == SourcePlan("fd00::5")


def test_forwarded_address_owned_by_another_identity_is_ignored() -> None:
    snap = _snapshot()
    got = plan_source(snap, forwarded_for="10.1.0.9:1234", peer_ip="192.168.0.1",
                      peer_identity=CLIENT)
    assert got == SourcePlan("192.168.0.1", "10.1.0.9", "identity_mismatch")


def test_forwarded_address_the_snapshot_does_not_know_is_ignored() -> None:
    snap = _snapshot()
    got = plan_source(snap, forwarded_for="10.99.0.1:1234", peer_ip="192.168.0.1",
                      peer_identity=CLIENT)
    assert got == SourcePlan("192.168.0.1", "10.99.0.1", "unknown_workload")
    garbage = plan_source(snap, forwarded_for="_hidden", peer_ip="192.168.0.1",
                          peer_identity=CLIENT)
    assert garbage.ip == "192.168.0.1" and garbage.reason == "unknown_workload"


def test_no_forwarded_header_or_the_peer_itself_is_the_peer_address() -> None:
    snap = _snapshot()
    assert plan_source(snap, forwarded_for=None, peer_ip="192.168.0.1",
                       peer_identity=OTHER) == SourcePlan("192.168.0.1")
    assert plan_source(snap, forwarded_for="192.168.0.1:5", peer_ip="192.168.0.1",
                       peer_identity=OTHER) == SourcePlan("192.168.0.1")


def test_forwarded_ip_forms() -> None:
    assert forwarded_ip("10.0.0.1:80") == "10.0.0.1"
    assert forwarded_ip("10.0.0.1") == "10.0.0.1"
    assert forwarded_ip("[fd00::1]:80") == "fd00::1"
    assert forwarded_ip("[fd00::1]") == "fd00::1"
    assert forwarded_ip("fd00::1") == "fd00::1"
    assert forwarded_ip('"10.0.0.1:80"') == "10.0.0.1"
