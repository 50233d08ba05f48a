"""Immutable per-node configuration snapshot: schema, validation, indexes, JSON load/dump."""

from __future__ import annotations

import ipaddress
import json
import re
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = [
    "AUTHZ_ACTIONS",
    "DEFAULT_DNS_DOMAIN",
    "DEFAULT_ROOT_NAMESPACE",
    "DEFAULT_TRUST_DOMAIN",
    "HBONE_PORT",
    "L4_CONDITION_KEYS",
    "MTLS_MODES",
    "TRAFFIC_DISTRIBUTIONS",
    "ZTUNNEL_PORTS",
    "AuthorizationPolicy",
    "Condition",
    "Endpoint",
    "FrozenMap",
    "Locality",
    "Operation",
    "PeerAuthentication",
    "Rule",
    "Service",
    "ServicePort",
    "Snapshot",
    "SnapshotError",
    "Source",
    "TargetRef",
    "Waypoint",
    "WaypointRef",
    "Workload",
    "WorkloadChanges",
    "canonical_ip",
    "local_workload_changes",
    "selector_matches",
    "spiffe_id",
]

HBONE_PORT: Final = 15008
#: Ports ztunnel itself listens on; captured traffic to them is refused.
ZTUNNEL_PORTS: Final = frozenset({15000, 15001, 15006, 15008, 15020, 15021, 15053})
DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
DEFAULT_ROOT_NAMESPACE: Final = "istio-system"
DEFAULT_DNS_DOMAIN: Final = "cluster.local"
#: Service.traffic_distribution values (Kubernetes `spec.trafficDistribution` names).
#: "PreferClose" is the same as "PreferSameZone".
TRAFFIC_DISTRIBUTIONS: Final = frozenset({"Any", "PreferClose", "PreferSameZone", "PreferSameNode"})
#: `when` keys ztunnel evaluates; rules with other keys list them in `Rule.l7_fields`.
L4_CONDITION_KEYS: Final = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "destination.ip",
        "destination.port",
    }
)
AUTHZ_ACTIONS: Final = frozenset({"ALLOW", "DENY"})
MTLS_MODES: Final = frozenset({"UNSET", "STRICT", "PERMISSIVE", "DISABLE"})

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_RE = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL_RE}(\.{_LABEL_RE})*$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")  # SPIFFE trust domain characters
_SPIFFE = re.compile(r"^spiffe://[^/\s]+(/[^/\s]+)+$")


class SnapshotError(ValueError):
    """Invalid snapshot content; `path` names the offending field (e.g. `services[2].vips[0]`)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)

    def under(self, prefix: str) -> SnapshotError:
        """The same error with its path placed under `prefix`."""
        if not prefix:
            return self
        if not self.path:
            return SnapshotError(prefix, self.reason)
        sep = "" if self.path.startswith("[") else "."
        return SnapshotError(f"{prefix}{sep}{self.path}", self.reason)


K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V], Generic[K, V]):
    """A small immutable, hashable mapping (labels, selectors, port maps).

    Mapping fields of the snapshot accept any mapping and always hold a FrozenMap.
    """

    __slots__ = ("_d", "_hash")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._d: dict[K, V] = dict(items)
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._d[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._d.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._d == other._d
        if isinstance(other, Mapping):
            return self._d == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


def canonical_ip(text: str) -> str:
    """The canonical text form of an IPv4/IPv6 address; ValueError when it is not one."""
    return ipaddress.ip_address(text).compressed


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """`spiffe://<td>/ns/<ns>/sa/<sa>`."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


# ----------------------------------------------------------------------------- helpers


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _ip(obj: object, name: str, *, version: int | None = None) -> None:
    raw = getattr(obj, name)
    if not isinstance(raw, str):
        raise SnapshotError(name, f"expected an IP address string, got {raw!r}")
    try:
        addr = ipaddress.ip_address(raw)
    except ValueError:
        raise SnapshotError(name, f"{raw!r} is not an IP address") from None
    if version is not None and addr.version != version:
        raise SnapshotError(name, f"{raw!r} is not an IPv{version} address")
    _set(obj, name, addr.compressed)


