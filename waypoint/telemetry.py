"""Waypoint telemetry: Istio request metrics, access log, trace propagation, OTLP export.

    tel = Telemetry(registry, exporter=OtlpExporter("http://collector:4318/v1/traces"))
    trace = tel.trace_for(request_headers)          # parse W3C traceparent or B3
    headers = trace.inject(headers)                 # upstream headers: child span ids
    tel.record(RequestRecord(...))                  # metrics + access log + span

Metrics use Istio's names and labels (`istio_requests_total`,
`istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`,
reporter `waypoint`), so existing dashboards work. `parse_trace` / `TraceContext` are
pure; `source_labels` names the client from the workload owning the source address
(the control plane gives waypoints every enrolled workload, in compact form) when the
client's certificate is that workload's identity. `OtlpExporter.run()` is the one
task (owned by the server's TaskGroup) that posts batches of spans as OTLP/HTTP JSON.

The request metrics are plain numbers per label set (`RequestMetrics`), turned into
Prometheus samples only when scraped; trace, span and request ids (`new_request_id`)
are slices of one buffered os.urandom read (`ztunnel.randomid`). Both keep the
per-request cost small.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client import metrics as _prom_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from waypoint.model import value
from ztunnel import snapshot as zs
from ztunnel.randomid import random_hex

__all__ = [
    "DURATION_BUCKETS",
    "OtlpExporter",
    "RequestRecord",
    "Telemetry",
    "TraceContext",
    "new_request_id",
    "parse_trace",
    "source_labels",
]

access_log = structlog.get_logger("waypoint.access")
log = structlog.get_logger("waypoint")

#: Istio's default buckets for istio_request_duration_milliseconds
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                    60000, 300000, 600000, 1800000, 3600000)
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

_HEX = frozenset("0123456789abcdef")


def _hex(s: str, n: int) -> bool:
    return len(s) == n and set(s) <= _HEX and s.strip("0") != ""


#: the UUID variant digit (RFC 9562 `10xx`) that keeps a random digit's two low bits
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def new_request_id() -> str:
    """A random (version 4) UUID in its text form, e.g. for `x-request-id`."""
    h = random_hex(16)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"

#: the trace headers `inject` replaces
_PROPAGATED = frozenset(("traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                         "x-b3-sampled", "x-b3-flags", "b3"))
#: the request headers `parse_trace` reads
_TRACE_HEADERS = frozenset(("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
                            "x-b3-sampled"))


@value
class TraceContext:
    """The trace a request belongs to and the waypoint's own span in it.

    `parent_span_id` is the caller's span ("" when the waypoint starts the trace);
    `span_id` is the waypoint's span, the parent of the upstream request. `b3` says
    whether the caller used B3 headers (they are then propagated too).
    """

    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_span_id: str = ""
    sampled: bool = True
    b3: bool = False
    tracestate: str = ""

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def headers(self) -> list[tuple[str, str]]:
        """The trace headers for the upstream request (W3C and B3)."""
        tid, sid = self.trace_id, self.span_id
        if self.sampled:
            tp, smp = f"00-{tid}-{sid}-01", "1"
        else:
            tp, smp = f"00-{tid}-{sid}-00", "0"
        if self.parent_span_id:
            return [("traceparent", tp), ("x-b3-traceid", tid), ("x-b3-spanid", sid),
                    ("x-b3-parentspanid", self.parent_span_id), ("x-b3-sampled", smp)]
        return [("traceparent", tp), ("x-b3-traceid", tid), ("x-b3-spanid", sid),
                ("x-b3-sampled", smp)]

    def inject(self, headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """`headers` (lower-case names) with trace headers for the upstream request.

        W3C `traceparent` always (with `tracestate` kept), and B3 (`x-b3-*`) as well,
        so either kind of tracer downstream joins the same trace.
        """
        out = [(k, v) for k, v in headers if k not in _PROPAGATED]
        out += self.headers()
        return tuple(out)


def parse_trace(headers: Sequence[tuple[str, str]]) -> TraceContext:
    """The caller's trace from W3C `traceparent`, else B3 (multi or single header);
    a new trace when there is none (or it is malformed). The waypoint's span id is new."""
    for k, _ in headers:
        if k in _TRACE_HEADERS:
            break
    else:  # the common case: no trace headers at all
        ids = random_hex(24)
        return TraceContext(ids[:32], ids[32:])
    tp = b3 = tid = sid = sampled = tracestate = None
    for k, v in headers:
        if k == "traceparent":
            tp = v
        elif k == "tracestate":
            tracestate = v
        elif k == "b3":
            b3 = v
        elif k == "x-b3-traceid":
            tid = v.lower()
        elif k == "x-b3-spanid":
            sid = v.lower()
        elif k == "x-b3-sampled":
            sampled = v
    span = random_hex(8)
    if tp is not None:
        parts = tp.strip().lower().split("-")
        if (len(parts) >= 4 and len(parts[0]) == 2 and parts[0] != "ff"
                and _hex(parts[1], 32) and _hex(parts[2], 16) and len(parts[3]) == 2):
            flags = int(parts[3], 16) if set(parts[3]) <= _HEX else 1
            return TraceContext(parts[1], span, parts[2], bool(flags & 1),
                                b3=tid is not None or b3 is not None,
                                tracestate=tracestate or "")
    if b3 is not None:
        parts = b3.strip().lower().split("-")
        if len(parts) >= 2 and _hex(parts[0].rjust(32, "0"), 32) and _hex(parts[1], 16):
            smp = parts[2] != "0" if len(parts) >= 3 else True
            return TraceContext(parts[0].rjust(32, "0"), span, parts[1], smp, b3=True)
    if tid is not None and sid is not None and _hex(tid.rjust(32, "0"), 32) and _hex(sid, 16):
        return TraceContext(tid.rjust(32, "0"), span, sid, sampled != "0", b3=True)
    return TraceContext(random_hex(16), span)


