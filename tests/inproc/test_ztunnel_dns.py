"""ztunnel's DNS proxy forwarding to the node's upstream resolvers (aiodns), on 127.0.0.1.

A tiny authoritative server (UDP + TCP, on 127.0.0.1:0) plays the node's resolver;
the proxy's answers are checked as a client sees them: same id and question
spelling, re-encoded records, NXDOMAIN/SERVFAIL rcodes, truncation over UDP, and
TCP clients served over TCP upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ztunnel.dns import (
    CLASS_IN,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_SOA,
    Forward,
    Message,
    Question,
    ResourceRecord,
    TcpFramer,
    answer,
    encode_query,
    frame_tcp,
    make_response,
    name_from_text,
    parse_message,
)
from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.identity import IdentityManager
from ztunnel.listeners._base import Limits, ProxyContext
from ztunnel.listeners.dns_server import (
    DnsListener,
    UpstreamResolver,
    UpstreamServer,
    parse_upstreams,
    resolv_conf_nameservers,
)
from ztunnel.listeners.metrics import ZtunnelMetrics
from ztunnel.snapshot import Service, Snapshot, Workload

TYPE_CNAME, TYPE_MX, TYPE_TXT, TYPE_SRV, TYPE_HTTPS = 5, 15, 16, 33, 65
CLIENT = Workload(uid="shop/c", name="client", namespace="shop", ip="10.0.1.1", node="n1")
SNAP = Snapshot(
    version=1, node="n1", workloads=(CLIENT,),
    services=(Service(name="cart", namespace="shop", vips=("10.96.0.10",)),),
)


def wire(text: str) -> bytes:
    return b"".join(bytes([len(lb)]) + lb for lb in name_from_text(text)) + b"\0"


LONG_TXT = b"".join(bytes([200]) + bytes([65 + i]) * 200 for i in range(4))  # 804 octets
SOA = wire("ns.example") + wire("hostmaster.example") + struct.pack("!IIIII", 7, 1, 1, 1, 60)
# name -> type -> [(rtype, ttl, rdata)]
ZONE: dict[str, dict[int, list[tuple[int, int, bytes]]]] = {
    "outside.example": {
        TYPE_A: [(TYPE_A, 0, socket.inet_aton("10.250.0.254"))],
        TYPE_AAAA: [(TYPE_AAAA, 0, socket.inet_pton(socket.AF_INET6, "fd00:250::fe"))],
    },
    "alias.example": {
        TYPE_A: [(TYPE_CNAME, 0, wire("outside.example")),
                 (TYPE_A, 0, socket.inet_aton("10.250.0.254"))],
    },
    "mail.example": {TYPE_MX: [(TYPE_MX, 0, struct.pack("!H", 10) + wire("mx.example"))]},
    "_sip._tcp.example": {
        TYPE_SRV: [(TYPE_SRV, 0, struct.pack("!HHH", 1, 2, 5060) + wire("outside.example"))],
    },
    "txt.example": {TYPE_TXT: [(TYPE_TXT, 0, LONG_TXT)]},
    "example": {TYPE_SOA: [(TYPE_SOA, 0, SOA)]},
    "https.example": {TYPE_HTTPS: [(TYPE_HTTPS, 0, struct.pack("!H", 1) + b"\0")]},
}
# records whose owner is not the question's name (the target of a CNAME)
OWNERS = {("alias.example", TYPE_A): name_from_text("outside.example")}


class Upstream:
    """The authoritative test server; counts queries per (transport, name)."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def respond(self, data: bytes, transport: str) -> bytes:
        q = parse_message(data)
        name = b".".join(q.questions[0].name).decode().lower()
        self.seen[(transport, name)] += 1
        if name == "fail.example":
            return make_response(q, rcode=RCODE_SERVFAIL)
        if name not in ZONE:
            return make_response(q, rcode=RCODE_NXDOMAIN)
        qname = q.questions[0].name
        rrs = [ResourceRecord(OWNERS.get((name, t), qname), t, CLASS_IN, ttl, rdata)
               for t, ttl, rdata in ZONE[name].get(q.questions[0].qtype, [])]
        return make_response(q, answers=rrs, authoritative=True)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, up: Upstream) -> None:
        self.up = up

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.up.respond(data, "udp"), addr)


@contextlib.asynccontextmanager
async def upstream_server() -> AsyncIterator[tuple[Upstream, int]]:
    up = Upstream()
    loop = asyncio.get_running_loop()

    async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = TcpFramer()
        try:
            while data := await reader.read(4096):
                for msg in framer.feed(data):
                    writer.write(frame_tcp(up.respond(msg, "tcp")))
                await writer.drain()
        finally:
            writer.close()

    for attempt in range(32):  # a port number free for TCP and for UDP
        tcp = await asyncio.start_server(tcp_client, "127.0.0.1", 0)
        port = tcp.sockets[0].getsockname()[1]
        try:
            udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(up),
                                                         local_addr=("127.0.0.1", port))
            break
        except OSError as exc:
            tcp.close()
            await tcp.wait_closed()
            if exc.errno != errno.EADDRINUSE or attempt == 31:
                raise
    try:
        yield up, port
    finally:
        udp.close()
        tcp.close()
        await tcp.wait_closed()


