"""HTTP/1.1 for the waypoint (httptools): the downstream server and the shared exchange types.

The downstream side runs inside an HBONE stream (or any `Conn`)::

    await serve_http1(conn, handler, info=ConnInfo(...), initial=first_bytes)

parses requests (keep-alive, chunked bodies, pipelining: requests are answered one
after another, in order), hands each to `handler(exchange)` and frames the response
(`content-length` when known, else chunked; nothing for HEAD/204/304). An `Upgrade`
request (WebSocket) is handed over like any other; when the upstream answers 101 the
handler calls `exchange.splice(upstream_conn, leftover)` and the bytes then flow
raw both ways.

`Body` is a request body as it arrives (a bounded queue with backpressure); a body
that fits `read_all(limit)` is replayable (retries, mirrors). `Responder` is how a
handler answers, whatever the downstream protocol. The encode helpers are used by
the upstream client too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httptools
import structlog

from waypoint.model import Headers, Request

__all__ = [
    "HOP_BY_HOP",
    "Body",
    "Conn",
    "ConnInfo",
    "Draining",
    "Exchange",
    "Handler",
    "Responder",
    "TcpConn",
    "encode_request_head",
    "encode_response_head",
    "pipe",
    "serve_http1",
]

log = structlog.get_logger("waypoint")

#: headers that describe one hop, never forwarded (RFC 9110 section 7.6.1; `expect` is
#: answered by the waypoint itself)
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade",
    "http2-settings", "proxy-authenticate", "proxy-authorization", "trailer", "expect",
})

MAX_HEAD = 64 * 1024
BODY_HIGH_WATER = 1 << 20
#: bytes asked for per read, downstream and upstream (HBONE streams hand over what they hold)
READ_SIZE = 256 * 1024

REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    204: "No Content", 206: "Partial Content", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 307: "Temporary Redirect",
    308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 418: "I'm a teapot", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Conn(Protocol):
    """A bidirectional byte stream: an `HboneStream` or a `TcpConn`."""

    async def read(self, n: int = -1) -> bytes: ...
    def write(self, data: bytes | memoryview) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...

    @property
    def drained(self) -> bool:
        """Whether `drain()` would return at once: callers skip the await then."""
        ...


class TcpConn:
    """A plain TCP connection with the `Conn` interface (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, n: int = -1) -> bytes:
        return await self.reader.read(n if n > 0 else READ_SIZE)

    def write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    @property
    def drained(self) -> bool:
        w = self.writer
        return not w.is_closing() and w.transport.get_write_buffer_size() == 0

    def write_eof(self) -> None:
        if not self.writer.is_closing() and self.writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()


def close_conn(conn: Conn) -> None:
    """Close or reset a connection we are done with (no more bytes either way)."""
    close = getattr(conn, "close", None)
    if close is not None:
        close()
        return
    reset = getattr(conn, "reset", None)
    if reset is not None:
        reset()


async def pipe(a: Conn, b: Conn, a_first: bytes = b"", b_first: bytes = b"") -> tuple[int, int]:
    """Copy bytes both ways until both directions ended (FIN/END_STREAM carried over).

    `a_first` / `b_first` are bytes already read from `a` / `b`. Returns (bytes a->b,
    bytes b->a). An error in either direction ends both.
    """
    counts = [0, 0]

    async def one(src: Conn, dst: Conn, first: bytes, i: int) -> None:
        if first:
            dst.write(first)
            counts[i] += len(first)
            await dst.drain()
        while True:
            data = await src.read(READ_SIZE)
            if not data:
                dst.write_eof()
                return
            counts[i] += len(data)
            dst.write(data)
            await dst.drain()

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(one(a, b, a_first, 0))
            tg.create_task(one(b, a, b_first, 1))
    except* Exception:
        close_conn(a)
        close_conn(b)
    return counts[0], counts[1]


# ----------------------------------------------------------------------------- body


