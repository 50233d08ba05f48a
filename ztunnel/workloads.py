"""Workload manager: listeners (and capture rules) for every enrolled workload on this node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from netsetup.find import resolve_workload_netns
from netsetup.netns import NetnsError, run_in_netns
from ztunnel.identity import SpiffeId
from ztunnel.listeners._base import ProxyContext
from ztunnel.listeners.dns_server import DNS_PORT, DnsListener
from ztunnel.listeners.inbound_hbone import INBOUND_HBONE_PORT, InboundHboneListener
from ztunnel.listeners.inbound_plain import INBOUND_PLAIN_PORT, InboundPlainListener
from ztunnel.listeners.outbound import OUTBOUND_PORT, OutboundListener
from ztunnel.snapshot import Snapshot, Workload

if TYPE_CHECKING:
    from netsetup import capture

log = structlog.get_logger("ztunnel.workloads")


def _capture() -> Any:
    """netsetup.capture, imported on first use: pyroute2 stays off the start-up path, so
    a restarted ztunnel opens its listeners (behind the rules that stayed) sooner."""
    from netsetup import capture as module

    return module

RETRY_DELAY = 1.0

Listener = OutboundListener | InboundPlainListener | InboundHboneListener | DnsListener
ENROLLED_FILE = "enrolled-netns.json"


@dataclass(frozen=True)
class WorkloadPorts:
    """Listener ports inside each workload netns (tests may move them)."""

    outbound: int = OUTBOUND_PORT
    inbound_plain: int = INBOUND_PLAIN_PORT
    inbound_hbone: int = INBOUND_HBONE_PORT
    dns: int = DNS_PORT


MIGRATE_REQ_SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"


def _enable_request_migration() -> str | None:
    """Set net.ipv4.tcp_migrate_req=1 in the calling thread's network namespace.

    This is the one sysctl ztunnel changes, and only inside each enrolled workload's
    netns (run through `run_in_netns`; the host's and ztunnel's own netns are not
    touched, and the setting is left in place when the workload is unenrolled). With
    it, a listener closed during a rolling restart hands its queued, not yet accepted
    connections to the new ztunnel's SO_REUSEPORT twin instead of resetting them
    (Linux >= 5.14). Returns None when set, else why it could not be.
    """
    try:
        with open(MIGRATE_REQ_SYSCTL, "w") as f:
            f.write("1")
    except OSError as exc:
        return f"{MIGRATE_REQ_SYSCTL}: {exc.strerror or exc}"
    return None


def _warn_no_request_migration(workload: str, netns: str | None, reason: str) -> None:
    hint = ""
    if "Read-only" in reason:
        hint = ("/proc/sys is read-only for ztunnel (systemd ProtectKernelTunables=yes, or a "
                "read-only /proc/sys in the container): allow writes to it, or set "
                "net.ipv4.tcp_migrate_req=1 in the workload netns yourself")
    elif "No such file" in reason:
        hint = "the kernel has no tcp_migrate_req (Linux < 5.14)"
    log.warning(
        "cannot enable TCP request migration in the workload netns: during a rolling "
        "restart of ztunnel, connections queued on the old listeners may be refused while "
        "the new ztunnel takes over", workload=workload, netns=netns, error=reason, hint=hint)


class WorkloadProxy:
    """The listeners of one workload (per address family), all created inside its netns."""

    def __init__(self, ctx: ProxyContext, workload: Workload, netns: str | None,
                 ports: WorkloadPorts) -> None:
        self.ctx = ctx
        self.workload = workload
        self.netns = netns
        self.ports = ports
        self.listeners: list[Listener] = []
        self.hbone: list[InboundHboneListener] = []
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Fetch the workload's certificate and bind every listener (raises on failure)."""
        w = self.workload
        async with asyncio.timeout(10):
            cert = await self.ctx.identities.get(SpiffeId.parse(w.identity))
        if self.netns is not None:
            reason = await asyncio.to_thread(run_in_netns, self.netns, _enable_request_migration)
            if reason is not None:
                _warn_no_request_migration(f"{w.namespace}/{w.name}", self.netns, reason)
        families = [("127.0.0.1", "0.0.0.0")]
        if w.ip6:
            families.append(("::1", "::"))
        try:
            for loopback, anyaddr in families:
                self.listeners.append(
                    OutboundListener(self.ctx, w, self.netns, host=loopback,
                                     port=self.ports.outbound))
                self.listeners.append(
                    InboundPlainListener(self.ctx, w, self.netns, host=anyaddr,
                                         port=self.ports.inbound_plain))
                hbone = InboundHboneListener(self.ctx, w, self.netns, cert, host=anyaddr,
                                             port=self.ports.inbound_hbone)
                self.hbone.append(hbone)
                self.listeners.append(hbone)
                self.listeners.append(
                    DnsListener(self.ctx, w, self.netns, host=loopback, port=self.ports.dns))
        except BaseException:
            for lst in self.listeners:
                lst.close()
            self.listeners.clear()
            raise

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for lst in self.listeners:
                tg.create_task(lst.run())

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - listener contract
        async with asyncio.TaskGroup() as tg:
            for lst in self.listeners:
                tg.create_task(lst.drain(timeout))
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def describe(self) -> dict[str, object]:
        w = self.workload
        return {
            "uid": w.uid,
            "name": w.name,
            "namespace": w.namespace,
            "ip": w.ip,
            "ip6": w.ip6,
            "identity": w.identity,
            "netns": self.netns,
            "listeners": [f"{type(lst).__name__} {lst.address[0]}:{lst.address[1]}"
                          for lst in self.listeners],
        }


