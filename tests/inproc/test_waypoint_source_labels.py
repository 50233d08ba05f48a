"""The waypoint names its clients: source labels and `forwarded:` checks for workloads
that back no Service, with the snapshot the control plane pushes it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from config.push import NODE_CERT, NODE_KEY, TRUST
from config.validate import load_text
from tests.inproc.test_api_push import plane
from tests.inproc.test_waypoint_e2e import Mesh, get, which
from tests.inproc.test_waypoint_process import CaIssuer, to_yaml
from waypoint.cli import FileIdentity
from waypoint.server import follow_control_plane

LOADGEN_IP = "127.0.1.9"
LATE_IP = "127.0.1.10"


def loadgen(name: str, ip: str, version: str) -> list[dict[str, Any]]:
    """An enrolled load generator in its own namespace, behind no Service."""
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "load", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
         "metadata": {"name": name, "namespace": "load",
                      "annotations": {"ambit.dev/node": "node-2"}},
         "spec": {"address": ip, "serviceAccount": name,
                  "labels": {"app": name, "version": version}}},
    ]


def requests_by(mesh: Mesh, **labels: str) -> float:
    assert mesh.waypoint is not None
    total = 0.0
    for m in mesh.waypoint.registry.collect():
        if m.name != "istio_requests":
            continue
        for smp in m.samples:
            if smp.name.endswith("_total") and all(
                    smp.labels.get(k) == v for k, v in labels.items()):
                total += smp.value
    return total


def ignored(mesh: Mesh) -> dict[str, float]:
    assert mesh.waypoint is not None
    return {smp.labels["reason"]: smp.value for m in mesh.waypoint.registry.collect()
            if m.name == "ambit_waypoint_forwarded_ignored"
            for smp in m.samples if smp.name.endswith("_total")}


async def test_clients_without_a_service_are_named_and_their_forwarded_is_verified(
        tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        p.push.index.waypoint_clients = True  # waypoint snapshots list the clients
        pki = CaIssuer(p.ca)
        mesh = Mesh({"front": 1}, [], {}, pki=pki)
        docs = mesh.manifests + loadgen("loadgen", LOADGEN_IP, "v2")
        await asyncio.to_thread(p.store.apply, load_text(to_yaml(docs), "m.yaml"))
        client = p.client("app/wp", waypoint_address="127.0.0.1")
        await client.ensure_joined()
        d = client.data_dir
        identity = FileIdentity(d / NODE_CERT, d / NODE_KEY, d / TRUST, "cluster.local")
        gen_cert = pki.issue("load", "loadgen")

        async def follow(wp: Any) -> None:
            await follow_control_plane(client, wp)

        async with mesh.running(follow=follow, identity=identity), aiohttp.ClientSession() as s:
            async with mesh.forward("front", cert=gen_cert, source=LOADGEN_IP) as url:
                for _ in range(2):
                    status, text, _ = await get(s, url + "/")
                    assert status == 200 and which(text) == "front"
            # the claimed address is the load generator's and so is the certificate:
            # the claim is used, and the request is labelled with the workload
            assert ignored(mesh) == {}
            assert requests_by(mesh, source_workload="loadgen",
                               source_workload_namespace="load", source_app="loadgen",
                               source_principal="cluster.local/ns/load/sa/loadgen",
                               destination_workload="front", response_code="200") == 2.0
            assert requests_by(mesh, source_workload="unknown") == 0.0

            # another identity claiming the load generator's address: ignored, and the
            # request is not attributed to the load generator
            attacker = pki.issue("load", "attacker")
            async with mesh.forward("front", cert=attacker, source=LOADGEN_IP) as url:
                assert (await get(s, url + "/"))[0] == 200
            assert ignored(mesh) == {"identity_mismatch": 1.0}
            assert requests_by(mesh, source_workload="unknown",
                               source_workload_namespace="load",
                               source_principal="cluster.local/ns/load/sa/attacker") == 1.0

            # a client is no destination: its address through the waypoint is not found
            async with mesh.forward("front", cert=gen_cert, source=LOADGEN_IP,
                                    authority=f"{LOADGEN_IP}:80") as url:
                assert (await get(s, url + "/"))[0] == 404
            assert requests_by(mesh, response_code="404", response_flags="NR") == 1.0

            # a workload enrolled later reaches the running waypoint with the next push
            late = loadgen("late", LATE_IP, "v1")[1:]
            await asyncio.to_thread(p.store.apply, load_text(to_yaml(late), "late.yaml"))
            late_cert = pki.issue("load", "late")
            async with asyncio.timeout(5):
                while True:
                    async with mesh.forward("front", cert=late_cert, source=LATE_IP) as url:
                        assert (await get(s, url + "/"))[0] == 200
                    if requests_by(mesh, source_workload="late") == 1.0:
                        break
                    await asyncio.sleep(0.05)
            assert requests_by(mesh, source_workload="late",
                               source_workload_namespace="load", source_app="late") == 1.0


async def test_local_config_names_an_enrolled_client() -> None:
    mesh = Mesh({"front": 1}, [], {}, client_enrolled=True)
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        assert (await get(s, url + "/"))[0] == 200
    assert ignored(mesh) == {}
    assert requests_by(mesh, source_workload="client", source_workload_namespace="app",
                       source_app="client", destination_workload="front") == 1.0
