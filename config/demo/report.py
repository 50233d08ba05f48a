"""What the demo measured, summarised, and checked against what it configured (pure).

Inputs are measurements only: the proxies' Prometheus samples and access-log denials,
the load generators' per-request results and the app servers' own counters. Nothing
here assumes the mesh did what it was told; `check` says where the measurements
contradict the configuration (`Expectations`), and the demo exits non-zero on any.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

MUTUAL_TLS = "mutual_tls"
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_SENT = "istio_tcp_sent_bytes_total"
TCP_RECEIVED = "istio_tcp_received_bytes_total"
REQUESTS = "istio_requests_total"
SECTIONS = ("Edges", "mTLS", "Legacy", "Split", "Latency", "Checks")


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample: metric name (with `_total`), labels, value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str, default: str = "") -> str:
        for k, v in self.labels:
            if k == key:
                return v
        return default


def parse_metrics(text: str) -> list[Sample]:
    """Parse a Prometheus text exposition into samples; an unparsable text gives none."""
    out: list[Sample] = []
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.append(Sample(s.name, tuple(sorted(s.labels.items())), float(s.value)))
    except ValueError:
        return []
    return out


@dataclass(frozen=True)
class RequestResult:
    """One request of a load generator: HTTP status (0 = no answer), latency, who answered."""

    t: float
    status: int
    ms: float
    target: str = ""
    version: str | None = None
    error: str | None = None


def parse_results(lines: Iterable[str]) -> list[RequestResult]:
    """Parse the load generator's JSON lines; incomplete or foreign lines are skipped."""
    out: list[RequestResult] = []
    for line in lines:
        try:
            d = json.loads(line)
            out.append(RequestResult(float(d["t"]), int(d["status"]), float(d["ms"]),
                                     str(d.get("target", "")), d.get("version"), d.get("error")))
        except (ValueError, KeyError, TypeError):
            continue
    return out


@dataclass(frozen=True)
class Denial:
    """A connection a ztunnel refused, from its access log."""

    node: str
    src: str
    dst: str
    reason: str


def parse_denials(node: str, lines: Iterable[str]) -> list[Denial]:
    """The `connection denied` lines of a ztunnel access log (structlog JSON)."""
    out: list[Denial] = []
    for line in lines:
        if '"connection denied"' not in line:
            continue
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out.append(Denial(node, str(d.get("src_addr", "")), str(d.get("dst_addr", "")),
                          str(d.get("error") or "")))
    return out


@dataclass(frozen=True)
class Measurements:
    """Everything the demo measured in one run."""

    duration_s: float
    shop: tuple[RequestResult, ...]
    legacy: tuple[RequestResult, ...]
    legacy_ip: str
    tcp: tuple[Sample, ...]
    denials: tuple[Denial, ...]
    waypoint_running: bool
    waypoint_note: str = ""
    l7: tuple[Sample, ...] = ()
    app: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Expectations:
    """What the demo configured, in the terms its measurements can contradict."""

    meshed_namespaces: tuple[str, ...] = ("shop",)
    # Application edges (client workload, server workload prefix) that must carry traffic.
    edges: tuple[tuple[str, str], ...] = (("loadgen", "frontend"), ("frontend", "catalog"),
                                          ("catalog", "inventory"))
    waypoint: bool = True
    v1_share: tuple[float, float] = (0.80, 0.97)
    min_split_requests: int = 50
    max_error_rate: float = 0.02


@dataclass(frozen=True)
class Edge:
    """Connections between two workloads, as the ztunnels counted them."""

    source: str
    source_ns: str
    destination: str
    destination_ns: str
    connections: int
    denied: int
    bytes_sent: int
    bytes_received: int
    source_principals: tuple[str, ...]
    destination_principals: tuple[str, ...]
    security: tuple[str, ...]
    reporter: str

    @property
    def meshed(self) -> bool:
        return self.source_ns != "unknown" and self.destination_ns != "unknown"


@dataclass(frozen=True)
class Latency:
    count: int
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Summary:
    edges: tuple[Edge, ...]
    shop_total: int
    shop_ok: int
    shop_errors: Mapping[str, int]
    versions: Mapping[str, int]
    v1_share: float | None
    latency: Latency | None
    legacy_attempts: int
    legacy_answered: int
    legacy_denials: tuple[Denial, ...]
    l7_requests: Mapping[tuple[str, str, str], int]
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency(results: Iterable[RequestResult]) -> Latency | None:
    ms = sorted(r.ms for r in results if 200 <= r.status < 300)
    if not ms:
        return None
    return Latency(len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99), ms[-1])


