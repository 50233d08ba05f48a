"""The sans-IO HTTP/2 CONNECT core: two cores talking in memory, and hand-made frames."""

from __future__ import annotations

import base64
import random
import struct

import hpack
import pytest

from ztunnel.hbone.h2core import (
    CONTINUATION,
    DATA,
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    H2Connection,
    PingAcked,
    RequestReceived,
    ResponseReceived,
    SettingsChanged,
    StreamError,
    StreamReset,
    StreamWritable,
)

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")]


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, sid) + payload


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of every frame in `data` (preface skipped)."""
    if data.startswith(PREFACE):
        data = data[len(PREFACE) :]
    out = []
    pos = 0
    while pos < len(data):
        first, flags, sid = struct.unpack_from(">IBI", data, pos)
        length = first >> 8
        out.append((first & 0xFF, flags, sid & 0x7FFFFFFF, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


def goaway_code(data: bytes) -> int | None:
    for ftype, _, _, payload in parse_frames(data):
        if ftype == GOAWAY:
            return int(struct.unpack_from(">II", payload)[1])
    return None


def rst_codes(data: bytes) -> dict[int, int]:
    return {
        sid: struct.unpack(">I", payload)[0]
        for ftype, _, sid, payload in parse_frames(data)
        if ftype == RST_STREAM
    }


class Pair:
    """A client and a server core wired back to back."""

    def __init__(self, **server_kw: int) -> None:
        self.client = H2Connection(client=True)
        self.server = H2Connection(client=False, **server_kw)
        self.client.initiate()
        self.server.initiate()
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            c = self.client.data_to_send()
            s = self.server.data_to_send()
            if not c and not s:
                return
            if c:
                self.server_events += self.server.receive(c)
            if s:
                self.client_events += self.client.receive(s)
        raise AssertionError("cores kept talking for 100 rounds")

    def take(self, side: str) -> list[Event]:
        events = self.client_events if side == "client" else self.server_events
        out = list(events)
        events.clear()
        return out

    def open(self) -> int:
        sid = self.client.open_stream(CONNECT)
        self.pump()
        (req,) = [e for e in self.take("server") if isinstance(e, RequestReceived)]
        assert req.stream_id == sid
        self.server.respond(sid, [(":status", "200")])
        self.pump()
        (resp,) = [e for e in self.take("client") if isinstance(e, ResponseReceived)]
        assert resp.headers[0] == (":status", "200")
        return sid


def received(events: list[Event], sid: int) -> tuple[bytes, bool]:
    data = b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived))
    end = any(isinstance(e, DataReceived) and e.end_stream for e in events)
    return data, end


def test_handshake_exchanges_settings_and_windows() -> None:
    p = Pair()
    assert p.client.peer_max_concurrent == 100
    assert p.client.peer_initial_window == 4 * 1024 * 1024
    assert p.client.peer_max_frame == 1024 * 1024
    assert p.server.peer_initial_window == 4 * 1024 * 1024
    assert any(isinstance(e, SettingsChanged) for e in p.take("client"))


def test_connect_request_and_bytes_both_ways_with_half_close() -> None:
    p = Pair()
    sid = p.open()
    p.client.send_data(sid, b"ping")
    p.client.end_stream(sid)
    p.pump()
    data, end = received(p.take("server"), sid)
    assert (data, end) == (b"ping", True)
    # The server can still send after the client's half-close.
    p.server.send_data(sid, b"pong", end_stream=True)
    p.pump()
    assert received(p.take("client"), sid) == (b"pong", True)
    assert not p.client.is_open(sid) and not p.server.is_open(sid)


def test_request_headers_arrive_intact() -> None:
    p = Pair()
    headers = [*CONNECT, ("forwarded", 'for="10.0.0.1:5000"'), ("traceparent", "00-" + "a" * 32)]
    sid = p.client.open_stream(headers)
    p.pump()
    (req,) = [e for e in p.take("server") if isinstance(e, RequestReceived)]
    assert req.stream_id == sid and req.headers == headers and not req.end_stream


def test_large_transfer_respects_windows_and_batches_updates() -> None:
    p = Pair()
    sid = p.open()
    total = 40 * 1024 * 1024
    chunk = b"z" * (256 * 1024)
    for _ in range(total // len(chunk)):
        p.client.send_data(sid, chunk)
    # Without acknowledgements only the stream window (4 MiB) may go out.
    p.pump()
    got, _ = received(p.take("server"), sid)
    assert len(got) == 4 * 1024 * 1024
    assert p.client.pending(sid) == total - len(got)
    received_total = len(got)
    updates = 0
    while received_total < total:
        p.server.acknowledge(sid, 4 * 1024 * 1024)
        out = p.server.data_to_send()
        updates += sum(1 for f in parse_frames(out) if f[0] == WINDOW_UPDATE)
        events = p.client.receive(out)
        assert any(isinstance(e, StreamWritable) for e in events) or p.client.pending(sid)
        more = p.client.data_to_send()
        ev = p.server.receive(more)
        got, _ = received(ev, sid)
        assert 0 < len(got) <= 4 * 1024 * 1024
        received_total += len(got)
        p.pump()
    assert received_total == total
    # Stream + connection updates: a handful per 4 MiB, not one per frame.
    assert updates <= 2 * (total // (1024 * 1024))


def test_bulk_relay_reopens_windows_rarely_and_in_one_write() -> None:
    """64 MiB relayed as a proxy does: a few WINDOW_UPDATE writes, not one per MiB."""
    p = Pair()
    sid = p.open()
    total = 64 * 1024 * 1024
    chunk = b"r" * (256 * 1024)
    sent = received_total = 0
    update_frames = update_writes = 0
    while received_total < total:
        # The client relay reads one chunk from TCP and sends what the windows allow.
        if sent < total:
            p.client.send_data(sid, chunk)
            sent += len(chunk)
        for ev in p.server.receive(p.client.data_to_send()):
            if isinstance(ev, DataReceived):  # written to the upstream at once: consumed
                p.server.acknowledge(sid, ev.flow_len)
                received_total += len(ev.data)
        out = p.server.data_to_send()  # one write per TLS read, as the adapter flushes
        updates = [f for f in parse_frames(out) if f[0] == WINDOW_UPDATE]
        if updates:
            update_frames += len(updates)
            update_writes += 1
            # Stream and connection credit travel together.
            assert {f[2] for f in updates} == {0, sid}
        p.client.receive(out)
    assert received_total == total
    assert p.client.pending(sid) == 0
    # One write per half stream window (2 MiB), each with both frames: 32 writes, 64
    # frames. Re-opening every 1 MiB in separate writes would have cost 128 of each.
    assert update_writes <= total // (2 * 1024 * 1024)
    assert update_frames <= 2 * update_writes


def test_connection_window_alone_is_reopened_at_half() -> None:
    """Data that is never consumed still gets connection credit back, at half the window."""
    p = Pair()
    sids = [p.open() for _ in range(4)]
    for sid in sids:  # 4 x 3 MiB: within each 4 MiB stream window, 12 of the 16 MiB
        p.client.send_data(sid, b"c" * (3 * 1024 * 1024))
    events = p.server.receive(p.client.data_to_send())
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 12 * 1024 * 1024
    updates = [f for f in parse_frames(p.server.data_to_send()) if f[0] == WINDOW_UPDATE]
    assert [(f[2], struct.unpack(">I", f[3])[0]) for f in updates] == [(0, 8 * 1024 * 1024)]


def test_data_beyond_window_is_a_flow_control_error() -> None:
    server = H2Connection(client=False, stream_window=65535)
    server.initiate()
    hdr = hpack.Encoder().encode(CONNECT)
    data = (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, FLAG_END_HEADERS, 1, hdr)
        + frame(DATA, 0, 1, b"x" * 65535)
        + frame(DATA, 0, 1, b"y")
    )
    events = server.receive(data)
    assert StreamReset(1, ErrorCode.FLOW_CONTROL_ERROR, remote=False) in events
    assert rst_codes(server.data_to_send())[1] == ErrorCode.FLOW_CONTROL_ERROR


def test_reset_propagates() -> None:
    p = Pair()
    sid = p.open()
    p.client.send_data(sid, b"queued but never sent" * 10)
    p.server.reset_stream(sid, ErrorCode.CONNECT_ERROR)
    p.pump()
    (ev,) = [e for e in p.take("client") if isinstance(e, StreamReset)]
    assert ev.code == ErrorCode.CONNECT_ERROR and ev.remote
    assert not p.client.is_open(sid)
    assert p.client.pending(sid) == 0


def test_max_concurrent_streams_refuses_extra_streams() -> None:
    p = Pair(max_concurrent_streams=2)
    a, b = p.open(), p.open()
    assert not p.client.can_open()
    with pytest.raises(StreamError):
        p.client.open_stream(CONNECT)
    # A misbehaving client that ignores the limit gets REFUSED_STREAM.
    p.client.peer_max_concurrent = 10
    c = p.client.open_stream(CONNECT)
    p.pump()
    (ev,) = [e for e in p.take("client") if isinstance(e, StreamReset)]
    assert ev.stream_id == c and ev.code == ErrorCode.REFUSED_STREAM
    # Closing one makes room again.
    p.client.reset_stream(a)
    p.pump()
    assert p.server.open_streams == 1 and b


def test_oversized_header_list_gets_431() -> None:
    p = Pair(max_header_list_size=1024)
    p.client.peer_max_header_list = 2**31 - 1  # a client that ignores the limit
    sid = p.client.open_stream([*CONNECT, ("x-big", "v" * 2000)])
    p.pump()
    assert not [e for e in p.take("server") if isinstance(e, RequestReceived)]
    (resp,) = [e for e in p.take("client") if isinstance(e, ResponseReceived)]
    assert resp.stream_id == sid and resp.headers[0] == (":status", "431") and resp.end_stream
    # The connection survives: the next stream works.
    assert p.open() > sid


def test_continuation_frames_are_assembled() -> None:
    p = Pair(max_header_list_size=100_000)
    p.client.peer_max_frame = 16384
    noise = base64.b64encode(random.Random(4).randbytes(30000)).decode()
    headers = [*CONNECT, ("x-long", noise)]
    sid = p.client.open_stream(headers)
    out = p.client.data_to_send()
    kinds = [f[0] for f in parse_frames(out)]
    assert kinds[0] == HEADERS and kinds[1:] == [CONTINUATION] * (len(kinds) - 1) and len(kinds) > 1
    (req,) = p.server.receive(out)
    assert isinstance(req, RequestReceived) and req.stream_id == sid and req.headers == headers


def test_ping_is_answered_and_keepalive_detects_a_dead_peer() -> None:
    p = Pair()
    payload = p.client.ping()
    p.pump()
    assert PingAcked(payload) in p.take("client")
    c = p.client
    assert c.keepalive(100.0, interval=10, timeout=5)  # activity seen: resets the clock
    assert c.keepalive(105.0, interval=10, timeout=5)
    assert not parse_frames(c.data_to_send())
    assert c.keepalive(110.0, interval=10, timeout=5)  # idle 10 s: PING goes out
    assert [f[0] for f in parse_frames(c.data_to_send())] == [PING]
    assert c.keepalive(114.0, interval=10, timeout=5)
    assert not c.keepalive(115.5, interval=10, timeout=5)  # no answer within 5 s: dead


def test_keepalive_ping_answer_keeps_connection_alive() -> None:
    p = Pair()
    c = p.client
    c.keepalive(0.0, 10, 5)
    c.keepalive(10.0, 10, 5)
    p.pump()  # server answers the PING
    assert c.keepalive(14.0, 10, 5)
    assert c.keepalive(30.0, 10, 5)


def test_goaway_drain_lets_open_streams_finish_and_refuses_new() -> None:
    p = Pair()
    sid = p.open()
    p.server.goaway()
    p.pump()
    (ga,) = [e for e in p.take("client") if isinstance(e, GoAwayReceived)]
    assert ga.last_stream_id == sid and ga.code == ErrorCode.NO_ERROR
    assert not p.client.usable
    # In-flight stream still carries data both ways.
    p.client.send_data(sid, b"still here", end_stream=True)
    p.server.send_data(sid, b"me too", end_stream=True)
    p.pump()
    assert received(p.take("server"), sid) == (b"still here", True)
    assert received(p.take("client"), sid) == (b"me too", True)


def test_goaway_refuses_streams_above_last_stream_id() -> None:
    p = Pair()
    first = p.open()
    second = p.client.open_stream(CONNECT)
    # The server's GOAWAY crossed the second HEADERS: last_stream_id = first.
    events = p.client.receive(frame(GOAWAY, 0, 0, struct.pack(">II", first, 0)))
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.code) for e in resets] == [(second, ErrorCode.REFUSED_STREAM)]
    assert p.client.is_open(first)


def test_new_stream_after_server_goaway_is_refused() -> None:
    p = Pair()
    p.open()
    p.server.goaway()
    p.server.data_to_send()  # the client never sees it
    p.client.open_stream(CONNECT)
    p.pump()
    assert any(
        isinstance(e, StreamReset) and e.code == ErrorCode.REFUSED_STREAM for e in p.take("client")
    )


def test_padded_data_is_unpadded_and_credited() -> None:
    server = H2Connection(client=False)
    server.initiate()
    hdr = hpack.Encoder().encode(CONNECT)
    events = server.receive(
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, FLAG_END_HEADERS, 1, hdr)
        + frame(DATA, FLAG_PADDED | FLAG_END_STREAM, 1, bytes([3]) + b"abc" + b"\0\0\0")
    )
    data = [e for e in events if isinstance(e, DataReceived)]
    assert [(bytes(d.data), d.end_stream) for d in data] == [(b"abc", True)]


def _padded(payload: bytes, pad: int, flags: int = 0) -> bytes:
    return frame(DATA, FLAG_PADDED | flags, 1, bytes([pad]) + payload + b"\0" * pad)


def _server_with_stream(**kw: int) -> H2Connection:
    server = H2Connection(client=False, **kw)
    server.initiate()
    server.receive(
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, FLAG_END_HEADERS, 1, hpack.Encoder().encode(CONNECT))
    )
    server.respond(1, [(":status", "200")])
    server.data_to_send()
    return server


def _stream_credit(out: bytes) -> int:
    return sum(
        struct.unpack(">I", payload)[0]
        for ftype, _, sid, payload in parse_frames(out)
        if ftype == WINDOW_UPDATE and sid == 1
    )


def test_data_events_carry_application_bytes_and_padding_is_credited_by_the_core() -> None:
    """flow_len is the payload without padding; the padding needs no acknowledge(), and
    the window is re-opened by exactly what the frames used (payload + padding)."""
    server = _server_with_stream(stream_window=4096)
    frames = [_padded(b"abc", 200), frame(DATA, 0, 1, b"defg"), _padded(b"", 255)]
    frames += [_padded(b"hi", 0), frame(DATA, 0, 1, b"j" * 500)]
    events = server.receive(b"".join(frames))
    data = [e for e in events if isinstance(e, DataReceived)]
    assert [bytes(e.data) for e in data] == [b"abc", b"defg", b"", b"hi", b"j" * 500]
    assert [e.flow_len for e in data] == [3, 4, 0, 2, 500]
    for e in data:  # the application acknowledges what it consumed, as told
        server.acknowledge(1, e.flow_len)
    used = sum(len(f) - 9 for f in frames)  # 967 bytes of window, padding included
    credit = _stream_credit(server.data_to_send())
    for _ in range(8):  # padding alone, until half the window (2048) is due
        if credit:
            break
        server.receive(_padded(b"", 255))
        used += 256
        credit = _stream_credit(server.data_to_send())
    assert credit == used


def test_frames_of_padding_alone_reopen_the_stream_window() -> None:
    """A peer that pads heavily (traffic shaping) never stalls: padding needs no reader."""
    server = _server_with_stream(stream_window=4096)
    sent = credit = 0
    for _ in range(64):  # 16 KiB of padding through a 4 KiB window
        assert sent + 256 <= 4096 + credit, "the peer would be blocked by its window"
        server.receive(_padded(b"", 255))
        sent += 256
        out = server.data_to_send()
        assert not rst_codes(out)
        credit += _stream_credit(out)
    assert credit >= sent - 2048


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (frame(DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),  # DATA on stream 0
        (frame(DATA, 0, 7, b"x"), ErrorCode.PROTOCOL_ERROR),  # DATA on an idle stream
        (frame(PING, 0, 0, b"short"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PING, 0, 1, b"8 bytes!"), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"\0\0\0"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, FLAG_ACK, 0, b"\0" * 6), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 2**31)), ErrorCode.FLOW_CONTROL_ERROR),
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 100)), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 2)), ErrorCode.PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), ErrorCode.PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)), ErrorCode.FLOW_CONTROL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\0\0"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(RST_STREAM, 0, 0, b"\0\0\0\0"), ErrorCode.PROTOCOL_ERROR),
        (frame(RST_STREAM, 0, 9, b"\0\0\0\0"), ErrorCode.PROTOCOL_ERROR),
        (frame(PRIORITY, 0, 0, b"\0" * 5), ErrorCode.PROTOCOL_ERROR),
        (frame(PUSH_PROMISE, FLAG_END_HEADERS, 1, b"\0" * 4), ErrorCode.PROTOCOL_ERROR),
        (frame(CONTINUATION, FLAG_END_HEADERS, 1, b""), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, FLAG_END_HEADERS, 2, hpack.Encoder().encode(CONNECT)), 1),
        (frame(HEADERS, FLAG_END_HEADERS, 1, b"\xff\xff\xff\xff"), ErrorCode.COMPRESSION_ERROR),
        (frame(HEADERS, 0, 1, b"") + frame(PING, 0, 0, b"8 bytes!"), ErrorCode.PROTOCOL_ERROR),
        (frame(GOAWAY, 0, 1, b"\0" * 8), ErrorCode.PROTOCOL_ERROR),
        (frame(DATA, 0, 1, b"x" * 20000)[:9] + b"", ErrorCode.FRAME_SIZE_ERROR),
    ],
)
def test_protocol_errors_end_in_goaway_with_the_right_code(frames: bytes, code: int) -> None:
    server = H2Connection(client=False, max_frame_size=16384)
    server.initiate()
    server.data_to_send()
    events = server.receive(PREFACE + frame(SETTINGS, 0, 0) + frames)
    out = server.data_to_send()
    assert goaway_code(out) == code
    assert any(isinstance(e, ConnectionTerminated) and e.code == code for e in events)
    assert server.terminated
    assert server.receive(frame(PING, 0, 0, b"8 bytes!")) == []  # dead: ignores the rest


def test_bad_preface_and_missing_settings() -> None:
    server = H2Connection(client=False)
    server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert goaway_code(server.data_to_send()) == ErrorCode.PROTOCOL_ERROR
    server = H2Connection(client=False)
    server.receive(PREFACE + frame(PING, 0, 0, b"8 bytes!"))
    assert goaway_code(server.data_to_send()) == ErrorCode.PROTOCOL_ERROR


def test_malformed_request_is_a_stream_error_not_a_connection_error() -> None:
    p = Pair()
    bad = [(":method", "CONNECT"), ("x", "1"), (":authority", "a:1")]  # pseudo after regular
    sid = p.client.open_stream(bad)
    p.pump()
    assert rst_codes(b"") == {}
    (ev,) = [e for e in p.take("client") if isinstance(e, StreamReset)]
    assert ev.stream_id == sid and ev.code == ErrorCode.PROTOCOL_ERROR
    assert p.open() > sid  # connection fine


def test_frames_split_at_every_byte_boundary_parse_the_same() -> None:
    client = H2Connection(client=True)
    client.initiate()
    sid = client.open_stream(CONNECT)
    client.send_data(sid, b"0123456789" * 10, end_stream=True)
    wire = client.data_to_send()
    server = H2Connection(client=False)
    events: list[Event] = []
    for i in range(len(wire)):
        events += server.receive(wire[i : i + 1])
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [sid]
    assert received(events, sid) == (b"0123456789" * 10, True)


def test_settings_initial_window_change_applies_to_open_streams() -> None:
    p = Pair()
    sid = p.open()
    before = p.client.send_window(sid)
    p.client.receive(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1000)))
    assert p.client.send_window(sid) == before - (4 * 1024 * 1024 - 1000)


def test_window_update_unblocks_a_stalled_stream() -> None:
    p = Pair()
    sid = p.open()
    p.client.send_data(sid, b"a" * (5 * 1024 * 1024))
    p.pump()
    assert p.client.pending(sid) == 1024 * 1024
    events = p.client.receive(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", 2 * 1024 * 1024)))
    assert StreamWritable(sid) in events
    assert p.client.pending(sid) == 0


def test_late_frames_after_our_reset_are_ignored() -> None:
    p = Pair()
    sid = p.open()
    p.server.reset_stream(sid, ErrorCode.CANCEL)
    p.server.data_to_send()  # the client has not seen the reset yet and keeps sending
    events = p.server.receive(frame(DATA, 0, sid, b"late"))
    assert events == []
    assert not p.server.terminated
    assert rst_codes(p.server.data_to_send()) == {}


def test_client_respects_the_peer_header_list_limit() -> None:
    p = Pair(max_header_list_size=1024)
    assert p.client.peer_max_header_list == 1024
    with pytest.raises(StreamError, match="exceed the peer's limit of 1024") as err:
        p.client.open_stream([*CONNECT, ("x-big", "v" * 2000)])
    assert not err.value.retryable
    assert p.client.open_streams == 0


def test_take_output_keeps_large_payloads_apart_and_order_intact() -> None:
    p = Pair()
    sid = p.open()
    big = memoryview(b"B" * 100_000)
    p.client.ping(b"12345678")
    p.client.send_data(sid, big)
    p.client.send_data(sid, b"tail", end_stream=True)
    out = p.client.take_output()
    assert any(len(item) == 100_000 for item in out)  # passed through, not joined
    assert all(len(item) < 16384 or len(item) == 100_000 for item in out)
    events = p.server.receive(b"".join(out))
    assert received(events, sid) == (b"B" * 100_000 + b"tail", True)
    assert p.client.take_output() == []


def test_small_write_fast_path_frames_like_send_data_and_charges_the_windows() -> None:
    p = Pair()
    sid = p.open()
    window = p.client.send_window(sid)
    frame_bytes = p.client.data_frame_now(sid, b"GET / HTTP/1.1\r\n\r\n")
    assert frame_bytes == frame(DATA, 0, sid, b"GET / HTTP/1.1\r\n\r\n")
    assert p.client.send_window(sid) == window - 18
    # the peer takes it like any DATA frame
    events = p.server.receive(frame_bytes)
    assert received(events, sid) == (b"GET / HTTP/1.1\r\n\r\n", False)


def test_small_write_fast_path_steps_aside_when_anything_is_queued_or_too_big() -> None:
    p = Pair()
    sid = p.open()
    p.client.ping()  # a frame queued on the connection: order must be kept
    assert p.client.data_frame_now(sid, b"x") is None
    p.pump()
    assert p.client.data_frame_now(sid, b"") is None
    assert p.client.data_frame_now(sid, b"y" * 16384) is None  # large: send_data
    assert p.client.data_frame_now(sid + 2, b"x") is None  # no such stream
    p.client.end_stream(sid)
    assert p.client.data_frame_now(sid, b"x") is None  # half-closed
    # a stream whose window is spent queues instead
    q = Pair(stream_window=8)
    sid = q.open()
    assert q.client.data_frame_now(sid, b"123456789") is None
    assert q.client.data_frame_now(sid, b"12345678") is not None
    assert q.client.send_window(sid) == 0
