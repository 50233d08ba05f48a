"""HTTPRoute matching with Gateway API precedence, and weighted backend choice.

Routes attach to a Service through `parentRefs` (GAMMA). For one service and port
every match of every attached rule is compiled once into a `RouteTable`, sorted by
the Gateway API precedence:

1. path type: `Exact`, then `PathPrefix` (longest prefix first), then
   `RegularExpression` (longest pattern first, our choice: the spec leaves it open);
2. a match with a `method` before one without;
3. more header matches first;
4. more query parameter matches first;
5. the oldest route (creation order), then `namespace/name` alphabetically;
6. within a route, the first rule and the first match in list order.

The first match in that order that accepts the request wins. Producer routes (in
the service's namespace) apply to every client; consumer routes (in another
namespace) apply only to clients of that namespace and, when some exist, replace
the producer routes for them, as GAMMA specifies. `hostnames` are ignored for
routes attached to Services (GAMMA).

`PathPrefix` matches whole path segments: `/foo` matches `/foo`, `/foo/` and
`/foo/bar` but not `/foobar`; a trailing `/` in the prefix is ignored. Regular
expressions must match the whole value. Header names are case-insensitive; values
(and query parameter names and values) are case-sensitive.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from random import Random

from config.resources import BackendRef, HTTPRouteSpec, RouteMatch, RouteRule, StringMatch
from waypoint.model import Named, Request, header_value

__all__ = [
    "CompiledMatch",
    "RouteTable",
    "WeightedChoice",
    "build_route_table",
    "match_route",
    "path_prefix_matches",
    "routes_for_service",
]

_PATH_RANK = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}

# How `match_route` tests a match (`CompiledMatch.shape`): the common shapes (a path
# condition alone) are compared inline; anything else goes through `accepts`.
_ANY = 0  # PathPrefix "/" and nothing else: every request
_EXACT = 1  # Exact path and nothing else
_PREFIX = 2  # PathPrefix (not "/") and nothing else
_GENERAL = 3  # a regex path, or method / header / query conditions


def path_prefix_matches(prefix: str, path: str) -> bool:
    """Gateway API `PathPrefix`: element-wise prefix match."""
    p = prefix.rstrip("/")
    if not p:
        return True
    return path == p or path.startswith(p + "/")


@dataclass(frozen=True, slots=True)
class _ValueMatch:
    name: str
    value: str
    regex: re.Pattern[str] | None

    def accepts(self, v: str | None) -> bool:
        if v is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(v) is not None
        return v == self.value


def _compile_value(m: StringMatch, *, lower_name: bool) -> _ValueMatch:
    regex = re.compile(m.value) if m.type == "RegularExpression" else None
    return _ValueMatch(m.name.lower() if lower_name else m.name, m.value, regex)


@dataclass(frozen=True, slots=True)
class CompiledMatch:
    """One `matches[]` entry of one rule, ready to run, with its precedence key."""

    route: Named[HTTPRouteSpec]
    rule_index: int
    match_index: int
    rule: RouteRule
    path_type: str
    path_value: str
    path_regex: re.Pattern[str] | None
    method: str
    headers: tuple[_ValueMatch, ...]
    query: tuple[_ValueMatch, ...]
    sort_key: tuple[int, int, int, int, int, int, str, int, int]
    #: `namespace/name` of the route (derived)
    route_key: str = field(init=False, compare=False)
    #: how `match_route` tests it (`_ANY`, `_EXACT`, `_PREFIX`, `_GENERAL`; derived)
    shape: int = field(init=False, compare=False, repr=False)
    #: the PathPrefix value without its trailing `/`, and with one `/` (derived)
    prefix: str = field(init=False, compare=False, repr=False)
    prefix_slash: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route_key", self.route.key)
        prefix = self.path_value.rstrip("/") if self.path_type == "PathPrefix" else ""
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "prefix_slash", prefix + "/")
        shape = _GENERAL
        if not self.method and not self.headers and not self.query:
            if self.path_type == "Exact":
                shape = _EXACT
            elif self.path_type == "PathPrefix":
                shape = _PREFIX if prefix else _ANY
        object.__setattr__(self, "shape", shape)

    def accepts(self, request: Request, path: str, params: Sequence[tuple[str, str]]) -> bool:
        """Whether the request matches (path without query, decoded query params)."""
        if self.path_type == "Exact":
            if path != self.path_value:
                return False
        elif self.path_type == "PathPrefix":
            prefix = self.prefix  # path_prefix_matches, prepared
            if prefix and path != prefix and not path.startswith(self.prefix_slash):
                return False
        elif self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        if self.method and request.method != self.method:
            return False
        for h in self.headers:
            if h.name in ("host", ":authority"):
                value: str | None = request.authority or header_value(request.headers, "host")
            else:
                value = header_value(request.headers, h.name)
            if not h.accepts(value):
                return False
        for q in self.query:
            first = next((v for k, v in params if k == q.name), None)
            if not q.accepts(first):
                return False
        return True


def _compile_match(
    route: Named[HTTPRouteSpec], ri: int, rule: RouteRule, mi: int, m: RouteMatch
) -> CompiledMatch:
    ptype = m.path.type
    pval = m.path.value
    rank = _PATH_RANK.get(ptype, 2)
    plen = len(pval.rstrip("/")) if ptype == "PathPrefix" else len(pval)
    key = (
        rank,
        -plen,
        0 if m.method else 1,
        -len(m.headers),
        -len(m.query_params),
        route.created,
        route.key,
        ri,
        mi,
    )
    return CompiledMatch(
        route=route,
        rule_index=ri,
        match_index=mi,
        rule=rule,
        path_type=ptype,
        path_value=pval,
        path_regex=re.compile(pval) if ptype == "RegularExpression" else None,
        method=m.method,
        headers=tuple(_compile_value(h, lower_name=True) for h in m.headers),
        query=tuple(_compile_value(q, lower_name=False) for q in m.query_params),
        sort_key=key,
    )


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The sorted matches of the routes attached to one service port.

    `producer` holds the routes of the service's own namespace; `consumers` maps a
    client namespace to its consumer routes' matches.
    """

    producer: tuple[CompiledMatch, ...]
    consumers: tuple[tuple[str, tuple[CompiledMatch, ...]], ...] = ()

    @property
    def empty(self) -> bool:
        """No route attaches to this service port (traffic goes to the service itself)."""
        return not self.producer and not self.consumers

    def matches_for(self, source_namespace: str | None) -> tuple[CompiledMatch, ...]:
        """The matches that apply to a client of `source_namespace`."""
        if source_namespace is not None:
            for ns, ms in self.consumers:
                if ns == source_namespace:
                    return ms
        return self.producer


