"""Outbound capture on 15001 in a workload's netns: plan each connection, tunnel or pass through."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from ztunnel.accesslog import ConnectionRecord
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.request import forwarded_for, new_traceparent
from ztunnel.identity import IdentityUnavailable, SpiffeId
from ztunnel.listeners._base import (
    WorkloadTcpListener,
    addr_str,
    connect,
    onward_socket,
    record_closed,
    record_denied,
    reset_close,
    splice_with_idle_timeout,
)
from ztunnel.plan import HboneViaWaypoint, Passthrough, Reject, plan_outbound
from ztunnel.relay import relay

OUTBOUND_PORT = 15001
# SPIFFE ID strings of the snapshot -> parsed ids (parsing is the costly part of a lookup)
_SPIFFE_IDS: dict[str, SpiffeId] = {}


def _spiffe_id(uri: str) -> SpiffeId:
    sid = _SPIFFE_IDS.get(uri)
    if sid is None:
        sid = SpiffeId.parse(uri)  # ValueError for a malformed one, as before
        if len(_SPIFFE_IDS) >= 4096:
            _SPIFFE_IDS.clear()
        _SPIFFE_IDS[uri] = sid
    return sid


class OutboundListener(WorkloadTcpListener):
    """TPROXY target for the workload's outgoing TCP; the accepted socket's name is the
    original destination."""

    kind = "outbound"
    default_host = "127.0.0.1"
    default_port = OUTBOUND_PORT

    async def _handle(self, client: socket.socket, peer: Any) -> None:
        ctx = self.ctx
        start = time.monotonic()
        dst_ip, dst_port = client.getsockname()[:2]
        src_ip, src_port = peer[0], peer[1]
        source = self.current_workload()
        snap = ctx.snapshot
        plan = plan_outbound(snap, source, (dst_ip, dst_port), rng=ctx.rng)
        src = addr_str(peer)
        dst = addr_str((dst_ip, dst_port))
        if isinstance(plan, Reject):
            reset_close(client)
            record_denied(ctx, ConnectionRecord(
                direction="outbound", src=src, dst=dst, src_workload=source.display_name,
                src_namespace=source.namespace, src_identity=source.identity,
            ), plan.reason)
            return
        dest = plan.destination
        svc = plan.service
        if isinstance(plan, Passthrough):
            hop, dst_identity = f"passthrough {addr_str(plan.address)}", "unknown"
        else:
            hop = f"hbone {addr_str(plan.address)}" + (
                " (waypoint)" if isinstance(plan, HboneViaWaypoint) else ""
            )
            dst_identity = plan.identity
        # one record, built once (a dataclasses.replace per field costs microseconds)
        rec = ConnectionRecord(
            direction="outbound",
            src=src,
            dst=dst,
            src_workload=source.display_name,
            src_namespace=source.namespace,
            src_identity=source.identity,
            dst_workload=dest.display_name if dest is not None else "unknown",
            dst_namespace=dest.namespace if dest is not None else "unknown",
            dst_identity=dst_identity,
            dst_service=svc.hostname if svc is not None else "unknown",
            hop=hop,
            security="none" if isinstance(plan, Passthrough) else "mutual_tls",
        )
        ctx.metrics.connection_opened(rec)
        error: str | None = None
        sent = received = 0
        if isinstance(plan, Passthrough):
            try:
                up = onward_socket(self.netns, plan.host)
                await connect(up, plan.address, ctx.limits.connect_timeout)
            except (ConnectionError, OSError) as exc:
                error = str(exc)
                reset_close(client)
            else:
                result = await relay(client, up, idle_timeout=ctx.limits.idle_timeout)
                sent, received, error = result.sent, result.received, result.error
            record_closed(ctx, rec, start, sent=sent, received=received, error=error)
            return
        try:
            src_id = _spiffe_id(source.identity)
            # a valid certificate is almost always cached: no timeout scope for that
            cert = ctx.identities.cached(src_id)
            if cert is None:
                async with asyncio.timeout(ctx.limits.connect_timeout):
                    cert = await ctx.identities.get(src_id)
            stream = await ctx.pool.open_stream(
                src_identity_cert=cert,
                trust=ctx.require_trust(),
                dst_identity=_spiffe_id(plan.identity),
                src_ip=src_ip,
                dst=plan.address,
                authority=plan.authority,
                forwarded_for=forwarded_for(src_ip, src_port),
                traceparent=new_traceparent(),
            )
        except (HboneError, IdentityUnavailable, TimeoutError, OSError, RuntimeError) as exc:
            error = (
                f"certificate for {source.identity} not ready in "
                f"{ctx.limits.connect_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else str(exc)
            )
            reset_close(client)
        else:
            try:
                sent, received = await splice_with_idle_timeout(
                    stream, client, ctx.limits.idle_timeout
                )
            except HboneError as exc:
                error = str(exc)
        record_closed(ctx, rec, start, sent=sent, received=received, error=error)