class Body:
    """A request body as it arrives: `feed`/`finish` by the reader, `next` by the handler."""

    def __init__(self, length: int | None = None, *,
                 on_consumed: Callable[[int], None] | None = None) -> None:
        self.length = length  # declared content-length, None when chunked/streamed
        self.received = 0
        self.trailers: Headers = ()
        self.done = False
        self.error: BaseException | None = None
        self.buffered: bytes | None = None  # the whole body once `read_all` got it
        self._chunks: deque[bytes] = deque()
        self._pending = 0
        self._waiter: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._prefix: list[bytes] = []
        self._on_consumed = on_consumed

    @classmethod
    def of(cls, data: bytes) -> Body:
        """A complete body."""
        b = cls(len(data))
        if data:
            b.feed(data)
        b.finish()
        return b

    # --------------------------------------------------------------- producer side

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._pending += len(data)
        self.received += len(data)
        self._wake()

    def finish(self, trailers: Headers = ()) -> None:
        self.trailers = trailers
        self.done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.error = exc
            self.done = True
            self._wake()

    @property
    def congested(self) -> bool:
        return self._pending > BODY_HIGH_WATER

    async def wait_room(self) -> None:
        while self._pending > BODY_HIGH_WATER and not self.done:
            self._room = asyncio.get_running_loop().create_future()
            try:
                await self._room
            finally:
                self._room = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --------------------------------------------------------------- consumer side

    async def next(self) -> bytes:
        """The next chunk; b"" at the end. Raises ConnectionError if the client went away."""
        while not self._chunks:
            if self.done:
                if self.error is not None:
                    raise ConnectionError(f"request body incomplete: {self.error}")
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._pending -= len(data)
        if self._on_consumed is not None:
            self._on_consumed(len(data))
        r = self._room
        if r is not None and not r.done() and self._pending <= BODY_HIGH_WATER // 2:
            r.set_result(None)
        return data

    def complete(self) -> bytes | None:
        """The whole body when it has arrived already and nothing was taken from it
        (then replayable, as after `read_all`), else None: no waiting."""
        if self.buffered is not None:
            return self.buffered
        if not self.done or self.error is not None or self._prefix:
            return None
        chunks = self._chunks
        data = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        chunks.clear()
        if self._pending and self._on_consumed is not None:
            self._on_consumed(self._pending)
        self._pending = 0
        r = self._room
        if r is not None and not r.done():
            r.set_result(None)
        self.buffered = data
        return data

    async def read_all(self, limit: int) -> bytes | None:
        """The whole body if it ends within `limit` bytes (then replayable), else None
        (what was read is kept and `chunks()` still yields everything)."""
        if self.buffered is not None:
            return self.buffered
        if self.length is not None and self.length > limit:
            return None
        if self.done and self.received <= limit and not self._prefix:
            return self.complete()
        size = sum(len(p) for p in self._prefix)
        while True:
            if size > limit:
                return None
            if not self._chunks and not self.done and self.length is None:
                # a stream (gRPC, chunked upload) still open: its end may only come after
                # the response starts (bidirectional streaming), so never wait for it
                return None
            chunk = await self.next()
            if not chunk:
                self.buffered = b"".join(self._prefix)
                self._prefix = []
                return self.buffered
            self._prefix.append(chunk)
            size += len(chunk)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every chunk of the body, including what `read_all` already took."""
        if self.buffered is not None:
            if self.buffered:
                yield self.buffered
            return
        while self._prefix:
            yield self._prefix.pop(0)
        while True:
            chunk = await self.next()
            if not chunk:
                return
            yield chunk

    async def drain_all(self, limit: int) -> bool:
        """Discard the rest of the body (up to `limit` bytes); True when it ended."""
        n = 0
        while n <= limit:
            try:
                chunk = await self.next()
            except ConnectionError:
                return False
            if not chunk:
                return True
            n += len(chunk)
        return False


# ----------------------------------------------------------------------------- exchange


class Responder(Protocol):
    """How a handler answers one request (HTTP/1.1 or HTTP/2 downstream)."""

    started: bool
    bytes_sent: int

    async def start(self, status: int, headers: Headers, *, length: int | None,
                    end: bool, body: bytes = b"") -> None: ...
    async def data(self, chunk: bytes) -> None: ...
    async def end(self, trailers: Headers = ()) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """Where a downstream connection comes from (the HBONE CONNECT it arrived on)."""

    dest_ip: str
    dest_port: int
    source_ip: str = ""
    source_principal: str | None = None
    peer_address: str = ""


@dataclass(eq=False, slots=True)
class Exchange:
    """One request in flight: what the handler reads and how it answers."""

    request: Request
    body: Body
    responder: Responder
    version: str  # downstream HTTP version: "1.1", "1.0" or "2"
    protocol: str = "http"  # "http" or "grpc"
    upgrade: str = ""  # the Upgrade token of an HTTP/1.1 upgrade request (websocket)
    #: for upgrades: after a 101 from upstream, carry raw bytes between the client and
    #: `upstream` (`leftover` = bytes the upstream sent after its 101 head)
    splice: Callable[[Conn, bytes], Awaitable[tuple[int, int]]] | None = None
    started_at: float = 0.0  # loop.time() when the request head was complete
    #: set by the handler when the exchange broke mid-way: the protocol layer then
    #: closes the connection (HTTP/1.1) or resets the stream (HTTP/2)
    aborted: bool = False


Handler = Callable[[Exchange], Awaitable[None]]


def _encode_head(start_line: str, headers: Sequence[tuple[str, str]]) -> bytes:
    # "name: value" lines joined in C (no Python loop per header)
    if not headers:
        return f"{start_line}\r\n\r\n".encode("latin-1")
    lines = "\r\n".join(map(": ".join, headers))
    return f"{start_line}\r\n{lines}\r\n\r\n".encode("latin-1")


def encode_response_head(status: int, headers: Sequence[tuple[str, str]],
                         version: str = "1.1") -> bytes:
    return _encode_head(f"HTTP/{version} {status} {REASONS.get(status, 'Unknown')}", headers)


def encode_request_head(method: str, target: str, headers: Sequence[tuple[str, str]]) -> bytes:
    return _encode_head(f"{method} {target} HTTP/1.1", headers)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_last_chunk(trailers: Sequence[tuple[str, str]] = ()) -> bytes:
    return b"0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in trailers).encode("latin-1") + b"\r\n"


def head_framing(headers: Sequence[tuple[str, str]]) -> tuple[int | None, bool, set[str]]:
    """One pass over a head: the content-length (None when absent or malformed), whether
    a transfer-encoding is present, and the Connection header's tokens."""
    length: int | None = None
    chunked = False
    tokens: set[str] = set()
    for k, v in headers:
        if k == "content-length":
            n = v.strip()
            if n.isdigit():
                length = int(n)
        elif k == "transfer-encoding":
            chunked = True
        elif k == "connection":
            tokens.update(t.strip().lower() for t in v.split(",") if t.strip())
    return length, chunked, tokens


