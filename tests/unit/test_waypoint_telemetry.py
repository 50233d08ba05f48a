"""Waypoint telemetry, pure parts: trace context parsing/propagation, labels, OTLP spans."""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from waypoint.telemetry import (
    OtlpExporter,
    RequestRecord,
    Telemetry,
    parse_trace,
    source_labels,
    span_of,
)
from ztunnel import snapshot as zs

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


def test_w3c_traceparent_continues_the_trace_with_a_new_span() -> None:
    t = parse_trace((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                     ("tracestate", "vendor=1")))
    assert t.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert t.parent_span_id == "b7ad6b7169203331"
    assert HEX16.match(t.span_id) and t.span_id != t.parent_span_id
    assert t.sampled and t.tracestate == "vendor=1"
    assert t.traceparent == f"00-{t.trace_id}-{t.span_id}-01"


def test_unsampled_flag_is_kept() -> None:
    t = parse_trace((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),))
    assert not t.sampled and t.traceparent.endswith("-00")


def test_b3_multi_and_single_headers() -> None:
    t = parse_trace((("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", "0020000000000001"),
                     ("x-b3-sampled", "0")))
    assert t.trace_id == "0000000000000000463ac35c9f6413ad" and t.b3 and not t.sampled
    assert t.parent_span_id == "0020000000000001"
    t = parse_trace((("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),))
    assert t.trace_id == "80f198ee56343ba864fe8b2a57d3eff7"
    assert t.parent_span_id == "e457b5a2e4d86bd1" and t.sampled


def test_malformed_or_all_zero_ids_start_a_new_trace() -> None:
    for bad in ("00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-xyz-b7ad6b7169203331-01", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b71692"
                "03331-01", "garbage"):
        t = parse_trace((("traceparent", bad),))
        assert HEX32.match(t.trace_id) and t.parent_span_id == ""


def test_inject_replaces_trace_headers_and_keeps_the_rest() -> None:
    t = parse_trace((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),))
    out = dict(t.inject((("x-b3-spanid", "old"), ("accept", "*/*"))))
    assert out["accept"] == "*/*"
    assert out["x-b3-spanid"] == t.span_id and out["x-b3-parentspanid"] == "b7ad6b7169203331"
    assert out["traceparent"] == t.traceparent
    assert dict(t.headers()) == {k: v for k, v in out.items() if k != "accept"}


@given(st.lists(st.tuples(st.sampled_from(["traceparent", "b3", "x-b3-traceid", "x-b3-spanid",
                                           "x-b3-sampled", "tracestate", "other"]),
                          st.text(max_size=80))))
def test_any_header_values_give_a_valid_context(headers: list[tuple[str, str]]) -> None:
    t = parse_trace(tuple(headers))
    assert HEX32.match(t.trace_id) and t.trace_id != "0" * 32
    assert HEX16.match(t.span_id)
    assert t.parent_span_id == "" or HEX16.match(t.parent_span_id)


def _record(**kw: object) -> RequestRecord:
    base: dict[str, object] = dict(start_time=1_700_000_000.25, duration=0.0125, method="GET",
                                   path="/x", authority="front", protocol="http", status=200)
    base.update(kw)
    return RequestRecord(**base)  # type: ignore[arg-type]


def test_metrics_use_istio_names_and_labels() -> None:
    reg = CollectorRegistry()
    tel = Telemetry(reg, access_log_enabled=False)
    tel.record(_record(source_principal="spiffe://cluster.local/ns/a/sa/b", status=503,
                       flags="UF", request_bytes=10, response_bytes=20,
                       destination_service="front.app.svc.cluster.local"))
    labels = dict(zip(
        ("reporter", "source_principal", "response_code", "response_flags",
         "destination_service"),
        ("waypoint", "cluster.local/ns/a/sa/b", "503", "UF", "front.app.svc.cluster.local"),
        strict=True))
    samples = {s.name: s for m in reg.collect() for s in m.samples
               if all(s.labels.get(k) == v for k, v in labels.items())}
    assert samples["istio_requests_total"].value == 1.0
    assert samples["istio_request_duration_milliseconds_sum"].value == 12.5
    assert samples["istio_request_bytes_sum"].value == 10.0
    assert samples["istio_response_bytes_sum"].value == 20.0


LOADGEN = zs.Workload(uid="load/loadgen", name="loadgen-7f9c", namespace="load",
                      ip="10.2.0.5", node="node-c", service_account="loadgen",
                      labels=zs.FrozenMap({"app": "loadgen", "version": "v3"}),
                      canonical_name="loadgen", trust_domain="cluster.local")


def test_source_labels_name_the_workload_its_identity_proves() -> None:
    reg = CollectorRegistry()
    tel = Telemetry(reg, access_log_enabled=False)
    rec = _record()
    source_labels(rec, LOADGEN, "spiffe://cluster.local/ns/load/sa/loadgen")
    assert (rec.source_workload, rec.source_namespace, rec.source_app, rec.source_version) == (
        "loadgen", "load", "loadgen", "v3")
    values = dict(zip(("source_workload", "source_workload_namespace", "source_principal",
                       "source_app"), tel.label_values(rec)[1:5], strict=True))
    assert values == {"source_workload": "loadgen", "source_workload_namespace": "load",
                      "source_principal": "cluster.local/ns/load/sa/loadgen",
                      "source_app": "loadgen"}
    # another identity at that address: only the namespace its certificate names
    rec = _record()
    source_labels(rec, LOADGEN, "spiffe://cluster.local/ns/other/sa/x")
    assert (rec.source_workload, rec.source_namespace, rec.source_app) == ("", "other", "")
    # no workload at the address
    rec = _record()
    source_labels(rec, None, "spiffe://cluster.local/ns/load/sa/loadgen")
    assert (rec.source_workload, rec.source_namespace) == ("", "load")
    assert tel.label_values(rec)[1] == "unknown"


def test_otlp_span_and_request_body() -> None:
    t = parse_trace((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),))
    span = span_of(_record(status=504, route="app/r"), t)
    assert span["traceId"] == t.trace_id and span["parentSpanId"] == "b7ad6b7169203331"
    assert span["startTimeUnixNano"] == "1700000000250000000"
    assert int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"]) == 12_500_000
    assert span["status"]["code"] == 2  # 5xx is an error
    exp = OtlpExporter("http://127.0.0.1:4318/v1/traces", resource={"k": "v"})
    doc = json.loads(exp.body([span]))
    attrs = doc["resourceSpans"][0]["resource"]["attributes"]
    assert {"key": "service.name", "value": {"stringValue": "waypoint"}} in attrs
    assert doc["resourceSpans"][0]["scopeSpans"][0]["spans"] == [span]


def test_exporter_queue_is_bounded() -> None:
    exp = OtlpExporter("http://127.0.0.1:1/v1/traces", max_queue=2)
    for _ in range(5):
        exp.add({"x": 1})
    assert exp.dropped == 3


def test_exporter_rejects_non_http_urls() -> None:
    try:
        OtlpExporter("grpc://collector:4317")
    except ValueError as e:
        assert "http://" in str(e)
    else:
        raise AssertionError("expected ValueError")