def txt(rdata: bytes) -> bytes:
    """The text of TXT rdata (its character-strings joined: c-ares does not keep the split)."""
    out, i = b"", 0
    while i < len(rdata):
        out += rdata[i + 1 : i + 1 + rdata[i]]
        i += 1 + rdata[i]
    return out


def forward_of(name: str, qtype: int, *, msg_id: int = 4242, edns: int | None = None) -> Forward:
    result = answer(SNAP, encode_query(name, qtype, msg_id=msg_id, edns=edns), client=CLIENT)
    assert isinstance(result, Forward)
    return result


# ------------------------------------------------------------------------------ pure


def test_parse_upstreams() -> None:
    assert parse_upstreams("10.0.0.2, 10.0.0.3:5353,[fd00::53]:54,fd00::1") == (
        UpstreamServer("10.0.0.2"), UpstreamServer("10.0.0.3", 5353),
        UpstreamServer("fd00::53", 54), UpstreamServer("fd00::1"),
    )
    assert str(UpstreamServer("fd00::53", 54)) == "[fd00::53]:54"
    for bad in ("", "dns.example", "10.0.0.2:0", "10.0.0.2:x", "[fd00::1"):
        with pytest.raises(ValueError):
            parse_upstreams(bad)


def test_resolv_conf_nameservers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n"
                    "nameserver bogus\noptions ndots:5\n")
    assert resolv_conf_nameservers(str(conf)) == (UpstreamServer("10.0.0.2"),
                                                  UpstreamServer("fe80::1"))
    assert resolv_conf_nameservers(str(tmp_path / "missing")) == ()


# ------------------------------------------------------------------------------ resolver


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_upstream_answers_are_reencoded_for_the_clients_question(tcp: bool) -> None:
    async with upstream_server() as (up, port):
        res = UpstreamResolver([UpstreamServer("127.0.0.1", port)], timeout=3)
        try:
            # the client's spelling (0x20 case randomization) and id come back
            r = parse_message(await res.resolve(forward_of("OutSide.Example", TYPE_A), tcp=tcp))
            assert (r.id, r.rcode, r.is_response) == (4242, RCODE_NOERROR, True)
            assert r.questions == (Question(name_from_text("OutSide.Example"), TYPE_A),)
            assert [(a.name, a.rtype, a.rdata) for a in r.answers] == [
                (name_from_text("OutSide.Example"), TYPE_A, socket.inet_aton("10.250.0.254"))]
            assert up.seen[("tcp" if tcp else "udp", "outside.example")] == 1
            assert up.seen[("udp" if tcp else "tcp", "outside.example")] == 0
            r = parse_message(await res.resolve(forward_of("outside.example", TYPE_AAAA),
                                                 tcp=tcp))
            assert [a.rdata for a in r.answers] == [
                socket.inet_pton(socket.AF_INET6, "fd00:250::fe")]
            # record types keep their rdata, byte for byte
            for name, qtype in (("alias.example", TYPE_A), ("mail.example", TYPE_MX),
                                ("_sip._tcp.example", TYPE_SRV), ("example", TYPE_SOA)):
                r = parse_message(await res.resolve(forward_of(name, qtype), tcp=tcp))
                got = [(a.rtype, a.rdata) for a in r.answers]
                assert got == [(t, d) for t, _ttl, d in ZONE[name][qtype]], name
            # NXDOMAIN, NODATA and SERVFAIL keep their meaning
            r = parse_message(await res.resolve(forward_of("nope.example", TYPE_A), tcp=tcp))
            assert (r.rcode, r.answers) == (RCODE_NXDOMAIN, ())
            r = parse_message(await res.resolve(forward_of("mail.example", TYPE_A), tcp=tcp))
            assert (r.rcode, r.answers) == (RCODE_NOERROR, ())
            r = parse_message(await res.resolve(forward_of("fail.example", TYPE_A), tcp=tcp))
            assert r.rcode == RCODE_SERVFAIL
            # a type aiodns cannot ask (HTTPS) is relayed to the same upstream as received
            r = parse_message(await res.resolve(forward_of("https.example", TYPE_HTTPS),
                                                 tcp=tcp))
            assert [(a.rtype, a.rdata) for a in r.answers] == [(TYPE_HTTPS, b"\0\x01\0")]
            assert r.id == 4242
        finally:
            await res.close()