def connection_tokens(headers: Sequence[tuple[str, str]]) -> set[str]:
    out: set[str] = set()
    for k, v in headers:
        if k == "connection":
            out.update(t.strip().lower() for t in v.split(",") if t.strip())
    return out


def strip_hop_by_hop(headers: Sequence[tuple[str, str]], keep: Sequence[str] = ()) -> Headers:
    """Headers without hop-by-hop ones (and those the Connection header names)."""
    named = connection_tokens(headers)
    return tuple((k, v) for k, v in headers
                 if k in keep or (k not in HOP_BY_HOP and k not in named))


# ----------------------------------------------------------------------------- server


class _H1Responder:
    """Frames one response on an HTTP/1.1 connection."""

    def __init__(self, conn: Conn, version: str, method: str, keep_alive: bool) -> None:
        self.conn = conn
        self.version = version
        self.method = method
        self.keep_alive = keep_alive
        self.started = False
        self.finished = False
        self.bytes_sent = 0
        self.status = 0
        self._chunked = False
        self._no_body = False
        self._close_delimited = False

    async def start(self, status: int, headers: Headers, *, length: int | None,
                    end: bool, body: bytes = b"") -> None:
        """Send the head (and `body`, the first bytes of the body, in the same write)."""
        self.started = True
        self.status = status
        out = [h for h in headers if h[0] not in HOP_BY_HOP and h[0] != "content-length"]
        self._no_body = (self.method == "HEAD" or status in (204, 304) or 100 <= status < 200)
        if status == 101:
            out += [(k, v) for k, v in headers if k in ("upgrade",)]
            out.append(("connection", "upgrade"))
        elif self._no_body:
            if length is not None and status != 204 and self.method == "HEAD":
                out.append(("content-length", str(length)))
        elif end:
            out.append(("content-length", "0"))
        elif length is not None:
            out.append(("content-length", str(length)))
        elif self.version == "1.1":
            out.append(("transfer-encoding", "chunked"))
            self._chunked = True
        else:
            self._close_delimited = True
            self.keep_alive = False
        if status != 101 and not self.keep_alive:
            out.append(("connection", "close"))
        head = encode_response_head(status, out, "1.1")
        if body and not self._no_body:
            self.bytes_sent += len(body)
            head += encode_chunk(body) if self._chunked else body
        self.conn.write(head)
        if end and status != 101:
            self.finished = True
        if not self.conn.drained:
            await self.conn.drain()

    async def data(self, chunk: bytes) -> None:
        if not chunk or self._no_body:
            return
        self.bytes_sent += len(chunk)
        self.conn.write(encode_chunk(chunk) if self._chunked else chunk)
        await self.conn.drain()

    async def end(self, trailers: Headers = ()) -> None:
        if self.finished:
            return
        self.finished = True
        if self._chunked:
            self.conn.write(encode_last_chunk(trailers))
            await self.conn.drain()


