"""Tier 3: a waypoint process between real ztunnels in the sandbox, with curl as the client.

    n1: a (client, mesh)   wp (the waypoint's netns, not captured)   s1 (web, mesh)
    n2: s2 (web, mesh)     d1 (direct, mesh)
    web.default    10.96.0.10:80 -> 8080 (s1, s2), uses waypoint default/wp
    direct.default 10.96.0.11:80 -> 8080 (d1), no waypoint

The client's ztunnel sends web's traffic to the waypoint (HBONE, authority VIP:80);
the waypoint applies L7 policy and re-originates HBONE to the chosen endpoint, whose
ztunnel sees the waypoint's identity. direct's traffic never touches the waypoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from netsetup.sandbox import Sandbox, unique_prefix
from tests.conftest import require_root_and_tools
from tests.netns.meshkit import PY, ROOT, write_local_ca
from tests.pki import TestPKI

TD = "cluster.local"
WEB_VIP, DIRECT_VIP = "10.96.0.10", "10.96.0.11"
WP_ID = f"spiffe://{TD}/ns/default/sa/wp"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"


@dataclass
class World:
    sb: Sandbox
    tmp: Path

    def ip(self, name: str) -> str:
        return self.sb.workload(name).ip

    def ns(self, name: str) -> str:
        return self.sb.workload(name).netns

    def curl(self, url: str) -> str:
        r = self.sb.exec(self.ns("a"), ["curl", "-s", "-S", "-m", "10", "-o", "/dev/null",
                                        "-w", "%{http_code}", url])
        return r.stdout.strip() or r.stderr

    def waypoint_requests(self) -> float:
        r = self.sb.exec(self.ns("wp"), ["curl", "-s", "-m", "5",
                                         "http://127.0.0.1:15020/metrics"])
        total = 0.0
        for line in r.stdout.splitlines():
            if line.startswith("istio_requests_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in (self.tmp / name).read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_log(self, name: str, timeout: float = 5, **fields: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.log(name):
                if all(str(e.get(k, "")) == v for k, v in fields.items()):
                    return e
            if time.monotonic() > deadline:
                tail = "\n".join((self.tmp / name).read_text(errors="replace")
                                 .splitlines()[-10:])
                raise AssertionError(f"no line in {name} with {fields}:\n{tail}")
            time.sleep(0.05)


def _ztunnel_config(sb: Sandbox, tmp: Path) -> dict[str, Any]:
    w = sb.workload

    def wl(name: str, node: str, sa: str, app: str) -> dict[str, Any]:
        return {"uid": f"default/{name}", "name": name, "namespace": "default",
                "ip": w(name).ip, "node": node, "netns": w(name).netns,
                "service_account": sa, "labels": {"app": app}}

    wp_ref = {"address": w("wp").ip, "identity": WP_ID, "port": 15008}
    return {
        "version": 1, "trust_domain": TD,
        "workloads": [wl("a", "n1", "client", "client"), wl("s1", "n1", "web", "web"),
                      wl("s2", "n2", "web", "web"), wl("d1", "n2", "direct", "direct")],
        "services": [
            {"name": "web", "namespace": "default", "vips": [WEB_VIP],
             "ports": [{"port": 80, "target_port": 8080, "name": "http"}],
             "endpoints": [{"workload_uid": "default/s1"}, {"workload_uid": "default/s2"}],
             "waypoint": wp_ref},
            {"name": "direct", "namespace": "default", "vips": [DIRECT_VIP],
             "ports": [{"port": 80, "target_port": 8080, "name": "http"}],
             "endpoints": [{"workload_uid": "default/d1"}]},
        ],
        "waypoints": [{"name": "wp", "namespace": "default", "address": w("wp").ip,
                       "identity": WP_ID}],
        "authorization_policies": [], "peer_authentications": [],
        "local_ca": {"cert": str(tmp / "ca.pem"), "key": str(tmp / "ca-key.pem")},
    }


def _waypoint_manifests(sb: Sandbox) -> list[dict[str, Any]]:
    w = sb.workload

    def we(name: str, node: str, sa: str, app: str) -> dict[str, Any]:
        return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": name, "namespace": "default",
                             "annotations": {"ambit.dev/node": node}},
                "spec": {"address": w(name).ip, "labels": {"app": app}, "serviceAccount": sa}}

    def svc(name: str, vip: str, waypoint: bool) -> dict[str, Any]:
        md: dict[str, Any] = {"name": name, "namespace": "default"}
        if waypoint:
            md["labels"] = {"istio.io/use-waypoint": "wp"}
        return {"apiVersion": "v1", "kind": "Service", "metadata": md,
                "spec": {"selector": {"app": name}, "clusterIP": vip,
                         "ports": [{"port": 80, "targetPort": 8080, "name": "http"}]}}

    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "wp", "namespace": "default"},
         "spec": {"gatewayClassName": "istio-waypoint",
                  "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
                  "addresses": [{"value": w("wp").ip}]}},
        we("a", "n1", "client", "client"), we("s1", "n1", "web", "web"),
        we("s2", "n2", "web", "web"), we("d1", "n2", "direct", "direct"),
        svc("web", WEB_VIP, True), svc("direct", DIRECT_VIP, False),
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "no-admin", "namespace": "default"},
         "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                  "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}},
    ]


def _wait(sb: Sandbox, netns: str, url: str, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        r = sb.exec(netns, ["curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                            url])
        out = r.stdout
        if out.strip() == "200":
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not ready ({url}): {out}")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    require_root_and_tools("ip", "nft", "curl")
    sb = Sandbox(unique_prefix("wpt"), nodes=2, workload_names=[["a", "wp", "s1"],
                                                                 ["s2", "d1"]])
    tmp = Path(tempfile.mkdtemp(prefix="waypoint-sandbox-"))
    try:
        sb.build()
        pki = TestPKI(TD)
        write_local_ca(pki, tmp)
        cert, key, ca = pki.write_files(pki.issue("default", "wp"), tmp / "wp")
        (tmp / "waypoint.yaml").write_text(yaml.safe_dump_all(_waypoint_manifests(sb)))
        for name in ("s1", "s2", "d1"):
            sb.popen(sb.workload(name).netns, [PY, "-m", "http.server", "-b", "0.0.0.0",
                                               "8080"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(tmp))
        doc = _ztunnel_config(sb, tmp)
        for node in ("n1", "n2"):
            (tmp / f"{node}.json").write_text(json.dumps({**doc, "node": node}))
            with open(tmp / f"ztunnel-{node}.log", "wb") as out:
                sb.popen(sb.node(node).netns,
                         [PY, "-m", "ztunnel", "--node", node, "--local-config",
                          str(tmp / f"{node}.json"), "--data-dir", str(tmp / f"data-{node}"),
                          "--drain-timeout", "1"],
                         stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT)
        with open(tmp / "waypoint.log", "wb") as out:
            sb.popen(sb.workload("wp").netns,
                     [PY, "-m", "waypoint", "--gateway", "default/wp", "--local-config",
                      str(tmp / "waypoint.yaml"), "--cert", str(cert), "--key", str(key),
                      "--ca", str(ca), "--drain-timeout", "1"],
                     stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT)
        for node in ("n1", "n2"):
            _wait(sb, sb.node(node).netns, "http://127.0.0.1:15021/healthz/ready",
                  f"ztunnel {node}")
        _wait(sb, sb.workload("wp").netns, "http://127.0.0.1:15021/healthz/ready", "waypoint")
        for name in ("s1", "s2", "d1"):
            _wait(sb, sb.node_of(name).netns, f"http://{sb.workload(name).ip}:8080/",
                  f"http server {name}")
        yield World(sb, tmp)
    finally:
        sb.teardown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_service_traffic_goes_through_the_waypoint_with_its_identity(world: World) -> None:
    before = world.waypoint_requests()
    # 20 requests: the chance that random balancing never picks one of two endpoints is
    # 2 ** -19
    for _ in range(20):
        assert world.curl(f"http://{WEB_VIP}/") == "200"
    assert world.waypoint_requests() - before == 20
    # the client's ztunnel tunnelled to the waypoint; the destination ztunnels saw the
    # waypoint's identity (not the client's) on their inbound HBONE. Access-log lines are
    # written when a connection ends, so poll: the waypoint may keep upstreams open a while.
    world.wait_log("waypoint.log", event="request", src_identity=CLIENT_ID, response_code="200")
    deadline = time.monotonic() + 10
    while True:
        seen = {e.get("dst_workload") for name in ("ztunnel-n1.log", "ztunnel-n2.log")
                for e in world.log(name)
                if e.get("direction") == "inbound" and e.get("src_identity") == WP_ID}
        if seen >= {"s1", "s2"} or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert seen == {"s1", "s2"}, seen
    inbound_from_client = [e for name in ("ztunnel-n1.log", "ztunnel-n2.log")
                           for e in world.log(name) if e.get("direction") == "inbound"
                           and e.get("src_identity") == CLIENT_ID
                           and e.get("dst_workload") in ("s1", "s2")]
    assert inbound_from_client == []


def test_l7_policy_is_enforced_by_the_waypoint(world: World) -> None:
    assert world.curl(f"http://{WEB_VIP}/admin/x") == "403"
    assert world.curl(f"http://{WEB_VIP}/public") in ("200", "404")  # http.server: 404


def test_service_without_waypoint_does_not_touch_it(world: World) -> None:
    before = world.waypoint_requests()
    for _ in range(3):
        assert world.curl(f"http://{DIRECT_VIP}/") == "200"
    assert world.waypoint_requests() == before
    world.wait_log("ztunnel-n2.log", direction="inbound", src_identity=CLIENT_ID,
                   dst_workload="d1")
