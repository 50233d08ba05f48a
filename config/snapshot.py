"""Per-node snapshot computation: stored resources -> the `ztunnel.snapshot.Snapshot` a node needs.

Rules (Istio ambient semantics):

* A workload is enrolled when its namespace has `istio.io/dataplane-mode=ambient` and
  the workload is not labelled `istio.io/dataplane-mode=none`.
* Waypoint binding: `istio.io/use-waypoint=<gateway>` on the workload, else on the
  service, else on the namespace (`none` on a more specific object opts out). The
  Gateway's `istio.io/waypoint-for` label says what it serves (default `service`).
* Node scoping: a node receives its own workloads, every workload that backs a
  service (all services are visible to all nodes), the workloads of the namespaces
  its own workloads live in, the policies that can apply to its own workloads and
  the trust bundle. It never receives another node's workloads beyond those.
* A waypoint receives the services and workloads bound to it, their endpoints, and
  (`MeshIndex(waypoint_clients=True)`) a compact view (`client_view`) of every enrolled
  workload, its possible clients: it names request sources in telemetry and checks
  `forwarded: for=` with them.

`MeshIndex` keeps the translated objects between changes so a change costs only the
objects it touches (see `apply`); `node_snapshot` then assembles a node's view.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from config.placement import EMPTY as NO_PLACEMENT
from config.placement import (
    ClaimsError,
    Conflict,
    Placement,
    canonical,
    conflicts_for,
    plan_placement,
)
from config.resources import (
    DATAPLANE_MODE_LABEL,
    USE_WAYPOINT_LABEL,
    AuthorizationPolicySpec,
    GatewaySpec,
    PeerAuthenticationSpec,
    Resource,
    ResourceKey,
    ServiceSpec,
    WorkloadEntrySpec,
)
from config.resources import Rule as RuleSpec
from ztunnel import snapshot as zs

log = structlog.get_logger("ambit.snapshot")

#: node of a WorkloadEntry without the `ambit.dev/node` annotation: never any node's own
UNKNOWN_NODE = "?"
_T = TypeVar("_T")
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")


def workload_uid(namespace: str, name: str) -> str:
    """The uid a WorkloadEntry gets in snapshots."""
    return f"{namespace}/WorkloadEntry/{name}"


def _canonical_or_none(address: str) -> str | None:
    try:
        return canonical(address)
    except ClaimsError:
        return None


def _locality(text: str) -> zs.Locality:
    parts = [*text.split("/"), "", "", ""][:3]
    return zs.Locality(region=parts[0], zone=parts[1], subzone=parts[2])


def _waypoint_name(*labels: Mapping[str, str]) -> str | None:
    """The first `istio.io/use-waypoint` value among labels, most specific first."""
    for lab in labels:
        v = lab.get(USE_WAYPOINT_LABEL)
        if v is not None:
            return None if v == "none" else v
    return None


def translate_rule(rule: RuleSpec) -> zs.Rule:
    """The L4 view of a rule; attributes only a waypoint can check go in `l7_fields`."""
    l7: list[str] = []
    sources = []
    for s in rule.sources:
        for attr, name in (
            ("request_principals", "requestPrincipals"),
            ("not_request_principals", "notRequestPrincipals"),
            ("remote_ip_blocks", "remoteIpBlocks"),
            ("not_remote_ip_blocks", "notRemoteIpBlocks"),
        ):
            if getattr(s, attr):
                l7.append(f"from.source.{name}")
        sources.append(
            zs.Source(
                principals=s.principals,
                not_principals=s.not_principals,
                namespaces=s.namespaces,
                not_namespaces=s.not_namespaces,
                ip_blocks=s.ip_blocks,
                not_ip_blocks=s.not_ip_blocks,
            )
        )
    ops = []
    for o in rule.operations:
        for attr, name in (
            ("hosts", "hosts"),
            ("not_hosts", "notHosts"),
            ("methods", "methods"),
            ("not_methods", "notMethods"),
            ("paths", "paths"),
            ("not_paths", "notPaths"),
        ):
            if getattr(o, attr):
                l7.append(f"to.operation.{name}")
        ops.append(zs.Operation(ports=o.ports, not_ports=o.not_ports))
    conds = []
    for c in rule.when:
        if c.key in zs.L4_CONDITION_KEYS:
            conds.append(zs.Condition(key=c.key, values=c.values, not_values=c.not_values))
        else:
            l7.append(f"when.{c.key}")
    return zs.Rule(
        from_=tuple(sources), to=tuple(ops), when=tuple(conds), l7_fields=tuple(dict.fromkeys(l7))
    )


def translate_policy(r: Resource) -> zs.AuthorizationPolicy:
    spec = r.spec
    assert isinstance(spec, AuthorizationPolicySpec)
    return zs.AuthorizationPolicy(
        name=r.meta.name,
        namespace=r.meta.namespace,
        action=spec.action,
        selector=zs.FrozenMap(spec.selector) if spec.selector is not None else None,
        target_refs=tuple(
            zs.TargetRef(kind=t.kind, name=t.name, group=t.group) for t in spec.target_refs
        ),
        rules=tuple(translate_rule(rule) for rule in spec.rules),
    )


def translate_peer_authentication(r: Resource) -> zs.PeerAuthentication:
    spec = r.spec
    assert isinstance(spec, PeerAuthenticationSpec)
    return zs.PeerAuthentication(
        name=r.meta.name,
        namespace=r.meta.namespace,
        mode=spec.mode,
        selector=zs.FrozenMap(spec.selector) if spec.selector is not None else None,
        port_mtls=zs.FrozenMap(spec.port_level),
    )


@dataclass(frozen=True)
class NodeView:
    """What changed for one node: its new snapshot."""

    node: str
    snapshot: zs.Snapshot


class MeshIndex:
    """All resources, translated and indexed; updated change by change."""

    def __init__(
        self,
        *,
        trust_domain: str = zs.DEFAULT_TRUST_DOMAIN,
        root_namespace: str = zs.DEFAULT_ROOT_NAMESPACE,
        dns_domain: str = zs.DEFAULT_DNS_DOMAIN,
        waypoint_clients: bool = False,
    ) -> None:
        self.trust_domain = trust_domain
        #: waypoint snapshots list every enrolled workload (compact) as possible clients
        self.waypoint_clients = waypoint_clients
        self.root_namespace = root_namespace
        self.dns_domain = dns_domain
        self.version = 0
        self.trust_bundle_pem = ""
        self.resources: dict[ResourceKey, Resource] = {}
        self.waypoint_addresses: dict[tuple[str, str], str] = {}  # registered at connect
        # addresses each connected node reports in its netns (address -> netns); they
        # place WorkloadEntries that have no ambit.dev/node annotation
        self.claims: dict[str, dict[str, str]] = {}
        self.placement: Placement = NO_PLACEMENT
        self._ns_labels: dict[str, Mapping[str, str]] = {}
        self._by_kind_ns: dict[tuple[str, str], dict[str, Resource]] = {}
        # caches, dropped per namespace when something in it changes
        self._wl: dict[str, dict[str, zs.Workload]] = {}
        self._svc: dict[str, dict[str, zs.Service]] = {}
        self._pol: dict[str, tuple[zs.AuthorizationPolicy, ...]] = {}
        self._pa: dict[str, tuple[zs.PeerAuthentication, ...]] = {}
        self._waypoints: dict[tuple[str, str], zs.Waypoint] | None = None
        # compact client views per namespace, valid while `_wl[ns]` is the same dict
        self._clients: dict[str, tuple[dict[str, zs.Workload], tuple[zs.Workload, ...]]] = {}
        # per-object translations, reused while their resource and context are unchanged
        self._ns_gen: dict[str, int] = {}
        self._gw_gen = 0
        self._wl_memo: dict[str, tuple[Resource, tuple[int, int], zs.Workload | None]] = {}
        self._svc_memo: dict[
            tuple[str, str],
            tuple[Resource, tuple[int, int], tuple[zs.Endpoint, ...], zs.Service | None],
        ] = {}
        self._ep_memo: dict[tuple[str, tuple[tuple[int, int], ...]], zs.Endpoint] = {}

    # -- updates -------------------------------------------------------------------

    def load(self, resources: Iterable[Resource], version: int) -> None:
        for r in resources:
            self._put(r)
        self.version = version

    def apply(self, key: ResourceKey, resource: Resource | None, version: int) -> None:
        """Record one change (None = deleted)."""
        if resource is None:
            self._delete(key)
        else:
            self._put(resource)
        self.version = max(self.version, version)

    def set_waypoint_address(self, namespace: str, name: str, address: str | None) -> None:
        """A waypoint registered (or lost) the address it serves on."""
        if address is None:
            self.waypoint_addresses.pop((namespace, name), None)
        else:
            self.waypoint_addresses[(namespace, name)] = address
        self._invalidate_all()

    def set_claims(self, node: str, claims: Mapping[str, str] | None) -> bool:
        """A node reported the addresses in its netns (None: it left). True when the
        placement of some unannotated WorkloadEntry changed."""
        if claims is None:
            if self.claims.pop(node, None) is None:
                return False
        elif self.claims.get(node) == claims:
            return False
        else:
            self.claims[node] = dict(claims)
        old, self.placement = self.placement, plan_placement(self.claims)
        changed = old.changed_addresses(self.placement)
        if not changed:
            return False
        hit = False
        for (kind, ns), items in self._by_kind_ns.items():
            if kind != "WorkloadEntry":
                continue
            for name, r in items.items():
                spec = r.spec
                assert isinstance(spec, WorkloadEntrySpec)
                if spec.node or _canonical_or_none(spec.address) not in changed:
                    continue
                hit = True
                self._wl.pop(ns, None)
                self._svc.pop(ns, None)
                self._wl_memo.pop(workload_uid(ns, name), None)
        return hit

    def unplaced_conflicts(self) -> list[Conflict]:
        """Unannotated WorkloadEntries whose address several nodes claim."""
        if not self.placement.conflicts:
            return []
        unannotated: list[tuple[str, str]] = []
        for (kind, ns), items in self._by_kind_ns.items():
            if kind == "WorkloadEntry":
                for name, r in items.items():
                    spec = r.spec
                    assert isinstance(spec, WorkloadEntrySpec)
                    if not spec.node:
                        unannotated.append((f"{ns}/{name}", spec.address))
        return conflicts_for(self.placement, unannotated)

    def _put(self, r: Resource) -> None:
        old = self.resources.get(r.key)
        self.resources[r.key] = r
        self._by_kind_ns.setdefault((r.kind, r.meta.namespace), {})[r.meta.name] = r
        self._invalidate(r, old)

    def _delete(self, key: ResourceKey) -> None:
        old = self.resources.pop(key, None)
        if old is None:
            return
        self._by_kind_ns.get((key.kind, key.namespace), {}).pop(key.name, None)
        self._invalidate(old, None)

    def _invalidate_all(self) -> None:
        self._wl.clear()
        self._svc.clear()
        self._waypoints = None
        self._gw_gen += 1

    def _invalidate(self, r: Resource, old: Resource | None) -> None:
        ns = r.meta.namespace
        if r.kind == "Namespace":
            if r.key in self.resources:
                self._ns_labels[r.meta.name] = r.meta.labels
            else:
                self._ns_labels.pop(r.meta.name, None)
            self._ns_gen[r.meta.name] = self._ns_gen.get(r.meta.name, 0) + 1
            self._wl.pop(r.meta.name, None)
            self._svc.pop(r.meta.name, None)
        elif r.kind == "WorkloadEntry":
            self._wl.pop(ns, None)
            self._svc.pop(ns, None)
            if r.key not in self.resources:
                self._wl_memo.pop(workload_uid(ns, r.meta.name), None)
                if len(self._ep_memo) > 2 * len(self._wl_memo) + 1024:
                    self._ep_memo.clear()  # drop endpoints of deleted workloads
        elif r.kind == "Service":
            self._svc.pop(ns, None)
            if r.key not in self.resources:
                self._svc_memo.pop((ns, r.meta.name), None)
        elif r.kind == "Gateway":
            self._invalidate_all()
        elif r.kind == "AuthorizationPolicy":
            self._pol.pop(ns, None)
        elif r.kind == "PeerAuthentication":
            self._pa.pop(ns, None)

    # -- translation -----------------------------------------------------------------

    def _items(self, kind: str, ns: str) -> Iterable[Resource]:
        return self._by_kind_ns.get((kind, ns), {}).values()

    def namespaces(self) -> list[str]:
        return sorted({ns for (_k, ns) in self._by_kind_ns if ns})

    def waypoints(self) -> dict[tuple[str, str], zs.Waypoint]:
        if self._waypoints is None:
            out: dict[tuple[str, str], zs.Waypoint] = {}
            for key, r in self.resources.items():
                if key.kind != "Gateway":
                    continue
                spec = r.spec
                assert isinstance(spec, GatewaySpec)
                addr = self.waypoint_addresses.get((key.namespace, key.name))
                if addr is None and spec.addresses:
                    addr = spec.addresses[0]
                if addr is None:
                    continue  # not running yet: bindings to it stay unresolved
                port = next(
                    (lis.port for lis in spec.listeners if lis.protocol == "HBONE"), zs.HBONE_PORT
                )
                out[(key.namespace, key.name)] = zs.Waypoint(
                    name=key.name,
                    namespace=key.namespace,
                    address=addr,
                    identity=zs.spiffe_id(self.trust_domain, key.namespace, key.name),
                    port=port,
                )
            self._waypoints = out
        return self._waypoints

    def _waypoint_ref(self, ns: str, name: str | None, serves: str) -> zs.WaypointRef | None:
        if name is None:
            return None
        gw = self.resources.get(ResourceKey("Gateway", ns, name))
        if gw is None:
            return None
        spec = gw.spec
        assert isinstance(spec, GatewaySpec)
        if spec.waypoint_for not in (serves, "all"):
            return None
        wp = self.waypoints().get((ns, name))
        return wp.ref() if wp is not None else None

    def _ctx(self, ns: str) -> tuple[int, int]:
        """Generation of what a namespace's translations depend on besides their resource."""
        return (self._ns_gen.get(ns, 0), self._gw_gen)

    def workloads_in(self, ns: str) -> dict[str, zs.Workload]:
        """Translated workloads of `ns` by uid; unchanged entries reuse their translation."""
        cached = self._wl.get(ns)
        if cached is not None:
            return cached
        ctx = self._ctx(ns)
        ns_labels = self._ns_labels.get(ns, {})
        ns_ambient = ns_labels.get(DATAPLANE_MODE_LABEL) == "ambient"
        out: dict[str, zs.Workload] = {}
        for r in sorted(self._items("WorkloadEntry", ns), key=lambda r: r.meta.name):
            uid = workload_uid(ns, r.meta.name)
            memo = self._wl_memo.get(uid)
            if memo is not None and memo[0] is r and memo[1] == ctx:
                if memo[2] is not None:
                    out[uid] = memo[2]
                continue
            spec = r.spec
            assert isinstance(spec, WorkloadEntrySpec)
            labels = {**r.meta.labels, **spec.labels}
            enrolled = ns_ambient and labels.get(DATAPLANE_MODE_LABEL) != "none"
            wp = self._waypoint_ref(ns, _waypoint_name(labels, ns_labels), "workload")
            canonical_name = next(
                (labels[k] for k in CANONICAL_NAME_LABELS if k in labels), "")
            node, netns = spec.node, spec.netns
            if not node:  # placed by the node that claims the address, if exactly one does
                claim = self.placement.lookup(spec.address)
                if claim is not None:
                    node, netns = claim.node, netns or claim.netns
            w: zs.Workload | None
            try:
                w = zs.Workload(
                    uid=uid,
                    name=r.meta.name,
                    namespace=ns,
                    ip=spec.address,
                    ip6=None,
                    node=node or UNKNOWN_NODE,
                    service_account=spec.service_account or "default",
                    netns=netns or None,
                    labels=zs.FrozenMap(labels),
                    locality=_locality(spec.locality),
                    weight=max(1, spec.weight),
                    enrolled=enrolled,
                    waypoint=wp if enrolled else None,
                    trust_domain=self.trust_domain,
                    canonical_name=canonical_name,
                )
            except zs.SnapshotError as e:
                log.warning(
                    "workload left out of snapshots", workload=f"{ns}/{r.meta.name}", reason=str(e)
                )
                w = None
            self._wl_memo[uid] = (r, ctx, w)
            if w is not None:
                out[uid] = w
        self._wl[ns] = out
        return out

    def services_in(self, ns: str) -> dict[str, zs.Service]:
        """Translated services of `ns` by name; endpoints found through a label index."""
        cached = self._svc.get(ns)
        if cached is not None:
            return cached
        ctx = self._ctx(ns)
        ns_labels = self._ns_labels.get(ns, {})
        workloads = self.workloads_in(ns)
        entries: dict[str, WorkloadEntrySpec] = {}
        by_label: dict[tuple[str, str], list[str]] = {}
        for r in self._items("WorkloadEntry", ns):
            uid = workload_uid(ns, r.meta.name)
            spec = r.spec
            assert isinstance(spec, WorkloadEntrySpec)
            w = workloads.get(uid)
            if w is None or spec.weight == 0:
                continue
            entries[uid] = spec
            for kv in w.labels.items():
                by_label.setdefault(kv, []).append(uid)
        out: dict[str, zs.Service] = {}
        for r in sorted(self._items("Service", ns), key=lambda r: r.meta.name):
            spec = r.spec
            assert isinstance(spec, ServiceSpec)
            named = [
                (p.port, p.target_port)
                for p in spec.ports
                if p.protocol == "TCP" and isinstance(p.target_port, str)
            ]
            uids: list[str] = []
            if spec.selector:
                lists = [by_label.get(kv, []) for kv in spec.selector.items()]
                smallest = min(lists, key=len)
                uids = sorted(
                    u for u in smallest if zs.selector_matches(spec.selector, workloads[u].labels)
                )
            endpoints = []
            for uid in uids:
                overrides = tuple(
                    (port, entries[uid].ports[str(name)])
                    for port, name in named
                    if str(name) in entries[uid].ports
                )
                ep = self._ep_memo.get((uid, overrides))
                if ep is None:
                    ep = zs.Endpoint(workload_uid=uid, ports=zs.FrozenMap(overrides))
                    self._ep_memo[(uid, overrides)] = ep
                endpoints.append(ep)
            eps = tuple(endpoints)
            key = (ns, r.meta.name)
            memo = self._svc_memo.get(key)
            if memo is not None and memo[0] is r and memo[1] == ctx and memo[2] == eps:
                if memo[3] is not None:
                    out[r.meta.name] = memo[3]
                continue
            ports = []
            for p in spec.ports:
                if p.protocol != "TCP":
                    continue
                target = p.port if isinstance(p.target_port, str) else p.target_port
                ports.append(
                    zs.ServicePort(
                        port=p.port, target_port=target, name=p.name, app_protocol=p.app_protocol
                    )
                )
            wp = self._waypoint_ref(ns, _waypoint_name(r.meta.labels, ns_labels), "service")
            svc: zs.Service | None
            try:
                svc = zs.Service(
                    name=r.meta.name,
                    namespace=ns,
                    vips=(spec.cluster_ip,) if spec.cluster_ip else (),
                    ports=tuple(ports),
                    endpoints=eps,
                    hostname=f"{r.meta.name}.{ns}.svc.{self.dns_domain}",
                    waypoint=wp,
                )
            except zs.SnapshotError as e:
                log.warning(
                    "service left out of snapshots", service=f"{ns}/{r.meta.name}", reason=str(e)
                )
                svc = None
            self._svc_memo[key] = (r, ctx, eps, svc)
            if svc is not None:
                out[r.meta.name] = svc
        self._svc[ns] = out
        return out

    def client_views_in(self, ns: str) -> tuple[zs.Workload, ...]:
        """`client_view` of the enrolled workloads of `ns` (what waypoints get of clients);
        recomputed only when the namespace's workloads changed."""
        wls = self.workloads_in(ns)
        cached = self._clients.get(ns)
        if cached is not None and cached[0] is wls:
            return cached[1]
        views = tuple(client_view(w) for w in wls.values() if w.enrolled)
        self._clients[ns] = (wls, views)
        return views

    def _translated_in(
        self,
        kind: str,
        ns: str,
        cache: dict[str, tuple[_T, ...]],
        translate: Callable[[Resource], _T],
    ) -> tuple[_T, ...]:
        """The `kind` resources of `ns` translated in name order, memoised in `cache`."""
        cached = cache.get(ns)
        if cached is None:
            items = sorted(self._items(kind, ns), key=lambda r: r.meta.name)
            cached = cache[ns] = tuple(translate(r) for r in items)
        return cached

    def policies_in(self, ns: str) -> tuple[zs.AuthorizationPolicy, ...]:
        return self._translated_in("AuthorizationPolicy", ns, self._pol, translate_policy)

    def peer_authentications_in(self, ns: str) -> tuple[zs.PeerAuthentication, ...]:
        return self._translated_in(
            "PeerAuthentication", ns, self._pa, translate_peer_authentication
        )

    # -- per-node view ---------------------------------------------------------------

    def nodes(self) -> set[str]:
        """Nodes that have at least one workload."""
        out: set[str] = set()
        for ns in self.namespaces():
            out.update(w.node for w in self.workloads_in(ns).values() if w.node)
        return out

    def node_snapshot(self, node: str) -> zs.Snapshot:
        """The snapshot for `node` at the current version."""
        namespaces = self.namespaces()
        all_services: list[zs.Service] = []
        local_ns: set[str] = set()
        workloads: dict[str, zs.Workload] = {}
        for ns in namespaces:
            wls = self.workloads_in(ns)
            for uid, w in wls.items():
                if w.node == node:
                    workloads[uid] = w
                    local_ns.add(ns)
            svcs = self.services_in(ns)
            for s in svcs.values():
                all_services.append(s)
                for ep in s.endpoints:
                    workloads.setdefault(ep.workload_uid, wls[ep.workload_uid])
        for ns in sorted(local_ns):
            for uid, w in self.workloads_in(ns).items():
                workloads.setdefault(uid, w)
        all_services = [_drop_missing(s, workloads) or s for s in all_services]
        policy_ns = sorted(local_ns | {self.root_namespace})
        return zs.Snapshot(
            version=self.version,
            node=node,
            trust_domain=self.trust_domain,
            root_namespace=self.root_namespace,
            dns_domain=self.dns_domain,
            workloads=tuple(sorted(workloads.values(), key=lambda w: w.uid)),
            services=tuple(sorted(all_services, key=lambda s: (s.namespace, s.name))),
            waypoints=tuple(sorted(self.waypoints().values(), key=lambda w: (w.namespace, w.name))),
            authorization_policies=tuple(p for ns in policy_ns for p in self.policies_in(ns)),
            peer_authentications=tuple(
                p for ns in policy_ns for p in self.peer_authentications_in(ns)
            ),
            trust_bundle_pem=self.trust_bundle_pem,
        )

    def waypoint_snapshot(self, namespace: str, name: str) -> zs.Snapshot:
        """The snapshot for waypoint `namespace/name`: services and workloads bound to it,
        plus (with `waypoint_clients`) the compact view of the enrolled workloads that may
        be its clients."""
        return _waypoint_snapshot(self, namespace, name)


