"""Inbound plaintext capture on 15006: authorize (no identity; STRICT refuses), then deliver."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from typing import Any

from ztunnel.accesslog import ConnectionRecord, log_connection
from ztunnel.authz import ConnectionInfo, evaluate
from ztunnel.listeners._base import (
    ProxyContext,
    TcpAcceptor,
    addr_str,
    connect,
    listener_socket,
    onward_socket,
    reset_close,
)
from ztunnel.relay import RelayHandle, relay
from ztunnel.snapshot import ZTUNNEL_PORTS, Workload

INBOUND_PLAIN_PORT = 15006


class InboundPlainListener(TcpAcceptor):
    """Plaintext TCP to the workload from outside the mesh, TPROXY'd to :15006."""

    def __init__(
        self,
        ctx: ProxyContext,
        workload: Workload,
        netns: str | None,
        *,
        host: str = "0.0.0.0",
        port: int = INBOUND_PLAIN_PORT,
        sock: socket.socket | None = None,
    ) -> None:
        self.workload_uid = workload.uid
        self.netns = netns
        self._workload = workload
        if sock is None:
            sock = listener_socket(netns, host, port)
        name = f"inbound-plain {workload.namespace}/{workload.name}"
        super().__init__(sock, ctx, self._handle, name)

    async def _handle(self, client: socket.socket, peer: Any) -> None:
        ctx = self.ctx
        start = time.monotonic()
        dst_ip, dst_port = client.getsockname()[:2]
        src_ip = peer[0]
        snap = ctx.snapshot
        wl = snap.workload_by_uid(self.workload_uid) or self._workload
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
            denied = replace(rec, error=reason, denied=True)
            ctx.metrics.connection_denied(denied)
            log_connection(denied)
            return
        info = ConnectionInfo(None, src_ip, wl, dst_port, dst_ip)
        decision = evaluate(snap, info)
        if not decision.allowed:
            reset_close(client)
            denied = replace(rec, error=decision.reason, denied=True)
            ctx.metrics.connection_denied(denied)
            log_connection(denied)
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
        done = replace(rec, sent=sent, received=received, error=error,
                       duration_ms=(time.monotonic() - start) * 1000)
        ctx.metrics.connection_closed(done)
        log_connection(done)
