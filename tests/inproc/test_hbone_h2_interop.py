"""Interop with the `h2` library as reference peer: its client to our server, ours to its."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from tests.inproc.test_hbone_tunnel import MiB, echo_server, hbone_env, pattern, read_all
from tests.pki import TestPKI
from ztunnel.hbone.client import connect
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.request import forwarded_for, request_headers
from ztunnel.identity import Certificate
from ztunnel.tls import client_context, server_context


def hdict(headers: Any) -> dict[str, str]:
    """h2 header list (str with header_encoding set) as a dict."""
    return {str(k): str(v) for k, v in headers}


class H2EchoServer(asyncio.Protocol):
    """An `h2`-library CONNECT server that echoes each stream (honouring flow control).

    `refuse` streams get RST_STREAM(REFUSED_STREAM) instead; `status` is the response.
    """

    def __init__(self, *, refuse: bool = False, status: int = 200) -> None:
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.refuse = refuse
        self.status = status
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.requests: list[dict[str, str]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100},
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(2**24)
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.h2.data_to_send())
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.requests.append(hdict(ev.headers))
                if self.refuse:
                    self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                else:
                    end = self.status != 200
                    self.h2.send_headers(
                        ev.stream_id, [(":status", str(self.status))], end_stream=end
                    )
                    self.pending[ev.stream_id] = bytearray()
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_id in self.pending:
                    self.pending[ev.stream_id] += ev.data
            elif isinstance(ev, h2.events.StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.pending.pop(ev.stream_id, None)
        self._pump()
        self.transport.write(self.h2.data_to_send())

    def _pump(self) -> None:
        for sid, buf in list(self.pending.items()):
            while buf:
                window = self.h2.local_flow_control_window(sid)
                n = min(len(buf), window, self.h2.max_outbound_frame_size)
                if n <= 0:
                    break
                self.h2.send_data(sid, bytes(buf[:n]))
                del buf[:n]
            if not buf and sid in self.ended:
                self.h2.end_stream(sid)
                del self.pending[sid]


@contextlib.asynccontextmanager
async def h2_server(
    cert: Certificate, pki: TestPKI, *, refuse_connections: int = 0, **kw: Any
) -> AsyncIterator[tuple[tuple[str, int], list[H2EchoServer]]]:
    """An H2EchoServer listener; its first `refuse_connections` connections refuse streams."""
    protocols: list[H2EchoServer] = []

    def factory() -> H2EchoServer:
        p = H2EchoServer(refuse=len(protocols) < refuse_connections, **kw)
        protocols.append(p)
        return p

    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        factory, "127.0.0.1", 0, ssl=server_context(cert, pki.bundle)
    )
    try:
        host, port = srv.sockets[0].getsockname()[:2]
        yield (host, port), protocols
    finally:
        srv.close()
        for p in protocols:
            if p.transport is not None:
                p.transport.abort()


async def test_our_client_against_h2_server() -> None:
    pki = TestPKI()
    server_cert = pki.issue("ns-dst", "h2-server")
    client_cert = pki.issue("ns-src", "client")
    async with h2_server(server_cert, pki) as (addr, protocols):
        conn = await connect(
            addr, client_context(client_cert, pki.bundle), pki.bundle, server_cert.identity
        )
        payload = pattern(8 * MiB + 12345, 3)

        async def one(i: int) -> bool:
            stream = await conn.open_stream(
                request_headers(f"10.0.0.{i}:80", forwarded=forwarded_for("10.1.1.1", 999))
            )
            stream.write(payload)
            stream.write_eof()
            return await read_all(stream) == payload

        assert all(await asyncio.gather(*(one(i) for i in range(1, 4))))
        (proto,) = protocols
        authorities = sorted(r[":authority"] for r in proto.requests)
        assert authorities == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
        assert all(r[":method"] == "CONNECT" for r in proto.requests)
        assert all(r["forwarded"] == 'for="10.1.1.1:999"' for r in proto.requests)
        conn.close()
        await conn.closed


async def test_our_client_sees_h2_server_refusal_status() -> None:
    pki = TestPKI()
    server_cert = pki.issue("ns-dst", "h2-server")
    client_cert = pki.issue("ns-src", "client")
    async with h2_server(server_cert, pki, status=503) as (addr, _):
        conn = await connect(
            addr, client_context(client_cert, pki.bundle), pki.bundle, server_cert.identity
        )
        try:
            await conn.open_stream(request_headers("10.0.0.1:80"))
        except HboneError as e:
            assert e.status == 503
        else:
            raise AssertionError("503 not reported")
        conn.close()


class H2Client:
    """A minimal `h2`-library CONNECT client over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.reader = reader
        self.writer = writer
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(2**24)
        self.flush()

    def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())

    async def events(self) -> list[h2.events.Event]:
        data = await self.reader.read(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        events = self.h2.receive_data(data)
        self.flush()
        return list(events)

    async def response_status(self) -> str:
        """Read until the response HEADERS arrive: their `:status`."""
        status = None
        while status is None:
            for ev in await self.events():
                if isinstance(ev, h2.events.ResponseReceived):
                    status = hdict(ev.headers)[":status"]
        return status


async def test_h2_client_against_our_server() -> None:
    async with echo_server() as port, hbone_env() as env:
        ctx = client_context(env.client_cert, env.pki.bundle)
        reader, writer = await asyncio.open_connection(*env.server.address, ssl=ctx)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        client = H2Client(reader, writer)
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(
            sid,
            [
                (":method", "CONNECT"),
                (":authority", f"127.0.0.1:{port}"),
                ("forwarded", 'for="127.0.0.1:5555"'),
            ],
        )
        client.flush()
        assert await client.response_status() == "200"
        payload = pattern(6 * MiB + 7, 9)
        sent = 0
        echoed = hashlib.sha256()
        got = 0
        ended = False
        while not ended:
            # Send whatever the window allows, then process what came back.
            while sent < len(payload):
                window = client.h2.local_flow_control_window(sid)
                n = min(window, client.h2.max_outbound_frame_size, len(payload) - sent)
                if n <= 0:
                    break
                client.h2.send_data(sid, payload[sent : sent + n])
                sent += n
                if sent == len(payload):
                    client.h2.end_stream(sid)
            client.flush()
            for ev in await client.events():
                if isinstance(ev, h2.events.DataReceived):
                    echoed.update(ev.data)
                    got += len(ev.data)
                    client.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {ev.error_code}")
            client.flush()
        assert got == len(payload)
        assert echoed.digest() == hashlib.sha256(payload).digest()
        assert env.requests[0].forwarded_for == "127.0.0.1:5555"
        assert env.requests[0].peer_identity == env.client_cert.identity
        # Ping and a graceful close.
        client.h2.ping(b"12345678")
        client.flush()
        acked = False
        while not acked:
            acked = any(isinstance(e, h2.events.PingAckReceived) for e in await client.events())
        client.h2.close_connection()
        client.flush()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_h2_client_gets_400_for_get() -> None:
    async with hbone_env(max_concurrent_streams=1) as env:
        ctx = client_context(env.client_cert, env.pki.bundle)
        reader, writer = await asyncio.open_connection(*env.server.address, ssl=ctx)
        client = H2Client(reader, writer)
        # Let the server's SETTINGS arrive first.
        while client.h2.remote_settings.max_concurrent_streams != 1:
            await client.events()
        client.h2.send_headers(
            1, [(":method", "GET"), (":authority", "127.0.0.1:80"), (":scheme", "https"),
                (":path", "/")], end_stream=True
        )
        client.flush()
        statuses: dict[int, str] = {}
        while 1 not in statuses:
            for ev in await client.events():
                if isinstance(ev, h2.events.ResponseReceived):
                    statuses[ev.stream_id] = hdict(ev.headers)[":status"]
        assert statuses[1] == "400"
        writer.close()


async def test_h2_client_padding_priority_and_trailers() -> None:
    """Less common but legal frames: padded DATA, PRIORITY, priority in HEADERS, trailers."""
    async with echo_server() as port, hbone_env() as env:
        ctx = client_context(env.client_cert, env.pki.bundle)
        reader, writer = await asyncio.open_connection(*env.server.address, ssl=ctx)
        client = H2Client(reader, writer)
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(
            sid,
            [(":method", "CONNECT"), (":authority", f"127.0.0.1:{port}")],
            priority_weight=200,
        )
        client.h2.prioritize(sid, weight=16)
        client.flush()
        assert await client.response_status() == "200"
        client.h2.send_data(sid, b"padded hello", pad_length=40)
        client.h2.send_headers(sid, [("x-trailer", "done")], end_stream=True)  # trailers = FIN
        client.flush()
        echoed = b""
        ended = False
        while not ended:
            for ev in await client.events():
                if isinstance(ev, h2.events.DataReceived):
                    echoed += ev.data
                    client.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {ev.error_code}")
            client.flush()
        assert echoed == b"padded hello"
        writer.close()
