"""Kubernetes source against an in-test API server: list, watch, resume, 410 relist, mirroring.

No kube-apiserver can be installed here: `tests/kubeapi.py` implements the parts of its
protocol the source relies on (paginated consistent lists, chunked watch streams,
resourceVersion, bookmarks, 410 Expired both as an ERROR event and as HTTP 410).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import Configuration

from config.kube_source import (
    ENDPOINTS_LABEL,
    OWNER_ANNOTATION,
    WATCHED,
    KubeApiError,
    KubeSource,
    LineSplitter,
    ServiceAccountAuthenticator,
    TranslationMemo,
    desired_state,
    run_source,
    trim,
)
from config.kube_waypoint import WaypointDeployer, WaypointSettings
from config.push import PushClient, PushError
from config.resources import ResourceKey
from config.snapshot import compute_snapshot
from config.store import Store
from config.tokens import TokenStore
from config.validate import Document
from tests.inproc.test_api_push_hardening import push_server
from tests.kubeapi import KubeApiServer

NS = "/api/v1/namespaces"
NODES = "/api/v1/nodes"
PODS = "/api/v1/pods"
SVCS = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
GWS = "/apis/gateway.networking.k8s.io/v1/gateways"
ROUTES = "/apis/gateway.networking.k8s.io/v1/httproutes"
APS = "/apis/security.istio.io/v1/authorizationpolicies"
PAS = "/apis/security.istio.io/v1/peerauthentications"

API_VERSIONS = {
    "Namespace": "v1", "Node": "v1", "Pod": "v1", "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Gateway": "gateway.networking.k8s.io/v1", "HTTPRoute": "gateway.networking.k8s.io/v1",
    "AuthorizationPolicy": "security.istio.io/v1", "PeerAuthentication": "security.istio.io/v1",
    "DestinationRule": "networking.istio.io/v1", "WorkloadEntry": "networking.istio.io/v1",
    "HTTPFault": "ambit.dev/v1alpha1", "RateLimit": "ambit.dev/v1alpha1",
}
COLLECTIONS = {wk.path: (wk.kind, API_VERSIONS[wk.kind]) for wk in WATCHED}
DEPLOYMENTS = "/apis/apps/v1/deployments"
# what the waypoint deployer writes (not watched by the source)
WRITABLE = {**COLLECTIONS, DEPLOYMENTS: ("Deployment", "apps/v1"),
            "/api/v1/serviceaccounts": ("ServiceAccount", "v1"),
            "/apis/policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", "policy/v1")}


# -- objects as the API server returns them ----------------------------------------------


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name,
                                                   **(labels or {})}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def pod(ns: str, name: str, ip: str = "", *, node: str = "node-a", app: str = "web",
        ready: bool = True, host_network: bool = False, phase: str = "Running",
        sa: str = "web") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"metadata": {"name": name, "namespace": ns, "labels": {"app": app},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration":
                                         "{}"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": node, "serviceAccountName": sa, "hostNetwork": host_network,
                     "containers": [{"name": "app", "image": "web:1", "ports": [
                         {"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": status}


def service(ns: str, name: str, ip: str, selector: dict[str, str] | None = None,
            **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
                            "sessionAffinity": "None", "ipFamilies": ["IPv4"],
                            "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                       "protocol": "TCP"}], **extra}
    if selector is not None:
        spec["selector"] = selector
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec,
            "status": {"loadBalancer": {}}}


def endpoint_slice(ns: str, name: str, svc: str, endpoints: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def pod_endpoint(ns: str, pod_name: str, ip: str, ready: bool) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "namespace": ns, "name": pod_name}}


def deny_legacy(action: str = "DENY") -> dict[str, Any]:
    return {"metadata": {"name": "deny-legacy", "namespace": "shop"},
            "spec": {"action": action, "rules": [{"from": [{"source": {
                "namespaces": ["legacy"]}}]}]}}


def populate(api: KubeApiServer) -> None:
    api.put(NS, namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    api.put(NS, namespace("legacy"))
    api.put(NS, namespace("default"))
    api.put(NS, namespace("istio-system"))
    api.put(PODS, pod("shop", "web-1", "10.244.1.5"))
    api.put(PODS, pod("shop", "web-2", "10.244.2.6", node="node-b"))
    api.put(PODS, pod("shop", "web-3", "10.244.1.7", ready=False))
    api.put(PODS, pod("shop", "pending"))
    api.put(PODS, pod("shop", "batch", "10.244.1.9", phase="Succeeded"))
    api.put(PODS, pod("shop", "agent", "192.168.0.10", host_network=True))
    api.put(SVCS, service("shop", "web", "10.96.0.10", {"app": "web"}))
    api.put(SVCS, service("shop", "headless", "None", {"app": "web"}))
    api.put(SLICES, endpoint_slice("shop", "web-abc", "web", [
        pod_endpoint("shop", "web-1", "10.244.1.5", True),
        pod_endpoint("shop", "web-2", "10.244.2.6", False),
        pod_endpoint("shop", "web-3", "10.244.1.7", False)]))
    api.put(APS, deny_legacy())
    api.put(PAS, {"metadata": {"name": "strict", "namespace": "istio-system"},
                  "spec": {"mtls": {"mode": "STRICT"}}})
    api.put(GWS, {"metadata": {"name": "waypoint", "namespace": "shop"},
                  "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
                      {"name": "mesh", "port": 15008, "protocol": "HBONE",
                       "allowedRoutes": {"namespaces": {"from": "Same"}}}]}})
    api.put(GWS, {"metadata": {"name": "ingress", "namespace": "shop"},
                  "spec": {"gatewayClassName": "other-ingress", "listeners": [
                      {"name": "https", "port": 443, "protocol": "HTTPS"}]}})
    api.put(ROUTES, {"metadata": {"name": "web", "namespace": "shop"}, "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                   "backendRefs": [{"group": "", "kind": "Service", "name": "web",
                                    "port": 80, "weight": 1}]}]}})


# -- harness ----------------------------------------------------------------------------


async def until(pred: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.01)


def config_for(api: KubeApiServer, token: str | None = None) -> Configuration:
    return Configuration(host=api.url, api_key={"BearerToken": token or api.token},
                         api_key_prefix={"BearerToken": "Bearer"})


@contextlib.asynccontextmanager
async def running(store: Store, api: KubeApiServer, *, wait: bool = True,
                  **kw: Any) -> AsyncIterator[KubeSource]:
    opts: dict[str, Any] = {"debounce": 0, "missing_retry": 0.2, "backoff_max": 0.2}
    opts.update(kw)
    src = KubeSource(store, config_for(api, opts.pop("token", None)), **opts)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(src.run())
        try:
            if wait:
                await asyncio.wait_for(src.synced(), 10)
            yield src
        finally:
            task.cancel()


def body(store: Store, kind: str, ns: str, name: str) -> dict[str, Any]:
    r = store.get(kind, ns, name)
    assert r is not None, f"{kind} {ns}/{name} is not in the store"
    return dict(r.body)


def snapshot_for(store: Store, node: str) -> Any:
    return compute_snapshot([r.parse() for r in store.list_resources()], node)


# -- tests ------------------------------------------------------------------------------


async def test_initial_list_mirrors_the_cluster_into_the_store(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api) as src:
                we = body(store, "WorkloadEntry", "shop", "web-1")
                assert we["spec"] == {"address": "10.244.1.5", "serviceAccount": "web",
                                      "weight": 1, "ports": {"http": 8080}}
                ann = we["metadata"]["annotations"]
                assert ann["ambit.dev/node"] == "node-a"
                assert ann[OWNER_ANNOTATION] == "kubernetes"
                assert "kubectl.kubernetes.io/last-applied-configuration" not in ann
                assert we["metadata"]["labels"] == {"app": "web"}
                # the EndpointSlice says web-2 is not ready although its pod says Ready
                assert body(store, "WorkloadEntry", "shop", "web-2")["spec"]["weight"] == 0
                for left_out in ("pending", "batch", "agent"):
                    assert store.get("WorkloadEntry", "shop", left_out) is None, left_out
                assert store.get("Service", "shop", "headless") is None
                assert body(store, "Service", "shop", "web")["spec"]["clusterIP"] == "10.96.0.10"
                assert body(store, "Namespace", "", "shop")["metadata"]["labels"][
                    "istio.io/dataplane-mode"] == "ambient"
                assert store.get("AuthorizationPolicy", "shop", "deny-legacy") is not None
                assert store.get("PeerAuthentication", "istio-system", "strict") is not None
                assert store.get("Gateway", "shop", "waypoint") is not None
                assert store.get("Gateway", "shop", "ingress") is None
                assert store.get("HTTPRoute", "shop", "web") is not None
                assert src.rejected == {}
                assert "Gateway shop/ingress" in src.skipped
                assert src.status()["synced"] is True
                # what the proxies get: only the ready pod is an endpoint of the service
                snap = snapshot_for(store, "node-a")
                web = next(s for s in snap.services if s.name == "web")
                assert web.vips == ("10.96.0.10",)
                wl = {w.uid: w for w in snap.workloads}
                assert [wl[e.workload_uid].ip for e in web.endpoints
                        if e.workload_uid in wl] == ["10.244.1.5"]
                assert {w.name for w in snap.workloads if w.node == "node-a"} >= {"web-1"}
            # one list per collection, paginated or not
            assert api.lists(PODS) == 1


async def test_paginated_list_sees_every_object(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        api.put(NS, namespace("shop"))
        for i in range(7):
            api.put(PODS, pod("shop", f"p{i}", f"10.244.0.{i + 10}"))
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api, page_size=3):
                names = {r.key.name for r in store.list_resources("WorkloadEntry", "shop")}
                assert names == {f"p{i}" for i in range(7)}
        pages = [q for p, q in api.requests if p == PODS and "watch" not in q]
        assert len(pages) == 3 and all(q["limit"] == "3" for q in pages)


async def test_expired_continue_token_restarts_the_list(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        api.put(NS, namespace("shop"))
        for i in range(5):
            api.put(PODS, pod("shop", f"p{i}", f"10.244.0.{i + 10}"))
        api.compact_after_first_page = True
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api, page_size=2):
                names = {r.key.name for r in store.list_resources("WorkloadEntry", "shop")}
                assert names == {f"p{i}" for i in range(5)}
        expired = [q for p, q in api.requests if p == PODS and q.get("continue")]
        assert expired, "the list never used a continue token"
        assert api.lists(PODS) >= 2  # started over after the 410


async def test_watch_events_update_the_store(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api) as src:
                api.put(PODS, pod("shop", "web-9", "10.244.1.99"))
                await until(lambda: store.get("WorkloadEntry", "shop", "web-9") is not None,
                            "a new pod")
                changed = pod("shop", "web-9", "10.244.1.99", app="web-v2")
                api.put(PODS, changed)
                await until(lambda: body(store, "WorkloadEntry", "shop", "web-9")["metadata"][
                    "labels"] == {"app": "web-v2"}, "the pod's new labels")
                api.delete(SVCS, "shop", "web")
                api.delete(APS, "shop", "deny-legacy")
                await until(lambda: store.get("Service", "shop", "web") is None
                            and store.get("AuthorizationPolicy", "shop", "deny-legacy") is None,
                            "deletions")
                # pod readiness from the EndpointSlice: web-2 becomes ready
                api.put(SLICES, endpoint_slice("shop", "web-abc", "web", [
                    pod_endpoint("shop", "web-1", "10.244.1.5", True),
                    pod_endpoint("shop", "web-2", "10.244.2.6", True)]))
                await until(lambda: body(store, "WorkloadEntry", "shop", "web-2")["spec"][
                    "weight"] == 1, "readiness from the slice")
                assert src.kind_status["Pod"].lists == 1
            assert api.lists(PODS) == 1


async def test_dropped_watch_resumes_from_the_last_resource_version(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api) as src:
                seen = api.put(PODS, pod("shop", "before", "10.244.1.20"))
                await until(lambda: src.kind_status["Pod"].resource_version
                            == seen["metadata"]["resourceVersion"], "the pod event")
                api.unavailable = True
                api.drop_watches()
                api.put(PODS, pod("shop", "while-away", "10.244.1.21"))
                api.delete(PODS, "shop", "before")
                await until(lambda: src.kind_status["Pod"].last_error != "", "a failed retry")
                api.unavailable = False
                await until(lambda: store.get("WorkloadEntry", "shop", "while-away") is not None
                            and store.get("WorkloadEntry", "shop", "before") is None,
                            "changes made while disconnected")
                resumed = [q for q in api.watches(PODS)
                           if q.get("resourceVersion") == seen["metadata"]["resourceVersion"]]
                assert resumed, "the watch did not resume from the last version it saw"
                assert src.kind_status["Pod"].relists_after_gone == 0
            assert api.lists(PODS) == 1  # resumed, never relisted


async def test_gone_relists_and_converges(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api) as src:
                api.unavailable = True
                api.drop_watches()
                api.delete(PODS, "shop", "web-1")
                api.put(PODS, pod("shop", "web-new", "10.244.1.30"))
                api.delete(GWS, "shop", "waypoint")
                api.compact()  # the versions the source knows are gone from history
                api.unavailable = False
                await until(lambda: src.kind_status["Pod"].relists_after_gone >= 1, "a relist")
                await until(lambda: store.get("WorkloadEntry", "shop", "web-1") is None
                            and store.get("WorkloadEntry", "shop", "web-new") is not None
                            and store.get("Gateway", "shop", "waypoint") is None,
                            "the store to converge after the relist")
                # the untouched objects stayed in place throughout (no flapping)
                assert store.get("WorkloadEntry", "shop", "web-2") is not None
                errors = [q for q in api.watches(PODS) if q.get("resourceVersion")]
                assert errors
            assert api.lists(PODS) == 2


async def test_bookmarks_move_the_resume_point(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api) as src:
                assert all(q.get("allowWatchBookmarks") == "true" for q in api.watches(PODS))
                api.put(NS, namespace("other"))  # advances the global version only
                api.bookmark()
                want = str(api.rv)
                await until(lambda: src.kind_status["Pod"].resource_version == want,
                            "the bookmark")
                api.drop_watches()
                await until(lambda: any(q.get("resourceVersion") == want
                                        for q in api.watches(PODS)), "a resumed watch")


async def test_server_side_watch_timeout_is_resumed(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api, watch_timeout=1) as src:
                await until(lambda: src.kind_status["Pod"].watches >= 2, "a second watch",
                            limit=5)
                api.put(PODS, pod("shop", "late", "10.244.1.40"))
                await until(lambda: store.get("WorkloadEntry", "shop", "late") is not None,
                            "an event after the resumed watch")
            assert api.lists(PODS) == 1


async def test_a_new_pod_may_reuse_the_address_of_a_deleted_one(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            # a long debounce puts the delete and the create into one reconcile
            async with running(store, api, debounce=0.3) as src:
                api.delete(PODS, "shop", "web-1")
                api.put(PODS, pod("shop", "web-1-new", "10.244.1.5"))
                await until(lambda: store.get("WorkloadEntry", "shop", "web-1-new") is not None,
                            "the new pod")
                assert store.get("WorkloadEntry", "shop", "web-1") is None
                assert src.rejected == {}


async def test_workload_locality_comes_from_its_node(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        api.put(NODES, {"metadata": {"name": "node-a", "labels": {
            "topology.kubernetes.io/region": "eu-west",
            "topology.kubernetes.io/zone": "eu-west-1a"}}})
        override = pod("shop", "pinned", "10.244.1.60")
        override["metadata"]["labels"]["istio-locality"] = "us-east.us-east-1b.rack7"
        api.put(PODS, override)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api):
                assert body(store, "WorkloadEntry", "shop", "web-1")["spec"]["locality"] == (
                    "eu-west/eu-west-1a")
                assert "locality" not in body(store, "WorkloadEntry", "shop", "web-2")["spec"]
                assert body(store, "WorkloadEntry", "shop", "pinned")["spec"]["locality"] == (
                    "us-east/us-east-1b/rack7")
                wl = {w.name: w for w in snapshot_for(store, "node-a").workloads}
                assert (wl["web-1"].locality.region, wl["web-1"].locality.zone) == (
                    "eu-west", "eu-west-1a")
                # a node relabelled later moves its workloads
                api.put(NODES, {"metadata": {"name": "node-a", "labels": {
                    "topology.kubernetes.io/region": "eu-central"}}})
                await until(lambda: body(store, "WorkloadEntry", "shop", "web-1")["spec"].get(
                    "locality") == "eu-central", "the new locality")


async def test_waypoint_gateway_gets_the_address_of_its_service(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        api.put(NS, namespace("shop", {"istio.io/dataplane-mode": "ambient",
                                       "istio.io/use-waypoint": "waypoint"}))
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api):
                assert "addresses" not in body(store, "Gateway", "shop", "waypoint")["spec"]
                web = next(s for s in snapshot_for(store, "node-a").services if s.name == "web")
                assert web.waypoint is None  # no address yet: the binding waits
                # the Service the control plane renders for the Gateway gets its ClusterIP
                svc = service("shop", "waypoint", "10.96.0.99",
                              {"gateway.networking.k8s.io/gateway-name": "waypoint"})
                svc["metadata"]["labels"] = {"gateway.networking.k8s.io/gateway-name":
                                             "waypoint"}
                api.put(SVCS, svc)
                await until(lambda: body(store, "Gateway", "shop", "waypoint")["spec"].get(
                    "addresses") == [{"type": "IPAddress", "value": "10.96.0.99"}],
                    "the waypoint address")
                web = next(s for s in snapshot_for(store, "node-a").services if s.name == "web")
                assert web.waypoint is not None
                assert web.waypoint.address == "10.96.0.99"
                assert web.waypoint.identity.endswith("/ns/shop/sa/waypoint")


async def test_waypoint_gateways_get_their_deployment_and_service(tmp_path: Path) -> None:
    async with KubeApiServer(WRITABLE) as api:
        populate(api)
        api.unserved = {DEPLOYMENTS}  # the first attempt fails, the next one succeeds
        deployer = WaypointDeployer(WaypointSettings(image="ambit/ambit:test"))
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api, waypoints=deployer) as src:
                await until(lambda: "shop/waypoint" in src.status()["waypoint_errors"],
                            "the refused apply")
                assert "404" in deployer.errors["shop/waypoint"]
                api.unserved = set()
                await until(lambda: not deployer.errors, "the retried apply")
                applied = {path for manager, path in api.applied
                           if manager == "ambit-control-plane"}
                assert applied >= {"/api/v1/namespaces/shop/serviceaccounts/waypoint",
                                   "/apis/apps/v1/namespaces/shop/deployments/waypoint",
                                   "/api/v1/namespaces/shop/services/waypoint"}
                dep = api.collections[DEPLOYMENTS].objects[("shop", "waypoint")]
                gw = api.collections[GWS].objects[("shop", "waypoint")]
                assert dep["metadata"]["ownerReferences"][0]["uid"] == gw["metadata"]["uid"]
                assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == (
                    "ambit/ambit:test")
                assert ("shop", "ingress") not in deployer.applied  # not a waypoint class
                # the Service's allocated ClusterIP becomes the waypoint's address
                svc_ip = api.collections[SVCS].objects[("shop", "waypoint")]["spec"]["clusterIP"]
                await until(lambda: body(store, "Gateway", "shop", "waypoint")["spec"].get(
                    "addresses") == [{"type": "IPAddress", "value": svc_ip}],
                    "the waypoint address")
                # the Gateway reports what happened (kubectl get gateway shows it)
                await until(lambda: api.collections[GWS].objects[("shop", "waypoint")].get(
                    "status", {}).get("addresses") == [{"type": "IPAddress", "value": svc_ip}],
                    "the Gateway status")
                status = api.collections[GWS].objects[("shop", "waypoint")]["status"]
                assert {c["type"]: c["status"] for c in status["conditions"]} == {
                    "Accepted": "True", "Programmed": "True"}
                gw = api.collections[GWS].objects[("shop", "waypoint")]
                # nothing changed: no new applies; the Gateway changed: applied again
                n = deployer.applies
                api.put(PODS, pod("shop", "unrelated", "10.244.1.70"))
                await until(lambda: store.get("WorkloadEntry", "shop", "unrelated") is not None,
                            "an unrelated change")
                assert deployer.applies == n
                changed = copy.deepcopy(gw)
                changed["spec"]["infrastructure"] = {"labels": {"team": "shop"}}
                api.put(GWS, changed)
                await until(lambda: api.collections[DEPLOYMENTS].objects[("shop", "waypoint")][
                    "metadata"]["labels"].get("team") == "shop", "the re-applied Deployment")


async def test_only_owned_resources_are_deleted(tmp_path: Path) -> None:
    with Store(str(tmp_path / "cp")) as store:
        store.apply([Document("t", 1, {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": "shop"}}),
                     Document("t", 2, {"apiVersion": "networking.istio.io/v1",
                                       "kind": "WorkloadEntry",
                                       "metadata": {"name": "vm-1", "namespace": "shop"},
                                       "spec": {"address": "192.168.10.5"}}),
                     Document("t", 3, {"apiVersion": "networking.istio.io/v1",
                                       "kind": "WorkloadEntry",
                                       "metadata": {"name": "stale", "namespace": "shop",
                                                    "annotations": {OWNER_ANNOTATION:
                                                                    "kubernetes"}},
                                       "spec": {"address": "10.244.9.9"}})])
        async with KubeApiServer(COLLECTIONS) as api:
            populate(api)
            async with running(store, api):
                assert store.get("WorkloadEntry", "shop", "stale") is None
                assert store.get("WorkloadEntry", "shop", "vm-1") is not None
                assert store.get("WorkloadEntry", "shop", "web-1") is not None


async def test_refused_object_keeps_its_last_accepted_version(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api) as src:
                api.put(APS, deny_legacy(action="MAYBE"))
                key = "AuthorizationPolicy shop/deny-legacy"
                await until(lambda: key in src.rejected, "the refusal")
                assert "spec.action" in src.rejected[key]
                assert body(store, "AuthorizationPolicy", "shop", "deny-legacy")["spec"][
                    "action"] == "DENY"
                api.put(PODS, pod("shop", "after", "10.244.1.50"))
                await until(lambda: store.get("WorkloadEntry", "shop", "after") is not None,
                            "other changes still flow")
                api.put(APS, deny_legacy())
                await until(lambda: key not in src.rejected, "the fixed policy")


async def test_selectorless_service_uses_its_endpoint_slices(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        api.put(NS, namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
        api.put(SVCS, service("shop", "legacy-db", "10.96.0.50"))
        api.put(SLICES, endpoint_slice("shop", "legacy-db-1", "legacy-db", [
            {"addresses": ["192.168.50.1"], "conditions": {"ready": True}},
            {"addresses": ["192.168.50.2"], "conditions": {"ready": False}}]))
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api):
                assert body(store, "Service", "shop", "legacy-db")["spec"]["selector"] == {
                    ENDPOINTS_LABEL: "legacy-db"}
                snap = snapshot_for(store, "node-a")
                svc = next(s for s in snap.services if s.name == "legacy-db")
                wl = {w.uid: w for w in snap.workloads}
                ips = sorted(wl[e.workload_uid].ip for e in svc.endpoints if e.workload_uid in wl)
                assert ips == ["192.168.50.1"]
                assert all(not wl[e.workload_uid].enrolled for e in svc.endpoints)


async def test_missing_crd_is_empty_until_installed(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        api.unserved = {"/apis/ambit.dev/v1alpha1/httpfaults", GWS}
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api) as src:
                assert src.kind_status["HTTPFault"].missing
                assert "CRD" in src.kind_status["Gateway"].last_error
                assert store.get("Gateway", "shop", "waypoint") is None
                api.unserved = set()
                await until(lambda: store.get("Gateway", "shop", "waypoint") is not None,
                            "the Gateway after its CRD appeared")
                assert not src.kind_status["Gateway"].missing


async def test_wrong_credentials_say_what_to_check(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        with Store(str(tmp_path / "cp")) as store:
            async with running(store, api, wait=False, token="wrong") as src:
                await until(lambda: "ClusterRole" in src.kind_status["Pod"].last_error,
                            "the refusal")
                assert not src.is_synced


async def test_run_source_with_a_kubeconfig_reports_when_synced(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: test, cluster: {{server: "{api.url}"}}}}]
users: [{{name: test, user: {{token: {api.token}}}}}]
contexts: [{{name: test, context: {{cluster: test, user: test}}}}]
current-context: test
""")
        synced = asyncio.Event()
        with Store(str(tmp_path / "cp")) as store:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(run_source(store, kubeconfig=str(kubeconfig),
                                                 on_synced=lambda s: synced.set(),
                                                 debounce=0))
                await asyncio.wait_for(synced.wait(), 10)
                assert store.get("WorkloadEntry", "shop", "web-1") is not None
                task.cancel()


