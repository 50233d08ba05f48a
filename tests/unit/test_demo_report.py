"""The demo's summary and contradiction checks over synthetic measurements.

Metrics and access-log lines are produced by ztunnel's own metrics and access-log
code, so the parsers read exactly what the proxies write.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace

import pytest
import structlog

from config.demo import report
from config.demo.view import LiveState, plain_line
from ztunnel.accesslog import ConnectionRecord, log_connection
from ztunnel.listeners.metrics import ZtunnelMetrics

TD = "spiffe://cluster.local/ns/shop/sa/"
LEGACY_IP = "10.244.1.4"


def _rec(src: str, dst: str, *, src_ns: str = "shop", dst_ns: str = "shop",
         security: str = "mutual_tls", direction: str = "inbound",
         src_sa: str | None = None, dst_sa: str | None = None) -> ConnectionRecord:
    return ConnectionRecord(
        direction=direction, src="10.244.1.2:40000", dst="10.244.2.2:8080",
        src_workload=src, src_namespace=src_ns,
        src_identity=TD + (src_sa or src) if security == "mutual_tls" else "unknown",
        dst_workload=dst, dst_namespace=dst_ns, dst_identity=TD + (dst_sa or dst),
        security=security, sent=100, received=300)


def _metrics(*conns: tuple[ConnectionRecord, int],
             denied: tuple[ConnectionRecord, int] | None = None) -> tuple[report.Sample, ...]:
    m = ZtunnelMetrics()
    for rec, n in conns:
        for _ in range(n):
            m.connection_opened(rec)
            m.connection_closed(rec)
    if denied is not None:
        rec, n = denied
        for _ in range(n):
            m.connection_denied(replace(rec, denied=True))
    return tuple(report.parse_metrics(m.render().decode()))


def _good_tcp(via_waypoint: bool = True, mtls: str = "mutual_tls",
              inventory: int = 200) -> tuple[report.Sample, ...]:
    conns = [(_rec("loadgen", "frontend", security=mtls), 200),
             (_rec("catalog-v1", "inventory", dst_sa="inventory", src_sa="catalog"),
              inventory)]
    if via_waypoint:
        # As ztunnel reports the waypoint: no workload, known by its certificate only.
        conns += [(_rec("frontend", "unknown", dst_ns="unknown", dst_sa="waypoint",
                        direction="outbound"), 200),
                  (_rec("unknown", "catalog-v1", src_sa="waypoint", dst_sa="catalog"), 180),
                  (_rec("unknown", "catalog-v2", src_sa="waypoint", dst_sa="catalog"), 20)]
    else:
        conns += [(_rec("frontend", "catalog-v1", dst_sa="catalog"), 200)]
    legacy = _rec("client", "frontend", src_ns="legacy", security="none")
    return _metrics(*conns, denied=(legacy, 40))


def _results(n: int, v1: int, *, failed: int = 0, t0: float = 1000.0
             ) -> tuple[report.RequestResult, ...]:
    out = []
    for i in range(n):
        if i < failed:
            out.append(report.RequestResult(t0 + i, 502, 30.0, version=None))
        else:
            out.append(report.RequestResult(t0 + i, 200, 10.0 + i % 50,
                                             version="v1" if i - failed < v1 else "v2"))
    return tuple(out)


def _legacy(n: int, answered: int = 0) -> tuple[report.RequestResult, ...]:
    return tuple(report.RequestResult(1000.0 + i, 200 if i < answered else 0, 1.0,
                                      error=None if i < answered else "ConnectionResetError")
                 for i in range(n))


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """structlog configured as ztunnel configures it, writing to a buffer."""
    old = structlog.get_config()
    buf = io.StringIO()
    structlog.configure(processors=[structlog.processors.add_log_level,
                                    structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(file=buf),
                        cache_logger_on_first_use=False)
    try:
        yield buf
    finally:
        structlog.configure(**old)


def _denials(buf: io.StringIO, n: int, src_ip: str = LEGACY_IP) -> tuple[report.Denial, ...]:
    for i in range(n):
        log_connection(ConnectionRecord("inbound", f"{src_ip}:{41000 + i}", "10.244.1.3:8080",
                                        dst_workload="frontend", dst_namespace="shop",
                                        error="denied: plaintext connection ... (STRICT)",
                                        denied=True))
    # A completed connection in the same log is not a denial.
    log_connection(_rec("loadgen", "frontend"))
    return tuple(report.parse_denials("n1", buf.getvalue().splitlines()))


def _measure(access_log: io.StringIO, **over: object) -> report.Measurements:
    m = report.Measurements(
        duration_s=8, shop=_results(200, 180), legacy=_legacy(40), legacy_ip=LEGACY_IP,
        tcp=_good_tcp(), denials=_denials(access_log, 40), waypoint_running=True,
        waypoint_note="running")
    return replace(m, **over)  # type: ignore[arg-type]


def _failed(s: report.Summary) -> dict[str, str]:
    return {c.name: c.detail for c in s.checks if not c.ok}


def test_measurements_that_agree_pass_every_check(access_log: io.StringIO) -> None:
    m = _measure(access_log)
    s = report.summarise(m, report.Expectations())
    assert _failed(s) == {}
    assert s.ok
    assert s.v1_share == pytest.approx(0.9)
    assert len(s.legacy_denials) == 40
    text = "\n".join(report.render(s, m))
    for section in report.SECTIONS:
        assert f"\n{section}" in text
    assert "cluster.local/ns/shop/sa/loadgen" in text
    assert "Result: the measurements agree" in text


def test_edges_carry_both_principals_and_prefer_the_destination_report() -> None:
    edges = {(e.source, e.destination): e for e in report.edges(_good_tcp())}
    e = edges[("loadgen", "frontend")]
    assert e.connections == 200 and e.reporter == "destination"
    assert e.source_principals == (TD + "loadgen",)
    assert e.destination_principals == (TD + "frontend",)
    assert e.security == ("mutual_tls",)
    assert (e.bytes_sent, e.bytes_received) == (200 * 100, 200 * 300)
    # The hop to the waypoint was only reported by the source side; the waypoint is
    # named after its certificate (shop/waypoint) since no workload has its address.
    to_wp = edges[("frontend", "waypoint")]
    assert to_wp.reporter == "source" and to_wp.destination_ns == "shop"
    assert edges[("waypoint", "catalog-v1")].source_principals == (TD + "waypoint",)
    assert edges[("client", "frontend")].denied == 40
    assert edges[("client", "frontend")].connections == 0


def test_an_answered_legacy_request_is_a_contradiction(access_log: io.StringIO) -> None:
    s = report.summarise(_measure(access_log, legacy=_legacy(40, answered=1)),
                         report.Expectations())
    assert "1 of 40 requests from legacy were answered" in _failed(s)["legacy denied"]


def test_legacy_failing_without_a_ztunnel_denial_is_a_contradiction(
        access_log: io.StringIO) -> None:
    other = _denials(access_log, 5, src_ip="10.244.9.9")
    s = report.summarise(_measure(access_log, denials=other), report.Expectations())
    assert "no ztunnel logged a denial" in _failed(s)["legacy denied"]
    s = report.summarise(_measure(access_log, legacy=()), report.Expectations())
    assert "made no attempt" in _failed(s)["legacy denied"]


def test_a_plaintext_meshed_edge_is_a_contradiction(access_log: io.StringIO) -> None:
    s = report.summarise(_measure(access_log, tcp=_good_tcp(mtls="none")),
                         report.Expectations())
    failed = _failed(s)
    assert "loadgen -> frontend (none)" in failed["mTLS on every meshed edge"]
    assert "loadgen -> frontend" in failed["both identities on meshed edges"]


@pytest.mark.parametrize(("v1", "ok"), [(180, True), (162, True), (194, True), (150, False),
                                        (196, False), (100, False)])
def test_v1_share_must_be_within_80_to_97_percent(access_log: io.StringIO, v1: int,
                                                  ok: bool) -> None:
    s = report.summarise(_measure(access_log, shop=_results(200, v1)), report.Expectations())
    assert ("v1/v2 split" not in _failed(s)) is ok


def test_too_few_requests_cannot_confirm_the_split(access_log: io.StringIO) -> None:
    s = report.summarise(_measure(access_log, shop=_results(30, 27)), report.Expectations())
    assert "too few" in _failed(s)["v1/v2 split"]


def test_an_edge_without_traffic_is_a_contradiction(access_log: io.StringIO) -> None:
    s = report.summarise(_measure(access_log, tcp=_good_tcp(inventory=0)),
                         report.Expectations())
    assert set(_failed(s)) == {"traffic catalog -> inventory"}


def test_frontend_to_catalog_counts_directly_or_through_the_waypoint(
        access_log: io.StringIO) -> None:
    for via in (True, False):
        s = report.summarise(_measure(access_log, tcp=_good_tcp(via_waypoint=via)),
                             report.Expectations())
        assert "traffic frontend -> catalog" not in _failed(s)


def test_failed_shop_requests_beyond_the_budget_are_a_contradiction(
        access_log: io.StringIO) -> None:
    s = report.summarise(_measure(access_log, shop=_results(200, 180, failed=3)),
                         report.Expectations())
    assert "shop requests succeed" not in _failed(s)
    s = report.summarise(_measure(access_log, shop=_results(200, 170, failed=10)),
                         report.Expectations())
    assert "10 of 200 failed" in _failed(s)["shop requests succeed"]
    assert s.shop_errors == {"HTTP 502": 10}


def test_a_missing_waypoint_is_a_contradiction_unless_turned_off(
        access_log: io.StringIO) -> None:
    m = _measure(access_log, waypoint_running=False, waypoint_note="exit status 2",
                 shop=_results(200, 100), tcp=_good_tcp(via_waypoint=False))
    failed = _failed(report.summarise(m, report.Expectations()))
    assert failed["waypoint running"] == "exit status 2"
    assert "v1/v2 split" in failed
    s = report.summarise(m, report.Expectations(waypoint=False))
    assert _failed(s) == {}
    one_version = replace(m, shop=_results(200, 200))
    assert "both catalog versions serve" in _failed(
        report.summarise(one_version, report.Expectations(waypoint=False)))


def test_parsers_skip_what_they_cannot_read() -> None:
    assert report.parse_metrics("this is { not prometheus") == []
    lines = [json.dumps({"t": 1.0, "status": 200, "ms": 3.5, "version": "v2"}), "{half",
             json.dumps({"status": 200})]
    assert report.parse_results(lines) == [report.RequestResult(1.0, 200, 3.5, "", "v2")]
    assert report.parse_denials("n1", ['{"event": "connection denied"', "plain text"]) == []


def test_percentiles_and_latency() -> None:
    values = [float(i) for i in range(1, 101)]
    assert report.percentile(values, 50) == 50
    assert report.percentile(values, 99) == 99
    assert report.percentile(values, 100) == 100
    la = report.latency([report.RequestResult(0, 200, v) for v in values]
                        + [report.RequestResult(0, 0, 9999.0)])
    assert la is not None and (la.count, la.p50, la.max) == (100, 50, 100)
    assert report.latency([report.RequestResult(0, 503, 1.0)]) is None


def test_plain_progress_line() -> None:
    line = plain_line(LiveState(elapsed=5, duration=8, shop=list(_results(10, 8, failed=1)),
                                legacy=list(_legacy(4)), edges=report.edges(_good_tcp())))
    assert "shop 9/10 answered" in line
    assert "v1 89%" in line
    assert "legacy 4 attempts, 0 answered" in line


def test_live_panel_renders_the_edges() -> None:
    from rich.console import Console

    from config.demo.view import View

    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None).print(View.panel(LiveState(
        elapsed=9, duration=8, shop=list(_results(10, 8)), edges=report.edges(_good_tcp()),
        waypoint="running")))
    text = buf.getvalue()
    assert "8/8 s" in text
    assert "sa/loadgen" in text
    assert "legacy/client" in text


def test_waypoint_requests_are_grouped_by_backend_service(access_log: io.StringIO) -> None:
    text = "\n".join([
        "# TYPE istio_requests_total counter",
        'istio_requests_total{reporter="waypoint",source_workload="frontend",'
        'destination_workload="catalog",destination_service_name="catalog-v1",'
        'response_code="200"} 171',
        'istio_requests_total{reporter="waypoint",source_workload="frontend",'
        'destination_workload="catalog",destination_service_name="catalog-v2",'
        'response_code="503"} 2',
        'istio_requests_total{reporter="waypoint",source_workload="unknown",'
        'source_principal="cluster.local/ns/shop/sa/loadgen",'
        'destination_workload="frontend",response_code="200"} 200',
        ""])
    l7 = report.l7_requests(report.parse_metrics(text))
    assert l7 == {("frontend", "catalog-v1", "200"): 171, ("frontend", "catalog-v2", "503"): 2,
                  ("loadgen", "frontend", "200"): 200}
    m = _measure(access_log, l7=tuple(report.parse_metrics(text)))
    lines = report.render(report.summarise(m, report.Expectations()), m)
    assert "    frontend -> catalog-v2 503: 2" in lines


@pytest.mark.parametrize("waypoint", [True, False])
def test_demo_manifests_are_valid_resources(waypoint: bool) -> None:
    from config.demo.runner import NODES, VIPS, render_manifests
    from config.resources import parse_resource
    from config.validate import load_text

    values = {f"{k}_vip": ip for k, ip in VIPS.items()}
    for i, names in enumerate(NODES, start=1):
        for j, name in enumerate(names, start=2):
            key = name.replace("-", "_")
            values.update({f"{key}_ip": f"10.244.{i}.{j}", f"{key}_node": f"n{i}",
                           f"{key}_netns": f"demo-{name}"})
    docs = load_text(render_manifests(values, waypoint=waypoint), "demo")
    kinds = [parse_resource(d.obj).key.kind for d in docs]
    assert kinds.count("WorkloadEntry") == 6 and kinds.count("Service") == 5
    assert {"PeerAuthentication", "AuthorizationPolicy"} <= set(kinds)
    assert ("HTTPRoute" in kinds) is waypoint and ("Gateway" in kinds) is waypoint