def _waypoint_snapshot(idx: MeshIndex, namespace: str, name: str) -> zs.Snapshot:
    """What a waypoint needs: the services and workloads bound to it, their endpoints,
    the policies of their namespaces (those with targetRefs are the waypoint's) and,
    when it serves anything and `idx.waypoint_clients` is on, its possible clients
    (`_add_clients`)."""
    ref = idx.waypoints().get((namespace, name))
    services: list[zs.Service] = []
    workloads: dict[str, zs.Workload] = {}
    namespaces: set[str] = set()
    if ref is not None:
        wref = ref.ref()
        for ns in idx.namespaces():
            wls = idx.workloads_in(ns)
            for uid, w in wls.items():
                if w.waypoint == wref:
                    workloads[uid] = w
                    namespaces.add(ns)
            for s in idx.services_in(ns).values():
                if s.waypoint == wref:
                    services.append(s)
                    namespaces.add(ns)
                    for ep in s.endpoints:
                        workloads.setdefault(ep.workload_uid, wls[ep.workload_uid])
    if idx.waypoint_clients and (workloads or services):
        _add_clients(idx, workloads, services)
    policy_ns = sorted(namespaces | {idx.root_namespace})
    return zs.Snapshot(
        version=idx.version,
        node=f"waypoint:{namespace}/{name}",
        trust_domain=idx.trust_domain,
        root_namespace=idx.root_namespace,
        dns_domain=idx.dns_domain,
        workloads=tuple(sorted(workloads.values(), key=lambda w: w.uid)),
        services=tuple(sorted(services, key=lambda s: (s.namespace, s.name))),
        waypoints=(ref,) if ref is not None else (),
        authorization_policies=tuple(p for ns in policy_ns for p in idx.policies_in(ns)),
        peer_authentications=tuple(p for ns in policy_ns for p in idx.peer_authentications_in(ns)),
        trust_bundle_pem=idx.trust_bundle_pem,
    )


