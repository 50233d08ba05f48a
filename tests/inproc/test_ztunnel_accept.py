"""The accept loop under a burst: the limit holds within one batch; cancelled ones are let go."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

from tests.inproc.test_ztunnel_limits import make_ctx
from ztunnel.listeners._base import Limits, TcpAcceptor, listener_socket


def _queued_clients(address: tuple[str, int], n: int) -> list[socket.socket]:
    """`n` connections completed by the kernel, waiting in the listener's backlog."""
    clients = [socket.create_connection(address, timeout=5) for _ in range(n)]
    for c in clients:
        c.setblocking(False)
    return clients


async def _outcome(c: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(c, 10), 5)
    except ConnectionResetError:
        return b"reset"


async def test_a_burst_accepted_at_once_is_bounded_by_the_limit() -> None:
    ctx = make_ctx(Limits(max_connections=3))
    release = asyncio.Event()
    served = 0

    async def handle(conn: socket.socket, peer: Any) -> None:
        nonlocal served
        served += 1
        await asyncio.get_running_loop().sock_sendall(conn, b"hi")
        await release.wait()
        conn.close()

    sock = listener_socket(None, "127.0.0.1", 0, transparent=False)
    acceptor = TcpAcceptor(sock, ctx, handle, "burst")
    clients = _queued_clients(acceptor.address, 10)  # before the loop accepts any
    async with asyncio.TaskGroup() as tg:
        tg.create_task(acceptor.run())
        outcomes = await asyncio.gather(*(_outcome(c) for c in clients))
        assert sorted(outcomes) == [b"hi"] * 3 + [b"reset"] * 7
        assert ctx.active == 3 and served == 3
        release.set()
        await acceptor.drain(2.0)
    for c in clients:
        c.close()
    assert ctx.active == 0


async def test_connections_cancelled_before_their_handler_ran_leave_the_count() -> None:
    ctx = make_ctx(Limits(max_connections=100))
    started = 0

    async def handle(conn: socket.socket, peer: Any) -> None:
        nonlocal started
        started += 1
        try:
            await asyncio.Event().wait()
        finally:
            conn.close()

    sock = listener_socket(None, "127.0.0.1", 0, transparent=False)
    acceptor = TcpAcceptor(sock, ctx, handle, "drain")
    acceptor.BURST_GAP = float("inf")  # the whole queue in the first wake-up
    clients = _queued_clients(acceptor.address, 5)
    loop = asyncio.get_running_loop()

    async def run() -> None:
        await acceptor.run()

    runner = asyncio.ensure_future(run())
    # Let the reader callback accept the burst, then cancel before the handlers ran
    # (what drain does to connections still open when its time is up).
    while not acceptor._tasks:  # noqa: ASYNC110 - the loop's own accept, no event to wait on
        await asyncio.sleep(0)
    assert ctx.active == 5
    acceptor.stop_accepting()
    for t in list(acceptor._tasks):
        t.cancel()
    await asyncio.wait_for(runner, 5)
    assert ctx.active == 0
    assert started < 5, "the handlers had all started: the test did not test the early cancel"
    # accepting stopped: the listening socket is closed, a new connect is refused
    with socket.socket() as late:
        late.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(late, acceptor.address), 5)
            refused = False
        except ConnectionRefusedError:
            refused = True
    assert refused
    for c in clients:
        c.close()


class _AbortingListener(socket.socket):
    """A real listening socket whose first accept() reports ECONNABORTED, as accept(2)
    does for a client that reset before it was accepted (which the kernel cannot be
    made to do on demand)."""

    aborted = False

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.aborted:
            self.aborted = True
            raise ConnectionAbortedError(errno.ECONNABORTED, os.strerror(errno.ECONNABORTED))
        return super().accept()


async def test_a_connection_aborted_before_accept_does_not_end_the_listener() -> None:
    ctx = make_ctx(Limits(max_connections=100))

    async def handle(conn: socket.socket, peer: Any) -> None:
        await asyncio.get_running_loop().sock_sendall(conn, b"hi")
        conn.close()

    sock = _AbortingListener(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    acceptor = TcpAcceptor(sock, ctx, handle, "aborting")
    clients = _queued_clients(acceptor.address, 2)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(acceptor.run())
        outcomes = await asyncio.gather(*(_outcome(c) for c in clients))
        assert outcomes == [b"hi", b"hi"]
        assert sock.aborted
        assert 'ambit_ztunnel_accept_errors_total{errno="ECONNABORTED"} 1.0' in \
            ctx.metrics.render().decode()
        await acceptor.drain(1.0)
    for c in clients:
        c.close()
