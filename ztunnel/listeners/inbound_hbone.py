"""Inbound HBONE on 15008 in a workload's netns: mTLS CONNECT, authz, deliver from the client IP."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import replace

from ztunnel.accesslog import ConnectionRecord, log_connection
from ztunnel.authz import ConnectionInfo, evaluate
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.request import Accept, ConnectRequest, Decision, Refuse
from ztunnel.hbone.server import HboneServer
from ztunnel.hbone.stream import HboneStream
from ztunnel.identity import Certificate
from ztunnel.listeners._base import (
    ProxyContext,
    addr_str,
    connect,
    listener_socket,
    log,
    onward_socket,
    record_closed,
    record_denied,
    splice_with_idle_timeout,
)
from ztunnel.plan import InboundReject, plan_inbound
from ztunnel.snapshot import Workload
from ztunnel.tls import server_context

INBOUND_HBONE_PORT = 15008


class InboundHboneListener:
    """The workload's HBONE endpoint; the peer identity comes from its certificate only."""

    def __init__(
        self,
        ctx: ProxyContext,
        workload: Workload,
        netns: str | None,
        cert: Certificate,
        *,
        host: str = "0.0.0.0",
        port: int = INBOUND_HBONE_PORT,
        sock: socket.socket | None = None,
    ) -> None:
        self.ctx = ctx
        self.workload_uid = workload.uid
        self.netns = netns
        self._workload = workload
        if sock is None:
            sock = listener_socket(netns, host, port, transparent=False)
        self.sock = sock
        trust = ctx.require_trust()
        self.cert = cert
        self.trust = trust
        # The server is created with one context for good; every handshake switches to
        # the context of the current certificate and trust bundle (`_select_context`,
        # run for each ClientHello), so a renewed certificate or a rotated root applies
        # to the next client without restarting the listener.
        self._listening_ssl = server_context(cert, trust)
        self._listening_ssl.sni_callback = self._select_context
        self._ssl = self._listening_ssl
        self.server = HboneServer(
            sock, self._listening_ssl, trust, self._handle,
            local_ip_check=lambda ip: ip in self._current().addresses,
        )
        self.address: tuple[str, int] = self.server.address

    def close(self) -> None:
        """Release the socket of a listener that never ran."""
        self.sock.close()

    def refresh_certificate(self) -> bool:
        """Serve the identity manager's current certificate (after renewal) and verify
        clients against the current trust bundle (after a root rotation).

        Returns True when a new context was built. Established connections keep what
        they negotiated. Called on every handshake; cheap when nothing changed.
        """
        cert = self.ctx.identities.cached(self.cert.identity) or self.cert
        trust = self.ctx.trust or self.trust
        cert_changed = cert is not self.cert and cert != self.cert
        trust_changed = trust is not self.trust and trust != self.trust
        if not cert_changed and not trust_changed:
            if trust is not self.trust:
                self.trust = trust  # equal content: skip the comparison next time
            return False
        self._ssl = server_context(cert, trust)
        if cert_changed:
            log.info("serving renewed certificate", identity=str(cert.identity),
                     not_after=cert.not_after)
        if trust_changed:
            log.info("verifying clients with the new trust bundle", identity=str(cert.identity),
                     roots=len(trust.roots()))
        self.cert, self.trust = cert, trust
        return True

    def _select_context(self, tls: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                        listening: ssl.SSLContext) -> None:
        """SNI callback (OpenSSL runs it for every ClientHello, with or without SNI)."""
        try:
            self.refresh_certificate()
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("cannot load the renewed certificate or trust bundle; serving the "
                        "previous ones", identity=str(self.cert.identity), error=str(exc))
        if self._ssl is not listening:
            tls.context = self._ssl

    def _current(self) -> Workload:
        return self.ctx.snapshot.workload_by_uid(self.workload_uid) or self._workload

    async def run(self) -> None:
        await self.server.run()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - listener contract
        await self.server.drain(timeout)

    async def _handle(self, req: ConnectRequest) -> Decision:
        ctx = self.ctx
        start = time.monotonic()
        snap = ctx.snapshot
        wl = self._current()
        src_ip = req.peer_addr[0]
        src_wl = snap.workload_by_ip(src_ip)
        rec = ConnectionRecord(
            direction="inbound",
            src=req.forwarded_for or addr_str(req.peer_addr),
            dst=req.authority,
            src_workload=src_wl.display_name if src_wl else "unknown",
            src_namespace=src_wl.namespace if src_wl else req.peer_identity.namespace,
            src_identity=str(req.peer_identity),
            dst_workload=wl.display_name,
            dst_namespace=wl.namespace,
            dst_identity=wl.identity,
            hop=f"hbone {addr_str(req.local_addr)}",
            security="mutual_tls",
        )
        plan = plan_inbound(snap, req.authority, workload=wl)
        if isinstance(plan, InboundReject):
            record_denied(ctx, rec, plan.reason)
            return Refuse(plan.status, plan.reason)
        info = ConnectionInfo(req.peer_identity, src_ip, wl, plan.port, plan.host)
        decision = evaluate(snap, info)
        if not decision.allowed:
            record_denied(ctx, rec, decision.reason)
            return Refuse(401, decision.reason)
        try:
            up = onward_socket(self.netns, plan.host, source_ip=src_ip)
            await connect(up, (plan.host, plan.port), ctx.limits.connect_timeout)
        except (ConnectionError, OSError) as exc:
            failed = replace(rec, error=str(exc))
            ctx.metrics.connection_opened(failed)
            ctx.metrics.connection_closed(failed)
            log_connection(failed)
            return Refuse(503, str(exc))

        async def serve(stream: HboneStream) -> None:
            ctx.metrics.connection_opened(rec)
            key = ctx.tracker.add(info, lambda reason: stream.reset())
            error: str | None = None
            sent = received = 0
            try:
                received, sent = await splice_with_idle_timeout(
                    stream, up, ctx.limits.idle_timeout
                )
            except HboneError as exc:
                error = str(exc)
            finally:
                ctx.tracker.remove(key)
            record_closed(ctx, rec, start, sent=sent, received=received, error=error)

        return Accept(serve=serve)
