"""The shared accept loop: connection limit, EMFILE backoff, drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from typing import Any

from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.identity import IdentityManager, SpiffeId
from ztunnel.listeners._base import Limits, ProxyContext, TcpAcceptor, listener_socket
from ztunnel.listeners.metrics import ZtunnelMetrics
from ztunnel.snapshot import Snapshot


async def _no_fetch(identity: SpiffeId, csr: bytes) -> list[bytes]:
    raise RuntimeError("no certificates in this test")


def make_ctx(limits: Limits) -> ProxyContext:
    return ProxyContext(
        node="n1", snapshot=Snapshot.from_dict({"version": 1, "node": "n1"}),
        metrics=ZtunnelMetrics(), identities=IdentityManager(_no_fetch),
        pool=HboneConnectionPool(), limits=limits,
    )


async def test_connection_limit_resets_the_excess_and_drain_waits() -> None:
    ctx = make_ctx(Limits(max_connections=2))
    release = asyncio.Event()

    async def handle(conn: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(conn, b"hello")
        await release.wait()
        conn.close()

    sock = listener_socket(None, "127.0.0.1", 0, transparent=False)
    acceptor = TcpAcceptor(sock, ctx, handle, "test")
    async with asyncio.TaskGroup() as tg:
        tg.create_task(acceptor.run())
        held = []
        for _ in range(2):
            r, w = await asyncio.open_connection(*acceptor.address)
            assert await r.readexactly(5) == b"hello"
            held.append(w)
        # The excess connection is reset: seen on the first read, or already by the
        # connect when the accept (and its reset) comes before the client's loop sees
        # the handshake complete.
        w3: asyncio.StreamWriter | None = None
        try:
            r, w3 = await asyncio.open_connection(*acceptor.address)
            data = await asyncio.wait_for(r.read(), 5)
        except ConnectionResetError:
            data = b""
        assert data == b"", "the third connection was served above the limit"
        if w3 is not None:
            w3.close()
        assert ctx.active == 2
        release.set()
        await acceptor.drain(2.0)
        for w in held:
            w.close()
    assert ctx.active == 0


async def test_emfile_backs_off_and_recovers() -> None:
    ctx = make_ctx(Limits(accept_backoff_max=0.05))

    async def handle(conn: socket.socket, peer: Any) -> None:
        await asyncio.get_running_loop().sock_sendall(conn, b"ok")
        conn.close()

    sock = listener_socket(None, "127.0.0.1", 0, transparent=False)
    acceptor = TcpAcceptor(sock, ctx, handle, "test")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(acceptor.run())
        client = socket.create_connection(acceptor.address)  # before the fd table is full
        client.setblocking(False)
        try:
            in_use = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(64, in_use + 8), hard))
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            await asyncio.sleep(0.3)
            errors = ctx.metrics.render().decode()
            assert 'ambit_ztunnel_accept_errors_total{errno="EMFILE"}' in errors
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(client, 10), 5)
        assert data == b"ok"
        client.close()
        await acceptor.drain(1.0)
