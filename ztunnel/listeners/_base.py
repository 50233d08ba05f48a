"""Shared pieces of the per-workload listeners: proxy context, netns sockets, accept loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import structlog

from netsetup.netns import forget_netns, socket_in_netns
from netsetup.rules import CaptureSpec
from ztunnel.accesslog import ConnectionRecord, log_connection
from ztunnel.authz import ConnectionInfo, Decision, denied_connections
from ztunnel.hbone.client import sock_connect
from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.hbone.stream import HboneStream
from ztunnel.identity import IdentityManager, TrustBundle
from ztunnel.listeners.metrics import ZtunnelMetrics
from ztunnel.snapshot import Snapshot, Workload

log = structlog.get_logger("ztunnel")

# SO_MARK of ztunnel's own sockets: the capture rules let packets with it through.
PROXY_MARK = CaptureSpec.proxy_mark
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75  # linux/in6.h
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
# bind() only the address; connect() picks the port against the full 4-tuple
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_RECVORIGDSTADDR = getattr(socket, "IPV6_RECVORIGDSTADDR", 74)
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR
# Accept errors that mean "out of resources right now": back off instead of spinning.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: errors of one connection that accept(2) reports (the client went away before the
#: accept, or a network error already pending on it): that connection is lost, the
#: listener goes on (accept(2): "treat them like EAGAIN by retrying")
_CONNECTION_ERRNOS = {
    errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
    errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM,
}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one ztunnel takes on."""

    max_connections: int = 10_000
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    drain_timeout: float = 5.0
    accept_backoff_max: float = 1.0


class ConnectionTracker:
    """Open inbound connections with what authz saw, so a policy change can close them."""

    def __init__(self) -> None:
        self._next = 0
        self._conns: dict[int, tuple[ConnectionInfo, Callable[[str], None]]] = {}

    def add(self, info: ConnectionInfo, close: Callable[[str], None]) -> int:
        self._next += 1
        self._conns[self._next] = (info, close)
        return self._next

    def remove(self, key: int) -> None:
        self._conns.pop(key, None)

    def __len__(self) -> int:
        return len(self._conns)

    def enforce(self, snapshot: Snapshot) -> list[Decision]:
        """Close every open connection `snapshot` no longer allows; return the decisions."""
        infos = {k: v[0] for k, v in self._conns.items()}
        out = []
        for key, decision in denied_connections(snapshot, infos):
            entry = self._conns.pop(key, None)
            if entry is not None:
                log.info("closing connection now denied by policy", reason=decision.reason,
                         src=entry[0].src_ip, dst_workload=entry[0].dst_workload.name,
                         dst_port=entry[0].dst_port)
                entry[1](decision.reason)
                out.append(decision)
        return out