async def test_no_credentials_is_a_clear_error(tmp_path: Path) -> None:
    with Store(str(tmp_path / "cp")) as store, pytest.raises(
            KubeApiError, match="no Kubernetes credentials"):
        await run_source(store, kubeconfig=str(tmp_path / "absent"))


def test_unchanged_objects_reuse_their_translation() -> None:
    memo = TranslationMemo()
    ns = namespace("shop")
    ns["metadata"]["resourceVersion"] = "1"
    p1, p2 = pod("shop", "a", "10.0.0.1"), pod("shop", "b", "10.0.0.2")
    p1["metadata"]["resourceVersion"], p2["metadata"]["resourceVersion"] = "2", "3"
    cache: dict[str, Any] = {"Namespace": {("", "shop"): ns},
                             "Pod": {("shop", "a"): p1, ("shop", "b"): p2}}
    first = desired_state(cache, memo).manifests
    changed = pod("shop", "b", "10.0.0.2", app="other")
    changed["metadata"]["resourceVersion"] = "4"
    cache["Pod"] = {("shop", "a"): p1, ("shop", "b"): changed}
    second = desired_state(cache, memo).manifests
    a, b = ResourceKey("WorkloadEntry", "shop", "a"), ResourceKey("WorkloadEntry", "shop", "b")
    assert second[a] is first[a]
    assert second[b] is not first[b] and second[b]["metadata"]["labels"] == {"app": "other"}
    assert len(memo) == 3  # entries of replaced versions are dropped


