"""DestinationRule connection-pool limits on HTTP/2 (gRPC) upstreams, TCP ports and mirrors."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import grpc
import pytest

from tests.inproc.test_waypoint_e2e import Mesh, backend_ref, get, route, which
from tests.inproc.test_waypoint_resilience import dr
from ztunnel.hbone.errors import HboneError


def _gated_echo(gate: asyncio.Event, held: list[bytes]) -> Any:
    """`test.Echo/Hello`: answers at once, except `hold`, which waits for `gate`."""

    async def hello(request: bytes, context: Any) -> bytes:
        if request == b"hold":
            held.append(request)
            await gate.wait()
        return b"re: " + request

    return grpc.method_handlers_generic_handler(
        "test.Echo", {"Hello": grpc.unary_unary_rpc_method_handler(hello)})


def _flags(mesh: Mesh, metric: str) -> dict[tuple[str, ...], float]:
    assert mesh.waypoint is not None
    return {(s.labels.get("response_code", ""), s.labels["response_flags"]): s.value
            for m in mesh.waypoint.registry.collect() for s in m.samples
            if s.name == metric}


async def test_grpc_upstream_requests_per_connection() -> None:
    mesh = Mesh({"echo": 1}, [
        dr("echo", {"connectionPool": {"http": {"maxRequestsPerConnection": 2}}}),
    ], {"echo": "grpc"}, grpc_handlers={"echo": _gated_echo(asyncio.Event(), [])})
    async with (mesh.running(), mesh.forward("echo") as url,
                grpc.aio.insecure_channel(url.removeprefix("http://")) as ch):
        hello = ch.unary_unary("/test.Echo/Hello")
        for i in range(6):
            assert await hello(str(i).encode(), timeout=10) == f"re: {i}".encode()
        assert mesh.waypoint is not None
        # two calls per connection: six calls took three HTTP/2 connections, each its
        # own HBONE CONNECT to the endpoint
        assert mesh.waypoint.h2_pool.connections_opened == 3
    assert len(mesh.backends["echo"][0].peers) == 3


async def test_grpc_upstream_max_connections_queue_and_overflow() -> None:
    gate = asyncio.Event()
    held: list[bytes] = []
    mesh = Mesh({"echo": 2}, [
        dr("echo", {"loadBalancer": {"simple": "ROUND_ROBIN"},
                    "connectionPool": {"tcp": {"maxConnections": 1},
                                       "http": {"http1MaxPendingRequests": 1}}}),
    ], {"echo": "grpc"}, grpc_handlers={"echo": _gated_echo(gate, held)})
    async with (mesh.running(), mesh.forward("echo") as url,
                grpc.aio.insecure_channel(url.removeprefix("http://")) as ch):
        hello = ch.unary_unary("/test.Echo/Hello")
        a, b = mesh.backends["echo"]
        # round robin alternates endpoints; with one connection allowed for the whole
        # backend, each switch closes the idle connection to the other endpoint
        for i in range(4):
            assert await hello(str(i).encode(), timeout=10) == f"re: {i}".encode()
        assert (len(a.peers), len(b.peers)) == (2, 2), (a.peers, b.peers)
        assert mesh.waypoint is not None
        assert mesh.waypoint.h2_pool.connections_opened == 4

        # the one connection is busy with a held call to endpoint X ...
        first = asyncio.ensure_future(hello(b"hold", timeout=10))
        async with asyncio.timeout(5):
            while not held:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        # ... a call for endpoint Y needs a connection of its own: it waits (pending) ...
        second = asyncio.ensure_future(hello(b"second", timeout=10))
        await asyncio.sleep(0.3)
        assert not second.done()
        # ... a call for X shares X's connection (HTTP/2 multiplexing) ...
        assert await hello(b"third", timeout=5) == b"re: third"
        # ... and another call for Y finds the pending queue full: 503 UO, at once
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            await hello(b"fourth", timeout=5)
            raise AssertionError("expected UNAVAILABLE: the pending queue is full")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert loop.time() - t0 < 1.0
        assert not second.done()
        gate.set()  # X's call ends: its connection gives way to Y's
        assert await first == b"re: hold"
        assert await asyncio.wait_for(second, 5) == b"re: second"
    assert _flags(mesh, "istio_requests_total").get(("503", "UO")) == 1.0
    assert mesh.waypoint.h2_pool.connections_opened == 6


async def test_tcp_port_max_connections_queue_and_overflow() -> None:
    mesh = Mesh({"db": 1}, [
        dr("db", {"connectionPool": {"tcp": {"maxConnections": 1},
                                     "http": {"http1MaxPendingRequests": 1}}}),
    ], {"db": "tcp"})
    request = b"GET /x HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n"

    async def read_all(stream: Any) -> bytes:
        data = b""
        while chunk := await stream.read():
            data += chunk
        return data

    async with mesh.running():
        # the first connection holds the backend's only connection: half a request
        one = await mesh.tunnel("db")
        one.write(request[:20])
        await one.drain()
        await asyncio.sleep(0.2)
        # the second waits for it (pending); its bytes are kept, not lost
        two = await mesh.tunnel("db")
        two.write(request)
        await two.drain()
        two_reply = asyncio.ensure_future(read_all(two))
        await asyncio.sleep(0.3)
        assert not two_reply.done()
        # the third finds the pending queue full: reset at once
        three = await mesh.tunnel("db")
        try:
            async with asyncio.timeout(2):
                three.write(request)
                await three.drain()
                got = await read_all(three)
            raise AssertionError(f"the third connection was served: {got[:40]!r}")
        except (HboneError, ConnectionError):
            pass
        # the first one finishes: the second gets the connection and its answer
        one.write(request[20:])
        await one.drain()
        async with asyncio.timeout(5):
            assert (await read_all(one)).startswith(b"HTTP/1.1 200")
        one.write_eof()
        async with asyncio.timeout(5):
            assert (await two_reply).startswith(b"HTTP/1.1 200")
        two.write_eof()
        await asyncio.sleep(0.1)  # connections are counted when they end
    assert mesh.waypoint is not None
    opened = {flags: n for (_, flags), n in
              _flags(mesh, "istio_tcp_connections_opened_total").items()}
    assert opened == {"-": 2.0, "UO": 1.0}, opened


async def test_tcp_connections_are_not_requests_for_http2_max_requests() -> None:
    # as in Istio: http2MaxRequests bounds HTTP requests, not TCP connections
    mesh = Mesh({"db": 1}, [
        dr("db", {"connectionPool": {"http": {"http2MaxRequests": 1}}}),
    ], {"db": "tcp"})
    request = b"GET /x HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n"
    async with mesh.running():
        one = await mesh.tunnel("db")
        one.write(request[:20])  # held open, mid-request
        await one.drain()
        await asyncio.sleep(0.2)
        two = await mesh.tunnel("db")
        two.write(request)
        await two.drain()
        async with asyncio.timeout(5):
            data = b""
            while chunk := await two.read():
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        two.write_eof()
        one.reset()


@pytest.mark.parametrize("max_connections", [2, 50])
async def test_grpc_pool_accounting_balances_under_concurrent_load(max_connections: int) -> None:
    # connections turn over all the time (5 calls each): with 2 allowed for 3 endpoints
    # calls queue for slots, a slot lost on any path would soon leave every call
    # waiting; with 50, bursts reserve slots they give back when a connection to their
    # endpoint opened meanwhile
    async def hello(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(0.002 * (request[-1] % 5))
        return b"re: " + request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Hello": grpc.unary_unary_rpc_method_handler(hello)})
    mesh = Mesh({"echo": 3}, [
        dr("echo", {"loadBalancer": {"simple": "ROUND_ROBIN"},
                    "connectionPool": {"tcp": {"maxConnections": max_connections},
                                       "http": {"http1MaxPendingRequests": 100,
                                                "maxRequestsPerConnection": 5}}}),
    ], {"echo": "grpc"}, grpc_handlers={"echo": handler}, access_log=False)
    async with (mesh.running(), mesh.forward("echo") as url,
                grpc.aio.insecure_channel(url.removeprefix("http://")) as ch):
        call = ch.unary_unary("/test.Echo/Hello")
        for wave in range(4):
            got = await asyncio.gather(*(call(f"{wave}-{i}".encode(), timeout=20)
                                         for i in range(30)))
            assert got == [f"re: {wave}-{i}".encode() for i in range(30)]
        assert mesh.waypoint is not None
        wp = mesh.waypoint
        assert wp.h2_pool.connections_opened >= 120 // 5
        assert wp.chain is not None
        (cluster,) = [c for c in wp.chain.state.clusters.values()
                      if c.target.key == "app/echo:80"]
        live = sum(1 for lst in wp.h2_pool._conns.values() for c in lst if not c.closed)
        pool = cluster.pool
        assert (pool.connections, pool.pending, pool.active) == (live, 0, 0)
        assert live <= max_connections


async def test_mirror_copies_count_against_the_mirror_backends_pool() -> None:
    mesh = Mesh({"front": 1, "a": 1, "shadow": 1}, [
        route([{"backendRefs": [backend_ref("a")],
                "filters": [{"type": "RequestMirror",
                             "requestMirror": {"backendRef": backend_ref("shadow")}}]}]),
        dr("shadow", {"connectionPool": {"http": {"http2MaxRequests": 1}}}),
    ], {})
    shadow = mesh.backends["shadow"][0]
    shadow.delay = 0.5  # the first copy holds the mirror backend's one request
    async with mesh.running(), mesh.forward("front") as url:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as s:
            results = await asyncio.gather(*(get(s, url + f"/m{i}") for i in range(3)))
        # the clients' answers do not wait for, or depend on, the mirror
        assert [(status, which(text)) for status, text, _ in results] == [(200, "a")] * 3
        await asyncio.sleep(0.8)
    # the copies beyond the mirror backend's limit were dropped, not queued or sent
    assert len(shadow.requests) == 1, shadow.requests


@pytest.mark.parametrize("max_connections", [2, 50])
async def test_http1_pool_accounting_balances_under_concurrent_load(max_connections: int) -> None:
    mesh = Mesh({"front": 1, "a": 3}, [
        route([{"backendRefs": [backend_ref("a")]}]),
        dr("a", {"loadBalancer": {"simple": "ROUND_ROBIN"},
                 "connectionPool": {"tcp": {"maxConnections": max_connections},
                                    "http": {"http1MaxPendingRequests": 100,
                                             "maxRequestsPerConnection": 5}}}),
    ], {}, access_log=False)
    async with mesh.running(), mesh.forward("front") as url:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=30)) as s:
            for wave in range(4):
                got = await asyncio.gather(*(get(s, url + f"/{wave}/{i}") for i in range(30)))
                assert [(status, which(text)) for status, text, _ in got] == [(200, "a")] * 30
        assert mesh.waypoint is not None and mesh.waypoint.chain is not None
        (cluster,) = [c for c in mesh.waypoint.chain.state.clusters.values()
                      if c.target.key == "app/a:80"]
        pool = cluster.pool
        idle = mesh.waypoint.upstreams.idle_count()
        assert (pool.connections, pool.pending, pool.active) == (idle, 0, 0)
        assert idle <= max_connections