#: labels a client's compact entry keeps: what telemetry reads (`source_app`,
#: `source_version`, the canonical name)
CLIENT_LABELS = frozenset({
    *CANONICAL_NAME_LABELS,
    "version",
    "app.kubernetes.io/version",
    "service.istio.io/canonical-revision",
})


def client_view(w: zs.Workload) -> zs.Workload:
    """`w` reduced to what a waypoint needs to recognise it as a client: identity,
    addresses and the labels telemetry reads (no placement, locality or waypoint)."""
    return zs.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        ip=w.ip,
        ip6=w.ip6,
        node=w.node,
        service_account=w.service_account,
        labels=zs.FrozenMap({k: v for k, v in w.labels.items() if k in CLIENT_LABELS}),
        enrolled=w.enrolled,
        trust_domain=w.trust_domain,
        canonical_name=w.canonical_name,
    )


def _add_clients(
    idx: MeshIndex, workloads: dict[str, zs.Workload], services: Iterable[zs.Service]
) -> None:
    """Add to a waypoint's `workloads` the compact view of every enrolled workload (any
    of them can reach the waypoint's services through its ztunnel), so the waypoint can
    name request sources and check `forwarded: for=`. An address two clients share, or
    that is already a served workload's or a VIP, is left out: it would not say who."""
    taken: set[str] = {a for w in workloads.values() for a in w.addresses}
    taken.update(v for s in services for v in s.vips)
    candidates: dict[str, zs.Workload] = {}
    seen: dict[str, int] = {}
    for ns in idx.namespaces():
        for c in idx.client_views_in(ns):
            if c.uid in workloads:
                continue
            candidates[c.uid] = c
            for a in c.addresses:
                seen[a] = seen.get(a, 0) + 1
    for uid, c in candidates.items():
        if all(seen[a] == 1 and a not in taken for a in c.addresses):
            workloads[uid] = c


