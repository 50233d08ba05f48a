"""Kubernetes source for the control plane: list+watch the cluster and mirror it into the Store.

The control plane keeps one resource model whatever feeds it. In a cluster this source
lists and watches Namespaces, Nodes, Pods, Services, EndpointSlices, Gateways, HTTPRoutes and
the Istio kinds (AuthorizationPolicy, PeerAuthentication, DestinationRule,
WorkloadEntry, plus the ambit.dev kinds) and writes what they mean into the same
`config.store.Store` that `ambit apply` writes to; snapshot computation and push then
work unchanged.

Translation (pure, `desired_state`):

- a Pod becomes a `WorkloadEntry` of the same name: `status.podIP` as address,
  `spec.nodeName` as the `ambit.dev/node` annotation, the pod's labels and service
  account, its named container ports, the locality of its node (topology labels, or
  the pod label `istio-locality`); weight 0 (not an endpoint) when the pod is not
  ready according to the EndpointSlices that list it (or its Ready condition when none
  does). Pods without an IP yet, finished pods and host-network pods are left out.
- a Service keeps selector, ports and clusterIP; headless and ExternalName Services are
  left out (Ambit needs a VIP to capture). A Service without a selector gets a synthetic
  selector `ambit.dev/endpoints-of: <name>` and each address of its EndpointSlices
  becomes a (not enrolled) WorkloadEntry carrying that label, so manually managed
  endpoints work too.
- Gateways whose class is not `istio-waypoint` are ignored (ingress gateways of other
  implementations share the API). A waypoint Gateway without `spec.addresses` gets the
  ClusterIP of its Service (the one `config.kube_waypoint` renders) as its address.
- everything else is passed through (metadata trimmed, `status` dropped).

Everything written carries the annotation `ambit.dev/source: kubernetes`; the source
only ever deletes what carries it, so resources applied with `ambit apply` coexist.
An object the resource model refuses is reported (see `status()`) and its last accepted
version stays in the store, as a refused `ambit apply` leaves the previous state.

Watching follows the API's rules: list (paginated, `limit`/`continue`), then watch from
the list's `resourceVersion` with bookmarks; after a dropped connection or a server
timeout it resumes from the last resourceVersion seen; on `410 Gone` (the version was
compacted away: an ERROR event or an HTTP 410) it lists again and replaces that kind's
cache in one step, so objects deleted while it was away disappear and nothing flaps.
The HTTP client, configuration (in-cluster service account or kubeconfig) and auth are
kubernetes_asyncio's.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio.client import ApiClient, Configuration

from config.kube_waypoint import GATEWAY_NAME_LABEL, WaypointDeployer, WaypointSettings
from config.nodeauth import NodePrincipal, Refused
from config.resources import (
    DATAPLANE_MODE_LABEL,
    KINDS,
    NODE_ANNOTATION,
    WAYPOINT_CLASS,
    FieldError,
    ResourceKey,
    parse_resource,
)
from config.store import Conflict, NotFound, Store
from config.validate import Document, ValidationFailed

log = structlog.get_logger("ambit.kube-source")

OWNER_ANNOTATION = "ambit.dev/source"
OWNER_VALUE = "kubernetes"
ENDPOINTS_LABEL = "ambit.dev/endpoints-of"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Annotations that are large or meaningless to the mesh and are not copied.
_DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
SOURCE_NAME = "kubernetes"


@dataclass(frozen=True)
class WatchedKind:
    """One collection the source lists and watches."""

    kind: str
    path: str  # the cluster-wide collection, e.g. /api/v1/pods
    optional: bool = False  # a CRD that may not be installed (404 -> empty, retried)


WATCHED: tuple[WatchedKind, ...] = (
    WatchedKind("Namespace", "/api/v1/namespaces"),
    WatchedKind("Node", "/api/v1/nodes"),
    WatchedKind("Pod", "/api/v1/pods"),
    WatchedKind("Service", "/api/v1/services"),
    WatchedKind("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices"),
    WatchedKind("Gateway", "/apis/gateway.networking.k8s.io/v1/gateways", True),
    WatchedKind("HTTPRoute", "/apis/gateway.networking.k8s.io/v1/httproutes", True),
    WatchedKind("AuthorizationPolicy", "/apis/security.istio.io/v1/authorizationpolicies",
                True),
    WatchedKind("PeerAuthentication", "/apis/security.istio.io/v1/peerauthentications", True),
    WatchedKind("DestinationRule", "/apis/networking.istio.io/v1/destinationrules", True),
    WatchedKind("WorkloadEntry", "/apis/networking.istio.io/v1/workloadentries", True),
    WatchedKind("HTTPFault", "/apis/ambit.dev/v1alpha1/httpfaults", True),
    WatchedKind("RateLimit", "/apis/ambit.dev/v1alpha1/ratelimits", True),
)

# Kinds of the store this source writes (Pods and EndpointSlices become WorkloadEntries).
MIRRORED_KINDS = frozenset({"Namespace", "WorkloadEntry", "Service", "Gateway", "HTTPRoute",
                            "AuthorizationPolicy", "PeerAuthentication", "DestinationRule",
                            "HTTPFault", "RateLimit"})

ObjKey = tuple[str, str]  # (namespace, name)
Cache = Mapping[str, Mapping[ObjKey, Mapping[str, Any]]]


# ---------------------------------------------------------------------------------------
# translation (pure)
# ---------------------------------------------------------------------------------------


def obj_key(obj: Mapping[str, Any]) -> ObjKey:
    md = obj.get("metadata") or {}
    return str(md.get("namespace") or ""), str(md.get("name") or "")


def _metadata(obj: Mapping[str, Any], *, labels: Mapping[str, str] | None = None
              ) -> dict[str, Any]:
    md = obj.get("metadata") or {}
    out: dict[str, Any] = {"name": md["name"]}
    if md.get("namespace"):
        out["namespace"] = md["namespace"]
    lab = dict(md.get("labels") or {}) if labels is None else dict(labels)
    if lab:
        out["labels"] = lab
    ann = {str(k): v for k, v in (md.get("annotations") or {}).items()
           if k not in _DROPPED_ANNOTATIONS}
    ann[OWNER_ANNOTATION] = OWNER_VALUE
    out["annotations"] = ann
    return out


def _is_true(v: Any) -> bool:
    return v is True or v == "True"


def pod_readiness(slices: Iterable[Mapping[str, Any]]) -> dict[ObjKey, bool]:
    """(namespace, pod) -> ready, from the EndpointSlices that list the pod.

    A pod is ready when any slice lists it ready (`conditions.ready` absent means ready,
    as the API defines); listed only as not ready -> False; not listed -> absent.
    """
    out: dict[ObjKey, bool] = {}
    for s in slices:
        ns = str((s.get("metadata") or {}).get("namespace") or "")
        for ep in s.get("endpoints") or ():
            ref = ep.get("targetRef") or {}
            if ref.get("kind") != "Pod" or not ref.get("name"):
                continue
            ready = (ep.get("conditions") or {}).get("ready")
            key = (str(ref.get("namespace") or ns), str(ref["name"]))
            out[key] = out.get(key, False) or ready is None or ready is True
    return out


REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
LOCALITY_LABEL = "istio-locality"  # Istio's per-pod override: region.zone.subzone


def node_locality(node: Mapping[str, Any] | None) -> str:
    """region/zone/subzone from a Node's well-known topology labels ("" when unlabelled)."""
    labels = ((node or {}).get("metadata") or {}).get("labels") or {}
    parts = [str(labels.get(k, "")) for k in (REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL)]
    while parts and not parts[-1]:
        parts.pop()
    return "/".join(parts)


