"""The waypoint's request/response model and its view of the mesh configuration.

The per-node snapshot (`ztunnel.snapshot.Snapshot`) carries services, endpoints,
workloads and the L4 parts of policies. A waypoint needs more: HTTPRoutes,
DestinationRules, the `HTTPFault` / `RateLimit` extension kinds and the full L7
AuthorizationPolicy rules. Until the control plane pushes those in a typed form,
`WaypointConfig.from_resources` builds the waypoint's view from the snapshot plus the
control plane's parsed resources (`config.resources.Resource`).

Headers are tuples of `(name, value)` pairs with lower-case names, in wire order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar, dataclass_transform
from urllib.parse import parse_qsl

from config.resources import (
    AuthorizationPolicySpec,
    DestinationRuleSpec,
    HTTPFaultSpec,
    HTTPRouteSpec,
    RateLimitSpec,
    Resource,
)
from ztunnel import snapshot as zs

__all__ = [
    "Headers",
    "LocalResponse",
    "Named",
    "Request",
    "Response",
    "UpstreamEndpoint",
    "WaypointConfig",
    "header_value",
    "normalize_path",
    "set_header",
]

Headers = tuple[tuple[str, str], ...]

S = TypeVar("S")


def header_value(headers: Headers, name: str) -> str | None:
    """All values of header `name` joined with `,` (None when absent)."""
    name = name.lower()
    vals = [v for k, v in headers if k == name]
    if not vals:
        return None
    return ",".join(vals)


def set_header(headers: Headers, name: str, value: str) -> Headers:
    """`headers` with every `name` header replaced by one `name: value`."""
    name = name.lower()
    out = [(k, v) for k, v in headers if k != name]
    out.append((name, value))
    return tuple(out)


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = "0123456789abcdefABCDEF"


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c == "%" and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
            ch = chr(int(path[i + 1 : i + 3], 16))
            out.append(ch if ch in _UNRESERVED else "%" + path[i + 1 : i + 3].upper())
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


def normalize_path(target: str) -> str:
    """RFC 3986 normalization of a request target's path (Istio's default `BASE`).

    Percent-encoded unreserved characters are decoded (other escapes, such as
    `%2F`, are kept, upper-cased), `.` and `..` segments removed (never above the
    root); the query is left as is. Route matching and authorization both see
    the normalized path, so `/a/../admin` or `/%61dmin` cannot slip past a rule
    on `/admin`.
    """
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        return target
    if "%" in path:
        path = _decode_unreserved(path)
    if "/." in path:
        out: list[str] = []
        segments = path.split("/")[1:]
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            if seg == ".":
                if last:
                    out.append("")
            elif seg == "..":
                if out:
                    out.pop()
                if last:
                    out.append("")
            else:
                out.append(seg)
        path = "/" + "/".join(out)
    return path + sep + query


_V = TypeVar("_V", bound=type)


@dataclass_transform(frozen_default=True)
def value(cls: _V) -> _V:
    """A value built per request: frozen for the type checker (`mypy --strict` rejects
    assignments to its fields; use `dataclasses.replace`), a plain slotted dataclass
    at run time, hashable by value. A frozen dataclass's `__init__` sets each field
    through `object.__setattr__` and costs 7x more, on every request."""
    return dataclass(slots=True, unsafe_hash=True)(cls)  # type: ignore[return-value]


@value
class Request:
    """One HTTP request as the waypoint sees it.

    `path` is the request target (path and optional `?query`); `authority` is the
    Host / `:authority` (headers never hold pseudo-headers; an HTTP/1.1 `host`
    header may stay in them, `authority` is what counts). `dest_ip`/`dest_port`
    are the original destination the client dialled (a service VIP or a workload
    IP, from the HBONE `CONNECT` authority). `source_principal` is the client's
    SPIFFE ID from the verified peer certificate (`spiffe://td/ns/x/sa/y`), None
    when unknown.
    """

    method: str
    path: str
    authority: str = ""
    headers: Headers = ()
    scheme: str = "http"
    dest_ip: str = ""
    dest_port: int = 0
    source_ip: str = ""
    source_principal: str | None = None

    @property
    def path_only(self) -> str:
        """The path without the query string."""
        return self.path.split("?", 1)[0] or "/"

    @property
    def query(self) -> str:
        """The raw query string (without `?`), empty when absent."""
        return self.path.split("?", 1)[1] if "?" in self.path else ""

    @property
    def query_params(self) -> tuple[tuple[str, str], ...]:
        """Decoded query parameters in order."""
        return tuple(parse_qsl(self.query, keep_blank_values=True))

    @property
    def host(self) -> str:
        """The authority without its port, lower-case."""
        a = self.authority
        if a.startswith("["):
            return a[1 : a.find("]")].lower() if "]" in a else a.lower()
        if a.count(":") == 1:
            a = a.split(":", 1)[0]
        return a.lower()

    @property
    def source_namespace(self) -> str | None:
        """The client's namespace from its SPIFFE ID."""
        p = self.source_principal
        if not p:
            return None
        parts = p.removeprefix("spiffe://").split("/")
        if len(parts) >= 3 and parts[1] == "ns":
            return parts[2]
        return None

    def header(self, name: str) -> str | None:
        """All values of header `name` joined with `,` (None when absent)."""
        return header_value(self.headers, name)

    def with_(self, **changes: object) -> Request:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