def _drop_missing(s: zs.Service, workloads: Mapping[str, zs.Workload]) -> zs.Service | None:
    """`s` without endpoints whose workload is not in the snapshot (None if none missing)."""
    eps = tuple(ep for ep in s.endpoints if ep.workload_uid in workloads)
    if len(eps) == len(s.endpoints):
        return None
    return zs.Service(
        name=s.name,
        namespace=s.namespace,
        vips=s.vips,
        ports=s.ports,
        endpoints=eps,
        hostname=s.hostname,
        waypoint=s.waypoint,
        traffic_distribution=s.traffic_distribution,
    )


def compute_snapshot(
    resources: Iterable[Resource],
    node: str,
    *,
    version: int = 0,
    trust_domain: str = zs.DEFAULT_TRUST_DOMAIN,
    root_namespace: str = zs.DEFAULT_ROOT_NAMESPACE,
    trust_bundle_pem: str = "",
    waypoint_addresses: Mapping[tuple[str, str], str] | None = None,
) -> zs.Snapshot:
    """One-shot: the snapshot for `node` from a set of resources."""
    idx = MeshIndex(trust_domain=trust_domain, root_namespace=root_namespace)
    idx.trust_bundle_pem = trust_bundle_pem
    for (ns, name), addr in (waypoint_addresses or {}).items():
        idx.set_waypoint_address(ns, name, addr)
    idx.load(resources, version)
    return idx.node_snapshot(node)