class _H1Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "upgrade", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.method = ""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        self.body: Body | None = None


class _ParserCallbacks:
    """httptools callbacks collecting requests into a queue."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.current: _H1Request | None = None
        self.ready: deque[_H1Request] = deque()
        self.head_size = 0
        self._name = b""

    def on_message_begin(self) -> None:
        self.current = _H1Request()
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEAD:
            raise ValueError("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD:
            raise ValueError("request head too large")
        self.current.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        r = self.current
        p = self.parser
        assert r is not None and p is not None
        r.method = p.get_method().decode("ascii")
        r.version = p.get_http_version()
        r.keep_alive = p.should_keep_alive()
        r.upgrade = p.should_upgrade()
        length, chunked, _ = head_framing(r.headers)
        if not chunked and length is None:
            length = 0
        r.body = Body(length)
        self.ready.append(r)

    def on_body(self, body: bytes) -> None:
        assert self.current is not None and self.current.body is not None
        self.current.body.feed(body)

    def on_message_complete(self) -> None:
        r = self.current
        if r is not None and r.body is not None:
            r.body.finish()
        self.current = None


async def _write_simple(conn: Conn, status: int, body: bytes) -> None:
    conn.write(encode_response_head(status, [("content-type", "text/plain"),
                                             ("content-length", str(len(body))),
                                             ("connection", "close")]) + body)
    with contextlib.suppress(Exception):
        await conn.drain()


class Draining:
    """Graceful shutdown shared by a server's downstream connections: once `start()`ed,
    idle HTTP/1.1 keep-alive connections are closed (FIN) and busy ones answer their
    current request with `connection: close`; HTTP/2 connections that registered with
    `on_start` are told (GOAWAY, see `waypoint.http2`)."""

    def __init__(self) -> None:
        self.on = False
        self._conns: dict[int, _Tracked] = {}
        self._callbacks: dict[int, Callable[[], None]] = {}

    def start(self) -> None:
        self.on = True
        for t in list(self._conns.values()):
            if t.idle:
                with contextlib.suppress(Exception):
                    t.conn.write_eof()
        self._conns.clear()
        callbacks, self._callbacks = list(self._callbacks.values()), {}
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("drain_callback_failed")

    def on_start(self, owner: object, cb: Callable[[], None]) -> None:
        """Run `cb` when draining starts (at once if it has); `forget(owner)` undoes."""
        if self.on:
            cb()
        else:
            self._callbacks[id(owner)] = cb

    def forget(self, owner: object) -> None:
        self._callbacks.pop(id(owner), None)

    def track(self, conn: Conn) -> _Tracked:
        """Follow an HTTP/1.1 connection; its `idle` flag says whether it waits for a
        request (then draining closes it). `untrack` when it ends."""
        t = self._conns[id(conn)] = _Tracked(conn)
        return t

    def untrack(self, conn: Conn) -> None:
        self._conns.pop(id(conn), None)


class _Tracked:
    """A connection `Draining` follows (a flag, set without a call per request)."""

    __slots__ = ("conn", "idle")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.idle = False


async def serve_http1(conn: Conn, handler: Handler, *, info: ConnInfo,
                      initial: bytes = b"", scheme: str = "http",
                      draining: Draining | None = None) -> None:
    """Serve HTTP/1.1 requests on `conn` until the client closes or asks to (or the
    server drains)."""
    cb = _ParserCallbacks()
    parser = httptools.HttpRequestParser(cb)
    cb.parser = parser
    new_request = asyncio.Event()
    state: dict[str, object] = {"eof": False, "error": None, "upgrade_rest": None}
    loop = asyncio.get_running_loop()

    def feed(data: bytes) -> bool:
        """Feed the parser; False when reading must stop (error or upgrade)."""
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = int(e.args[0]) if e.args else len(data)
            state["upgrade_rest"] = data[offset:]
            new_request.set()
            return False
        except (httptools.HttpParserError, ValueError) as e:
            state["error"] = e
            if cb.current is not None and cb.current.body is not None:
                cb.current.body.fail(e)
            new_request.set()
            return False
        if cb.ready:
            new_request.set()
        return True

    stopped = False  # reading ended: EOF, error or upgrade

    async def read_once() -> bool:
        """Read and parse one chunk; False once reading has ended."""
        nonlocal stopped
        try:
            data = await conn.read(READ_SIZE)
        except Exception as e:  # the stream was reset by the client
            data = b""
            if cb.current is not None and cb.current.body is not None:
                cb.current.body.fail(e)
        if not data:
            state["eof"] = True
            if cb.current is not None and cb.current.body is not None:
                cb.current.body.fail(ConnectionError("client closed mid-request"))
            stopped = True
            new_request.set()
            return False
        if not feed(data):
            stopped = True
            return False
        return True

    async def reader() -> None:
        """Keep reading beside the handler (a request body still arriving)."""
        while True:
            cur = cb.current
            if cur is not None and cur.body is not None and cur.body.congested:
                await cur.body.wait_room()
            if len(cb.ready) > 16:  # a deep pipeline: let the handler catch up
                await asyncio.sleep(0.001)
                continue
            if not await read_once():
                return

    reader_task: asyncio.Task[None] | None = None

    async def handle_all(tg: asyncio.TaskGroup) -> None:
        nonlocal reader_task, stopped
        if initial and not feed(initial):
            stopped = True
        while True:
            while not cb.ready:
                if state["error"] is not None:
                    await _write_simple(conn, 400, b"bad request\n")
                    return
                if state["eof"]:
                    return
                if reader_task is None and not stopped:
                    if tracked is not None:
                        if draining is not None and draining.on and not cb.current:
                            return  # idle while draining: close
                        tracked.idle = cb.current is None
                    try:
                        await read_once()  # idle connection: read in this task
                    finally:
                        if tracked is not None:
                            tracked.idle = False
                    continue
                if stopped and reader_task is None:
                    return
                new_request.clear()
                await new_request.wait()
            r = cb.ready.popleft()
            assert r.body is not None
            if not r.body.done and reader_task is None and not stopped:
                # the body is still arriving: read it beside the handler from now on
                reader_task = tg.create_task(reader())
            target = r.url.decode("latin-1")
            # one pass over the head: Host, Upgrade, Expect, and the end-to-end headers
            # (hop-by-hop ones and those the Connection header names are dropped)
            authority = upgrade_token = ""
            expect_continue = False
            named = connection_tokens(r.headers)
            headers: list[tuple[str, str]] = []
            for h in r.headers:
                k = h[0]
                if k == "host":
                    if not authority:
                        authority = h[1]
                elif k in HOP_BY_HOP or k in named:
                    if k == "upgrade":
                        if not upgrade_token:
                            upgrade_token = h[1]
                    elif k == "expect":
                        expect_continue |= h[1].lower() == "100-continue"
                else:
                    headers.append(h)
            upgrade = upgrade_token if r.upgrade and r.method != "CONNECT" else ""
            if upgrade:
                headers += (("connection", "upgrade"), ("upgrade", upgrade))
            # positional: a frozen dataclass's keyword init costs a third more
            req = Request(r.method, target or "/", authority, tuple(headers), scheme,
                          info.dest_ip, info.dest_port, info.source_ip, info.source_principal)
            keep = r.keep_alive and not upgrade and not (draining is not None and draining.on)
            resp = _H1Responder(conn, r.version, r.method, keep)
            spliced = False
            splice: Callable[[Conn, bytes], Awaitable[tuple[int, int]]] | None = None
            if upgrade:

                async def splice(upstream: Conn, leftover: bytes) -> tuple[int, int]:
                    nonlocal spliced
                    spliced = True
                    while state["upgrade_rest"] is None and not state["eof"]:
                        new_request.clear()
                        await new_request.wait()
                    rest = state["upgrade_rest"]
                    first = rest if isinstance(rest, bytes) else b""
                    return await pipe(conn, upstream, first, leftover)

            if expect_continue and not r.body.done:
                # the client waits for this before sending its body (answered here, as
                # Envoy does; the upstream gets the body without the expectation)
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            ex = Exchange(req, r.body, resp, r.version, upgrade=upgrade,
                          splice=splice, started_at=loop.time())
            await handler(ex)
            if spliced or ex.aborted:
                return
            if not resp.started:
                await _write_simple(conn, 502, b"no response\n")
                return
            await resp.end()
            if not resp.keep_alive or upgrade:
                return
            if r.body.error is not None:
                return
            # a handler that answered without reading the whole body: skip it (bounded)
            if not r.body.done and not await r.body.drain_all(BODY_HIGH_WATER):
                return

    tracked = draining.track(conn) if draining is not None else None
    async with asyncio.TaskGroup() as tg:
        try:
            await handle_all(tg)
        finally:
            if draining is not None:
                draining.untrack(conn)
            if reader_task is not None:
                reader_task.cancel()
    with contextlib.suppress(Exception):
        conn.write_eof()