def _netns_exists(netns: str) -> bool:
    return os.path.exists(netns if "/" in netns else os.path.join("/run/netns", netns))


def _key(w: Workload) -> tuple[str, str, str | None, str | None, str]:
    # What requires new listeners when it changes; other fields are read live. The
    # certificate and the trust bundle are not here: the HBONE listener picks up the
    # current ones at every handshake (root rotation, renewal) without a restart.
    return (w.uid, w.ip, w.ip6, w.netns, w.identity)


class WorkloadManager:
    """Keeps one WorkloadProxy per enrolled local workload and their capture rules.

    Order on enroll: listeners first, then capture rules (a captured packet always
    finds a listener). On removal: rules first, then listeners. Rules are left in
    place when ztunnel stops, so captured traffic fails instead of bypassing the
    mesh while it is down; on start, `reconcile` adopts them without duplicates.
    """

    def __init__(
        self,
        ctx: ProxyContext,
        *,
        manage_capture: bool = True,
        ports: WorkloadPorts | None = None,
        data_dir: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.manage_capture = manage_capture
        self.ports = ports or WorkloadPorts()
        self.data_dir = data_dir
        self.proxies: dict[str, WorkloadProxy] = {}
        self.errors: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._first = True
        self.synced = asyncio.Event()
        self._stopping = False

    @property
    def ready(self) -> bool:
        """Every enrolled local workload has its listeners up."""
        return self.synced.is_set() and not self.errors and all(
            uid in self.proxies for uid in self._desired()
        )

    def _desired(self) -> dict[str, Workload]:
        return {w.uid: w for w in self.ctx.snapshot.local_workloads if w.enrolled}

    def update(self, snapshot: Snapshot) -> None:
        """A new snapshot is in `ctx`; reconcile soon."""
        self.synced.clear()
        self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._wake.set()
            while not self._stopping:
                await self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    break
                await self._reconcile()
                if self.errors:
                    tg.create_task(self._retry_later())
                self.synced.set()

    async def _retry_later(self) -> None:
        await asyncio.sleep(RETRY_DELAY)
        self._wake.set()

    async def _reconcile(self) -> None:
        desired = self._desired()
        self.ctx.identities.set_wanted(SpiffeId.parse(w.identity) for w in desired.values())
        for uid, proxy in list(self.proxies.items()):
            want = desired.get(uid)
            if want is None or _key(want) != _key(proxy.workload):
                await self._remove(proxy, unenroll=True)
        self.errors = {uid: e for uid, e in self.errors.items() if uid in desired}
        starts = [w for uid, w in desired.items() if uid not in self.proxies]
        if starts:
            await asyncio.gather(*(self._add(w) for w in starts))
        if self._first and self.manage_capture:
            self._first = False
            await self._adopt_rules(desired)
        self._save_enrolled()

    async def _add(self, w: Workload) -> None:
        try:
            netns = await asyncio.to_thread(resolve_workload_netns, w.netns, w.ip)
        except NetnsError as exc:
            self._fail(w, f"cannot find the netns of {w.namespace}/{w.name}: {exc}")
            return
        proxy = WorkloadProxy(self.ctx, w, netns, self.ports)
        # Known before the first connection arrives: HBONE leaves from this netns.
        for ip in w.addresses:
            self.ctx.netns_by_ip[ip] = netns
        try:
            await proxy.open()
        except Exception as exc:
            self._forget_addresses(w)
            self._fail(w, f"cannot open listeners for {w.namespace}/{w.name} in {netns}: {exc}")
            return
        assert self._tg is not None
        proxy.task = self._tg.create_task(proxy.run())
        if self.manage_capture:
            cap = _capture()
            try:
                await cap.aenroll(self._capture_workload(w, netns))
            except cap.CaptureError as exc:
                await proxy.drain(0)
                self._forget_addresses(w)
                self._fail(w, f"cannot install capture rules for {w.namespace}/{w.name}: {exc}")
                return
        self.proxies[w.uid] = proxy
        self.errors.pop(w.uid, None)
        self.ctx.metrics.workloads.set(len(self.proxies))
        log.info("workload enrolled", workload=f"{w.namespace}/{w.name}", ip=w.ip, netns=netns,
                 identity=w.identity)

    def _forget_addresses(self, w: Workload) -> None:
        for ip in w.addresses:
            self.ctx.netns_by_ip.pop(ip, None)

    def _fail(self, w: Workload, reason: str) -> None:
        self.errors[w.uid] = reason
        log.error("workload not enrolled; retrying", workload=f"{w.namespace}/{w.name}",
                  error=reason)

    @staticmethod
    def _capture_workload(w: Workload, netns: str) -> capture.Workload:
        workload: capture.Workload = _capture().Workload(
            name=f"{w.namespace}/{w.name}", netns=netns, ip=w.ip, ip6=w.ip6
        )
        return workload

    async def _remove(self, proxy: WorkloadProxy, *, unenroll: bool) -> None:
        w = proxy.workload
        if unenroll and self.manage_capture and proxy.netns is not None:
            cap = _capture()
            try:
                await cap.aunenroll(self._capture_workload(w, proxy.netns))
            except cap.CaptureError as exc:
                log.warning("cannot remove capture rules", workload=w.name, error=str(exc))
        self.proxies.pop(w.uid, None)
        self._forget_addresses(w)
        await proxy.drain(self.ctx.limits.drain_timeout if not unenroll else 1.0)
        self.ctx.metrics.workloads.set(len(self.proxies))
        log.info("workload unenrolled", workload=f"{w.namespace}/{w.name}", ip=w.ip)

    async def _adopt_rules(self, desired: dict[str, Workload]) -> None:
        """First sync after start: repair rules of desired workloads, drop stale ones."""
        known = [n for n in self._load_enrolled() if n not in
                 {p.netns for p in self.proxies.values()}]
        existing = [known_ns for known_ns in known if _netns_exists(known_ns)]
        want = [self._capture_workload(p.workload, p.netns) for p in self.proxies.values()
                if p.netns is not None]
        cap = _capture()
        try:
            report = await cap.areconcile(want, existing)
        except cap.CaptureError as exc:
            log.warning("capture reconcile failed", error=str(exc))
            return
        if report.changed or report.errors:
            log.info("capture reconciled", enrolled=report.enrolled, repaired=report.repaired,
                     removed=report.removed, errors=report.errors)

    def _enrolled_path(self) -> str | None:
        return os.path.join(self.data_dir, ENROLLED_FILE) if self.data_dir else None

    def _load_enrolled(self) -> list[str]:
        path = self._enrolled_path()
        if path is None:
            return []
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return []
        return [str(x) for x in data] if isinstance(data, list) else []

    def _save_enrolled(self) -> None:
        path = self._enrolled_path()
        if path is None or not self.manage_capture:
            return
        names = sorted({p.netns for p in self.proxies.values() if p.netns is not None})
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(names, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot record enrolled netns", error=str(exc))

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - listener contract
        """Stop every workload's listeners (capture rules stay: traffic fails, never bypasses)."""
        self._stopping = True
        self._wake.set()
        proxies = list(self.proxies.values())
        async with asyncio.TaskGroup() as tg:
            for p in proxies:
                tg.create_task(p.drain(timeout))

    def describe(self) -> list[dict[str, object]]:
        return [p.describe() for p in self.proxies.values()]
