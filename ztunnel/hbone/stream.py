"""asyncio adapter of the HTTP/2 core: `HboneConnection` (a Protocol) and `HboneStream`.

`HboneConnection` is an `asyncio.Protocol` over a TLS transport (uvloop or asyncio). It
feeds received bytes into `H2Connection`, dispatches the events to `HboneStream`
objects and writes the core's output once per batch. No tasks are created here: PING
keepalive runs on `loop.call_later` and streams are driven by callbacks.

`HboneStream` is one CONNECT stream seen as a bidirectional byte stream::

    data = await stream.read()        # b"" once the peer sent END_STREAM (its FIN)
    stream.write(data); await stream.drain()   # backpressure: window + TLS buffer
    stream.write_eof()                # END_STREAM: our half-close
    stream.reset(ErrorCode.CANCEL)    # RST_STREAM: a TCP reset
    sent, received = await stream.splice_socket(sock)   # fast protocol-level splice

`read` raises `HboneError` when the stream was reset. Memory is bounded: a stream never
buffers more than its receive window (4 MiB) of unread data, and `splice_socket`
stops reading the TCP side while more than `HIGH_WATER` bytes wait for the peer's
window or the TLS transport is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import cast

import structlog

from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.h2core import (
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    H2Connection,
    Headers,
    RequestReceived,
    ResponseReceived,
    StreamError,
    StreamReset,
    StreamWritable,
    error_name,
)
from ztunnel.hbone.request import REASON_HEADER
from ztunnel.identity import SpiffeId

log = structlog.get_logger("ztunnel.hbone")

HIGH_WATER = 1 << 20  # queued-but-unsent bytes per stream before its TCP source pauses
LOW_WATER = 1 << 18
TLS_HIGH_WATER = 4 << 20
TLS_LOW_WATER = 1 << 20
ABUSE_LIMIT = 64 << 20  # TLS write buffer beyond this: the peer does not read at all
# Reads go into shared reused buffers (BufferedProtocol) and are relayed without copies.
# Plain Protocols make asyncio/uvloop allocate a fresh 256 KiB object per TLS read;
# that malloc/free churn (mmap, brk, page faults) cost more than the crypto.
READ_SIZE = 256 * 1024
# Each TCP read becomes one DATA frame and one TLS write (see tuning.tune_allocator).
TCP_READ_SIZE = 256 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)


class _ReadBuffers(threading.local):
    """Read buffers shared by every connection of a thread's event loop.

    A buffer is only used between `get_buffer` and `buffer_updated`, which run back to
    back for one connection at a time, and its bytes are relayed before the callback
    returns; so one buffer per direction serves all connections (no 256 KiB per idle
    connection). If a transport keeps a view of the buffer (it could not send at once),
    the owner replaces the shared buffer with a fresh one and leaves the old to it.
    """

    def __init__(self) -> None:
        self.tcp = memoryview(bytearray(9 + TCP_READ_SIZE))  # 9 bytes for a frame header
        self.tls = memoryview(bytearray(READ_SIZE))


_buffers = _ReadBuffers()


def _reset_transport(transport: asyncio.BaseTransport) -> None:
    """Close a TCP transport with a RST (SO_LINGER 0) instead of a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    else:
        transport.close()


