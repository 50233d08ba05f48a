"""HBONE client and server over real TLS on loopback: bytes, half-close, resets, statuses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.pki import TestPKI
from ztunnel.hbone.client import connect
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.h2core import ErrorCode
from ztunnel.hbone.request import (
    Accept,
    ConnectRequest,
    Decision,
    Refuse,
    forwarded_for,
    request_headers,
)
from ztunnel.hbone.server import HboneServer
from ztunnel.hbone.stream import HboneConnection, HboneStream
from ztunnel.identity import Certificate
from ztunnel.tls import client_context, server_context

MiB = 1024 * 1024


async def open_upstream(host: str, port: int) -> socket.socket:
    """Non-blocking connected TCP socket (what a real handler does)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def splice_handler(req: ConnectRequest) -> Decision:
    """Default handler: 401 for port 1 (authz hook), 503 when the upstream is down."""
    if req.port == 1:
        return Refuse(401, "denied by authorization policy")
    try:
        return Accept(sock=await open_upstream(req.host, req.port))
    except OSError as e:
        return Refuse(503, f"upstream {req.authority} unreachable: {e.strerror}")


@dataclass
class Env:
    pki: TestPKI
    server_cert: Certificate
    client_cert: Certificate
    server: HboneServer
    requests: list[ConnectRequest]

    async def connect(self, **kw: Any) -> HboneConnection:
        return await connect(
            self.server.address,
            client_context(self.client_cert, self.pki.bundle),
            self.pki.bundle,
            self.server_cert.identity,
            **kw,
        )

    async def stream(
        self, conn: HboneConnection, port: int, host: str = "127.0.0.1"
    ) -> HboneStream:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return await conn.open_stream(
            request_headers(authority, forwarded=forwarded_for("127.0.0.1", 40000))
        )


@contextlib.asynccontextmanager
async def hbone_env(
    handler: Callable[[ConnectRequest], Awaitable[Decision]] = splice_handler,
    *,
    host: str = "127.0.0.1",
    **server_kw: Any,
) -> AsyncIterator[Env]:
    """PKI, an HBONE server on host:0 (loopback) run by a TaskGroup; torn down on exit."""
    pki = TestPKI()
    server_cert = pki.issue("ns-dst", "server")
    client_cert = pki.issue("ns-src", "client")
    requests: list[ConnectRequest] = []

    async def recording(req: ConnectRequest) -> Decision:
        requests.append(req)
        return await handler(req)

    lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    lsock.bind((host, 0))
    lsock.listen(128)
    server = HboneServer(
        lsock, server_context(server_cert, pki.bundle), pki.bundle, recording, **server_kw
    )
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(server.run())
        await server.started()
        try:
            yield Env(pki, server_cert, client_cert, server, requests)
        finally:
            server.close()
            await task
    lsock.close()


