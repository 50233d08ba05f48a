"""Waypoint request metrics as a scrape shows them, and the ids the waypoint draws."""

from __future__ import annotations

import os
import re
import uuid

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics import disable_created_metrics, enable_created_metrics

from waypoint.telemetry import (
    BYTES_BUCKETS,
    DURATION_BUCKETS,
    LABELS,
    RequestRecord,
    Telemetry,
    TraceContext,
    new_request_id,
    parse_trace,
)

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _record(**kw: object) -> RequestRecord:
    base: dict[str, object] = dict(start_time=1_700_000_000.25, duration=0.0125, method="GET",
                                   path="/x", authority="front", protocol="http", status=200)
    base.update(kw)
    return RequestRecord(**base)  # type: ignore[arg-type]


def _records() -> list[RequestRecord]:
    """Requests of several label sets, with durations and sizes on and around bucket bounds."""
    out = []
    durations = (0.0, 0.0005, 0.00051, 0.001, 0.0123, 0.25, 2.5, 4000.0)
    sizes = (0, 1, 2, 10, 999, 1000, 10**8, 10**8 + 1, 3 * 10**9)
    for i in range(40):
        out.append(_record(
            duration=durations[i % len(durations)],
            request_bytes=sizes[i % len(sizes)], response_bytes=sizes[(i * 7) % len(sizes)],
            status=(200, 503, 0, 404)[i % 4], protocol=("http", "grpc")[i % 2],
            grpc_status="14" if i % 6 == 1 else "", flags="UF" if i % 4 == 1 else "",
            source_principal="spiffe://cluster.local/ns/a/sa/b" if i % 3 else "",
            source_workload=("loadgen", "")[i % 2], destination_service="front.app.svc"))
    return out


def _without_created(text: bytes) -> str:
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text.decode())


def test_scrape_is_what_prometheus_client_metrics_would_show() -> None:
    reg = CollectorRegistry()
    tel = Telemetry(reg, access_log_enabled=False)
    ref = CollectorRegistry()
    total = Counter("istio_requests", "Requests handled by the waypoint", LABELS, registry=ref)
    dur = Histogram("istio_request_duration_milliseconds", "Request duration in milliseconds",
                    LABELS, buckets=DURATION_BUCKETS, registry=ref)
    qb = Histogram("istio_request_bytes", "Request body sizes in bytes", LABELS,
                   buckets=BYTES_BUCKETS, registry=ref)
    rb = Histogram("istio_response_bytes", "Response body sizes in bytes", LABELS,
                   buckets=BYTES_BUCKETS, registry=ref)
    for rec in _records():
        tel.record(rec)
        values = tel.label_values(rec)
        total.labels(*values).inc()
        dur.labels(*values).observe(rec.duration * 1000.0)
        qb.labels(*values).observe(rec.request_bytes)
        rb.labels(*values).observe(rec.response_bytes)
    ours = generate_latest(reg)
    # the TCP counters are still prometheus_client's own, with no samples yet
    assert _without_created(ours).startswith(_without_created(generate_latest(ref)))
    assert b"istio_requests_created{" in ours and b"istio_response_bytes_created{" in ours


def test_scrape_counts_buckets_and_sums_per_label_set() -> None:
    reg = CollectorRegistry()
    tel = Telemetry(reg, access_log_enabled=False)
    for ms, size in ((0.4, 0), (0.5, 10), (3.0, 11), (70.0, 5000)):
        tel.record(_record(duration=ms / 1000, request_bytes=size, response_bytes=2 * size))
    tel.record(_record(status=503, duration=0.2, request_bytes=7))
    ok = dict(zip(LABELS, tel.label_values(_record()), strict=True))
    failed = {**ok, "response_code": "503"}

    def value(name: str, labels: dict[str, str]) -> float | None:
        return reg.get_sample_value(name, labels)

    assert value("istio_requests_total", ok) == 4.0
    assert value("istio_requests_total", failed) == 1.0
    assert value("istio_request_duration_milliseconds_count", ok) == 4.0
    assert value("istio_request_duration_milliseconds_sum", ok) == pytest.approx(73.9)
    buckets = {"0.5": 2.0, "1.0": 2.0, "5.0": 3.0, "50.0": 3.0, "100.0": 4.0, "+Inf": 4.0}
    for le, n in buckets.items():
        assert value("istio_request_duration_milliseconds_bucket", {**ok, "le": le}) == n, le
    assert value("istio_request_duration_milliseconds_bucket", {**failed, "le": "100.0"}) == 0.0
    assert value("istio_request_duration_milliseconds_bucket", {**failed, "le": "250.0"}) == 1.0
    assert value("istio_request_bytes_sum", ok) == 5021.0
    assert value("istio_request_bytes_bucket", {**ok, "le": "10.0"}) == 2.0
    assert value("istio_request_bytes_bucket", {**ok, "le": "100.0"}) == 3.0
    assert value("istio_response_bytes_sum", ok) == 10042.0
    assert value("istio_response_bytes_bucket", {**ok, "le": "10000.0"}) == 4.0
    assert value("istio_response_bytes_count", failed) == 1.0
    assert value("istio_request_bytes_sum", failed) == 7.0