def test_cached_objects_are_trimmed() -> None:
    p = pod("shop", "a", "10.0.0.1")
    assert "managedFields" in p["metadata"]
    t = trim(p)
    assert "managedFields" not in t["metadata"]
    assert "kubectl.kubernetes.io/last-applied-configuration" not in t["metadata"]["annotations"]
    assert t["status"]["podIP"] == "10.0.0.1"


def test_line_splitter_joins_partial_chunks() -> None:
    s = LineSplitter()
    assert s.feed(b'{"type":"ADD') == []
    assert s.feed(b'ED"}\n{"a"') == [b'{"type":"ADDED"}']
    assert s.feed(b":1}\n\n") == [b'{"a":1}']
    big = b"x" * 300_000
    assert s.feed(big) == []
    assert s.feed(b"\n") == [big]


@pytest.mark.parametrize(("typ", "ip"), [("ExternalName", "10.96.0.1"), ("ClusterIP", "None")])
def test_services_without_a_vip_are_left_out(typ: str, ip: str) -> None:
    d = desired_state({"Namespace": {("", "shop"): namespace("shop")},
                       "Service": {("shop", "x"): service("shop", "x", ip, {"a": "b"},
                                                          type=typ)}})
    assert not [k for k in d.manifests if k.kind == "Service"]
    assert "Service shop/x" in d.skipped


