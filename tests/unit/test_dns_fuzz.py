"""Hypothesis: the DNS parser only ever raises DnsFormatError, and valid messages round-trip."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.dns import (
    TYPE_OPT,
    DnsFormatError,
    Forward,
    LocalAnswer,
    Message,
    Question,
    ResourceRecord,
    TcpFramer,
    answer,
    encode_message,
    encode_query,
    frame_tcp,
    parse_message,
)
from ztunnel.snapshot import Service, Snapshot, Workload

SNAP = Snapshot(
    version=1,
    node="n1",
    workloads=(Workload(uid="c", name="c", namespace="shop", ip="10.0.1.1", node="n1"),),
    services=(Service(name="cart", namespace="shop", vips=("10.96.0.10", "fd00::10")),),
)
CLIENT = SNAP.workloads[0]

labels = st.binary(min_size=1, max_size=20)
names = st.lists(labels, min_size=0, max_size=6).map(tuple)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

questions = st.builds(Question, names, u16.filter(lambda t: t != TYPE_OPT), u16)
records = st.builds(
    ResourceRecord,
    names,
    u16.filter(lambda t: t != TYPE_OPT),
    u16,
    u32,
    st.binary(max_size=40),
)
opt = st.builds(ResourceRecord, st.just(()), st.just(TYPE_OPT), u16, u32, st.binary(max_size=20))
messages = st.builds(
    Message,
    u16,
    u16,
    st.lists(questions, max_size=3).map(tuple),
    st.lists(records, max_size=3).map(tuple),
    st.lists(records, max_size=2).map(tuple),
    st.tuples(st.lists(records, max_size=2), st.lists(opt, max_size=1)).map(
        lambda t: (*t[0], *t[1])
    ),
)

svc_like_names = st.sampled_from(
    [
        "cart.shop.svc.cluster.local",
        "cart",
        "cart.shop",
        "nope.shop.svc.cluster.local",
        "shop.svc.cluster.local",
        "example.com",
        "a.b.c.cart.shop.svc.cluster.local",
    ]
)
valid_queries = st.builds(
    encode_query,
    svc_like_names,
    st.sampled_from([1, 28, 5, 15, 16, 33, 255]),
    msg_id=u16,
    rd=st.booleans(),
    edns=st.none() | st.integers(0, 0xFFFF),
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_format_error(data: bytes) -> None:
    with contextlib.suppress(DnsFormatError):
        parse_message(data)
    try:
        res = answer(SNAP, data, client=CLIENT)
    except DnsFormatError:
        return
    assert isinstance(res, (LocalAnswer, Forward))
    if isinstance(res, LocalAnswer):
        parse_message(res.data)  # whatever we send back is well-formed


@FAST
@given(messages)
def test_valid_messages_round_trip(msg: Message) -> None:
    try:
        wire = encode_message(msg)
    except DnsFormatError:
        # only names longer than 255 octets are refused
        all_names = [q.name for q in msg.questions] + [
            r.name for r in (*msg.answers, *msg.authorities, *msg.additionals)
        ]
        assert any(sum(len(x) + 1 for x in n) + 1 > 255 for n in all_names)
        return
    assert parse_message(wire) == msg


@FAST
@given(valid_queries, st.data())
def test_mutated_queries_only_raise_format_error(query: bytes, data: st.DataObject) -> None:
    assert isinstance(answer(SNAP, query, client=CLIENT), (LocalAnswer, Forward))
    buf = bytearray(query)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if kind == "flip" and buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del buf[data.draw(st.integers(0, len(buf))) :]
        elif kind == "insert":
            i = data.draw(st.integers(0, len(buf)))
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            del buf[i]
    try:
        res = answer(SNAP, bytes(buf), client=CLIENT)
    except DnsFormatError:
        return
    if isinstance(res, LocalAnswer):
        reply = parse_message(res.data)
        assert reply.is_response and reply.id == int.from_bytes(bytes(buf[:2]), "big")


@FAST
@given(valid_queries)
def test_valid_queries_round_trip_and_get_an_answer(query: bytes) -> None:
    msg = parse_message(query)
    assert encode_message(msg) == query
    res = answer(SNAP, query, client=CLIENT, udp=True)
    if isinstance(res, LocalAnswer):
        reply = parse_message(res.data)
        assert reply.id == msg.id and reply.questions == msg.questions[:1]
        assert len(res.data) <= max(512, min(1232, (msg.edns.udp_payload if msg.edns else 0)))
    else:
        assert res.query == query


@FAST
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=5), st.integers(1, 50))
def test_tcp_framer_reassembles_any_chunking(msgs: list[bytes], chunk: int) -> None:
    stream = b"".join(frame_tcp(m) for m in msgs)
    framer = TcpFramer()
    out: list[bytes] = []
    for i in range(0, len(stream), chunk):
        out += framer.feed(stream[i : i + chunk])
    assert out == msgs and framer.pending == 0