def translate_pod(pod: Mapping[str, Any], ready: bool | None, locality: str = ""
                  ) -> tuple[dict[str, Any] | None, str]:
    """A Pod -> a WorkloadEntry manifest, or (None, why it is left out).

    `locality` is the pod's node's region/zone/subzone; the pod label `istio-locality`
    (`region.zone.subzone`, as in Istio) overrides it.
    """
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    if spec.get("hostNetwork"):
        return None, "host-network pods share the node's address and are not captured"
    if status.get("phase") in ("Succeeded", "Failed"):
        return None, f"pod has {status['phase'].lower()}"
    ip = status.get("podIP") or ""
    if not ip:
        return None, "pod has no IP yet"
    if ready is None:
        ready = any(c.get("type") == "Ready" and _is_true(c.get("status"))
                    for c in status.get("conditions") or ())
    ports: dict[str, int] = {}
    for c in spec.get("containers") or ():
        for p in c.get("ports") or ():
            if p.get("name") and p.get("protocol", "TCP") == "TCP":
                ports[str(p["name"])] = int(p["containerPort"])
    md = _metadata(pod)
    if spec.get("nodeName"):
        md["annotations"][NODE_ANNOTATION] = spec["nodeName"]
    we_spec: dict[str, Any] = {
        "address": ip,
        "serviceAccount": spec.get("serviceAccountName") or "default",
        "weight": 1 if ready else 0,
    }
    if ports:
        we_spec["ports"] = ports
    override = ((pod.get("metadata") or {}).get("labels") or {}).get(LOCALITY_LABEL)
    if override:
        locality = "/".join(str(override).split(".")[:3])
    if locality:
        we_spec["locality"] = locality
    return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": md,
            "spec": we_spec}, ""


_SERVICE_PORT_FIELDS = ("name", "port", "targetPort", "protocol", "appProtocol")


