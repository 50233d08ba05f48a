"""The TCP splice on loopback: bytes both ways, half-close, reset propagation, idle timeout."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from ztunnel.relay import RelayHandle, RelayResult, relay


async def _pair_through_relay(
    idle_timeout: float | None = None, handle: RelayHandle | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader,
           asyncio.StreamWriter, asyncio.Task[RelayResult]]:
    """client <-> [accepted a | relay | b connected] <-> upstream server."""
    loop = asyncio.get_running_loop()
    upstream_conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.Queue()
    )

    async def on_upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await upstream_conns.put((r, w))

    server = await asyncio.start_server(on_upstream, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    cr, cw = await asyncio.open_connection("127.0.0.1", lsock.getsockname()[1])
    a, _ = await loop.sock_accept(lsock)
    lsock.close()
    b = socket.socket()
    b.setblocking(False)
    await loop.sock_connect(b, ("127.0.0.1", up_port))
    task = asyncio.create_task(relay(a, b, idle_timeout=idle_timeout, handle=handle))
    ur, uw = await upstream_conns.get()
    server.close()
    return cr, cw, ur, uw, task


async def test_bytes_flow_both_ways_and_half_close_is_propagated() -> None:
    cr, cw, ur, uw, task = await _pair_through_relay()
    payload = b"x" * (3 << 20)
    cw.write(payload)
    cw.write_eof()  # client half-closes: the upstream must see EOF after all bytes
    got = await ur.read()
    assert len(got) == len(payload), (len(got), len(payload))
    assert got == payload
    uw.write(b"reply after client FIN")
    await uw.drain()
    uw.write_eof()
    assert await cr.read() == b"reply after client FIN"
    result = await asyncio.wait_for(task, 5)
    assert result.sent == len(payload)
    assert result.received == len(b"reply after client FIN")
    assert result.error is None
    cw.close()
    uw.close()


async def test_reset_from_upstream_resets_the_client() -> None:
    cr, cw, ur, uw, task = await _pair_through_relay()
    cw.write(b"hello")
    assert await ur.readexactly(5) == b"hello"
    sock = uw.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    uw.transport.abort()
    result = await asyncio.wait_for(task, 5)
    assert result.error is not None
    try:
        data = await asyncio.wait_for(cr.read(), 5)
    except ConnectionResetError:
        data = None  # reset seen by the client: what we want
    assert data is None, "the client saw a clean EOF instead of a reset"
    cw.close()


async def test_idle_timeout_closes_both_sides() -> None:
    cr, cw, _ur, uw, task = await _pair_through_relay(idle_timeout=0.3)
    result = await asyncio.wait_for(task, 5)
    assert result.error is not None and "idle" in result.error
    with contextlib.suppress(ConnectionResetError):
        await asyncio.wait_for(cr.read(), 5)
    cw.close()
    uw.close()


async def test_handle_close_resets_an_open_relay() -> None:
    handle = RelayHandle()
    cr, cw, ur, uw, task = await _pair_through_relay(handle=handle)
    cw.write(b"ping")
    assert await ur.readexactly(4) == b"ping"
    handle.close("denied by policy")
    result = await asyncio.wait_for(task, 5)
    assert result.error == "denied by policy"
    with contextlib.suppress(ConnectionResetError):
        await asyncio.wait_for(cr.read(), 5)
    cw.close()
    uw.close()
