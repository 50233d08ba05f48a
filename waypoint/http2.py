"""HTTP/2 for the waypoint (h2): the downstream server and the upstream client; gRPC included.

    await serve_http2(conn, handler, info=ConnInfo(...), initial=preface_bytes)
    resp = await h2_request(upstreams, endpoint, request, headers, body,
                            deadline=..., spawn=spawn)

Downstream, every stream becomes an `http1.Exchange` (the same handler serves both
protocols); request bodies stream with flow control (a stream's window opens as
the handler consumes it), responses respect the peer's windows, and trailers
(`grpc-status`) pass through both ways. Upstream (prior knowledge: the service port
declared `http2`/`grpc`, or the client spoke HTTP/2 on an undeclared port), requests
share h2c connections per endpoint (`H2Pool`, each inside one HBONE stream, closed
after a minute idle); their reader tasks run in the waypoint's TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import structlog
from hyperframe.frame import GoAwayFrame

from waypoint.http1 import (
    HOP_BY_HOP,
    READ_SIZE,
    Body,
    Conn,
    ConnInfo,
    Draining,
    Exchange,
    Handler,
    close_conn,
)
from waypoint.model import Headers, Request, UpstreamEndpoint
from waypoint.resilience import Outcome, PoolLimits
from waypoint.upstream import Spawn, UpstreamError, Upstreams
from ztunnel.hbone.errors import HboneError

__all__ = ["H2Pool", "H2Response", "H2Upstream", "h2_request", "serve_http2"]

log = structlog.get_logger("waypoint")

WINDOW = 4 << 20  # receive window per stream and (x4) per connection
#: after a drained connection's last stream ended and the waypoint half-closed it, how
#: long the client gets to close its side before the stream is reset
CLOSE_GRACE = 2.0
_H2_DROP = HOP_BY_HOP - {"te"}


def _h2_headers(headers: Headers) -> list[tuple[str, str]]:
    out = []
    for k, v in headers:
        if k in _H2_DROP or k == "host":
            continue
        if k == "te" and v.lower() != "trailers":
            continue
        out.append((k, v))
    return out


class _Waiters:
    """Futures woken when a flow-control window opens (or the connection ends)."""

    def __init__(self) -> None:
        self._w: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        f = asyncio.get_running_loop().create_future()
        self._w.append(f)
        await f

    def wake(self) -> None:
        w, self._w = self._w, []
        for f in w:
            if not f.done():
                f.set_result(None)


async def _send_flow_controlled(h2c: h2.connection.H2Connection, conn: Conn, sid: int,
                                data: bytes, *, waiters: _Waiters,
                                flush: Callable[[], None],
                                is_dead: Callable[[], bool]) -> None:
    view = memoryview(data)
    while view:
        if is_dead():
            raise ConnectionError(f"HTTP/2 stream {sid} was reset")
        try:
            window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise ConnectionError(f"HTTP/2 stream {sid} closed: {e}") from e
        if window <= 0:
            await waiters.wait()
            continue
        h2c.send_data(sid, bytes(view[:window]))
        view = view[window:]
        flush()
        await conn.drain()


# ----------------------------------------------------------------------------- downstream


class _H2Responder:
    def __init__(self, server: _H2Server, sid: int, method: str) -> None:
        self._s = server
        self.sid = sid
        self.method = method
        self.started = False
        self.finished = False
        self.bytes_sent = 0
        self.reset = False

    async def start(self, status: int, headers: Headers, *, length: int | None,
                    end: bool, body: bytes = b"") -> None:
        if self.reset:
            raise ConnectionError("client reset the stream")
        self.started = True
        hdrs = [(":status", str(status))]
        hdrs += [(k, v) for k, v in _h2_headers(headers) if k not in ("te", "content-length")]
        if length is not None and not end:
            hdrs.append(("content-length", str(length)))
        s = self._s
        try:
            s.h2c.send_headers(self.sid, hdrs, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise ConnectionError(f"stream {self.sid} closed: {e}") from e
        if end:
            self.finished = True
        if body and not end:
            await self.data(body)  # flushes the head along with the first DATA frame
            return
        s.flush()
        await s.conn.drain()

    async def data(self, chunk: bytes) -> None:
        if not chunk or self.method == "HEAD":
            return
        self.bytes_sent += len(chunk)
        s = self._s
        await _send_flow_controlled(s.h2c, s.conn, self.sid, chunk, waiters=s.writable,
                                    flush=s.flush, is_dead=lambda: self.reset or s.closed)

    async def end(self, trailers: Headers = ()) -> None:
        if self.finished or self.reset:
            return
        self.finished = True
        s = self._s
        try:
            if trailers:
                s.h2c.send_headers(self.sid, _h2_headers(trailers), end_stream=True)
            else:
                s.h2c.end_stream(self.sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise ConnectionError(f"stream {self.sid} closed: {e}") from e
        s.flush()
        await s.conn.drain()


class _H2Server:
    def __init__(self, conn: Conn, handler: Handler, info: ConnInfo,
                 draining: Draining | None = None) -> None:
        self.conn = conn
        self.handler = handler
        self.info = info
        self.draining = draining
        self.going_away = False  # GOAWAY sent: streams up to last_sid finish, no new ones
        self.last_sid = 0
        self.ended = False  # half-closed after the last stream of a drain
        self._grace: asyncio.TimerHandle | None = None
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8",
                                        validate_inbound_headers=True)
        self.h2c = h2.connection.H2Connection(cfg)
        self.bodies: dict[int, Body] = {}
        self.responders: dict[int, _H2Responder] = {}
        self.writable = _Waiters()
        self.closed = False

    def flush(self) -> None:
        data = self.h2c.data_to_send()
        if data:
            with contextlib.suppress(HboneError, OSError, RuntimeError):
                self.conn.write(data)

    def _ack(self, sid: int, n: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2c.acknowledge_received_data(n, sid)
            self.flush()

    def goaway(self) -> None:
        """Drain: GOAWAY(NO_ERROR) naming the last stream received; those streams are
        served to the end, later ones refused, then the connection is closed."""
        if self.going_away or self.closed:
            return
        self.going_away = True
        self.last_sid = self.h2c.highest_inbound_stream_id
        self.flush()
        # h2 sends nothing more after its own GOAWAY (close_connection), not even the
        # answers of the streams that should finish: write the frame ourselves
        frame = GoAwayFrame(0, last_stream_id=self.last_sid, error_code=0)
        with contextlib.suppress(HboneError, OSError, RuntimeError):
            self.conn.write(frame.serialize())
        self._end_if_done()

    def _end_if_done(self) -> None:
        """After a GOAWAY, once no stream is left: half-close, and reset the
        connection if the client does not close its side within CLOSE_GRACE."""
        if not self.going_away or self.responders or self.ended or self.closed:
            return
        self.ended = True
        self.flush()
        with contextlib.suppress(HboneError, OSError, RuntimeError):
            self.conn.write_eof()
        self._grace = asyncio.get_running_loop().call_later(
            CLOSE_GRACE, close_conn, self.conn)

    async def run(self, initial: bytes) -> None:
        h2c = self.h2c
        h2c.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
        })
        h2c.initiate_connection()
        h2c.increment_flow_control_window(4 * WINDOW - 65535)
        self.flush()
        watching = False
        async with asyncio.TaskGroup() as tg:
            data = initial
            try:
                while True:
                    if data:
                        try:
                            events = h2c.receive_data(data)
                        except h2.exceptions.ProtocolError as e:
                            log.info("http2_protocol_error", peer=self.info.peer_address,
                                     error=str(e) or type(e).__name__)
                            self.flush()
                            break
                        for ev in events:
                            self._event(ev, tg)
                        self.flush()
                    if not watching and self.draining is not None:
                        # after the first requests are taken: they are served in a drain
                        watching = True
                        self.draining.on_start(self, self.goaway)
                    if self.closed:
                        break
                    data = await self.conn.read(READ_SIZE)
                    if not data:
                        break
            except (HboneError, OSError, ConnectionError):
                pass
            finally:
                self.closed = True
                if self.draining is not None:
                    self.draining.forget(self)
                if self._grace is not None:
                    self._grace.cancel()
                for b in self.bodies.values():
                    b.fail(ConnectionError("client connection closed"))
                self.writable.wake()

    def _event(self, ev: Any, tg: asyncio.TaskGroup) -> None:
        body: Body | None
        if isinstance(ev, h2.events.RequestReceived):
            sid = ev.stream_id
            if self.going_away and sid > self.last_sid:
                # sent before the client saw our GOAWAY: not processed, safe to retry
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2c.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            hdrs = [(str(k), str(v)) for k, v in ev.headers]
            pseudo = {k: v for k, v in hdrs if k.startswith(":")}
            regular = [(k, v) for k, v in hdrs if not k.startswith(":")]
            cookies = [v for k, v in regular if k == "cookie"]
            if len(cookies) > 1:
                regular = [(k, v) for k, v in regular if k != "cookie"]
                regular.append(("cookie", "; ".join(cookies)))
            length: int | None = None
            for k, v in regular:
                if k == "content-length" and v.isdigit():
                    length = int(v)
            body = Body(length, on_consumed=functools.partial(self._ack, sid))
            if ev.stream_ended is not None:
                body.finish()
            self.bodies[sid] = body
            authority = pseudo.get(":authority") or next(
                (v for k, v in regular if k == "host"), "")
            req = Request(
                method=pseudo.get(":method", "GET"), path=pseudo.get(":path", "/"),
                authority=authority,
                headers=tuple((k, v) for k, v in regular if k != "host"),
                scheme=pseudo.get(":scheme", "http"), dest_ip=self.info.dest_ip,
                dest_port=self.info.dest_port, source_ip=self.info.source_ip,
                source_principal=self.info.source_principal,
            )
            resp = _H2Responder(self, sid, req.method)
            self.responders[sid] = resp
            ex = Exchange(req, body, resp, "2", started_at=asyncio.get_running_loop().time())
            tg.create_task(self._serve(ex, sid))
        elif isinstance(ev, h2.events.DataReceived):
            body = self.bodies.get(ev.stream_id)
            pad = ev.flow_controlled_length - len(ev.data)
            if pad > 0:
                self._ack(ev.stream_id, pad)
            if body is not None and not body.done:
                body.feed(ev.data)
            else:
                self._ack(ev.stream_id, len(ev.data))
        elif isinstance(ev, h2.events.TrailersReceived):
            body = self.bodies.get(ev.stream_id)
            if body is not None:
                body.finish(tuple((str(k), str(v)) for k, v in ev.headers))
        elif isinstance(ev, h2.events.StreamEnded):
            body = self.bodies.get(ev.stream_id)
            if body is not None and not body.done:
                body.finish()
        elif isinstance(ev, h2.events.StreamReset):
            body = self.bodies.get(ev.stream_id)
            if body is not None:
                body.fail(ConnectionError("client reset the stream"))
            r = self.responders.get(ev.stream_id)
            if r is not None:
                r.reset = True
            self.writable.wake()
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.writable.wake()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closed = True
            self.writable.wake()

    async def _serve(self, ex: Exchange, sid: int) -> None:
        resp = self.responders[sid]
        try:
            await self.handler(ex)
            if ex.aborted:
                raise ConnectionError("exchange aborted")
            if not resp.started:
                await resp.start(502, (("content-type", "text/plain"),), length=None,
                                 end=True)
            await resp.end()
        except (ConnectionError, HboneError, OSError):
            with contextlib.suppress(Exception):
                self.h2c.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
                self.flush()
        finally:
            self.bodies.pop(sid, None)
            self.responders.pop(sid, None)
            self._end_if_done()


async def serve_http2(conn: Conn, handler: Handler, *, info: ConnInfo,
                      initial: bytes = b"", draining: Draining | None = None) -> None:
    """Serve HTTP/2 (prior knowledge, as inside HBONE) on `conn` until the client ends.

    When `draining` starts, the client gets GOAWAY: the streams it already opened are
    served to the end, then the connection is closed."""
    await _H2Server(conn, handler, info, draining).run(initial)


# ----------------------------------------------------------------------------- upstream


class H2Upstream:
    """One h2c connection to an endpoint (inside an HBONE stream or TCP), shared by the
    requests of many clients; its reader task dispatches frames to their streams."""

    def __init__(self, conn: Conn, ep: UpstreamEndpoint, ups: Upstreams, *, single_use: bool,
                 limits: PoolLimits | None = None) -> None:
        self.conn = conn
        self.ep = ep
        self.ups = ups
        self.single_use = single_use  # close once its one stream is done
        self.limits = limits  # the backend's connection pool this connection counts in
        self.opened = 0  # streams opened (DestinationRule maxRequestsPerConnection)
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_inbound_headers=False))
        h2c.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        h2c.initiate_connection()
        h2c.increment_flow_control_window(4 * WINDOW - 65535)
        self.h2c = h2c
        self.streams: dict[int, H2Response] = {}
        self.writable = _Waiters()
        self.closed = False
        self.goaway = False
        self.idle_since = asyncio.get_running_loop().time()
        self.flush()

    def flush(self) -> None:
        data = self.h2c.data_to_send()
        if data and not self.closed:
            with contextlib.suppress(HboneError, OSError, RuntimeError):
                self.conn.write(data)

    def can_open(self) -> bool:
        if self.closed or self.goaway or self._spent():
            return False
        limit = min(self.h2c.remote_settings.max_concurrent_streams, 1000)
        return self.h2c.open_outbound_streams < limit

    def _spent(self) -> bool:
        """Served its pool's requests per connection: no new streams."""
        return self.limits is not None and not self.limits.may_reuse(self.opened)

    def open(self, headers: list[tuple[str, str]], *, end_stream: bool) -> H2Response:
        sid = self.h2c.get_next_available_stream_id()
        self.h2c.send_headers(sid, headers, end_stream=end_stream)
        resp = H2Response(self, sid)
        self.streams[sid] = resp
        self.opened += 1
        self.flush()
        return resp

    def forget(self, resp: H2Response) -> None:
        if self.streams.pop(resp.sid, None) is not None and not self.streams:
            self.idle_since = asyncio.get_running_loop().time()
        if not self.streams and (self.single_use or self._spent()):
            self.close()
        elif self.limits is not None:
            self.ups.wake(self.limits)  # a stream slot came free

    def close(self) -> None:
        if self.closed:
            return
        with contextlib.suppress(Exception):
            self.h2c.close_connection()
            self.flush()
        self.closed = True
        self._fail_all("connection closed")
        with contextlib.suppress(Exception):
            self.conn.write_eof()
        close_conn(self.conn)
        self.ups.disown(self.conn)

    def _fail_all(self, why: str) -> None:
        for st in list(self.streams.values()):
            st._fail(why)
        self.writable.wake()

    async def reader(self, idle_timeout: float | None = None) -> None:
        """Read frames until the connection ends (or stays idle past `idle_timeout`)."""
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                try:
                    async with asyncio.timeout(idle_timeout):
                        data = await self.conn.read(READ_SIZE)
                except TimeoutError:
                    if not self.streams and loop.time() - self.idle_since >= (idle_timeout or 0):
                        self.close()
                        return
                    continue
                if not data:
                    self._fail_all("upstream closed the HTTP/2 connection")
                    return
                try:
                    events = self.h2c.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    self._fail_all(f"upstream HTTP/2 protocol error: {e}")
                    return
                for ev in events:
                    sid = getattr(ev, "stream_id", 0)
                    st = self.streams.get(sid) if sid else None
                    if st is not None:
                        st._event(ev)
                    if isinstance(ev, (h2.events.WindowUpdated,
                                       h2.events.RemoteSettingsChanged)):
                        self.writable.wake()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        self.goaway = True
                        last = ev.last_stream_id if ev.last_stream_id is not None else 0
                        for other in list(self.streams.values()):
                            if other.sid > last or ev.error_code:
                                other._fail(f"upstream sent GOAWAY ({ev.error_code})")
                self.flush()
                if self.single_use and not self.streams:
                    return
        except (HboneError, OSError, ConnectionError) as e:
            self._fail_all(f"upstream connection failed: {e}")
        finally:
            self.closed = True
            self._fail_all("connection closed")
            close_conn(self.conn)
            self.ups.disown(self.conn)


