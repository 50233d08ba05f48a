"""Typed resource model: Kubernetes-shaped manifests parsed into frozen dataclasses."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

# ---------------------------------------------------------------------------
# errors and field reading
# ---------------------------------------------------------------------------


class FieldError(Exception):
    """A problem with one field of one manifest: `path` is like `spec.ports[0].port`."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def _tname(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _R:
    """Reads one mapping of a manifest, producing errors that carry the field path."""

    def __init__(self, data: Any, path: str, allowed: Iterable[str] | None = None) -> None:
        if not isinstance(data, dict):
            raise FieldError(path, f"expected an object, got {_tname(data)}")
        self.d: dict[str, Any] = data
        self.path = path
        if allowed is not None:
            allowed_set = set(allowed)
            for k in data:
                if k not in allowed_set:
                    raise FieldError(
                        _join(path, str(k)),
                        f"unknown field (expected one of: {', '.join(sorted(allowed_set))})",
                    )

    def p(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def raw(self, key: str) -> Any:
        return self.d.get(key)

    def text(
        self,
        key: str,
        *,
        required: bool = False,
        default: str = "",
        choices: Iterable[str] | None = None,
    ) -> str:
        v = self.d.get(key)
        if v is None:
            if required:
                raise FieldError(self.p(key), "required field is missing")
            return default
        if not isinstance(v, str):
            raise FieldError(self.p(key), f"expected a string, got {_tname(v)}")
        if required and not v:
            raise FieldError(self.p(key), "must not be empty")
        if choices is not None:
            cs = tuple(choices)
            if v not in cs:
                raise FieldError(self.p(key), f"expected one of {', '.join(cs)}, got {v!r}")
        return v

    def integer(
        self,
        key: str,
        *,
        required: bool = False,
        default: int = 0,
        lo: int | None = None,
        hi: int | None = None,
    ) -> int:
        v = self.opt_int(key, required=required, lo=lo, hi=hi)
        return default if v is None else v

    def opt_int(
        self, key: str, *, required: bool = False, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        v = self.d.get(key)
        if v is None:
            if required:
                raise FieldError(self.p(key), "required field is missing")
            return None
        return _check_int(v, self.p(key), lo, hi)

    def num(self, key: str, *, lo: float, hi: float, default: float) -> float:
        v = self.d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise FieldError(self.p(key), f"expected a number {lo:g}-{hi:g}, got {_tname(v)}")
        if not lo <= v <= hi:
            raise FieldError(self.p(key), f"expected a number {lo:g}-{hi:g}, got {v}")
        return float(v)

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise FieldError(self.p(key), f"expected true or false, got {_tname(v)}")
        return v

    def obj(self, key: str, allowed: Iterable[str] | None = None) -> _R | None:
        v = self.d.get(key)
        if v is None:
            return None
        return _R(v, self.p(key), allowed)

    def items(
        self, key: str, *, required: bool = False, max_items: int = 0
    ) -> list[tuple[str, Any]]:
        v = self.d.get(key)
        if v is None:
            if required:
                raise FieldError(self.p(key), "required field is missing")
            return []
        if not isinstance(v, list):
            raise FieldError(self.p(key), f"expected a list, got {_tname(v)}")
        if required and not v:
            raise FieldError(self.p(key), "must list at least one entry")
        if max_items and len(v) > max_items:
            raise FieldError(self.p(key), f"at most {max_items} entries allowed, got {len(v)}")
        return [(f"{self.p(key)}[{i}]", item) for i, item in enumerate(v)]

    def strs(self, key: str, check: Callable[[str, str], None] | None = None) -> tuple[str, ...]:
        out: list[str] = []
        for path, item in self.items(key):
            if not isinstance(item, str):
                raise FieldError(path, f"expected a string, got {_tname(item)}")
            if check is not None:
                check(item, path)
            out.append(item)
        return tuple(out)

    def labels(self, key: str) -> dict[str, str]:
        v = self.d.get(key)
        if v is None:
            return {}
        return check_labels(v, self.p(key))

    def duration(self, key: str) -> float | None:
        v = self.d.get(key)
        if v is None:
            return None
        return parse_duration(v, self.p(key))


def _check_int(v: Any, path: str, lo: int | None, hi: int | None) -> int:
    rng = ""
    if lo is not None and hi is not None:
        rng = f" {lo}-{hi}"
    elif lo is not None:
        rng = f" >= {lo}"
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(path, f"expected an integer{rng}, got {_tname(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise FieldError(path, f"expected an integer{rng}, got {v}")
    return v


def check_port(v: Any, path: str) -> int:
    """A TCP port number 1-65535."""
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        shown = v if isinstance(v, int) and not isinstance(v, bool) else _tname(v)
        raise FieldError(path, f"expected a port number 1-65535, got {shown}")
    return v


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(v: Any, path: str) -> float:
    """A Go/Gateway-API duration such as `1s`, `250ms`, `1m30s`, in seconds."""
    if not isinstance(v, str):
        raise FieldError(path, f"expected a duration like 1s or 250ms, got {_tname(v)}")
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(v):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(v) or not v:
        raise FieldError(path, f"expected a duration like 1s or 250ms, got {v!r}")
    return total


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_IANA_SVC = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_dns_label(v: str, path: str) -> None:
    if len(v) > 63 or not _DNS_LABEL.match(v):
        raise FieldError(
            path,
            f"{v!r} is not a valid name: use at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
        )


def check_dns_subdomain(v: str, path: str) -> None:
    if len(v) > 253 or not _DNS_SUBDOMAIN.match(v):
        raise FieldError(
            path,
            f"{v!r} is not a valid name: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit",
        )


def check_label_key(k: str, path: str) -> None:
    prefix, _, name = k.rpartition("/")
    if prefix:
        check_dns_subdomain(prefix, path)
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        raise FieldError(
            path,
            f"invalid label key {k!r}: expected [prefix/]name with name at most 63 "
            "letters, digits, '-', '_' or '.'",
        )


def check_label_value(k: str, v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise FieldError(path, f"label {k!r} must be a string, got {_tname(v)}")
    if v and (len(v) > 63 or not _LABEL_NAME.match(v)):
        raise FieldError(
            path,
            f"invalid value {v!r} for label {k!r}: at most 63 letters, digits, '-', '_' or '.'",
        )
    return v


def check_labels(v: Any, path: str) -> dict[str, str]:
    if not isinstance(v, dict):
        raise FieldError(path, f"expected a map of strings, got {_tname(v)}")
    out: dict[str, str] = {}
    for k, val in v.items():
        if not isinstance(k, str):
            raise FieldError(path, f"label keys must be strings, got {_tname(k)}")
        check_label_key(k, f"{path}.{k}")
        out[k] = check_label_value(k, val, f"{path}.{k}")
    return out


def check_ip(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise FieldError(path, f"expected an IP address, got {_tname(v)}")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise FieldError(path, f"expected an IPv4 or IPv6 address, got {v!r}") from None


def check_cidr(v: str, path: str) -> None:
    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise FieldError(
            path, f"expected an IP address or CIDR like 10.0.0.0/8, got {v!r}"
        ) from None


def check_regex(v: str, path: str) -> None:
    try:
        re.compile(v)
    except re.error as e:
        raise FieldError(path, f"invalid regular expression {v!r}: {e}") from None


def check_wildcard(v: str, path: str) -> None:
    """Istio string match: exact, `*`, `prefix*` or `*suffix`."""
    if "*" in v.strip("*") or (v.count("*") > 1 and v != "*"):
        raise FieldError(path, f"{v!r}: '*' is only allowed as a whole value, a prefix or a suffix")


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectMeta:
    name: str
    namespace: str  # "" for cluster-scoped kinds
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NamespaceSpec:
    pass


@dataclass(frozen=True)
class WorkloadEntrySpec:
    address: str
    labels: Mapping[str, str]
    service_account: str
    locality: str
    weight: int
    ports: Mapping[str, int]
    network: str
    node: str  # annotation ambit.dev/node ("" = find by address)
    netns: str  # annotation ambit.dev/netns ("" = find the netns owning the address)


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str  # number or the name of a workload port
    name: str
    protocol: str
    app_protocol: str


@dataclass(frozen=True)
class ServiceSpec:
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]
    cluster_ip: str  # "" until allocated by the store
    type: str


@dataclass(frozen=True)
class PolicyTargetRef:
    group: str
    kind: str
    name: str
    namespace: str


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] = ()  # rule.from[].source
    operations: tuple[Operation, ...] = ()  # rule.to[].operation
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicySpec:
    selector: Mapping[str, str] | None  # None: the whole namespace (or mesh in the root ns)
    target_refs: tuple[PolicyTargetRef, ...]
    action: str  # ALLOW | DENY
    rules: tuple[Rule, ...]  # ALLOW with no rules allows nothing


@dataclass(frozen=True)
class PeerAuthenticationSpec:
    selector: Mapping[str, str] | None
    mode: str  # UNSET | DISABLE | PERMISSIVE | STRICT
    port_level: Mapping[int, str]


@dataclass(frozen=True)
class Listener:
    name: str
    port: int
    protocol: str
    hostname: str


@dataclass(frozen=True)
class GatewaySpec:
    gateway_class_name: str
    listeners: tuple[Listener, ...]
    addresses: tuple[str, ...]
    waypoint_for: str  # label istio.io/waypoint-for: service (default) | workload | all | none


@dataclass(frozen=True)
class ParentRef:
    group: str
    kind: str  # Service | Gateway
    name: str
    namespace: str
    port: int | None
    section_name: str


@dataclass(frozen=True)
class StringMatch:
    type: str  # Exact | RegularExpression (| PathPrefix for paths)
    name: str  # header/query name ("" for path)
    value: str


@dataclass(frozen=True)
class RouteMatch:
    path: StringMatch
    headers: tuple[StringMatch, ...] = ()
    query_params: tuple[StringMatch, ...] = ()
    method: str = ""


@dataclass(frozen=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendRef:
    group: str
    kind: str
    name: str
    namespace: str
    port: int | None
    weight: int


@dataclass(frozen=True)
class RouteFilter:
    type: str
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    redirect: Mapping[str, Any] | None = None
    url_rewrite: Mapping[str, Any] | None = None
    mirror: BackendRef | None = None
    mirror_percent: float = 100.0
    extension_ref: PolicyTargetRef | None = None  # ambit.dev HTTPFault / RateLimit


@dataclass(frozen=True)
class Retry:
    attempts: int
    codes: tuple[int, ...]
    backoff: float | None


@dataclass(frozen=True)
class RouteRule:
    name: str
    matches: tuple[RouteMatch, ...]
    filters: tuple[RouteFilter, ...]
    backend_refs: tuple[BackendRef, ...]
    request_timeout: float | None
    backend_request_timeout: float | None
    retry: Retry | None


@dataclass(frozen=True)
class HTTPRouteSpec:
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[RouteRule, ...]


@dataclass(frozen=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout: float | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


@dataclass(frozen=True)
class TrafficPolicy:
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    load_balancer: str = ""  # ROUND_ROBIN | LEAST_REQUEST | RANDOM | PASSTHROUGH | ""
    locality_lb: bool = True


@dataclass(frozen=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    traffic_policy: TrafficPolicy | None


@dataclass(frozen=True)
class DestinationRuleSpec:
    host: str
    traffic_policy: TrafficPolicy | None
    subsets: tuple[Subset, ...]
    workload_selector: Mapping[str, str] | None


@dataclass(frozen=True)
class HTTPFaultSpec:
    target_refs: tuple[PolicyTargetRef, ...]
    delay: float | None  # seconds
    delay_percent: float
    abort_status: int | None
    abort_percent: float


@dataclass(frozen=True)
class RateLimitSpec:
    target_refs: tuple[PolicyTargetRef, ...]
    max_tokens: int
    tokens_per_fill: int
    fill_interval: float  # seconds
    status_code: int


Spec: TypeAlias = (
    NamespaceSpec
    | WorkloadEntrySpec
    | ServiceSpec
    | AuthorizationPolicySpec
    | PeerAuthenticationSpec
    | GatewaySpec
    | HTTPRouteSpec
    | DestinationRuleSpec
    | HTTPFaultSpec
    | RateLimitSpec
)


@dataclass(frozen=True)
class ResourceKey:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind} {self.name}")
        )


@dataclass(frozen=True)
class Resource:
    """One parsed, validated resource. `body` is its normalised manifest (what is stored)."""

    api_version: str
    kind: str
    meta: ObjectMeta
    spec: Spec
    body: Mapping[str, Any]

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.kind, self.meta.namespace, self.meta.name)


# ---------------------------------------------------------------------------
# kinds
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KindInfo:
    kind: str
    api_versions: tuple[str, ...]  # first is the preferred one
    namespaced: bool
    plural: str
    aliases: tuple[str, ...]
    parse: Callable[[_R, ObjectMeta], Spec]


NODE_ANNOTATION = "ambit.dev/node"
NETNS_ANNOTATION = "ambit.dev/netns"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
WAYPOINT_CLASS = "istio-waypoint"


def _parse_namespace(spec: _R, meta: ObjectMeta) -> Spec:
    check_dns_label(meta.name, "metadata.name")
    for k in (DATAPLANE_MODE_LABEL,):
        v = meta.labels.get(k)
        if v is not None and v not in ("ambient", "none"):
            raise FieldError(f"metadata.labels.{k}", f"expected 'ambient' or 'none', got {v!r}")
    return NamespaceSpec()


def _parse_workload_entry(spec: _R, meta: ObjectMeta) -> Spec:
    _R(
        spec.d,
        "spec",
        ("address", "labels", "serviceAccount", "locality", "weight", "ports", "network"),
    )
    address = check_ip(spec.raw("address"), "spec.address") if spec.has("address") else ""
    if not address:
        raise FieldError("spec.address", "required field is missing (the workload's IP address)")
    sa = spec.text("serviceAccount", default="default")
    if sa:
        check_dns_subdomain(sa, "spec.serviceAccount")
    ports: dict[str, int] = {}
    raw_ports = spec.raw("ports")
    if raw_ports is not None:
        if not isinstance(raw_ports, dict):
            raise FieldError(
                "spec.ports", f"expected a map of port name to number, got {_tname(raw_ports)}"
            )
        for k, v in raw_ports.items():
            ports[str(k)] = check_port(v, f"spec.ports.{k}")
    locality = spec.text("locality")
    if locality.count("/") > 2:
        raise FieldError("spec.locality", f"expected region/zone/subzone, got {locality!r}")
    node = meta.annotations.get(NODE_ANNOTATION, "")
    if node:
        check_dns_subdomain(node, f"metadata.annotations.{NODE_ANNOTATION}")
    return WorkloadEntrySpec(
        address=address,
        labels=spec.labels("labels"),
        service_account=sa,
        locality=locality,
        weight=spec.integer("weight", default=1, lo=0, hi=(1 << 32) - 1),
        ports=ports,
        network=spec.text("network"),
        node=node,
        netns=meta.annotations.get(NETNS_ANNOTATION, ""),
    )


def _parse_service(spec: _R, meta: ObjectMeta) -> Spec:
    check_dns_label(meta.name, "metadata.name")
    _R(
        spec.d,
        "spec",
        (
            "selector",
            "ports",
            "clusterIP",
            "clusterIPs",
            "type",
            "ipFamilies",
            "ipFamilyPolicy",
            "sessionAffinity",
            "internalTrafficPolicy",
            "publishNotReadyAddresses",
        ),
    )
    typ = spec.text("type", default="ClusterIP", choices=("ClusterIP",))
    cluster_ip = spec.text("clusterIP")
    if cluster_ip:
        if cluster_ip == "None":
            raise FieldError(
                "spec.clusterIP",
                "headless services are not supported: omit clusterIP to get one allocated",
            )
        cluster_ip = check_ip(cluster_ip, "spec.clusterIP")
    ports: list[ServicePort] = []
    items = spec.items("ports", required=True)
    seen_ports: set[tuple[int, str]] = set()
    seen_names: set[str] = set()
    for path, item in items:
        r = _R(item, path, ("name", "port", "targetPort", "protocol", "appProtocol", "nodePort"))
        port = check_port(r.raw("port"), r.p("port")) if r.has("port") else None
        if port is None:
            raise FieldError(r.p("port"), "required field is missing")
        name = r.text("name")
        if name:
            check_dns_label(name, r.p("name"))
            if name in seen_names:
                raise FieldError(r.p("name"), f"duplicate port name {name!r}")
            seen_names.add(name)
        elif len(items) > 1:
            raise FieldError(r.p("name"), "required when a Service has more than one port")
        proto = r.text("protocol", default="TCP", choices=("TCP", "UDP", "SCTP"))
        if (port, proto) in seen_ports:
            raise FieldError(r.p("port"), f"duplicate port {port}/{proto}")
        seen_ports.add((port, proto))
        tp_raw = r.raw("targetPort")
        target: int | str
        if tp_raw is None:
            target = port
        elif isinstance(tp_raw, str) and not tp_raw.isdigit():
            if len(tp_raw) > 15 or not _IANA_SVC.match(tp_raw):
                raise FieldError(
                    r.p("targetPort"),
                    f"expected a port number or a port name "
                    f"(at most 15 lowercase letters, digits, '-'), got {tp_raw!r}",
                )
            target = tp_raw
        else:
            target = check_port(
                int(tp_raw) if isinstance(tp_raw, str) else tp_raw, r.p("targetPort")
            )
        ports.append(ServicePort(port, target, name, proto, r.text("appProtocol")))
    return ServiceSpec(spec.labels("selector"), tuple(ports), cluster_ip, typ)


def _parse_selector(spec: _R) -> Mapping[str, str] | None:
    sel = spec.obj("selector", ("matchLabels",))
    if sel is None:
        return None
    return sel.labels("matchLabels")


def _parse_target_refs(spec: _R, ns: str, kinds: tuple[str, ...]) -> tuple[PolicyTargetRef, ...]:
    items = spec.items("targetRefs", max_items=16)
    if spec.has("targetRef"):
        items = [(spec.p("targetRef"), spec.raw("targetRef")), *items]
    out: list[PolicyTargetRef] = []
    for path, item in items:
        r = _R(item, path, ("group", "kind", "name", "namespace"))
        kind = r.text("kind", required=True, choices=kinds)
        name = r.text("name", required=True)
        tns = r.text("namespace", default=ns)
        if tns != ns:
            raise FieldError(r.p("namespace"), f"must be the policy's own namespace {ns!r}")
        group = r.text("group", default="" if kind == "Service" else "gateway.networking.k8s.io")
        out.append(PolicyTargetRef(group, kind, name, tns))
    return tuple(out)


# Each `from.source` field: manifest key -> (Source attribute, check of each value).
# Every field is listed explicitly, so a new field needs a deliberate choice of check.
_SOURCE_FIELDS: dict[str, tuple[str, Callable[[str, str], None] | None]] = {
    "principals": ("principals", check_wildcard),
    "notPrincipals": ("not_principals", check_wildcard),
    "requestPrincipals": ("request_principals", check_wildcard),
    "notRequestPrincipals": ("not_request_principals", check_wildcard),
    "namespaces": ("namespaces", check_wildcard),
    "notNamespaces": ("not_namespaces", check_wildcard),
    "ipBlocks": ("ip_blocks", check_cidr),
    "notIpBlocks": ("not_ip_blocks", check_cidr),
    "remoteIpBlocks": ("remote_ip_blocks", check_cidr),
    "notRemoteIpBlocks": ("not_remote_ip_blocks", check_cidr),
}
#: the fields of `to[].operation` (`_parse_operation` reads each)
_OPERATION_FIELDS = (
    "hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths",
)
_CONDITION_KEY = re.compile(
    r"^(source\.(ip|namespace|principal)|destination\.(ip|port)|remote\.ip|connection\.sni"
    r"|request\.headers\[[^\]]+\]|request\.auth\.(principal|audiences|presenter|claims\[.+\])"
    r"|experimental\..+)$"
)


def _parse_source(r: _R) -> Source:
    """`r` has only keys of `_SOURCE_FIELDS` (checked when it was read)."""
    return Source(**{attr: r.strs(key, check) for key, (attr, check) in _SOURCE_FIELDS.items()})


def _auth_ports(r: _R, key: str) -> tuple[int, ...]:
    out: list[int] = []
    for path, item in r.items(key):
        v = item
        if isinstance(item, str) and item.isdigit():
            v = int(item)
        out.append(check_port(v, path))
    return tuple(out)


def _parse_operation(r: _R) -> Operation:
    return Operation(
        hosts=r.strs("hosts", check_wildcard),
        not_hosts=r.strs("notHosts", check_wildcard),
        ports=_auth_ports(r, "ports"),
        not_ports=_auth_ports(r, "notPorts"),
        methods=r.strs("methods"),
        not_methods=r.strs("notMethods"),
        paths=r.strs("paths"),
        not_paths=r.strs("notPaths"),
    )


def _parse_authorization_policy(spec: _R, meta: ObjectMeta) -> Spec:
    _R(spec.d, "spec", ("selector", "targetRef", "targetRefs", "action", "rules", "provider"))
    action = spec.text("action", default="ALLOW")
    if action in ("AUDIT", "CUSTOM"):
        raise FieldError("spec.action", f"{action} is not supported: use ALLOW or DENY")
    if action not in ("ALLOW", "DENY"):
        raise FieldError("spec.action", f"expected ALLOW or DENY, got {action!r}")
    selector = _parse_selector(spec)
    refs = _parse_target_refs(spec, meta.namespace, ("Service", "Gateway", "GatewayClass"))
    if selector is not None and refs:
        raise FieldError("spec.targetRefs", "set either selector or targetRefs, not both")
    rules: list[Rule] = []
    for path, item in spec.items("rules"):
        r = _R(item, path, ("from", "to", "when"))
        sources: list[Source] = []
        for fpath, fitem in r.items("from"):
            fr = _R(fitem, fpath, ("source",))
            src = fr.obj("source", _SOURCE_FIELDS)
            if src is None:
                raise FieldError(fr.p("source"), "required field is missing")
            sources.append(_parse_source(src))
        ops: list[Operation] = []
        for tpath, titem in r.items("to"):
            tr = _R(titem, tpath, ("operation",))
            op = tr.obj("operation", _OPERATION_FIELDS)
            if op is None:
                raise FieldError(tr.p("operation"), "required field is missing")
            ops.append(_parse_operation(op))
        conds: list[Condition] = []
        for wpath, witem in r.items("when"):
            wr = _R(witem, wpath, ("key", "values", "notValues"))
            key = wr.text("key", required=True)
            if not _CONDITION_KEY.match(key):
                raise FieldError(
                    wr.p("key"),
                    f"unknown condition key {key!r} (expected e.g. "
                    "source.ip, source.namespace, destination.port, "
                    "request.headers[name])",
                )
            values, not_values = wr.strs("values"), wr.strs("notValues")
            if not values and not not_values:
                raise FieldError(wpath, "set values or notValues")
            if key in ("source.ip", "destination.ip", "remote.ip"):
                for i, v in enumerate(values):
                    check_cidr(v, f"{wr.p('values')}[{i}]")
                for i, v in enumerate(not_values):
                    check_cidr(v, f"{wr.p('notValues')}[{i}]")
            if key == "destination.port":
                for i, v in enumerate(values):
                    check_port(int(v) if v.isdigit() else v, f"{wr.p('values')}[{i}]")
            conds.append(Condition(key, values, not_values))
        rules.append(Rule(tuple(sources), tuple(ops), tuple(conds)))
    return AuthorizationPolicySpec(selector, refs, action, tuple(rules))


_MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")


def _parse_peer_authentication(spec: _R, meta: ObjectMeta) -> Spec:
    _R(spec.d, "spec", ("selector", "mtls", "portLevelMtls"))
    selector = _parse_selector(spec)
    mtls = spec.obj("mtls", ("mode",))
    mode = mtls.text("mode", default="UNSET", choices=_MTLS_MODES) if mtls else "UNSET"
    port_level: dict[int, str] = {}
    plm = spec.obj("portLevelMtls")
    if plm is not None:
        if selector is None:
            raise FieldError(
                "spec.portLevelMtls",
                "needs a selector: port-level mTLS applies to selected workloads only",
            )
        for k, v in plm.d.items():
            kp = f"spec.portLevelMtls.{k}"
            port = check_port(int(k) if isinstance(k, str) and k.isdigit() else k, kp)
            pr = _R(v, kp, ("mode",))
            port_level[port] = pr.text("mode", required=True, choices=_MTLS_MODES)
    return PeerAuthenticationSpec(selector, mode, port_level)


def _parse_gateway(spec: _R, meta: ObjectMeta) -> Spec:
    _R(spec.d, "spec", ("gatewayClassName", "listeners", "addresses", "infrastructure"))
    cls = spec.text("gatewayClassName", required=True)
    if cls != WAYPOINT_CLASS:
        raise FieldError(
            "spec.gatewayClassName",
            f"unsupported class {cls!r}: Ambit implements {WAYPOINT_CLASS!r}",
        )
    listeners: list[Listener] = []
    names: set[str] = set()
    for path, item in spec.items("listeners", required=True, max_items=64):
        r = _R(item, path, ("name", "port", "protocol", "hostname", "allowedRoutes", "tls"))
        name = r.text("name", required=True)
        if name in names:
            raise FieldError(r.p("name"), f"duplicate listener name {name!r}")
        names.add(name)
        if not r.has("port"):
            raise FieldError(r.p("port"), "required field is missing")
        port = check_port(r.raw("port"), r.p("port"))
        proto = r.text("protocol", required=True, choices=("HBONE", "HTTP", "TCP"))
        listeners.append(Listener(name, port, proto, r.text("hostname")))
    addresses: list[str] = []
    for path, item in spec.items("addresses"):
        r = _R(item, path, ("type", "value"))
        typ = r.text("type", default="IPAddress", choices=("IPAddress",))
        del typ
        addresses.append(check_ip(r.raw("value"), r.p("value")))
    wf = meta.labels.get(WAYPOINT_FOR_LABEL, "service")
    if wf not in ("service", "workload", "all", "none"):
        raise FieldError(
            f"metadata.labels.{WAYPOINT_FOR_LABEL}",
            f"expected service, workload, all or none, got {wf!r}",
        )
    return GatewaySpec(cls, tuple(listeners), tuple(addresses), wf)


_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


def _string_matches(r: _R, key: str) -> tuple[StringMatch, ...]:
    out: list[StringMatch] = []
    for path, item in r.items(key, max_items=16):
        m = _R(item, path, ("type", "name", "value"))
        typ = m.text("type", default="Exact", choices=("Exact", "RegularExpression"))
        name = m.text("name", required=True)
        value = m.text("value", required=True)
        if typ == "RegularExpression":
            check_regex(value, m.p("value"))
        out.append(StringMatch(typ, name, value))
    return tuple(out)


def _header_modifier(r: _R | None) -> HeaderModifier | None:
    if r is None:
        return None

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for path, item in r.items(key):
            h = _R(item, path, ("name", "value"))
            out.append((h.text("name", required=True), h.text("value")))
        return tuple(out)

    return HeaderModifier(pairs("set"), pairs("add"), r.strs("remove"))


def _backend_ref(r: _R, ns: str, *, with_weight: bool = True) -> BackendRef:
    kind = r.text("kind", default="Service", choices=("Service",))
    name = r.text("name", required=True)
    if not r.has("port"):
        raise FieldError(r.p("port"), "required when the backend is a Service")
    port = check_port(r.raw("port"), r.p("port"))
    weight = r.integer("weight", default=1, lo=0, hi=1_000_000) if with_weight else 1
    return BackendRef(r.text("group"), kind, name, r.text("namespace", default=ns), port, weight)


def _parse_filter(path: str, item: Any, ns: str) -> RouteFilter:
    kinds = (
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
        "RequestMirror",
        "ExtensionRef",
    )
    f = _R(
        item,
        path,
        (
            "type",
            "requestHeaderModifier",
            "responseHeaderModifier",
            "requestRedirect",
            "urlRewrite",
            "requestMirror",
            "extensionRef",
        ),
    )
    typ = f.text("type", required=True, choices=kinds)
    key = typ[0].lower() + typ[1:] if typ != "URLRewrite" else "urlRewrite"
    if not f.has(key):
        raise FieldError(f.p(key), f"required when type is {typ}")
    if typ == "RequestHeaderModifier":
        hm = _header_modifier(f.obj(key, ("set", "add", "remove")))
        return RouteFilter(typ, request_header_modifier=hm)
    if typ == "ResponseHeaderModifier":
        hm = _header_modifier(f.obj(key, ("set", "add", "remove")))
        return RouteFilter(typ, response_header_modifier=hm)
    if typ == "RequestRedirect":
        rr = f.obj(key, ("scheme", "hostname", "path", "port", "statusCode"))
        assert rr is not None
        rr.text("scheme", choices=("http", "https")) if rr.has("scheme") else None
        if rr.has("port"):
            check_port(rr.raw("port"), rr.p("port"))
        if rr.has("statusCode"):
            rr.integer("statusCode")
            if rr.raw("statusCode") not in (301, 302, 303, 307, 308):
                raise FieldError(
                    rr.p("statusCode"),
                    f"expected one of 301, 302, 303, 307, 308, got {rr.raw('statusCode')}",
                )
        return RouteFilter(typ, redirect=dict(rr.d))
    if typ == "URLRewrite":
        ur = f.obj(key, ("hostname", "path"))
        assert ur is not None
        p = ur.obj("path", ("type", "replaceFullPath", "replacePrefixMatch"))
        if p is not None:
            ptype = p.text("type", required=True, choices=("ReplaceFullPath", "ReplacePrefixMatch"))
            p.text(ptype[0].lower() + ptype[1:], required=True)
        return RouteFilter(typ, url_rewrite=dict(ur.d))
    if typ == "RequestMirror":
        mr = f.obj(key, ("backendRef", "percent", "fraction"))
        assert mr is not None
        br = mr.obj("backendRef", ("group", "kind", "name", "namespace", "port"))
        if br is None:
            raise FieldError(mr.p("backendRef"), "required field is missing")
        pct = mr.integer("percent", default=100, lo=0, hi=100)
        return RouteFilter(
            typ, mirror=_backend_ref(br, ns, with_weight=False), mirror_percent=float(pct)
        )
    er = f.obj(key, ("group", "kind", "name"))
    assert er is not None
    group = er.text("group", required=True, choices=("ambit.dev",))
    kind = er.text("kind", required=True, choices=("HTTPFault", "RateLimit"))
    return RouteFilter(
        typ, extension_ref=PolicyTargetRef(group, kind, er.text("name", required=True), ns)
    )


def _parse_httproute(spec: _R, meta: ObjectMeta) -> Spec:
    _R(spec.d, "spec", ("parentRefs", "hostnames", "rules"))
    parents: list[ParentRef] = []
    for path, item in spec.items("parentRefs", required=True, max_items=32):
        r = _R(item, path, ("group", "kind", "name", "namespace", "port", "sectionName"))
        kind = r.text("kind", default="Gateway", choices=("Service", "Gateway"))
        group = r.text("group", default="gateway.networking.k8s.io" if kind == "Gateway" else "")
        want_group = "gateway.networking.k8s.io" if kind == "Gateway" else ""
        if group not in (want_group, "core") or (kind == "Gateway" and group == "core"):
            raise FieldError(
                r.p("group"), f"expected {want_group!r} for kind {kind}, got {group!r}"
            )
        port = check_port(r.raw("port"), r.p("port")) if r.has("port") else None
        parents.append(
            ParentRef(
                group,
                kind,
                r.text("name", required=True),
                r.text("namespace", default=meta.namespace),
                port,
                r.text("sectionName"),
            )
        )
    hostnames = spec.strs("hostnames")
    rules: list[RouteRule] = []
    for path, item in spec.items("rules", max_items=16):
        r = _R(
            item,
            path,
            (
                "name",
                "matches",
                "filters",
                "backendRefs",
                "timeouts",
                "retry",
                "sessionPersistence",
            ),
        )
        matches: list[RouteMatch] = []
        for mpath, mitem in r.items("matches", max_items=64):
            m = _R(mitem, mpath, ("path", "headers", "queryParams", "method"))
            pr = m.obj("path", ("type", "value"))
            if pr is None:
                pm = StringMatch("PathPrefix", "", "/")
            else:
                ptype = pr.text(
                    "type",
                    default="PathPrefix",
                    choices=("Exact", "PathPrefix", "RegularExpression"),
                )
                pval = pr.text("value", default="/")
                if ptype == "RegularExpression":
                    check_regex(pval, pr.p("value"))
                elif not pval.startswith("/"):
                    raise FieldError(pr.p("value"), f"must start with '/', got {pval!r}")
                pm = StringMatch(ptype, "", pval)
            method = m.text("method", choices=_METHODS) if m.has("method") else ""
            matches.append(
                RouteMatch(
                    pm, _string_matches(m, "headers"), _string_matches(m, "queryParams"), method
                )
            )
        if not matches:
            matches.append(RouteMatch(StringMatch("PathPrefix", "", "/")))
        filters = tuple(
            _parse_filter(fp, fi, meta.namespace) for fp, fi in r.items("filters", max_items=16)
        )
        ftypes = [f.type for f in filters]
        if "RequestRedirect" in ftypes and "URLRewrite" in ftypes:
            raise FieldError(r.p("filters"), "RequestRedirect and URLRewrite cannot be combined")
        backends: list[BackendRef] = []
        for bpath, bitem in r.items("backendRefs", max_items=16):
            b = _R(
                bitem, bpath, ("group", "kind", "name", "namespace", "port", "weight", "filters")
            )
            backends.append(_backend_ref(b, meta.namespace))
        t = r.obj("timeouts", ("request", "backendRequest"))
        req_t = t.duration("request") if t else None
        be_t = t.duration("backendRequest") if t else None
        if req_t is not None and be_t is not None and req_t and be_t > req_t:
            raise FieldError(
                r.p("timeouts.backendRequest"), "must not be longer than timeouts.request"
            )
        retry: Retry | None = None
        rr = r.obj("retry", ("attempts", "codes", "backoff"))
        if rr is not None:
            codes = tuple(_check_int(c, p, 400, 599) for p, c in rr.items("codes"))
            retry = Retry(
                rr.integer("attempts", default=1, lo=0, hi=100), codes, rr.duration("backoff")
            )
        rules.append(
            RouteRule(r.text("name"), tuple(matches), filters, tuple(backends), req_t, be_t, retry)
        )
    return HTTPRouteSpec(tuple(parents), hostnames, tuple(rules))


def _traffic_policy(r: _R | None) -> TrafficPolicy | None:
    if r is None:
        return None
    cp: ConnectionPool | None = None
    cpr = r.obj("connectionPool", ("tcp", "http"))
    if cpr is not None:
        tcp = cpr.obj(
            "tcp",
            (
                "maxConnections",
                "connectTimeout",
                "tcpKeepalive",
                "maxConnectionDuration",
                "idleTimeout",
            ),
        )
        http = cpr.obj(
            "http",
            (
                "http1MaxPendingRequests",
                "http2MaxRequests",
                "maxRequestsPerConnection",
                "maxRetries",
                "idleTimeout",
                "h2UpgradePolicy",
                "useClientProtocol",
                "maxConcurrentStreams",
            ),
        )
        cp = ConnectionPool(
            max_connections=tcp.opt_int("maxConnections", lo=1) if tcp else None,
            connect_timeout=tcp.duration("connectTimeout") if tcp else None,
            http1_max_pending_requests=http.opt_int("http1MaxPendingRequests", lo=1)
            if http
            else None,
            http2_max_requests=http.opt_int("http2MaxRequests", lo=1) if http else None,
            max_requests_per_connection=http.opt_int("maxRequestsPerConnection", lo=0)
            if http
            else None,
            max_retries=http.opt_int("maxRetries", lo=0) if http else None,
            idle_timeout=http.duration("idleTimeout") if http else None,
        )
    od: OutlierDetection | None = None
    odr = r.obj(
        "outlierDetection",
        (
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveErrors",
            "consecutiveLocalOriginFailures",
            "splitExternalLocalOriginErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
        ),
    )
    if odr is not None:
        od = OutlierDetection(
            consecutive_5xx_errors=odr.opt_int("consecutive5xxErrors", lo=0),
            consecutive_gateway_errors=odr.opt_int("consecutiveGatewayErrors", lo=0),
            interval=odr.duration("interval") or 10.0,
            base_ejection_time=odr.duration("baseEjectionTime") or 30.0,
            max_ejection_percent=odr.integer("maxEjectionPercent", default=10, lo=0, hi=100),
            min_health_percent=odr.integer("minHealthPercent", default=0, lo=0, hi=100),
        )
    lb = ""
    locality = True
    lbr = r.obj(
        "loadBalancer",
        ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"),
    )
    if lbr is not None:
        lb = lbr.text(
            "simple",
            default="",
            choices=(
                "UNSPECIFIED",
                "ROUND_ROBIN",
                "LEAST_REQUEST",
                "LEAST_CONN",
                "RANDOM",
                "PASSTHROUGH",
            ),
        )
        if lb == "LEAST_CONN":
            lb = "LEAST_REQUEST"
        if lb == "UNSPECIFIED":
            lb = ""
        loc = lbr.obj("localityLbSetting")
        if loc is not None:
            locality = loc.flag("enabled", True)
    return TrafficPolicy(cp, od, lb, locality)


_TP_FIELDS = (
    "connectionPool",
    "outlierDetection",
    "loadBalancer",
    "tls",
    "portLevelSettings",
    "tunnel",
    "proxyProtocol",
)


def _parse_destination_rule(spec: _R, meta: ObjectMeta) -> Spec:
    _R(spec.d, "spec", ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"))
    host = spec.text("host", required=True)
    check_wildcard(host, "spec.host")
    tp = _traffic_policy(spec.obj("trafficPolicy", _TP_FIELDS))
    subsets: list[Subset] = []
    names: set[str] = set()
    for path, item in spec.items("subsets"):
        r = _R(item, path, ("name", "labels", "trafficPolicy"))
        name = r.text("name", required=True)
        if name in names:
            raise FieldError(r.p("name"), f"duplicate subset name {name!r}")
        names.add(name)
        subsets.append(
            Subset(name, r.labels("labels"), _traffic_policy(r.obj("trafficPolicy", _TP_FIELDS)))
        )
    ws = spec.obj("workloadSelector", ("matchLabels",))
    return DestinationRuleSpec(host, tp, tuple(subsets), ws.labels("matchLabels") if ws else None)


def _parse_http_fault(spec: _R, meta: ObjectMeta) -> Spec:
    _R(spec.d, "spec", ("targetRefs", "delay", "abort"))
    refs = _parse_target_refs(spec, meta.namespace, ("Service", "HTTPRoute"))
    d = spec.obj("delay", ("fixedDelay", "percentage"))
    a = spec.obj("abort", ("httpStatus", "percentage"))
    if d is None and a is None:
        raise FieldError("spec", "set delay, abort or both")
    delay = None
    dpct = 0.0
    if d is not None:
        delay = d.duration("fixedDelay")
        if delay is None:
            raise FieldError(d.p("fixedDelay"), "required field is missing")
        dpct = d.num("percentage", lo=0, hi=100, default=100)
    status = None
    apct = 0.0
    if a is not None:
        status = a.integer("httpStatus", required=True, lo=200, hi=599)
        apct = a.num("percentage", lo=0, hi=100, default=100)
    return HTTPFaultSpec(refs, delay, dpct, status, apct)


def _parse_rate_limit(spec: _R, meta: ObjectMeta) -> Spec:
    _R(spec.d, "spec", ("targetRefs", "tokenBucket", "statusCode"))
    refs = _parse_target_refs(spec, meta.namespace, ("Service", "HTTPRoute"))
    tb = spec.obj("tokenBucket", ("maxTokens", "tokensPerFill", "fillInterval"))
    if tb is None:
        raise FieldError("spec.tokenBucket", "required field is missing")
    max_tokens = tb.integer("maxTokens", required=True, lo=1)
    per_fill = tb.integer("tokensPerFill", default=max_tokens, lo=1)
    interval = tb.duration("fillInterval")
    if interval is None:
        raise FieldError(tb.p("fillInterval"), "required field is missing")
    if interval <= 0:
        raise FieldError(tb.p("fillInterval"), "must be longer than 0s")
    return RateLimitSpec(
        refs,
        max_tokens,
        per_fill,
        interval,
        spec.integer("statusCode", default=429, lo=400, hi=599),
    )


KINDS: dict[str, KindInfo] = {
    k.kind: k
    for k in (
        KindInfo("Namespace", ("v1",), False, "namespaces", ("ns", "namespace"), _parse_namespace),
        KindInfo(
            "WorkloadEntry",
            (
                "networking.istio.io/v1",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1alpha3",
            ),
            True,
            "workloadentries",
            ("we", "workloadentry"),
            _parse_workload_entry,
        ),
        KindInfo("Service", ("v1",), True, "services", ("svc", "service"), _parse_service),
        KindInfo(
            "AuthorizationPolicy",
            ("security.istio.io/v1", "security.istio.io/v1beta1"),
            True,
            "authorizationpolicies",
            ("ap", "authorizationpolicy"),
            _parse_authorization_policy,
        ),
        KindInfo(
            "PeerAuthentication",
            ("security.istio.io/v1", "security.istio.io/v1beta1"),
            True,
            "peerauthentications",
            ("pa", "peerauthentication"),
            _parse_peer_authentication,
        ),
        KindInfo(
            "Gateway",
            ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
            True,
            "gateways",
            ("gtw", "gateway"),
            _parse_gateway,
        ),
        KindInfo(
            "HTTPRoute",
            ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
            True,
            "httproutes",
            ("httproute",),
            _parse_httproute,
        ),
        KindInfo(
            "DestinationRule",
            (
                "networking.istio.io/v1",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1alpha3",
            ),
            True,
            "destinationrules",
            ("dr", "destinationrule"),
            _parse_destination_rule,
        ),
        KindInfo(
            "HTTPFault",
            ("ambit.dev/v1alpha1",),
            True,
            "httpfaults",
            ("httpfault",),
            _parse_http_fault,
        ),
        KindInfo(
            "RateLimit",
            ("ambit.dev/v1alpha1",),
            True,
            "ratelimits",
            ("ratelimit",),
            _parse_rate_limit,
        ),
    )
}


def resolve_kind(name: str) -> KindInfo:
    """Map a kind, plural or short name (`svc`, `ap`, `Service`) to its KindInfo."""
    low = name.lower()
    for k in KINDS.values():
        if low in (k.kind.lower(), k.plural, *k.aliases):
            return k
    known = ", ".join(k.plural for k in KINDS.values())
    raise KeyError(f"unknown resource type {name!r} (known: {known})")


_IGNORED_META = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "deletionTimestamp",
    "selfLink",
    "generateName",
    "deletionGracePeriodSeconds",
)


def parse_resource(obj: Any, *, default_namespace: str = "default") -> Resource:
    """Parse and validate one manifest; raises FieldError naming the offending field."""
    if not isinstance(obj, dict):
        raise FieldError(
            "",
            "expected a manifest (a mapping with apiVersion, kind and "
            f"metadata), got {_tname(obj)}",
        )
    top = _R(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    kind = top.text("kind", required=True)
    api_version = top.text("apiVersion", required=True)
    info = KINDS.get(kind)
    if info is None:
        if kind == "Pod":
            raise FieldError(
                "kind",
                "Pods come from the Kubernetes API source; outside "
                "Kubernetes describe the workload as a WorkloadEntry",
            )
        known = ", ".join(KINDS)
        raise FieldError("kind", f"unknown kind {kind!r} (expected one of: {known})")
    if api_version not in info.api_versions:
        raise FieldError(
            "apiVersion",
            f"{kind} is served as {' or '.join(info.api_versions)}, got {api_version!r}",
        )
    md = top.obj("metadata", ("name", "namespace", "labels", "annotations", *_IGNORED_META))
    if md is None:
        raise FieldError("metadata", "required field is missing")
    name = md.text("name", required=True)
    check_dns_subdomain(name, "metadata.name")
    if info.namespaced:
        ns = md.text("namespace", default=default_namespace) or default_namespace
        check_dns_label(ns, "metadata.namespace")
    else:
        ns = md.text("namespace")
        if ns:
            raise FieldError(
                "metadata.namespace", f"{kind} is cluster-scoped: remove the namespace"
            )
    labels = md.labels("labels")
    ann_raw = md.raw("annotations") or {}
    if not isinstance(ann_raw, dict):
        raise FieldError(
            "metadata.annotations", f"expected a map of strings, got {_tname(ann_raw)}"
        )
    annotations: dict[str, str] = {}
    for k, v in ann_raw.items():
        if not isinstance(v, str):
            raise FieldError(f"metadata.annotations.{k}", f"expected a string, got {_tname(v)}")
        annotations[str(k)] = v
    waypoint = labels.get(USE_WAYPOINT_LABEL)
    if waypoint is not None and waypoint != "none":
        check_dns_label(waypoint, f"metadata.labels.{USE_WAYPOINT_LABEL}")
    meta = ObjectMeta(name, ns, labels, annotations)
    spec_raw = top.raw("spec")
    if spec_raw is None:
        spec_raw = {}
    spec = _R(spec_raw, "spec")
    parsed = info.parse(spec, meta)
    md_out: dict[str, Any] = {"name": name}
    if ns:
        md_out["namespace"] = ns
    if labels:
        md_out["labels"] = dict(labels)
    if annotations:
        md_out["annotations"] = annotations
    body: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": md_out}
    if top.raw("spec") is not None:
        body["spec"] = spec_raw
    return Resource(api_version, kind, meta, parsed, body)