@dataclass(slots=True)
class RequestRecord:
    """Everything known about one finished request, for metrics, logs and spans."""

    start_time: float  # wall clock (time.time()) when the request head arrived
    duration: float  # seconds until the response ended
    method: str
    path: str
    authority: str
    protocol: str  # "http" | "grpc" | "tcp"
    status: int  # 0 when the client went away before any response
    flags: str = ""
    request_bytes: int = 0
    response_bytes: int = 0
    source_address: str = ""
    source_principal: str = ""
    source_workload: str = ""
    source_namespace: str = ""
    source_app: str = ""
    source_version: str = ""
    destination_service: str = ""
    destination_service_name: str = ""
    destination_service_namespace: str = ""
    destination_workload: str = ""
    destination_namespace: str = ""
    destination_principal: str = ""
    destination_app: str = ""
    upstream_host: str = ""
    route: str = ""
    policy: str = ""
    details: str = ""
    attempts: int = 0
    grpc_status: str = ""
    user_agent: str = ""
    request_id: str = ""
    trace: TraceContext | None = None


#: labels that carry a workload's version, most specific first (Istio's order)
VERSION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


def workload_label(w: zs.Workload) -> str:
    """The `*_workload` label value of a workload: its canonical name, else its `app`
    label, else its name."""
    return w.canonical_name or w.labels.get("app", "") or w.name


def source_labels(rec: RequestRecord, workload: zs.Workload | None, principal: str | None) -> None:
    """Fill the source labels of `rec`.

    `workload` owns the request's source address in the snapshot (None: no workload
    does). It names the client only when the client's certificate (`principal`) is
    that workload's identity, so an address claim cannot borrow another workload's
    name; otherwise only the namespace of `principal` is known.
    """
    if principal:
        rec.source_principal = principal
    if workload is not None and (not principal or principal == workload.identity):
        rec.source_workload = workload_label(workload)
        rec.source_namespace = workload.namespace
        rec.source_app = workload.labels.get("app", "")
        rec.source_version = next(
            (workload.labels[k] for k in VERSION_LABELS if k in workload.labels), "")
        if not rec.source_principal:
            rec.source_principal = workload.identity
    elif principal and "/ns/" in principal:
        rec.source_namespace = principal.split("/ns/", 1)[1].split("/", 1)[0]


#: the series `RequestMetrics` keeps at most; see there
MAX_SERIES = 10000
#: the label value (all but `reporter`) of the series that counts requests beyond MAX_SERIES
OVERFLOW = "overflow"

# A series is one flat list: the request count, the three sums, the creation time,
# then the (non-cumulative) bucket counts of each histogram, `+Inf` last.
_COUNT, _DUR_SUM, _REQ_SUM, _RESP_SUM, _CREATED = range(5)
_DUR0 = 5
_REQ0 = _DUR0 + len(DURATION_BUCKETS) + 1
_RESP0 = _REQ0 + len(BYTES_BUCKETS) + 1
_SERIES_LEN = _RESP0 + len(BYTES_BUCKETS) + 1


