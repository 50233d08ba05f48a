"""Prometheus metrics with Istio's names and labels, served on 15020 (/metrics)."""

from __future__ import annotations

import socket

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from ztunnel.accesslog import ConnectionRecord
from ztunnel.listeners._http import HttpListener, Request, Response, bind_tcp

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


def _principal(identity: str) -> str:
    return identity if identity.startswith("spiffe://") else "unknown"


class ZtunnelMetrics:
    """The process's metrics; a registry of its own so several instances can coexist in tests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", LABELS,
            registry=self.registry,
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", LABELS,
            registry=self.registry,
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent by the client (request direction)", LABELS,
            registry=self.registry,
        )
        self.received = Counter(
            "istio_tcp_received_bytes", "Bytes received by the client (response direction)",
            LABELS, registry=self.registry,
        )
        self.active = Gauge(
            "ambit_ztunnel_active_connections", "Connections currently proxied",
            registry=self.registry,
        )
        self.workloads = Gauge(
            "ambit_ztunnel_workloads", "Workloads with listeners up on this node",
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "ambit_ztunnel_config_reloads", "Configuration snapshots applied", ["result"],
            registry=self.registry,
        )
        self.accept_errors = Counter(
            "ambit_ztunnel_accept_errors", "accept() failures (EMFILE and the like)", ["errno"],
            registry=self.registry,
        )
        # label values (LABELS order) -> the series, per connection counter: `labels()`
        # validates and locks on every call, a dict lookup does not
        self._series: dict[Counter, dict[tuple[str, ...], Counter]] = {
            self.opened: {}, self.closed: {}, self.sent: {}, self.received: {},
        }

    @staticmethod
    def labels_for(rec: ConnectionRecord, response_flags: str = "-") -> dict[str, str]:
        return {
            "reporter": "source" if rec.direction == "outbound" else "destination",
            "source_workload": rec.src_workload,
            "source_workload_namespace": rec.src_namespace,
            "source_principal": _principal(rec.src_identity),
            "destination_workload": rec.dst_workload,
            "destination_workload_namespace": rec.dst_namespace,
            "destination_principal": _principal(rec.dst_identity),
            "destination_service": rec.dst_service,
            "request_protocol": "tcp",
            "response_flags": response_flags,
            "connection_security_policy": rec.security,
        }

    @staticmethod
    def _label_values(rec: ConnectionRecord, response_flags: str = "-") -> tuple[str, ...]:
        """`labels_for` as a tuple in LABELS order."""
        return (
            "source" if rec.direction == "outbound" else "destination",
            rec.src_workload,
            rec.src_namespace,
            _principal(rec.src_identity),
            rec.dst_workload,
            rec.dst_namespace,
            _principal(rec.dst_identity),
            rec.dst_service,
            "tcp",
            response_flags,
            rec.security,
        )

    def _child(self, metric: Counter, values: tuple[str, ...]) -> Counter:
        series = self._series[metric]
        child = series.get(values)
        if child is None:
            child = series[values] = metric.labels(*values)
        return child

    def connection_opened(self, rec: ConnectionRecord) -> None:
        self._child(self.opened, self._label_values(rec)).inc()
        self.active.inc()

    def connection_closed(self, rec: ConnectionRecord) -> None:
        values = self._label_values(rec)
        if rec.error is None:
            self._child(self.closed, values).inc()
        else:
            self._child(self.closed, self._label_values(rec, "CONNECTION_ERROR")).inc()
        self._child(self.sent, values).inc(rec.sent)
        self._child(self.received, values).inc(rec.received)
        self.active.dec()

    def connection_denied(self, rec: ConnectionRecord) -> None:
        """A connection refused by policy: counted opened and closed with flag DENY."""
        values = self._label_values(rec, "DENY")
        self._child(self.opened, values).inc()
        self._child(self.closed, values).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsListener(HttpListener):
    """GET /metrics or /stats/prometheus: the Prometheus text exposition."""

    def __init__(
        self,
        metrics: ZtunnelMetrics,
        *,
        host: str = "0.0.0.0",
        port: int = 15020,
        sock: socket.socket | None = None,
    ) -> None:
        self.metrics = metrics
        super().__init__(sock if sock is not None else bind_tcp(host, port), self._handle)

    async def _handle(self, req: Request) -> Response:
        if req.path not in ("/metrics", "/stats/prometheus"):
            return Response(404, b"try /metrics or /stats/prometheus\n")
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"use GET\n")
        return Response(200, self.metrics.render(), CONTENT_TYPE_LATEST)