@dataclass
class ProxyContext:
    """What every listener needs; the proxy swaps `snapshot` (and `trust`) on each update."""

    node: str
    snapshot: Snapshot
    metrics: ZtunnelMetrics
    identities: IdentityManager
    pool: HboneConnectionPool
    trust: TrustBundle | None = None
    limits: Limits = field(default_factory=Limits)
    tracker: ConnectionTracker = field(default_factory=ConnectionTracker)
    rng: random.Random = field(default_factory=random.Random)
    # source workload IP -> its netns (the HBONE pool dials from the source's netns)
    netns_by_ip: dict[str, str | None] = field(default_factory=dict)
    active: int = 0

    def require_trust(self) -> TrustBundle:
        if self.trust is None:
            raise RuntimeError(
                "no trust bundle: the snapshot has no trust_bundle_pem and no local CA is "
                "configured (give `local_ca` in --local-config or use --control-plane)"
            )
        return self.trust


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def set_transparent(sock: socket.socket, family: int) -> None:
    """IP_TRANSPARENT / IPV6_TRANSPARENT: accept TPROXY'd traffic, bind foreign addresses."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def listener_socket(
    netns: str | None,
    host: str,
    port: int,
    *,
    kind: int = socket.SOCK_STREAM,
    transparent: bool = True,
    backlog: int = 1024,
) -> socket.socket:
    """A listening (or bound UDP) socket created inside `netns`.

    IP_TRANSPARENT lets it receive TPROXY'd traffic; SO_REUSEPORT lets a new ztunnel
    bind the same address beside this one during a restart; SO_MARK 0x539 keeps the
    capture rules off its packets.
    """
    family = _family(host)
    sock = socket_in_netns(netns, family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, PROXY_MARK)
        if transparent:
            set_transparent(sock, family)
        if family == socket.AF_INET6:
            # IPv4 has its own listener: keep the two address families apart.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_DGRAM:
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            where = f" in netns {netns}" if netns else ""
            raise OSError(
                exc.errno,
                f"cannot bind {host}:{port}{where}: {exc.strerror}: is a process other than "
                "ztunnel using this port in the workload?",
            ) from exc
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def onward_socket(
    netns: str | None,
    dest_host: str,
    *,
    source_ip: str | None = None,
    kind: int = socket.SOCK_STREAM,
) -> socket.socket:
    """A socket for ztunnel's own onward connection, created inside `netns`, mark 0x539.

    With `source_ip` it is bound (IP_TRANSPARENT) to that address, which need not be
    local: inbound delivery keeps the original client's IP this way. The bind leaves the
    port to connect() (IP_BIND_ADDRESS_NO_PORT): bind(ip, 0) searches the ephemeral
    range for a port no socket of that IP holds, and every delivered connection leaves
    one in TIME_WAIT for a minute, so that search grows with the recent connections
    (after a few thousand it was the largest single cost of an inbound connection);
    connect() only needs a port free towards this destination.
    """
    family = _family(dest_host)
    sock = socket_in_netns(netns, family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, PROXY_MARK)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None:
            set_transparent(sock, family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # IPv6 sockets honour the IPv4-level option too (kernel applies it to both)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(sock: socket.socket, address: tuple[str, int], timeout: float) -> None:  # noqa: ASYNC109
    """Connect `sock`, closing it on failure; the error says where and what to check.

    No name lookup: `address` is an IP literal (see `ztunnel.hbone.client.sock_connect`).
    """
    try:
        async with asyncio.timeout(timeout):
            await sock_connect(sock, address)
    except TimeoutError:
        sock.close()
        raise ConnectionError(
            f"connection to {address[0]}:{address[1]} timed out after {timeout:g}s: "
            "is the destination up and the port open?"
        ) from None
    except OSError as exc:
        sock.close()
        raise ConnectionError(
            f"connection to {address[0]}:{address[1]} failed: {exc.strerror or exc}"
        ) from exc


async def splice_with_idle_timeout(
    stream: HboneStream, sock: socket.socket, idle_timeout: float
) -> tuple[int, int]:
    """`stream.splice_socket(sock)`, reset when no byte moved either way for `idle_timeout`.

    The splice runs in the caller's task; a timer (every idle_timeout/4, 50 ms to 5 s)
    compares the byte counters, so a connection costs no extra task and no wait-with-
    timeout, and a short one never sees the timer fire.
    """
    loop = asyncio.get_running_loop()
    step = max(0.05, min(idle_timeout / 4, 5.0))
    last = (stream.bytes_sent, stream.bytes_received)
    last_change = time.monotonic()
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal last, last_change, timer
        timer = None
        counts = (stream.bytes_sent, stream.bytes_received)
        now = time.monotonic()
        if counts != last:
            last, last_change = counts, now
        elif now - last_change >= idle_timeout:
            log.info("closing idle connection", idle_seconds=round(now - last_change, 1))
            stream.reset()
            return
        timer = loop.call_later(step, check)

    timer = loop.call_later(step, check)
    try:
        return await stream.splice_socket(sock)
    finally:
        if timer is not None:
            timer.cancel()


def reset_close(sock: socket.socket) -> None:
    """Close with a TCP RST (the client sees 'connection reset', not a clean EOF)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def record_denied(ctx: ProxyContext, rec: ConnectionRecord, reason: str) -> None:
    """Count and log `rec` as a connection refused for `reason` (the caller refuses it)."""
    denied = replace(rec, error=reason, denied=True)
    ctx.metrics.connection_denied(denied)
    log_connection(denied)


def record_closed(
    ctx: ProxyContext, rec: ConnectionRecord, start: float, *, sent: int, received: int,
    error: str | None,
) -> None:
    """Count and log `rec` as finished: byte counts, error, and time since `start`."""
    done = replace(rec, sent=sent, received=received, error=error,
                   duration_ms=(time.monotonic() - start) * 1000)
    ctx.metrics.connection_closed(done)
    log_connection(done)


