"""DNS proxy decisions: service A/AAAA, search-style short names, NXDOMAIN/NODATA, forwarding."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from ztunnel.dns import (
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_OPT,
    TYPE_SOA,
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
    error_response,
    frame_tcp,
    name_from_text,
    name_to_text,
    parse_message,
)
from ztunnel.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload

CLIENT = Workload(uid="c", name="client", namespace="shop", ip="10.0.1.1", node="n1")
DB = Workload(uid="d", name="db-0", namespace="data", ip="10.0.2.1", ip6="fd00::21", node="n2")
DB2 = Workload(uid="d2", name="db-1", namespace="data", ip="10.0.2.2", node="n2")

SNAP = Snapshot(
    version=7,
    node="n1",
    workloads=(CLIENT, DB, DB2),
    services=(
        Service(
            name="cart",
            namespace="shop",
            vips=("10.96.0.10", "fd00:96::10"),
            ports=(ServicePort(port=80),),
        ),
        Service(name="v4only", namespace="shop", vips=("10.96.0.11",)),
        Service(
            name="db",
            namespace="data",
            endpoints=(Endpoint(workload_uid="d"), Endpoint(workload_uid="d2", healthy=False)),
        ),
    ),
)


def ask(
    name: str, qtype: int = TYPE_A, *, client: Workload | None = CLIENT, **kw: object
) -> Message:
    res = answer(SNAP, encode_query(name, qtype, msg_id=4242, **kw), client=client)  # type: ignore[arg-type]
    assert isinstance(res, LocalAnswer), res
    msg = parse_message(res.data)
    assert msg.id == 4242 and msg.is_response and msg.rcode == res.rcode
    assert msg.recursion_desired
    return msg


def addresses(msg: Message) -> list[str]:
    return [str(ipaddress.ip_address(rr.rdata)) for rr in msg.answers]


def test_fqdn_a_and_aaaa() -> None:
    m = ask("cart.shop.svc.cluster.local")
    assert m.rcode == RCODE_NOERROR and m.authoritative
    assert addresses(m) == ["10.96.0.10"]
    assert m.answers[0].ttl == 30
    assert name_to_text(m.answers[0].name) == "cart.shop.svc.cluster.local."
    m6 = ask("cart.shop.svc.cluster.local.", TYPE_AAAA)
    assert addresses(m6) == ["fd00:96::10"]


def test_case_is_preserved_and_matching_is_case_insensitive() -> None:
    m = ask("CaRt.Shop.SVC.cluster.LOCAL")
    assert addresses(m) == ["10.96.0.10"]
    assert m.questions[0].name == name_from_text("CaRt.Shop.SVC.cluster.LOCAL")
    assert m.answers[0].name == m.questions[0].name


def test_short_names_use_client_namespace() -> None:
    assert addresses(ask("cart")) == ["10.96.0.10"]
    assert addresses(ask("cart.shop")) == ["10.96.0.10"]
    assert addresses(ask("cart.shop.svc")) == ["10.96.0.10"]
    assert addresses(ask("db.data")) == ["10.0.2.1"]
    # a bare name of another namespace's service is not ours
    res = answer(SNAP, encode_query("db", TYPE_A), client=CLIENT)
    assert isinstance(res, Forward) and name_to_text(res.question.name) == "db."
    # without a known client, bare names are forwarded
    assert isinstance(answer(SNAP, encode_query("cart", TYPE_A)), Forward)


def test_nodata_for_missing_family_and_other_types() -> None:
    m = ask("v4only.shop.svc.cluster.local", TYPE_AAAA)
    assert m.rcode == RCODE_NOERROR and m.answers == ()
    assert [rr.rtype for rr in m.authorities] == [TYPE_SOA]
    mx = ask("cart.shop.svc.cluster.local", 15)
    assert mx.rcode == RCODE_NOERROR and mx.answers == () and mx.authorities


def test_headless_service_answers_healthy_endpoints() -> None:
    assert addresses(ask("db.data.svc.cluster.local")) == ["10.0.2.1"]
    assert addresses(ask("db.data.svc.cluster.local", TYPE_AAAA)) == ["fd00::21"]


def test_nxdomain_in_svc_zone_with_soa() -> None:
    m = ask("nope.shop.svc.cluster.local")
    assert m.rcode == RCODE_NXDOMAIN and m.authoritative
    soa = m.authorities[0]
    assert soa.rtype == TYPE_SOA and name_to_text(soa.name) == "cluster.local."
    serial, _refresh, _retry, _expire, minimum = struct.unpack("!IIIII", soa.rdata[-20:])
    assert serial == 7 and minimum == 30
    # search-list expansion under our zone fails fast
    assert ask("cart.shop.shop.svc.cluster.local").rcode == RCODE_NXDOMAIN
    assert ask("x.svc.cluster.local").rcode == RCODE_NXDOMAIN


def test_existing_parents_are_nodata() -> None:
    for name in ("shop.svc.cluster.local", "svc.cluster.local"):
        m = ask(name)
        assert m.rcode == RCODE_NOERROR and m.answers == (), name


def test_everything_else_is_forwarded() -> None:
    for name in (
        "example.com",
        "www.example.com",
        "pod.cluster.local",
        "cluster.local",
        "_http._tcp.cart.shop.svc.cluster.local",
    ):
        q = encode_query(name, TYPE_A, msg_id=9)
        res = answer(SNAP, q, client=CLIENT)
        assert isinstance(res, Forward), name
        assert res.query == q and res.question.qtype == TYPE_A


def test_non_in_class_is_forwarded() -> None:
    q = encode_message(
        Message(1, 0x0100, (Question(name_from_text("cart.shop.svc.cluster.local"), 1, 3),))
    )
    assert isinstance(answer(SNAP, q), Forward)


def test_custom_dns_domain() -> None:
    snap = Snapshot(
        version=1,
        node="n1",
        dns_domain="corp.example",
        services=(Service(name="api", namespace="x", vips=("10.96.1.1",)),),
    )
    res = answer(snap, encode_query("api.x.svc.corp.example", TYPE_A))
    assert isinstance(res, LocalAnswer)
    assert addresses(parse_message(res.data)) == ["10.96.1.1"]
    assert isinstance(answer(snap, encode_query("api.x.svc.cluster.local", TYPE_A)), Forward)


def test_edns_is_echoed_and_sizes_respected() -> None:
    m = ask("cart.shop.svc.cluster.local", edns=4096)
    edns = m.edns
    assert edns is not None and edns.udp_payload == 1232 and edns.version == 0
    plain = ask("cart.shop.svc.cluster.local")
    assert plain.edns is None


def test_edns_version_1_gets_badvers() -> None:
    q = encode_message(
        Message(
            5,
            0x0100,
            (Question(name_from_text("cart.shop.svc.cluster.local"), TYPE_A),),
            additionals=(ResourceRecord((), TYPE_OPT, 1232, 1 << 16, b""),),
        )
    )
    res = answer(SNAP, q)
    assert isinstance(res, LocalAnswer)
    m = parse_message(res.data)
    assert m.edns is not None and (m.edns.ext_rcode << 4 | m.rcode) == 16


def test_udp_truncation_sets_tc() -> None:
    many = Service(
        name="big",
        namespace="shop",
        vips=tuple(f"10.97.{i // 250}.{i % 250 + 1}" for i in range(60)),
    )
    snap = Snapshot(version=1, node="n1", services=(many,))
    q = encode_query("big.shop.svc.cluster.local", TYPE_A, msg_id=3)
    udp = answer(snap, q)
    assert isinstance(udp, LocalAnswer) and len(udp.data) <= 512
    m = parse_message(udp.data)
    assert m.truncated and m.answers == ()
    tcp = answer(snap, q, udp=False)
    assert isinstance(tcp, LocalAnswer)
    assert len(parse_message(tcp.data).answers) == 60
    big_edns = answer(snap, encode_query("big.shop.svc.cluster.local", TYPE_A, edns=4096))
    assert isinstance(big_edns, LocalAnswer)
    assert len(parse_message(big_edns.data).answers) == 60


def test_bad_queries() -> None:
    with pytest.raises(DnsFormatError):
        answer(SNAP, b"\x00\x01")
    # a response is never answered (loop protection)
    resp = encode_message(Message(1, 0x8180, (Question(name_from_text("a.b"), 1),)))
    with pytest.raises(DnsFormatError):
        answer(SNAP, resp)
    # header ok, body broken -> FORMERR echoing the id
    broken = struct.pack("!HHHHHH", 77, 0x0100, 1, 0, 0, 0) + b"\x05ab"
    res = answer(SNAP, broken)
    assert isinstance(res, LocalAnswer) and res.rcode == RCODE_FORMERR
    m = parse_message(res.data)
    assert m.id == 77 and m.rcode == RCODE_FORMERR
    # two questions
    two = encode_message(
        Message(8, 0x0100, (Question(name_from_text("a"), 1), Question(name_from_text("b"), 1)))
    )
    res2 = answer(SNAP, two)
    assert isinstance(res2, LocalAnswer) and res2.rcode == RCODE_FORMERR
    # opcode STATUS
    status = encode_message(Message(9, 2 << 11, (Question(name_from_text("a"), 1),)))
    res3 = answer(SNAP, status)
    assert isinstance(res3, LocalAnswer) and res3.rcode == RCODE_NOTIMP
    assert error_response(b"short") is None


def test_compression_in_responses() -> None:
    m = answer(SNAP, encode_query("cart.shop.svc.cluster.local", TYPE_A))
    assert isinstance(m, LocalAnswer)
    qname_len = len("cart.shop.svc.cluster.local") + 2
    # header + question + answer (pointer 2 + 10 + 4) + authority none
    assert len(m.data) == 12 + qname_len + 4 + 2 + 10 + 4
    assert m.data[12 + qname_len + 4 : 12 + qname_len + 6] == b"\xc0\x0c"


def test_parse_follows_pointers_and_rejects_loops() -> None:
    header = struct.pack("!HHHHHH", 1, 0, 2, 0, 0, 0)
    q1 = b"\x03foo\x03bar\x00" + b"\x00\x01\x00\x01"
    q2 = b"\x03baz\xc0\x0c" + b"\x00\x01\x00\x01"
    m = parse_message(header + q1 + q2)
    assert [name_to_text(q.name) for q in m.questions] == ["foo.bar.", "baz.foo.bar."]
    loop = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    with pytest.raises(DnsFormatError, match="loop"):
        parse_message(loop)
    past = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\xff\x00\x01\x00\x01"
    with pytest.raises(DnsFormatError):
        parse_message(past)
    with pytest.raises(DnsFormatError, match="label type"):
        parse_message(struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x41a\x00\x00\x01\x00\x01")
    with pytest.raises(DnsFormatError, match="unexpected bytes"):
        parse_message(encode_query("a.b", 1) + b"\x00")


def test_long_names_are_rejected() -> None:
    long_name = tuple([b"a" * 63] * 4)
    with pytest.raises(DnsFormatError):
        encode_message(Message(1, 0, (Question(long_name, 1),)))
    header = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)
    raw = header + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01"
    with pytest.raises(DnsFormatError, match="255"):
        parse_message(raw)
    with pytest.raises(ValueError):
        name_from_text("a" * 64 + ".com")


def test_name_text_escapes() -> None:
    assert name_to_text(()) == "."
    assert name_to_text((b"a.b", b"c\\", b"\x00")) == "a\\.b.c\\\\.\\000."


def test_tcp_framing() -> None:
    q1 = encode_query("cart.shop.svc.cluster.local", TYPE_A, msg_id=1)
    q2 = encode_query("example.com", TYPE_AAAA, msg_id=2)
    stream = frame_tcp(q1) + frame_tcp(q2)
    framer = TcpFramer()
    got: list[bytes] = []
    for i in range(0, len(stream), 7):
        got += framer.feed(stream[i : i + 7])
    assert got == [q1, q2] and framer.pending == 0
    assert framer.feed(b"\x00") == [] and framer.pending == 1
    with pytest.raises(DnsFormatError):
        TcpFramer().feed(b"\x00\x00")
    with pytest.raises(DnsFormatError):
        frame_tcp(b"")
    with pytest.raises(DnsFormatError):
        frame_tcp(b"x" * 70000)
