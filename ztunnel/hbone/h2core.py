"""Lean sans-IO HTTP/2 connection specialised for CONNECT tunnels (bytes in, events and bytes out).

Only what HBONE needs: connection preface, SETTINGS/ACK (the peer's settings are
respected), HEADERS + CONTINUATION decoded with `hpack`, DATA with flow control in both
directions, RST_STREAM, PING, GOAWAY, WINDOW_UPDATE. PRIORITY and unknown frame types are
ignored; PUSH_PROMISE is a protocol error (push is disabled).

Usage (both roles)::

    conn = H2Connection(client=True)
    conn.initiate()                      # queues preface + SETTINGS + connection WINDOW_UPDATE
    transport.write(conn.data_to_send())
    for event in conn.receive(data):     # never raises: protocol errors become GOAWAY/RST_STREAM
        ...
    transport.write(conn.data_to_send())

Flow control: received DATA counts against the connection window, which is re-opened
as data arrives, and against the stream window, which is re-opened only when the
application calls `acknowledge(stream_id, n)` after it has consumed the bytes. So the
memory a stream can pin is bounded by its window (4 MiB by default). Each window is
re-opened once half of it is used, and a stream's WINDOW_UPDATE carries the connection
credit due in the same buffer: a bulk transfer costs one small write per 2 MiB.
Outgoing data is queued per stream by `send_data` and framed as the peer's windows
allow; `pending()` says how much is still queued (the adapter applies backpressure to its
TCP side from it) and a `StreamWritable` event says a stream's queue has been flushed by
a WINDOW_UPDATE.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

# Settings identifiers.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = 2**24 - 1
UNLIMITED = 2**31 - 1
LARGE = 16384  # take_output: payloads this big are not copied into a joined buffer


class ErrorCode(enum.IntEnum):
    """HTTP/2 error codes (RFC 9113 section 7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def error_name(code: int) -> str:
    """Readable name of an HTTP/2 error code (unknown codes as hex)."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


_HDR = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")
_SETTING = struct.Struct(">HI")
_pack_hdr = _HDR.pack
_unpack_hdr = _HDR.unpack_from

Headers = list[tuple[str, str]]


# ---------------------------------------------------------------------------- events


@dataclass(slots=True)
class RequestReceived:
    """Server side: a new stream opened by the peer's HEADERS (a CONNECT request)."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class ResponseReceived:
    """Client side: the final (non-1xx) response HEADERS on one of our streams."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class DataReceived:
    """Payload of a DATA frame (a view into received bytes: no copy); `end_stream` = FIN.

    Also emitted with empty data and end_stream=True for trailers ending a stream.
    Call `acknowledge(stream_id, flow_len)` once the bytes are consumed. `flow_len` is
    always `len(data)`: the application bytes, never padding (the core credits a padded
    frame's padding itself, as it arrives).
    """

    stream_id: int
    data: bytes | memoryview
    end_stream: bool
    flow_len: int


@dataclass(slots=True)
class StreamReset:
    """The stream is gone: reset by the peer (remote=True) or by us on a stream error."""

    stream_id: int
    code: int
    remote: bool


@dataclass(slots=True)
class StreamWritable:
    """A WINDOW_UPDATE (or SETTINGS) let the stream's queued data go out completely."""

    stream_id: int


@dataclass(slots=True)
class PingAcked:
    """The peer answered one of our PINGs."""

    payload: bytes


@dataclass(slots=True)
class GoAwayReceived:
    """The peer is going away: streams above last_stream_id were not processed."""

    last_stream_id: int
    code: int
    debug: bytes


@dataclass(slots=True)
class ConnectionTerminated:
    """We hit a connection error and queued GOAWAY: flush, then close the transport."""

    code: int
    reason: str


@dataclass(slots=True)
class SettingsChanged:
    """The peer's SETTINGS arrived (e.g. its max concurrent streams changed)."""

    max_concurrent_streams: int


Event = (
    RequestReceived
    | ResponseReceived
    | DataReceived
    | StreamReset
    | StreamWritable
    | PingAcked
    | GoAwayReceived
    | ConnectionTerminated
    | SettingsChanged
)


class StreamError(Exception):
    """Raised by local calls that cannot proceed (limit reached, going away, too large).

    `retryable`: another (fresh) connection could take the stream.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class _ConnError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Stream:
    __slots__ = (
        "end_after_pending",
        "id",
        "local_closed",
        "pending",
        "pending_len",
        "recv_unacked",
        "recv_window",
        "remote_closed",
        "response_seen",
        "send_window",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0
        self.pending: deque[bytes | memoryview] = deque()
        self.pending_len = 0
        self.end_after_pending = False
        self.local_closed = False
        self.remote_closed = False
        self.response_seen = False


_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
_REQUEST_PSEUDO = frozenset({":method", ":authority", ":scheme", ":path", ":protocol"})
_RESPONSE_PSEUDO = frozenset({":status"})
_RESET_MEMORY = 1024


class H2Connection:
    """One HTTP/2 connection, either role, with no I/O. See the module docstring."""

    def __init__(
        self,
        *,
        client: bool,
        max_concurrent_streams: int = 100,
        stream_window: int = 4 * 1024 * 1024,
        connection_window: int = 16 * 1024 * 1024,
        max_frame_size: int = 1024 * 1024,
        max_header_list_size: int = 16 * 1024,
        max_send_frame_size: int = 1024 * 1024,
    ) -> None:
        self.client = client
        # Our settings (what the peer must respect).
        self.local_max_concurrent = max_concurrent_streams
        self.local_stream_window = stream_window
        self.local_connection_window = connection_window
        self.local_max_frame = max(DEFAULT_MAX_FRAME, min(max_frame_size, MAX_FRAME_LIMIT))
        self.local_max_header_list = max_header_list_size
        # The peer's settings (defaults until its SETTINGS arrive).
        self.peer_max_concurrent = UNLIMITED
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_max_header_list = UNLIMITED
        self._max_send_frame = max_send_frame_size
        self._send_frame = DEFAULT_MAX_FRAME

        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1 if client else 2
        self._highest_remote = 0  # highest stream id opened by the peer
        self._last_processed = 0  # for GOAWAY: highest peer stream we acted on
        self._reset_sent: dict[int, None] = {}  # recently reset by us: ignore late frames

        self._conn_send_window = DEFAULT_WINDOW
        self._conn_recv_window = connection_window
        self._conn_recv_unacked = 0
        # Both windows are re-opened once half of them is used: the stream's when half
        # of it has been consumed (`acknowledge`), the connection's when half of it has
        # been received. A stream update also carries any connection credit due, in the
        # same write, so a bulk transfer costs one small record per half stream window.
        self._stream_update_at = max(stream_window >> 1, 1)
        self._conn_update_at = max(connection_window >> 1, 1)
        self._blocked: dict[int, None] = {}  # streams with data waiting for window

        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=4 * max_header_list_size)
        self._decoder.max_allowed_table_size = 4096
        self._hblock: list[bytes] = []
        self._hblock_len = 0
        self._hstream = 0
        self._hend_stream = False
        self._hblock_limit = max(65536, 4 * max_header_list_size)

        self._out: list[bytes | memoryview] = []
        self._partial = bytearray()  # an incomplete frame (never a DATA payload)
        self._data_left = 0  # payload bytes of the current DATA frame still to come
        self._data_sid = 0  # its stream (0: discard the payload)
        self._data_end = False  # its END_STREAM flag
        self._preface_pending = not client
        self._settings_seen = False
        self._events: list[Event] = []

        self.goaway_sent = False
        self.goaway_received = False
        self.peer_last_stream_id = UNLIMITED
        self.terminated = False  # a connection error happened (GOAWAY with error queued)
        self.ping_outstanding: bytes | None = None
        self._ping_sent_at = 0.0
        self._activity = True
        self._last_activity = 0.0
        self._ping_counter = 0

    # ------------------------------------------------------------------ properties

    @property
    def open_streams(self) -> int:
        """Streams not yet fully closed."""
        return len(self._streams)

    @property
    def has_output(self) -> bool:
        """Whether frames are queued for the wire."""
        return bool(self._out)

    @property
    def usable(self) -> bool:
        """Client side: whether new streams may be opened on this connection."""
        return not (self.terminated or self.goaway_received or self.goaway_sent)

    def can_open(self, limit: int = UNLIMITED) -> bool:
        """Client side: whether one more stream fits (peer's limit and `limit`)."""
        return self.usable and len(self._streams) < min(limit, self.peer_max_concurrent)

    def pending(self, stream_id: int) -> int:
        """Bytes queued by `send_data` on the stream that are not framed yet."""
        s = self._streams.get(stream_id)
        return s.pending_len if s is not None else 0

    def send_window(self, stream_id: int) -> int:
        """Bytes the stream may send right now (min of its and the connection's window)."""
        s = self._streams.get(stream_id)
        return min(s.send_window, self._conn_send_window) if s is not None else 0

    def is_open(self, stream_id: int) -> bool:
        """Whether the stream still exists (not closed both ways and not reset)."""
        return stream_id in self._streams

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """Everything queued for the wire, coalesced into one buffer (then cleared)."""
        out = self._out
        if not out:
            return b""
        if len(out) == 1:
            data = out[0]
            out.clear()
            return bytes(data) if isinstance(data, memoryview) else data
        data = b"".join(out)
        out.clear()
        return data

    def take_output(self) -> list[bytes | memoryview]:
        """Like `data_to_send` but without copying large DATA payloads.

        Small pieces (frame headers, control frames) are coalesced; payloads of
        `LARGE` bytes or more are returned as they were queued (possibly views given
        to `send_data`), so the caller can write them with `writelines`.
        """
        out = self._out
        if len(out) <= 1:
            if out:
                self._out = []
            return out
        self._out = []
        result: list[bytes | memoryview] = []
        small: list[bytes | memoryview] = []
        for item in out:
            if len(item) >= LARGE:
                if small:
                    result.append(small[0] if len(small) == 1 else b"".join(small))
                    small = []
                result.append(item)
            else:
                small.append(item)
        if small:
            result.append(small[0] if len(small) == 1 else b"".join(small))
        return result

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self._out.append(_pack_hdr(len(payload) << 8 | ftype, flags, stream_id))
        if payload:
            self._out.append(payload)

    # ------------------------------------------------------------------ setup

    def initiate(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection window increase."""
        if self.client:
            self._out.append(PREFACE)
        settings = [
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_MAX_CONCURRENT_STREAMS, self.local_max_concurrent),
            (SETTINGS_INITIAL_WINDOW_SIZE, self.local_stream_window),
            (SETTINGS_MAX_FRAME_SIZE, self.local_max_frame),
            (SETTINGS_MAX_HEADER_LIST_SIZE, self.local_max_header_list),
        ]
        self._frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings))
        delta = self.local_connection_window - DEFAULT_WINDOW
        if delta > 0:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(delta))

    # ------------------------------------------------------------------ local actions

    def open_stream(self, headers: Headers, *, end_stream: bool = False) -> int:
        """Client: send request HEADERS on a new stream and return its id."""
        if not self.client:
            raise StreamError("only the client side opens streams", retryable=False)
        if not self.usable:
            raise StreamError("connection is going away or closed: open a new one")
        if len(self._streams) >= self.peer_max_concurrent:
            raise StreamError(
                f"peer allows only {self.peer_max_concurrent} concurrent streams"
            )
        size = sum(len(k) + len(v) + 32 for k, v in headers)
        if size > self.peer_max_header_list:
            raise StreamError(
                f"request headers ({size} bytes) exceed the peer's limit of "
                f"{self.peer_max_header_list} bytes",
                retryable=False,
            )
        sid = self._next_stream_id
        if sid > MAX_WINDOW:
            raise StreamError("stream ids exhausted: open a new connection")
        self._next_stream_id += 2
        s = _Stream(sid, self.peer_initial_window, self.local_stream_window)
        self._streams[sid] = s
        self._send_headers(sid, headers, end_stream)
        if end_stream:
            s.local_closed = True
        return sid

    def respond(self, stream_id: int, headers: Headers, *, end_stream: bool = False) -> None:
        """Server: send response HEADERS (e.g. `:status 200`) on a peer stream."""
        s = self._streams.get(stream_id)
        if s is None:
            return  # reset meanwhile: nothing to answer
        self._send_headers(stream_id, headers, end_stream)
        if end_stream:
            s.local_closed = True
            self._maybe_close(s)

    def _send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        block = self._encoder.encode(headers)
        flags = FLAG_END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            self._frame(HEADERS, flags | FLAG_END_HEADERS, stream_id, block)
            return
        self._frame(HEADERS, flags, stream_id, block[:limit])
        pos = limit
        while pos < len(block):
            chunk = block[pos : pos + limit]
            pos += limit
            last = pos >= len(block)
            self._frame(CONTINUATION, FLAG_END_HEADERS if last else 0, stream_id, chunk)

    def send_data(
        self, stream_id: int, data: bytes | memoryview, *, end_stream: bool = False
    ) -> None:
        """Queue bytes on the stream; frames go out as far as the windows allow now."""
        s = self._streams.get(stream_id)
        if s is None or s.local_closed or s.end_after_pending:
            return  # reset or finished: drop silently (the caller sees the reset event)
        if data:
            s.pending.append(data)
            s.pending_len += len(data)
        if end_stream:
            s.end_after_pending = True
        self._flush_stream(s)

    def prepare_data_frame(self, stream_id: int, frame: bytearray | memoryview, n: int) -> bool:
        """Zero-copy send for relays: `frame[9:9 + n]` already holds the payload.

        If nothing else is queued (call `data_to_send()` first), nothing is queued on the
        stream and the windows allow it, the DATA header is written into `frame[:9]`,
        the windows are charged and True is returned: the caller then writes
        `frame[:9 + n]` to the wire itself, right away. Otherwise nothing happens and
        False is returned: use `send_data`.
        """
        if not self._charge_now(stream_id, n):
            return False
        _HDR.pack_into(frame, 0, n << 8 | DATA, 0, stream_id)
        return True

    def data_frame_now(self, stream_id: int, data: bytes | memoryview) -> bytes | None:
        """Small-write fast path: when nothing is queued (on the connection or the
        stream) and the windows take all of `data` in one frame, charge the windows and
        return the whole DATA frame for the caller to write right away. Otherwise None
        and nothing happens: use `send_data`."""
        n = len(data)
        if n >= LARGE or not self._charge_now(stream_id, n):
            return None
        return _pack_hdr(n << 8 | DATA, 0, stream_id) + data

    def _charge_now(self, stream_id: int, n: int) -> bool:
        """Charge n bytes to the windows if they can go out as one frame right now."""
        s = self._streams.get(stream_id)
        if (
            self._out
            or s is None
            or s.pending_len
            or s.end_after_pending
            or s.local_closed
            or n > self._send_frame
            or n > s.send_window
            or n > self._conn_send_window
            or n <= 0
        ):
            return False
        s.send_window -= n
        self._conn_send_window -= n
        return True

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (END_STREAM after whatever is still queued)."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """Abort the stream with RST_STREAM; queued data is discarded."""
        s = self._streams.pop(stream_id, None)
        if s is None:
            return
        self._blocked.pop(stream_id, None)
        self._remember_reset(stream_id)
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(code))

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed n received bytes: re-open the stream window (batched)."""
        s = self._streams.get(stream_id)
        if s is None or s.remote_closed or n <= 0:
            return
        s.recv_unacked += n
        if s.recv_unacked >= self._stream_update_at:
            inc = s.recv_unacked
            s.recv_unacked = 0
            s.recv_window += inc
            if self._conn_recv_unacked:
                # Connection credit rides along: both frames in one buffer, one write.
                conn_inc = self._conn_recv_unacked
                self._conn_recv_unacked = 0
                self._conn_recv_window += conn_inc
                self._out.append(
                    _pack_hdr(4 << 8 | WINDOW_UPDATE, 0, 0)
                    + _U32.pack(conn_inc)
                    + _pack_hdr(4 << 8 | WINDOW_UPDATE, 0, stream_id)
                    + _U32.pack(inc)
                )
            else:
                self._out.append(_pack_hdr(4 << 8 | WINDOW_UPDATE, 0, stream_id) + _U32.pack(inc))

    def ping(self, payload: bytes | None = None) -> bytes:
        """Send a PING (8 bytes); its ack arrives as `PingAcked`."""
        if payload is None:
            self._ping_counter += 1
            payload = _U32x2.pack(0x48424F4E, self._ping_counter & 0xFFFFFFFF)
        self._frame(PING, 0, 0, payload)
        return payload

    def keepalive(self, now: float, interval: float, timeout: float) -> bool:
        """Call periodically; sends a PING when idle. Returns False if the peer is dead.

        Any frame received counts as life. After `interval` seconds of silence a PING
        goes out; no answer (no frame at all) within `timeout` seconds means dead.
        """
        if self._activity:
            self._activity = False
            self._last_activity = now
            self.ping_outstanding = None
            return True
        if self.ping_outstanding is not None:
            return now - self._ping_sent_at < timeout
        if now - self._last_activity >= interval:
            self.ping_outstanding = self.ping()
            self._ping_sent_at = now
        return True

    def goaway(self, code: int = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """Send GOAWAY: with NO_ERROR a graceful drain (open streams finish)."""
        if self.goaway_sent and code == ErrorCode.NO_ERROR:
            return
        self.goaway_sent = True
        self._frame(GOAWAY, 0, 0, _U32x2.pack(self._last_processed, code) + debug)

    # ------------------------------------------------------------------ sending data

    def _flush_stream(self, s: _Stream) -> bool:
        """Frame as much of s's queue as the windows allow; True if it emptied."""
        pending = s.pending
        out = self._out
        max_frame = self._send_frame
        while s.pending_len:
            window = s.send_window
            window = min(window, self._conn_send_window)
            if window <= 0:
                self._blocked[s.id] = None
                return False
            chunk = pending[0]
            n = len(chunk)
            if n > window or n > max_frame:
                n = min(window, max_frame)
                view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                pending[0] = view[n:]
                chunk = view[:n]
            else:
                pending.popleft()
            s.pending_len -= n
            s.send_window -= n
            self._conn_send_window -= n
            end = s.end_after_pending and not s.pending_len
            out.append(_pack_hdr(n << 8 | DATA, FLAG_END_STREAM if end else 0, s.id))
            out.append(chunk)
            if end:
                s.local_closed = True
                self._maybe_close(s)
                return True
        if s.end_after_pending and not s.local_closed:
            out.append(_pack_hdr(DATA, FLAG_END_STREAM, s.id))
            s.local_closed = True
            self._maybe_close(s)
        return True

    def _flush_blocked(self) -> None:
        if not self._blocked:
            return
        for sid in list(self._blocked):
            if self._conn_send_window <= 0:
                return
            s = self._streams.get(sid)
            del self._blocked[sid]
            if s is None:
                continue
            if self._flush_stream(s):
                self._events.append(StreamWritable(sid))

    def _maybe_close(self, s: _Stream) -> None:
        if s.local_closed and s.remote_closed and not s.pending_len:
            self._streams.pop(s.id, None)
            self._blocked.pop(s.id, None)

    def _remember_reset(self, stream_id: int) -> None:
        rs = self._reset_sent
        rs[stream_id] = None
        if len(rs) > _RESET_MEMORY:
            del rs[next(iter(rs))]

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the wire; returns the events they caused (never raises).

        `DataReceived.data` may be a view into `data`: consume it (or copy it) before
        the buffer behind `data` is reused. The core itself keeps no reference to `data`.
        """
        if self.terminated:
            return []
        self._activity = True
        events = self._events = []
        try:
            self._parse(data if type(data) is memoryview else memoryview(data))
        except _ConnError as e:
            self._connection_error(e.code, e.reason)
        except (hpack.HPACKError, ValueError, IndexError, struct.error) as e:
            self._connection_error(ErrorCode.PROTOCOL_ERROR, f"malformed frame: {e}")
        if self.terminated:
            self._partial.clear()
            self._data_left = 0
        self._events = []
        return events

    def _parse(self, mv: memoryview) -> None:
        """Frame parser. DATA payloads are streamed: each read hands out what it holds
        (no reassembly, no copy); other frames are reassembled in `_partial` if split."""
        pos = 0
        end = len(mv)
        partial = self._partial
        if self._preface_pending:
            need = len(PREFACE) - len(partial)
            partial += mv[:need]
            pos = min(need, end)
            if len(partial) < len(PREFACE):
                if not PREFACE.startswith(bytes(partial)):
                    raise _ConnError(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
                return
            if partial != PREFACE:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
            partial.clear()
            self._preface_pending = False
        max_frame = self.local_max_frame
        while pos < end and not self.terminated:
            if self._data_left:
                take = min(self._data_left, end - pos)
                self._data_piece(mv[pos : pos + take])
                pos += take
                continue
            if partial:
                if len(partial) < 9:
                    take = min(9 - len(partial), end - pos)
                    partial += mv[pos : pos + take]
                    pos += take
                    if len(partial) < 9:
                        return
                first, flags, sid = _unpack_hdr(partial, 0)
                length = first >> 8
                ftype = first & 0xFF
                sid &= 0x7FFFFFFF
                if length > max_frame:
                    raise _ConnError(
                        ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {max_frame}"
                    )
                if len(partial) == 9 and ftype == DATA and not flags & FLAG_PADDED:
                    partial.clear()
                    self._start_data(flags, sid, length)
                    continue
                take = min(9 + length - len(partial), end - pos)
                partial += mv[pos : pos + take]
                pos += take
                if len(partial) < 9 + length:
                    return
                frame = memoryview(bytes(partial))
                partial.clear()
                self._on_frame(ftype, flags, sid, frame[9:])
                continue
            if end - pos < 9:
                partial += mv[pos:end]
                return
            first, flags, sid = _unpack_hdr(mv, pos)
            length = first >> 8
            ftype = first & 0xFF
            sid &= 0x7FFFFFFF
            if length > max_frame:
                raise _ConnError(
                    ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {max_frame}"
                )
            if ftype == DATA and not flags & FLAG_PADDED:
                pos += 9
                # Hot path: a whole DATA frame on an open stream, within both windows.
                s = self._streams.get(sid) if 0 < length <= end - pos else None
                if (
                    s is not None
                    and not s.remote_closed
                    and length <= s.recv_window
                    and length <= self._conn_recv_window
                    and not self._hstream
                    and (s.response_seen or not self.client)
                ):
                    self._conn_recv_window -= length
                    self._conn_recv_unacked += length
                    if self._conn_recv_unacked >= self._conn_update_at:
                        self._update_connection_window()
                    s.recv_window -= length
                    fin = bool(flags & FLAG_END_STREAM)
                    self._events.append(DataReceived(sid, mv[pos : pos + length], fin, length))
                    if fin:
                        s.remote_closed = True
                        self._maybe_close(s)
                    pos += length
                    continue
                self._start_data(flags, sid, length)
                continue
            if end - pos - 9 < length:
                partial += mv[pos:end]
                return
            self._on_frame(ftype, flags, sid, mv[pos + 9 : pos + 9 + length])
            pos += 9 + length

    def _connection_error(self, code: int, reason: str) -> None:
        if self.terminated:
            return
        self.goaway(code, reason.encode("utf-8", "replace")[:256])
        self.terminated = True
        self._events.append(ConnectionTerminated(code, reason))
        for sid in list(self._streams):
            self._events.append(StreamReset(sid, code, remote=False))
        self._streams.clear()
        self._blocked.clear()

    def _stream_error(self, sid: int, code: int) -> None:
        s = self._streams.pop(sid, None)
        self._blocked.pop(sid, None)
        self._remember_reset(sid)
        self._frame(RST_STREAM, 0, sid, _U32.pack(code))
        if s is not None:
            self._events.append(StreamReset(sid, code, remote=False))

    def _is_idle(self, sid: int) -> bool:
        if (sid & 1) == (1 if self.client else 0):  # our parity
            return sid >= self._next_stream_id
        return sid > self._highest_remote

    def _data_accounting(self, sid: int, length: int) -> _Stream | None:
        """Flow control and state checks of a DATA frame; the stream if it may deliver."""
        if self._hstream:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "DATA inside a header block")
        if not self._settings_seen:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "first frame from peer was not SETTINGS")
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self._conn_recv_window:
            raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "peer overran the connection window")
        self._conn_recv_window -= length
        self._conn_recv_unacked += length
        if self._conn_recv_unacked >= self._conn_update_at:
            self._update_connection_window()
        s = self._streams.get(sid)
        if s is None or s.remote_closed:
            if self._is_idle(sid):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if sid not in self._reset_sent:
                self._stream_error(sid, ErrorCode.STREAM_CLOSED)
            return None
        if length > s.recv_window:
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR)
            return None
        if self.client and not s.response_seen:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            return None
        s.recv_window -= length
        return s

    def _update_connection_window(self) -> None:
        inc = self._conn_recv_unacked
        self._conn_recv_unacked = 0
        self._conn_recv_window += inc
        self._out.append(_pack_hdr(4 << 8 | WINDOW_UPDATE, 0, 0) + _U32.pack(inc))

    def _start_data(self, flags: int, sid: int, length: int) -> None:
        """A DATA frame header: its payload follows as pieces (`_data_piece`)."""
        s = self._data_accounting(sid, length)
        end = bool(flags & FLAG_END_STREAM)
        if length:
            self._data_left = length
            self._data_sid = sid if s is not None else 0
            self._data_end = end
        elif s is not None and end:
            s.remote_closed = True
            self._events.append(DataReceived(sid, b"", True, 0))
            self._maybe_close(s)

    def _data_piece(self, piece: memoryview) -> None:
        n = len(piece)
        self._data_left -= n
        sid = self._data_sid
        if not sid:
            return  # the frame's stream is gone: payload discarded (already credited)
        s = self._streams.get(sid)
        if s is None:
            return
        end = self._data_end and not self._data_left
        if end:
            s.remote_closed = True
        self._events.append(DataReceived(sid, piece, end, n))
        if end:
            self._maybe_close(s)

    def _on_padded_data(self, flags: int, sid: int, payload: memoryview) -> None:
        length = len(payload)
        s = self._data_accounting(sid, length)
        if length < 1 or payload[0] >= length:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "DATA padding exceeds frame")
        if s is None:
            return
        data = payload[1 : length - payload[0]]
        # Padding (and its length byte) is consumed right away: only the payload waits
        # for the application. Acknowledged like consumed bytes, so frames of padding
        # alone re-open the window too (the application has nothing to acknowledge).
        self.acknowledge(sid, length - len(data))
        end = bool(flags & FLAG_END_STREAM)
        if end:
            s.remote_closed = True
        self._events.append(DataReceived(sid, bytes(data), end, len(data)))
        if end:
            self._maybe_close(s)

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: memoryview) -> None:
        if self._hstream and ftype != CONTINUATION:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "header block interrupted by another frame")
        if not self._settings_seen and ftype != SETTINGS:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "first frame from peer was not SETTINGS")
        if ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == PING:
            if sid != 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
            if flags & FLAG_ACK:
                self._events.append(PingAcked(bytes(payload)))
            else:
                self._frame(PING, FLAG_ACK, 0, bytes(payload))
        elif ftype == RST_STREAM:
            self._on_rst(sid, payload)
        elif ftype == GOAWAY:
            self._on_goaway(sid, payload)
        elif ftype == PRIORITY:
            if sid == 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(sid, ErrorCode.FRAME_SIZE_ERROR)
        elif ftype == PUSH_PROMISE:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE received: push is disabled")
        elif ftype == DATA:  # padded (unpadded DATA is streamed by `_parse`)
            self._on_padded_data(flags, sid, payload)
        # Unknown frame types are ignored (RFC 9113 section 4.1).

    def _on_settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if len(payload):
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            if not self._settings_seen:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "first frame from peer was not SETTINGS")
            return
        if len(payload) % 6:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        self._settings_seen = True
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            if key == SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(value, 4096)
            elif key == SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise _ConnError(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent = value
            elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self._streams.values():
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:
                        raise _ConnError(
                            ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE overflows a window"
                        )
                    if delta > 0 and s.pending_len:
                        self._blocked[s.id] = None
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise _ConnError(ErrorCode.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
                self._send_frame = min(value, self._max_send_frame)
            elif key == SETTINGS_MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list = value
        self._frame(SETTINGS, FLAG_ACK, 0)
        self._events.append(SettingsChanged(self.peer_max_concurrent))
        self._flush_blocked()

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        inc = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._conn_send_window += inc
            if self._conn_send_window > MAX_WINDOW:
                raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_blocked()
            return
        s = self._streams.get(sid)
        if s is None:
            if self._is_idle(sid):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # closed stream: ignore
        if inc == 0:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            return
        s.send_window += inc
        if s.send_window > MAX_WINDOW:
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR)
            return
        if s.pending_len or sid in self._blocked:
            self._blocked.pop(sid, None)
            if self._flush_stream(s):
                self._events.append(StreamWritable(sid))

    def _on_rst(self, sid: int, payload: memoryview) -> None:
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
        if self._is_idle(sid):
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        s = self._streams.pop(sid, None)
        if s is None:
            return
        self._blocked.pop(sid, None)
        self._events.append(StreamReset(sid, _U32.unpack_from(payload)[0], remote=True))

    def _on_goaway(self, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY payload shorter than 8 bytes")
        last, code = _U32x2.unpack_from(payload)
        last &= 0x7FFFFFFF
        self.goaway_received = True
        self.peer_last_stream_id = min(last, self.peer_last_stream_id)
        self._events.append(GoAwayReceived(last, code, bytes(payload[8:264])))
        # Streams we opened above `last` were never processed: safe to retry elsewhere.
        for s_id in [i for i in self._streams if i > last and (i & 1) == (self.client & 1)]:
            del self._streams[s_id]
            self._blocked.pop(s_id, None)
            self._events.append(StreamReset(s_id, ErrorCode.REFUSED_STREAM, remote=True))

    def _on_headers(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        end = len(payload)
        if flags & FLAG_PADDED:
            if end < 1:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding missing")
            pad = payload[0]
            start = 1
            end -= pad
        if flags & FLAG_PRIORITY:
            start += 5
        if end < start:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding exceeds frame")
        self._hstream = sid
        self._hend_stream = bool(flags & FLAG_END_STREAM)
        self._hblock = [bytes(payload[start:end])]
        self._hblock_len = end - start
        if flags & FLAG_END_HEADERS:
            self._end_headers()
        elif self._hblock_len > self._hblock_limit:
            raise _ConnError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")

    def _on_continuation(self, flags: int, sid: int, payload: memoryview) -> None:
        if not self._hstream or sid != self._hstream:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without open header block")
        self._hblock.append(bytes(payload))
        self._hblock_len += len(payload)
        if self._hblock_len > self._hblock_limit:
            raise _ConnError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & FLAG_END_HEADERS:
            self._end_headers()

    def _end_headers(self) -> None:
        sid = self._hstream
        end_stream = self._hend_stream
        self._hstream = 0
        block = b"".join(self._hblock)
        self._hblock = []
        try:
            headers: Headers = [(str(k), str(v)) for k, v in self._decoder.decode(block)]
        except hpack.OversizedHeaderListError as e:
            raise _ConnError(ErrorCode.ENHANCE_YOUR_CALM, f"header list too large: {e}") from e
        except (hpack.HPACKError, UnicodeDecodeError) as e:
            raise _ConnError(ErrorCode.COMPRESSION_ERROR, f"header block undecodable: {e}") from e
        size = sum(len(k) + len(v) + 32 for k, v in headers)
        if self.client:
            self._client_headers(sid, headers, end_stream, size)
        else:
            self._server_headers(sid, headers, end_stream, size)

    def _server_headers(self, sid: int, headers: Headers, end_stream: bool, size: int) -> None:
        s = self._streams.get(sid)
        if s is not None:  # trailers on an open stream
            if s.remote_closed:
                self._stream_error(sid, ErrorCode.STREAM_CLOSED)
            elif not end_stream or any(k.startswith(":") for k, _ in headers):
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            else:
                s.remote_closed = True
                self._events.append(DataReceived(sid, b"", True, 0))
                self._maybe_close(s)
            return
        if sid % 2 == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"client opened even stream {sid}")
        if sid <= self._highest_remote:
            if sid in self._reset_sent:
                return
            raise _ConnError(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self._highest_remote = sid
        if self.goaway_sent:
            self._stream_error(sid, ErrorCode.REFUSED_STREAM)
            return
        if len(self._streams) >= self.local_max_concurrent:
            self._stream_error(sid, ErrorCode.REFUSED_STREAM)
            return
        if not _valid_fields(headers, _REQUEST_PSEUDO):
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            return
        self._last_processed = sid
        s = _Stream(sid, self.peer_initial_window, self.local_stream_window)
        self._streams[sid] = s
        if size > self.local_max_header_list:
            # Answer like an HTTP server would: 431 and done.
            self._send_headers(sid, [(":status", "431")], True)
            del self._streams[sid]
            if not end_stream:  # tell the client to stop sending on it
                self._remember_reset(sid)
                self._frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.NO_ERROR))
            return
        if end_stream:
            s.remote_closed = True
        self._events.append(RequestReceived(sid, headers, end_stream))

    def _client_headers(self, sid: int, headers: Headers, end_stream: bool, size: int) -> None:
        s = self._streams.get(sid)
        if s is None:
            if sid % 2 == 0 or self._is_idle(sid):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on unopened stream {sid}")
            if sid not in self._reset_sent:
                self._stream_error(sid, ErrorCode.STREAM_CLOSED)
            return
        if s.remote_closed:
            self._stream_error(sid, ErrorCode.STREAM_CLOSED)
            return
        if s.response_seen:  # trailers
            if not end_stream or any(k.startswith(":") for k, _ in headers):
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
                return
            s.remote_closed = True
            self._events.append(DataReceived(sid, b"", True, 0))
            self._maybe_close(s)
            return
        if size > self.local_max_header_list or not _valid_fields(headers, _RESPONSE_PSEUDO):
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            return
        status = headers[0][1] if headers and headers[0][0] == ":status" else ""
        if len(status) != 3 or not status.isdigit():
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            return
        if status[0] == "1":
            if end_stream:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR)
            return  # informational: wait for the final response
        s.response_seen = True
        if end_stream:
            s.remote_closed = True
        self._events.append(ResponseReceived(sid, headers, end_stream))
        if end_stream:
            self._maybe_close(s)


def _valid_fields(headers: Headers, allowed_pseudo: frozenset[str]) -> bool:
    """RFC 9113 section 8.2/8.3 field checks that make a message malformed."""
    seen: set[str] = set()
    regular = False
    for name, value in headers:
        if not name:
            return False
        if name[0] == ":":
            if regular or name not in allowed_pseudo or name in seen:
                return False
            seen.add(name)
            continue
        regular = True
        if name != name.lower() or name in _CONNECTION_HEADERS:
            return False
        if name == "te" and value != "trailers":
            return False
        if "\r" in value or "\n" in value or "\0" in value:
            return False
    if allowed_pseudo is _RESPONSE_PSEUDO:
        return ":status" in seen
    return ":method" in seen
