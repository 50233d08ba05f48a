"""Endpoints outside the mesh: the waypoint's HTTP/1.1 client over plain TCP (real sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, NoReturn

from waypoint.model import Request, UpstreamEndpoint
from waypoint.upstream import Upstreams


def _no_identity() -> NoReturn:
    raise AssertionError("a plain TCP endpoint must not ask for the mesh identity")


def _no_spawn(coro: Coroutine[Any, Any, None]) -> None:
    coro.close()
    raise AssertionError("a buffered body needs no task")


async def test_plain_tcp_endpoint_keep_alive_and_bodies() -> None:
    heads: list[bytes] = []
    accepted = 0

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        while True:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            heads.append(head)
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = await r.readexactly(length)
            answer = b"echo:" + body
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(answer), answer))
            await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    identity: Any = _no_identity
    ups = Upstreams(identity)
    ep = UpstreamEndpoint("w1", "127.0.0.1", port, "", hbone=False)
    try:
        for body in (b"", b"hello", b"x" * 70000):  # the last one goes out in two writes
            req = Request("POST", "/items", "svc.local", ())
            resp = await ups.h1_request(ep, req, (("x-a", "1"),), body, deadline=None,
                                        spawn=_no_spawn)
            assert resp.status == 200
            got = resp.take_ready()
            if not resp.body_complete():
                got += b"".join([c async for c in resp.chunks()])
            assert got == b"echo:" + body
            resp.finish()
            assert ups.idle_count(ep) == 1  # kept alive for the next request
        assert accepted == 1  # all three requests on one connection
        assert all(b"host: svc.local\r\n" in h and b"x-a: 1\r\n" in h for h in heads)
    finally:
        await ups.close()
        server.close()
        await server.wait_closed()