@value
class Response:
    """An upstream response's head (the body streams separately)."""

    status: int
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class LocalResponse:
    """A response the waypoint answers itself.

    `flags` are Envoy/Istio response flags for metrics and access logs (`UO`
    overflow, `RL` rate limited, `FI` fault abort, `NR` no route, `UH` no healthy
    upstream, `UF` upstream connect failure, `UT` upstream timeout); `details`
    says why, for the access log.
    """

    status: int
    body: bytes = b""
    headers: Headers = ()
    flags: str = ""
    details: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamEndpoint:
    """A concrete place to send a request: workload address and target port.

    `hbone` says whether to re-originate HBONE to `address:15008` (the workload is
    enrolled in the mesh) or to connect in plain TCP; `identity` is the SPIFFE ID
    to verify on the HBONE connection.
    """

    workload_uid: str
    address: str
    port: int
    identity: str
    hbone: bool = True
    weight: int = 1
    #: `address:port` (`[v6]:port`), the key for LB and outlier state; derived
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        a = f"[{self.address}]" if ":" in self.address else self.address
        object.__setattr__(self, "key", f"{a}:{self.port}")


@dataclass(frozen=True, slots=True)
class Named(Generic[S]):
    """A resource spec with its namespace, name and creation order (`created`)."""

    namespace: str
    name: str
    spec: S
    created: int = 0
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """`namespace/name`."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class WaypointConfig:
    """Everything one waypoint needs to build its filter chain."""

    snapshot: zs.Snapshot
    gateway_namespace: str
    gateway_name: str
    routes: tuple[Named[HTTPRouteSpec], ...] = ()
    destination_rules: tuple[Named[DestinationRuleSpec], ...] = ()
    faults: tuple[Named[HTTPFaultSpec], ...] = ()
    rate_limits: tuple[Named[RateLimitSpec], ...] = ()
    policies: tuple[Named[AuthorizationPolicySpec], ...] = ()
    _svc_by_name: Mapping[tuple[str, str], zs.Service] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_svc_by_name",
            {(s.namespace, s.name): s for s in self.snapshot.services},
        )

    @classmethod
    def from_resources(
        cls,
        snapshot: zs.Snapshot,
        resources: Iterable[Resource | tuple[Resource, int]],
        *,
        gateway: tuple[str, str],
    ) -> WaypointConfig:
        """Build the view from a snapshot and parsed resources.

        Each resource may come with its creation version (`(resource, created)`,
        as `config.store.StoredResource.created`); route precedence ties go to the
        oldest route. Kinds a waypoint does not use are ignored.
        """
        routes: list[Named[HTTPRouteSpec]] = []
        drs: list[Named[DestinationRuleSpec]] = []
        faults: list[Named[HTTPFaultSpec]] = []
        rls: list[Named[RateLimitSpec]] = []
        pols: list[Named[AuthorizationPolicySpec]] = []
        for item in resources:
            r, created = item if isinstance(item, tuple) else (item, 0)
            ns, name, spec = r.meta.namespace, r.meta.name, r.spec
            ann = dict(r.meta.annotations)
            if isinstance(spec, HTTPRouteSpec):
                routes.append(Named(ns, name, spec, created, ann))
            elif isinstance(spec, DestinationRuleSpec):
                drs.append(Named(ns, name, spec, created, ann))
            elif isinstance(spec, HTTPFaultSpec):
                faults.append(Named(ns, name, spec, created, ann))
            elif isinstance(spec, RateLimitSpec):
                rls.append(Named(ns, name, spec, created, ann))
            elif isinstance(spec, AuthorizationPolicySpec):
                pols.append(Named(ns, name, spec, created, ann))

        def order(n: Named[S]) -> tuple[int, str, str]:
            return (n.created, n.namespace, n.name)

        return cls(
            snapshot=snapshot,
            gateway_namespace=gateway[0],
            gateway_name=gateway[1],
            routes=tuple(sorted(routes, key=order)),
            destination_rules=tuple(sorted(drs, key=order)),
            faults=tuple(sorted(faults, key=order)),
            rate_limits=tuple(sorted(rls, key=order)),
            policies=tuple(sorted(pols, key=lambda p: (p.namespace, p.name))),
        )

    # ---------------------------------------------------------------- lookups

    def service(self, namespace: str, name: str) -> zs.Service | None:
        """The service `namespace/name` from the snapshot."""
        return self._svc_by_name.get((namespace, name))

    def service_for(self, request: Request) -> zs.Service | None:
        """The service the client addressed: by the original destination VIP, or by the
        Host's hostname when the destination address is unknown."""
        if request.dest_ip:
            return self.snapshot.service_by_vip(request.dest_ip)
        host = request.host
        if host:
            s = self.snapshot.service_by_hostname(host)
            if s is not None:
                return s
            parts = host.split(".")
            if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):
                return self.service(parts[1], parts[0])
        return None

    def endpoints(self, service: zs.Service, port: int) -> tuple[UpstreamEndpoint, ...]:
        """Healthy endpoints of `service` for service port `port`, in snapshot order."""
        sp = service.port(port)
        if sp is None:
            sp = zs.ServicePort(port=port)
        out: list[UpstreamEndpoint] = []
        for ep in service.endpoints:
            if not ep.healthy:
                continue
            w = self.snapshot.workload_by_uid(ep.workload_uid)
            if w is None:
                continue
            out.append(
                UpstreamEndpoint(
                    workload_uid=w.uid,
                    address=w.ip,
                    port=ep.target_port(sp),
                    identity=w.identity,
                    hbone=w.enrolled,
                    weight=w.weight,
                )
            )
        return tuple(out)