@contextlib.asynccontextmanager
async def echo_server(host: str = "127.0.0.1") -> AsyncIterator[int]:
    """TCP echo on 127.0.0.1: echoes until EOF, then half-closes."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(echo, host, 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


@contextlib.asynccontextmanager
async def scripted_server(
    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    srv = await asyncio.start_server(script, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets on loopback (a reset is a real RST)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        far = socket.create_connection(listener.getsockname())
        near, _ = listener.accept()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


def pattern(n: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB
    reps, rest = divmod(n, len(block))
    return block * reps + block[:rest]


async def read_all(stream: HboneStream) -> bytes:
    parts = []
    while data := await stream.read():
        parts.append(data)
    return b"".join(parts)


# ---------------------------------------------------------------------------- tests


async def test_echo_64mib_byte_exact_both_ways() -> None:
    payload = os.urandom(MiB) * 64
    async with echo_server() as port, hbone_env() as env:
        conn = await env.connect()
        stream = await env.stream(conn, port)
        assert stream.response_headers[0] == (":status", "200")
        assert stream.drained  # an open stream with nothing queued: no need to wait

        async def writer() -> None:
            view = memoryview(payload)
            for off in range(0, len(payload), 256 * 1024):
                stream.write(view[off : off + 256 * 1024])
                await stream.drain()
            stream.write_eof()

        digest = hashlib.sha256()
        total = 0
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer())
            while data := await stream.read():
                digest.update(data)
                total += len(data)
        assert total == len(payload)
        assert digest.digest() == hashlib.sha256(payload).digest()
        assert stream.bytes_sent == stream.bytes_received == len(payload)
        conn.close()
        await conn.closed


async def test_server_sees_identity_authority_and_forwarded() -> None:
    async with echo_server() as port, hbone_env() as env:
        conn = await env.connect()
        stream = await env.stream(conn, port)
        (req,) = env.requests
        assert req.peer_identity == env.client_cert.identity  # from the certificate only
        assert (req.host, req.port, req.authority) == ("127.0.0.1", port, f"127.0.0.1:{port}")
        assert req.forwarded_for == "127.0.0.1:40000"
        assert req.traceparent is not None and req.traceparent.startswith("00-")
        assert conn.peer_identity == env.server_cert.identity
        stream.write_eof()
        assert await read_all(stream) == b""
        conn.close()


async def test_slow_reader_bounds_memory_on_both_sides() -> None:
    """An upstream that stops reading stalls the sender at about one window."""
    accepted: list[socket.socket] = []

    async def handler(req: ConnectRequest) -> Decision:
        # The upstream is a socket pair we control: nothing reads its far end yet.
        a, b = socket.socketpair()
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        a.setblocking(False)
        accepted.append(b)
        return Accept(sock=a)

    async with hbone_env(handler) as env:
        conn = await env.connect()
        stream = await env.stream(conn, 9)
        chunk = b"s" * (256 * 1024)
        written = 0

        async def writer() -> None:
            nonlocal written
            while True:
                stream.write(chunk)
                written += len(chunk)
                await stream.drain()

        task = asyncio.get_running_loop().create_task(writer())
        last = -1
        while written != last:  # until drain() blocks for good
            last = written
            await asyncio.sleep(0.2)
        (srv_conn,) = env.server.connections
        (srv_stream,) = srv_conn.streams.values()
        sink = srv_stream._sink
        assert sink is not None and sink.transport is not None
        upstream_buffered = sink.transport.get_write_buffer_size()
        client_queued = conn.core.pending(stream.stream_id)
        assert not stream.drained  # what drain() waits on: the sender must hold off
        # Python-side buffering is bounded by the 4 MiB stream window (+ one high-water
        # mark), whatever the sender tries; kernel socket buffers hold the rest.
        assert upstream_buffered <= 4 * MiB + MiB
        assert client_queued <= 2 * MiB
        assert written < 48 * MiB
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Now drain the upstream: every byte written arrives, in order.
        stream.write_eof()
        far = accepted[0]
        far.setblocking(False)
        loop = asyncio.get_running_loop()
        got = 0
        while got < written:
            data = await loop.sock_recv(far, 1 << 20)
            assert data and set(data) == {ord("s")}
            got += len(data)
        assert got == written
        far.close()
        conn.close()


async def test_half_close_client_to_server_then_server_keeps_sending() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN
        writer.write(b"got " + data)
        await writer.drain()
        writer.write(b" and more")
        writer.close()

    async with scripted_server(script) as port, hbone_env() as env:
        conn = await env.connect()
        stream = await env.stream(conn, port)
        stream.write(b"request")
        stream.write_eof()
        assert await read_all(stream) == b"got request and more"
        with pytest.raises(HboneError, match="half-closed"):
            stream.write(b"x")
        conn.close()


async def test_half_close_server_to_client_then_client_keeps_sending() -> None:
    got = asyncio.get_running_loop().create_future()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()  # the app half-closes first
        got.set_result(await reader.read())
        writer.close()

    async with scripted_server(script) as port, hbone_env() as env:
        conn = await env.connect()
        stream = await env.stream(conn, port)
        assert await read_all(stream) == b"banner"  # END_STREAM arrived
        stream.write(b"still talking")
        stream.write_eof()
        assert await asyncio.wait_for(got, 5) == b"still talking"
        conn.close()


async def test_upstream_reset_becomes_rst_stream() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with scripted_server(script) as port, hbone_env() as env:
        conn = await env.connect()
        stream = await env.stream(conn, port)
        stream.write(b"hello")
        with pytest.raises(HboneError, match="reset by the peer with CONNECT_ERROR"):
            await read_all(stream)
        assert stream.reset_code == ErrorCode.CONNECT_ERROR
        # The connection itself is fine.
        async with echo_server() as eport:
            s2 = await env.stream(conn, eport)
            s2.write(b"ok")
            s2.write_eof()
            assert await read_all(s2) == b"ok"
        conn.close()


async def test_reset_right_after_the_200_reaches_the_client() -> None:
    # the server accepts, then resets at once: 200 and RST_STREAM arrive in one read
    async def reset_at_once(stream: HboneStream) -> None:
        stream.reset(ErrorCode.CANCEL)

    async def handler(req: ConnectRequest) -> Decision:
        return Accept(serve=reset_at_once)

    async with hbone_env(handler) as env:
        conn = await env.connect()
        stream = await env.stream(conn, 9)
        async with asyncio.timeout(5):  # before the fix: the stream waited forever
            with pytest.raises(HboneError, match="reset by the peer with CANCEL"):
                await read_all(stream)
        assert stream.reset_code == ErrorCode.CANCEL
        assert not conn.streams
        conn.close()


async def test_client_reset_becomes_tcp_reset_upstream() -> None:
    outcome = asyncio.get_running_loop().create_future()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        try:
            data = await reader.read()
            outcome.set_result(f"eof {data!r}")
        except ConnectionResetError:
            outcome.set_result("reset")

    async with scripted_server(script) as port, hbone_env() as env:
        conn = await env.connect()
        stream = await env.stream(conn, port)
        assert await stream.read() == b"hi"
        stream.reset()
        assert await asyncio.wait_for(outcome, 5) == "reset"
        conn.close()


@pytest.mark.parametrize(
    ("authority", "method", "status", "fragment"),
    [
        ("svc.example:80", "CONNECT", 400, "not ip:port"),
        ("127.0.0.1:80", "GET", 400, "not CONNECT"),
        ("127.0.0.1:1", "CONNECT", 401, "denied by authorization policy"),
        ("127.0.0.1:CLOSED", "CONNECT", 503, "unreachable"),
    ],
)
async def test_refusals_carry_status_and_reason(
    authority: str, method: str, status: int, fragment: str
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    authority = authority.replace("CLOSED", str(closed_port))
    async with hbone_env() as env:
        conn = await env.connect()
        headers = [(":method", method), (":authority", authority)]
        if method != "CONNECT":
            headers += [(":scheme", "https"), (":path", "/")]
        with pytest.raises(HboneError) as err:
            await conn.open_stream(headers)
        assert err.value.status == status
        assert f"CONNECT refused with {status}" in str(err.value)
        assert fragment in str(err.value)
        assert not conn.streams and conn.usable  # the connection stays usable
        conn.close()


async def test_local_ip_check_refuses_foreign_authority() -> None:
    async with hbone_env(local_ip_check=lambda ip: ip == "127.0.0.1") as env:
        conn = await env.connect()
        with pytest.raises(HboneError, match=r"400: authority 10\.9\.9\.9:80 is not an address"):
            await env.stream(conn, 80, host="10.9.9.9")
        conn.close()


async def test_handler_crash_answers_503_and_server_survives() -> None:
    async def broken(req: ConnectRequest) -> Decision:
        raise RuntimeError("boom")

    async with hbone_env(broken) as env:
        conn = await env.connect()
        for _ in range(2):
            with pytest.raises(HboneError, match="503: handler failed: boom"):
                await env.stream(conn, 80)
        conn.close()


async def test_oversized_header_list_is_refused() -> None:
    async with hbone_env() as env:
        conn = await env.connect()
        async with asyncio.timeout(5):  # the server's SETTINGS (its header list limit)
            while conn.core.peer_max_header_list != 16384:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        headers = request_headers("127.0.0.1:80", extra=[("x-big", "v" * 40000)])
        with pytest.raises(HboneError, match="exceed the peer's limit of 16384") as err:
            await conn.open_stream(headers)
        assert not err.value.refused  # not retryable: another connection would not help
        # A client that ignores the advertised limit gets 431.
        conn.core.peer_max_header_list = 2**31 - 1
        with pytest.raises(HboneError, match="refused with 431") as err:
            await conn.open_stream(headers)
        assert err.value.status == 431
        assert conn.usable
        conn.close()


async def test_server_identity_mismatch_is_refused() -> None:
    async with hbone_env() as env:
        wrong = env.pki.identity("ns-dst", "someone-else")
        with pytest.raises(HboneError, match=f"expected {wrong}"):
            await connect(
                env.server.address,
                client_context(env.client_cert, env.pki.bundle),
                env.pki.bundle,
                wrong,
            )


async def test_client_from_another_ca_is_rejected() -> None:
    async with hbone_env() as env:
        other = TestPKI()
        cert = other.issue("ns-src", "client")
        with pytest.raises(HboneError, match=r"TLS handshake|closed|refused"):
            conn = await connect(
                env.server.address,
                client_context(cert, env.pki.bundle),
                env.pki.bundle,
                env.server_cert.identity,
            )
            # TLS 1.3: the server's verdict on our certificate can arrive after the
            # handshake completed on our side.
            await env.stream(conn, 80)
        assert not env.requests


async def test_connect_errors_are_actionable() -> None:
    pki = TestPKI()
    cert = pki.issue("a", "b")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(HboneError, match=f"127.0.0.1:{port} refused: is ztunnel listening"):
        await connect(("127.0.0.1", port), client_context(cert, pki.bundle), pki.bundle, None)
    # A listener that never completes the TLS handshake: timeout message.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        with pytest.raises(HboneError, match=r"timed out after 0\.3s: is HBONE port"):
            await connect(
                silent.getsockname(),
                client_context(cert, pki.bundle),
                pki.bundle,
                None,
                connect_timeout=0.3,
            )
    finally:
        silent.close()


async def test_ping_timeout_tears_down_a_dead_connection() -> None:
    """A peer that completes TLS, sends SETTINGS once and then never answers."""
    pki = TestPKI()
    server_cert = pki.issue("ns-dst", "server")
    client_cert = pki.issue("ns-src", "client")
    stalled: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(struct.pack(">IBI", 4, 0, 0))  # empty SETTINGS, then silence
        stalled.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    srv = await asyncio.start_server(
        mute, "127.0.0.1", 0, ssl=server_context(server_cert, pki.bundle)
    )
    try:
        conn = await connect(
            srv.sockets[0].getsockname(),
            client_context(client_cert, pki.bundle),
            pki.bundle,
            server_cert.identity,
            keepalive_interval=0.2,
            keepalive_timeout=0.3,
        )
        started = time.monotonic()
        await asyncio.wait_for(conn.closed, 5)
        assert time.monotonic() - started < 2
        assert conn.error is not None and "did not answer PING within 0.3s" in conn.error
        assert not conn.usable
    finally:
        for w in stalled:
            w.close()
        srv.close()


async def test_keepalive_keeps_a_quiet_healthy_connection() -> None:
    async with hbone_env(keepalive_interval=0.1, keepalive_timeout=1.0) as env:
        conn = await env.connect(keepalive_interval=0.1, keepalive_timeout=1.0)
        await asyncio.sleep(0.8)  # several PING rounds, nothing else
        assert conn.core._ping_counter >= 2  # idle connections are probed
        assert conn.usable and conn.error is None
        conn.close()


async def test_goaway_drain_finishes_in_flight_streams() -> None:
    async with echo_server() as port, hbone_env() as env:
        conn = await env.connect()
        stream = await env.stream(conn, port)
        stream.write(b"before")
        assert await stream.read() == b"before"
        drain = asyncio.get_running_loop().create_task(env.server.drain(timeout=5))
        while conn.core.goaway_received is False:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.01)
        assert not conn.usable  # new streams must go elsewhere
        with pytest.raises(HboneError, match="going away"):
            await env.stream(conn, port)
        stream.write(b"during drain")  # the in-flight stream still works both ways
        assert await stream.read() == b"during drain"
        assert not drain.done()
        stream.write_eof()
        assert await read_all(stream) == b""
        await asyncio.wait_for(drain, 5)
        await asyncio.wait_for(conn.closed, 5)


async def test_server_max_concurrent_streams_is_respected() -> None:
    async with echo_server() as port, hbone_env(max_concurrent_streams=2) as env:
        conn = await env.connect()
        a = await env.stream(conn, port)
        b = await env.stream(conn, port)
        assert conn.core.peer_max_concurrent == 2
        with pytest.raises(HboneError, match="only 2 concurrent streams") as err:
            await env.stream(conn, port)
        assert err.value.refused
        a.write_eof()
        assert await read_all(a) == b""
        c = await env.stream(conn, port)  # room again
        for s in (b, c):
            s.write(b"x")
            s.write_eof()
            assert await read_all(s) == b"x"
        conn.close()


async def test_many_concurrent_streams_on_one_connection() -> None:
    async with echo_server() as port, hbone_env() as env:
        conn = await env.connect()

        async def one(i: int) -> bool:
            s = await env.stream(conn, port)
            data = pattern(100_000 + i, i)
            s.write(data)
            s.write_eof()
            return await read_all(s) == data

        results = await asyncio.gather(*(one(i) for i in range(50)))
        assert all(results)
        assert not conn.streams
        conn.close()


async def test_serve_handler_gets_the_stream() -> None:
    async def serve(stream: HboneStream) -> None:
        data = await stream.readexactly(4)
        stream.write(data[::-1])

    async def handler(req: ConnectRequest) -> Decision:
        return Accept(serve=serve)

    async with hbone_env(handler) as env:
        conn = await env.connect()
        s = await env.stream(conn, 80)
        s.write(b"abcd")
        assert await read_all(s) == b"dcba"  # serve() returned: END_STREAM
        conn.close()


async def test_splice_totals_are_the_stream_counts() -> None:
    """A serve() handler splicing its stream itself gets (sent, received) as counted by
    the stream, over several windows of data both ways."""
    totals: list[tuple[int, int]] = []

    async def handler(req: ConnectRequest) -> Decision:
        async def serve(stream: HboneStream) -> None:
            sent, received = await stream.splice_socket(await open_upstream(req.host, req.port))
            totals.append((sent, received))
            totals.append((stream.bytes_sent, stream.bytes_received))

        return Accept(serve=serve)

    async with echo_server() as port, hbone_env(handler) as env:
        conn = await env.connect()
        s = await env.stream(conn, port)
        data = pattern(9 * MiB, 7)
        s.write(data)
        s.write_eof()
        assert await read_all(s) == data
        assert (s.bytes_sent, s.bytes_received) == (len(data), len(data))
        for _ in range(100):
            if totals:
                break
            await asyncio.sleep(0.01)
        assert totals == [(len(data), len(data))] * 2
        conn.close()


async def test_lost_connection_resets_the_spliced_tcp_side() -> None:
    """The HBONE connection dies mid-stream: the local TCP peer sees a reset, not a FIN."""
    async with echo_server() as port, hbone_env() as env:
        conn = await env.connect()
        stream = await env.stream(conn, port)
        near, far = tcp_pair()
        loop = asyncio.get_running_loop()
        splice = loop.create_task(stream.splice_socket(near))
        await loop.sock_sendall(far, b"ping")
        assert await loop.sock_recv(far, 4) == b"ping"
        for server_conn in list(env.server.connections):
            server_conn.abort()
        sent, received = await asyncio.wait_for(splice, 5)
        assert (sent, received) == (4, 4)
        with pytest.raises(ConnectionResetError):
            while await loop.sock_recv(far, 100):
                pass
        far.close()
        assert conn.error is not None


async def test_slow_client_reader_pauses_the_upstream() -> None:
    """The client stops reading: the server stops reading its upstream, nothing piles up."""
    far_ends: list[socket.socket] = []

    async def handler(req: ConnectRequest) -> Decision:
        near, far = tcp_pair()
        far_ends.append(far)
        return Accept(sock=near)

    async with hbone_env(handler) as env:
        conn = await env.connect()
        stream = await env.stream(conn, 9)
        (far,) = far_ends
        far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        chunk = b"u" * (64 * 1024)
        pushed = 0
        stalled_since = time.monotonic()
        while time.monotonic() - stalled_since < 0.3:  # push until the upstream blocks
            try:
                pushed += far.send(chunk)
                stalled_since = time.monotonic()
            except BlockingIOError:
                await asyncio.sleep(0.02)
        (srv_conn,) = env.server.connections
        (srv_stream,) = srv_conn.streams.values()
        assert srv_conn.core.pending(srv_stream.stream_id) <= 2 * MiB  # paused, not queued
        assert stream._buf_len <= 4 * MiB  # the client holds at most its window
        assert pushed < 48 * MiB
        far.shutdown(socket.SHUT_WR)
        total = 0
        while data := await stream.read():
            assert set(data) == {ord("u")}
            total += len(data)
        assert total == pushed
        far.close()
        conn.close()


async def test_ipv6_end_to_end() -> None:
    async with echo_server("::1") as port, hbone_env(host="::1") as env:
        assert env.server.address[0] == "::1"
        conn = await env.connect()
        stream = await conn.open_stream(
            request_headers(f"[::1]:{port}", forwarded=forwarded_for("::1", 40000))
        )
        stream.write(b"over v6")
        stream.write_eof()
        assert await read_all(stream) == b"over v6"
        (req,) = env.requests
        assert (req.host, req.port) == ("::1", port)
        assert req.forwarded_for == "[::1]:40000"
        assert req.peer_addr[0] == "::1"
        conn.close()
