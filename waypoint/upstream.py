"""Re-origination: connections from the waypoint to the chosen endpoint, and HTTP/1.1 to it.

    ups = Upstreams(identity=lambda: (cert, bundle))
    conn = await ups.connect(endpoint, source="10.0.1.5:40000")   # Conn; UpstreamError
    resp = await ups.h1_request(endpoint, request, headers, body, deadline=..., spawn=...,
                                pool=backend_pool_limits)         # PoolOverflow: 503 UO
    async for chunk in resp.chunks(): ...
    resp.finish()                                # back to the idle pool (or closed)

An endpoint in the mesh (`endpoint.hbone`) is reached through HBONE: a CONNECT
stream to `endpoint.address:15008` with `:authority address:port`, the waypoint's own
certificate, the endpoint's SPIFFE identity checked, streams pooled over shared
connections (`ztunnel.hbone.pool`). Other endpoints get plain TCP. HTTP/1.1
connections to an endpoint are kept alive and reused; one that the server closed
while idle is replaced transparently (the request never reached it). Every new
connection (HTTP/1.1 here, HTTP/2 in `waypoint.http2`, TCP in the server) takes a
slot of its backend's DestinationRule pool: `reserve`, `open_reserved`, `disown`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httptools
import structlog

from waypoint.http1 import (
    READ_SIZE,
    Conn,
    TcpConn,
    close_conn,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
    head_framing,
)
from waypoint.model import Headers, LocalResponse, Request, UpstreamEndpoint
from waypoint.resilience import ConnVerdict, Outcome, PoolLimits, overflow_response
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.hbone.request import format_authority
from ztunnel.hbone.stream import HboneStream
from ztunnel.identity import Certificate, SpiffeId, TrustBundle

__all__ = ["H1Response", "PoolOverflow", "Spawn", "UpstreamError", "Upstreams"]

log = structlog.get_logger("waypoint")

#: starts a task owned by the caller's TaskGroup (request body senders, readers)
Spawn = Callable[[Coroutine[Any, Any, None]], None]

MAX_IDLE_PER_ENDPOINT = 64

_T = TypeVar("_T")


class PoolOverflow(Exception):
    """The backend's connection pool and its pending queue are full: answer `response`."""

    def __init__(self, response: LocalResponse) -> None:
        super().__init__(response.details)
        self.response = response


class UpstreamError(Exception):
    """An attempt failed without a response: `outcome` says how (UF / UR / UT)."""

    def __init__(self, outcome: Outcome, message: str, *, nothing_received: bool = False) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.nothing_received = nothing_received


@dataclass(slots=True)
class _Idle:
    conn: Conn
    served: int


