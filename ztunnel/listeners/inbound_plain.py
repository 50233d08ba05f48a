"""Inbound plaintext capture on 15006: authorize (no identity; STRICT refuses), then deliver."""

from __future__ import annotations

import socket
import time
from typing import Any

from ztunnel.accesslog import ConnectionRecord
from ztunnel.authz import ConnectionInfo, evaluate
from ztunnel.listeners._base import (
    WorkloadTcpListener,
    addr_str,
    connect,
    onward_socket,
    record_closed,
    record_denied,
    reset_close,
)
from ztunnel.relay import RelayHandle, relay
from ztunnel.snapshot import ZTUNNEL_PORTS

INBOUND_PLAIN_PORT = 15006


class InboundPlainListener(WorkloadTcpListener):
    """Plaintext TCP to the workload from outside the mesh, TPROXY'd to :15006."""

    kind = "inbound-plain"
    default_host = "0.0.0.0"
    default_port = INBOUND_PLAIN_PORT

    async def _handle(self, client: socket.socket, peer: Any) -> None:
        ctx = self.ctx
        start = time.monotonic()
        dst_ip, dst_port = client.getsockname()[:2]
        src_ip = peer[0]
        snap = ctx.snapshot
        wl = self.current_workload()
        src_wl = snap.workload_by_ip(src_ip)
        rec = ConnectionRecord(
            direction="inbound",
            src=addr_str(peer),
            dst=addr_str((dst_ip, dst_port)),
            src_workload=src_wl.display_name if src_wl else "unknown",
            src_namespace=src_wl.namespace if src_wl else "unknown",
            dst_workload=wl.display_name,
            dst_namespace=wl.namespace,
            dst_identity=wl.identity,
            hop=f"plaintext {addr_str((dst_ip, dst_port))}",
            security="none",
        )
        if dst_port in ZTUNNEL_PORTS or not wl.accepts_port(dst_port):
            reason = f"port {dst_port} is not served by workload {wl.namespace}/{wl.name}"
            reset_close(client)
            record_denied(ctx, rec, reason)
            return
        info = ConnectionInfo(None, src_ip, wl, dst_port, dst_ip)
        decision = evaluate(snap, info)
        if not decision.allowed:
            reset_close(client)
            record_denied(ctx, rec, decision.reason)
            return
        ctx.metrics.connection_opened(rec)
        error: str | None = None
        sent = received = 0
        try:
            up = onward_socket(self.netns, dst_ip, source_ip=src_ip)
            await connect(up, (dst_ip, dst_port), ctx.limits.connect_timeout)
        except (ConnectionError, OSError) as exc:
            error = str(exc)
            reset_close(client)
        else:
            handle = RelayHandle()
            key = ctx.tracker.add(info, handle.close)
            try:
                result = await relay(client, up, idle_timeout=ctx.limits.idle_timeout,
                                     handle=handle)
            finally:
                ctx.tracker.remove(key)
            sent, received, error = result.sent, result.received, result.error
        record_closed(ctx, rec, start, sent=sent, received=received, error=error)