def addr_str(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class TcpAcceptor:
    """Accept loop shared by the TCP listeners: bounded, EMFILE backoff, drainable;
    a connection that accept() reports lost (ECONNABORTED and the like) is skipped.

    Accepts from a reader callback on the listening socket, registered once (not a
    task, a wait and an epoll registration per connection). A wake-up accepts one
    connection: an accept that finds the queue empty costs ~5 us (the syscall and its
    BlockingIOError), which every wake-up of a serial client would pay. Connections
    arriving back to back (a wake-up within `BURST_GAP` of the previous accept) are
    accepted until EAGAIN, up to `ACCEPT_BATCH`; the reader is level-triggered, so a
    queue left non-empty wakes it again on the next loop iteration either way. Each
    accepted connection counts towards `ctx.limits.max_connections` from its accept
    until its handler's task is done.
    """

    ACCEPT_BATCH = 64  # per wake-up in a burst; the loop's other callbacks run in between
    BURST_GAP = 0.001  # seconds

    def __init__(
        self,
        sock: socket.socket,
        ctx: ProxyContext,
        handle: Callable[[socket.socket, Any], Awaitable[None]],
        name: str,
    ) -> None:
        self.sock = sock
        self.ctx = ctx
        self._handle = handle
        self.name = name
        host, port = sock.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._resume: asyncio.TimerHandle | None = None
        self._backoff = 0.01
        # what run() waits for: done by stop_accepting, failed by an accept error
        self._ended: asyncio.Future[None] | None = None
        self._last_accept = 0.0

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        ended = self._ended = loop.create_future()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                if not self._stopping:
                    self._start_reading()
                    try:
                        await ended
                    except OSError:  # an accept error: run() raises it, unless stopping
                        if not self._stopping:
                            raise
            finally:
                self._stop_reading()
                if self._resume is not None:
                    self._resume.cancel()
                    self._resume = None
                self.sock.close()

    def _start_reading(self) -> None:
        assert self._loop is not None
        if not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            assert self._loop is not None
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _after_backoff(self) -> None:
        self._resume = None
        if not self._stopping and self._ended is not None and not self._ended.done():
            self._start_reading()

    def _accept_ready(self) -> None:
        """The listening socket is readable: accept one, or in a burst until EAGAIN."""
        ctx = self.ctx
        tg = self._tg
        assert tg is not None
        now = time.monotonic()
        burst = now - self._last_accept < self.BURST_GAP
        self._last_accept = now
        for _ in range(self.ACCEPT_BATCH if burst else 1):
            if self._stopping:
                self._stop_reading()
                return
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _CONNECTION_ERRNOS:
                    self._count_accept_error(exc)
                    continue
                self._accept_failed(exc)
                return
            self._backoff = 0.01
            conn.setblocking(False)
            if ctx.active >= ctx.limits.max_connections:
                log.warning("connection limit reached, refusing", listener=self.name,
                            limit=ctx.limits.max_connections)
                reset_close(conn)
                continue
            coro = self._run_one(conn, peer)
            try:
                task = tg.create_task(coro)
            except RuntimeError:  # the task group is shutting down: run() is ending
                coro.close()
                reset_close(conn)
                self._stop_reading()
                return
            ctx.active += 1
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _count_accept_error(self, exc: OSError) -> None:
        self.ctx.metrics.accept_errors.labels(
            errno=errno.errorcode.get(exc.errno or 0, "?")
        ).inc()

    def _accept_failed(self, exc: OSError) -> None:
        self._stop_reading()
        if exc.errno in _RESOURCE_ERRNOS:
            self._count_accept_error(exc)
            log.warning("accept failed, backing off", listener=self.name,
                        error=str(exc), backoff=self._backoff)
            assert self._loop is not None
            self._resume = self._loop.call_later(self._backoff, self._after_backoff)
            self._backoff = min(self._backoff * 2, self.ctx.limits.accept_backoff_max)
            return
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(exc)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # Here, not in the handler's finally: a task cancelled before it first ran
        # (drain) never runs its body, and its connection must still be let go of.
        self._tasks.discard(task)
        self.ctx.active -= 1

    async def _run_one(self, conn: socket.socket, peer: Any) -> None:
        try:
            await self._handle(conn, peer)
        except Exception as exc:
            log.exception("connection handler failed", listener=self.name, error=str(exc))
            with contextlib.suppress(OSError):
                reset_close(conn)

    def close(self) -> None:
        """Release the socket of a listener that never ran."""
        self.sock.close()

    def stop_accepting(self) -> None:
        """Stop accepting; `run()` closes the listening socket and waits for open ones."""
        self._stopping = True
        self._stop_reading()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - listener contract
        """Stop accepting; let open connections finish for up to `timeout`, then cancel them."""
        self.stop_accepting()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for t in list(self._tasks):
            t.cancel()


class WorkloadTcpListener(TcpAcceptor):
    """A TCP listener in one workload's netns, named `<kind> <namespace>/<name>` in logs.

    Subclasses set `kind`, `default_host` and `default_port` and implement `_handle`;
    `current_workload()` is the workload as the latest snapshot has it.
    """

    kind: ClassVar[str]
    default_host: ClassVar[str]
    default_port: ClassVar[int]

    def __init__(
        self,
        ctx: ProxyContext,
        workload: Workload,
        netns: str | None,
        *,
        host: str | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.workload_uid = workload.uid
        self.netns = netns
        self._workload = workload
        if sock is None:
            sock = listener_socket(
                netns,
                self.default_host if host is None else host,
                self.default_port if port is None else port,
            )
        name = f"{self.kind} {workload.namespace}/{workload.name}"
        super().__init__(sock, ctx, self._handle, name)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self.netns is not None:
                # the workload left (or ztunnel stops): its namespace's cached fd goes
                forget_netns(self.netns)

    def current_workload(self) -> Workload:
        """This listener's workload in the current snapshot (as started, if it left)."""
        return self.ctx.snapshot.workload_by_uid(self.workload_uid) or self._workload

    async def _handle(self, client: socket.socket, peer: Any) -> None:
        raise NotImplementedError