def _peer(s: Sample, side: str) -> tuple[str, str]:
    """(workload, namespace) of one side; a peer no workload matches (a waypoint) is
    named by its certificate: the service account and namespace of its SPIFFE ID."""
    wl = s.label(f"{side}_workload", "unknown") or "unknown"
    ns = s.label(f"{side}_workload_namespace", "unknown") or "unknown"
    if wl == "unknown":
        # spiffe://TD/ns/NS/sa/SA (Istio's metric labels leave out the scheme)
        parts = s.label(f"{side}_principal").removeprefix("spiffe://").split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            wl, ns = parts[4], parts[2]
    return wl, ns


def edges(samples: Iterable[Sample]) -> list[Edge]:
    """Per (source, destination) workload pair: connections, bytes, principals, security.

    The destination's ztunnel is the authority when it reported the pair (it saw the
    peer certificate); pairs only a source reported (e.g. the hop to a waypoint) use the
    source's counts.
    """
    Key = tuple[str, str, str, str]
    by_rep: dict[tuple[Key, str], dict[str, Any]] = {}
    for s in samples:
        if s.name not in (TCP_OPENED, TCP_SENT, TCP_RECEIVED):
            continue
        key = (*_peer(s, "source"), *_peer(s, "destination"))
        rep = s.label("reporter", "source")
        acc = by_rep.setdefault((key, rep), {"conns": 0.0, "denied": 0.0, "sent": 0.0,
                                              "recv": 0.0, "sp": set(), "dp": set(),
                                              "sec": set()})
        denied = s.label("response_flags") == "DENY"
        if s.name == TCP_OPENED:
            if denied:
                acc["denied"] += s.value
            else:
                acc["conns"] += s.value
        elif s.name == TCP_SENT:
            acc["sent"] += s.value
        else:
            acc["recv"] += s.value
        if s.value > 0 and not denied:
            for lab, k in (("source_principal", "sp"), ("destination_principal", "dp")):
                v = s.label(lab, "unknown")
                if v != "unknown":
                    acc[k].add(v)
            acc["sec"].add(s.label("connection_security_policy", "unknown"))
    keys = sorted({k for k, _ in by_rep})
    out: list[Edge] = []
    for key in keys:
        rep = "destination" if (key, "destination") in by_rep else "source"
        acc = by_rep[(key, rep)]
        if acc["conns"] == 0 and acc["denied"] == 0:
            continue
        out.append(Edge(key[0], key[1], key[2], key[3], int(acc["conns"]), int(acc["denied"]),
                        int(acc["sent"]), int(acc["recv"]), tuple(sorted(acc["sp"])),
                        tuple(sorted(acc["dp"])), tuple(sorted(acc["sec"])), rep))
    return out


def _carried(found: Sequence[Edge], src: str, dst_prefix: str) -> int:
    """Connections that carried src* -> dst*: directly, or via one intermediate (a waypoint).

    Names are prefixes: ztunnel reports a workload's canonical name (its `app` label), so
    catalog-v1 and catalog-v2 both show as `catalog`.
    """
    live = [e for e in found if e.connections > 0]
    total = sum(e.connections for e in live
                if e.source.startswith(src) and e.destination.startswith(dst_prefix))
    for hop in live:
        if not hop.source.startswith(src) or hop.destination.startswith(dst_prefix):
            continue
        onward = sum(e.connections for e in live
                     if e.source == hop.destination and e.destination.startswith(dst_prefix))
        total += min(hop.connections, onward)
    return total


def l7_requests(samples: Iterable[Sample]) -> dict[tuple[str, str, str], int]:
    """Waypoint requests per (source workload, destination, response code); the
    destination is the backend Service when the waypoint names it (catalog-v1), else
    the destination workload; a source no workload matches is named by its certificate."""
    out: Counter[tuple[str, str, str]] = Counter()
    for s in samples:
        if s.name == REQUESTS:
            dst = (s.label("destination_service_name") or s.label("destination_workload")
                   or "unknown")
            out[(_peer(s, "source")[0], dst,
                 s.label("response_code", "?"))] += int(s.value)
    return dict(out)


