"""The waypoint process: HBONE in, HTTP filter chain, HBONE out; config, listeners, drain.

    wp = Waypoint(WaypointOptions(gateway=("app", "wp")), identity=lambda: (cert, bundle))
    wp.set_config(WaypointConfig.from_resources(snapshot, resources, gateway=("app", "wp")))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(wp.run())
        await wp.started()
        ...
        await wp.drain(timeout=5)        # GOAWAY, in-flight requests finish, run() returns

Each HBONE CONNECT carries one client connection to `VIP:port` (or a workload
`IP:port`). The service port's protocol (`appProtocol` / port name) decides how
it is read: HTTP/1.1, HTTP/2 (gRPC included), or TCP proxied as is; an undeclared
port is sniffed (HTTP/2 preface, HTTP/1 request line, else TCP). Every HTTP
request runs `waypoint.chain.plan_request` (authorization, faults, routes, filters,
retries and timeouts, endpoint choice) and is re-originated by `waypoint.upstream`;
`waypoint.telemetry` records it. Config comes from a local manifests file
(`load_local_config`) or the control plane's push stream (`follow_control_plane`).

`identity()` is asked again at every new TLS handshake, inbound (an SNI callback
swaps in the context of the current certificate and roots) and outbound (pooled
HBONE connections opened with a previous certificate get GOAWAY), so a renewal or a
root rotation needs no restart. The source address used for `ipBlocks` and telemetry
is the `forwarded: for=` one only when the peer certificate is the identity of the
workload owning it (`chain.plan_source`); else the peer address. The snapshot names
every enrolled workload (clients in compact form): they are looked up for that and
for the source telemetry labels, but only the workloads the waypoint serves (bound
to it, or behind its services) are destinations (`served_config`). Drain closes idle
HTTP/1.1 connections and sends GOAWAY to HTTP/2 ones; both finish what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from config.resources import Resource, parse_resource
from config.snapshot import MeshIndex
from waypoint.chain import (
    Chain,
    ChainState,
    MirrorPlan,
    RequestPlan,
    build_chain,
    plan_request,
    plan_source,
    plan_tcp,
    port_protocol,
)
from waypoint.http1 import (
    HOP_BY_HOP,
    Conn,
    ConnInfo,
    Draining,
    Exchange,
    connection_tokens,
    pipe,
    serve_http1,
    strip_hop_by_hop,
)
from waypoint.model import Headers, LocalResponse, Response, UpstreamEndpoint, WaypointConfig
from waypoint.resilience import Outcome, PoolLimits
from waypoint.telemetry import (
    OtlpExporter,
    RequestRecord,
    Telemetry,
    TraceContext,
    new_request_id,
    parse_trace,
    source_labels,
    workload_label,
)
from waypoint.upstream import PoolOverflow, Spawn, UpstreamError, Upstreams
from ztunnel import snapshot as zs
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.request import Accept, ConnectRequest, Decision
from ztunnel.hbone.server import HboneServer
from ztunnel.hbone.stream import HboneStream
from ztunnel.identity import Certificate, TrustBundle
from ztunnel.listeners._http import HttpListener, bind_tcp
from ztunnel.listeners._http import Request as AdminRequest
from ztunnel.listeners._http import Response as AdminResponse
from ztunnel.listeners.ready import Readiness, ReadyListener
from ztunnel.tls import cached_server_context, server_context

__all__ = [
    "ConfigError",
    "UpstreamResponse",
    "Waypoint",
    "WaypointOptions",
    "follow_control_plane",
    "load_local_config",
]

log = structlog.get_logger("waypoint")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP1_START = re.compile(rb"^[A-Z]{3,10} ")
#: Envoy's mapping of HTTP statuses to gRPC codes for local answers
#: bound of each per-configuration memo (addresses, label sets)
_MEMO_MAX = 4096
_GRPC_CODE = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
#: request headers the waypoint sets itself on the way upstream
_REPLACED = frozenset({"host", "connection", "upgrade", "traceparent", "x-b3-traceid",
                       "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3",
                       "x-forwarded-proto", "x-request-id"})


class ConfigError(Exception):
    """The waypoint's configuration cannot be used; the message says why."""


class UpstreamResponse(Protocol):
    """An upstream response, HTTP/1.1 or HTTP/2 (see `upstream.H1Response`)."""

    status: int
    headers: Headers
    length: int | None
    upgraded: bytes | None
    conn: Conn
    ended_at_head: bool

    @property
    def trailers(self) -> Headers: ...
    def take_ready(self) -> bytes: ...
    def body_complete(self) -> bool: ...
    def chunks(self) -> AsyncIterator[bytes]: ...
    def finish(self) -> None: ...
    def discard(self) -> None: ...