# ---------------------------------------------------------------------------
# content hashes and deltas of snapshot dicts (what the push stream carries)
# ---------------------------------------------------------------------------

#: extra field of waypoint snapshots: the manifests it enforces itself (routes, L7 policy...)
L7_RESOURCES = "resources"
_MASK = (1 << 64) - 1


def _uid_key(d: Mapping[str, Any]) -> str:
    return str(d["uid"])


def _ns_name_key(d: Mapping[str, Any]) -> str:
    return f"{d['namespace']}/{d['name']}"


#: keyed collections of a snapshot dict and the key of each item
COLLECTIONS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "workloads": _uid_key,
    "services": _ns_name_key,
    "waypoints": _ns_name_key,
    "authorization_policies": _ns_name_key,
    "peer_authentications": _ns_name_key,
}


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def item_digest(collection: str, item: Mapping[str, Any]) -> int:
    """64-bit digest of one collection item (salted with the collection name)."""
    h = hashlib.sha256(collection.encode() + b"\0" + _canonical(item)).digest()
    return int.from_bytes(h[:8], "big")


def scalars_digest(snap: Mapping[str, Any]) -> int:
    """Digest of the fields that are not collections (version excluded)."""
    rest = {k: v for k, v in snap.items() if k not in COLLECTIONS and k != "version"}
    return int.from_bytes(hashlib.sha256(_canonical(rest)).digest()[:8], "big")