def test_created_series_follow_prometheus_client_setting() -> None:
    reg = CollectorRegistry()
    Telemetry(reg, access_log_enabled=False).record(_record())
    disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        assert b"_created" not in generate_latest(reg)
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]
    assert b"istio_request_bytes_created{" in generate_latest(reg)


def test_request_metric_names_are_claimed_in_the_registry() -> None:
    reg = CollectorRegistry()
    Telemetry(reg, access_log_enabled=False)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("istio_requests", "again", registry=reg)
    with pytest.raises(ValueError, match="Duplicated"):
        Telemetry(reg)


def test_label_sets_beyond_the_limit_are_counted_as_overflow() -> None:
    reg = CollectorRegistry()
    tel = Telemetry(reg, access_log_enabled=False, max_series=3)
    for code in (200, 201, 202, 203, 204, 200, 205, 201):
        tel.record(_record(status=code, request_bytes=1))
    totals = {s.labels["response_code"]: s.value for m in reg.collect()
              if m.name == "istio_requests" for s in m.samples
              if s.name == "istio_requests_total"}
    # the first three label sets keep counting; later ones share one series
    assert totals == {"200": 2.0, "201": 2.0, "202": 1.0, "overflow": 3.0}
    overflow = {s.labels["reporter"] for m in reg.collect() for s in m.samples
                if s.labels.get("source_workload") == "overflow"}
    assert overflow == {"waypoint"}
    assert reg.get_sample_value("istio_request_bytes_sum", dict(
        zip(LABELS, ("waypoint",) + ("overflow",) * (len(LABELS) - 1), strict=True))) == 3.0


def test_request_ids_are_version_4_uuids_and_unique() -> None:
    ids = [new_request_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    for s in ids:
        assert UUID4.match(s), s
        u = uuid.UUID(s)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == s
    # all 122 random bits vary
    assert len({s[15] for s in ids}) == 16 and len({s[19] for s in ids}) == 4


def test_new_traces_have_unique_well_formed_ids() -> None:
    traces = [parse_trace((("host", "front"), ("accept", "*/*"))) for _ in range(10000)]
    ids = [t.trace_id for t in traces] + [t.span_id for t in traces]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", t.trace_id) for t in traces)
    assert all(re.fullmatch(r"[0-9a-f]{16}", t.span_id) for t in traces)
    t = traces[0]
    assert (t.parent_span_id, t.sampled, t.b3, t.tracestate) == ("", True, False, "")
    assert parse_trace(()).parent_span_id == ""


def test_trace_headers_for_the_upstream_request() -> None:
    tid, sid, parent = "0af7651916cd43dd8448eb211c80319c", "00f067aa0ba902b7", "b7ad6b7169203331"
    assert TraceContext(tid, sid).headers() == [
        ("traceparent", f"00-{tid}-{sid}-01"), ("x-b3-traceid", tid), ("x-b3-spanid", sid),
        ("x-b3-sampled", "1")]
    assert TraceContext(tid, sid, parent, sampled=False).headers() == [
        ("traceparent", f"00-{tid}-{sid}-00"), ("x-b3-traceid", tid), ("x-b3-spanid", sid),
        ("x-b3-parentspanid", parent), ("x-b3-sampled", "0")]
    assert TraceContext(tid, sid, parent).inject(
        (("b3", "x"), ("accept", "*/*"), ("x-b3-flags", "1"), ("tracestate", "k=v"))) == (
        ("accept", "*/*"), ("tracestate", "k=v"), ("traceparent", f"00-{tid}-{sid}-01"),
        ("x-b3-traceid", tid), ("x-b3-spanid", sid), ("x-b3-parentspanid", parent),
        ("x-b3-sampled", "1"))


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    new_request_id()  # the parent now holds unused random bytes
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, new_request_id().encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        child = os.read(r, 100).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert UUID4.match(child)
    assert child != new_request_id()