def _attaches(
    route: Named[HTTPRouteSpec], namespace: str, name: str, port: int, port_name: str
) -> bool:
    for p in route.spec.parent_refs:
        if p.kind != "Service" or p.name != name or p.namespace != namespace:
            continue
        if p.port is not None and p.port != port:
            continue
        if p.section_name and p.section_name != port_name:
            continue
        return True
    return False


def routes_for_service(
    routes: Iterable[Named[HTTPRouteSpec]],
    namespace: str,
    name: str,
    port: int,
    port_name: str = "",
) -> list[Named[HTTPRouteSpec]]:
    """The routes whose `parentRefs` name Service `namespace/name` (and its port, by
    number or by name as `sectionName`)."""
    return [r for r in routes if _attaches(r, namespace, name, port, port_name)]


def _compile_all(routes: Iterable[Named[HTTPRouteSpec]]) -> tuple[CompiledMatch, ...]:
    out = [
        _compile_match(r, ri, rule, mi, m)
        for r in routes
        for ri, rule in enumerate(r.spec.rules)
        for mi, m in enumerate(rule.matches)
    ]
    out.sort(key=lambda c: c.sort_key)
    return tuple(out)


def build_route_table(
    routes: Iterable[Named[HTTPRouteSpec]],
    namespace: str,
    name: str,
    port: int,
    port_name: str = "",
) -> RouteTable:
    """Compile the routes attached to Service `namespace/name` port `port`."""
    attached = routes_for_service(routes, namespace, name, port, port_name)
    producer = [r for r in attached if r.namespace == namespace]
    by_ns: dict[str, list[Named[HTTPRouteSpec]]] = {}
    for r in attached:
        if r.namespace != namespace:
            by_ns.setdefault(r.namespace, []).append(r)
    consumers = tuple((ns, _compile_all(rs)) for ns, rs in sorted(by_ns.items()))
    return RouteTable(_compile_all(producer), consumers)


def match_route(table: RouteTable, request: Request) -> CompiledMatch | None:
    """The highest-precedence match accepting `request`, None when none does.

    Same answer as running `CompiledMatch.accepts` on each match in order; matches
    that are only a path condition (`CompiledMatch.shape`) are compared inline, and
    the client's namespace and the query parameters are only worked out when
    something needs them.
    """
    ms = table.matches_for(request.source_namespace) if table.consumers else table.producer
    target = request.path
    q = target.find("?")
    path = (target if q < 0 else target[:q]) or "/"
    params: Sequence[tuple[str, str]] | None = None if q >= 0 else ()
    for m in ms:
        shape = m.shape
        if shape == _ANY:
            return m
        if shape == _EXACT:
            if path == m.path_value:
                return m
        elif shape == _PREFIX:
            if path == m.prefix or path.startswith(m.prefix_slash):
                return m
        else:
            if params is None:
                params = request.query_params
            if m.accepts(request, path, params):
                return m
    return None


class WeightedChoice:
    """A backend chosen with probability weight / total, prepared once for fixed `refs`.

    `pick` takes one `rng.random()` draw (none when every weight is 0) and returns the
    index of the chosen entry in `refs`, or -1 when every weight is 0. Cumulative sums
    of the positive weights + bisect: the entry whose running range holds the draw
    (weights are non-negative integers below 2**53, so the sums are exact).
    """

    __slots__ = ("_cum", "_index")

    def __init__(self, refs: Sequence[BackendRef]) -> None:
        cum: list[int] = []
        index: list[int] = []
        running = 0
        for i, b in enumerate(refs):
            if b.weight > 0:
                running += b.weight
                cum.append(running)
                index.append(i)
        self._cum = tuple(cum)
        self._index = tuple(index)

    def pick(self, rng: Random) -> int:
        """The index of the chosen entry, or -1 when every weight is 0."""
        cum = self._cum
        if not cum:
            return -1
        index = self._index
        i = bisect_right(cum, rng.random() * cum[-1])
        return index[i] if i < len(index) else index[-1]