def content_hash(snap: Mapping[str, Any]) -> str:
    """Order-independent hash of a snapshot dict's content, version excluded.

    The sum of per-item digests plus the digest of the other fields (mod 2**64), so a
    server can keep it up to date item by item.
    """
    total = scalars_digest(snap)
    for name in COLLECTIONS:
        for item in snap.get(name, []):
            total += _DUMPS.digest(name, item)
    return f"{total & _MASK:016x}"


def make_delta(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The changes turning snapshot dict `old` into `new` (keyed collections, other fields)."""
    upsert: dict[str, list[Any]] = {}
    remove: dict[str, list[str]] = {}
    for name, keyf in COLLECTIONS.items():
        before = {keyf(x): x for x in old.get(name, [])}
        after = {keyf(x): x for x in new.get(name, [])}
        ups = [x for k, x in after.items() if before.get(k) != x]
        gone = [k for k in before if k not in after]
        if ups:
            upsert[name] = ups
        if gone:
            remove[name] = gone
    scalars = {k: v for k, v in new.items() if k not in COLLECTIONS and old.get(k) != v}
    return {"set": scalars, "upsert": upsert, "remove": remove}


def apply_delta(old: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """`old` with `delta` applied (inverse of make_delta); collections sorted by key."""
    out = {k: v for k, v in old.items() if k not in COLLECTIONS}
    out.update(delta.get("set", {}))
    for name, keyf in COLLECTIONS.items():
        items = {keyf(x): x for x in old.get(name, [])}
        for k in delta.get("remove", {}).get(name, []):
            items.pop(k, None)
        for x in delta.get("upsert", {}).get(name, []):
            items[keyf(x)] = x
        out[name] = sorted(items.values(), key=keyf)
    return out


class _DumpCache:
    """Dumps (and digests) of snapshot items by object identity.

    The index hands out the same object while what it translates is unchanged, so
    `sorted_dict` and `content_hash` of a recomputed snapshot (a waypoint's lists every
    enrolled workload) only encode and hash the items that changed. Entries hold their
    object, so an id is never reused while cached; once stale entries dominate, those
    none of the last `KEEP_CALLS` calls used go.
    """

    KEEP_CALLS = 64

    def __init__(self) -> None:
        # id(obj) -> [obj, data, collection, digest or None, last call]; id(data) -> same
        self.by_obj: dict[int, list[Any]] = {}
        self.by_data: dict[int, list[Any]] = {}
        self.calls = 0
        self.peak = 0  # most items one call used since the last trim

    def begin(self) -> None:
        self.calls += 1

    def dump(self, collection: str, obj: object) -> dict[str, Any]:
        e = self.by_obj.get(id(obj))
        if e is None or e[0] is not obj:
            data = zs._dump(obj)
            e = [obj, data, collection, None, 0]
            self.by_obj[id(obj)] = e
            self.by_data[id(data)] = e
        e[4] = self.calls
        data = e[1]
        assert isinstance(data, dict)
        return data

    def end(self, used: int) -> None:
        self.peak = max(self.peak, used)
        if len(self.by_obj) > 2 * self.peak + 4096:
            oldest = self.calls - self.KEEP_CALLS
            self.by_obj = {k: e for k, e in self.by_obj.items() if e[4] > oldest}
            self.by_data = {id(e[1]): e for e in self.by_obj.values()}
            self.peak = used

    def digest(self, collection: str, item: Mapping[str, Any]) -> int:
        e = self.by_data.get(id(item))
        if e is None or e[1] is not item or e[2] != collection:
            return item_digest(collection, item)
        if e[3] is None:
            e[3] = item_digest(collection, item)
        return int(e[3])


_DUMPS = _DumpCache()


def sorted_dict(snap: zs.Snapshot) -> dict[str, Any]:
    """`snap.to_dict()` with every collection sorted by key.

    Items are shared with other calls' results while their object is unchanged: treat
    them as read-only.
    """
    d: dict[str, Any] = {}
    used = 0
    _DUMPS.begin()
    for f in zs._field_info(type(snap)):
        value = getattr(snap, f.name)
        keyf = COLLECTIONS.get(f.key)
        if keyf is None:
            d[f.key] = zs._dump(value)
        else:
            d[f.key] = sorted((_DUMPS.dump(f.key, v) for v in value), key=keyf)
            used += len(value)
    _DUMPS.end(used)
    return d


# ---------------------------------------------------------------------------
# per-node views kept up to date item by item (fan-out to many nodes)
# ---------------------------------------------------------------------------

ItemKey = tuple[str, str]  # (collection, key)


@dataclass
class _Item:
    obj: object
    data: dict[str, Any]
    digest: int
    namespace: str
    node: str = ""  # workloads only
    raw: bytes = b""  # canonical JSON of `data` (what the digest covers; reused on the wire)


def _make_item(collection: str, obj: object, namespace: str, node: str = "") -> _Item:
    data = zs._dump(obj)
    raw = _canonical(data)
    h = hashlib.sha256(collection.encode() + b"\0" + raw).digest()
    return _Item(obj, data, int.from_bytes(h[:8], "big"), namespace, node, raw)


@dataclass
class NodeState:
    """What the server believes one node holds (after the last update sent to it)."""

    node: str
    sent: dict[ItemKey, int] = field(default_factory=dict)
    total: int = 0  # sum of the digests in `sent`
    scalars: dict[str, Any] = field(default_factory=dict)
    local_ns: frozenset[str] = frozenset()
    seq: int = -1  # last change set folded in (-1: nothing sent yet)


class NodeViews:
    """Item digests of the whole mesh plus per-node membership, for cheap per-node deltas.

    `refresh()` folds the index's current state in and records which items changed;
    `update(state)` then returns the message that brings one node from what it holds
    to the current view (a full snapshot the first time), touching only changed items.
    """

    def __init__(self, index: MeshIndex) -> None:
        self.index = index
        self.items: dict[ItemKey, _Item] = {}
        self.seq = 0
        self._log: list[tuple[int, set[ItemKey]]] = []
        self._ns_seen: dict[str, tuple[object, object, object, object]] = {}
        self._ns_keys: dict[str, set[ItemKey]] = {}
        self._endpoints: dict[str, set[str]] = {}  # ns -> uids backing a service
        self._nodes_in_ns: dict[str, set[str]] = {}
        self._global_seen: object = None
        self.version = 0  # the index version the items reflect
        self.refresh()

    # -- folding the index in ----------------------------------------------------------

    def refresh(self) -> set[ItemKey]:
        """Re-read what changed in the index; returns the changed item keys."""
        idx = self.index
        self.version = idx.version
        changed: set[ItemKey] = set()
        namespaces = set(idx.namespaces())
        for ns in list(self._ns_seen):
            if ns not in namespaces:
                for k in self._ns_keys.pop(ns, set()):
                    self.items.pop(k, None)
                    changed.add(k)
                del self._ns_seen[ns]
                self._endpoints.pop(ns, None)
                self._nodes_in_ns.pop(ns, None)
        for ns in namespaces:
            wls = idx.workloads_in(ns)
            svcs = idx.services_in(ns)
            pols = idx.policies_in(ns)
            pas = idx.peer_authentications_in(ns)
            seen = self._ns_seen.get(ns)
            if seen is not None and all(
                a is b for a, b in zip(seen, (wls, svcs, pols, pas), strict=True)
            ):
                continue
            self._ns_seen[ns] = (wls, svcs, pols, pas)
            fresh: dict[ItemKey, tuple[object, str]] = {}
            for uid, w in wls.items():
                fresh[("workloads", uid)] = (w, w.node)
            for s in svcs.values():
                fresh[("services", f"{ns}/{s.name}")] = (s, "")
            for p in pols:
                fresh[("authorization_policies", f"{ns}/{p.name}")] = (p, "")
            for pa in pas:
                fresh[("peer_authentications", f"{ns}/{pa.name}")] = (pa, "")
            old_keys = self._ns_keys.get(ns, set())
            for k in old_keys - fresh.keys():
                self.items.pop(k, None)
                changed.add(k)
            for k, (obj, node) in fresh.items():
                cur = self.items.get(k)
                if cur is not None and (cur.obj is obj or cur.obj == obj):
                    cur.obj = obj
                    continue
                self.items[k] = _make_item(k[0], obj, ns, node)
                changed.add(k)
            self._ns_keys[ns] = set(fresh)
            self._endpoints[ns] = {ep.workload_uid for s in svcs.values() for ep in s.endpoints}
            self._nodes_in_ns[ns] = {w.node for w in wls.values()}
        wps = idx.waypoints()
        if wps is not self._global_seen:
            self._global_seen = wps
            fresh_wp = {("waypoints", f"{ns}/{name}"): wp for (ns, name), wp in wps.items()}
            for k in [k for k in self.items if k[0] == "waypoints" and k not in fresh_wp]:
                del self.items[k]
                changed.add(k)
            for k, wp in fresh_wp.items():
                cur = self.items.get(k)
                if cur is not None and cur.obj == wp:
                    continue
                self.items[k] = _make_item("waypoints", wp, wp.namespace)
                changed.add(k)
        if changed:
            self.seq += 1
            self._log.append((self.seq, changed))
        return changed

    def trim(self, keep_from: int) -> None:
        """Forget change sets older than `keep_from` (the oldest seq a node still needs)."""
        self._log = [e for e in self._log if e[0] >= keep_from]

    # -- membership ----------------------------------------------------------------------

    def local_namespaces(self, node: str) -> frozenset[str]:
        return frozenset(ns for ns, nodes in self._nodes_in_ns.items() if node in nodes)

    def _member(self, k: ItemKey, item: _Item, node: str, local_ns: frozenset[str]) -> bool:
        coll = k[0]
        if coll in ("services", "waypoints"):
            return True
        if coll == "workloads":
            return (
                item.node == node
                or item.namespace in local_ns
                or k[1] in self._endpoints.get(item.namespace, ())
            )
        return item.namespace == self.index.root_namespace or item.namespace in local_ns

    def _scalars(self, node: str) -> dict[str, Any]:
        idx = self.index
        return {
            "version": self.version,
            "node": node,
            "trust_domain": idx.trust_domain,
            "root_namespace": idx.root_namespace,
            "dns_domain": idx.dns_domain,
            "trust_bundle_pem": idx.trust_bundle_pem,
        }

    def _reset(self, state: NodeState) -> dict[str, list[_Item]]:
        """Recompute everything `state`'s node should hold; returns the items by collection."""
        local_ns = self.local_namespaces(state.node)
        members: dict[str, list[_Item]] = {name: [] for name in COLLECTIONS}
        sent: dict[ItemKey, int] = {}
        total = 0
        for k in sorted(self.items):
            item = self.items[k]
            if self._member(k, item, state.node, local_ns):
                members[k[0]].append(item)
                sent[k] = item.digest
                total += item.digest
        state.sent, state.total, state.local_ns = sent, total, local_ns
        state.scalars = self._scalars(state.node)
        state.seq = self.seq
        return members

    def full(self, state: NodeState) -> dict[str, Any]:
        """The node's whole snapshot dict; resets `state` to it."""
        members = self._reset(state)
        snap: dict[str, Any] = dict(state.scalars)
        for name, items in members.items():
            snap[name] = [i.data for i in items]
        return snap

    def full_json(self, state: NodeState) -> bytes:
        """`full()` already encoded as JSON, assembled from each item's cached encoding."""
        members = self._reset(state)
        parts = [json.dumps(k).encode() + b":" + _canonical(v) for k, v in state.scalars.items()]
        for name, items in members.items():
            parts.append(json.dumps(name).encode() + b":[" + b",".join(i.raw for i in items) + b"]")
        return b"{" + b",".join(parts) + b"}"

    def needs_full(self, state: NodeState) -> bool:
        """Whether `state` can only be brought up to date with a whole snapshot."""
        return state.seq < 0 or bool(self._log and state.seq < self._log[0][0] - 1)

    def hash_of(self, state: NodeState) -> str:
        return f"{(state.total + scalars_digest(state.scalars)) & _MASK:016x}"

    def update(self, state: NodeState) -> tuple[str, dict[str, Any]] | None:
        """("snapshot"|"delta", body) bringing `state` up to date, or None if it already is.

        `body` for a delta has set/upsert/remove; for a snapshot it is the whole dict.
        """
        if self.needs_full(state):
            return "snapshot", self.full(state)
        local_ns = self.local_namespaces(state.node)
        if local_ns != state.local_ns:
            old = {k: v for k, v in state.sent.items()}
            full = self.full(state)
            delta = self._diff_maps(old, state.sent)
            delta["set"] = {k: v for k, v in full.items() if k not in COLLECTIONS}
            return "delta", delta
        keys: set[ItemKey] = set()
        for seq, ch in self._log:
            if seq > state.seq:
                keys |= ch
        upsert: dict[str, list[Any]] = {}
        remove: dict[str, list[str]] = {}
        for k in sorted(keys):
            item = self.items.get(k)
            have = state.sent.get(k)
            if item is not None and self._member(k, item, state.node, local_ns):
                if have != item.digest:
                    upsert.setdefault(k[0], []).append(item.data)
                    state.total += item.digest - (have or 0)
                    state.sent[k] = item.digest
            elif have is not None:
                remove.setdefault(k[0], []).append(k[1])
                state.total -= have
                del state.sent[k]
        scalars = {k: v for k, v in self._scalars(state.node).items()}
        set_ = {k: v for k, v in scalars.items() if state.scalars.get(k) != v}
        state.scalars = scalars
        state.seq = self.seq
        if not upsert and not remove and set(set_) <= {"version"}:
            return None
        return "delta", {"set": set_, "upsert": upsert, "remove": remove}

    def _diff_maps(self, old: Mapping[ItemKey, int], new: Mapping[ItemKey, int]) -> dict[str, Any]:
        upsert: dict[str, list[Any]] = {}
        remove: dict[str, list[str]] = {}
        for k, d in new.items():
            if old.get(k) != d:
                upsert.setdefault(k[0], []).append(self.items[k].data)
        for k in old:
            if k not in new:
                remove.setdefault(k[0], []).append(k[1])
        return {"upsert": upsert, "remove": remove}


# ---------------------------------------------------------------------------
# the proxy's side: a replica updated item by item
# ---------------------------------------------------------------------------

_ITEM_CLASSES: dict[str, type] = {
    "workloads": zs.Workload,
    "services": zs.Service,
    "waypoints": zs.Waypoint,
    "authorization_policies": zs.AuthorizationPolicy,
    "peer_authentications": zs.PeerAuthentication,
}


@dataclass
class ReplicaState:
    """One version of a proxy's snapshot: items with digests and parsed objects."""

    scalars: dict[str, Any]
    items: dict[ItemKey, tuple[dict[str, Any], int, object]]
    total: int
    snapshot: zs.Snapshot

    @property
    def hash(self) -> str:
        return f"{(self.total + scalars_digest(self.scalars)) & _MASK:016x}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.scalars)
        for name in COLLECTIONS:
            out[name] = []
        for k in sorted(self.items):
            out[k[0]].append(self.items[k][0])
        return out


def _build_snapshot(
    scalars: Mapping[str, Any], items: Mapping[ItemKey, tuple[dict[str, Any], int, object]]
) -> zs.Snapshot:
    objs: dict[str, list[object]] = {name: [] for name in COLLECTIONS}
    for k in sorted(items):
        objs[k[0]].append(items[k][2])
    kwargs: dict[str, Any] = {k: v for k, v in scalars.items() if k != L7_RESOURCES}
    kwargs.update({name: tuple(v) for name, v in objs.items()})
    try:
        return zs.Snapshot(**kwargs)
    except TypeError as e:  # unknown top-level field
        raise zs.SnapshotError("", str(e)) from None


def replica_from_dict(snap: Mapping[str, Any]) -> ReplicaState:
    """Parse a whole snapshot dict (validated like `Snapshot.from_dict`)."""
    scalars = {k: v for k, v in snap.items() if k not in COLLECTIONS}
    items: dict[ItemKey, tuple[dict[str, Any], int, object]] = {}
    total = 0
    for name, keyf in COLLECTIONS.items():
        raw = snap.get(name, [])
        if not isinstance(raw, list):
            raise zs.SnapshotError(name, "expected a list")
        for i, data in enumerate(raw):
            obj = zs._load(_ITEM_CLASSES[name], data, f"{name}[{i}]")
            d = item_digest(name, data)
            items[(name, keyf(data))] = (data, d, obj)
            total += d
    return ReplicaState(scalars, items, total, _build_snapshot(scalars, items))


def replica_apply_delta(cur: ReplicaState, delta: Mapping[str, Any]) -> ReplicaState:
    """A new replica state with `delta` applied; only upserted items are parsed."""
    scalars = {**cur.scalars, **delta.get("set", {})}
    items = dict(cur.items)
    total = cur.total
    for name, keys in delta.get("remove", {}).items():
        for key in keys:
            old = items.pop((name, key), None)
            if old is not None:
                total -= old[1]
    for name, ups in delta.get("upsert", {}).items():
        if name not in COLLECTIONS:
            raise zs.SnapshotError(name, "unknown collection")
        keyf = COLLECTIONS[name]
        for i, data in enumerate(ups):
            obj = zs._load(_ITEM_CLASSES[name], data, f"{name}[{i}]")
            d = item_digest(name, data)
            old = items.get((name, keyf(data)))
            if old is not None:
                total -= old[1]
            items[(name, keyf(data))] = (data, d, obj)
            total += d
    return ReplicaState(scalars, items, total, _build_snapshot(scalars, items))