class _RespParser:
    """httptools callbacks for one upstream response."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.trailers: list[tuple[str, str]] = []
        self.head_done = False
        self.complete = False
        self.chunks: deque[bytes] = deque()

    def on_message_begin(self) -> None:
        self.headers = []
        self.trailers = []
        self.head_done = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        h = (name.decode("latin-1").lower(), value.decode("latin-1"))
        (self.trailers if self.head_done else self.headers).append(h)

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class H1Response:
    """An upstream HTTP/1.1 response: head now, body as it streams."""

    def __init__(self, ups: Upstreams, ep: UpstreamEndpoint, conn: Conn, *, served: int,
                 parser: httptools.HttpResponseParser, cb: _RespParser,
                 head_only: bool, upgraded: bytes | None) -> None:
        self._ups = ups
        self._ep = ep
        self.conn = conn
        self._served = served
        self._parser = parser
        self._cb = cb
        self.status = parser.get_status_code()
        self.headers: Headers = tuple(cb.headers)
        length, chunked, conn_tokens = head_framing(cb.headers)
        if parser.get_http_version() == "1.1":
            persistent = "close" not in conn_tokens
        else:
            persistent = "keep-alive" in conn_tokens
        self.keep_alive = persistent and not head_only and upgraded is None
        self.head_only = head_only
        self.upgraded = upgraded  # bytes after a 101 head (the tunnel's first bytes)
        self.length: int | None = None if chunked else length
        self._chunked = chunked
        if upgraded is not None:
            ups.disown(conn)  # a tunnel now (WebSocket): no longer a pooled connection
        self.bytes_received = 0
        self.ended_at_head = False
        self._done = head_only or (cb.complete and not cb.chunks)
        self._released = False

    @property
    def trailers(self) -> Headers:
        return tuple(self._cb.trailers)

    def take_ready(self) -> bytes:
        """Body bytes already received with the head (the rest comes from `chunks()`)."""
        cb = self._cb
        if self.head_only or self.status in (204, 304) or not cb.chunks:
            return b""
        data = b"".join(cb.chunks) if len(cb.chunks) > 1 else cb.chunks[0]
        cb.chunks.clear()
        self.bytes_received += len(data)
        return data

    def body_complete(self) -> bool:
        """True when nothing is left for `chunks()` (the whole body came with the head
        and was taken by `take_ready`): the caller can skip iterating."""
        cb = self._cb
        if self.head_only or self.status in (204, 304) or (cb.complete and not cb.chunks):
            self._done = True
            return True
        return False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body; ends at the message end (or, for close-delimited bodies, at EOF)."""
        cb = self._cb
        if self.head_only or self.status in (204, 304):
            self._done = True
            return
        while True:
            while cb.chunks:
                data = cb.chunks.popleft()
                self.bytes_received += len(data)
                yield data
            if cb.complete:
                self._done = True
                return
            try:
                data = await self.conn.read(READ_SIZE)
            except (HboneError, OSError) as e:
                raise ConnectionError(f"upstream {self._ep.key} reset mid-response: {e}") from e
            if not data:
                if self.length is None and not self._chunked:
                    self._done = True
                    self.keep_alive = False
                    return
                raise ConnectionError(f"upstream {self._ep.key} closed mid-response")
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as e:
                raise ConnectionError(f"upstream {self._ep.key} sent a bad response: {e}") from e

    def finish(self) -> None:
        """Done with the response: keep the connection if it is reusable, else close it."""
        if self._released:
            return
        self._released = True
        if self._done and self.keep_alive:
            self._ups._put_idle(self._ep, self.conn, self._served + 1)
        else:
            self._ups._close(self.conn)

    def discard(self) -> None:
        """Drop the response unread (a retry follows): the connection is closed."""
        self.keep_alive = False
        self.finish()