async def test_udp_answers_fit_the_client_and_tcp_gets_everything() -> None:
    async with upstream_server() as (_up, port):
        res = UpstreamResolver([UpstreamServer("127.0.0.1", port)], timeout=3)
        try:
            udp = await res.resolve(forward_of("txt.example", TYPE_TXT), tcp=False)
            r = parse_message(udp)
            assert r.truncated and len(udp) <= 512 and r.answers == ()
            r = parse_message(await res.resolve(forward_of("txt.example", TYPE_TXT, edns=1232),
                                                 tcp=False))
            assert not r.truncated and r.edns is not None
            assert txt(r.answers[0].rdata) == txt(LONG_TXT)
            r = parse_message(await res.resolve(forward_of("txt.example", TYPE_TXT), tcp=True))
            assert not r.truncated and txt(r.answers[0].rdata) == txt(LONG_TXT)
        finally:
            await res.close()


async def test_unreachable_upstream_is_servfail_within_the_timeout() -> None:
    # a UDP port on loopback that nobody answers from
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        res = UpstreamResolver([UpstreamServer("127.0.0.1", silent.getsockname()[1])],
                               timeout=1.0)
        try:
            start = time.monotonic()
            r = parse_message(await res.resolve(forward_of("outside.example", TYPE_A),
                                                 tcp=False))
            assert r.rcode == RCODE_SERVFAIL and r.id == 4242
            assert time.monotonic() - start < 2.5
        finally:
            await res.close()


async def test_default_upstream_follows_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example\n")
    res = UpstreamResolver(resolv_conf=str(conf))
    assert not res.available  # no nameserver: the listener falls back to the original resolver
    async with upstream_server() as (_up, port):
        conf.write_text("nameserver 127.0.0.1\n")
        res._checked = float("-inf")  # skip the once-a-second re-read limit
        assert res.available and res.servers == (UpstreamServer("127.0.0.1"),)
        await res.close()
        # explicit servers win over the file
        explicit = UpstreamResolver([UpstreamServer("127.0.0.1", port)], resolv_conf=str(conf))
        assert explicit.servers == (UpstreamServer("127.0.0.1", port),)
        await explicit.close()


# ------------------------------------------------------------------------------ listener


def _ctx() -> ProxyContext:
    async def no_fetch(_identity: Any, _csr: bytes) -> list[bytes]:
        raise AssertionError("no certificates in this test")

    return ProxyContext(node="n1", snapshot=SNAP, metrics=ZtunnelMetrics(),
                        identities=IdentityManager(no_fetch), pool=HboneConnectionPool(),
                        limits=Limits())


async def _udp_query(addr: tuple[str, int], query: bytes) -> Message:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, addr)
        await loop.sock_sendall(s, query)
        async with asyncio.timeout(5):
            return parse_message(await loop.sock_recv(s, 65535))


async def _tcp_query(addr: tuple[str, int], query: bytes) -> Message:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(frame_tcp(query))
        async with asyncio.timeout(5):
            n = struct.unpack("!H", await reader.readexactly(2))[0]
            return parse_message(await reader.readexactly(n))
    finally:
        writer.close()


async def test_listener_answers_mesh_names_and_forwards_the_rest_over_udp_and_tcp() -> None:
    async with upstream_server() as (up, port):
        res = UpstreamResolver([UpstreamServer("127.0.0.1", port)], timeout=3)
        dns = DnsListener(_ctx(), CLIENT, None, host="127.0.0.1", port=0, upstream=res)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(dns.run())
            try:
                for ask in (_udp_query, _tcp_query):
                    r = await ask(dns.address, encode_query("cart.shop.svc.cluster.local",
                                                            TYPE_A, msg_id=1))
                    assert [a.rdata for a in r.answers] == [socket.inet_aton("10.96.0.10")]
                    r = await ask(dns.address, encode_query("outside.example", TYPE_A, msg_id=2))
                    assert (r.id, [a.rdata for a in r.answers]) == (
                        2, [socket.inet_aton("10.250.0.254")])
                    r = await ask(dns.address, encode_query("unknown.example", TYPE_A, msg_id=3))
                    assert r.rcode == RCODE_NXDOMAIN
                assert up.seen[("udp", "outside.example")] >= 1
                assert up.seen[("tcp", "outside.example")] >= 1
                assert (dns.answered, dns.forwarded) == (2, 4)
            finally:
                await dns.drain(1)
                task.cancel()
        await res.close()


async def test_listener_without_any_upstream_answers_servfail_for_other_names(
    tmp_path: Path,
) -> None:
    # no upstream known and the client asked the listener itself: SERVFAIL, not silence
    empty = tmp_path / "resolv.conf"
    empty.write_text("")
    res = UpstreamResolver(resolv_conf=str(empty))
    dns = DnsListener(_ctx(), CLIENT, None, host="127.0.0.1", port=0, upstream=res)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(dns.run())
        try:
            r = await _udp_query(dns.address, encode_query("outside.example", TYPE_A, msg_id=9))
            assert (r.id, r.rcode) == (9, RCODE_SERVFAIL)
            r = await _udp_query(dns.address, encode_query("cart", TYPE_A, msg_id=10))
            assert [a.rdata for a in r.answers] == [socket.inet_aton("10.96.0.10")]
        finally:
            await dns.drain(1)
            task.cancel()