class _TcpSplice(asyncio.BufferedProtocol):
    """The TCP side of `HboneStream.splice_socket` (reads into a reused buffer)."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self.frame = _buffers.tcp
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.eof_in = False  # TCP FIN received (forwarded as END_STREAM)
        self.eof_out = False  # END_STREAM received (forwarded as FIN)
        self.lost = False
        self.batch: list[bytes | memoryview] = []  # DATA of one read, written at once
        self.batch_len = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def renew_buffer(self) -> None:
        """The transport kept a view of the shared buffer: use a fresh one from now on."""
        _buffers.tcp = memoryview(bytearray(9 + TCP_READ_SIZE))

    def get_buffer(self, sizehint: int) -> memoryview:
        # 9 spare bytes in front: the DATA frame header is written there, so a read
        # goes out as one frame without any copy or join.
        self.frame = frame = _buffers.tcp
        return frame[9:]

    def buffer_updated(self, nbytes: int) -> None:
        self.stream._send_from_tcp(self, nbytes)

    def eof_received(self) -> bool:
        self.eof_in = True
        self.stream.write_eof()
        self.stream._check_splice_done()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        st = self.stream
        if not (self.eof_in and self.eof_out) and st._reset_code is None:
            st.reset(ErrorCode.CONNECT_ERROR)
        st._finish_splice()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.stream._release_held()

    def flush_batch(self) -> None:
        """Write the DATA payloads gathered from one TLS read (one syscall)."""
        batch = self.batch
        if not batch:
            return
        n = self.batch_len
        self.batch = []
        self.batch_len = 0
        self.deliver(batch[0] if len(batch) == 1 else batch, n)

    def deliver(self, data: bytes | memoryview | list[bytes | memoryview], n: int) -> None:
        """Write DATA payload(s) to the TCP side; credit the window unless it is full."""
        st = self.stream
        conn = st._conn
        t = self.transport
        if t is None or self.lost:  # the TCP side is gone: drop the bytes
            conn.core.acknowledge(st.stream_id, n)
            return
        if isinstance(data, list):
            t.writelines(data)
        else:
            t.write(data)
        if t.get_write_buffer_size():
            conn._retained = True  # a view is queued: keep its buffer
        if self.write_paused:
            st._held += n
        else:
            conn.core.acknowledge(st.stream_id, n)


class HboneStream:
    """One CONNECT stream as a byte stream. See the module docstring."""

    def __init__(self, conn: HboneConnection, stream_id: int, headers: Headers) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.request_headers = headers
        self.response_headers: Headers = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self._buf: deque[bytes | memoryview] = deque()
        self._buf_len = 0
        self._eof = False
        self._reset_code: int | None = None
        self._reset_remote = False
        self._reset_reason = ""
        self._local_closed = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._response: asyncio.Future[Headers] | None = None
        self._sink: _TcpSplice | None = None
        self._held = 0
        self._reading_paused = False
        self._splice_done: asyncio.Future[tuple[int, int]] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def connection(self) -> HboneConnection:
        return self._conn

    @property
    def reset_code(self) -> int | None:
        """The RST_STREAM code if the stream was reset (by either side), else None."""
        return self._reset_code

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    @property
    def reusable(self) -> bool:
        """Open both ways with nothing unread pending an end: a keep-alive stream that
        may carry another exchange (not reset, no END_STREAM seen, connection open)."""
        return (self._reset_code is None and not self._eof
                and not self._conn.closed.done())

    # ------------------------------------------------------------------ user API

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (n < 0: all buffered); b"" after END_STREAM. Raises if reset."""
        while not self._buf:
            if self._reset_code is not None:
                raise self._reset_error()
            if self._eof:
                return b""
            # the connection's loop (asyncio.get_running_loop() costs a getpid() per
            # call on Python 3.11)
            self._read_waiter = self._conn._loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        buf = self._buf
        if n < 0 or n >= self._buf_len:
            data = b"".join(buf) if len(buf) > 1 else bytes(buf[0])
            buf.clear()
        else:
            parts: list[bytes | memoryview] = []
            need = n
            while need:
                chunk = buf[0]
                if len(chunk) <= need:
                    parts.append(buf.popleft())
                    need -= len(chunk)
                else:
                    view = memoryview(chunk)
                    parts.append(view[:need])
                    buf[0] = view[need:]
                    need = 0
            data = b"".join(parts)
        self._buf_len -= len(data)
        self._conn._acknowledge(self.stream_id, len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly n bytes; HboneError if the stream ends first."""
        parts = []
        while n > 0:
            chunk = await self.read(n)
            if not chunk:
                raise HboneError(f"stream ended with {n} bytes still expected")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def write(self, data: bytes | memoryview) -> None:
        """Queue bytes (no copy); call `drain()` to wait for room. Raises if reset/closed."""
        if self._reset_code is not None:
            raise self._reset_error()
        if self._local_closed:
            raise HboneError("write after write_eof(): the stream is half-closed")
        if not data:
            return
        self.bytes_sent += len(data)
        conn = self._conn
        frame = conn.core.data_frame_now(self.stream_id, data)
        if frame is not None:  # a small write with nothing queued: one frame, one write
            t = conn.transport
            if t is not None and not t.is_closing():
                t.write(frame)
            return
        conn.core.send_data(self.stream_id, data)
        conn._flush()

    @property
    def drained(self) -> bool:
        """Whether `drain()` would return at once (room to write, no reset): callers on a
        hot path check this before paying for the call."""
        conn = self._conn
        return (self._reset_code is None and not conn.write_paused
                and conn.core.pending(self.stream_id) <= LOW_WATER)

    async def drain(self) -> None:
        """Wait until queued data is below the low-water mark and TLS has room."""
        conn = self._conn
        while True:
            if self._reset_code is not None:
                raise self._reset_error()
            if conn.core.pending(self.stream_id) <= LOW_WATER and not conn.write_paused:
                return
            self._drain_waiter = conn._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def write_eof(self) -> None:
        """Half-close: END_STREAM after the queued data (the TCP FIN)."""
        if self._local_closed or self._reset_code is not None:
            return
        self._local_closed = True
        conn = self._conn
        conn.core.end_stream(self.stream_id)
        conn._flush()
        conn._maybe_forget(self)

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        """Abort with RST_STREAM(code): the peer sees a TCP reset."""
        if self._reset_code is not None:
            return
        conn = self._conn
        if conn.core.is_open(self.stream_id):
            conn.core.reset_stream(self.stream_id, code)
            conn._flush()
        self._on_reset(code, remote=False, reason="reset locally")
        conn._forget(self.stream_id)

    async def splice_socket(self, sock: socket.socket) -> tuple[int, int]:
        """Carry bytes between the stream and a connected TCP socket until both sides end.

        FIN <-> END_STREAM both ways, TCP reset <-> RST_STREAM. Returns (bytes from the
        socket into the stream, bytes from the stream into the socket). The socket is
        closed at the end.
        """
        loop = asyncio.get_running_loop()
        self._splice_done = loop.create_future()
        sink = _TcpSplice(self)
        try:
            await loop.connect_accepted_socket(lambda: sink, sock=sock)
        except BaseException:
            sock.close()
            self.reset(ErrorCode.CONNECT_ERROR)
            raise
        self._sink = sink
        # Bytes that arrived before the splice started.
        pending = list(self._buf)
        self._buf.clear()
        self._buf_len = 0
        transport = sink.transport
        assert transport is not None
        for chunk in pending:
            transport.write(chunk)
            self._conn._acknowledge(self.stream_id, len(chunk))
        if self._eof:
            sink.eof_out = True
            if transport.can_write_eof():
                transport.write_eof()
        if self._reset_code is not None:
            _reset_transport(transport)
        self._check_splice_done()
        try:
            return await self._splice_done
        finally:
            if not sink.lost:
                transport.abort() if self._reset_code is not None else transport.close()

    # ------------------------------------------------------------------ internals

    def _reset_error(self) -> HboneError:
        code = self._reset_code or 0
        who = "the peer" if self._reset_remote else "this side"
        detail = f" ({self._reset_reason})" if self._reset_reason else ""
        return HboneError(
            f"HBONE stream {self.stream_id} was reset by {who} with {error_name(code)}{detail}",
            refused=code == ErrorCode.REFUSED_STREAM and self._reset_remote,
        )

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_data(self, data: bytes | memoryview, end: bool) -> None:
        n = len(data)
        self.bytes_received += n
        sink = self._sink
        if sink is not None:
            if n:
                if not sink.batch:
                    self._conn._batched.append(sink)
                sink.batch.append(data)
                sink.batch_len += n
            if end:
                sink.flush_batch()
                self._eof = True
                sink.eof_out = True
                transport = sink.transport
                if transport is not None and not sink.lost and transport.can_write_eof():
                    transport.write_eof()
                self._check_splice_done()
            return
        if n:
            self._buf.append(bytes(data))  # data may be a view of a reused buffer
            self._buf_len += n
        if end:
            self._eof = True
        self._wake_reader()

    def _on_response(self, headers: Headers, end: bool) -> None:
        self.response_headers = headers
        if end:
            self._eof = True
        r = self._response
        if r is not None and not r.done():
            r.set_result(headers)

    def _on_reset(self, code: int, *, remote: bool, reason: str = "") -> None:
        if self._reset_code is not None:
            return
        self._reset_code = code
        self._reset_remote = remote
        self._reset_reason = reason
        self._wake_reader()
        self._wake_drain()
        r = self._response
        if r is not None and not r.done():
            r.set_exception(self._reset_error())
        sink = self._sink
        if sink is not None:
            sink.batch.clear()  # a reset drops what was not delivered yet
            sink.batch_len = 0
            if sink.transport is not None and not sink.lost:
                _reset_transport(sink.transport)
        self._finish_splice()

    def _on_writable(self) -> None:
        self._wake_drain()
        if self._reading_paused:
            self._maybe_resume_reading()

    def _send_from_tcp(self, sink: _TcpSplice, n: int) -> None:
        if self._reset_code is not None or self._local_closed:
            return
        self.bytes_sent += n
        conn = self._conn
        core = conn.core
        # Queued control frames (e.g. WINDOW_UPDATEs) go first, in the same write.
        control = core.take_output() if core.has_output else None
        frame = sink.frame
        t = conn.transport
        sid = self.stream_id
        if t is not None and not t.is_closing() and core.prepare_data_frame(sid, frame, n):
            if control:
                control.append(frame[: 9 + n])
                t.writelines(control)
            else:
                t.write(frame[: 9 + n])
            if t.get_write_buffer_size():  # the transport kept a reference: don't reuse
                sink.renew_buffer()
            full = conn.write_paused  # nothing was queued in the core
        else:
            # Queued behind the peer's window: copy (cheaper than a fresh zeroed buffer).
            core.send_data(sid, frame[9 : 9 + n].tobytes())
            out = core.take_output()
            if control:
                control.extend(out)
                out = control
            if out and t is not None and not t.is_closing():
                t.writelines(out)
            full = core.pending(sid) > HIGH_WATER or conn.write_paused
        source = sink.transport
        if full and source is not None and not self._reading_paused:
            self._reading_paused = True
            source.pause_reading()
            conn._paused_sources.add(self)

    def _maybe_resume_reading(self) -> None:
        conn = self._conn
        if conn.write_paused or conn.core.pending(self.stream_id) > LOW_WATER:
            return
        self._reading_paused = False
        conn._paused_sources.discard(self)
        sink = self._sink
        if sink is not None and sink.transport is not None and not sink.lost:
            sink.transport.resume_reading()

    def _release_held(self) -> None:
        if self._held:
            n, self._held = self._held, 0
            self._conn._acknowledge(self.stream_id, n)

    def _check_splice_done(self) -> None:
        sink = self._sink
        if sink is not None and sink.eof_in and sink.eof_out:
            self._finish_splice()

    def _finish_splice(self) -> None:
        d = self._splice_done
        if d is not None and not d.done():
            d.set_result((self.bytes_sent, self.bytes_received))
        self._conn._paused_sources.discard(self)


RequestCallback = Callable[["HboneConnection", HboneStream], None]


class HboneConnection(asyncio.BufferedProtocol):
    """One HBONE (HTTP/2 over TLS) connection, either role. See the module docstring.

    Client: `await conn.open_stream(headers)` -> HboneStream (raises HboneError when
    refused). Server: `on_request(conn, stream)` is called for each CONNECT; answer with
    `conn.respond(stream, status, reason)`.
    `verify(ssl_object) -> identity` runs at connection_made; when it raises, the
    connection is closed and `ready` carries the error.
    """

    def __init__(
        self,
        *,
        client: bool,
        verify: Callable[[ssl.SSLObject | None], SpiffeId] | None = None,
        on_request: RequestCallback | None = None,
        on_close: Callable[[HboneConnection], None] | None = None,
        on_made: Callable[[HboneConnection], None] | None = None,
        max_concurrent_streams: int = 100,
        keepalive_interval: float = 30.0,
        keepalive_timeout: float = 10.0,
        description: str = "",
    ) -> None:
        self.core = H2Connection(client=client, max_concurrent_streams=max_concurrent_streams)
        self.client = client
        self.streams: dict[int, HboneStream] = {}
        self.transport: asyncio.Transport | None = None
        self.peer_identity: SpiffeId | None = None  # verified at connection_made
        self.peer_addr: tuple[str, int] = ("", 0)
        self.local_addr: tuple[str, int] = ("", 0)
        self.write_paused = False
        self.error: str | None = None
        self.description = description
        self._paused_sources: set[HboneStream] = set()
        self._verify = verify
        self._on_request = on_request
        self._on_close = on_close
        self._on_made = on_made
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.idle_since = self._loop.time()
        self._rbuf = _buffers.tls
        self._retained = False
        self._batched: list[_TcpSplice] = []  # splices with DATA gathered in this read
        self._local_close = False  # close() / abort() / drained: not the peer's doing

    # ------------------------------------------------------------------ state

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    @property
    def usable(self) -> bool:
        """Whether new streams may go on this connection (client side)."""
        return (
            self.transport is not None
            and not self.closed.done()
            and self.ready.done()
            and self.ready.exception() is None
            and self.core.usable
        )

    def can_open(self, limit: int) -> bool:
        return self.usable and self.core.can_open(limit)

    # ------------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.peer_addr = (str(peer[0]), int(peer[1]))
        if isinstance(local, tuple):
            self.local_addr = (str(local[0]), int(local[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=TLS_HIGH_WATER, low=TLS_LOW_WATER)
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            if ssl_object is not None:
                alpn = ssl_object.selected_alpn_protocol()
                if alpn != "h2":
                    raise HboneError(
                        f"peer {self._peer()} did not negotiate ALPN h2 (got {alpn!r}): "
                        "it is not an HBONE endpoint"
                    )
            if self._verify is not None:
                self.peer_identity = self._verify(ssl_object)
        except Exception as e:
            self.error = str(e)
            if not self.ready.done():
                self.ready.set_exception(e if isinstance(e, HboneError) else HboneError(str(e)))
                self.ready.exception()  # mark retrieved: the caller may be gone
            transport.abort()
            return
        self.core.initiate()
        self._flush()
        if self._on_made is not None:
            self._on_made(self)
        if not self.ready.done():
            self.ready.set_result(None)
        self._schedule_keepalive()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._rbuf = buf = _buffers.tls
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        # DATA payloads are handed on as views of the read buffer (no copy); if a
        # transport kept one, the next read goes into a fresh buffer.
        self._dispatch(self.core.receive(self._rbuf[:nbytes]))
        if self._retained:
            self._retained = False
            _buffers.tls = memoryview(bytearray(READ_SIZE))

    def data_received(self, data: bytes | memoryview) -> None:
        self._dispatch(self.core.receive(data))

    def _dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        if len(events) == 1:  # latency path: one DATA frame for a spliced stream
            ev = events[0]
            if type(ev) is DataReceived and not ev.end_stream:
                st = streams.get(ev.stream_id)
                sink = st._sink if st is not None else None
                if st is not None and sink is not None and not sink.batch:
                    n = len(ev.data)  # counted as in `_on_data`: no padding
                    st.bytes_received += n
                    sink.deliver(ev.data, n)
                    if self.core.has_output:
                        self._flush()
                    return
        # streams that may have ended, forgotten after the whole batch: the core has
        # already applied every frame of it, so a stream a later RST_STREAM closed
        # must stay findable until that event reaches it
        ended: list[HboneStream] = []
        for ev in events:
            if type(ev) is DataReceived:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_data(ev.data, ev.end_stream)
                    if ev.end_stream:
                        ended.append(st)
                else:
                    self.core.acknowledge(ev.stream_id, ev.flow_len)
            elif type(ev) is StreamWritable:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_writable()
                    ended.append(st)
            elif type(ev) is StreamReset:
                st = streams.pop(ev.stream_id, None)
                if st is not None:
                    reason = "" if ev.remote else "protocol error from the peer"
                    st._on_reset(ev.code, remote=ev.remote, reason=reason)
                self._after_stream_gone()
            elif type(ev) is RequestReceived:
                st = HboneStream(self, ev.stream_id, ev.headers)
                if ev.end_stream:
                    st._eof = True
                streams[ev.stream_id] = st
                if self._on_request is not None:
                    self._on_request(self, st)
                else:
                    self.core.reset_stream(ev.stream_id, ErrorCode.REFUSED_STREAM)
                    streams.pop(ev.stream_id, None)
            elif type(ev) is ResponseReceived:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_response(ev.headers, ev.end_stream)
                    ended.append(st)
            elif type(ev) is GoAwayReceived:
                if ev.code != ErrorCode.NO_ERROR:
                    self.error = (
                        f"peer {self._peer()} sent GOAWAY {error_name(ev.code)}: "
                        f"{ev.debug.decode('utf-8', 'replace')}"
                    )
                self._after_stream_gone()
            elif type(ev) is ConnectionTerminated:
                self.error = f"HTTP/2 error with {self._peer()}: {ev.reason}"
                log.warning("hbone_protocol_error", peer=self._peer(), reason=ev.reason)
        for st in ended:
            self._maybe_forget(st)
        if self._batched:
            for sink in self._batched:
                sink.flush_batch()
            self._batched.clear()
        if self.core.has_output:
            self._flush()
        if self.core.terminated and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if exc is not None and self.error is None:
            self.error = f"connection to {self._peer()} lost: {exc}"
        elif self.error is None and not self._local_close:
            self.error = f"peer {self._peer()} closed the connection"
        reason = self.error or f"connection to {self._peer()} closed"
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            st._on_reset(ErrorCode.CONNECT_ERROR, remote=True, reason=reason)
        if not self.ready.done():
            self.ready.set_exception(HboneError(reason))
            self.ready.exception()
        if not self.closed.done():
            self.closed.set_result(None)
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        t = self.transport
        if t is not None and t.get_write_buffer_size() > ABUSE_LIMIT:
            self.error = f"peer {self._peer()} does not read: {ABUSE_LIMIT} bytes unsent"
            t.abort()

    def resume_writing(self) -> None:
        self.write_paused = False
        for st in list(self._paused_sources):
            st._maybe_resume_reading()
        for st in list(self.streams.values()):
            st._wake_drain()

    # ------------------------------------------------------------------ actions

    def _peer(self) -> str:
        if self.description:
            return self.description
        host, port = self.peer_addr
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _flush(self) -> None:
        out = self.core.take_output()
        if out:
            t = self.transport
            if t is not None and not t.is_closing():
                if len(out) == 1:
                    t.write(out[0])
                else:
                    t.writelines(out)

    def _acknowledge(self, stream_id: int, n: int) -> None:
        core = self.core
        core.acknowledge(stream_id, n)
        if core.has_output:  # a WINDOW_UPDATE is due (acks are batched)
            self._flush()

    def _forget(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self._after_stream_gone()

    def _maybe_forget(self, st: HboneStream) -> None:
        if not self.core.is_open(st.stream_id):
            self._forget(st.stream_id)

    def _after_stream_gone(self) -> None:
        if not self.streams:
            self.idle_since = self._loop.time()
            if (self.core.goaway_sent or self.core.goaway_received) and self.transport:
                self._flush()
                self._local_close = True
                self.transport.close()

    def _schedule_keepalive(self) -> None:
        if self._keepalive_interval <= 0:
            return
        tick = min(self._keepalive_interval, self._keepalive_timeout) / 4
        self._timer = self._loop.call_later(tick, self._keepalive)

    def _keepalive(self) -> None:
        self._timer = None
        if self.transport is None or self.closed.done():
            return
        alive = self.core.keepalive(
            self._loop.time(), self._keepalive_interval, self._keepalive_timeout
        )
        if not alive:
            self.error = (
                f"peer {self._peer()} did not answer PING within {self._keepalive_timeout:g}s: "
                "connection is dead (network partition or peer hung)"
            )
            log.warning("hbone_keepalive_timeout", peer=self._peer())
            self.transport.abort()
            return
        self._flush()
        self._schedule_keepalive()

    async def open_stream(
        self, headers: Headers, *, response_timeout: float | None = 30.0
    ) -> HboneStream:
        """Client: send a CONNECT and wait for 200. HboneError when refused or reset."""
        if not self.ready.done():
            await self.ready
        self.ready.result()
        if self.closed.done() or self.transport is None or self.transport.is_closing():
            raise HboneError(
                f"connection to {self._peer()} is closed: {self.error or 'closed'}", refused=True
            )
        try:
            sid = self.core.open_stream(headers)
        except StreamError as e:
            raise HboneError(
                f"cannot open a stream to {self._peer()}: {e}", refused=e.retryable
            ) from e
        st = HboneStream(self, sid, headers)
        st._response = self._loop.create_future()
        self.streams[sid] = st
        self._flush()
        try:
            async with asyncio.timeout(response_timeout):
                response = await st._response
        except TimeoutError:
            st.reset(ErrorCode.CANCEL)
            raise HboneError(
                f"CONNECT to {self._peer()} got no response within {response_timeout}s: "
                "is the peer overloaded or its upstream connect hanging?"
            ) from None
        finally:
            st._response = None
        status = response[0][1] if response and response[0][0] == ":status" else "?"
        if status != "200":
            reason = next((v for k, v in response if k == REASON_HEADER), "")
            st.reset(ErrorCode.CANCEL) if self.core.is_open(sid) else self._forget(sid)
            code = int(status) if status.isdigit() else None
            raise HboneError(
                f"CONNECT refused with {status}" + (f": {reason}" if reason else ""),
                status=code,
            )
        return st

    def respond(
        self,
        stream: HboneStream,
        status: int,
        reason: str = "",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Server: answer a CONNECT; any status but 200 ends the stream."""
        h: Headers = [(":status", str(status))]
        if reason and status != 200:
            h.append((REASON_HEADER, reason.replace("\r", " ").replace("\n", " ")))
        if headers:
            h.extend(headers)
        end = status != 200
        self.core.respond(stream.stream_id, h, end_stream=end)
        if end:
            stream._local_closed = True
            if self.core.is_open(stream.stream_id):
                # The client may still send: tell it to stop (RFC 9113 section 8.1).
                self.core.reset_stream(stream.stream_id, ErrorCode.NO_ERROR)
            self._forget(stream.stream_id)
        self._flush()

    def goaway(self) -> None:
        """Graceful drain: no new streams; the connection closes when the last one ends."""
        self.core.goaway()
        self._flush()
        self._after_stream_gone()

    def close(self) -> None:
        """GOAWAY and close now (open streams are reset)."""
        self._local_close = True
        if self.transport is not None and not self.transport.is_closing():
            self.core.goaway()
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (no GOAWAY)."""
        self._local_close = True
        if self.transport is not None:
            self.transport.abort()