class Upstreams:
    """Connections to endpoints: HBONE (pooled) or TCP, plus idle HTTP/1.1 connections."""

    def __init__(
        self,
        identity: Callable[[], tuple[Certificate, TrustBundle]],
        *,
        hbone_port: int = 15008,
        pool: HboneConnectionPool | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self._identity = identity
        self.hbone_port = hbone_port
        self.pool = pool or HboneConnectionPool(connect_timeout=connect_timeout)
        self.connect_timeout = connect_timeout
        self._idle: dict[str, list[_Idle]] = {}
        self._owner: dict[int, PoolLimits] = {}  # connection -> its backend's pool limits
        self._freed: dict[int, asyncio.Event] = {}  # pool -> a connection came back/closed
        #: other holders of idle connections (HTTP/2): each closes one counted against a
        #: pool, to make room for a new one (True when it did)
        self.idle_closers: list[Callable[[PoolLimits], bool]] = []
        self.connections_opened = 0
        self._presenting: Certificate | None = None  # the certificate of pooled connections

    def _check_renewal(self, cert: Certificate) -> None:
        """A renewed certificate: pooled HBONE connections (opened with the previous
        one) get GOAWAY, so their streams finish and new streams open new connections
        that present the renewed certificate."""
        old = self._presenting
        self._presenting = cert
        if old is None or cert == old:
            return
        conns = self.pool.connections()
        for c in conns:
            c.goaway()
        log.info("presenting the renewed certificate to endpoints; connections opened "
                 "with the previous one drain", identity=str(cert.identity),
                 not_after=cert.not_after, draining=len(conns))

    async def connect(self, ep: UpstreamEndpoint, *, source: str = "",
                      traceparent: str | None = None) -> Conn:
        """A new byte stream to `ep` (HBONE CONNECT or TCP). Raises UpstreamError(UF)."""
        if ep.hbone:
            cert, trust = self._identity()
            if cert is not self._presenting:
                self._check_renewal(cert)
            try:
                dst_id = SpiffeId.parse(ep.identity)
            except ValueError as e:
                raise UpstreamError(Outcome.CONNECT_FAILURE,
                                    f"endpoint {ep.key} has no valid identity "
                                    f"{ep.identity!r}: {e}") from e
            fwd = None
            if source:
                host, _, port = source.rpartition(":")
                node = host if host.startswith("[") or ":" not in host else f"[{host}]"
                fwd = f'for="{node}:{port}"' if port.isdigit() else f'for="{source}"'
            try:
                stream = await self.pool.open_stream(
                    src_identity_cert=cert, trust=trust, dst_identity=dst_id, src_ip=None,
                    dst=(ep.address, self.hbone_port),
                    authority=format_authority(ep.address, ep.port),
                    forwarded_for=fwd, traceparent=traceparent,
                )
            except HboneError as e:
                raise UpstreamError(Outcome.CONNECT_FAILURE,
                                    f"HBONE to {ep.key} via port {self.hbone_port}: {e}") from e
            self.connections_opened += 1
            return stream
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(ep.address, ep.port,
                                                               limit=READ_SIZE)
        except TimeoutError:
            raise UpstreamError(Outcome.CONNECT_FAILURE,
                                f"TCP connect to {ep.key} timed out after "
                                f"{self.connect_timeout:g}s") from None
        except OSError as e:
            raise UpstreamError(Outcome.CONNECT_FAILURE,
                                f"TCP connect to {ep.key} failed: {e.strerror or e}") from e
        self.connections_opened += 1
        return TcpConn(reader, writer)

    # -- connection accounting (DestinationRule connectionPool) ----------------------
    #
    # Every new connection to a backend's endpoint (HTTP/1.1, HTTP/2, TCP) takes a slot
    # of that backend's `PoolLimits`: `reserve` (which may queue or overflow), then
    # `open_reserved` (the connection owns the slot until it closes: `disown`) or
    # `unreserve` (not needed after all); `open_new` is the first two in one, for
    # callers with no pooled connection to reuse while they wait.

    async def reserve(self, ep: UpstreamEndpoint, pool: PoolLimits, deadline: float | None,
                      reuse: Callable[[], _T | None] = lambda: None) -> _T | None:
        """A slot for a new connection to `ep` (None: reserved, counted as open), or what
        `reuse` finds while queued (a connection that came free). Raises PoolOverflow
        when the pending queue is full, UpstreamError(UT) at the deadline (loop time)."""
        if pool.connections >= pool.max_connections:
            self._make_room(pool)  # an idle connection to another endpoint gives way
        verdict = pool.connection_verdict()
        if verdict is ConnVerdict.OPEN:
            pool.connection_opened()
            return None
        if verdict is ConnVerdict.OVERFLOW:
            raise PoolOverflow(overflow_response(
                f"{pool.connections} connections (max {pool.max_connections}) and "
                f"{pool.pending} pending (max {pool.max_pending}) for {ep.key}"))
        loop = asyncio.get_running_loop()
        ev = self._freed.setdefault(id(pool), asyncio.Event())
        try:
            while True:
                ev.clear()
                remaining = None if deadline is None else deadline - loop.time()
                try:
                    async with asyncio.timeout(remaining):
                        await ev.wait()
                except TimeoutError:
                    raise UpstreamError(Outcome.TIMEOUT, f"no connection to {ep.key} came "
                                        "free before the deadline") from None
                found = reuse()
                if found is not None:
                    return found
                if pool.connections < pool.max_connections or self._make_room(pool):
                    pool.connection_opened()
                    return None
        finally:
            pool.dequeued()

    def unreserve(self, pool: PoolLimits) -> None:
        """Give back a slot `reserve` gave that no connection took."""
        pool.connection_closed()
        self.wake(pool)

    async def open_reserved(self, ep: UpstreamEndpoint, pool: PoolLimits | None, *,
                            deadline: float | None, source: str = "",
                            traceparent: str | None = None) -> Conn:
        """`connect` before `deadline`, into the slot reserved in `pool` (given back when
        the connect fails). Raises UpstreamError."""
        try:
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                raise UpstreamError(Outcome.TIMEOUT, f"no time left to reach {ep.key}")
            try:
                async with asyncio.timeout(remaining):
                    conn = await self.connect(ep, source=source, traceparent=traceparent)
            except TimeoutError:
                raise UpstreamError(Outcome.TIMEOUT,
                                    f"connecting to {ep.key} took past the deadline") from None
        except BaseException:
            if pool is not None:
                self.unreserve(pool)
            raise
        if pool is not None:
            self._owner[id(conn)] = pool
        return conn

    async def open_new(self, ep: UpstreamEndpoint, pool: PoolLimits | None, *,
                       deadline: float | None, source: str = "",
                       traceparent: str | None = None) -> Conn:
        """A new connection to `ep`, counted against `pool` (None: not counted) from
        `reserve` (which may queue or overflow) until it closes. Raises UpstreamError,
        PoolOverflow."""
        if pool is not None:
            await self.reserve(ep, pool, deadline)
        return await self.open_reserved(ep, pool, deadline=deadline, source=source,
                                        traceparent=traceparent)

    def disown(self, conn: Conn) -> None:
        """`conn` closed: its slot (if it held one) is free."""
        pool = self._owner.pop(id(conn), None)
        if pool is not None:
            pool.connection_closed()
            self.wake(pool)

    def wake(self, pool: PoolLimits) -> None:
        """A connection counted against `pool` came free or closed: queued requests look."""
        if pool.pending:  # someone waits in `reserve`
            ev = self._freed.get(id(pool))
            if ev is not None:
                ev.set()

    def _close(self, conn: Conn) -> None:
        close_conn(conn)
        self.disown(conn)

    def _make_room(self, pool: PoolLimits) -> bool:
        """Close one idle connection counted against `pool` (to another endpoint)."""
        for lst in self._idle.values():
            for other in lst:
                if self._owner.get(id(other.conn)) is pool:
                    lst.remove(other)
                    self._close(other.conn)
                    return True
        return any(close_one(pool) for close_one in self.idle_closers)

    def _take_idle(self, ep: UpstreamEndpoint, pool: PoolLimits | None = None) -> _Idle | None:
        lst = self._idle.get(ep.key)
        while lst:
            idle = lst.pop()
            if _alive(idle.conn) and (pool is None or pool.may_reuse(idle.served)):
                return idle
            self._close(idle.conn)
        return None

    def _put_idle(self, ep: UpstreamEndpoint, conn: Conn, served: int) -> None:
        pool = self._owner.get(id(conn))
        if not _alive(conn) or (pool is not None and not pool.may_reuse(served)):
            self._close(conn)
            return
        lst = self._idle.setdefault(ep.key, [])
        if len(lst) >= MAX_IDLE_PER_ENDPOINT:
            self._close(conn)
            return
        lst.append(_Idle(conn, served))
        if pool is not None:
            self.wake(pool)

    def close_idle(self, keep: set[str] | None = None) -> int:
        """Close idle HTTP/1.1 connections (all, or those to endpoints not in `keep`)."""
        n = 0
        for key in list(self._idle):
            if keep is not None and key in keep:
                continue
            for idle in self._idle.pop(key):
                self._close(idle.conn)
                n += 1
        return n

    def idle_count(self, ep: UpstreamEndpoint | None = None) -> int:
        if ep is not None:
            return len(self._idle.get(ep.key, []))
        return sum(len(v) for v in self._idle.values())

    async def h1_request(
        self,
        ep: UpstreamEndpoint,
        request: Request,
        headers: Headers,
        body: bytes | AsyncIterator[bytes],
        *,
        deadline: float | None,
        spawn: Spawn,
        source: str = "",
        traceparent: str | None = None,
        upgrade: bool = False,
        pool: PoolLimits | None = None,
    ) -> H1Response:
        """Send `request` over HTTP/1.1 and wait for the response head (until `deadline`,
        loop time). `headers` are end-to-end headers (no host, no hop-by-hop); a
        streamed body (async iterator) is sent by a task started with `spawn`.
        Raises UpstreamError."""
        out = [("host", request.authority or ep.key)]
        out += [h for h in headers if h[0] != "content-length"]
        streamed = not isinstance(body, bytes)
        if isinstance(body, bytes):
            if body or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS", "TRACE"):
                out.append(("content-length", str(len(body))))
        else:
            out.append(("transfer-encoding", "chunked"))
        if not upgrade:
            out.append(("connection", "keep-alive"))
        head = encode_request_head(request.method, request.path or "/", out)
        for attempt in range(2):
            idle = self._take_idle(ep, pool) if attempt == 0 and not streamed else None
            if idle is None and pool is not None:
                idle = await self.reserve(ep, pool, deadline, lambda: self._take_idle(ep, pool))
            if idle is not None:
                conn, served = idle.conn, idle.served
            else:
                conn = await self.open_reserved(ep, pool, deadline=deadline, source=source,
                                                traceparent=traceparent)
                served = 0
            try:
                if isinstance(body, bytes):
                    conn.write(head + body if len(body) < 65536 else head)
                    if len(body) >= 65536:
                        conn.write(body)
                    if not conn.drained:
                        await conn.drain()
                else:
                    conn.write(head)
                    spawn(_send_chunked(conn, body))
                return await self._read_head(ep, conn, served, request.method, deadline)
            except UpstreamError as e:
                self._close(conn)
                # a reused keep-alive connection the server had closed: try a fresh one
                if idle is not None and e.outcome is Outcome.RESET and e.nothing_received:
                    continue
                raise
            except (HboneError, OSError) as e:
                self._close(conn)
                if idle is not None:
                    continue
                raise UpstreamError(Outcome.RESET, f"sending to {ep.key} failed: {e}") from e
        raise AssertionError("unreachable")

    async def _read_head(self, ep: UpstreamEndpoint, conn: Conn, served: int, method: str,
                         deadline: float | None) -> H1Response:
        cb = _RespParser()
        parser = httptools.HttpResponseParser(cb)
        got = 0
        while True:
            try:
                if deadline is None:
                    data = await conn.read(READ_SIZE)
                else:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(remaining):
                        data = await conn.read(READ_SIZE)
            except TimeoutError:
                self._close(conn)
                raise UpstreamError(Outcome.TIMEOUT,
                                    f"{ep.key} sent no response head before the deadline") \
                    from None
            except (HboneError, OSError) as e:
                raise UpstreamError(Outcome.RESET,
                                    f"{ep.key} reset before the response head: {e}",
                                    nothing_received=got == 0) from e
            if not data:
                raise UpstreamError(Outcome.RESET,
                                    f"{ep.key} closed before the response head",
                                    nothing_received=got == 0)
            got += len(data)
            upgraded: bytes | None = None
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                offset = int(e.args[0]) if e.args else len(data)
                upgraded = data[offset:]
            except httptools.HttpParserError as e:
                raise UpstreamError(Outcome.RESET,
                                    f"{ep.key} sent a malformed response: {e}") from e
            if cb.head_done:
                status = parser.get_status_code()
                if 100 <= status < 200 and status != 101:
                    # interim response (100 Continue): skip it, the real head follows
                    rest = b"".join(cb.chunks)
                    cb = _RespParser()
                    parser = httptools.HttpResponseParser(cb)
                    if rest:
                        parser.feed_data(rest)
                    if not cb.head_done:
                        continue
                if status == 101 and upgraded is None:
                    upgraded = b""
                return H1Response(self, ep, conn, served=served, parser=parser, cb=cb,
                                  head_only=method == "HEAD", upgraded=upgraded)

    async def close(self) -> None:
        self.close_idle()
        await self.pool.close()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        self.close_idle()
        await self.pool.drain(timeout)


def _alive(conn: Conn) -> bool:
    if type(conn) is HboneStream:
        return conn.reusable
    if isinstance(conn, TcpConn):
        return not conn.writer.is_closing() and not conn.reader.at_eof()
    return False


async def _send_chunked(conn: Conn, body: AsyncIterator[bytes]) -> None:
    with contextlib.suppress(HboneError, OSError, ConnectionError):
        async for chunk in body:
            if chunk:
                conn.write(encode_chunk(chunk))
                await conn.drain()
        conn.write(encode_last_chunk())
        await conn.drain()