def translate_service(svc: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    spec = svc.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None, "ExternalName services have no VIP to capture"
    cluster_ip = spec.get("clusterIP") or ""
    if cluster_ip == "None":
        return None, "headless services are not supported (no VIP)"
    name = (svc.get("metadata") or {}).get("name", "")
    selector = dict(spec.get("selector") or {}) or {ENDPOINTS_LABEL: name}
    out: dict[str, Any] = {
        "selector": selector,
        "ports": [{k: p[k] for k in _SERVICE_PORT_FIELDS if k in p}
                  for p in spec.get("ports") or ()],
    }
    if cluster_ip:
        out["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(svc), "spec": out}, ""


def _dns_name(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def translate_slice_endpoints(svc_name: str, slc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Addresses of a selector-less Service's EndpointSlice -> not-enrolled WorkloadEntries."""
    ns = str((slc.get("metadata") or {}).get("namespace") or "")
    if slc.get("addressType") not in ("IPv4", "IPv6"):
        return []
    ports = {str(p["name"]): int(p["port"]) for p in slc.get("ports") or ()
             if p.get("name") and p.get("port") is not None}
    out = []
    for ep in slc.get("endpoints") or ():
        if (ep.get("targetRef") or {}).get("kind") == "Pod":
            continue  # the Pod itself is the workload
        ready = (ep.get("conditions") or {}).get("ready")
        for addr in ep.get("addresses") or ():
            md: dict[str, Any] = {
                "name": f"{svc_name}-ep-{_dns_name(addr)}"[:253], "namespace": ns,
                "annotations": {OWNER_ANNOTATION: OWNER_VALUE}}
            if ep.get("nodeName"):
                md["annotations"][NODE_ANNOTATION] = ep["nodeName"]
            spec: dict[str, Any] = {
                "address": addr,
                "labels": {ENDPOINTS_LABEL: svc_name, DATAPLANE_MODE_LABEL: "none"},
                "weight": 0 if ready is False else 1,
            }
            if ports:
                spec["ports"] = ports
            out.append({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                        "metadata": md, "spec": spec})
    return out


def translate_passthrough(kind: str, obj: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    info = KINDS[kind]
    api_version = obj.get("apiVersion")
    if api_version not in info.api_versions:
        api_version = info.api_versions[0]
    spec = obj.get("spec")
    if kind == "Gateway" and (spec or {}).get("gatewayClassName") != WAYPOINT_CLASS:
        return None, f"gateway class {(spec or {}).get('gatewayClassName')!r} is not " \
                     f"{WAYPOINT_CLASS!r}"
    out: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": _metadata(obj)}
    if spec is not None:
        out["spec"] = copy.deepcopy(spec)
    return out, ""


def waypoint_address(gateway: Mapping[str, Any],
                     services: Mapping[ObjKey, Mapping[str, Any]]) -> str:
    """The address ztunnels send a waypoint's traffic to, when the Gateway names none:
    the ClusterIP of the Service created for it (same name, labelled with the gateway
    name, as Istio does), else an IPAddress from the Gateway's status."""
    ns, name = obj_key(gateway)
    svc = services.get((ns, name))
    if svc is not None:
        labels = (svc.get("metadata") or {}).get("labels") or {}
        ip = str((svc.get("spec") or {}).get("clusterIP") or "")
        if labels.get(GATEWAY_NAME_LABEL) == name and ip and ip != "None":
            return ip
    for a in (gateway.get("status") or {}).get("addresses") or ():
        if a.get("type", "IPAddress") == "IPAddress" and a.get("value"):
            return str(a["value"])
    return ""


@dataclass
class Desired:
    """What the cluster means in the store's terms, and what was left out and why."""

    manifests: dict[ResourceKey, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # "Kind ns/name" -> reason


class TranslationMemo:
    """Reuses the translation of objects whose resourceVersion and inputs did not change.

    A reconcile then costs in proportion to what changed, not to the cluster's size;
    entries not used in a round are dropped by `rotate()`.
    """

    def __init__(self) -> None:
        self._old: dict[tuple[Any, ...], Any] = {}
        self._new: dict[tuple[Any, ...], Any] = {}

    def get(self, key: tuple[Any, ...] | None, fn: Callable[[], Any]) -> Any:
        if key is None:
            return fn()
        try:
            out = self._old[key]
        except KeyError:
            out = fn()
        self._new[key] = out
        return out

    def rotate(self) -> None:
        self._old, self._new = self._new, {}

    def __len__(self) -> int:
        return len(self._old)


def _rv(obj: Mapping[str, Any]) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


def desired_state(cache: Cache, memo: TranslationMemo | None = None) -> Desired:
    """Translate every cached Kubernetes object (pure; see the module docstring).

    With `memo`, objects whose resourceVersion and inputs are unchanged since the last
    call reuse their previous translation (the same manifest objects).
    """
    d = Desired()
    m_ = memo if memo is not None else TranslationMemo()

    def key_of(*parts: Any) -> tuple[Any, ...] | None:
        return None if memo is None or parts[-1] is None else parts

    def put(m: dict[str, Any]) -> None:
        md = m["metadata"]
        d.manifests[ResourceKey(m["kind"], md.get("namespace", ""), md["name"])] = m

    def skip(kind: str, key: ObjKey, why: str) -> None:
        d.skipped[f"{kind} {key[0]}/{key[1]}" if key[0] else f"{kind} {key[1]}"] = why

    def namespace_manifest(obj: Mapping[str, Any]) -> dict[str, Any]:
        md = _metadata(obj)
        md.pop("namespace", None)
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": md}

    namespaces = cache.get("Namespace", {})
    for key, obj in namespaces.items():
        put(m_.get(key_of("Namespace", key, _rv(obj)), partial(namespace_manifest, obj)))
    slices = cache.get("EndpointSlice", {})
    readiness = pod_readiness(slices.values())
    nodes = cache.get("Node", {})
    for key, obj in cache.get("Pod", {}).items():
        node = nodes.get(("", str((obj.get("spec") or {}).get("nodeName") or "")))
        ready, locality = readiness.get(key), node_locality(node)
        m, why = m_.get(key_of("Pod", key, ready, locality, _rv(obj)),
                        partial(translate_pod, obj, ready, locality))
        if m is None:
            skip("Pod", key, why)
        else:
            put(m)
    selectorless: set[ObjKey] = set()
    services = cache.get("Service", {})
    for key, obj in services.items():
        m, why = m_.get(key_of("Service", key, _rv(obj)), partial(translate_service, obj))
        if m is None:
            skip("Service", key, why)
            continue
        if not (obj.get("spec") or {}).get("selector"):
            selectorless.add(key)
        put(m)
    for key, slc in slices.items():
        svc = str(((slc.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL, ""))
        if svc and (key[0], svc) in selectorless:
            for m in m_.get(key_of("Slice", key, svc, _rv(slc)),
                            partial(translate_slice_endpoints, svc, slc)):
                put(m)

    def passthrough(kind: str, obj: Mapping[str, Any], addr: str
                    ) -> tuple[dict[str, Any] | None, str]:
        m, why = translate_passthrough(kind, obj)
        if m is not None and addr:
            m["spec"]["addresses"] = [{"type": "IPAddress", "value": addr}]
        return m, why

    for kind in sorted(KINDS):
        if kind in ("Namespace", "Service"):
            continue
        for key, obj in cache.get(kind, {}).items():
            addr = ""
            if kind == "Gateway" and not (obj.get("spec") or {}).get("addresses"):
                addr = waypoint_address(obj, services)
            m, why = m_.get(key_of(kind, key, addr, _rv(obj)),
                            partial(passthrough, kind, obj, addr))
            if m is None:
                skip(kind, key, why)
                continue
            put(m)
    # objects of a namespace not (yet) seen cannot be stored
    known = {name for _, name in namespaces}
    for rkey in [k for k in d.manifests if k.namespace and k.namespace not in known]:
        d.manifests.pop(rkey)
        d.skipped[str(rkey)] = f"namespace {rkey.namespace!r} is not known yet"
    if memo is not None:
        memo.rotate()
    return d


def trim(obj: dict[str, Any]) -> dict[str, Any]:
    """Drop what the mesh never reads and that can dominate an object's size (managedFields,
    the last-applied annotation) before it is cached. Mutates and returns `obj`."""
    md = obj.get("metadata")
    if isinstance(md, dict):
        md.pop("managedFields", None)
        ann = md.get("annotations")
        if isinstance(ann, dict):
            for k in _DROPPED_ANNOTATIONS:
                ann.pop(k, None)
    return obj


# ---------------------------------------------------------------------------------------
# the watch stream (sans-IO)
# ---------------------------------------------------------------------------------------


class LineSplitter:
    """Bytes of a watch response in, complete JSON lines out (no line-length limit)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:
            return []
        *lines, rest = bytes(self._buf).split(b"\n")
        self._buf = bytearray(rest)
        return [ln for ln in lines if ln.strip()]


class Gone(Exception):
    """410: the resourceVersion is older than the server keeps; relist."""


class KubeApiError(Exception):
    """The API server refused a request (the message says what to check)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def _status_message(body: bytes) -> str:
    try:
        obj = json.loads(body)
        return str(obj.get("message") or obj.get("reason") or body[:200].decode(errors="replace"))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


# ---------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------


@dataclass
class KindStatus:
    listed: bool = False
    missing: bool = False  # CRD not installed (404)
    resource_version: str = ""
    objects: int = 0
    lists: int = 0
    watches: int = 0
    relists_after_gone: int = 0
    events: int = 0
    last_error: str = ""


@dataclass
class ReconcileResult:
    written: int
    deleted: int
    rejected: dict[str, str]


async def load_configuration(kubeconfig: str | None = None) -> Configuration:
    """In-cluster service account credentials, else the kubeconfig (KUBECONFIG, ~/.kube)."""
    from kubernetes_asyncio import config as kconfig

    cfg = Configuration()
    if kubeconfig is None:
        try:
            kconfig.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg)
            return cfg
        except kconfig.ConfigException:
            pass
    try:
        await kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except (kconfig.ConfigException, OSError) as e:
        raise KubeApiError(0, f"no Kubernetes credentials: not in a pod and no usable "
                           f"kubeconfig ({e}): run inside the cluster or set KUBECONFIG"
                           ) from None
    return cfg


class KubeSource:
    """Mirror a Kubernetes cluster into `store`. Run `run()` in a TaskGroup; await `synced()`.

    `watch_timeout` is the server-side watch duration (seconds, jittered +-10%), after
    which the watch is resumed from the last resourceVersion; `page_size` the list
    `limit`; `missing_retry` how often an absent CRD is looked for again.
    """

    def __init__(
        self,
        store: Store,
        configuration: Configuration,
        *,
        kinds: Iterable[WatchedKind] = WATCHED,
        watch_timeout: float = 300.0,
        page_size: int = 500,
        missing_retry: float = 30.0,
        debounce: float = 0.05,
        backoff_max: float = 30.0,
        waypoints: WaypointDeployer | None = None,
    ) -> None:
        self.store = store
        self.configuration = configuration
        self.kinds = tuple(kinds)
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.missing_retry = missing_retry
        self.debounce = debounce
        self.backoff_max = backoff_max
        self.waypoints = waypoints
        self.kind_status: dict[str, KindStatus] = {k.kind: KindStatus() for k in self.kinds}
        self.rejected: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.reconciles = 0
        self._cache: dict[str, dict[ObjKey, Mapping[str, Any]]] = {k.kind: {} for k in self.kinds}
        self._dirty = asyncio.Event()
        self._all_listed = asyncio.Event()
        self._synced = asyncio.Event()
        self._written: dict[ResourceKey, Mapping[str, Any]] | None = None
        self._logged_rejections: dict[str, str] = {}
        self._memo = TranslationMemo()
        self._parsed: dict[ResourceKey, tuple[Mapping[str, Any], Mapping[str, Any] | str]] = {}

    # -- public ------------------------------------------------------------------------

    async def synced(self) -> None:
        """Wait until every kind was listed once and the store holds the result."""
        await self._synced.wait()

    @property
    def is_synced(self) -> bool:
        return self._synced.is_set()

    def status(self) -> dict[str, Any]:
        return {
            "synced": self.is_synced,
            "reconciles": self.reconciles,
            "kinds": {k: vars(s).copy() for k, s in self.kind_status.items()},
            "rejected": dict(self.rejected),
            "skipped": len(self.skipped),
            "waypoint_errors": dict(self.waypoints.errors) if self.waypoints else {},
        }

    async def run(self) -> None:
        """List and watch every kind and keep the store in step, until cancelled."""
        async with ApiClient(self.configuration) as api, asyncio.TaskGroup() as tg:
            for wk in self.kinds:
                tg.create_task(self._follow(api, wk), name=f"kube-watch-{wk.kind}")
            tg.create_task(self._reconciler(api), name="kube-reconcile")

    # -- HTTP --------------------------------------------------------------------------

    async def _get(self, api: ApiClient, path: str, params: list[tuple[str, str]],
                   read_timeout: float) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=read_timeout)
        resp: aiohttp.ClientResponse = await api.call_api(
            path, "GET", query_params=params, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout)
        return resp

    async def _list(self, api: ApiClient, wk: WatchedKind
                    ) -> tuple[dict[ObjKey, Mapping[str, Any]], str]:
        items: dict[ObjKey, Mapping[str, Any]] = {}
        cont = ""
        while True:
            params = [("limit", str(self.page_size))]
            if cont:
                params.append(("continue", cont))
            resp = await self._get(api, wk.path, params, 60)
            try:
                body = await resp.read()
            finally:
                resp.release()
            if resp.status == 410 and cont:
                # the continue token expired mid-list: start over for a consistent view
                log.info("list continuation expired, listing again", kind=wk.kind)
                items, cont = {}, ""
                continue
            self._raise_for_status(wk, resp.status, body)
            doc = json.loads(body)
            for obj in doc.get("items") or ():
                items[obj_key(obj)] = trim(obj)
            meta = doc.get("metadata") or {}
            cont = str(meta.get("continue") or "")
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    def _raise_for_status(self, wk: WatchedKind, status: int, body: bytes) -> None:
        if 200 <= status < 300:
            return
        msg = _status_message(body)
        if status == 410:
            raise Gone(msg)
        if status in (401, 403):
            raise KubeApiError(status, f"listing/watching {wk.path} was refused ({status}: "
                               f"{msg}): check that the ClusterRole ambit-control-plane "
                               f"grants list and watch on {wk.kind}")
        if status == 404:
            raise KubeApiError(404, f"{wk.path} is not served: install the CRD for {wk.kind} "
                               "(deploy/kubernetes/crds/)")
        raise KubeApiError(status, f"GET {wk.path} failed with {status}: {msg}")

    async def _watch(self, api: ApiClient, wk: WatchedKind, rv: str) -> None:
        st = self.kind_status[wk.kind]
        timeout_s = max(1, round(self.watch_timeout * random.uniform(0.9, 1.1)))
        params = [("watch", "1"), ("resourceVersion", rv), ("allowWatchBookmarks", "true"),
                  ("timeoutSeconds", str(timeout_s))]
        resp = await self._get(api, wk.path, params, timeout_s + 30)
        try:
            if resp.status != 200:
                self._raise_for_status(wk, resp.status, await resp.read())
            st.watches += 1
            splitter = LineSplitter()
            async for chunk in resp.content.iter_any():
                for line in splitter.feed(chunk):
                    self._event(wk, json.loads(line))
        finally:
            resp.close()

    def _event(self, wk: WatchedKind, ev: Mapping[str, Any]) -> None:
        st = self.kind_status[wk.kind]
        typ = ev.get("type")
        obj = ev.get("object") or {}
        if typ == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                raise Gone(str(obj.get("message") or "resource version too old"))
            raise KubeApiError(code, f"watch of {wk.path} ended with an error: "
                               f"{obj.get('message') or obj}")
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if rv:
            st.resource_version = rv
        if typ == "BOOKMARK":
            return
        cache = self._cache[wk.kind]
        if typ in ("ADDED", "MODIFIED"):
            cache[obj_key(obj)] = trim(obj)
        elif typ == "DELETED":
            cache.pop(obj_key(obj), None)
        else:
            raise KubeApiError(0, f"unexpected watch event type {typ!r} from {wk.path}")
        st.events += 1
        st.objects = len(cache)
        self._dirty.set()

    async def _follow(self, api: ApiClient, wk: WatchedKind) -> None:
        st = self.kind_status[wk.kind]
        need_list = True
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay)
            try:
                if need_list:
                    try:
                        items, rv = await self._list(api, wk)
                    except KubeApiError as e:
                        if e.status != 404 or not wk.optional:
                            raise
                        if not st.missing:
                            log.warning("kind not served, treated as empty", kind=wk.kind,
                                        reason=str(e))
                        st.missing, st.last_error = True, str(e)
                        self._replace(wk, {})
                        delay = self.missing_retry
                        continue
                    st.missing = False
                    st.lists += 1
                    st.resource_version = rv
                    self._replace(wk, items)
                    need_list = False
                await self._watch(api, wk, st.resource_version)
                delay = 0.0  # a watch ended normally (server timeout): resume at once
            except Gone as e:
                st.relists_after_gone += 1
                log.info("resource version expired, listing again", kind=wk.kind,
                         resource_version=st.resource_version, reason=str(e))
                need_list, delay = True, 0.0
            except (aiohttp.ClientError, OSError, TimeoutError, KubeApiError,
                    ValueError) as e:
                st.last_error = f"{type(e).__name__}: {e}"
                delay = min(self.backoff_max, max(0.1, delay * 2)) * random.uniform(0.8, 1.2)
                log.warning("Kubernetes API request failed, retrying", kind=wk.kind,
                            error=st.last_error, retry_in=round(delay, 2),
                            resume_from=st.resource_version if not need_list else None)

    def _replace(self, wk: WatchedKind, items: dict[ObjKey, Mapping[str, Any]]) -> None:
        self._cache[wk.kind] = items
        st = self.kind_status[wk.kind]
        st.objects = len(items)
        st.listed = True
        if all(s.listed for s in self.kind_status.values()):
            self._all_listed.set()
        self._dirty.set()

    # -- writing the store -------------------------------------------------------------

    async def _reconciler(self, api: ApiClient) -> None:
        await self._all_listed.wait()
        while True:
            await self._dirty.wait()
            if self.debounce:
                await asyncio.sleep(self.debounce)  # gather a burst of events into one write
            self._dirty.clear()
            cache = {k: dict(v) for k, v in self._cache.items()}
            await asyncio.to_thread(self.reconcile, cache)
            self._synced.set()
            if self.waypoints is not None:
                # create/update each waypoint Gateway's Deployment, Service, ServiceAccount
                await self.waypoints.sync(api, cache.get("Gateway", {}).values())
                if self.waypoints.errors:  # retry refused applies even without new events
                    asyncio.get_running_loop().call_later(self.backoff_max, self._dirty.set)

    def reconcile(self, cache: Cache) -> ReconcileResult:
        """Bring the store in line with `cache` (blocking; runs in a worker thread)."""
        desired = desired_state(cache, self._memo)
        self.skipped = desired.skipped
        if self._written is None:
            self._written = self._load_owned()
        rejected: dict[str, str] = {}
        valid: dict[ResourceKey, Mapping[str, Any]] = {}
        parsed: dict[ResourceKey, tuple[Mapping[str, Any], Mapping[str, Any] | str]] = {}
        for key, m in desired.manifests.items():
            prev = self._parsed.get(key)
            if prev is not None and prev[0] is m:  # an unchanged translation: same result
                result = prev[1]
            else:
                try:
                    result = parse_resource(m).body
                except FieldError as e:
                    result = f"{e.path}: {e.message}" if e.path else e.message
            parsed[key] = (m, result)
            if isinstance(result, str):
                rejected[str(key)] = result
            else:
                valid[key] = result
        self._parsed = parsed
        written_now = self._written
        puts = [k for k, body in valid.items()
                if written_now.get(k) is not body and written_now.get(k) != body]
        gone = [k for k in self._written if k not in desired.manifests]
        # deletes first (a new pod may reuse the address of one just gone), namespaces last
        deleted = self._delete([k for k in gone if k.kind != "Namespace"], rejected)
        written = self._put(puts, valid, rejected)
        deleted += self._delete([k for k in gone if k.kind == "Namespace"], rejected)
        for k, why in rejected.items():
            if self._logged_rejections.get(k) != why:
                log.warning("Kubernetes object refused by the resource model; the last "
                            "accepted version stays", resource=k, reason=why)
        self._logged_rejections = dict(rejected)
        self.rejected = rejected
        self.reconciles += 1
        return ReconcileResult(written, deleted, rejected)

    def _load_owned(self) -> dict[ResourceKey, Mapping[str, Any]]:
        out: dict[ResourceKey, Mapping[str, Any]] = {}
        for kind in MIRRORED_KINDS:
            for r in self.store.list_resources(kind):
                ann = (r.body.get("metadata") or {}).get("annotations") or {}
                if ann.get(OWNER_ANNOTATION) == OWNER_VALUE:
                    out[r.key] = r.body
        return out

    def _put(self, keys: list[ResourceKey], valid: Mapping[ResourceKey, Mapping[str, Any]],
             rejected: dict[str, str]) -> int:
        assert self._written is not None
        if not keys:
            return 0
        keys.sort(key=lambda k: (k.kind != "Namespace", k.kind, k.namespace, k.name))
        docs = [Document(SOURCE_NAME, i + 1, dict(valid[k])) for i, k in enumerate(keys)]
        try:
            self.store.apply(docs)
        except ValidationFailed:
            # one bad object must not hold the others back: apply one by one
            n = 0
            for k, doc in zip(keys, docs, strict=True):
                try:
                    self.store.apply([doc])
                except ValidationFailed as e:
                    rejected[str(k)] = "; ".join(f"{p.path}: {p.message}" if p.path else
                                                 p.message for p in e.problems)
                    continue
                self._written[k] = valid[k]
                n += 1
            return n
        for k in keys:
            self._written[k] = valid[k]
        return len(keys)

    def _delete(self, keys: list[ResourceKey], rejected: dict[str, str]) -> int:
        assert self._written is not None
        if not keys:
            return 0
        keys.sort(key=lambda k: (k.kind == "Namespace", k.kind, k.namespace, k.name))
        n = 0
        for k in keys:
            try:
                self.store.delete([k])
            except NotFound:
                pass
            except Conflict as e:
                rejected[str(k)] = f"kept: {e}"
                continue
            self._written.pop(k, None)
            n += 1
        return n


# -- ServiceAccount tokens as proxy credentials (TokenReview) ------------------------------

TOKEN_AUDIENCE = "ambit"  # the projected tokens' audience (deploy/kubernetes/ztunnel.yaml)
ZTUNNEL_SERVICE_ACCOUNT = ("ambit-system", "ztunnel")
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
SA_PREFIX = "system:serviceaccount:"
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def _first(extra: Mapping[str, Any], key: str) -> str:
    values = extra.get(key) or []
    return str(values[0]) if isinstance(values, list) and values else ""


def authorize_review(status: Mapping[str, Any], subject: str, *, pod_node: str = "",
                     audience: str = TOKEN_AUDIENCE,
                     node_account: tuple[str, str] = ZTUNNEL_SERVICE_ACCOUNT) -> NodePrincipal:
    """Who a reviewed ServiceAccount token may join as (pure; raises Refused).

    A node `subject` needs a token of ztunnel's ServiceAccount whose pod runs on that
    node (the `node-name` extra of the review, else `pod_node`, the pod's spec.nodeName);
    a waypoint `NS/NAME` needs a token of the ServiceAccount NS/NAME (its Deployment's).
    """
    rule = "service-account-token"
    if not status.get("authenticated"):
        why = str(status.get("error") or "the API server did not authenticate it")
        raise Refused(rule, f"ServiceAccount token refused by the TokenReview: {why}")
    audiences = status.get("audiences")
    if audiences is not None and audience not in audiences:
        raise Refused(rule, f"token audiences {audiences} lack {audience!r}: mount a projected "
                      f"ServiceAccount token with audience {audience!r}")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username.startswith(SA_PREFIX) or username.count(":") != 3:
        raise Refused(rule, f"{username or 'the token'} is not a ServiceAccount")
    ns, _, name = username[len(SA_PREFIX):].partition(":")
    try:
        principal = NodePrincipal.from_subject(subject)
    except ValueError as exc:
        raise Refused(rule, str(exc)) from None
    if principal.kind == "waypoint":
        if principal.name != f"{ns}/{name}":
            raise Refused("service-account", f"a token of ServiceAccount {ns}/{name} cannot "
                          f"join as waypoint {principal.name}: use the waypoint's own "
                          "ServiceAccount (same namespace and name as its Gateway)")
        return principal
    if (ns, name) != node_account:
        raise Refused("service-account", f"a token of ServiceAccount {ns}/{name} cannot join "
                      f"as node {subject}: only ztunnel's ServiceAccount "
                      f"{node_account[0]}/{node_account[1]} can")
    extra = user.get("extra") or {}
    node = _first(extra, NODE_NAME_EXTRA) or pod_node
    if not node:
        raise Refused(rule, "the token is not bound to a pod on a node: mount a projected "
                      "ServiceAccount token (it carries the pod and node)")
    if node != subject:
        raise Refused("node-impersonation", f"the token belongs to a ztunnel pod on node "
                      f"{node}, not on {subject}")
    return principal


class ServiceAccountAuthenticator:
    """Check a proxy's ServiceAccount token with a TokenReview (authentication.k8s.io/v1)
    against the API server; `authenticate(token, subject)` -> NodePrincipal or Refused."""

    def __init__(self, configuration: Configuration, *, audience: str = TOKEN_AUDIENCE,
                 timeout: float = 10.0) -> None:
        self.configuration = configuration
        self.audience = audience
        self.timeout = timeout

    async def _call(self, api: ApiClient, method: str, path: str,
                    body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        resp: aiohttp.ClientResponse = await api.call_api(
            path, method, body=body,
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            raw = await resp.read()
        finally:
            resp.release()
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, {"message": raw[:200].decode(errors="replace")}

    async def authenticate(self, token: str, subject: str) -> NodePrincipal:
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "spec": {"token": token, "audiences": [self.audience]}}
        try:
            async with asyncio.timeout(self.timeout), ApiClient(self.configuration) as api:
                code, answer = await self._call(api, "POST", TOKEN_REVIEW_PATH, review)
                if code not in (200, 201):
                    raise Refused("service-account-token", f"TokenReview failed ({code}: "
                                  f"{answer.get('message', '')}): check that the ClusterRole "
                                  "ambit-control-plane may create tokenreviews")
                status = answer.get("status") or {}
                pod_node = ""
                extra = (status.get("user") or {}).get("extra") or {}
                pod = _first(extra, POD_NAME_EXTRA)
                if status.get("authenticated") and pod and not _first(extra, NODE_NAME_EXTRA):
                    username = str((status.get("user") or {}).get("username") or "")
                    ns = username[len(SA_PREFIX):].partition(":")[0]
                    code, obj = await self._call(api, "GET", f"/api/v1/namespaces/{ns}/pods/{pod}")
                    if code == 200:
                        pod_node = str((obj.get("spec") or {}).get("nodeName") or "")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise Refused("service-account-token", f"the TokenReview could not be made "
                          f"({type(e).__name__}: {e}): is the Kubernetes API reachable?"
                          ) from None
        principal = authorize_review(status, subject, pod_node=pod_node, audience=self.audience)
        log.info("ServiceAccount token accepted", subject=subject,
                 service_account=(status.get("user") or {}).get("username"))
        return principal


async def run_source(
    store: Store,
    *,
    kubeconfig: str | None = None,
    waypoints: WaypointSettings | None = None,
    on_synced: Callable[[KubeSource], None] | None = None,
    **options: Any,
) -> None:
    """Run the Kubernetes source for the control plane until cancelled.

    Credentials: the pod's ServiceAccount when in a cluster, else `kubeconfig` (or
    KUBECONFIG / ~/.kube/config). With `waypoints`, also create each waypoint Gateway's
    Deployment and Service. `on_synced(source)` is called once the store holds the whole
    cluster (the moment to report ready, e.g. ztunnel.sdnotify.ready()). `options` go to
    KubeSource (watch_timeout, page_size, ...).

        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_source(store, waypoints=WaypointSettings(image=...),
                                      on_synced=lambda s: sdnotify.ready()))
    """
    cfg = await load_configuration(kubeconfig)
    source = KubeSource(store, cfg, waypoints=WaypointDeployer(waypoints) if waypoints else None,
                        **options)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(source.run(), name="kube-source")
        await source.synced()
        log.info("Kubernetes source synced", objects={k: s.objects for k, s in
                                                      source.kind_status.items()})
        if on_synced is not None:
            on_synced(source)


__all__ = [
    "ENDPOINTS_LABEL",
    "MIRRORED_KINDS",
    "OWNER_ANNOTATION",
    "WATCHED",
    "Desired",
    "Gone",
    "KubeApiError",
    "KubeSource",
    "LineSplitter",
    "ServiceAccountAuthenticator",
    "WatchedKind",
    "authorize_review",
    "desired_state",
    "load_configuration",
    "node_locality",
    "pod_readiness",
    "run_source",
    "translate_pod",
    "translate_service",
    "trim",
]
