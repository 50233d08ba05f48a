"""L4 AuthorizationPolicy and PeerAuthentication evaluation (pure, Istio ztunnel semantics).

Order of evaluation for a connection to a workload:

1. Plaintext (no peer identity) to a workload whose PeerAuthentication mode is
   STRICT is denied.
2. Any matching DENY policy denies.
3. No ALLOW policy applies to the workload -> allow.
4. Any matching ALLOW policy allows; otherwise deny.

A rule matches when some `from` source matches (or there is none), some `to`
operation matches (or there is none) and every `when` condition matches. Within a
source or operation every non-empty field must match and no `not_` field may match.
Policies without rules match nothing (an ALLOW one is "allow nothing").

Rules that carried L7 attributes (methods, paths, hosts, request principals, L7
`when` keys: listed in `Rule.l7_fields`) are handled as Istio ztunnel does:

* in an ALLOW policy such a rule never matches at L4: the waypoint must enforce it
  (so an ALLOW policy made only of L7 rules allows nothing at ztunnel);
* in a DENY policy the L7 attributes are ignored and the rule's L4 part denies the
  whole connection (more restrictive, never less).

Principals and namespaces come from the verified peer certificate, never from
headers; a plaintext connection has neither, so `principals`/`namespaces` never
match it and their `not_` forms never exclude it. String matches support Istio's
wildcards: `*` (any non-empty), `prefix*`, `*suffix`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, TypeVar

from ztunnel.identity import SpiffeId
from ztunnel.snapshot import (
    AuthorizationPolicy,
    Condition,
    Operation,
    PeerAuthentication,
    Rule,
    Snapshot,
    Source,
    Workload,
    selector_matches,
)

__all__ = [
    "ConnectionInfo",
    "Decision",
    "MtlsMode",
    "denied_connections",
    "evaluate",
    "evaluate_policies",
    "peer_authentication_mode",
]

MtlsMode = Literal["STRICT", "PERMISSIVE"]
_IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What L4 authz sees of a connection.

    `src_identity` is the peer certificate's SPIFFE ID (None for plaintext inbound on
    15006); `dst_port` is the port on the workload (the target port, not a service
    port); `dst_ip` defaults to the workload's primary address.
    """

    src_identity: SpiffeId | None
    src_ip: str
    dst_workload: Workload
    dst_port: int
    dst_ip: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict; `policy` is `namespace/name` of the deciding policy, if any."""

    allowed: bool
    policy: str | None
    reason: str


# ----------------------------------------------------------------------------- matching


def _string_match(pattern: str, value: str | None) -> bool:
    if value is None or value == "":
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*"):  # checked first, as Istio does
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _principal_pattern(p: str) -> str:
    return p.removeprefix("spiffe://")


@lru_cache(maxsize=4096)
def _networks(blocks: tuple[str, ...]) -> tuple[_IPNet, ...]:
    return tuple(ipaddress.ip_network(b, strict=False) for b in blocks)


def _parse_ip(text: str) -> _IPAddr | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _in_any(addr: _IPAddr | None, blocks: tuple[str, ...]) -> bool:
    if addr is None:
        return False
    return any(addr.version == n.version and addr in n for n in _networks(blocks))


@dataclass(frozen=True, slots=True)
class _Ctx:
    principal: str | None  # "td/ns/x/sa/y"
    namespace: str | None
    src: _IPAddr | None
    dst: _IPAddr | None
    port: int


def _any_str(patterns: tuple[str, ...], value: str | None, *, principal: bool = False) -> bool:
    if principal:
        return any(_string_match(_principal_pattern(p), value) for p in patterns)
    return any(_string_match(p, value) for p in patterns)


def _source_matches(s: Source, c: _Ctx) -> bool:
    if s.principals and not _any_str(s.principals, c.principal, principal=True):
        return False
    if s.not_principals and _any_str(s.not_principals, c.principal, principal=True):
        return False
    if s.namespaces and not _any_str(s.namespaces, c.namespace):
        return False
    if s.not_namespaces and _any_str(s.not_namespaces, c.namespace):
        return False
    if s.ip_blocks and not _in_any(c.src, s.ip_blocks):
        return False
    return not (s.not_ip_blocks and _in_any(c.src, s.not_ip_blocks))


def _operation_matches(o: Operation, c: _Ctx) -> bool:
    if o.ports and c.port not in o.ports:
        return False
    return not (o.not_ports and c.port in o.not_ports)


def _condition_value_matches(cond: Condition, values: tuple[str, ...], c: _Ctx) -> bool:
    key = cond.key
    if key in ("source.ip", "remote.ip"):
        return _in_any(c.src, values)
    if key == "destination.ip":
        return _in_any(c.dst, values)
    if key == "destination.port":
        return str(c.port) in values
    if key == "source.principal":
        return _any_str(values, c.principal, principal=True)
    if key == "source.namespace":
        return _any_str(values, c.namespace)
    return False  # pragma: no cover - keys are validated in the snapshot


def _condition_matches(cond: Condition, c: _Ctx) -> bool:
    if cond.values and not _condition_value_matches(cond, cond.values, c):
        return False
    return not (cond.not_values and _condition_value_matches(cond, cond.not_values, c))


def _rule_matches(rule: Rule, c: _Ctx) -> bool:
    if rule.from_ and not any(_source_matches(s, c) for s in rule.from_):
        return False
    if rule.to and not any(_operation_matches(o, c) for o in rule.to):
        return False
    return all(_condition_matches(w, c) for w in rule.when)


def _ctx(conn: ConnectionInfo) -> _Ctx:
    ident = conn.src_identity
    principal = None
    namespace = None
    if ident is not None:
        principal = f"{ident.trust_domain}/ns/{ident.namespace}/sa/{ident.service_account}"
        namespace = ident.namespace
    return _Ctx(
        principal=principal,
        namespace=namespace,
        src=_parse_ip(conn.src_ip),
        dst=_parse_ip(conn.dst_ip or conn.dst_workload.ip),
        port=conn.dst_port,
    )


def _who(conn: ConnectionInfo) -> str:
    src = str(conn.src_identity) if conn.src_identity is not None else "plaintext"
    w = conn.dst_workload
    return f"{src} from {conn.src_ip} to {w.namespace}/{w.name}:{conn.dst_port}"


# ----------------------------------------------------------------------------- evaluation


def evaluate_policies(
    policies: Iterable[AuthorizationPolicy], conn: ConnectionInfo
) -> Decision:
    """Evaluate `conn` against the policies that apply to its destination workload."""
    c = _ctx(conn)
    allow: list[AuthorizationPolicy] = []
    for p in policies:
        if p.action == "DENY":
            for rule in p.rules:
                if _rule_matches(rule, c):
                    extra = ""
                    if rule.has_l7:
                        extra = (
                            f" (the rule also has L7 attributes {', '.join(rule.l7_fields)} "
                            "that ztunnel cannot check, so it denies the whole connection: "
                            "attach the policy to a waypoint for L7 enforcement)"
                        )
                    return Decision(
                        False, p.key, f"denied by DENY policy {p.key}: {_who(conn)}{extra}"
                    )
        else:
            allow.append(p)
    if not allow:
        return Decision(True, None, "allowed: no ALLOW policy applies to the workload")
    for p in allow:
        for rule in p.rules:
            if not rule.has_l7 and _rule_matches(rule, c):
                return Decision(True, p.key, f"allowed by ALLOW policy {p.key}")
    names = ", ".join(p.key for p in allow)
    hint = ""
    if any(r.has_l7 for p in allow for r in p.rules):
        hint = (
            "; rules with L7 attributes never match at ztunnel: route the traffic "
            "through a waypoint to enforce them"
        )
    return Decision(
        False, None, f"denied: no ALLOW policy matched {_who(conn)} (ALLOW policies: {names}){hint}"
    )


def evaluate(snapshot: Snapshot, conn: ConnectionInfo) -> Decision:
    """Full L4 verdict for `conn`: PeerAuthentication STRICT, then AuthorizationPolicies."""
    w = conn.dst_workload
    if conn.src_identity is None:
        mode, pa = _peer_authentication(snapshot, w, conn.dst_port)
        if mode == "STRICT":
            name = pa.namespace + "/" + pa.name if pa is not None else None
            return Decision(
                False,
                name,
                f"denied: plaintext connection from {conn.src_ip} to {w.namespace}/{w.name}:"
                f"{conn.dst_port} but PeerAuthentication {name} requires mTLS (STRICT): "
                "enroll the client in the mesh or set the mode to PERMISSIVE",
            )
    return evaluate_policies(snapshot.policies_for(w), conn)


def _mode_of(pa: PeerAuthentication, port: int | None) -> str:
    if port is not None and pa.selector is not None:
        port_mode = pa.port_mtls.get(port)
        if port_mode is not None and port_mode != "UNSET":
            return port_mode
    return pa.mode


def _peer_authentication(
    snapshot: Snapshot, workload: Workload, port: int | None
) -> tuple[MtlsMode, PeerAuthentication | None]:
    selected: list[PeerAuthentication] = []
    namespace: list[PeerAuthentication] = []
    mesh: list[PeerAuthentication] = []
    for pa in snapshot.peer_authentications:
        if pa.namespace == workload.namespace and pa.selector is not None:
            if selector_matches(pa.selector, workload.labels):
                selected.append(pa)
        elif pa.selector is None:
            if pa.namespace == workload.namespace and pa.namespace != snapshot.root_namespace:
                namespace.append(pa)
            elif pa.namespace == snapshot.root_namespace:
                mesh.append(pa)
    for level in (selected, namespace, mesh):
        for pa in level:
            mode = _mode_of(pa, port)
            if mode == "UNSET":
                continue
            return ("STRICT" if mode == "STRICT" else "PERMISSIVE"), pa
    return "PERMISSIVE", None


def peer_authentication_mode(
    snapshot: Snapshot, workload: Workload, port: int | None = None
) -> MtlsMode:
    """The effective mTLS mode for inbound traffic to `workload` (and `port`).

    Precedence: selector policy in the workload's namespace (its port-level mode
    first) > namespace-wide policy > mesh-wide policy in the root namespace >
    PERMISSIVE. UNSET inherits from the next level; DISABLE is PERMISSIVE at
    ztunnel. Among several policies of one level the first in the snapshot wins.
    """
    return _peer_authentication(snapshot, workload, port)[0]


K = TypeVar("K")


def denied_connections(
    snapshot: Snapshot, connections: Mapping[K, ConnectionInfo]
) -> list[tuple[K, Decision]]:
    """The open connections that `snapshot` no longer allows (so the runtime closes them).

    Destination workloads are looked up again by uid so label changes count; a
    connection whose workload left the snapshot is reported as denied.
    """
    out: list[tuple[K, Decision]] = []
    for key, conn in connections.items():
        current = snapshot.workload_by_uid(conn.dst_workload.uid)
        if current is None:
            w = conn.dst_workload
            out.append(
                (
                    key,
                    Decision(
                        False,
                        None,
                        f"denied: workload {w.namespace}/{w.name} is no longer in the "
                        f"configuration (snapshot version {snapshot.version})",
                    ),
                )
            )
            continue
        info = conn
        if current is not conn.dst_workload:
            info = ConnectionInfo(
                conn.src_identity, conn.src_ip, current, conn.dst_port, conn.dst_ip
            )
        decision = evaluate(snapshot, info)
        if not decision.allowed:
            out.append((key, decision))
    return out