@dataclass(frozen=True)
class WaypointOptions:
    """What a waypoint process is and where it listens."""

    gateway: tuple[str, str]
    hbone_address: tuple[str, int] = ("0.0.0.0", 15008)
    metrics_address: tuple[str, int] | None = ("0.0.0.0", 15020)
    ready_address: tuple[str, int] | None = ("0.0.0.0", 15021)
    upstream_hbone_port: int = 15008
    otlp_endpoint: str | None = None
    access_log: bool = True
    max_buffered_body: int = 1 << 20  # bodies up to this size are replayable (retries)
    mirror_timeout: float = 10.0
    sniff_timeout: float = 2.0
    max_concurrent_streams: int = 1000


IdentityFn = Callable[[], tuple[Certificate, TrustBundle]]


class Waypoint:
    """One waypoint: owns the HBONE listener, upstreams, telemetry and the current chain."""

    def __init__(
        self,
        options: WaypointOptions,
        identity: IdentityFn,
        *,
        registry: CollectorRegistry | None = None,
        hbone_sock: socket.socket | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self._identity = identity
        self.registry = registry or CollectorRegistry()
        self.exporter = (OtlpExporter(options.otlp_endpoint, resource={
            "k8s.namespace.name": options.gateway[0], "istio.waypoint": options.gateway[1]})
            if options.otlp_endpoint else None)
        self.telemetry = Telemetry(self.registry, exporter=self.exporter,
                                   access_log_enabled=options.access_log)
        self.upstreams = Upstreams(identity, hbone_port=options.upstream_hbone_port)
        self._forwarded_ignored = Counter(
            "ambit_waypoint_forwarded_ignored",
            "HBONE streams whose forwarded source address was not trusted (the peer "
            "certificate is not the identity of the workload owning that address)",
            ["reason"], registry=self.registry)
        self._forwarded_logged: dict[str, float] = {}
        from waypoint.http2 import H2Pool

        self.h2_pool = H2Pool(self.upstreams)
        self.rng = rng or random.Random()
        self.readiness = Readiness("config", "listeners")
        self._state = ChainState()
        self._chain: Chain | None = None
        # per-configuration memos of what every request on a connection would
        # recompute: declared port protocols, source and destination label values
        self._memo_chain: Chain | None = None
        self._proto_memo: dict[tuple[str, int], str | None] = {}
        self._src_memo: dict[tuple[str, str | None], tuple[str, str, str, str, str]] = {}
        self._dst_memo: dict[tuple[str, str, str], tuple[str, ...]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # the whole snapshot (clients too): who owns a source address
        self._sources: zs.Snapshot | None = None
        self._config_event = asyncio.Event()
        self._hbone_sock = hbone_sock
        self._hbone: HboneServer | None = None
        self._listening_ssl: ssl.SSLContext | None = None
        self._serving_ssl: ssl.SSLContext | None = None
        self._serving: tuple[Certificate, TrustBundle] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._started = asyncio.Event()
        self._stop = asyncio.Event()
        self._listeners: list[HttpListener] = []
        self.draining = Draining()
        self.ready_listener: ReadyListener | None = None
        self.metrics_listener: HttpListener | None = None

    # ------------------------------------------------------------------ config

    @property
    def chain(self) -> Chain | None:
        return self._chain

    def set_config(self, config: WaypointConfig) -> None:
        """Swap to a new configuration; requests in flight keep their chain."""
        self._sources = config.snapshot
        config = served_config(config)
        self._chain = build_chain(config, self._state)
        # endpoints no longer in the configuration: drop their idle connections
        keep = {e.key for s in config.snapshot.services for p in s.ports
                for e in config.endpoints(s, p.port)}
        self.upstreams.close_idle(keep)
        self.readiness.mark("config")
        self._config_event.set()
        log.info("config applied", version=config.snapshot.version,
                 services=len(config.snapshot.services), routes=len(config.routes))

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        assert self._hbone is not None, "call after started()"
        return self._hbone.address

    async def started(self) -> None:
        await self._started.wait()

    async def configured(self) -> None:
        """Wait until a configuration has been applied."""
        await self._config_event.wait()

    async def run(self) -> None:
        """Serve until `drain()` / `close()`; every task lives in this TaskGroup."""
        opts = self.options
        self._loop = asyncio.get_running_loop()
        sock = self._hbone_sock or bind_tcp(*opts.hbone_address)
        self._hbone = HboneServer(sock, self._listening_context(), self._identity()[1],
                                  self._on_connect,
                                  max_concurrent_streams=opts.max_concurrent_streams)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg

                def spawn(coro: Coroutine[Any, Any, None]) -> None:
                    tg.create_task(coro)

                self.h2_pool.spawn = spawn
                tg.create_task(self._hbone.run())
                if opts.ready_address is not None:
                    self.ready_listener = ReadyListener(
                        self.readiness, sock=bind_tcp(*opts.ready_address))
                    self._listeners.append(self.ready_listener)
                if opts.metrics_address is not None:
                    self.metrics_listener = HttpListener(bind_tcp(*opts.metrics_address),
                                                         self._metrics)
                    self._listeners.append(self.metrics_listener)
                for lst in self._listeners:
                    tg.create_task(lst.run())
                exporter_task = (tg.create_task(self.exporter.run())
                                 if self.exporter is not None else None)
                await self._hbone.started()
                self.readiness.mark("listeners")
                self._started.set()
                await self._stop.wait()
                self.h2_pool.spawn = None
                self.h2_pool.close()
                for lst in self._listeners:
                    await lst.drain(1.0)
                if exporter_task is not None:
                    exporter_task.cancel()
        finally:
            self._tg = None
            if self.exporter is not None:
                with contextlib.suppress(Exception):
                    await self.exporter.flush()
            await self.upstreams.close()

    def _listening_context(self) -> ssl.SSLContext:
        """The context the listener is created with, for good. Its SNI callback runs
        for every ClientHello (with or without SNI) and switches the handshake to the
        context of the current certificate and trust bundle, so a renewed certificate
        or a rotated root applies to the next client without restarting the listener
        (as ztunnel's inbound listener does)."""
        cert, trust = self._identity()
        ctx = server_context(cert, trust)  # not the cached one: it gets a callback
        ctx.sni_callback = self._select_context
        self._serving = (cert, trust)
        self._listening_ssl = self._serving_ssl = ctx
        return ctx

    def _current_context(self) -> ssl.SSLContext:
        """The server context of the identity's current certificate and roots."""
        cert, trust = self._identity()
        assert self._serving is not None and self._serving_ssl is not None
        old_cert, old_trust = self._serving
        if cert is old_cert and trust is old_trust:
            return self._serving_ssl
        if cert == old_cert and trust == old_trust:
            self._serving = (cert, trust)  # equal content: skip the comparison next time
            return self._serving_ssl
        ctx = cached_server_context(cert, trust)
        if cert != old_cert:
            log.info("serving renewed certificate", identity=str(cert.identity),
                     serial=cert.describe()["serial"], not_after=cert.not_after)
        if trust != old_trust:
            log.info("verifying clients with the new trust bundle",
                     roots=len(trust.roots()))
        self._serving, self._serving_ssl = (cert, trust), ctx
        return ctx

    def _select_context(self, tls: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                        listening: ssl.SSLContext) -> None:
        """SNI callback: serve the current certificate, verify against the current roots."""
        try:
            ctx = self._current_context()
        except (OSError, ValueError, ssl.SSLError, SystemExit) as e:
            assert self._serving is not None
            cert = self._serving[0]
            log.warning("cannot load the renewed certificate or trust bundle; serving the "
                        "previous ones: check the files the identity is read from",
                        identity=str(cert.identity), not_after=cert.not_after, error=str(e))
            return
        if ctx is not listening:
            tls.context = ctx

    async def drain(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Stop taking connections (GOAWAY), let requests finish, then stop `run()`."""
        if self.ready_listener is not None:
            self.ready_listener.draining = True
        # idle HTTP/1.1 connections close, busy ones after a reply; HTTP/2 clients get
        # GOAWAY and their connections close once their streams are done
        self.draining.start()
        if self._hbone is not None:
            await self._hbone.drain(timeout)
        self._stop.set()

    def close(self) -> None:
        if self._hbone is not None:
            self._hbone.close()
        self._stop.set()

    async def _metrics(self, req: AdminRequest) -> AdminResponse:
        if req.path not in ("/metrics", "/stats/prometheus"):
            return AdminResponse(404, b"try /metrics or /stats/prometheus\n")
        return AdminResponse(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ HBONE in

    async def _on_connect(self, creq: ConnectRequest) -> Decision:
        return Accept(serve=functools.partial(self._serve_stream, creq))

    def _source_ip(self, chain: Chain, creq: ConnectRequest) -> str:
        """The source address to judge the stream by: `forwarded: for=` only when the
        peer's certificate is the identity of the workload owning that address."""
        peer = str(creq.peer_identity)
        src = plan_source(self._sources or chain.config.snapshot,
                          forwarded_for=creq.forwarded_for,
                          peer_ip=creq.peer_addr[0], peer_identity=peer)
        if src.ignored is not None:
            self._forwarded_ignored.labels(src.reason).inc()
            if src.reason != "identity_mismatch":
                # a source the snapshot does not know (not enrolled, or a snapshot
                # that lags behind): not a sign of forgery
                log.debug("forwarded source address not in the snapshot; using the peer "
                          "address", claimed=src.ignored, peer_identity=peer)
                return src.ip
            now = time.monotonic()
            if now - self._forwarded_logged.get(peer, -60.0) >= 10.0:  # at most every 10 s
                if len(self._forwarded_logged) > 4096:
                    self._forwarded_logged.clear()
                self._forwarded_logged[peer] = now
                log.warning("ignoring the forwarded source address: the client's certificate "
                            "is not the identity of the workload owning it (a forged header, "
                            "or a snapshot that lags behind); using the peer address",
                            claimed=src.ignored, reason=src.reason, peer_identity=peer,
                            peer_address=creq.peer_addr[0])
        return src.ip

    async def _serve_stream(self, creq: ConnectRequest, stream: HboneStream) -> None:
        chain = self._chain
        if chain is None:
            await asyncio.wait_for(self._config_event.wait(), 10.0)
            chain = self._chain
            assert chain is not None
        info = ConnInfo(dest_ip=creq.host, dest_port=creq.port,
                        source_ip=self._source_ip(chain, creq),
                        source_principal=str(creq.peer_identity),
                        peer_address=f"{creq.peer_addr[0]}:{creq.peer_addr[1]}")
        proto = self._declared_protocol(chain, creq.host, creq.port)
        if proto == "tcp":
            await self._serve_tcp(stream, info, b"")
            return
        first = b""
        try:
            async with asyncio.timeout(self.options.sniff_timeout if not proto else None):
                first = await stream.read()
                # a first segment too short to tell (part of the HTTP/2 preface): read on
                while first and len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
                    more = await stream.read()
                    if not more:
                        break
                    first += more
        except TimeoutError:
            # a server-first protocol on an undeclared port (or a client that stalled
            # inside the HTTP/2 preface): carry it as TCP with what arrived
            await self._serve_tcp(stream, info, first)
            return
        if not first:
            return
        if first.startswith(H2_PREFACE):
            from waypoint.http2 import serve_http2
            await serve_http2(stream, self.handle, info=info, initial=first,
                              draining=self.draining)
        elif proto or _HTTP1_START.match(first):
            await serve_http1(stream, self.handle, info=info, initial=first,
                              draining=self.draining)
        else:
            await self._serve_tcp(stream, info, first)

    # ------------------------------------------------------------------ TCP

    async def _serve_tcp(self, stream: HboneStream, info: ConnInfo, first: bytes) -> None:
        chain = self._chain
        assert chain is not None
        loop = asyncio.get_running_loop()
        t0, wall = loop.time(), time.time()
        rec = RequestRecord(start_time=wall, duration=0.0, method="", path="",
                            authority=f"{info.dest_ip}:{info.dest_port}", protocol="tcp",
                            status=0, source_address=info.source_ip,
                            source_principal=info.source_principal or "")
        self._source_labels(chain, rec, info.source_ip, info.source_principal)
        plan = plan_tcp(chain, dest_ip=info.dest_ip, dest_port=info.dest_port,
                        source_ip=info.source_ip, source_principal=info.source_principal,
                        now=t0, rng=self.rng)
        if isinstance(plan, LocalResponse):
            rec.status, rec.flags, rec.details = plan.status, plan.flags, plan.details
            stream.reset()
            rec.duration = loop.time() - t0
            self.telemetry.record_tcp(rec)
            return
        ups, limits = self.upstreams, plan.cluster.pool
        try:
            attempt = plan.first
            while True:
                ep = attempt.endpoint
                deadline = loop.time() + ups.connect_timeout  # queued for a slot, too
                try:
                    up = await ups.open_new(ep, limits, deadline=deadline,
                                            source=info.source_ip)
                    result: int | Outcome = 200
                except UpstreamError as e:
                    up, result, rec.details = None, e.outcome, str(e)
                except PoolOverflow as e:
                    rec.status, rec.flags, rec.details = 503, "UO", e.response.details
                    stream.reset()
                    return
                nxt = plan.after_attempt(attempt, result, loop.time(), self.rng)
                if up is not None or nxt is None:
                    break
                attempt = nxt
            self._dest_labels(chain, rec, plan, attempt.endpoint)
            rec.attempts = attempt.number
            if up is None:
                rec.status, rec.flags = 503, "UF"
                stream.reset()
                return
            rec.status = 200
            try:
                sent, received = await pipe(stream, up, first, b"")
            finally:
                ups.disown(up)  # both ways ended (or it was closed): its pool slot is free
            rec.request_bytes, rec.response_bytes = sent, received
        finally:
            plan.release(loop.time())
            rec.duration = loop.time() - t0
            self.telemetry.record_tcp(rec)

    # ------------------------------------------------------------------ HTTP

    def _memos_for(self, chain: Chain) -> bool:
        """Whether the memos may serve `chain` (they are emptied when the current chain
        changes; a request still holding an older chain computes afresh)."""
        if self._memo_chain is not chain:
            if chain is not self._chain:
                return False
            self._memo_chain = chain
            self._proto_memo.clear()
            self._src_memo.clear()
            self._dst_memo.clear()
        return True

    def _declared_protocol(self, chain: Chain, ip: str, port: int) -> str | None:
        """`port_protocol`, memoized per configuration."""
        if not self._memos_for(chain):
            return port_protocol(chain, ip, port)
        memo = self._proto_memo
        key = (ip, port)
        if key in memo:
            return memo[key]
        proto = port_protocol(chain, ip, port)
        if len(memo) < _MEMO_MAX:
            memo[key] = proto
        return proto

    def _source_labels(self, chain: Chain, rec: RequestRecord, ip: str,
                       principal: str | None) -> None:
        key = (ip, principal)
        memo = self._src_memo if self._memos_for(chain) else None
        got = memo.get(key) if memo is not None else None
        if got is None:
            snap = self._sources or chain.config.snapshot
            source_labels(rec, snap.workload_by_ip(ip) if ip else None, principal)
            got = (rec.source_principal, rec.source_workload, rec.source_namespace,
                   rec.source_app, rec.source_version)
            if memo is not None and len(memo) < _MEMO_MAX:
                memo[key] = got
            return
        (rec.source_principal, rec.source_workload, rec.source_namespace, rec.source_app,
         rec.source_version) = got

    def _dest_labels(self, chain: Chain, rec: RequestRecord, plan: RequestPlan,
                     ep: UpstreamEndpoint) -> None:
        b = plan.backend
        key = (b.namespace, b.name, ep.key)
        memo = self._dst_memo if self._memos_for(chain) else None
        got = memo.get(key) if memo is not None else None
        if got is None:
            snap = chain.config.snapshot
            svc = chain.config.service(b.namespace, b.name)
            dest_service = (
                svc.hostname if svc is not None and svc.hostname
                else b.hostname
                or f"{b.name}.{b.namespace}.svc.{snap.dns_domain or 'cluster.local'}")
            w = snap.workload_by_uid(ep.workload_uid)
            got = (dest_service, b.name, b.namespace, ep.key, ep.identity,
                   *((workload_label(w), w.namespace, w.labels.get("app", ""))
                     if w is not None else ("", "", "")))
            if memo is not None and len(memo) < _MEMO_MAX:
                memo[key] = got
        (rec.destination_service, rec.destination_service_name,
         rec.destination_service_namespace, rec.upstream_host, rec.destination_principal,
         rec.destination_workload, rec.destination_namespace, rec.destination_app) = got
        if plan.route:
            rec.route = plan.route
        if plan.policy:
            rec.policy = plan.policy

    async def handle(self, ex: Exchange) -> None:
        """Serve one HTTP request: plan, send upstream (with retries), answer, record."""
        loop = self._loop or asyncio.get_running_loop()
        chain = self._chain
        assert chain is not None
        req = ex.request
        t0 = ex.started_at or loop.time()
        user_agent = request_id = ""
        for k, v in req.headers:
            if k == "content-type":
                if v.startswith("application/grpc"):
                    ex.protocol = "grpc"
            elif k == "user-agent":
                user_agent = v
            elif k == "x-request-id":
                request_id = v
        trace = parse_trace(req.headers)
        rec = RequestRecord(
            start_time=time.time() - (loop.time() - t0), duration=0.0, method=req.method,
            path=req.path, authority=req.authority, protocol=ex.protocol, status=0,
            source_address=req.source_ip, source_principal=req.source_principal or "",
            trace=trace, user_agent=user_agent, request_id=request_id or new_request_id(),
        )
        self._source_labels(chain, rec, req.source_ip, req.source_principal)
        try:
            plan = plan_request(chain, req, loop.time(), self.rng)
            if isinstance(plan, LocalResponse):
                rec.flags, rec.details = plan.flags, plan.details
                await self._answer_local(ex, plan, rec)
                return
            try:
                await self._proxy(ex, chain, plan, rec, trace)
            finally:
                plan.release(loop.time())
        except (ConnectionError, OSError, HboneError) as e:
            rec.details = rec.details or f"downstream: {e}"
            if not rec.flags:
                rec.flags = "DC"
            ex.aborted = True
        except Exception as e:
            log.exception("request_failed", path=req.path)
            rec.details = f"internal error: {e}"
            if not ex.responder.started:
                with contextlib.suppress(Exception):
                    await self._answer_local(ex, LocalResponse(500, b"internal error\n"), rec)
        finally:
            rec.duration = loop.time() - t0
            rec.request_bytes = ex.body.received
            rec.response_bytes = ex.responder.bytes_sent
            self.telemetry.record(rec)

    async def _answer_local(self, ex: Exchange, lr: LocalResponse, rec: RequestRecord) -> None:
        rec.status = lr.status
        if ex.protocol == "grpc":
            code = _GRPC_CODE.get(lr.status, 2)
            rec.grpc_status = str(code)
            msg = lr.body.decode("utf-8", "replace").strip() or f"HTTP {lr.status}"
            headers: Headers = (("content-type", "application/grpc"), ("grpc-status", str(code)),
                       ("grpc-message", msg.replace("\r", " ").replace("\n", " ")))
            await ex.responder.start(200, headers, length=0, end=True)
            return
        await ex.responder.start(lr.status, tuple(lr.headers), length=len(lr.body), end=not lr.body)
        if lr.body:
            await ex.responder.data(lr.body)
        await ex.responder.end()

    def _upstream_h2(self, chain: Chain, ex: Exchange) -> bool:
        declared = self._declared_protocol(chain, ex.request.dest_ip, ex.request.dest_port)
        if declared in ("http2", "grpc"):
            return True
        if declared == "http":
            return False
        return ex.version == "2"

    async def _proxy(self, ex: Exchange, chain: Chain, plan: RequestPlan, rec: RequestRecord,
                     trace: TraceContext) -> None:
        if plan.flags:
            rec.flags = plan.flags
        if plan.fault_delay > 0:
            await asyncio.sleep(plan.fault_delay)
        body: bytes | None = b""
        if not ex.upgrade:
            # a body that arrived with its head is taken without waiting
            body = (ex.body.complete() if ex.body.done
                    and ex.body.received <= self.options.max_buffered_body else None)
            if body is None:
                body = await ex.body.read_all(self.options.max_buffered_body)
        h2 = self._upstream_h2(chain, ex)
        req = plan.request
        # HTTP/1.1 requests had their hop-by-hop headers removed when parsed
        src = (strip_hop_by_hop(req.headers, keep=("te",) if h2 else ())
               if ex.version == "2" else req.headers)
        out = [h for h in src if h[0] not in _REPLACED]
        if ex.upgrade and not h2:
            out += (("connection", "upgrade"), ("upgrade", ex.upgrade))
        out += trace.headers()
        out += (("x-forwarded-proto", req.scheme or "http"), ("x-request-id", rec.request_id))
        headers: Headers = tuple(out)
        if body is not None:
            for m in plan.mirrors:
                if self._tg is not None:
                    self._tg.create_task(self._mirror(m, headers, body, h2))
        if body is not None and not h2:
            # a buffered body over HTTP/1.1: nothing runs beside the exchange
            await self._exchange(ex, chain, plan, rec, trace, headers=headers, body=body,
                                 h2=h2, spawn=_no_spawn, spawned=[])
            return
        spawned: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as tg:

                def spawn(coro: Coroutine[Any, Any, None]) -> None:
                    spawned.append(tg.create_task(coro))

                await self._exchange(ex, chain, plan, rec, trace, headers=headers, body=body,
                                     h2=h2, spawn=spawn, spawned=spawned)
        except* UpstreamError as eg:
            rec.details = str(eg.exceptions[0])

    async def _exchange(self, ex: Exchange, chain: Chain, plan: RequestPlan,
                        rec: RequestRecord, trace: TraceContext, *, headers: Headers,
                        body: bytes | None, h2: bool, spawn: Spawn,
                        spawned: list[asyncio.Task[None]]) -> None:
        """Attempts (with retries) until a response or a final failure, then answer."""
        loop = self._loop or asyncio.get_running_loop()
        req = plan.request
        attempt = plan.first
        resp: UpstreamResponse | None = None
        result: int | Outcome = Outcome.RESET
        while True:
            if attempt.backoff > 0:
                await asyncio.sleep(attempt.backoff)
            payload: bytes | AsyncIterator[bytes] = (
                body if body is not None else ex.body.chunks())
            resp = None
            try:
                resp = await self._send(attempt.endpoint, req, headers, payload,
                                        deadline=attempt.deadline, spawn=spawn, h2=h2,
                                        source=req.source_ip, upgrade=bool(ex.upgrade),
                                        traceparent=trace.traceparent,
                                        pool=plan.cluster.pool)
                result = resp.status
            except UpstreamError as e:
                result = e.outcome
                rec.details = str(e)
            except PoolOverflow as e:  # the attempt is abandoned; release() accounts for it
                rec.flags, rec.details = e.response.flags, e.response.details
                await self._answer_local(ex, e.response, rec)
                return
            now = loop.time()
            nxt = plan.after_attempt(attempt, result, now, self.rng, rtt=now - attempt.started)
            if nxt is None or body is None:
                break
            if resp is not None:
                resp.discard()
            attempt = nxt
        rec.attempts = attempt.number
        self._dest_labels(chain, rec, plan, attempt.endpoint)
        if resp is None:
            assert isinstance(result, Outcome)
            lr = plan.failure_response(result)
            rec.flags = lr.flags
            await self._answer_local(ex, lr, rec)
            return
        try:
            await self._relay_response(ex, plan, resp, rec)
        finally:
            for t in spawned:  # a request body the upstream no longer reads
                t.cancel()

    async def _relay_response(self, ex: Exchange, plan: RequestPlan, resp: UpstreamResponse,
                              rec: RequestRecord) -> None:
        rec.status = status = resp.status
        # one pass: hop-by-hop headers (and those Connection names) and content-length
        # go (the downstream side frames the body itself); grpc-status is noted
        named = connection_tokens(resp.headers)
        kept: list[tuple[str, str]] = []
        for h in resp.headers:
            k = h[0]
            if k in HOP_BY_HOP or k in named or k == "content-length":
                if not (k == "upgrade" and status == 101):
                    continue
            elif k == "grpc-status":
                rec.grpc_status = h[1]
            kept.append(h)
        out: Headers = tuple(kept)
        if plan.response_modifiers:  # ResponseHeaderModifier filters
            r = plan.response(Response(status, out))
            status, out = r.status, r.headers
        if resp.status == 101 and ex.splice is not None:
            await ex.responder.start(101, out, length=None, end=False)
            _, received = await ex.splice(resp.conn, resp.upgraded or b"")
            ex.responder.bytes_sent += received
            rec.response_bytes = received
            return
        if resp.ended_at_head:  # headers only (a gRPC trailers-only answer): one frame
            await ex.responder.start(status, out, length=None, end=True)
            resp.finish()
            return
        try:
            await ex.responder.start(status, out, length=resp.length, end=False,
                                     body=resp.take_ready())
            if not resp.body_complete():  # no async generator for a body already here
                async for chunk in resp.chunks():
                    await ex.responder.data(chunk)
            trailers = resp.trailers
            for k, v in trailers:
                if k == "grpc-status":
                    rec.grpc_status = v
            await ex.responder.end(trailers)
        except (ConnectionError, OSError, HboneError) as e:
            upstream_side = str(e).startswith("upstream")
            rec.flags = "UC" if upstream_side else "DC"  # upstream / downstream went away
            rec.details = str(e)
            resp.discard()
            ex.aborted = True  # the client must not take a cut-off body for a whole one
            raise
        resp.finish()

    def _send(self, ep: Any, req: Any, headers: Headers,
              payload: bytes | AsyncIterator[bytes], *, deadline: float | None,
              spawn: Spawn, h2: bool, source: str, upgrade: bool,
              traceparent: str | None, pool: PoolLimits | None = None
              ) -> Awaitable[UpstreamResponse]:
        """One attempt upstream, HTTP/2 or HTTP/1.1: the client's own awaitable, with no
        coroutine of this dispatch in between."""
        if h2:
            from waypoint.http2 import h2_request
            return h2_request(
                self.upstreams, ep, req, headers, payload, deadline=deadline, spawn=spawn,
                source=source, traceparent=traceparent, pool=self.h2_pool, limits=pool)
        return self.upstreams.h1_request(ep, req, headers, payload, deadline=deadline,
                                         spawn=spawn, source=source, traceparent=traceparent,
                                         upgrade=upgrade, pool=pool)

    async def _mirror(self, m: MirrorPlan, headers: Headers, body: bytes, h2: bool) -> None:
        """Send a copy to a RequestMirror backend; its answer (or failure) is dropped."""
        req = m.request
        host = req.authority
        if host:
            name, sep, port = host.rpartition(":")
            host = f"{name}-shadow:{port}" if sep and port.isdigit() else f"{host}-shadow"
        req = req.with_(authority=host)
        overflow = m.pool.start_request()  # the mirror backend's http2MaxRequests
        if overflow is not None:
            log.info("mirror_dropped", backend=m.backend.key, reason=overflow.details)
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.options.mirror_timeout), asyncio.TaskGroup() as tg:

                def spawn(coro: Coroutine[Any, Any, None]) -> None:
                    tg.create_task(coro)

                resp = await self._send(m.endpoint, req, headers, body,
                                        deadline=loop.time() + self.options.mirror_timeout,
                                        spawn=spawn, h2=h2, source=req.source_ip, upgrade=False,
                                        traceparent=None, pool=m.pool)
                async for _ in resp.chunks():
                    pass
                resp.finish()
        except Exception as e:
            log.info("mirror_failed", backend=m.backend.key, endpoint=m.endpoint.key,
                     reason=str(e) or type(e).__name__)
        finally:
            m.pool.end_request()


def _no_spawn(coro: Coroutine[Any, Any, None]) -> None:
    coro.close()
    raise RuntimeError("no task may start here: the request body is buffered")


# ----------------------------------------------------------------------------- config


def load_local_config(path: str | Path, gateway: tuple[str, str], *,
                      address: str = "", trust_bundle_pem: str = "",
                      version: int = 1) -> WaypointConfig:
    """A waypoint's configuration from a manifests file (multi-document YAML or JSON:
    Namespaces, Services, WorkloadEntries, the Gateway, HTTPRoutes, policies...),
    the same resources the control plane holds. `address` is where this waypoint
    listens (the Gateway's `spec.addresses` otherwise)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}") from e
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML/JSON: {e}") from e
    flat: list[Any] = []
    for d in docs:
        if isinstance(d, list):
            flat.extend(d)
        elif isinstance(d, dict) and d.get("kind") == "List":
            flat.extend(d.get("items", []))
        else:
            flat.append(d)
    resources: list[Resource] = []
    for i, d in enumerate(flat):
        try:
            resources.append(parse_resource(d))
        except Exception as e:
            raise ConfigError(f"{p}: document {i + 1}: {e}") from e
    return config_from_resources(resources, gateway, address=address,
                                 trust_bundle_pem=trust_bundle_pem, version=version)


def served_config(config: WaypointConfig) -> WaypointConfig:
    """`config` with only the workloads the waypoint serves: those bound to it and the
    endpoints of its services. The others in the snapshot are its possible clients
    (known for `forwarded:` checks and source labels), never destinations."""
    snap = config.snapshot
    own = {wp.identity for wp in snap.waypoints
           if (wp.namespace, wp.name) == (config.gateway_namespace, config.gateway_name)}
    backing = {ep.workload_uid for s in snap.services for ep in s.endpoints}
    served = tuple(w for w in snap.workloads
                   if w.uid in backing or (w.waypoint is not None
                                           and (not own or w.waypoint.identity in own)))
    if len(served) == len(snap.workloads):
        return config
    return replace(config, snapshot=replace(snap, workloads=served))


def config_from_resources(resources: Iterable[Resource], gateway: tuple[str, str], *,
                          address: str = "", trust_bundle_pem: str = "",
                          version: int = 1) -> WaypointConfig:
    """The waypoint's view of a set of resources (what a local config file holds)."""
    res = list(resources)
    idx = MeshIndex(waypoint_clients=True)  # the snapshot names its possible clients
    idx.load(res, version)
    if address:
        idx.set_waypoint_address(gateway[0], gateway[1], address)
    elif gateway not in idx.waypoints():
        # a Gateway without spec.addresses: services still bind to it; where other
        # proxies reach this waypoint is not known here (it does not matter to it)
        idx.set_waypoint_address(gateway[0], gateway[1], "0.0.0.0")
    snap = idx.waypoint_snapshot(*gateway)
    if trust_bundle_pem:
        snap = replace(snap, trust_bundle_pem=trust_bundle_pem)
    return WaypointConfig.from_resources(snap, [(r, i) for i, r in enumerate(res)],
                                         gateway=gateway)


async def follow_control_plane(client: Any, waypoint: Waypoint) -> None:
    """Apply every snapshot and resource set the control plane pushes (`PushClient`)."""
    latest: list[Resource] = []

    async def on_resources(resources: list[Resource]) -> None:
        nonlocal latest
        latest = resources

    async def apply(snap: Any) -> None:
        waypoint.set_config(WaypointConfig.from_resources(
            snap, [(r, i) for i, r in enumerate(latest)], gateway=waypoint.options.gateway))

    await client.follow(apply, on_resources=on_resources)
