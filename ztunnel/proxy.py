"""The ztunnel process: config source, identities, workload manager, endpoints, drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from ztunnel import sdnotify
from ztunnel.hbone.pool import HboneConnectionPool, PoolKey
from ztunnel.identity import Fetcher, IdentityManager, SpiffeId, TrustBundle
from ztunnel.listeners._base import Limits, ProxyContext, connect, onward_socket
from ztunnel.listeners.admin import AdminListener
from ztunnel.listeners.dns_server import UpstreamResolver, UpstreamServer, set_default_upstream
from ztunnel.listeners.metrics import MetricsListener, ZtunnelMetrics
from ztunnel.listeners.ready import Readiness, ReadyListener
from ztunnel.localconfig import (
    ConfigError,
    LocalCA,
    LocalConfig,
    LocalDocument,
    parse_local_document,
)
from ztunnel.snapshot import Snapshot
from ztunnel.workloads import WorkloadManager, WorkloadPorts

log = structlog.get_logger("ztunnel")

Apply = Callable[[Snapshot], Awaitable[None]]


def _sd(fn: Callable[..., Any], *args: Any) -> Any:
    """Call an sd_notify helper; a broken notify socket is logged, never fatal."""
    try:
        return fn(*args)
    except sdnotify.NotifyError as exc:
        log.warning("systemd notification failed", error=str(exc))
        return None


class ConfigSource(Protocol):
    """Where snapshots and certificates come from (a local file or the control plane)."""

    async def initial(self) -> Snapshot:
        """The first snapshot to run with (raise ConfigError when there is none)."""
        ...

    async def watch(self, apply: Apply) -> None:
        """Call `apply` with every later snapshot; runs until cancelled."""
        ...

    async def fetch_certificate(self, identity: SpiffeId, csr_pem: bytes) -> list[bytes]:
        """Sign a workload CSR (the IdentityManager's fetch hook)."""
        ...

    def trust(self, snapshot: Snapshot) -> TrustBundle | None:
        """The trust bundle to verify peers with."""
        ...


class LocalFileSource:
    """`--local-config FILE`: a snapshot file (reloaded on change) and an optional local CA."""

    def __init__(self, path: str, data_dir: str | None, poll_interval: float = 0.2, *,
                 node: str | None = None) -> None:
        def parse(doc: dict[str, Any], base_dir: str) -> LocalDocument:
            parsed = parse_local_document(doc, base_dir)
            if node is not None and parsed.snapshot.node != node:
                raise ConfigError(
                    f"{path} is the snapshot of node {parsed.snapshot.node!r}, not of this "
                    f"node {node!r}: fix its `node` field or --node"
                )
            return parsed

        # Only documents that pass these checks are applied and persisted as last good.
        self.config = LocalConfig(path, parse, data_dir=data_dir, poll_interval=poll_interval)
        self.ca: LocalCA | None = None

    async def initial(self) -> Snapshot:
        doc = self.config.load()
        self.ca = doc.local_ca
        snap: Snapshot = doc.snapshot
        return snap

    async def watch(self, apply: Apply) -> None:
        async def on_doc(doc: Any) -> None:
            if doc.local_ca is not None:
                self.ca = doc.local_ca
            await apply(doc.snapshot)

        await self.config.watch(on_doc)

    async def fetch_certificate(self, identity: SpiffeId, csr_pem: bytes) -> list[bytes]:
        if self.ca is None:
            raise ConfigError(
                f"no certificate source for {identity}: add `local_ca` (cert and key files) "
                "to the --local-config file, or run with --control-plane"
            )
        return await self.ca.sign(identity, csr_pem)

    def trust(self, snapshot: Snapshot) -> TrustBundle | None:
        if snapshot.trust_bundle_pem:
            return TrustBundle(snapshot.trust_domain, snapshot.trust_bundle_pem.encode())
        if self.ca is not None:
            return TrustBundle(snapshot.trust_domain, self.ca.cert_pem)
        return None


class ControlPlaneSource:
    """`--control-plane HOST:PORT`: join with a token, follow pushed snapshots, sign CSRs.

    The last good snapshot is kept in the data dir by the client and used at start
    when the control plane is unreachable.
    """

    def __init__(self, address: str, node: str, data_dir: str, token: str, *,
                 token_file: str | None = None, discovery_prefix: str | None = None) -> None:
        from pathlib import Path

        from config.push import PushClient

        self.client = PushClient(address, node, Path(data_dir), token=token,
                                 token_file=Path(token_file) if token_file else None)
        self.data_dir = data_dir
        self.discovery_prefix = discovery_prefix
        self._first: asyncio.Future[Snapshot] | None = None
        self._apply: Apply | None = None

    async def initial(self) -> Snapshot:
        saved = self.client.last_snapshot()
        if saved is not None:
            return saved
        await self.client.ensure_joined()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Snapshot] = loop.create_future()

        async def first(snap: Snapshot) -> None:
            if not fut.done():
                fut.set_result(snap)

        task = asyncio.create_task(self.client.follow(first, once=True))
        try:
            async with asyncio.timeout(30):
                return await fut
        except TimeoutError:
            raise ConfigError(
                f"no snapshot from the control plane at {self.client.address} within 30s and "
                f"none saved in {self.data_dir}: is the control plane up?"
            ) from None
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def watch(self, apply: Apply) -> None:
        # Also report the addresses in this host's netns: they place WorkloadEntries
        # that carry no ambit.dev/node annotation on this node.
        from ztunnel.discovery import PREFIX_ENV, AddressDiscovery

        prefix = self.discovery_prefix or os.environ.get(PREFIX_ENV) or None
        discovery = AddressDiscovery(self.client.set_claims, name_prefix=prefix)
        async with asyncio.TaskGroup() as tg:
            scanner = tg.create_task(discovery.run())
            try:
                await self.client.follow(apply)
            finally:
                scanner.cancel()

    async def fetch_certificate(self, identity: SpiffeId, csr_pem: bytes) -> list[bytes]:
        return await self.client.fetch_certificate(identity, csr_pem)

    def trust(self, snapshot: Snapshot) -> TrustBundle | None:
        if snapshot.trust_bundle_pem:
            return TrustBundle(snapshot.trust_domain, snapshot.trust_bundle_pem.encode())
        path = os.path.join(self.data_dir, "trust-bundle.pem")
        if os.path.exists(path):
            with open(path, "rb") as f:
                return TrustBundle(snapshot.trust_domain, f.read())
        return None