def summarise(m: Measurements, exp: Expectations) -> Summary:
    """Aggregate the measurements and run every contradiction check."""
    found = edges(m.tcp)
    ok = [r for r in m.shop if 200 <= r.status < 300]
    errors: Counter[str] = Counter()
    for r in m.shop:
        if not 200 <= r.status < 300:
            errors[f"HTTP {r.status}" if r.status else (r.error or "no answer").split(":")[0]] += 1
    versions: Counter[str] = Counter(r.version for r in ok if r.version)
    split_n = versions.get("v1", 0) + versions.get("v2", 0)
    share = versions.get("v1", 0) / split_n if split_n else None
    legacy_denials = tuple(d for d in m.denials
                           if m.legacy_ip and d.src.rpartition(":")[0] == m.legacy_ip)
    legacy_answered = sum(1 for r in m.legacy if r.status)
    checks: list[Check] = []

    # 1. Every application edge carried traffic.
    for src, dst in exp.edges:
        n = _carried(found, src, dst)
        checks.append(Check(f"traffic {src} -> {dst}", n > 0,
                            f"{n} connections" if n else
                            f"no connection from {src} to {dst} was counted by any ztunnel"))

    # 2. Every meshed edge is mutual TLS, and carries both identities.
    meshed = [e for e in found if e.connections > 0 and e.source_ns in exp.meshed_namespaces
              and e.destination_ns in exp.meshed_namespaces]
    plain = [e for e in meshed if e.security != (MUTUAL_TLS,)]
    checks.append(Check(
        "mTLS on every meshed edge", bool(meshed) and not plain,
        "no meshed edge was measured" if not meshed else
        (f"{len(meshed)} edges, all {MUTUAL_TLS}" if not plain else
         "not mutual TLS: " + ", ".join(f"{e.source} -> {e.destination} "
                                        f"({'/'.join(e.security)})" for e in plain))))
    anonymous = [e for e in meshed if e.reporter == "destination"
                 and (not e.source_principals or not e.destination_principals)]
    checks.append(Check(
        "both identities on meshed edges", bool(meshed) and not anonymous,
        "no meshed edge was measured" if not meshed else
        ("source and destination principals on every edge" if not anonymous else
         "missing a principal: " + ", ".join(f"{e.source} -> {e.destination}"
                                             for e in anonymous))))

    # 3. legacy (not in the mesh) never reaches shop, and the mesh is what stopped it.
    if not m.legacy:
        checks.append(Check("legacy denied", False, "the legacy client made no attempt"))
    elif legacy_answered:
        checks.append(Check("legacy denied", False,
                            f"{legacy_answered} of {len(m.legacy)} requests from legacy were "
                            "answered; STRICT mTLS and the deny policy should refuse them all"))
    elif not legacy_denials:
        checks.append(Check("legacy denied", False,
                            f"all {len(m.legacy)} legacy requests failed but no ztunnel logged "
                            "a denial: they failed for another reason (routing, timeouts)"))
    else:
        checks.append(Check("legacy denied", True,
                            f"{len(m.legacy)} attempts, 0 answered, {len(legacy_denials)} "
                            "denials logged by ztunnel"))

    # 4. The shop's own requests succeed.
    err_n = len(m.shop) - len(ok)
    rate = err_n / len(m.shop) if m.shop else 1.0
    checks.append(Check(
        "shop requests succeed", bool(m.shop) and rate <= exp.max_error_rate,
        "the load generator made no request" if not m.shop else
        f"{err_n} of {len(m.shop)} failed ({rate:.1%}, allowed {exp.max_error_rate:.0%})"))

    # 5. The waypoint ran and split catalog traffic as routed.
    if exp.waypoint:
        checks.append(Check("waypoint running", m.waypoint_running,
                            m.waypoint_note or ("running" if m.waypoint_running else
                                                "the waypoint was not running")))
        lo, hi = exp.v1_share
        if split_n < exp.min_split_requests:
            checks.append(Check("v1/v2 split", False,
                                f"only {split_n} answered requests: too few to measure a "
                                f"{lo:.0%}-{hi:.0%} share (need {exp.min_split_requests})"))
        else:
            assert share is not None
            checks.append(Check("v1/v2 split", lo <= share <= hi,
                                f"v1 {share:.1%} of {split_n} (routed 90/10, accepted "
                                f"{lo:.0%}-{hi:.0%})"))
    else:
        both = versions.get("v1", 0) > 0 and versions.get("v2", 0) > 0
        checks.append(Check("both catalog versions serve", both,
                            f"v1 {versions.get('v1', 0)}, v2 {versions.get('v2', 0)} "
                            "(no waypoint: ztunnel balances the catalog Service)"))

    return Summary(tuple(found), len(m.shop), len(ok), dict(errors), dict(versions), share,
                   latency(m.shop), len(m.legacy), legacy_answered, legacy_denials,
                   l7_requests(m.l7), tuple(checks))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def _short(principal: str) -> str:
    return principal.removeprefix("spiffe://")