def _port(value: object, path: str, *, allow_zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SnapshotError(path, f"expected a port number, got {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise SnapshotError(path, f"port {value} is out of range {low}..65535")
    return value


def _tuple(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise SnapshotError(name, f"expected a list, got {value!r}")
    if not isinstance(value, tuple):
        _set(obj, name, tuple(value))


def _fmap(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, FrozenMap):
        if not isinstance(value, Mapping):
            raise SnapshotError(name, f"expected a mapping, got {value!r}")
        _set(obj, name, FrozenMap(value))


def _name(obj: object, name: str, *, required: bool = True) -> None:
    value = getattr(obj, name)
    if not isinstance(value, str):
        raise SnapshotError(name, f"expected a string, got {value!r}")
    if not value:
        if required:
            raise SnapshotError(name, "must not be empty")
        return
    if not _DNS_LABEL.match(value):
        raise SnapshotError(
            name, f"{value!r} is not a DNS label (lower case letters, digits, '-', max 63)"
        )


def _str_labels(obj: object, name: str) -> None:
    _fmap(obj, name)
    for k, v in getattr(obj, name).items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise SnapshotError(f"{name}.{k}", "label keys and values must be strings")


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True, slots=True, kw_only=True)
class Locality:
    """Where a workload runs: region / zone / subzone (empty = unknown)."""

    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointRef:
    """The waypoint a service or workload uses: HBONE address and its SPIFFE identity."""

    address: str
    identity: str
    port: int = HBONE_PORT

    def __post_init__(self) -> None:
        _ip(self, "address")
        if not _SPIFFE.match(self.identity):
            raise SnapshotError("identity", f"{self.identity!r} is not a spiffe:// URI")
        _port(self.port, "port")


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A workload (pod, netns, VM process) with its address, identity and placement.

    `enrolled` says whether the mesh captures it (HBONE-capable); `netns` is a netns
    name, a path, or None (find the netns that owns `ip`); `ports` lists the ports
    inbound traffic may reach (empty = any port). `trust_domain` empty = the
    snapshot's trust domain (filled in by Snapshot).
    """

    uid: str
    name: str
    namespace: str
    ip: str
    node: str
    service_account: str = "default"
    ip6: str | None = None
    netns: str | None = None
    labels: Mapping[str, str] = field(default_factory=FrozenMap)
    locality: Locality = field(default_factory=Locality)
    weight: int = 1
    enrolled: bool = True
    waypoint: WaypointRef | None = None
    ports: tuple[int, ...] = ()
    trust_domain: str = ""
    #: Canonical workload name for telemetry (a Deployment name); empty = `name`.
    canonical_name: str = ""

    def __post_init__(self) -> None:
        if not self.uid:
            raise SnapshotError("uid", "must not be empty")
        if not self.name:
            raise SnapshotError("name", "must not be empty")
        _name(self, "namespace")
        if not self.node:
            raise SnapshotError("node", "must not be empty")
        if not self.service_account:
            raise SnapshotError("service_account", "must not be empty")
        _ip(self, "ip")
        if self.ip6 is not None:
            _ip(self, "ip6", version=6)
        _str_labels(self, "labels")
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or not (
            1 <= self.weight <= 2**32 - 1
        ):
            raise SnapshotError("weight", f"weight {self.weight!r} must be an integer >= 1")
        if not isinstance(self.enrolled, bool):
            raise SnapshotError("enrolled", f"expected true/false, got {self.enrolled!r}")
        _tuple(self, "ports")
        for i, p in enumerate(self.ports):
            _port(p, f"ports[{i}]")

    @property
    def identity(self) -> str:
        """This workload's SPIFFE ID."""
        td = self.trust_domain or DEFAULT_TRUST_DOMAIN
        return spiffe_id(td, self.namespace, self.service_account)

    @property
    def addresses(self) -> tuple[str, ...]:
        """All addresses of the workload (IPv4/primary first)."""
        return (self.ip,) if self.ip6 is None else (self.ip, self.ip6)

    @property
    def display_name(self) -> str:
        """`canonical_name` or `name`, for metrics and logs."""
        return self.canonical_name or self.name

    def accepts_port(self, port: int) -> bool:
        """Whether inbound traffic may reach `port` on this workload."""
        return not self.ports or port in self.ports


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    """A service port; `target_port` 0 means the same as `port`."""

    port: int
    target_port: int = 0
    name: str = ""
    app_protocol: str = ""

    def __post_init__(self) -> None:
        _port(self.port, "port")
        _port(self.target_port, "target_port", allow_zero=True)
        if self.target_port == 0:
            _set(self, "target_port", self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A service endpoint: a workload, its health and per-port overrides.

    `ports` maps service port -> target port when this endpoint differs from the
    service's `target_port` (e.g. a named targetPort resolved per pod).
    """

    workload_uid: str
    healthy: bool = True
    ports: Mapping[int, int] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        if not self.workload_uid:
            raise SnapshotError("workload_uid", "must not be empty")
        if not isinstance(self.healthy, bool):
            raise SnapshotError("healthy", f"expected true/false, got {self.healthy!r}")
        _fmap(self, "ports")
        for k, v in self.ports.items():
            _port(k, f"ports.{k}")
            _port(v, f"ports.{k}")

    def target_port(self, sp: ServicePort) -> int:
        """The port to reach on this endpoint for service port `sp`."""
        return self.ports.get(sp.port, sp.target_port)


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A service: VIPs, ports, endpoints, optional waypoint and traffic distribution.

    `hostname` empty = `<name>.<namespace>.svc.<dns_domain>` (filled in by Snapshot).
    `traffic_distribution`: "Any" (all healthy endpoints), "PreferClose" /
    "PreferSameZone" (same zone first), "PreferSameNode" (same node, then same zone).
    """

    name: str
    namespace: str
    vips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    hostname: str = ""
    waypoint: WaypointRef | None = None
    traffic_distribution: str = "Any"

    def __post_init__(self) -> None:
        _name(self, "name")
        _name(self, "namespace")
        _tuple(self, "vips")
        vips = []
        for i, v in enumerate(self.vips):
            try:
                vips.append(canonical_ip(v))
            except (ValueError, TypeError):
                raise SnapshotError(f"vips[{i}]", f"{v!r} is not an IP address") from None
        _set(self, "vips", tuple(vips))
        _tuple(self, "ports")
        seen: set[int] = set()
        for i, sp in enumerate(self.ports):
            if sp.port in seen:
                raise SnapshotError(f"ports[{i}].port", f"port {sp.port} is listed twice")
            seen.add(sp.port)
        _tuple(self, "endpoints")
        host = self.hostname.lower().rstrip(".")
        if host and not _HOSTNAME.match(host):
            raise SnapshotError("hostname", f"{self.hostname!r} is not a valid DNS name")
        _set(self, "hostname", host)
        if self.traffic_distribution not in TRAFFIC_DISTRIBUTIONS:
            raise SnapshotError(
                "traffic_distribution",
                f"{self.traffic_distribution!r} is not one of {sorted(TRAFFIC_DISTRIBUTIONS)}",
            )

    @property
    def key(self) -> str:
        """`namespace/name`."""
        return f"{self.namespace}/{self.name}"

    def port(self, port: int) -> ServicePort | None:
        """The service port numbered `port`, if any."""
        for sp in self.ports:
            if sp.port == port:
                return sp
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Waypoint:
    """A waypoint proxy (Gateway of class istio-waypoint) and where it listens."""

    name: str
    namespace: str
    address: str
    identity: str
    port: int = HBONE_PORT

    def __post_init__(self) -> None:
        _name(self, "name")
        _name(self, "namespace")
        _ip(self, "address")
        if not _SPIFFE.match(self.identity):
            raise SnapshotError("identity", f"{self.identity!r} is not a spiffe:// URI")
        _port(self.port, "port")

    def ref(self) -> WaypointRef:
        """A reference to this waypoint for services and workloads."""
        return WaypointRef(address=self.address, identity=self.identity, port=self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """One `from.source` of an AuthorizationPolicy rule (L4 fields only).

    Principals are Istio's form `<td>/ns/<ns>/sa/<sa>` (a leading `spiffe://` is
    accepted) with `*`, `prefix*` or `*suffix` wildcards; ip_blocks are CIDRs or
    single addresses. Every non-empty field must match.
    """

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("principals", "not_principals", "namespaces", "not_namespaces"):
            _tuple(self, name)
            for i, v in enumerate(getattr(self, name)):
                if not isinstance(v, str) or not v:
                    raise SnapshotError(f"{name}[{i}]", f"expected a non-empty string, got {v!r}")
        for name in ("ip_blocks", "not_ip_blocks"):
            _tuple(self, name)
            nets = []
            for i, v in enumerate(getattr(self, name)):
                try:
                    nets.append(ipaddress.ip_network(v, strict=False).compressed)
                except (ValueError, TypeError):
                    raise SnapshotError(
                        f"{name}[{i}]", f"{v!r} is not a CIDR block or IP address"
                    ) from None
            _set(self, name, tuple(nets))


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One `to.operation` of an AuthorizationPolicy rule (L4 fields only)."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("ports", "not_ports"):
            _tuple(self, name)
            for i, p in enumerate(getattr(self, name)):
                _port(p, f"{name}[{i}]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    """A `when` condition on an L4 attribute (see L4_CONDITION_KEYS).

    Matches when (`values` is empty or one matches) and no `not_values` matches;
    IP keys take CIDRs, principals/namespaces take `*` wildcards.
    """

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.key not in L4_CONDITION_KEYS:
            raise SnapshotError(
                "key",
                f"{self.key!r} is not an L4 condition key ({', '.join(sorted(L4_CONDITION_KEYS))});"
                " list other keys in the rule's l7_fields",
            )
        _tuple(self, "values")
        _tuple(self, "not_values")
        if not self.values and not self.not_values:
            raise SnapshotError("values", "a condition needs values or not_values")
        for name in ("values", "not_values"):
            for i, v in enumerate(getattr(self, name)):
                if not isinstance(v, str) or not v:
                    raise SnapshotError(f"{name}[{i}]", f"expected a non-empty string, got {v!r}")
                if self.key in ("source.ip", "remote.ip", "destination.ip"):
                    try:
                        ipaddress.ip_network(v, strict=False)
                    except ValueError:
                        raise SnapshotError(
                            f"{name}[{i}]", f"{v!r} is not a CIDR block or IP address"
                        ) from None
                if self.key == "destination.port" and not v.isdigit():
                    raise SnapshotError(f"{name}[{i}]", f"{v!r} is not a port number")


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """An AuthorizationPolicy rule: it matches when some source and some operation match.

    Empty `from_` (JSON `from`) / `to` match anything; every `when` condition must
    match. `l7_fields` names the attributes of the original rule that ztunnel
    cannot check (methods, paths, hosts, request principals, L7 `when` keys...):
    see ztunnel.authz for how such rules are enforced at L4. When translating,
    keep every source/operation entry with its L7 attributes removed (an entry that
    had only L7 attributes becomes an empty entry, which matches anything).
    """

    from_: tuple[Source, ...] = field(default=(), metadata={"json": "from"})
    to: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()
    l7_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _tuple(self, "from_")
        _tuple(self, "to")
        _tuple(self, "when")
        _tuple(self, "l7_fields")

    @property
    def has_l7(self) -> bool:
        """Whether the original rule carried attributes only a waypoint can check."""
        return bool(self.l7_fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetRef:
    """A policy target (`targetRefs`): kind/group/name; enforced by waypoints."""

    kind: str
    name: str
    group: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy:
    """The L4 view of an AuthorizationPolicy.

    Scope: in the root namespace without selector = mesh-wide; otherwise the
    namespace, narrowed to workloads whose labels include `selector` when given.
    Policies with `target_refs` attach to waypoints/gateways and are not enforced
    by ztunnel. No rules = matches nothing (for ALLOW: "allow nothing").
    """

    name: str
    namespace: str
    action: str = "ALLOW"
    selector: Mapping[str, str] | None = None
    target_refs: tuple[TargetRef, ...] = ()
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise SnapshotError("name", "must not be empty")
        _name(self, "namespace")
        if self.action not in AUTHZ_ACTIONS:
            raise SnapshotError(
                "action", f"{self.action!r} is not supported at L4: use ALLOW or DENY"
            )
        if self.selector is not None:
            _str_labels(self, "selector")
        _tuple(self, "target_refs")
        if self.selector is not None and self.target_refs:
            raise SnapshotError("target_refs", "a policy takes either selector or target_refs")
        _tuple(self, "rules")

    @property
    def key(self) -> str:
        """`namespace/name`."""
        return f"{self.namespace}/{self.name}"

    @property
    def has_l7(self) -> bool:
        """Whether any rule carried L7 attributes."""
        return any(r.has_l7 for r in self.rules)

    def scope(self, root_namespace: str) -> str:
        """"mesh", "namespace", "selector" or "target_refs"."""
        if self.target_refs:
            return "target_refs"
        if self.selector is not None:
            return "selector"
        return "mesh" if self.namespace == root_namespace else "namespace"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthentication:
    """A PeerAuthentication: mTLS mode for its scope (root ns = mesh-wide).

    `port_mtls` maps workload port -> mode and needs a selector (as in Istio).
    """

    name: str
    namespace: str
    mode: str = "UNSET"
    selector: Mapping[str, str] | None = None
    port_mtls: Mapping[int, str] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        if not self.name:
            raise SnapshotError("name", "must not be empty")
        _name(self, "namespace")
        if self.mode not in MTLS_MODES:
            raise SnapshotError("mode", f"{self.mode!r} is not one of {sorted(MTLS_MODES)}")
        if self.selector is not None:
            _str_labels(self, "selector")
        _fmap(self, "port_mtls")
        for p, m in self.port_mtls.items():
            _port(p, f"port_mtls.{p}")
            if m not in MTLS_MODES:
                raise SnapshotError(f"port_mtls.{p}", f"{m!r} is not one of {sorted(MTLS_MODES)}")
        if self.port_mtls and self.selector is None:
            raise SnapshotError("port_mtls", "port-level mTLS needs a workload selector")


def _empty_index() -> Mapping[Any, Any]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Everything one ztunnel needs, validated and indexed at construction; swap it whole.

    `workloads` holds the node's workloads and every workload its services reach.
    """

    version: int
    node: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    dns_domain: str = DEFAULT_DNS_DOMAIN
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    waypoints: tuple[Waypoint, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    trust_bundle_pem: str = ""

    # indexes (not part of equality or JSON)
    _by_ip: Mapping[str, Workload] = field(
        init=False, repr=False, compare=False, default_factory=_empty_index
    )
    _by_uid: Mapping[str, Workload] = field(
        init=False, repr=False, compare=False, default_factory=_empty_index
    )
    _svc_by_vip: Mapping[str, Service] = field(
        init=False, repr=False, compare=False, default_factory=_empty_index
    )
    _svc_by_host: Mapping[str, Service] = field(
        init=False, repr=False, compare=False, default_factory=_empty_index
    )
    _svc_by_uid: Mapping[str, tuple[Service, ...]] = field(
        init=False, repr=False, compare=False, default_factory=_empty_index
    )
    _local: tuple[Workload, ...] = field(init=False, repr=False, compare=False, default=())
    _pol_by_ns: Mapping[str, tuple[AuthorizationPolicy, ...]] = field(
        init=False, repr=False, compare=False, default_factory=_empty_index
    )
    _wp_by_addr: Mapping[str, Waypoint] = field(
        init=False, repr=False, compare=False, default_factory=_empty_index
    )

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 0:
            raise SnapshotError("version", f"expected an integer >= 0, got {self.version!r}")
        if not isinstance(self.node, str) or not self.node:
            raise SnapshotError("node", "must not be empty")
        for name, pattern in (("trust_domain", _TRUST_DOMAIN), ("dns_domain", _HOSTNAME)):
            value = getattr(self, name)
            if not isinstance(value, str) or not pattern.match(value.lower()):
                raise SnapshotError(name, f"{value!r} is not a valid domain name")
            _set(self, name, value.lower())
        _name(self, "root_namespace")
        for name in (
            "workloads",
            "services",
            "waypoints",
            "authorization_policies",
            "peer_authentications",
        ):
            _tuple(self, name)

        # Fill defaults that depend on the snapshot (trust domain, service hostnames).
        if any(not w.trust_domain for w in self.workloads):
            _set(
                self,
                "workloads",
                tuple(
                    w if w.trust_domain else _replace(w, trust_domain=self.trust_domain)
                    for w in self.workloads
                ),
            )
        if any(not s.hostname for s in self.services):
            _set(
                self,
                "services",
                tuple(
                    s
                    if s.hostname
                    else _replace(
                        s, hostname=f"{s.name}.{s.namespace}.svc.{self.dns_domain}"
                    )
                    for s in self.services
                ),
            )

        by_ip: dict[str, Workload] = {}
        by_uid: dict[str, Workload] = {}
        for i, w in enumerate(self.workloads):
            if w.uid in by_uid:
                raise SnapshotError(f"workloads[{i}].uid", f"uid {w.uid!r} is listed twice")
            by_uid[w.uid] = w
            for attr, addr in (("ip", w.ip), ("ip6", w.ip6)):
                if addr is None:
                    continue
                other = by_ip.get(addr)
                if other is not None:
                    raise SnapshotError(
                        f"workloads[{i}].{attr}",
                        f"{addr} is already the address of workload "
                        f"{other.namespace}/{other.name}",
                    )
                by_ip[addr] = w

        wp_by_addr: dict[str, Waypoint] = {}
        seen_wp: set[tuple[str, str]] = set()
        for i, wp in enumerate(self.waypoints):
            if (wp.namespace, wp.name) in seen_wp:
                raise SnapshotError(
                    f"waypoints[{i}]", f"waypoint {wp.namespace}/{wp.name} is listed twice"
                )
            seen_wp.add((wp.namespace, wp.name))
            wp_by_addr[wp.address] = wp

        by_vip: dict[str, Service] = {}
        by_host: dict[str, Service] = {}
        by_svc_uid: dict[str, list[Service]] = {}
        for i, s in enumerate(self.services):
            if s.hostname in by_host:
                raise SnapshotError(
                    f"services[{i}].hostname",
                    f"{s.hostname} is already the hostname of service {by_host[s.hostname].key}",
                )
            by_host[s.hostname] = s
            for j, vip in enumerate(s.vips):
                if vip in by_vip:
                    raise SnapshotError(
                        f"services[{i}].vips[{j}]",
                        f"{vip} is already a VIP of service {by_vip[vip].key}",
                    )
                if vip in by_ip:
                    raise SnapshotError(
                        f"services[{i}].vips[{j}]",
                        f"{vip} is the address of workload {by_ip[vip].namespace}/"
                        f"{by_ip[vip].name}",
                    )
                by_vip[vip] = s
            seen_ep: set[str] = set()
            for j, ep in enumerate(s.endpoints):
                if ep.workload_uid not in by_uid:
                    raise SnapshotError(
                        f"services[{i}].endpoints[{j}].workload_uid",
                        f"no workload with uid {ep.workload_uid!r} in this snapshot",
                    )
                if ep.workload_uid in seen_ep:
                    raise SnapshotError(
                        f"services[{i}].endpoints[{j}].workload_uid",
                        f"workload {ep.workload_uid!r} is listed twice",
                    )
                seen_ep.add(ep.workload_uid)
                by_svc_uid.setdefault(ep.workload_uid, []).append(s)

        pol_by_ns: dict[str, list[AuthorizationPolicy]] = {}
        seen_pol: set[str] = set()
        for i, p in enumerate(self.authorization_policies):
            if p.key in seen_pol:
                raise SnapshotError(
                    f"authorization_policies[{i}]", f"policy {p.key} is listed twice"
                )
            seen_pol.add(p.key)
            pol_by_ns.setdefault(p.namespace, []).append(p)
        seen_pa: set[str] = set()
        for i, pa in enumerate(self.peer_authentications):
            key = f"{pa.namespace}/{pa.name}"
            if key in seen_pa:
                raise SnapshotError(
                    f"peer_authentications[{i}]", f"peer authentication {key} is listed twice"
                )
            seen_pa.add(key)

        mp = types.MappingProxyType
        _set(self, "_by_ip", mp(by_ip))
        _set(self, "_by_uid", mp(by_uid))
        _set(self, "_svc_by_vip", mp(by_vip))
        _set(self, "_svc_by_host", mp(by_host))
        _set(self, "_svc_by_uid", mp({k: tuple(v) for k, v in by_svc_uid.items()}))
        _set(self, "_local", tuple(w for w in self.workloads if w.node == self.node))
        _set(self, "_pol_by_ns", mp({k: tuple(v) for k, v in pol_by_ns.items()}))
        _set(self, "_wp_by_addr", mp(wp_by_addr))

    # ------------------------------------------------------------------ lookups

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The workload owning address `ip` (any textual IPv4/IPv6 form)."""
        w = self._by_ip.get(ip)
        if w is None and ":" in ip:
            try:
                w = self._by_ip.get(canonical_ip(ip.split("%", 1)[0]))
            except ValueError:
                return None
        return w

    def workload_by_uid(self, uid: str) -> Workload | None:
        """The workload with this uid."""
        return self._by_uid.get(uid)

    def service_by_vip(self, ip: str) -> Service | None:
        """The service owning VIP `ip`."""
        s = self._svc_by_vip.get(ip)
        if s is None and ":" in ip:
            try:
                s = self._svc_by_vip.get(canonical_ip(ip.split("%", 1)[0]))
            except ValueError:
                return None
        return s

    def service_by_hostname(self, hostname: str) -> Service | None:
        """The service with this fully qualified hostname (case-insensitive, dot optional)."""
        return self._svc_by_host.get(hostname.lower().rstrip("."))

    def services_of(self, workload_uid: str) -> tuple[Service, ...]:
        """The services that have this workload as an endpoint."""
        return self._svc_by_uid.get(workload_uid, ())

    def waypoint_by_address(self, ip: str) -> Waypoint | None:
        """The waypoint listening on `ip`."""
        return self._wp_by_addr.get(ip)

    @property
    def local_workloads(self) -> tuple[Workload, ...]:
        """The workloads scheduled on this snapshot's node."""
        return self._local

    def policies_in_namespace(self, namespace: str) -> tuple[AuthorizationPolicy, ...]:
        """All AuthorizationPolicies of `namespace`."""
        return self._pol_by_ns.get(namespace, ())

    def policies_for(self, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        """The AuthorizationPolicies ztunnel enforces for `workload` (root ns first)."""
        out: list[AuthorizationPolicy] = []
        namespaces = [self.root_namespace]
        if workload.namespace != self.root_namespace:
            namespaces.append(workload.namespace)
        for ns in namespaces:
            for p in self._pol_by_ns.get(ns, ()):
                if p.target_refs:
                    continue
                if p.selector is not None and not selector_matches(p.selector, workload.labels):
                    continue
                out.append(p)
        return tuple(out)

    # ------------------------------------------------------------------ JSON

    @classmethod
    def from_json(cls, text: str | bytes) -> Snapshot:
        """Parse and validate a snapshot; SnapshotError names the field path on failure."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SnapshotError(
                "", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> Snapshot:
        """Build a snapshot from decoded JSON (dicts/lists/scalars)."""
        if isinstance(data, dict) and isinstance(data.get("workloads"), list):
            # Fill per-workload trust domains here so construction happens once.
            td = data.get("trust_domain", DEFAULT_TRUST_DOMAIN)
            if isinstance(td, str):
                data = dict(data)
                data["workloads"] = [
                    {**w, "trust_domain": td.lower()}
                    if isinstance(w, dict) and not w.get("trust_domain")
                    else w
                    for w in data["workloads"]
                ]
        result = _load(cls, data, "")
        assert isinstance(result, Snapshot)
        return result

    @classmethod
    def from_file(cls, path: str | Path) -> Snapshot:
        """Load a snapshot file (the `ztunnel --local-config` format)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise SnapshotError("", f"cannot read snapshot file {p}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise SnapshotError("", f"snapshot file {p} is not UTF-8 text") from None
        try:
            return cls.from_json(text)
        except SnapshotError as e:
            raise SnapshotError(e.path, f"{e.reason} (in {p})") from None

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready dicts/lists."""
        out = _dump(self)
        assert isinstance(out, dict)
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """Serialize; `Snapshot.from_json(s.to_json()) == s`."""
        return json.dumps(self.to_dict(), indent=indent)


@dataclass(frozen=True, slots=True)
class WorkloadChanges:
    """How a node's local workloads changed between two snapshots (by uid)."""

    added: tuple[Workload, ...]
    removed: tuple[Workload, ...]
    changed: tuple[Workload, ...]  # the new version of each changed workload

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def local_workload_changes(old: Snapshot | None, new: Snapshot) -> WorkloadChanges:
    """Which local workloads to enroll, unenroll or reconfigure when `new` replaces `old`."""
    before = {w.uid: w for w in (old.local_workloads if old is not None else ())}
    after = {w.uid: w for w in new.local_workloads}
    return WorkloadChanges(
        added=tuple(w for uid, w in after.items() if uid not in before),
        removed=tuple(w for uid, w in before.items() if uid not in after),
        changed=tuple(w for uid, w in after.items() if uid in before and before[uid] != w),
    )


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes `matchLabels`: every selector label is present with the same value."""
    return all(labels.get(k) == v for k, v in selector.items())


def _replace(obj: Any, **changes: Any) -> Any:
    kwargs = {f.name: getattr(obj, f.name) for f in fields(obj) if f.init}
    kwargs.update(changes)
    return type(obj)(**kwargs)


# ----------------------------------------------------------------------------- generic JSON codec

@dataclass(frozen=True, slots=True)
class _FieldInfo:
    name: str
    key: str
    tp: Any
    required: bool


_FIELDS: dict[type, tuple[_FieldInfo, ...]] = {}


def _field_info(cls: type) -> tuple[_FieldInfo, ...]:
    info = _FIELDS.get(cls)
    if info is None:
        hints = get_type_hints(cls)
        info = tuple(
            _FieldInfo(
                f.name,
                f.metadata.get("json", f.name),
                hints[f.name],
                f.default is MISSING and f.default_factory is MISSING,
            )
            for f in fields(cls)
            if f.init
        )
        _FIELDS[cls] = info
    return info


def _join(path: str, key: str) -> str:
    if not path:
        return key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def _type_name(tp: Any) -> str:
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if get_origin(tp) is tuple:
        return "a list"
    return "an object"


def _load(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _load(args[0], value, path)
    if tp is str:
        if not isinstance(value, str):
            raise SnapshotError(path, f"expected a string, got {json.dumps(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SnapshotError(path, f"expected true/false, got {json.dumps(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # accept integral strings (Istio writes ports as strings)
            if isinstance(value, str) and value.isdigit():
                return int(value)
            raise SnapshotError(path, f"expected an integer, got {json.dumps(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise SnapshotError(path, f"expected a list, got {json.dumps(value)}")
        (item_tp, *_rest) = get_args(tp)
        return tuple(_load(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is FrozenMap or tp is FrozenMap or origin is Mapping:
        if not isinstance(value, dict):
            raise SnapshotError(path, f"expected an object, got {json.dumps(value)}")
        ktp, vtp = get_args(tp) or (str, str)
        items = []
        for k, v in value.items():
            items.append((_load(ktp, k, _join(path, str(k))), _load(vtp, v, _join(path, str(k)))))
        return FrozenMap(items)
    if isinstance(tp, type) and is_dataclass(tp):
        return _load_dataclass(tp, value, path)
    raise SnapshotError(path, f"unsupported type {tp!r}")  # pragma: no cover


def _load_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise SnapshotError(path, f"expected an object, got {json.dumps(value)}")
    info = _field_info(cls)
    kwargs: dict[str, Any] = {}
    for f in info:
        if f.key in value:
            kwargs[f.name] = _load(f.tp, value[f.key], _join(path, f.key))
        elif f.required:
            raise SnapshotError(_join(path, f.key), "required field is missing")
    if len(kwargs) != len(value):
        known = {f.key for f in info}
        unknown = sorted(set(value) - known)
        raise SnapshotError(
            _join(path, unknown[0]), f"unknown field (known: {', '.join(sorted(known))})"
        )
    try:
        return cls(**kwargs)
    except SnapshotError as e:
        raise e.under(path) from None


def _dump(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    if isinstance(value, FrozenMap):
        return {str(k): _dump(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.key: _dump(getattr(value, f.name)) for f in _field_info(type(value))}
    raise TypeError(f"cannot serialize {value!r}")  # pragma: no cover