class H2Response:
    """An upstream HTTP/2 response: one stream of an `H2Upstream`."""

    def __init__(self, up: H2Upstream, sid: int) -> None:
        self.up = up
        self.conn = up.conn
        self.h2c = up.h2c
        self.sid = sid
        self.ep = up.ep
        self.status = 0
        self.headers: Headers = ()
        self.length: int | None = None
        self.upgraded: bytes | None = None
        self._trailers: Headers = ()
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._more = asyncio.Event()
        self.ended = False
        self.ended_at_head = False  # a trailers-only answer (gRPC errors)
        self.error: str | None = None
        self.writable = up.writable
        self._closed = False

    @property
    def trailers(self) -> Headers:
        return self._trailers

    def flush(self) -> None:
        self.up.flush()

    def _dead(self) -> bool:
        return self._closed or self.error is not None

    def body_complete(self) -> bool:
        """Whether `chunks()` can be skipped: never decided early for HTTP/2."""
        return False

    def take_ready(self) -> bytes:
        """Body bytes already received (the rest streams through `chunks()`)."""
        if not self._chunks:
            return b""
        parts = []
        n = 0
        while self._chunks:
            data, fc = self._chunks.popleft()
            parts.append(data)
            n += fc
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2c.acknowledge_received_data(n, self.sid)
            self.flush()
        return b"".join(parts)

    def _fail(self, why: str) -> None:
        if not self.ended and self.error is None:
            self.error = why
        if not self._head.done():
            self._head.set_exception(UpstreamError(Outcome.RESET, f"{self.ep.key}: {why}",
                                                   nothing_received=True))
            self._head.exception()  # retrieved: nobody may be waiting any more
        self._more.set()

    def _event(self, ev: Any) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            hdrs = [(str(k), str(v)) for k, v in ev.headers]
            status = next((v for k, v in hdrs if k == ":status"), "0")
            if status.startswith("1"):
                return
            self.status = int(status)
            self.headers = tuple((k, v) for k, v in hdrs if not k.startswith(":"))
            for k, v in self.headers:
                if k == "content-length" and v.isdigit():
                    self.length = int(v)
            if ev.stream_ended is not None:
                self.ended = True
                self.ended_at_head = True
            if not self._head.done():
                self._head.set_result(None)
        elif isinstance(ev, h2.events.DataReceived):
            self._chunks.append((ev.data, ev.flow_controlled_length))
            self._more.set()
        elif isinstance(ev, h2.events.TrailersReceived):
            self._trailers = tuple((str(k), str(v)) for k, v in ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.ended = True
            self._more.set()
        elif isinstance(ev, h2.events.StreamReset):
            self._fail(f"upstream reset the stream (error {ev.error_code})")

    async def send_body(self, body: bytes | AsyncIterator[bytes]) -> None:
        try:
            if isinstance(body, bytes):
                if body:
                    await _send_flow_controlled(self.h2c, self.conn, self.sid, body,
                                                waiters=self.writable, flush=self.flush,
                                                is_dead=self._dead)
                self.h2c.end_stream(self.sid)
                self.flush()
                return
            async for chunk in body:
                if chunk:
                    await _send_flow_controlled(self.h2c, self.conn, self.sid, chunk,
                                                waiters=self.writable, flush=self.flush,
                                                is_dead=self._dead)
            self.h2c.end_stream(self.sid)
            self.flush()
        except (ConnectionError, HboneError, OSError, h2.exceptions.H2Error):
            return

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                data, n = self._chunks.popleft()
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2c.acknowledge_received_data(n, self.sid)
                    self.flush()
                if data:
                    yield data
            if self.ended:
                return
            if self.error is not None:
                raise ConnectionError(f"upstream {self.ep.key}: {self.error}")
            self._more.clear()
            await self._more.wait()

    def finish(self) -> None:
        """Done with this stream (the connection stays for others unless single-use)."""
        if self._closed:
            return
        self._closed = True
        self.writable.wake()
        with contextlib.suppress(h2.exceptions.H2Error):
            if not self.ended:
                self.h2c.reset_stream(self.sid, h2.errors.ErrorCodes.CANCEL)
        self.flush()
        self.up.forget(self)

    def discard(self) -> None:
        self.finish()


class H2Pool:
    """Shared h2c connections per endpoint; reader tasks run in the owner's TaskGroup
    (`spawn`, set while the waypoint runs). New connections count against the
    backend's `PoolLimits` like HTTP/1.1 ones (a connection that served its
    requests per connection closes once its streams are done)."""

    def __init__(self, ups: Upstreams, *, idle_timeout: float = 60.0) -> None:
        self.ups = ups
        self.idle_timeout = idle_timeout
        self.spawn: Spawn | None = None
        self._conns: dict[str, list[H2Upstream]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.connections_opened = 0
        ups.idle_closers.append(self._close_idle)

    def _usable(self, key: str) -> H2Upstream | None:
        lst = self._conns.get(key)
        if not lst:
            return None
        for c in lst:
            if c.can_open():
                return c
        lst[:] = [c for c in lst if not c.closed]
        return None

    def _close_idle(self, limits: PoolLimits) -> bool:
        """Close one connection without streams counted against `limits`."""
        for lst in self._conns.values():
            for c in lst:
                if c.limits is limits and not c.streams and not c.closed:
                    c.close()
                    return True
        return False

    async def get(self, ep: UpstreamEndpoint, *, source: str, traceparent: str | None,
                  limits: PoolLimits | None = None, deadline: float | None = None
                  ) -> H2Upstream:
        """A connection to `ep` that can take a stream: a shared one, or a new one when
        `limits` leave room (raises PoolOverflow / UpstreamError like `Upstreams`)."""
        up = self._usable(ep.key)
        if up is not None:
            return up
        if limits is not None:
            up = await self.ups.reserve(ep, limits, deadline, lambda: self._usable(ep.key))
            if up is not None:
                return up
        slot = limits  # reserved: given back unless a new connection takes it
        try:
            async with self._locks.setdefault(ep.key, asyncio.Lock()):
                up = self._usable(ep.key)  # opened while this request waited
                if up is None:
                    slot = None  # open_reserved gives it back if the connect fails
                    conn = await self.ups.open_reserved(ep, limits, deadline=deadline,
                                                        source=source, traceparent=traceparent)
                    up = H2Upstream(conn, ep, self.ups, single_use=False, limits=limits)
                    assert self.spawn is not None
                    self.spawn(up.reader(self.idle_timeout))
                    self._conns.setdefault(ep.key, []).append(up)
                    self.connections_opened += 1
                    if limits is not None:
                        self.ups.wake(limits)  # requests queued for this endpoint use it
        except BaseException:
            if slot is not None:
                self.ups.unreserve(slot)
            raise
        if slot is not None:
            self.ups.unreserve(slot)
        return up

    def close(self) -> None:
        for lst in self._conns.values():
            for c in lst:
                c.close()
        self._conns.clear()


async def h2_request(
    ups: Upstreams,
    ep: UpstreamEndpoint,
    request: Request,
    headers: Headers,
    body: bytes | AsyncIterator[bytes],
    *,
    deadline: float | None,
    spawn: Spawn,
    source: str = "",
    traceparent: str | None = None,
    pool: H2Pool | None = None,
    limits: PoolLimits | None = None,
) -> H2Response:
    """Send `request` over HTTP/2 to `ep` (a pooled connection when `pool` runs, else a
    connection of its own); the response head before `deadline` (loop time). Raises
    UpstreamError (UF / UR / UT)."""
    loop = asyncio.get_running_loop()
    remaining = None if deadline is None else deadline - loop.time()
    if remaining is not None and remaining <= 0:
        raise UpstreamError(Outcome.TIMEOUT, f"no time left to reach {ep.key}")
    hdrs = [(":method", request.method), (":scheme", request.scheme or "http"),
            (":path", request.path or "/"), (":authority", request.authority or ep.key)]
    hdrs += [(k, v) for k, v in _h2_headers(headers) if k != "content-length"]
    if isinstance(body, bytes) and (body or request.method in ("POST", "PUT", "PATCH")):
        hdrs.append(("content-length", str(len(body))))
    empty = isinstance(body, bytes) and not body
    try:
        async with asyncio.timeout(remaining):
            if pool is not None and pool.spawn is not None:
                up = await pool.get(ep, source=source, traceparent=traceparent,
                                    limits=limits, deadline=deadline)
            else:
                conn = await ups.open_new(ep, limits, deadline=deadline, source=source,
                                          traceparent=traceparent)
                up = H2Upstream(conn, ep, ups, single_use=True, limits=limits)
                spawn(up.reader())
    except TimeoutError:
        raise UpstreamError(Outcome.TIMEOUT,
                            f"connecting to {ep.key} took past the deadline") from None
    try:
        resp = up.open(hdrs, end_stream=empty)
    except h2.exceptions.H2Error as e:
        raise UpstreamError(Outcome.RESET, f"{ep.key}: cannot open a stream: {e}",
                            nothing_received=True) from e
    if not empty:
        spawn(resp.send_body(body))
    remaining = None if deadline is None else deadline - loop.time()
    try:
        async with asyncio.timeout(remaining):
            await resp._head
    except TimeoutError:
        resp.discard()
        raise UpstreamError(Outcome.TIMEOUT,
                            f"{ep.key} sent no response head before the deadline") from None
    except UpstreamError:
        resp.discard()
        raise
    return resp