def _bytes(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB"):
        if v < 1024:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def render(s: Summary, m: Measurements) -> list[str]:
    """The summary as plain text lines, one section per heading in SECTIONS."""
    lines: list[str] = [f"What the mesh did in {m.duration_s:.0f} s (measured):", ""]
    lines.append("Edges (connections counted by the ztunnels; identities from certificates)")
    rows = [[f"{e.source_ns}/{e.source}", f"{e.destination_ns}/{e.destination}",
             str(e.connections), str(e.denied), _bytes(e.bytes_sent), _bytes(e.bytes_received),
             ",".join(_short(p) for p in e.source_principals) or "-",
             ",".join(_short(p) for p in e.destination_principals) or "-",
             "/".join(e.security) or "-"] for e in s.edges]
    if rows:
        lines += _table(["SOURCE", "DESTINATION", "CONNS", "DENIED", "SENT", "RECEIVED",
                         "SOURCE-PRINCIPAL", "DESTINATION-PRINCIPAL", "SECURITY"], rows)
    else:
        lines.append("  (no connection was counted)")
    lines.append("")
    meshed = [e for e in s.edges if e.connections and e.meshed]
    mtls = [e for e in meshed if e.security == (MUTUAL_TLS,)]
    lines.append("mTLS")
    lines.append(f"  {len(mtls)} of {len(meshed)} edges between known workloads were "
                 f"{MUTUAL_TLS} only")
    lines.append("")
    lines.append("Legacy (namespace legacy, not in the mesh)")
    reasons = Counter(d.reason for d in s.legacy_denials)
    lines.append(f"  {s.legacy_attempts} attempts, {s.legacy_answered} answered, "
                 f"{len(s.legacy_denials)} denied by ztunnel")
    for reason, n in reasons.most_common(3):
        lines.append(f"    {n} x {reason}")
    lines.append("")
    lines.append("Split (catalog version named in each answer)")
    if s.v1_share is None:
        lines.append("  no answered request named a catalog version")
    else:
        total = sum(s.versions.values())
        lines.append("  " + ", ".join(f"{v} {n} ({n / total:.1%})"
                                      for v, n in sorted(s.versions.items())))
    if s.l7_requests:
        lines.append("  waypoint requests (source -> destination, code):")
        for (src, dst, code), n in sorted(s.l7_requests.items()):
            lines.append(f"    {src} -> {dst} {code}: {n}")
    elif not m.waypoint_running:
        lines.append(f"  no waypoint: {m.waypoint_note or 'not running'}")
    refused = sum(int(n) for name, st in m.app.items() if name.startswith("catalog")
                  for code, n in dict(st.get("codes", {})).items() if str(code).startswith("5"))
    if refused:
        lines.append(f"  catalog answered 5xx {refused} times; the load generator saw "
                     f"{s.shop_total - s.shop_ok} failed requests"
                     + (" (the route's retries)" if m.waypoint_running else ""))
    for name, st in sorted(m.app.items()):
        codes = st.get("codes", {})
        if isinstance(codes, dict) and codes:
            lines.append(f"  {name} answered: " + ", ".join(f"{c} x{n}"
                                                          for c, n in sorted(codes.items())))
    lines.append("")
    lines.append("Latency (client side, answered requests)")
    if s.latency is None:
        lines.append("  no answered request")
    else:
        la = s.latency
        lines.append(f"  {s.shop_ok} of {s.shop_total} answered; p50 {la.p50:.1f} ms, "
                     f"p90 {la.p90:.1f} ms, p99 {la.p99:.1f} ms, max {la.max:.1f} ms")
    if s.shop_errors:
        lines.append("  failures: " + ", ".join(f"{k} x{n}" for k, n in
                                                sorted(s.shop_errors.items())))
    lines.append("")
    lines.append("Checks (measurement against configuration)")
    for c in s.checks:
        lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    lines.append("")
    bad = [c for c in s.checks if not c.ok]
    lines.append("Result: the measurements agree with the configuration" if not bad else
                 f"Result: {len(bad)} contradiction(s) between what was configured and what "
                 "was measured")
    return lines


def group_counts(results: Iterable[RequestResult]) -> dict[str, int]:
    """Live-view helper: answered / failed / per version."""
    c: defaultdict[str, int] = defaultdict(int)
    for r in results:
        c["total"] += 1
        if 200 <= r.status < 300:
            c["ok"] += 1
            if r.version:
                c[r.version] += 1
        elif r.status:
            c["http_error"] += 1
        else:
            c["no_answer"] += 1
    return dict(c)