class RequestMetrics:
    """The four Istio request metrics, kept as plain numbers per label set.

    `observe` is the per-request path: a dict lookup, three `bisect`s and a few
    additions (no locks: the waypoint records and is scraped on one event loop).
    `collect` is a prometheus_client collector: registered in a registry, a scrape
    shows what `Counter("istio_requests", ...)` and three `Histogram`s with the same
    labels and buckets would (`_total`, cumulative `_bucket` up to `+Inf`, `_count`,
    `_sum`, and `_created` unless prometheus_client's created series are disabled).

    Series never go away (a counter that vanished would read as a reset). Beyond
    `max_series` label sets, requests with a new label set are counted in one series
    whose labels are all `overflow` (but `reporter`), with a warning logged once: the
    series already shown keep counting and the totals over all series stay right.
    """

    def __init__(self, reporter: str, max_series: int = MAX_SERIES) -> None:
        self.reporter = reporter
        self.max_series = max_series
        self.series: dict[tuple[str, ...], list[float]] = {}
        self._overflow = (reporter,) + (OVERFLOW,) * (len(LABELS) - 1)

    def _new_series(self, values: tuple[str, ...]) -> list[float]:
        if len(self.series) >= self.max_series:
            values = self._overflow
            s = self.series.get(values)
            if s is not None:
                return s
            log.warning("metric_series_limit", limit=self.max_series,
                        detail="requests with new label sets are counted with "
                               f"labels {OVERFLOW!r}")
        s = [0.0] * _SERIES_LEN
        s[_CREATED] = time.time()
        self.series[values] = s
        return s

    def observe(self, values: tuple[str, ...], duration_ms: float, request_bytes: int,
                response_bytes: int) -> None:
        """One request with label values `values` (in `LABELS` order)."""
        s = self.series.get(values)
        if s is None:
            s = self._new_series(values)
        s[_COUNT] += 1
        s[_DUR_SUM] += duration_ms
        s[_DUR0 + bisect_left(DURATION_BUCKETS, duration_ms)] += 1
        s[_REQ_SUM] += request_bytes
        s[_REQ0 + bisect_left(BYTES_BUCKETS, request_bytes)] += 1
        s[_RESP_SUM] += response_bytes
        s[_RESP0 + bisect_left(BYTES_BUCKETS, response_bytes)] += 1

    def describe(self) -> Iterator[Metric]:
        yield Metric("istio_requests", _REQUESTS_HELP, "counter")
        for name, doc, _, _, _ in _HISTOGRAMS:
            yield Metric(name, doc, "histogram")

    def collect(self) -> Iterator[Metric]:
        # prometheus_client's switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics)
        created = bool(getattr(_prom_metrics, "_use_created", True))
        series = [(dict(zip(LABELS, k, strict=True)), s) for k, s in list(self.series.items())]
        m = Metric("istio_requests", _REQUESTS_HELP, "counter")
        for labels, s in series:
            m.samples.append(Sample("istio_requests_total", labels, s[_COUNT]))
            if created:
                m.samples.append(Sample("istio_requests_created", labels, s[_CREATED]))
        yield m
        for name, doc, bounds, first, sum_at in _HISTOGRAMS:
            m = Metric(name, doc, "histogram")
            bucket, count, total, made = name + "_bucket", name + "_count", name + "_sum", \
                name + "_created"
            for labels, s in series:
                acc = 0.0
                for i, le in enumerate(bounds):
                    acc += s[first + i]
                    m.samples.append(Sample(bucket, {**labels, "le": le}, acc))
                m.samples.append(Sample(count, labels, acc))
                m.samples.append(Sample(total, labels, s[sum_at]))
                if created:
                    m.samples.append(Sample(made, labels, s[_CREATED]))
            yield m


_REQUESTS_HELP = "Requests handled by the waypoint"
#: the labels of Istio's TCP metrics (the request ones but protocol, code and gRPC
#: status), and their positions in `LABELS`
_TCP_LABELS = tuple(k for k in LABELS if k not in (
    "request_protocol", "response_code", "grpc_response_status"))
_TCP_INDEX = tuple(LABELS.index(k) for k in _TCP_LABELS)


def _le(bounds: Sequence[float]) -> tuple[str, ...]:
    """The `le` label values of buckets with upper bounds `bounds`, then `+Inf`."""
    go: Callable[[float], str] = floatToGoString  # as prometheus_client's Histogram
    return (*(go(b) for b in bounds), "+Inf")


#: name, help, `le` label values, first bucket index, sum index
_HISTOGRAMS = (
    ("istio_request_duration_milliseconds", "Request duration in milliseconds",
     _le(DURATION_BUCKETS), _DUR0, _DUR_SUM),
    ("istio_request_bytes", "Request body sizes in bytes", _le(BYTES_BUCKETS), _REQ0, _REQ_SUM),
    ("istio_response_bytes", "Response body sizes in bytes", _le(BYTES_BUCKETS), _RESP0,
     _RESP_SUM),
)


