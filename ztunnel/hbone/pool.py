"""HBONE connection pool: one pool per ztunnel, connections shared by many streams.

    pool = HboneConnectionPool(connect_socket)     # connect_socket(key) -> connected socket
    stream = await pool.open_stream(
        src_identity_cert=cert, trust=bundle, dst_identity=dst_id, src_ip="10.0.1.5",
        dst=("10.0.2.7", 15008), authority="10.0.2.7:8080",
        forwarded_for='for="10.0.1.5:40000"')
    sent, received = await stream.splice_socket(client_sock)
    await pool.close()

Connections are keyed by `PoolKey(src identity, dst identity, src ip, dst address)`.
A connection carries up to `max_streams_per_conn` streams (capped by the peer's
SETTINGS_MAX_CONCURRENT_STREAMS); beyond that a new connection is opened. Creation is
serialised per key (ten concurrent opens make one connection). Closed, dead (PING
keepalive) and GOAWAY'd connections are never handed out; idle ones are closed after
`idle_timeout`. A stream refused before any byte was sent (REFUSED_STREAM, or above a
GOAWAY's last stream id) is retried once on a fresh connection. Failures raise
`HboneError` with a message that says what to check. No tasks: timers only.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ztunnel.hbone.client import connect, sock_connect
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.request import format_authority, request_headers
from ztunnel.hbone.stream import HboneConnection, HboneStream
from ztunnel.identity import Certificate, SpiffeId, TrustBundle
from ztunnel.tls import client_context


@dataclass(frozen=True)
class PoolKey:
    """What a pooled connection is shared by."""

    src_identity: SpiffeId
    dst_identity: SpiffeId
    src_ip: str | None
    dst: tuple[str, int]


ConnectSocket = Callable[[PoolKey], Awaitable[socket.socket]]


async def default_connect_socket(key: PoolKey) -> socket.socket:
    """Plain non-blocking TCP connect to key.dst (bound to key.src_ip when given)."""
    family = socket.AF_INET6 if ":" in key.dst[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if key.src_ip:
            sock.bind((key.src_ip, 0))
        await sock_connect(sock, key.dst)
    except BaseException:
        sock.close()
        raise
    return sock


class HboneConnectionPool:
    """See the module docstring."""

    def __init__(
        self,
        connect_socket: ConnectSocket | None = None,
        *,
        max_streams_per_conn: int = 100,
        idle_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        response_timeout: float = 30.0,
        keepalive_interval: float = 30.0,
        keepalive_timeout: float = 10.0,
    ) -> None:
        self._connect_socket = connect_socket or default_connect_socket
        self.max_streams_per_conn = max_streams_per_conn
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self._keepalive = (keepalive_interval, keepalive_timeout)
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._contexts: dict[tuple[Certificate, TrustBundle], ssl.SSLContext] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # Per key: (failed attempts so far, when the last failed, its error).
        self._failures: dict[PoolKey, tuple[int, float, HboneError | None]] = {}
        self._closed = False
        self.connections_opened = 0

    # ------------------------------------------------------------------ public

    def connections(self, key: PoolKey | None = None) -> list[HboneConnection]:
        """Live connections (of one key, or all)."""
        if key is not None:
            return [c for c in self._conns.get(key, []) if not c.is_closed]
        return [c for conns in self._conns.values() for c in conns if not c.is_closed]

    async def open_stream(
        self,
        *,
        src_identity_cert: Certificate,
        trust: TrustBundle,
        dst_identity: SpiffeId,
        src_ip: str | None,
        dst: tuple[str, int],
        authority: str,
        forwarded_for: str | None,
        traceparent: str | None = None,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> HboneStream:
        """A CONNECT stream to `authority` via the HBONE endpoint `dst` (200 received).

        `forwarded_for` is the full header value, e.g. `for="10.0.1.5:40000"`
        (see `request.forwarded_for`). Raises HboneError.
        """
        if self._closed:
            raise HboneError("HBONE pool is closed (ztunnel shutting down)")
        key = PoolKey(src_identity_cert.identity, dst_identity, src_ip, dst)
        headers = request_headers(
            authority, forwarded=forwarded_for, traceparent=traceparent, extra=extra_headers
        )
        for attempt in range(2):
            conn = (self._reusable(key) if attempt == 0 else None) or await self._get(
                key, src_identity_cert, trust, fresh=attempt > 0
            )
            try:
                return await conn.open_stream(headers, response_timeout=self.response_timeout)
            except HboneError as e:
                if e.refused and attempt == 0:
                    continue
                raise
        raise AssertionError("unreachable")

    async def drain(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """GOAWAY every connection; wait (up to timeout) for their streams to finish."""
        self._closed = True
        conns = self.connections()
        for c in conns:
            c.goaway()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=timeout)
        await self.close()

    async def close(self) -> None:
        """Close every connection now (open streams are reset)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns = self.connections()
        for c in conns:
            c.close()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=5)
        for c in conns:
            if not c.is_closed:
                c.abort()
        self._conns.clear()

    # ------------------------------------------------------------------ internals

    def _context(self, cert: Certificate, trust: TrustBundle) -> ssl.SSLContext:
        ctx = self._contexts.get((cert, trust))
        if ctx is None:
            if len(self._contexts) > 256:
                self._contexts.clear()
            ctx = self._contexts[(cert, trust)] = client_context(cert, trust)
        return ctx

    def _reusable(self, key: PoolKey) -> HboneConnection | None:
        """A pooled connection of `key` with room for one more stream, found without a
        lock or a task switch (the common case: the connection is there)."""
        conns = self._conns.get(key)
        if conns:
            limit = self.max_streams_per_conn
            for c in conns:
                if not c.is_closed and c.can_open(limit):
                    return c
        return None

    async def _get(
        self, key: PoolKey, cert: Certificate, trust: TrustBundle, *, fresh: bool
    ) -> HboneConnection:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        loop = asyncio.get_running_loop()
        failures_seen = self._failures.get(key, (0, 0.0, None))[0]
        async with lock:
            conns = self._conns.setdefault(key, [])
            conns[:] = [c for c in conns if not c.is_closed]
            if not fresh:
                for c in conns:
                    if c.can_open(self.max_streams_per_conn):
                        return c
            count, _, error = self._failures.get(key, (0, 0.0, None))
            if error is not None and count > failures_seen:
                # The attempt we queued behind just failed: share its verdict instead
                # of trying again (ten waiters would otherwise wait ten timeouts).
                raise HboneError(str(error), status=error.status)
            try:
                conn = await self._connect(key, cert, trust)
            except HboneError as e:
                self._failures[key] = (count + 1, loop.time(), e)
                self._schedule_sweep()
                raise
            self._failures.pop(key, None)
            conns.append(conn)
            self._schedule_sweep()
            return conn

    async def _connect(
        self, key: PoolKey, cert: Certificate, trust: TrustBundle
    ) -> HboneConnection:
        where = format_authority(*key.dst)
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await self._connect_socket(key)
        except TimeoutError:
            raise HboneError(
                f"connection to {where} timed out after {self.connect_timeout:g}s: "
                f"is HBONE port {key.dst[1]} blocked or the node down?"
            ) from None
        except ConnectionRefusedError:
            raise HboneError(
                f"connection to {where} refused: is ztunnel listening on HBONE port "
                f"{key.dst[1]} there?"
            ) from None
        except OSError as e:
            raise HboneError(f"connection to {where} failed: {e.strerror or e}") from e
        conn = await connect(
            sock,
            self._context(cert, trust),
            trust,
            key.dst_identity,
            connect_timeout=self.connect_timeout,
            max_concurrent_streams=self.max_streams_per_conn,
            keepalive_interval=self._keepalive[0],
            keepalive_timeout=self._keepalive[1],
            on_close=self._on_close,
        )
        self.connections_opened += 1
        return conn

    def _on_close(self, conn: HboneConnection) -> None:
        for conns in self._conns.values():
            if conn in conns:
                conns.remove(conn)
                return

    def _schedule_sweep(self) -> None:
        if self._sweeper is not None or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(0.05, self.idle_timeout / 4), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        any_left = False
        for key, conns in list(self._conns.items()):
            for c in list(conns):
                if c.is_closed:
                    conns.remove(c)
                elif not c.streams and now - c.idle_since >= self.idle_timeout:
                    c.close()
                    conns.remove(c)
                else:
                    any_left = True
            if not conns:
                del self._conns[key]
                lock = self._locks.get(key)
                if lock is not None and not lock.locked():
                    del self._locks[key]
        for key, (_, when, _) in list(self._failures.items()):
            if now - when > 60:
                del self._failures[key]
        if any_left or self._failures:
            self._schedule_sweep()
