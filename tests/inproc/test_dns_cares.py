"""The sans-IO DNS answers, served on 127.0.0.1 over UDP and TCP, as c-ares (aiodns) sees them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiodns
import pycares
import pytest

from ztunnel.dns import LocalAnswer, TcpFramer, answer, error_response, frame_tcp
from ztunnel.snapshot import Service, Snapshot, Workload

CLIENT = Workload(uid="c", name="client", namespace="shop", ip="10.0.1.1", node="n1")
SNAP = Snapshot(
    version=1,
    node="n1",
    workloads=(CLIENT,),
    services=(
        Service(name="cart", namespace="shop", vips=("10.96.0.10", "fd00::10")),
        Service(name="v4only", namespace="shop", vips=("10.96.0.11",)),
    ),
)


def respond(data: bytes) -> bytes | None:
    try:
        res = answer(SNAP, data, client=CLIENT)
    except ValueError:
        return None
    if isinstance(res, LocalAnswer):
        return res.data
    # no upstream in this test: answer REFUSED for names we would forward
    return error_response(data, 5)


class _Udp(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = respond(data)
        if out is not None:
            self.transport.sendto(out, addr)


async def _tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    framer = TcpFramer()
    try:
        while data := await reader.read(4096):
            for msg in framer.feed(data):
                out = respond(msg)
                if out is not None:
                    writer.write(frame_tcp(out))
            await writer.drain()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def dns_server() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    tcp = await asyncio.start_server(_tcp_client, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    udp, _ = await loop.create_datagram_endpoint(_Udp, local_addr=("127.0.0.1", port))
    try:
        yield port
    finally:
        udp.close()
        tcp.close()
        await tcp.wait_closed()


def addrs(result: Any) -> list[str]:
    return [str(rr.data.addr) for rr in result.answer]


@pytest.mark.parametrize("use_tcp", [False, True], ids=["udp", "tcp"])
async def test_cares_resolves_services(use_tcp: bool) -> None:
    async with dns_server() as port:
        flags = pycares.ARES_FLAG_USEVC if use_tcp else 0
        r = aiodns.DNSResolver(
            nameservers=[f"127.0.0.1:{port}"], timeout=2, tries=1, flags=flags
        )
        try:
            a = await r.query_dns("cart.shop.svc.cluster.local", "A")
            assert addrs(a) == ["10.96.0.10"]
            assert a.answer[0].ttl == 30
            aaaa = await r.query_dns("cart.shop.svc.cluster.local", "AAAA")
            assert addrs(aaaa) == ["fd00::10"]
            short = await r.query_dns("cart", "A")
            assert addrs(short) == ["10.96.0.10"]
            with pytest.raises(aiodns.error.DNSError) as nx:
                await r.query_dns("nope.shop.svc.cluster.local", "A")
            assert nx.value.args[0] == aiodns.error.ARES_ENOTFOUND
            with pytest.raises(aiodns.error.DNSError) as nodata:
                await r.query_dns("v4only.shop.svc.cluster.local", "AAAA")
            assert nodata.value.args[0] == aiodns.error.ARES_ENODATA
            # names we would forward: this test server refuses them
            with pytest.raises(aiodns.error.DNSError):
                await r.query_dns("example.com", "A")
        finally:
            await r.close()