def test_objects_of_unknown_namespaces_wait() -> None:
    d = desired_state({"Pod": {("shop", "p"): pod("shop", "p", "10.0.0.1")}})
    assert d.manifests == {}
    assert "not known yet" in d.skipped["WorkloadEntry shop/p"]


# -- the real `ambit control-plane --source kubernetes` process ----------------------------


def write_kubeconfig(path: Path, api: KubeApiServer, token: str | None = None) -> Path:
    path.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: test, cluster: {{server: "{api.url}"}}}}]
users: [{{name: test, user: {{token: {token or api.token}}}}}]
contexts: [{{name: test, context: {{cluster: test, user: test}}}}]
current-context: test
""")
    return path


@contextlib.asynccontextmanager
async def control_plane_process(tmp_path: Path, *args: str
                                ) -> AsyncIterator[asyncio.subprocess.Process]:
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMBIT_", "KUBECONFIG"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "config", "control-plane", "--data-dir", str(tmp_path / "cp"),
        "--socket", str(tmp_path / "control.sock"), "--proxy-listen", "127.0.0.1:0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def ambit_get(tmp_path: Path, *args: str) -> Any:
    import json
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "config", "get", *args, "-o", "json",
        "--socket", str(tmp_path / "control.sock"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_control_plane_process_serves_only_after_the_first_full_list(
        tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api:
        populate(api)
        api.unavailable = True  # the API server is not answering yet
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api)
        async with control_plane_process(tmp_path, "--source", "kubernetes",
                                         "--kubeconfig", str(kubeconfig)) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            with pytest.raises(TimeoutError):
                line = await asyncio.wait_for(proc.stdout.readline(), 1.5)
                pytest.fail(f"ready before the cluster was listed: {line!r}")
            assert not (tmp_path / "control.sock").exists(), "served before the first list"
            assert proc.returncode is None
            api.unavailable = False
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert line.startswith(b"ready "), (line, await proc.stderr.read(4096))
            assert b" proxies=127.0.0.1:" in line
            # the whole cluster is in the store the moment it says ready
            got = await ambit_get(tmp_path, "workloadentries", "-n", "shop")
            names = {i["metadata"]["name"] for i in got["items"]}
            assert {"web-1", "web-2", "web-3"} <= names
            # and it keeps following the cluster
            api.put(PODS, pod("shop", "web-4", "10.244.1.11"))
            await until_async(lambda: ambit_get(tmp_path, "workloadentries", "web-4",
                                                "-n", "shop"), "web-4 mirrored")
            # a ztunnel joins with its ServiceAccount token (TokenReview), no join token
            proxies = line.split(b" proxies=")[1].split()[0].decode()
            token = api.service_account_token("ambit-system", "ztunnel", pod="ztunnel-a",
                                              node="node-a")
            cert = await join(tmp_path, proxies, "node-a", token)
            assert common_name(cert) == "node:node-a" and api.token_reviews == 1
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 10) == 0


async def until_async(probe: Callable[[], Any], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            await probe()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {limit}s waiting for {what}") from None
        await asyncio.sleep(0.05)


async def test_control_plane_process_without_kubernetes_credentials_says_so(
        tmp_path: Path) -> None:
    async with control_plane_process(tmp_path, "--source", "kubernetes", "--kubeconfig",
                                     str(tmp_path / "absent")) as proc:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1
        assert b"no Kubernetes credentials" in err, err


# -- proxies joining with their Kubernetes ServiceAccount token (TokenReview) ---------------


@contextlib.asynccontextmanager
async def push_with_service_accounts(tmp_path: Path, api: KubeApiServer
                                     ) -> AsyncIterator[tuple[str, Store, TokenStore]]:
    authenticate = ServiceAccountAuthenticator(config_for(api)).authenticate
    async with push_server(tmp_path, service_accounts=authenticate) as (push, host, port):
        yield f"{host}:{port}", push.store, push.tokens


async def join(tmp_path: Path, address: str, subject: str, token: str) -> Any:
    client = PushClient(address, subject, tmp_path / subject.replace("/", "_"), token=token,
                        timeout=5)
    return await client.join()


def common_name(cert: Any) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    leaf = x509.load_pem_x509_certificate(cert.cert_pem)
    return str(leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def test_ztunnel_joins_with_its_service_account_token(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api, push_with_service_accounts(
            tmp_path, api) as (address, _, _):
        token = api.service_account_token("ambit-system", "ztunnel", pod="ztunnel-x7k2p",
                                          node="node-a")
        cert = await join(tmp_path, address, "node-a", token)
        assert str(cert.identity) == "spiffe://cluster.local/ns/ambit-system/sa/ztunnel"
        assert common_name(cert) == "node:node-a"
        assert api.token_reviews == 1


async def test_node_comes_from_the_pod_when_the_review_has_no_node_name(
        tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api, push_with_service_accounts(
            tmp_path, api) as (address, _, _):
        api.put(PODS, pod("ambit-system", "ztunnel-b", "10.0.0.2", node="node-b",
                          sa="ztunnel"))
        token = api.service_account_token("ambit-system", "ztunnel", pod="ztunnel-b")
        with pytest.raises(PushError, match="on node node-b, not on node-a") as e:
            await join(tmp_path, address, "node-a", token)
        assert e.value.rule == "node-impersonation"
        assert common_name(await join(tmp_path, address, "node-b", token)) == "node:node-b"


@pytest.mark.parametrize(
    ("mint", "subject", "rule", "says"),
    [
        (lambda api: api.service_account_token("default", "default", pod="p", node="node-a"),
         "node-a", "service-account",
         "ServiceAccount default/default cannot join as node node-a: only ztunnel's"),
        (lambda api: "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.forged", "node-a",
         "service-account-token", "invalid bearer token"),
        (lambda api: api.service_account_token("ambit-system", "ztunnel", pod="p",
                                               node="node-a", audiences=["vault"]),
         "node-a", "service-account-token", "is invalid for the target audiences"),
        (lambda api: api.service_account_token("ambit-system", "ztunnel", pod="p",
                                               node="node-b"),
         "node-a", "node-impersonation", "on node node-b, not on node-a"),
        (lambda api: api.service_account_token("ambit-system", "ztunnel"),
         "node-a", "service-account-token", "not bound to a pod"),
        (lambda api: api.service_account_token("ambit-system", "ztunnel", pod="p",
                                               node="node-a"),
         "shop/waypoint", "service-account", "cannot join as waypoint shop/waypoint"),
    ],
    ids=["other-service-account", "unauthenticated", "other-audience", "other-node",
         "unbound-token", "node-token-as-waypoint"],
)
async def test_service_account_tokens_that_may_not_join_are_refused(
        tmp_path: Path, mint: Callable[[KubeApiServer], str], subject: str, rule: str,
        says: str) -> None:
    async with KubeApiServer(COLLECTIONS) as api, push_with_service_accounts(
            tmp_path, api) as (address, _, _):
        with pytest.raises(PushError, match=re.escape(says)) as e:
            await join(tmp_path, address, subject, mint(api))
        assert e.value.rule == rule
        assert not (tmp_path / subject.replace("/", "_") / "node-cert.pem").exists()


async def test_waypoint_joins_with_its_own_service_account(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api, push_with_service_accounts(
            tmp_path, api) as (address, store, _):
        token = api.service_account_token("shop", "waypoint", pod="waypoint-5d9f",
                                          node="node-a")
        with pytest.raises(PushError, match="Gateway shop/waypoint not found"):
            await join(tmp_path, address, "shop/waypoint", token)
        store.apply([Document("gw.yaml", 1, {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
            Document("gw.yaml", 2, {
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "shop"},
                "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
                    {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})])
        cert = await join(tmp_path, address, "shop/waypoint", token)
        assert str(cert.identity) == "spiffe://cluster.local/ns/shop/sa/waypoint"
        assert common_name(cert) == "waypoint:shop/waypoint"


async def test_join_tokens_still_work_next_to_service_account_tokens(tmp_path: Path) -> None:
    async with KubeApiServer(COLLECTIONS) as api, push_with_service_accounts(
            tmp_path, api) as (address, _, tokens):
        cert = await join(tmp_path, address, "vm-1", tokens.create("vm-1"))
        assert common_name(cert) == "node:vm-1"
        assert api.token_reviews == 0
