"""L7 AuthorizationPolicy evaluation at the waypoint (pure, Istio semantics).

Which policies a waypoint enforces for a request to service S (Istio ambient):
policies with `targetRefs` naming this waypoint's Gateway, or naming Service S (in
S's namespace), and policies in the root namespace targeting the GatewayClass
`istio-waypoint`. Selector and namespace-wide policies are enforced by ztunnel.

Order: any matching DENY rule denies; with no ALLOW policy the request is allowed;
otherwise some ALLOW rule must match. A denial is a 403 with body
`RBAC: access denied`, as Envoy answers.

Rule matching is the one of `ztunnel.authz` (same string wildcards, principal and
IP helpers are imported from there) plus the HTTP attributes: `hosts` (against
the authority with and without its port, case-insensitive), `methods`, `paths`
(the path without query), `request.headers[name]` in `when`. JWT attributes
(`requestPrincipals`, `request.auth.*`) never match since the waypoint does no JWT
authentication, so an ALLOW on them allows nothing and their `not` forms exclude
nothing.

TCP traffic through the waypoint (`authorize(..., tcp=True)`) follows Istio's rule
for policies with HTTP attributes on TCP: a DENY rule ignores its HTTP attributes
(so it denies more, never less) and an ALLOW rule with HTTP attributes never
matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from config.resources import (
    AuthorizationPolicySpec,
    Condition,
    Operation,
    Rule,
    Source,
)
from waypoint.model import LocalResponse, Named, Request
from ztunnel.authz import _in_any, _parse_ip, _principal_pattern, _string_match

__all__ = [
    "DENIED_BODY",
    "L7Decision",
    "applicable_policies",
    "authorize",
    "denied_response",
    "has_http_attributes",
    "rule_matches",
]

DENIED_BODY = b"RBAC: access denied"
WAYPOINT_CLASS = "istio-waypoint"


@dataclass(frozen=True, slots=True)
class L7Decision:
    """The verdict; `policy` is `namespace/name` of the deciding policy, if any."""

    allowed: bool
    policy: str | None
    reason: str


def applicable_policies(
    policies: Iterable[Named[AuthorizationPolicySpec]],
    *,
    gateway: tuple[str, str],
    service: tuple[str, str] | None,
    root_namespace: str,
) -> tuple[Named[AuthorizationPolicySpec], ...]:
    """The policies this waypoint enforces for requests to `service` (ns, name)."""
    out: list[Named[AuthorizationPolicySpec]] = []
    for p in policies:
        for t in p.spec.target_refs:
            if t.kind == "Gateway" and (p.namespace, t.name) == gateway:
                out.append(p)
                break
            if t.kind == "Service" and service is not None and (p.namespace, t.name) == service:
                out.append(p)
                break
            if (
                t.kind == "GatewayClass"
                and t.name == WAYPOINT_CLASS
                and p.namespace == root_namespace
            ):
                out.append(p)
                break
    return tuple(out)


def _any(patterns: tuple[str, ...], value: str | None) -> bool:
    return any(_string_match(p, value) for p in patterns)


def _any_principal(patterns: tuple[str, ...], value: str | None) -> bool:
    return any(_string_match(_principal_pattern(p), value) for p in patterns)


@dataclass(frozen=True, slots=True)
class _Ctx:
    req: Request
    principal: str | None  # "td/ns/x/sa/y"
    namespace: str | None
    tcp: bool = False  # a TCP connection: HTTP attributes cannot be checked

    @property
    def hosts(self) -> tuple[str, ...]:
        a = self.req.authority.lower()
        h = self.req.host
        return (a,) if a == h else (a, h)


def _host_match(patterns: tuple[str, ...], c: _Ctx) -> bool:
    return any(_string_match(p.lower(), h) for p in patterns for h in c.hosts)


def _source_matches(s: Source, c: _Ctx) -> bool:
    src = _parse_ip(c.req.source_ip)
    if s.principals and not _any_principal(s.principals, c.principal):
        return False
    if s.not_principals and _any_principal(s.not_principals, c.principal):
        return False
    if s.request_principals and not c.tcp:
        return False  # no JWT authentication at the waypoint
    if s.namespaces and not _any(s.namespaces, c.namespace):
        return False
    if s.not_namespaces and _any(s.not_namespaces, c.namespace):
        return False
    for blocks, negate in (
        (s.ip_blocks, False),
        (s.not_ip_blocks, True),
        (s.remote_ip_blocks, False),
        (s.not_remote_ip_blocks, True),
    ):
        if blocks and _in_any(src, blocks) == negate:
            return False
    return True


def _operation_matches(o: Operation, c: _Ctx) -> bool:
    r = c.req
    if o.ports and r.dest_port not in o.ports:
        return False
    if o.not_ports and r.dest_port in o.not_ports:
        return False
    if c.tcp:
        return True  # HTTP attributes are ignored (DENY) or the rule skipped (ALLOW)
    if o.hosts and not _host_match(o.hosts, c):
        return False
    if o.not_hosts and _host_match(o.not_hosts, c):
        return False
    if o.methods and not _any(o.methods, r.method):
        return False
    if o.not_methods and _any(o.not_methods, r.method):
        return False
    path = r.path_only
    if o.paths and not _any(o.paths, path):
        return False
    return not (o.not_paths and _any(o.not_paths, path))


def _condition_values_match(key: str, values: tuple[str, ...], c: _Ctx) -> bool:
    r = c.req
    if key.startswith("request.headers[") and key.endswith("]"):
        return _any(values, r.header(key[len("request.headers[") : -1]))
    if key in ("source.ip", "remote.ip"):
        return _in_any(_parse_ip(r.source_ip), values)
    if key == "destination.ip":
        return _in_any(_parse_ip(r.dest_ip), values)
    if key == "destination.port":
        return str(r.dest_port) in values
    if key == "source.principal":
        return _any_principal(values, c.principal)
    if key == "source.namespace":
        return _any(values, c.namespace)
    return False  # request.auth.*, connection.sni, experimental.*: not available


def _condition_matches(cond: Condition, c: _Ctx) -> bool:
    if c.tcp and cond.key.startswith("request."):
        return True
    if cond.values and not _condition_values_match(cond.key, cond.values, c):
        return False
    return not (cond.not_values and _condition_values_match(cond.key, cond.not_values, c))


def rule_matches(rule: Rule, request: Request) -> bool:
    """Whether one policy rule matches the request."""
    return _rule_matches(rule, _ctx(request))


def _rule_matches(rule: Rule, c: _Ctx) -> bool:
    if rule.sources and not any(_source_matches(s, c) for s in rule.sources):
        return False
    if rule.operations and not any(_operation_matches(o, c) for o in rule.operations):
        return False
    return all(_condition_matches(w, c) for w in rule.when)


def _ctx(request: Request, tcp: bool = False) -> _Ctx:
    p = request.source_principal
    principal = p.removeprefix("spiffe://") if p else None
    return _Ctx(request, principal, request.source_namespace, tcp)


def has_http_attributes(rule: Rule) -> bool:
    """Whether a rule uses attributes only an HTTP request has."""
    if any(s.request_principals or s.not_request_principals for s in rule.sources):
        return True
    if any(o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
           for o in rule.operations):
        return True
    return any(w.key.startswith("request.") for w in rule.when)


def authorize(
    policies: Iterable[Named[AuthorizationPolicySpec]], request: Request, *, tcp: bool = False
) -> L7Decision:
    """Evaluate `request` against the policies that apply to it.

    `tcp=True` evaluates a TCP connection (the request carries only addresses,
    port and peer identity) as Istio does: DENY rules ignore their HTTP
    attributes (denying more, never less) and ALLOW rules with HTTP attributes
    never match.
    """
    c = _ctx(request, tcp)
    allow: list[Named[AuthorizationPolicySpec]] = []
    for p in policies:
        if p.spec.action == "DENY":
            if any(_rule_matches(rule, c) for rule in p.spec.rules):
                return L7Decision(
                    False,
                    p.key,
                    f"denied by DENY policy {p.key}: "
                    f"{'TCP connection' if tcp else request.method + ' ' + request.path_only}",
                )
        else:
            allow.append(p)
    if not allow:
        return L7Decision(True, None, "allowed: no ALLOW policy applies")
    for p in allow:
        if any(
            _rule_matches(rule, c)
            for rule in p.spec.rules
            if not (tcp and has_http_attributes(rule))
        ):
            return L7Decision(True, p.key, f"allowed by ALLOW policy {p.key}")
    names = ", ".join(p.key for p in allow)
    return L7Decision(
        False,
        None,
        f"denied: no ALLOW policy matched "
        f"{'a TCP connection' if tcp else request.method + ' ' + request.path_only} "
        f"from {request.source_principal or 'an unauthenticated client'} "
        f"(ALLOW policies: {names})",
    )


def denied_response(decision: L7Decision) -> LocalResponse:
    """The 403 answer for a denial."""
    return LocalResponse(
        403,
        DENIED_BODY,
        (("content-type", "text/plain"),),
        flags="",
        details=decision.reason,
    )