class Telemetry:
    """Istio request metrics in a registry, one access log line and one span per request."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        exporter: OtlpExporter | None = None,
        access_log_enabled: bool = True,
        reporter: str = "waypoint",
        max_series: int = MAX_SERIES,
    ) -> None:
        self.registry = registry
        self.exporter = exporter
        self.access_log_enabled = access_log_enabled
        self.reporter = reporter
        self.metrics = RequestMetrics(reporter, max_series)
        registry.register(self.metrics)
        def tcp_counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, _TCP_LABELS, registry=registry)

        self.tcp_opened = tcp_counter("istio_tcp_connections_opened",
                                      "TCP connections through the waypoint")
        self.tcp_closed = tcp_counter("istio_tcp_connections_closed",
                                      "TCP connections through the waypoint that ended")
        self.tcp_sent = tcp_counter("istio_tcp_sent_bytes",
                                    "Bytes sent to the client on TCP connections")
        self.tcp_received = tcp_counter("istio_tcp_received_bytes",
                                        "Bytes received from the client on TCP connections")

    def label_values(self, rec: RequestRecord) -> tuple[str, ...]:
        """The metric label values of a record, in `LABELS` order."""
        return (
            self.reporter,
            rec.source_workload or "unknown",
            rec.source_namespace or "unknown",
            (rec.source_principal or "unknown").removeprefix("spiffe://"),
            rec.source_app or "unknown",
            rec.destination_workload or "unknown",
            rec.destination_namespace or "unknown",
            (rec.destination_principal or "unknown").removeprefix("spiffe://"),
            rec.destination_app or "unknown",
            rec.destination_service or "unknown",
            rec.destination_service_name or "unknown",
            rec.destination_service_namespace or "unknown",
            rec.protocol,
            str(rec.status),
            rec.grpc_status or ("-" if rec.protocol != "grpc" else "unknown"),
            rec.flags or "-",
            "mutual_tls",
        )

    def record_tcp(self, rec: RequestRecord) -> None:
        """A finished TCP connection (a port that is not HTTP): Istio's TCP metrics and
        an access log line (`request_bytes` from the client, `response_bytes` to it)."""
        values = self.label_values(rec)
        labels = tuple(values[i] for i in _TCP_INDEX)
        self.tcp_opened.labels(*labels).inc()
        self.tcp_closed.labels(*labels).inc()
        self.tcp_received.labels(*labels).inc(rec.request_bytes)
        self.tcp_sent.labels(*labels).inc(rec.response_bytes)
        if self.access_log_enabled:
            access_log.info(
                "connection", protocol="tcp", response_flags=rec.flags or "-",
                duration_ms=round(rec.duration * 1000.0, 3),
                bytes_received=rec.request_bytes, bytes_sent=rec.response_bytes,
                src_addr=rec.source_address, src_identity=rec.source_principal or None,
                src_workload=rec.source_workload or None,
                src_namespace=rec.source_namespace or None,
                dst_addr=rec.authority, dst_service=rec.destination_service or None,
                dst_workload=rec.destination_workload or None,
                dst_identity=rec.destination_principal or None,
                upstream_host=rec.upstream_host or None, details=rec.details or None,
                error=rec.details if rec.status != 200 else None,
            )

    def record(self, rec: RequestRecord) -> None:
        """Count, time, log and (when exporting) trace one finished request."""
        self.metrics.observe(self.label_values(rec), rec.duration * 1000.0, rec.request_bytes,
                             rec.response_bytes)
        if self.access_log_enabled:
            access_log.info(
                "request",
                start=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.start_time))
                + f".{int(rec.start_time % 1 * 1000):03d}Z",
                method=rec.method,
                path=rec.path,
                authority=rec.authority,
                protocol=rec.protocol,
                response_code=rec.status,
                response_flags=rec.flags or "-",
                duration_ms=round(rec.duration * 1000.0, 3),
                bytes_received=rec.request_bytes,
                bytes_sent=rec.response_bytes,
                src_addr=rec.source_address,
                src_identity=rec.source_principal or None,
                src_workload=rec.source_workload or None,
                src_namespace=rec.source_namespace or None,
                src_version=rec.source_version or None,
                dst_service=rec.destination_service or None,
                dst_workload=rec.destination_workload or None,
                dst_identity=rec.destination_principal or None,
                upstream_host=rec.upstream_host or None,
                route=rec.route or None,
                attempts=rec.attempts,
                details=rec.details or None,
                grpc_status=rec.grpc_status or None,
                user_agent=rec.user_agent or None,
                request_id=rec.request_id or None,
                trace_id=rec.trace.trace_id if rec.trace else None,
            )
        if self.exporter is not None and rec.trace is not None and rec.trace.sampled:
            self.exporter.add(span_of(rec, rec.trace))


# ----------------------------------------------------------------------------- OTLP


def _attr(key: str, value: str | int) -> dict[str, Any]:
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


def span_of(rec: RequestRecord, trace: TraceContext) -> dict[str, Any]:
    """One OTLP JSON span (server kind) for a finished request."""
    start_ns = round(rec.start_time * 1e6) * 1000  # microseconds: what a float holds exactly
    end_ns = start_ns + round(rec.duration * 1e9)
    attrs = [
        _attr("http.request.method", rec.method),
        _attr("url.path", rec.path),
        _attr("server.address", rec.authority),
        _attr("http.response.status_code", rec.status),
        _attr("network.protocol.name", rec.protocol),
        _attr("istio.response_flags", rec.flags or "-"),
        _attr("istio.source_principal", rec.source_principal or "unknown"),
        _attr("istio.source_workload", rec.source_workload or "unknown"),
        _attr("istio.source_namespace", rec.source_namespace or "unknown"),
        _attr("istio.destination_service", rec.destination_service or "unknown"),
        _attr("upstream.address", rec.upstream_host or ""),
    ]
    if rec.route:
        attrs.append(_attr("istio.route", rec.route))
    span: dict[str, Any] = {
        "traceId": trace.trace_id,
        "spanId": trace.span_id,
        "name": f"{rec.destination_service or rec.authority}:{rec.method} {rec.path}",
        "kind": 2,  # SPAN_KIND_SERVER
        "startTimeUnixNano": str(start_ns),
        "endTimeUnixNano": str(end_ns),
        "attributes": attrs,
        "status": {"code": 2 if rec.status == 0 or rec.status >= 500 else 0},
    }
    if trace.parent_span_id:
        span["parentSpanId"] = trace.parent_span_id
    return span


@dataclass
class OtlpExporter:
    """Posts spans as OTLP/HTTP JSON (`ExportTraceServiceRequest`) to `url` in batches.

    `add` never blocks and drops spans beyond `max_queue` (counted in `dropped`);
    `run()` sends a batch every `interval` seconds or once `batch_size` spans wait.
    Only `http://` URLs (a collector next to the waypoint or a local agent).
    """

    url: str
    service_name: str = "waypoint"
    interval: float = 1.0
    batch_size: int = 512
    max_queue: int = 8192
    timeout: float = 5.0
    resource: Mapping[str, str] = field(default_factory=dict)
    dropped: int = 0
    exported: int = 0
    _queue: list[dict[str, Any]] = field(default_factory=list)
    _wake: asyncio.Event | None = None

    def __post_init__(self) -> None:
        u = urlsplit(self.url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"OTLP endpoint {self.url!r} must be an http://HOST:PORT/PATH URL "
                             "(e.g. http://127.0.0.1:4318/v1/traces)")
        self._host = u.hostname
        self._port = u.port or 80
        self._path = u.path or "/v1/traces"

    def add(self, span: dict[str, Any]) -> None:
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue.append(span)
        if len(self._queue) >= self.batch_size and self._wake is not None:
            self._wake.set()

    def body(self, spans: list[dict[str, Any]]) -> bytes:
        attrs = [_attr("service.name", self.service_name)]
        attrs += [_attr(k, v) for k, v in sorted(self.resource.items())]
        doc = {"resourceSpans": [{
            "resource": {"attributes": attrs},
            "scopeSpans": [{"scope": {"name": "ambit.waypoint"}, "spans": spans}],
        }]}
        return json.dumps(doc, separators=(",", ":")).encode()

    async def flush(self) -> None:
        """Send what is queued now (one POST per batch); failures drop the batch."""
        while self._queue:
            batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
            try:
                await self._post(self.body(batch))
                self.exported += len(batch)
            except (OSError, TimeoutError, ValueError) as e:
                self.dropped += len(batch)
                log.warning("otlp_export_failed", url=self.url, spans=len(batch),
                            reason=str(e) or type(e).__name__)

    async def _post(self, body: bytes) -> None:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(self._host, self._port)
            try:
                writer.write(
                    f"POST {self._path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode() + body
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].startswith(b"2"):
            raise ValueError(f"collector answered {status_line.decode(errors='replace').strip()!r}"
                             f": is {self.url} an OTLP/HTTP traces endpoint?")

    async def run(self) -> None:
        """Export until cancelled; a final flush happens in `close`."""
        self._wake = asyncio.Event()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()
