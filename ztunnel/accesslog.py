"""One structured (structlog JSON) access-log line per proxied connection."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

_log = structlog.get_logger("ztunnel.access")


@dataclass(frozen=True)
class ConnectionRecord:
    """Everything known about one finished (or refused) connection."""

    direction: str  # "outbound" | "inbound"
    src: str  # ip:port of the client
    dst: str  # ip:port the client asked for
    src_workload: str = "unknown"
    src_namespace: str = "unknown"
    src_identity: str = "unknown"  # SPIFFE ID, "unknown" for plaintext
    dst_workload: str = "unknown"
    dst_namespace: str = "unknown"
    dst_identity: str = "unknown"
    dst_service: str = "unknown"
    hop: str = ""  # where ztunnel sent it: "hbone 10.0.2.3:15008", "passthrough", ...
    security: str = "none"  # "mutual_tls" | "none"
    sent: int = 0
    received: int = 0
    duration_ms: float = 0.0
    error: str | None = None
    denied: bool = False


def log_connection(rec: ConnectionRecord) -> None:
    """Emit the access-log line for a connection."""
    _log.info(
        "connection complete" if not rec.denied else "connection denied",
        direction=rec.direction,
        src_addr=rec.src,
        dst_addr=rec.dst,
        src_workload=rec.src_workload,
        src_namespace=rec.src_namespace,
        src_identity=rec.src_identity,
        dst_workload=rec.dst_workload,
        dst_namespace=rec.dst_namespace,
        dst_identity=rec.dst_identity,
        dst_service=rec.dst_service,
        dst_hbone_addr=rec.hop,
        connection_security_policy=rec.security,
        bytes_sent=rec.sent,
        bytes_recv=rec.received,
        duration_ms=round(rec.duration_ms, 3),
        error=rec.error,
    )
