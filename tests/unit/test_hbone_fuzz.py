"""Hypothesis: random and mutated frame sequences never crash, hang or bloat the server core."""

from __future__ import annotations

import struct

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.hbone.h2core import (
    GOAWAY,
    PREFACE,
    RST_STREAM,
    ConnectionTerminated,
    DataReceived,
    Event,
    H2Connection,
    RequestReceived,
    StreamReset,
)

MAX_FRAME = 16384
MAX_STREAMS = 8
FUZZ = settings(
    max_examples=300,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, sid) + payload


def _frames(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos + 9 <= len(data):
        first, _flags, sid = struct.unpack_from(">IBI", data, pos)
        length = first >> 8
        out.append((first & 0xFF, sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


_encoder = hpack.Encoder()
_HEADER_BLOCKS = [
    _encoder.encode([(":method", "CONNECT"), (":authority", "10.0.0.5:8080")]),
    hpack.Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "https")]),
    hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "x:1"), ("te", "gzip")]),
    hpack.Encoder().encode([("x-trailer", "1")]),
    b"\x3f\xe1\x1f",  # dynamic table size update
    b"\xbe",  # index into an empty dynamic table
]

frame_strategy = st.builds(
    frame,
    ftype=st.one_of(st.integers(0, 10), st.integers(0, 255)),
    flags=st.one_of(st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25, 0x2D]), st.integers(0, 255)),
    sid=st.one_of(st.integers(0, 12), st.integers(0, 2**31 - 1)),
    payload=st.one_of(
        st.binary(max_size=64),
        st.sampled_from(_HEADER_BLOCKS),
        st.integers(0, 2**32 - 1).map(lambda v: struct.pack(">I", v)),
        st.tuples(st.integers(0, 6), st.integers(0, 2**32 - 1)).map(
            lambda kv: struct.pack(">HI", *kv)
        ),
        st.binary(min_size=8, max_size=8),
    ),
)


def _valid_conversation() -> bytes:
    """A well-formed client side: preface, SETTINGS, two CONNECTs with data, PING, RST."""
    client = H2Connection(client=True)
    client.initiate()
    a = client.open_stream([(":method", "CONNECT"), (":authority", "10.0.0.5:8080")])
    b = client.open_stream([(":method", "CONNECT"), (":authority", "[fd00::1]:80")])
    client.send_data(a, b"hello" * 50)
    client.send_data(b, b"world", end_stream=True)
    client.ping()
    client.reset_stream(a)
    client.goaway()
    return client.data_to_send()


VALID = _valid_conversation()


def _check_server(chunks: list[bytes]) -> None:
    server = H2Connection(
        client=False, max_frame_size=MAX_FRAME, max_concurrent_streams=MAX_STREAMS
    )
    server.initiate()
    server.data_to_send()
    fed = 0
    out_total = 0
    for chunk in chunks:
        events: list[Event] = server.receive(chunk)
        fed += len(chunk)
        out = server.data_to_send()
        out_total += len(out)
        for ev in events:
            if isinstance(ev, RequestReceived | DataReceived):
                server.acknowledge(ev.stream_id, getattr(ev, "flow_len", 0))
            if isinstance(ev, RequestReceived) and ev.stream_id % 4 == 1:
                server.respond(ev.stream_id, [(":status", "200")])
                server.send_data(ev.stream_id, b"r" * 100)
        # Bounded memory: buffered input never exceeds one maximal frame (+ preface).
        assert len(server._partial) <= MAX_FRAME + 9
        assert server.open_streams <= MAX_STREAMS
        assert len(server._reset_sent) <= 1025
        # Output stays proportional to input (no amplification).
        assert out_total <= 4 * fed + 4096
        if any(isinstance(e, ConnectionTerminated) for e in events):
            assert any(f[0] == GOAWAY for f in _frames(out))
        for ev in events:
            if isinstance(ev, StreamReset) and not ev.remote and not server.terminated:
                assert any(f[0] == RST_STREAM and f[1] == ev.stream_id for f in _frames(out))
        out_total += len(server.data_to_send())
    if server.terminated:
        assert server.receive(b"\0" * 20) == []


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_after_preface(data: bytes) -> None:
    _check_server([PREFACE + frame(4, 0, 0, b""), data])


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_instead_of_preface(data: bytes) -> None:
    _check_server([data])


@FUZZ
@given(st.lists(frame_strategy, max_size=40), st.integers(1, 64))
def test_random_frame_sequences(frames: list[bytes], split: int) -> None:
    wire = PREFACE + frame(4, 0, 0, b"") + b"".join(frames)
    _check_server([wire[i : i + split] for i in range(0, len(wire), split)])


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255), st.sampled_from("fid")),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 200),
)
def test_mutated_valid_conversations(mutations: list[tuple[int, int, str]], split: int) -> None:
    wire = bytearray(VALID)
    for where, value, kind in mutations:
        pos = where % max(1, len(wire))
        if kind == "f":
            wire[pos] = value
        elif kind == "i":
            wire.insert(pos, value)
        elif len(wire) > 1:
            del wire[pos]
    data = bytes(wire)
    _check_server([data[i : i + split] for i in range(0, len(data), split)])


@FUZZ
@given(st.lists(frame_strategy, max_size=20))
def test_valid_conversation_followed_by_random_frames(frames: list[bytes]) -> None:
    _check_server([VALID[: len(VALID) - 17], b"".join(frames)])


def test_continuation_flood_is_cut_off() -> None:
    server = H2Connection(client=False)
    server.initiate()
    server.receive(PREFACE + frame(4, 0, 0, b"") + frame(1, 0, 1, b"\x82"))
    events: list[Event] = []
    for _ in range(200):
        events += server.receive(frame(9, 0, 1, b"\0" * 1000))
        if server.terminated:
            break
    assert server.terminated
    assert any(isinstance(e, ConnectionTerminated) for e in events)


def test_ping_flood_answers_stay_proportional() -> None:
    server = H2Connection(client=False)
    server.initiate()
    server.data_to_send()
    server.receive(PREFACE + frame(4, 0, 0, b"") + frame(6, 0, 0, b"12345678") * 10000)
    assert len(server.data_to_send()) == 9 + 17 * 10000  # SETTINGS ACK + one PONG each


@FUZZ
@given(st.lists(frame_strategy, max_size=40), st.integers(1, 64))
def test_client_core_survives_a_hostile_server(frames: list[bytes], split: int) -> None:
    client = H2Connection(client=True, max_frame_size=MAX_FRAME)
    client.initiate()
    a = client.open_stream([(":method", "CONNECT"), (":authority", "10.0.0.5:80")])
    client.send_data(a, b"q" * 1000)
    client.open_stream([(":method", "CONNECT"), (":authority", "10.0.0.6:80")])
    client.data_to_send()
    response = hpack.Encoder().encode([(":status", "200")])
    wire = frame(4, 0, 0, b"") + frame(1, 4, a, response) + b"".join(frames)
    for i in range(0, len(wire), split):
        events = client.receive(wire[i : i + split])
        out = client.data_to_send()
        assert len(client._partial) <= MAX_FRAME + 9
        if any(isinstance(e, ConnectionTerminated) for e in events):
            assert any(f[0] == GOAWAY for f in _frames(out))
        for ev in events:
            if isinstance(ev, DataReceived):
                client.acknowledge(ev.stream_id, ev.flow_len)
    assert client.open_streams <= 2