@dataclass(frozen=True)
class ProcessPorts:
    """The node-level endpoints (in ztunnel's own netns)."""

    admin: tuple[str, int] = ("127.0.0.1", 15000)
    metrics: tuple[str, int] = ("0.0.0.0", 15020)
    ready: tuple[str, int] = ("0.0.0.0", 15021)


@dataclass
class ZtunnelOptions:
    node: str
    data_dir: str | None = None
    manage_capture: bool = True
    ports: ProcessPorts = field(default_factory=ProcessPorts)
    workload_ports: WorkloadPorts = field(default_factory=WorkloadPorts)
    limits: Limits = field(default_factory=Limits)
    #: the node's DNS upstreams (--dns-upstream); empty: ztunnel's /etc/resolv.conf
    dns_upstream: tuple[UpstreamServer, ...] = ()


class Ztunnel:
    """One node proxy. `run()` owns every task (TaskGroup) until `shutdown()` drains it."""

    def __init__(self, options: ZtunnelOptions, source: ConfigSource) -> None:
        self.options = options
        self.source = source
        self.metrics = ZtunnelMetrics()
        self.readiness = Readiness("config", "workloads")
        self._stop = asyncio.Event()
        self.ctx: ProxyContext | None = None
        self.manager: WorkloadManager | None = None
        self.admin: AdminListener | None = None
        self.metrics_listener: MetricsListener | None = None
        self.ready_listener: ReadyListener | None = None
        self.started = asyncio.Event()
        self.snapshot_applied_at: float | None = None

    def shutdown(self) -> None:
        """Begin the graceful drain (SIGTERM, /quitquitquit)."""
        self._stop.set()

    # ------------------------------------------------------------------ admin views

    def config_dump(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "node": self.options.node,
            "snapshot": ctx.snapshot.to_dict() if ctx else None,
            "workloads": self.manager.describe() if self.manager else [],
            "workload_errors": self.manager.errors if self.manager else {},
            "ready": self.readiness.ready,
            "pending": self.readiness.pending,
        }

    def certs(self) -> list[dict[str, object]]:
        if self.ctx is None:
            return []
        out: list[dict[str, object]] = []
        for st in self.ctx.identities.describe():
            entry = dict(st)
            ident = entry.get("identity")
            cert = self.ctx.identities.cached(SpiffeId.parse(str(ident))) if ident else None
            if cert is not None:
                entry.update(cert.describe())
                entry["expires_in_seconds"] = round(cert.not_after - time.time())
                entry["expires"] = time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.not_after)
                )
            out.append(entry)
        return out

    # ------------------------------------------------------------------ lifecycle

    async def _connect_hbone(self, key: PoolKey) -> Any:
        """HBONE connections leave from the source workload's netns, marked 0x539."""
        assert self.ctx is not None
        if key.src_ip not in self.ctx.netns_by_ip:
            raise OSError(
                f"no netns known for source {key.src_ip}: the workload is not enrolled here"
            )
        netns = self.ctx.netns_by_ip[key.src_ip]
        sock = onward_socket(netns, key.dst[0])
        await connect(sock, key.dst, self.ctx.limits.connect_timeout)
        return sock

    async def apply(self, snapshot: Snapshot) -> None:
        """Swap in a new snapshot: trust, workloads, and close now-denied connections."""
        ctx = self.ctx
        assert ctx is not None and self.manager is not None
        if snapshot.node != self.options.node:
            log.error("snapshot is for another node; ignoring it", snapshot_node=snapshot.node,
                      node=self.options.node)
            self.metrics.config_reloads.labels(result="rejected").inc()
            return
        ctx.snapshot = snapshot
        trust = self.source.trust(snapshot)
        if trust is not None:
            ctx.trust = trust
        self.manager.update(snapshot)
        closed = ctx.tracker.enforce(snapshot)
        self.metrics.config_reloads.labels(result="applied").inc()
        self.snapshot_applied_at = time.time()
        log.info("snapshot applied", version=snapshot.version,
                 workloads=len(snapshot.local_workloads), closed_connections=len(closed))

    async def run(self) -> None:
        opts = self.options
        bound: list[AdminListener | MetricsListener | ReadyListener] = []
        try:
            # Bound first so a port in use fails fast; released if start-up fails after.
            self.admin = AdminListener(self.config_dump, self.certs, self.shutdown,
                                       host=opts.ports.admin[0], port=opts.ports.admin[1])
            bound.append(self.admin)
            self.metrics_listener = MetricsListener(self.metrics, host=opts.ports.metrics[0],
                                                    port=opts.ports.metrics[1])
            bound.append(self.metrics_listener)
            self.ready_listener = ReadyListener(self.readiness, host=opts.ports.ready[0],
                                                port=opts.ports.ready[1])
            bound.append(self.ready_listener)
            snapshot = await self.source.initial()
            if snapshot.node != opts.node:
                raise ConfigError(
                    f"the snapshot is for node {snapshot.node!r} but this is --node "
                    f"{opts.node!r}"
                )
        except BaseException:
            for listener in bound:
                listener.close()
            raise
        fetch: Fetcher = self.source.fetch_certificate
        identities = IdentityManager(fetch)
        pool = HboneConnectionPool(self._connect_hbone,
                                   connect_timeout=opts.limits.connect_timeout)
        self.ctx = ProxyContext(
            node=opts.node, snapshot=snapshot, metrics=self.metrics, identities=identities,
            pool=pool, trust=self.source.trust(snapshot), limits=opts.limits,
        )
        # One resolver for every workload's DNS proxy (names the mesh does not own).
        upstream = UpstreamResolver(opts.dns_upstream)
        set_default_upstream(upstream)
        self.manager = WorkloadManager(self.ctx, manage_capture=opts.manage_capture,
                                       ports=opts.workload_ports, data_dir=opts.data_dir)
        self.readiness.mark("config")
        self.metrics.config_reloads.labels(result="applied").inc()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.shutdown)
            loop.add_signal_handler(signal.SIGINT, self.shutdown)
        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(identities.run()),
                tg.create_task(self.source.watch(self.apply)),
            ]
            # Not in `background`: systemd's watchdog must keep hearing from us for the
            # whole drain (which may outlast WatchdogSec=), until the process exits.
            notifier = tg.create_task(self._track_readiness())
            endpoints = [self.admin, self.metrics_listener, self.ready_listener]
            for ep in endpoints:
                tg.create_task(ep.run())
            manager_task = tg.create_task(self.manager.run())
            self.started.set()
            log.info("ztunnel started", node=opts.node, workloads=len(snapshot.local_workloads),
                     admin=self.admin.address, metrics=self.metrics_listener.address,
                     dns_upstreams=[str(s) for s in upstream.servers]
                     or "none: forwarding to the resolver each client asked")
            await self._stop.wait()
            log.info("draining", timeout=opts.limits.drain_timeout)
            self.ready_listener.draining = True
            _sd(sdnotify.stopping, "draining connections")
            for t in background:
                t.cancel()
            await self.manager.drain(opts.limits.drain_timeout)
            await pool.drain(1.0)
            manager_task.cancel()
            for ep in endpoints:
                await ep.drain(1.0)
            notifier.cancel()
        await upstream.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
        log.info("ztunnel stopped")

    async def _track_readiness(self) -> None:
        """Keep /healthz/ready current; tell systemd (Type=notify) once ready, ping its
        watchdog when one is configured. Runs through the drain, until the process ends."""
        assert self.manager is not None
        notified = False
        interval = _sd(sdnotify.watchdog_interval)
        last_ping = 0.0
        while True:
            self.readiness.mark("workloads", self.manager.ready)
            if self.readiness.ready and not notified and not self._stop.is_set():
                notified = True
                _sd(sdnotify.ready, f"serving {len(self.manager.proxies)} workloads")
            now = time.monotonic()
            if interval and now - last_ping >= interval:
                last_ping = now
                _sd(sdnotify.watchdog)
            await asyncio.sleep(0.1)
